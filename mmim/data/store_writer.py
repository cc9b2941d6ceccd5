"""Writing a feature store from any source, one split and one example at a time.

Every reader (`mmim.data.formats`) turns its files into a `SourceSplit` per split: ids,
raw texts, labels, and audio/vision `Sequences` that hand out one example's frames
at a time. The writer validates as it goes, tokenizes the texts in chunks, and
streams frames straight into memory-mapped .npy files of the final size, so a split
is never held twice in memory. The store appears atomically (temp dir + rename).

Validation (every rejection names the source file, split, example and field):
  - per split: as many ids, texts, labels and sequences; ids unique across splits
  - dims: each sequence is (length, dim) and dims agree across splits
  - labels: finite, within [-3, 3]
  - NaN/inf in features: `nonfinite="zero"` replaces them by 0 and counts them
    (the default, as the reference code's `nan_to_num`); `"fail"` rejects the example
  - empty sequences get one zero frame (as the reference code does) and are counted
  - examples with an empty text are dropped, with the reason in the summary
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_directory, check_replaceable_directory
from mmim.core.store import LABEL_RANGE, SCHEMA_VERSION, SEQUENCE_FIELDS, SPLITS, TEXT_FIELDS, sha256_of
from mmim.core.text_encoder import tokenize

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TOKENIZE_CHUNK = 2048  # texts tokenized per call
NonFinitePolicy = Literal["zero", "fail"]


class Sequences(Protocol):
    """Per-example (length, dim) frames of one modality of one split."""

    dim: int

    def __len__(self) -> int: ...

    def length(self, index: int) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class SequenceList:
    """Sequences already split into a list of (length, dim) arrays."""

    def __init__(self, sequences: list[np.ndarray], dim: int):
        self.sequences, self.dim = sequences, dim

    def __len__(self) -> int:
        return len(self.sequences)

    def length(self, index: int) -> int:
        return len(self.sequences[index])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.sequences[index]


class PaddedSequences:
    """A padded (N, T, dim) array with per-example lengths; the padding is in front or at the back."""

    def __init__(self, array: np.ndarray, lengths: np.ndarray, padding: Literal["front", "back"]):
        self.array, self.lengths, self.padding = array, np.asarray(lengths, dtype=np.int64), padding
        self.dim = int(array.shape[2])

    def __len__(self) -> int:
        return len(self.array)

    def length(self, index: int) -> int:
        return int(self.lengths[index])

    def __getitem__(self, index: int) -> np.ndarray:
        length = self.length(index)
        if self.padding == "front":
            return self.array[index, self.array.shape[1] - length :] if length else self.array[index, :0]
        return self.array[index, :length]


@dataclass
class SourceSplit:
    origin: str  # the file(s) this split came from, named in every error
    ids: list[str]
    texts: list[str]
    labels: np.ndarray
    audio: Sequences
    vision: Sequences


@dataclass
class ExtractionSummary:
    root: Path
    counts: dict[str, int]
    dims: dict[str, int]
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, id, reason)
    nonfinite_zeroed: Counter = field(default_factory=Counter)  # (split, field) -> values
    empty_padded: Counter = field(default_factory=Counter)  # (split, field) -> examples


def _check_shapes(name: str, split: SourceSplit, dims: dict[str, int]) -> None:
    count = len(split.ids)
    if count == 0:
        raise MMIMInputError(f"{split.origin}: split {name} has no examples")
    sizes = {
        "texts": len(split.texts),
        "labels": len(split.labels),
        "audio": len(split.audio),
        "vision": len(split.vision),
    }
    for what, size in sizes.items():
        if size != count:
            raise MMIMInputError(f"{split.origin}: split {name}: {what} has {size} entries for {count} ids")
    for modality in SEQUENCE_FIELDS:
        dim = getattr(split, modality).dim
        if dim != dims[modality]:
            raise MMIMInputError(
                f"{split.origin}: split {name}, field {modality}: dim {dim}, but split "
                f"train has {dims[modality]} (dims must agree across splits)"
            )


def _check_ids(splits: dict[str, SourceSplit]) -> None:
    seen: dict[str, str] = {}
    for name in SPLITS:
        for example_id in splits[name].ids:
            if example_id in seen:
                raise MMIMInputError(
                    f"{splits[name].origin}: duplicate id {example_id!r} "
                    f"(split {name}, also in split {seen[example_id]})"
                )
            seen[example_id] = name


def _write_sequences(
    path: Path,
    name: str,
    modality: str,
    split: SourceSplit,
    keep: np.ndarray,
    nonfinite: NonFinitePolicy,
    summary: ExtractionSummary,
    advance: Callable[[], None],
) -> np.ndarray:
    """Append kept examples' frames to the .npy file at `path`; returns the offsets.

    The total shape is known from the lengths, so the header goes first and each
    example is written as it is read: only one example's frames are in memory.
    """
    sequences: Sequences = getattr(split, modality)
    lengths = np.array([max(sequences.length(i), 1) for i in keep], dtype=np.int64)
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
        "fortran_order": False,
        "shape": (int(offsets[-1]), sequences.dim),
    }
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for index in keep:
            where = f"{split.origin}: split {name}, example {split.ids[index]!r} (index {index}), field {modality}"
            frames = np.asarray(sequences[index], dtype=np.float32)
            if frames.ndim != 2 or frames.shape[1] != sequences.dim:
                raise MMIMInputError(f"{where}: shape {frames.shape}, expected (length, {sequences.dim})")
            if len(frames) == 0:
                frames = np.zeros((1, sequences.dim), dtype=np.float32)  # as the reference code does
                summary.empty_padded[(name, modality)] += 1
            bad = ~np.isfinite(frames)
            if bad.any():
                if nonfinite == "fail":
                    raise MMIMInputError(f"{where}: {int(bad.sum())} NaN/inf values (extraction.nonfinite is 'fail')")
                frames = np.where(bad, np.float32(0.0), frames)
                summary.nonfinite_zeroed[(name, modality)] += int(bad.sum())
            handle.write(np.ascontiguousarray(frames).tobytes())
            advance()
    return offsets


def _write_split(
    directory: Path,
    name: str,
    split: SourceSplit,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    nonfinite: NonFinitePolicy,
    summary: ExtractionSummary,
    advance: Callable[[], None],
) -> dict:
    directory.mkdir()
    labels = np.asarray(split.labels, dtype=np.float32).reshape(-1)
    keep_list = []
    for index, text in enumerate(split.texts):
        if not str(text).strip():
            summary.dropped.append((name, split.ids[index], "empty text"))
            continue
        label = labels[index]
        if not np.isfinite(label) or not LABEL_RANGE[0] <= label <= LABEL_RANGE[1]:
            raise MMIMInputError(
                f"{split.origin}: split {name}, example {split.ids[index]!r} (index {index}), "
                f"field labels: {label} is not a finite score in {list(LABEL_RANGE)}"
            )
        keep_list.append(index)
    keep = np.array(keep_list, dtype=np.int64)
    if len(keep) == 0:
        raise MMIMInputError(f"{split.origin}: split {name}: no usable examples")

    token_arrays = {
        f: np.lib.format.open_memmap(directory / f"{f}.npy", mode="w+", dtype=dtype, shape=(len(keep), max_tokens))
        for f, dtype in TEXT_FIELDS.items()
    }
    for start in range(0, len(keep), TOKENIZE_CHUNK):
        chunk = keep[start : start + TOKENIZE_CHUNK]
        tokens = tokenize(tokenizer, [str(split.texts[i]) for i in chunk], max_tokens)
        for f, array in token_arrays.items():
            array[start : start + len(chunk)] = tokens[f]
    for array in token_arrays.values():
        array.flush()
    del token_arrays

    for modality in SEQUENCE_FIELDS:
        offsets = _write_sequences(
            directory / f"{modality}.npy", name, modality, split, keep, nonfinite, summary, advance
        )
        np.save(directory / f"{modality}_offsets.npy", offsets)
    np.save(directory / "labels.npy", labels[keep])
    (directory / "ids.json").write_text(json.dumps([split.ids[i] for i in keep]))
    summary.counts[name] = len(keep)
    return {"count": len(keep), "sha256": {p.name: sha256_of(p) for p in sorted(directory.iterdir())}}


def _is_store(root: Path) -> bool:
    """A directory holding only what `write_store` writes, with a manifest it wrote."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and {"schema_version", "splits", "text_encoder"} <= manifest.keys()
        and {path.name for path in root.iterdir()} <= {"manifest.json", *SPLITS}
    )


