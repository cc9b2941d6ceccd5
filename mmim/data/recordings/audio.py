"""Acoustic features of a recording: openSMILE low-level descriptors at a chosen frame rate.

openSMILE computes its low-level descriptors (LLDs: loudness, pitch, spectral shape,
MFCCs, ...) on short overlapping windows every 10 ms, i.e. 100 frames per second.
The model wants the audio at the same rate as the other modalities, so we resample
that stream onto a grid of `rate` frames per second:

    frame j covers [j / rate, (j + 1) / rate) seconds and is the mean of the LLD
    frames whose centre time falls inside it.

Three things make the raw stream ragged, and each has a fixed answer here:

  * openSMILE's windows are longer than its hop, so a clip yields a few frames fewer
    than duration * 100 and the first and last grid bins may catch nothing; when
    rate > 100 some bins always catch nothing. An empty bin copies the nearest
    non-empty bin.
  * Unvoiced or degenerate windows can come back as NaN or inf (a clip shorter than
    one window, ~60 ms, is a single all-NaN row). Such rows are dropped before
    averaging; a clip with no usable row at all becomes zeros.
  * The caller's `duration` (the segment's length on the timeline) decides the number
    of frames, max(1, round(duration * rate)), whatever the number of samples.

The result is float32, finite and a pure function of its input, so re-running an
extraction reproduces the same bytes.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings

import audobject.core.utils
import numpy as np
import opensmile

from mmim.core.errors import MMIMInputError
from mmim.data.recordings.frames import fill_gaps

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # the decoder hands over 16 kHz mono float32
FEATURE_SETS = {"eGeMAPSv02": 25, "ComParE_2016": 65}  # openSMILE LLD set -> LLDs per frame
MAX_RATE = 1000.0  # frames per second: 1 ms frames, already ten per openSMILE hop

# opensmile.Smile() describes itself on construction (audobject), and to name the distribution
# its module comes from, the first construction in a process reads the file list of every
# installed distribution: 0.4-1 s of each extractor process's start, for the answer "opensmile".
# Given that answer first, the construction takes 20 ms. (audobject keeps the map in this
# module-level dict; were it renamed, the line would be a no-op and the start slow again.)
audobject.core.utils.PACKAGES_DISTRIBUTIONS.setdefault("opensmile", ["opensmile"])


class AudioFeatures:
    """Turns a mono 16 kHz signal into an (n_frames, dim) float32 array of LLDs."""

    def __init__(self, feature_set: str = "eGeMAPSv02", rate: float = 100.0):
        if feature_set not in FEATURE_SETS:
            raise MMIMInputError(
                f"extraction.recordings.audio_features {feature_set!r}: expected one of {', '.join(FEATURE_SETS)}"
            )
        # int and float are numbers.Real at run time; named too because mypy does not know that
        # (to it, no float passes isinstance(rate, numbers.Real) and the rest is unreachable).
        if isinstance(rate, bool) or not isinstance(rate, (int, float, numbers.Real)) or not 0 < rate <= MAX_RATE:
            raise MMIMInputError(
                f"extraction.recordings.audio_rate {rate!r}: expected frames per second in (0, {MAX_RATE:g}]"
            )
        self.feature_set = feature_set
        self.rate = float(rate)
        self._smile = opensmile.Smile(
            feature_set=getattr(opensmile.FeatureSet, feature_set),
            feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
        )
        self.names: list[str] = list(self._smile.feature_names)
        self.dim = len(self.names)
        if self.dim != FEATURE_SETS[feature_set]:  # the cache checks entries against FEATURE_SETS
            raise RuntimeError(f"openSMILE {feature_set} gives {self.dim} LLDs, not {FEATURE_SETS[feature_set]}")
        log.debug("openSMILE %s: %d LLDs at %g frames/s", feature_set, self.dim, self.rate)

    def __call__(self, samples: np.ndarray, duration: float) -> np.ndarray:
        """LLDs of `samples` (1-D, SAMPLE_RATE Hz) on `duration` seconds of `rate` Hz frames."""
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"expected a 1-D mono signal, got shape {samples.shape}")
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"expected a duration >= 0 seconds, got {duration}")
        n_frames = max(1, round(duration * self.rate))
        values, centres = self._lld_frames(np.ascontiguousarray(samples, dtype=np.float32))
        return self._resample(values, centres, n_frames)

    def _lld_frames(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """openSMILE's usable LLD rows (float64) and their centre times in seconds."""
        with warnings.catch_warnings():
            # A clip shorter than one window gives a NaN row plus this warning; the NaN
            # row is dropped below, so the warning would only be noise in the logs.
            warnings.filterwarnings("ignore", message="Segment too short")
            table = self._smile.process_signal(samples, SAMPLE_RATE)
        start = table.index.get_level_values("start").total_seconds().to_numpy()
        end = table.index.get_level_values("end").total_seconds().to_numpy()
        values = table.to_numpy(dtype=np.float64)
        usable = np.isfinite(values).all(axis=1)
        return values[usable], ((start + end) / 2)[usable]

    def _resample(self, values: np.ndarray, centres: np.ndarray, n_frames: int) -> np.ndarray:
        """Average LLD rows into `n_frames` bins of 1/rate s; empty bins copy the nearest full one."""
        # At 100 frames/s every centre lies exactly on a bin edge, where it belongs to the
        # bin that starts there; the tolerance keeps rounding (0.29 * 100 = 28.999...)
        # from moving it one bin back.
        bins = np.floor(centres * self.rate + 1e-6).astype(np.int64)
        inside = (bins >= 0) & (bins < n_frames)
        bins, values = bins[inside], values[inside]
        if len(bins) == 0:
            return np.zeros((n_frames, self.dim), dtype=np.float32)

        sums = np.zeros((n_frames, self.dim))
        np.add.at(sums, bins, values)
        counts = np.bincount(bins, minlength=n_frames)
        means = sums / np.maximum(counts, 1)[:, None]
        return fill_gaps(means, counts > 0).astype(np.float32)
