"""Checks of a feature store before anything trains on it.

Hard checks (a failure stops training; the message names the check and the ids):
    store             it opens: every file matches its checksum, labels are finite and
                      within [-3, 3], features finite, token ids within the vocabulary
                      (`mmim.core.store.FeatureStore`; the message names the file and row)
    ids               no example id in two splits
    videos            no video in two splits: the clips of one video (one speaker, one
                      scene) in train and test would flatter every test figure. The video
                      of an id is the part before its last "_" (`<video_id>_<clip_id>`).
    lengths           every sequence 1 to MAX_FRAMES frames (what prediction accepts)

Soft checks, against the label profile of a previous data version when there is one (the
champion's: every tracked run logs its store's profile as `data_profile.json`); they warn:
    sizes             examples per split, and the change
    labels drift      label mean per split and the two-sample Kolmogorov-Smirnov
                      statistic between the versions' label distributions

A `DataReport` holds the results, renders them as markdown (the flow's artifact) and as
flat tags (MLflow), and names the data versions it compared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, field_validator

from mmim.core.errors import MMIMInputError
from mmim.core.limits import MAX_FRAMES
from mmim.core.store import SEQUENCE_FIELDS, SPLITS, FeatureStore

log = logging.getLogger(__name__)

SHOWN_IDS = 10  # offending ids named in a message
KS_WARNING = 0.2  # a label distribution that moved more than this is worth a look


class LabelProfile(BaseModel):
    """The labels of every split of one data version: what drift is measured against."""

    data_version: str
    labels: dict[str, list[float]]  # split -> labels, in store order

    @field_validator("labels")
    @classmethod
    def _finite(cls, labels: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, values in labels.items():
            if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
                raise ValueError(f"split {name}: labels must be finite")
        return labels

    @classmethod
    def of(cls, store: FeatureStore, data_version: str) -> LabelProfile:
        return cls(data_version=data_version, labels={name: store[name].labels.tolist() for name in SPLITS})


@dataclass
class CheckResult:
    name: str
    hard: bool  # a failure stops training
    passed: bool
    detail: str  # one line
    offending: list[str] = field(default_factory=list)  # example or video ids

    def line(self) -> str:
        shown = ", ".join(self.offending[:SHOWN_IDS]) + (" ..." if len(self.offending) > SHOWN_IDS else "")
        return f"{self.name}: {self.detail}" + (f" ({shown})" if self.offending else "")


@dataclass
class DataReport:
    data_version: str  # of the store checked
    previous_version: str | None  # of the store compared with (None: no previous version)
    checks: list[CheckResult]

    @property
    def failed(self) -> list[CheckResult]:
        return [check for check in self.checks if check.hard and not check.passed]

    @property
    def warnings(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.hard and not check.passed]

    def markdown(self) -> str:
        against = f" against {self.previous_version}" if self.previous_version else " (no previous version)"
        rows = ["| check | kind | result | detail |", "|---|---|---|---|"]
        for check in self.checks:
            result = "ok" if check.passed else ("FAILED" if check.hard else "warning")
            rows.append(
                f"| {check.name} | {'hard' if check.hard else 'soft'} | {result} | "
                f"{check.line().split(': ', 1)[1].replace('|', '/')} |"
            )
        return f"# Data checks of {self.data_version}{against}\n\n" + "\n".join(rows) + "\n"

    def tags(self) -> dict[str, str]:
        """For the MLflow run: the verdict, the versions, and each check's result."""
        tags = {
            "data_checks": "failed" if self.failed else ("warnings" if self.warnings else "passed"),
            "data_checks.version": self.data_version,
            "data_checks.previous_version": self.previous_version or "",
        }
        tags.update(
            {
                f"data_checks.{check.name.replace(' ', '_')}": "ok" if check.passed else check.detail[:250]
                for check in self.checks
            }
        )
        return tags


def video_of(example_id: str) -> str:
    return example_id.rsplit("_", 1)[0]


