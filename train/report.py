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
