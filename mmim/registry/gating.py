"""Challenger against champion on the same data: the figures `champion` is gated on.

A validation figure means something only next to another measured on the same
utterances. When the data grows or is relabelled, the champion's figure recorded months
ago is about other utterances than the challenger's, so the gate never uses it: both
models are scored now, on the same splits of the run's data version.

    head_to_head(data_version, metric, challenger scores, champion scores)
        -> HeadToHead: both models' figures on valid and test, the champion's version,
           the data version, and a paired bootstrap of the validation improvement;
           or, when the champion could not be scored on this data (another tokenizer,
           other feature dims, another extractor), the reason, and no figure of it.

Statistics only: the scores (predictions and labels per split) come from the registry's side
(mmim.registry.scoring), which scores both models on the run's data.

A challenger trained once per seed (`train.seeds`) is gated on its seeds' mean: its
figures are each metric's mean over the seeds' checkpoints, and the bootstrap compares
the champion with the seeds' mean error on each utterance (MAE) or their mean
correlation on each resample (Corr). One lucky seed does not move `champion`.

The paired bootstrap resamples the validation utterances with replacement, the same
resamples for both models, and measures the improvement (positive: the challenger is
better) on each; the interval is the central `confidence` share of those improvements.
Its seed is fixed, so the same two models on the same data always get the same interval.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from mmim.core.metrics import compute_metrics, over_seeds, pearson

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (predictions, labels), as predict_checkpoint

BOOTSTRAP_SEED = 0
REPORTED_CONFIDENCE = 0.95  # the interval shown when gating does not ask for one


class Bootstrap(BaseModel):
    """The challenger's improvement over the champion on the validation utterances."""

    metric: str  # MAE or Corr
    improvement: float  # on all utterances; positive: the challenger is better
    low: float  # the interval's bounds
    high: float
    confidence: float  # 0.95: a 95% interval
    resamples: int

    def text(self) -> str:
        return (
            f"improvement {self.improvement:+.4f}, {self.confidence:.0%} interval {self.low:+.4f} to {self.high:+.4f}"
        )


class HeadToHead(BaseModel):
    """Both models scored on the same data, as the gate and the registry record it."""

    data_version: str
    metric: str  # the validation metric that gates: MAE or Corr
    challenger: dict[str, dict[str, float]]  # split -> metric -> value (the mean over seeds, with seeds > 1)
    seeds: int = 1  # checkpoints the challenger's figures are the mean of
    champion_version: str | None = None  # the champion scored (None: the registry had none)
    champion: dict[str, dict[str, float]] | None = None  # None: no champion, or not scorable here
    unscorable: str | None = None  # why the champion could not be scored on this data
    bootstrap: Bootstrap | None = None

    @property
    def challenger_value(self) -> float:
        return self.challenger["valid"][self.metric]

    @property
    def champion_value(self) -> float | None:
        return None if self.champion is None else self.champion["valid"][self.metric]

    def tags(self) -> dict[str, str]:
        """What was compared, as tags of the run and of the new model version (`gate.*`)."""
        metric = f"valid_{self.metric}"
        tags = {
            "data_version": self.data_version,
            "gate.data_version": self.data_version,
            f"gate.challenger_{metric}": repr(self.challenger_value),
            "gate.champion": f"v{self.champion_version}" if self.champion_version else "none",
            "gate.seeds": str(self.seeds),
        }
        if self.champion_value is not None:
            tags[f"gate.champion_{metric}"] = repr(self.champion_value)
        if self.unscorable:
            tags["gate.champion_unscorable"] = self.unscorable[:5000]
        if self.bootstrap is not None:
            tags.update(
                {
                    "gate.improvement": repr(self.bootstrap.improvement),
                    "gate.interval_low": repr(self.bootstrap.low),
                    "gate.interval_high": repr(self.bootstrap.high),
                    "gate.confidence": repr(self.bootstrap.confidence),
                    "gate.resamples": str(self.bootstrap.resamples),
                }
            )
        return tags

    def text(self) -> str:
        """One line: what was compared, on which data."""
        ours = f"challenger {self.metric} {self.challenger_value:.4f}"
        if self.seeds > 1:
            ours += f" (mean of {self.seeds} seeds)"
        if self.champion_version is None:
            return f"{ours} on data {self.data_version}; no champion to compare with"
        if self.champion_value is None:
            return (
                f"{ours} on data {self.data_version}; champion v{self.champion_version} not scored: {self.unscorable}"
            )
        line = f"{ours}, champion v{self.champion_version} {self.champion_value:.4f}, both on data {self.data_version}"
        return f"{line}; {self.bootstrap.text()}" if self.bootstrap else line


def paired_bootstrap(
    truths: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    metric: str,
    resamples: int = 1000,
    confidence: float = REPORTED_CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Bootstrap:
    """The challenger's improvement in `metric` over the champion, and its bootstrap interval.
    `challenger`: its predictions, or one row of predictions per seed (gated on their mean)."""
    truths, champion = np.asarray(truths, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    challenger = np.atleast_2d(np.asarray(challenger, dtype=np.float64))  # seeds x utterances
    picks = np.random.default_rng(seed).integers(0, len(truths), size=(resamples, len(truths)))
    if metric == "MAE":
        gains = np.abs(champion - truths) - np.abs(challenger - truths).mean(axis=0)  # per utterance
        improvement, resampled = float(gains.mean()), gains[picks].mean(axis=1)
    else:  # Corr is not a mean over utterances: computed on each resample (and each seed)
        improvement = float(np.mean(pearson(challenger, truths)) - pearson(champion, truths))
        resampled = np.mean(pearson(challenger[:, picks], truths[picks]), axis=0) - pearson(
            champion[picks], truths[picks]
        )
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return Bootstrap(
        metric=metric,
        improvement=improvement,
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
    )


def head_to_head(
    data_version: str,
    metric: str,
    challenger: list[Scores],
    champion: Scores | None = None,
    champion_version: str | None = None,
    *,
    unscorable: str | None = None,
    resamples: int = 1000,
    confidence: float | None = None,
) -> HeadToHead:
    """Compare the challenger's scores (one per seed: its figures are their mean) with the
    champion's (None: no champion, or `unscorable` says why it could not be scored), both on the
    valid and test splits of data version `data_version`."""
    result = HeadToHead(
        data_version=data_version,
        metric=metric,
        champion_version=champion_version,
        challenger=mean_figures([{split: compute_metrics(*scores) for split, scores in s.items()} for s in challenger]),
        seeds=len(challenger),
        unscorable=unscorable,
    )
    if champion is None:
        return result
    result.champion = {split: compute_metrics(*scores) for split, scores in champion.items()}
    theirs_valid, truths = champion["valid"]
    ours_valid = np.stack([scores["valid"][0] for scores in challenger])
    result.bootstrap = paired_bootstrap(
        truths, theirs_valid, ours_valid, metric, resamples, confidence or REPORTED_CONFIDENCE
    )
    return result


def mean_figures(figures: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each split's and metric's mean over seeds (split -> metric -> value, one per seed)."""
    return {
        split: {name: mean for name, (mean, _) in over_seeds([seed[split] for seed in figures]).items()}
        for split in figures[0]
    }