def _in_two_splits(name: str, keys_by_split: dict[str, set[str]], what: str) -> CheckResult:
    shared: dict[str, list[str]] = {}
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            for key in sorted(keys_by_split[first] & keys_by_split[second]):
                shared.setdefault(key, []).append(f"{first}+{second}")
    offending = [f"{key} ({', '.join(pairs)})" for key, pairs in shared.items()]
    detail = f"{len(shared)} {what} in more than one split" if shared else f"each {what.rstrip('s')} in one split"
    return CheckResult(name, True, not shared, detail, offending)


def _lengths(store: FeatureStore) -> CheckResult:
    bad = []
    for name in SPLITS:
        for modality in SEQUENCE_FIELDS:
            lengths = np.diff(getattr(store[name], f"{modality}_offsets"))
            bad += [
                f"{name}/{store[name].ids[i]} ({modality} {lengths[i]})"
                for i in np.flatnonzero((lengths < 1) | (lengths > MAX_FRAMES))
            ]
    detail = f"{len(bad)} sequences outside 1-{MAX_FRAMES} frames" if bad else f"all within 1-{MAX_FRAMES} frames"
    return CheckResult("lengths", True, not bad, detail, bad)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the ECDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    points = np.concatenate([a, b])
    gaps = np.abs(np.searchsorted(a, points, side="right") / len(a) - np.searchsorted(b, points, side="right") / len(b))
    return float(gaps.max())


def _drift(store: FeatureStore, previous: LabelProfile) -> list[CheckResult]:
    sizes, shifts = [], []
    for name in SPLITS:
        now, before = store[name].labels, np.asarray(previous.labels.get(name, []), dtype=np.float64)
        sizes.append(f"{name} {len(before)} -> {len(now)}")
        if len(before) == 0:
            shifts.append((name, 1.0, f"{name}: none before"))
            continue
        ks = ks_statistic(now, before)
        shifts.append((name, ks, f"{name} mean {before.mean():+.3f} -> {now.mean():+.3f}, KS {ks:.3f}"))
    shrunk = [name for name in SPLITS if len(store[name]) < len(previous.labels.get(name, []))]
    size_detail = "; ".join(sizes) + (f" (fewer examples in {', '.join(shrunk)})" if shrunk else "")
    moved = [name for name, ks, _ in shifts if ks > KS_WARNING]
    label_detail = "; ".join(text for _, _, text in shifts) + (
        f" (KS over {KS_WARNING} in {', '.join(moved)})" if moved else ""
    )
    return [
        CheckResult("sizes", False, not shrunk, size_detail),
        CheckResult("labels drift", False, not moved, label_detail),
    ]


def check_store(root: str | Path, data_version: str, previous: LabelProfile | None = None) -> DataReport:
    """Every check on the store at `root` (data version `data_version`); drift against the
    label profile of a previous data version when given."""
    try:
        store = FeatureStore(root)
    except MMIMInputError as error:
        return DataReport(data_version, None, [CheckResult("store", True, False, str(error))])
    checks = [
        CheckResult("store", True, True, "checksums, labels, features and token ids as the manifest says"),
        _in_two_splits("ids", {name: set(store[name].ids) for name in SPLITS}, "ids"),
        _in_two_splits("videos", {name: {video_of(i) for i in store[name].ids} for name in SPLITS}, "videos"),
        _lengths(store),
    ]
    if previous is None:
        sizes = "; ".join(f"{name} {len(store[name])}" for name in SPLITS)
        checks.append(CheckResult("sizes", False, True, f"{sizes} (no previous version to compare with)"))
        return DataReport(data_version, None, checks)
    return DataReport(data_version, previous.data_version, checks + _drift(store, previous))


def store_profile(root: str | Path, data_version: str) -> LabelProfile | None:
    """The label profile of the store at `root`; None (with a warning) if it cannot be opened."""
    try:
        return LabelProfile.of(FeatureStore(root, verify_checksums=False), data_version)
    except MMIMInputError as error:
        log.warning("previous data version not compared: %s", error)
        return None
