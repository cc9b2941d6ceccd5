"""Readers for the formats CMU-MOSI / CMU-MOSEI are distributed in.

Each reader turns files into one `mmim.data.store_writer.SourceSplit` per split:

  mult   MulT / official-MMIM release: `*_data_noalign.pkl` (or aligned `*_data.pkl`)
         + the label CSV with the words (`MOSI-label.csv`)
  mmsa   MMSA release: `unaligned_50.pkl` / `aligned_50.pkl`
  csd    CMU-MultimodalSDK computational sequences (.csd, HDF5) + standard folds

Pickles are read with `mmim.data.untrusted_pickle` (numpy arrays and builtins only).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.data.store_writer import PaddedSequences


def padded_sequences(
    array, lengths: np.ndarray | None, padding: Literal["front", "back"], where: str
) -> PaddedSequences:
    """Check a padded (N, T, dim) array and its lengths, naming `where` on failure.

    Without lengths, they are read off the padding: the frames after the leading
    all-zero rows ("front") or up to the last non-zero row ("back").
    """
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        shape = getattr(array, "shape", type(array).__name__)
        raise MMIMInputError(f"{where}: expected an (examples, frames, dim) array, got {shape}")
    numeric_array(array, where)
    if lengths is None:
        lengths = leading_padding_lengths(array) if padding == "front" else trailing_padding_lengths(array)
    lengths = numeric_array(lengths, f"{where}_lengths").reshape(-1)
    if len(lengths) != len(array):
        raise MMIMInputError(f"{where}: {len(lengths)} lengths for {len(array)} examples")
    bad = np.flatnonzero((lengths < 0) | (lengths > array.shape[1]))
    if bad.size:
        raise MMIMInputError(f"{where}: length {lengths[bad[0]]} of example {bad[0]} is outside [0, {array.shape[1]}]")
    return PaddedSequences(array, lengths, padding)


def numeric_array(value, where: str) -> np.ndarray:
    """`value` as an array of integers or floats, else an error naming `where`.

    Text and objects are refused rather than converted: numpy would quietly read b"1.5" or
    "1.5" as a number, and fail with a traceback on b"abc".
    """
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        raise MMIMInputError(f"{where}: not an array of numbers") from None
    if array.dtype.kind not in "iuf":
        raise MMIMInputError(f"{where}: values of type {array.dtype}, expected numbers")
    return array


def sentiment_labels(raw, where: str) -> np.ndarray:
    """(N,) float32 sentiment from (N,), (N, 1) or (N, 1, 1) labels, or from (N, 1, 7) MOSEI
    emotion labels (sentiment first). N = 0 passes: an empty split is refused, naming it,
    where all of a split's counts are checked (`mmim.data.store_writer`)."""
    labels = numeric_array(raw, where)
    if labels.ndim == 3 and labels.shape[-1] == 7:
        labels = labels[..., 0]
    if labels.ndim == 0 or labels.size != len(labels):
        raise MMIMInputError(f"{where}: shape {labels.shape}, expected one number per example")
    return labels.reshape(-1).astype(np.float32)


def leading_padding_lengths(array: np.ndarray) -> np.ndarray:
    """Lengths of front-padded sequences: frames after the leading all-zero rows.

    Computed one example at a time, so no (N, T, dim) temporary is made.
    """
    lengths = np.empty(len(array), dtype=np.int64)
    for index in range(len(array)):
        nonzero = np.flatnonzero(np.any(array[index] != 0, axis=1))
        lengths[index] = array.shape[1] - nonzero[0] if nonzero.size else 0
    return lengths


def trailing_padding_lengths(array: np.ndarray) -> np.ndarray:
    """Lengths of back-padded sequences: frames up to the last non-zero row."""
    lengths = np.empty(len(array), dtype=np.int64)
    for index in range(len(array)):
        nonzero = np.flatnonzero(np.any(array[index] != 0, axis=1))
        lengths[index] = nonzero[-1] + 1 if nonzero.size else 0
    return lengths


def as_text(value) -> str:
    """A string from str, bytes or a numpy scalar of either."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def split_dict(data, name: str, where: str, required: tuple[str, ...]) -> dict:
    """`data[name]` as a dict holding the `required` keys."""
    if not isinstance(data, dict):
        raise MMIMInputError(f"{where}: expected a dict of splits, got {type(data).__name__}")
    if name not in data:
        raise MMIMInputError(f"{where}: split {name!r} missing (has {', '.join(map(str, data)) or 'none'})")
    split = data[name]
    if not isinstance(split, dict):
        raise MMIMInputError(f"{where}: split {name!r} is a {type(split).__name__}, expected a dict")
    missing = [key for key in required if key not in split]
    if missing:
        raise MMIMInputError(f"{where}: split {name!r} lacks field(s) {', '.join(missing)}")
    return split
