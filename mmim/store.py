"""The feature store: the only thing training reads.

    STORE/
      manifest.json            schema version, encoder, dims, counts, sha256 of every file
      train/ valid/ test/
        input_ids.npy          (N, max_tokens) int32   tokenized once, at extraction
        attention_mask.npy     (N, max_tokens) int8
        token_type_ids.npy     (N, max_tokens) int8
        audio.npy              (sum of lengths, audio_dim) float32  all sequences back to back
        audio_offsets.npy      (N + 1,) int64   example i is audio[offsets[i]:offsets[i+1]]
        vision.npy             (sum of lengths, vision_dim) float32
        vision_offsets.npy     (N + 1,) int64
        labels.npy             (N,) float32     sentiment in [-3, 3]
        ids.json               N strings, e.g. "03bSnISJMiM_11"

Arrays are plain .npy files opened memory-mapped, so opening a store costs nothing
and workers share pages. Ragged sequences are stored without padding; a batch is
padded to its own longest sequence when it is collated (`mmim.data`).

A store is written to a temporary directory beside the target and renamed into
place, so a crash never leaves a half-written store under the real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmim.errors import MMIMInputError
from mmim.files import atomic_directory, read_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
TEXT_FIELDS = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8}
SEQUENCE_FIELDS = ("audio", "vision")
LABEL_RANGE = (-3.0, 3.0)
_CHUNK_ROWS = 1 << 16  # rows per chunk when scanning arrays for NaN/inf


@dataclass
class SplitData:
    """One split in memory, ready to be written. Sequences are (length, dim) arrays."""

    ids: list[str]
    texts_tokenized: dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids
    audio: list[np.ndarray]
    vision: list[np.ndarray]
    labels: np.ndarray


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_split(name: str, split: SplitData, dims: dict[str, int]) -> None:
    """Reject what would break training, naming split, field and example."""
    count = len(split.ids)
    if count == 0:
        raise MMIMInputError(f"split {name}: no examples")
    if len(set(split.ids)) != count:
        duplicate = next(i for i in split.ids if split.ids.count(i) > 1)
        raise MMIMInputError(f"split {name}: duplicate id {duplicate!r}")
    lengths = {"labels": len(split.labels), "audio": len(split.audio), "vision": len(split.vision)}
    lengths.update({field: len(array) for field, array in split.texts_tokenized.items()})
    for field, n in lengths.items():
        if n != count:
            raise MMIMInputError(f"split {name}: {field} has {n} entries for {count} ids")
    for field in SEQUENCE_FIELDS:
        for index, sequence in enumerate(getattr(split, field)):
            where = f"split {name}, example {split.ids[index]!r} (index {index}), field {field}"
            if sequence.ndim != 2 or sequence.shape[1] != dims[field]:
                raise MMIMInputError(f"{where}: shape {sequence.shape}, expected (length, {dims[field]})")
            if sequence.shape[0] == 0:
                raise MMIMInputError(f"{where}: empty sequence (length 0)")
            if not np.isfinite(sequence).all():
                raise MMIMInputError(f"{where}: contains NaN or inf")
    bad = np.flatnonzero(~np.isfinite(split.labels) | (split.labels < LABEL_RANGE[0])
                         | (split.labels > LABEL_RANGE[1]))
    if bad.size:
        index = int(bad[0])
        raise MMIMInputError(f"split {name}, example {split.ids[index]!r} (index {index}), field labels: "
                             f"{split.labels[index]} is not a finite score in {list(LABEL_RANGE)}")


def _save_split(directory: Path, split: SplitData) -> dict[str, str]:
    directory.mkdir(parents=True)
    for field, dtype in TEXT_FIELDS.items():
        np.save(directory / f"{field}.npy", np.ascontiguousarray(split.texts_tokenized[field], dtype=dtype))
    for field in SEQUENCE_FIELDS:
        sequences = getattr(split, field)
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        np.save(directory / f"{field}.npy", np.concatenate(sequences).astype(np.float32, copy=False))
        np.save(directory / f"{field}_offsets.npy", offsets)
    np.save(directory / "labels.npy", np.asarray(split.labels, dtype=np.float32))
    (directory / "ids.json").write_text(json.dumps(split.ids))
    return {path.name: _sha256(path) for path in sorted(directory.iterdir())}


def write_store(root: str | Path, splits: dict[str, SplitData], *, text_encoder: str,
                max_tokens: int, source: str, overwrite: bool = False) -> Path:
    """Validate and write a complete store atomically (temp dir + rename)."""
    root = Path(root)
    missing = [name for name in SPLITS if name not in splits]
    if missing:
        raise MMIMInputError(f"store {root}: missing split(s) {', '.join(missing)}")
    first = splits["train"]
    dims = {field: int(getattr(first, field)[0].shape[1]) for field in SEQUENCE_FIELDS}
    for name in SPLITS:
        _check_split(name, splits[name], dims)
    if root.exists() and not overwrite:
        raise MMIMInputError(f"{root}: already exists (pass overwrite to replace it)")

    with atomic_directory(root) as staging:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "text_encoder": text_encoder,
            "max_tokens": max_tokens,
            "dims": dims,
            "splits": {},
        }
        for name in SPLITS:
            checksums = _save_split(staging / name, splits[name])
            manifest["splits"][name] = {"count": len(splits[name].ids), "sha256": checksums}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info("wrote feature store %s (%s)", root,
             ", ".join(f"{n}={len(splits[n].ids)}" for n in SPLITS))
    return root


# ---------------------------------------------------------------- reading


@dataclass
class StoreSplit:
    """Memory-mapped arrays of one split; `sequence(field, i)` is a view, not a copy."""

    name: str
    ids: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    audio: np.ndarray
    audio_offsets: np.ndarray
    vision: np.ndarray
    vision_offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def sequence(self, field: str, index: int) -> np.ndarray:
        offsets = getattr(self, f"{field}_offsets")
        return getattr(self, field)[offsets[index]:offsets[index + 1]]


class FeatureStore:
    """Open and check a store. Every problem is an `MMIMInputError` naming the file."""

    def __init__(self, root: str | Path, verify_checksums: bool = True):
        self.root = Path(root)
        self.manifest = self._read_manifest()
        self.dims: dict[str, int] = self.manifest["dims"]
        self.text_encoder: str = self.manifest["text_encoder"]
        self.max_tokens: int = self.manifest["max_tokens"]
        self.splits = {name: self._open_split(name, verify_checksums) for name in SPLITS}

    def __getitem__(self, name: str) -> StoreSplit:
        return self.splits[name]

    def _read_manifest(self) -> dict:
        path = self.root / "manifest.json"
        if not self.root.is_dir():
            raise MMIMInputError(f"{self.root}: feature store not found (no such directory)")
        manifest = read_json(path)
        for key in ("schema_version", "text_encoder", "max_tokens", "dims", "splits"):
            if key not in manifest:
                raise MMIMInputError(f"{path}: field {key!r} missing")
        if manifest["schema_version"] != SCHEMA_VERSION:
            raise MMIMInputError(f"{path}: schema_version {manifest['schema_version']}, "
                                 f"this version of mmim reads {SCHEMA_VERSION}")
        for name in SPLITS:
            if name not in manifest["splits"]:
                raise MMIMInputError(f"{path}: split {name!r} missing "
                                     f"(has {', '.join(manifest['splits']) or 'none'})")
        return manifest

    def _load_array(self, path: Path, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
        if not path.is_file():
            raise MMIMInputError(f"{path}: missing")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise MMIMInputError(f"{path}: corrupt or truncated ({error})") from None
        if array.dtype != dtype:
            raise MMIMInputError(f"{path}: dtype {array.dtype}, expected {np.dtype(dtype)}")
        if array.ndim != len(shape) or any(e is not None and a != e for a, e in zip(array.shape, shape)):
            expected = tuple("*" if e is None else e for e in shape)
            raise MMIMInputError(f"{path}: shape {array.shape}, expected {expected}")
        return array

    def _open_split(self, name: str, verify_checksums: bool) -> StoreSplit:
        directory = self.root / name
        entry = self.manifest["splits"][name]
        count = int(entry["count"])
        if verify_checksums:
            for filename, expected in entry["sha256"].items():
                path = directory / filename
                if not path.is_file():
                    raise MMIMInputError(f"{path}: missing")
                if _sha256(path) != expected:
                    raise MMIMInputError(f"{path}: checksum mismatch with manifest.json (corrupt or modified)")
        arrays: dict[str, np.ndarray] = {}
        for field, dtype in TEXT_FIELDS.items():
            arrays[field] = self._load_array(directory / f"{field}.npy", dtype, (count, self.max_tokens))
        for field in SEQUENCE_FIELDS:
            offsets = self._load_array(directory / f"{field}_offsets.npy", np.int64, (count + 1,))
            values = self._load_array(directory / f"{field}.npy", np.float32, (None, self.dims[field]))
            lengths = np.diff(offsets)
            if offsets[0] != 0 or offsets[-1] != len(values) or (lengths < 1).any():
                raise MMIMInputError(f"{directory / f'{field}_offsets.npy'}: offsets do not describe "
                                     f"{count} non-empty sequences in {field}.npy")
            _check_finite(directory / f"{field}.npy", values)
            arrays[field], arrays[f"{field}_offsets"] = values, offsets
        arrays["labels"] = self._load_array(directory / "labels.npy", np.float32, (count,))
        _check_finite(directory / "labels.npy", arrays["labels"])
        if (arrays["attention_mask"][:, 0] != 1).any():
            raise MMIMInputError(f"{directory / 'attention_mask.npy'}: an example has no tokens")
        ids_path = directory / "ids.json"
        ids = read_json(ids_path)
        if not isinstance(ids, list) or len(ids) != count:
            raise MMIMInputError(f"{ids_path}: expected a list of {count} ids")
        return StoreSplit(name=name, ids=ids, **arrays)


def _check_finite(path: Path, array: np.ndarray) -> None:
    for start in range(0, len(array), _CHUNK_ROWS):
        chunk = array[start:start + _CHUNK_ROWS]
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))[0])
            raise MMIMInputError(f"{path}: NaN or inf at row {row}")