def check_destination(root: Path, overwrite: bool) -> None:
    """Refuse, naming `root`, anything but a new path, or with `overwrite` an existing store
    or an empty directory: --overwrite must never delete someone's other files."""
    check_replaceable_directory(root)
    if not root.exists():
        return
    if not overwrite:
        raise MMIMInputError(f"{root}: already exists (use --overwrite to replace it)")
    if any(root.iterdir()) and not _is_store(root):
        raise MMIMInputError(
            f"{root}: not a feature store (no manifest.json from mmim extract, or other "
            f"files beside it); refusing to replace it with --overwrite"
        )


def write_store(
    root: str | Path,
    splits: dict[str, SourceSplit],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_encoder: str,
    max_tokens: int,
    source: str,
    nonfinite: NonFinitePolicy = "zero",
    overwrite: bool = False,
    advance: Callable[[], None] = lambda: None,
    dropped: Sequence[tuple[str, str, str]] = (),
    manifest_extra: dict | None = None,
) -> ExtractionSummary:
    """Validate and write a complete store atomically. `advance` is called per example and modality.

    `dropped` lists examples the reader already left out, as (split, id, reason); they are
    reported with the writer's own. `manifest_extra` adds fields to the manifest (a
    recordings store's extractor and settings)."""
    root = Path(root)
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        origin = next(iter(splits.values())).origin if splits else str(root)
        raise MMIMInputError(f"{origin}: missing split(s) {', '.join(missing)}")
    dims = {modality: getattr(splits["train"], modality).dim for modality in SEQUENCE_FIELDS}
    for name in SPLITS:
        _check_shapes(name, splits[name], dims)
    _check_ids(splits)
    check_destination(root, overwrite)

    summary = ExtractionSummary(root=root, counts={}, dims=dims, dropped=list(dropped))
    with atomic_directory(root) as staging:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "text_encoder": text_encoder,
            "vocab_size": len(tokenizer),
            "max_tokens": max_tokens,
            "dims": dims,
            "splits": {},
            **(manifest_extra or {}),
        }
        for name in SPLITS:
            manifest["splits"][name] = _write_split(
                staging / name, name, splits[name], tokenizer, max_tokens, nonfinite, summary, advance
            )
        manifest["dropped"] = dict(Counter(reason for _, _, reason in summary.dropped))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info("wrote feature store %s (%s)", root, ", ".join(f"{n}={c}" for n, c in summary.counts.items()))
    return summary
