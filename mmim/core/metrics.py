"""The evaluation metrics of CMU-MOSI / CMU-MOSEI papers, named as in the MMIM paper.

- MAE, Corr (Pearson) on the raw scores.
- Acc-7: both sides clipped to [-3, 3] and rounded to the nearest integer (7 classes).
- Acc-5: the same with [-2, 2] (5 classes).
- Acc-2 / F1 "has0": truth >= 0 vs < 0 (and prediction >= 0 vs < 0) over all samples.
- Acc-2 / F1 "non0": truth > 0 vs < 0 (prediction > 0), samples with truth == 0 excluded.
- F1 is the support-weighted mean of the two classes' F1 scores, with the truth as
  reference. (The reference implementation passes sklearn's arguments the other way
  round; weighted F1 is not symmetric, so its F1 can differ slightly from ours.)
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("MAE", "Corr", "Acc-7", "Acc-5", "Acc-2_has0", "F1_has0", "Acc-2_non0", "F1_non0")


def _as_vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return array


def pearson(predictions: np.ndarray, truths: np.ndarray) -> float | np.ndarray:
    """Pearson correlation along the last axis; 0.0 where either side is constant (it is
    undefined there). Vectors give a float; stacked rows (bootstrap resamples) one per row."""
    p = predictions - predictions.mean(axis=-1, keepdims=True)
    t = truths - truths.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((p * p).sum(axis=-1) * (t * t).sum(axis=-1))
    numerator = (p * t).sum(axis=-1)
    correlation = np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator > 0)
    return float(correlation) if correlation.ndim == 0 else correlation


def weighted_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of each class present in `truth`, weighted by its support (sklearn's 'weighted')."""
    if truth.size == 0:
        return 0.0
    score = 0.0
    for cls in np.unique(truth):
        true_pos = np.sum((predicted == cls) & (truth == cls))
        predicted_pos = np.sum(predicted == cls)
        support = np.sum(truth == cls)
        f1 = 2 * true_pos / (predicted_pos + support) if predicted_pos + support else 0.0
        score += f1 * support / truth.size
    return float(score)


def _rounded_accuracy(predictions: np.ndarray, truths: np.ndarray, bound: float) -> float:
    clip_p = np.clip(predictions, -bound, bound)
    clip_t = np.clip(truths, -bound, bound)
    return float(np.mean(np.round(clip_p) == np.round(clip_t)))


def compute_metrics(predictions, truths) -> dict[str, float]:
    """All metrics for two equally long arrays of scores (any shape; flattened)."""
    predictions = _as_vector(predictions, "predictions")
    truths = _as_vector(truths, "truths")
    if predictions.shape != truths.shape or predictions.size == 0:
        raise ValueError(
            f"predictions ({predictions.size}) and truths ({truths.size}) must be non-empty and equally long"
        )
    has0_truth, has0_pred = truths >= 0, predictions >= 0
    nonzero = truths != 0
    non0_truth, non0_pred = truths[nonzero] > 0, predictions[nonzero] > 0
    return {
        "MAE": float(np.mean(np.abs(predictions - truths))),
        "Corr": float(pearson(predictions, truths)),  # vectors: already a float
        "Acc-7": _rounded_accuracy(predictions, truths, 3.0),
        "Acc-5": _rounded_accuracy(predictions, truths, 2.0),
        "Acc-2_has0": float(np.mean(has0_truth == has0_pred)),
        "F1_has0": weighted_f1(has0_truth, has0_pred),
        # With no non-zero truth at all the non0 figures are undefined; report 0.
        "Acc-2_non0": float(np.mean(non0_truth == non0_pred)) if nonzero.any() else 0.0,
        "F1_non0": weighted_f1(non0_truth, non0_pred),
    }


def over_seeds(figures: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Each metric's mean and standard deviation over seeds (one dict of figures per seed). The
    deviation is numpy's default, the population one (ddof 0), as MMSA reports its seeds."""
    return {
        name: (float(np.mean([seed[name] for seed in figures])), float(np.std([seed[name] for seed in figures])))
        for name in figures[0]
    }
