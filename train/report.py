"""Evaluation figures for a training run: metrics.json, a confusion-matrix PNG, a training-curves PNG."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], bins: int = 15
) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix and expected calibration error.

    Macro F1 averages the classes that have validation samples (a class with none, as with --limit, has no
    F1 to speak of); an empty set is a ValueError rather than NaN figures.
    """
    if len(labels) == 0:
        raise ValueError("no samples to score")
    predictions = probabilities.argmax(1)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted, actual = confusion[:, i].sum(), confusion[i, :].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(actual),
        }
    return {
        "accuracy": round(float((predictions == labels).mean()), 4),
        "macro_f1": round(float(np.mean([c["f1"] for c in per_class.values() if c["support"]])), 4),
        "ece": round(expected_calibration_error(labels, probabilities, bins), 4),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
        "n": len(labels),
    }


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = np.clip(probabilities.max(1), 0.0, 1.0)  # float rounding may put a hair above 1
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def cross_fitted_ece(
    labels: np.ndarray, probabilities: np.ndarray, temperature: float, folds: int = 5, bins: int = 15
) -> float:
    """The calibration error of temperature scaling measured on samples its temperature was not fitted on.

    Export fits the temperature on validation and `ece` scores it on the same images: an optimistic,
    in-sample figure. Here the logits are recovered from the calibrated output, up to a per-row constant, as
    `temperature * log(probabilities)`; the samples go to `folds` stratified, deterministic folds (class by
    class, in order, round-robin, so each fold gets a share of every class and folds differ by at most one
    sample); each fold is scored with a temperature fitted (`fit_temperature`) on the other folds, and the
    result is the ECE of all these out-of-fold probabilities. Fewer samples than folds is a ValueError.
    """
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if len(labels) < folds:
        raise ValueError(f"cross-fitting over {folds} folds needs at least {folds} samples, got {len(labels)}")
    logits = temperature * np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    fold = stratified_folds(labels, folds)
    held_out = np.empty_like(logits)
    for k in range(folds):
        test = fold == k
        held_out[test] = softmax(logits[test] / fit_temperature(logits[~test], labels[~test]))
    return expected_calibration_error(labels, held_out, bins)


def stratified_folds(labels: np.ndarray, folds: int) -> np.ndarray:
    """Each sample's fold: class by class, in order, round-robin carried over from one class to the next."""
    fold = np.empty(len(labels), dtype=int)
    start = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return fold


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bracket: tuple[float, float] = (-7.0, 7.0)) -> float:
    """The temperature T minimising the mean negative log-likelihood of softmax(logits / T) (numpy only).

    The NLL is convex in 1/T, hence unimodal in log(1/T): a golden-section search over log(1/T) in
    `bracket` (T from e^-7 to e^7) finds it. Data that a sharper softmax always fits better (no errors) end
    at the bracket's edge.
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))

    def nll(log_inverse: float) -> float:
        scaled = logits * np.exp(log_inverse)
        scaled -= scaled.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(scaled).sum(1)) - scaled[rows, labels]))

    ratio = (np.sqrt(5) - 1) / 2
    low, high = bracket
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    at_left, at_right = nll(left), nll(right)
    while high - low > 1e-7:
        if at_left <= at_right:
            high, right, at_right = right, left, at_left
            left = high - ratio * (high - low)
            at_left = nll(left)
        else:
            low, left, at_left = left, right, at_right
            right = low + ratio * (high - low)
            at_right = nll(right)
    return float(np.exp(-(low + high) / 2))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_confusion(path: Path, metrics: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.array(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    rows = confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                color = "white" if confusion[i, j] / rows[i, 0] > 0.5 else "black"
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: accuracy {metrics['accuracy']:.3f} (n={metrics['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    right.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train")
    right.plot(epochs, [h["val_acc"] for h in history], marker="o", label="validation")
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.legend()
    fig.suptitle("training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
