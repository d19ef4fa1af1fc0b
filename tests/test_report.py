"""train/report.py: the evaluation figures, checked on hand-made predictions whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train.report import (
    classification_metrics,
    cross_fitted_ece,
    expected_calibration_error,
    fit_temperature,
    plot_confusion,
    plot_curves,
    softmax,
    stratified_folds,
    write_json,
)

CLASSES = ["hat", "shoes", "skirt"]


def one_hot(predicted: list[int], confidence: float = 0.8) -> np.ndarray:
    """Probabilities that pick `predicted` with `confidence` and share the rest evenly."""
    probs = np.full((len(predicted), 3), (1 - confidence) / 2)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def test_precision_recall_f1_and_confusion_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = [0, 0, 1, 1, 1, 0]  # hat: 2 of 3 found, 1 skirt taken for a hat; skirt never found
    m = classification_metrics(labels, one_hot(predicted), CLASSES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]  # rows true, columns predicted
    assert m["accuracy"] == round(4 / 6, 4) and m["n"] == 6 and m["classes"] == CLASSES
    hat, shoes, skirt = (m["per_class"][c] for c in CLASSES)
    assert (hat["precision"], hat["recall"], hat["f1"], hat["support"]) == (round(2 / 3, 4), round(2 / 3, 4),
                                                                          round(2 / 3, 4), 3)
    assert (shoes["precision"], shoes["recall"], shoes["f1"]) == (round(2 / 3, 4), 1.0, 0.8)
    assert skirt == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted: no 0/0
    assert m["macro_f1"] == round((2 / 3 + 0.8 + 0.0) / 3, 4)


def test_a_class_without_samples_does_not_count_in_macro_f1_and_no_samples_is_an_error() -> None:
    m = classification_metrics(np.array([0, 1]), one_hot([0, 1]), CLASSES)  # no skirt at all (--limit)
    assert m["per_class"]["skirt"]["support"] == 0
    assert m["macro_f1"] == 1.0  # a perfect classifier of the classes present (it said 0.6667)
    with pytest.raises(ValueError, match="no samples to score"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), CLASSES)


def test_a_confidence_a_hair_above_one_still_falls_in_the_top_bin() -> None:
    probs = one_hot([0, 0], 1.0)
    probs[:, 0] = 1.0 + 1e-7  # float32 softmax can round like this
    assert expected_calibration_error(np.array([0, 0]), probs) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(np.array([1, 1]), probs) == pytest.approx(1.0, abs=1e-6)


def test_calibration_error_by_hand() -> None:
    labels = np.array([0, 0, 0, 0])
    # all four at confidence 0.8 in one bin, three right: |0.75 - 0.8| = 0.05
    assert expected_calibration_error(labels, one_hot([0, 0, 0, 1])) == pytest.approx(0.05)
    # two bins: 0.9 (both right: 0.1) and 0.6 (one of two right: 0.1), weighted 1/2 each
    probs = np.vstack([one_hot([0, 0], 0.9), one_hot([0, 1], 0.6)])
    assert expected_calibration_error(labels, probs) == pytest.approx(0.1)
    assert expected_calibration_error(labels, one_hot([0, 0, 0, 0], 1.0)) == pytest.approx(0.0)


def test_figures_are_written_as_png_and_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the figures need the train extra (matplotlib)")
    m = classification_metrics(np.array([0, 1, 2]), one_hot([0, 1, 1]), CLASSES)
    plot_confusion(tmp_path / "confusion.png", m, "validation")
    plot_curves(tmp_path / "curves.png", [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e,
                                           "train_acc": 1 - 1 / (e + 1), "val_acc": 0.9 - 1 / (e + 2)}
                                          for e in (1, 2, 3)])
    for name in ("confusion.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json(tmp_path / "m.json", m)
    assert json.loads((tmp_path / "m.json").read_text()) == m


def test_a_right_temperature_is_found_and_cross_fitting_agrees_with_the_in_sample_figure() -> None:
    # labels drawn from softmax(z / 2): temperature 2 is exactly right for the logits z
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, (10_000, 4))
    truth = softmax(z / 2.0)
    labels = (rng.random(len(z))[:, None] > truth.cumsum(1)).sum(1)
    fitted = fit_temperature(z, labels)
    assert fitted == pytest.approx(2.0, rel=0.02)
    in_sample = expected_calibration_error(labels, softmax(z / fitted))
    crossed = cross_fitted_ece(labels, truth, 2.0)  # the calibrated output and its temperature, as exported
    assert in_sample < 0.015 and crossed < 0.015
    assert crossed == pytest.approx(in_sample, abs=0.002)
    # the logits are recovered up to a per-row constant: the baked-in temperature does not matter
    assert cross_fitted_ece(labels, softmax(z), 1.0) == pytest.approx(crossed, abs=1e-6)


def test_few_samples_make_the_in_sample_figure_optimistic() -> None:
    # Ten samples of one class, all with the same margin, three predicted wrongly (0, 1, 5). One shared
    # confidence c fits best at c = accuracy = 0.7: in-sample ECE 0. Folds are i % 5: fold 0 = {0, 5} is
    # scored at the accuracy of the others, 7/8 (right: 0 of 2), fold 1 = {1, 6} at 6/8 (1 of 2), folds 2-4
    # at 5/8 (6 of 6), in three separate bins: 0.2 * 0.875 + 0.2 * 0.25 + 0.6 * 0.375 = 0.45.
    labels = np.zeros(10, dtype=int)
    logits = np.tile([2.0, 0.0], (10, 1))
    logits[[0, 1, 5]] = [0.0, 2.0]
    fitted = softmax(logits / fit_temperature(logits, labels))
    assert fitted.max(1) == pytest.approx(np.full(10, 0.7), abs=1e-6)
    assert expected_calibration_error(labels, fitted) == pytest.approx(0.0, abs=1e-6)
    assert cross_fitted_ece(labels, softmax(logits / 1.5), 1.5) == pytest.approx(0.45, abs=1e-6)


def test_folds_are_stratified_and_cross_fitting_is_deterministic() -> None:
    labels = np.repeat([0, 1, 2], [7, 5, 3])
    folds = stratified_folds(labels, 5)
    assert folds.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # round-robin, carried over
    shuffled = np.array([2, 0, 1, 0, 2, 1, 0])
    # class 0 (at 1, 3, 6) gets folds 0, 1, 2; class 1 (at 2, 5) 0, 1; class 2 (at 0, 4) 2, 0
    assert stratified_folds(shuffled, 3).tolist() == [2, 0, 0, 1, 0, 1, 2]
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(0.0, 2.0, (15, 3)))
    first = cross_fitted_ece(labels, probs, 1.3)
    assert 0.0 < first <= 1.0
    assert cross_fitted_ece(labels.copy(), probs.copy(), 1.3) == first
    # a probability of exactly 0 (float32 underflow) is clipped: no -inf logits, no NaN
    probs[0] = [1.0, 0.0, 0.0]
    assert np.isfinite(cross_fitted_ece(labels, probs, 1.3))


def test_fewer_samples_than_folds_is_an_error() -> None:
    labels, probs = np.array([0, 1, 2]), one_hot([0, 1, 1])
    with pytest.raises(ValueError, match="cross-fitting over 5 folds needs at least 5 samples, got 3"):
        cross_fitted_ece(labels, probs, 1.0)
    with pytest.raises(ValueError, match="cross-fitting needs at least 2 folds, got 1"):
        cross_fitted_ece(labels, probs, 1.0, folds=1)
    assert 0.0 <= cross_fitted_ece(labels, probs, 1.0, folds=3) <= 1.0
