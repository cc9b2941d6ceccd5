"""The feature store: the only thing training reads.

    STORE/
      manifest.json            schema version, encoder (and its vocab_size), dims, counts,
                               sha256 of every file, examples dropped by reason; for
                               recordings, the extractor (name, version, settings)
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
padded to its own longest sequence when it is collated (`mmim.core.batches`).

`mmim.data.store_writer` writes stores; this module opens and checks them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmim.core.config import Config
from mmim.core.errors import MMIMInputError
from mmim.core.files import read_json
from mmim.core.limits import MAX_DIM, MAX_TOKENS_CAP

SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
TEXT_FIELDS = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8}
SEQUENCE_FIELDS = ("audio", "vision")
# Every file of a split; each must have a checksum in the manifest, or editing the
# manifest could switch the check off.
SPLIT_FILES = (
    *(f"{field}.npy" for field in TEXT_FIELDS),
    *(name for field in SEQUENCE_FIELDS for name in (f"{field}.npy", f"{field}_offsets.npy")),
    "labels.npy",
    "ids.json",
)
LABEL_RANGE = (-3.0, 3.0)
_CHUNK_ROWS = 1 << 16  # rows per chunk when scanning arrays for NaN/inf


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        return getattr(self, field)[offsets[index] : offsets[index + 1]]


class FeatureStore:
    """Open and check a store. Every problem is an `MMIMInputError` naming the file."""

    def __init__(self, root: str | Path, verify_checksums: bool = True):
        self.root = Path(root)
        self.manifest = self._read_manifest()
        self.dims: dict[str, int] = self.manifest["dims"]
        self.text_encoder: str = self.manifest["text_encoder"]
        self.max_tokens: int = self.manifest["max_tokens"]
        # A recordings store's extractor: name, version, settings (None for the community releases).
        self.extractor: dict | None = self.manifest.get("extractor")
        self.splits = {name: self._open_split(name, verify_checksums) for name in SPLITS}

    def __getitem__(self, name: str) -> StoreSplit:
        return self.splits[name]

    @property
    def content_version(self) -> str:
        """A name for this content outside DVC: the manifest (which holds every file's checksum)
        hashed, e.g. `manifest-3f2a91c0e1b4d5a6`. Flow runs use the DVC data version instead."""
        return f"manifest-{hashlib.sha256((self.root / 'manifest.json').read_bytes()).hexdigest()[:16]}"

    def _read_manifest(self) -> dict:
        path = self.root / "manifest.json"
        if not self.root.is_dir():
            raise MMIMInputError(f"{self.root}: feature store not found (no such directory)")
        manifest = read_json(path)
        if not isinstance(manifest, dict):
            raise MMIMInputError(f"{path}: expected a JSON object")
        for key in ("schema_version", "text_encoder", "max_tokens", "dims", "splits"):
            if key not in manifest:
                raise MMIMInputError(f"{path}: field {key!r} missing")
        if manifest["schema_version"] != SCHEMA_VERSION:
            raise MMIMInputError(
                f"{path}: schema_version {manifest['schema_version']}, this version of mmim reads {SCHEMA_VERSION}"
            )
        if not isinstance(manifest["splits"], dict):
            raise MMIMInputError(f"{path}: field 'splits' must be an object (split name -> entry)")
        for name in SPLITS:
            if name not in manifest["splits"]:
                raise MMIMInputError(f"{path}: split {name!r} missing (has {', '.join(manifest['splits']) or 'none'})")
            _check_split_entry(path, name, manifest["splits"][name])
        if not isinstance(manifest.get("extractor", {}), dict):
            raise MMIMInputError(f"{path}: field 'extractor' must be an object (name, version, settings)")
        _check_header_fields(path, manifest)
        vocab_size = manifest.get("vocab_size")  # absent in stores written before it was recorded
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 1):
            raise MMIMInputError(f"{path}: field 'vocab_size' is {vocab_size!r}, expected a positive integer")
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
            _verify_checksums(directory, entry["sha256"])
        arrays: dict[str, np.ndarray] = {}
        for field, dtype in TEXT_FIELDS.items():
            arrays[field] = self._load_array(directory / f"{field}.npy", dtype, (count, self.max_tokens))
        for field in SEQUENCE_FIELDS:
            offsets = self._load_array(directory / f"{field}_offsets.npy", np.int64, (count + 1,))
            values = self._load_array(directory / f"{field}.npy", np.float32, (None, self.dims[field]))
            lengths = np.diff(offsets)
            if offsets[0] != 0 or offsets[-1] != len(values) or (lengths < 1).any():
                raise MMIMInputError(
                    f"{directory / f'{field}_offsets.npy'}: offsets do not describe "
                    f"{count} non-empty sequences in {field}.npy"
                )
            _check_finite(directory / f"{field}.npy", values)
            arrays[field], arrays[f"{field}_offsets"] = values, offsets
        arrays["labels"] = self._load_array(directory / "labels.npy", np.float32, (count,))
        _check_finite(directory / "labels.npy", arrays["labels"])
        _check_range(directory / "labels.npy", arrays["labels"], "label", *LABEL_RANGE)
        if (arrays["attention_mask"][:, 0] != 1).any():
            raise MMIMInputError(f"{directory / 'attention_mask.npy'}: an example has no tokens")
        if "vocab_size" in self.manifest:
            # An id outside the vocabulary would be an IndexError deep inside the encoder.
            vocab_size = self.manifest["vocab_size"]
            _check_range(
                directory / "input_ids.npy",
                arrays["input_ids"],
                "token id",
                0,
                vocab_size - 1,
                f" (vocab_size {vocab_size} of {self.text_encoder} in manifest.json)",
            )
        ids_path = directory / "ids.json"
        ids = read_json(ids_path)
        if not isinstance(ids, list) or len(ids) != count or not all(isinstance(i, str) for i in ids):
            raise MMIMInputError(f"{ids_path}: expected a list of {count} ids (strings)")
        return StoreSplit(name=name, ids=ids, **arrays)


def _check_finite(path: Path, array: np.ndarray) -> None:
    for start in range(0, len(array), _CHUNK_ROWS):
        chunk = array[start : start + _CHUNK_ROWS]
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1))[0])
            raise MMIMInputError(f"{path}: NaN or inf at row {row}")


def _verify_checksums(directory: Path, checksums: dict[str, str]) -> None:
    for filename in SPLIT_FILES:
        if filename not in checksums:
            raise MMIMInputError(
                f"{directory / filename}: no checksum in manifest.json (splits.{directory.name}.sha256)"
            )
    for filename, expected in checksums.items():
        path = directory / filename
        if not path.is_file():
            raise MMIMInputError(f"{path}: missing")
        if sha256_of(path) != expected:
            raise MMIMInputError(f"{path}: checksum mismatch with manifest.json (corrupt or modified)")


def _check_header_fields(path: Path, manifest: dict) -> None:
    """Types and sizes of the fields the store is opened with, each named when wrong."""
    if not isinstance(manifest["text_encoder"], str):
        raise MMIMInputError(f"{path}: field 'text_encoder' must be a string")
    if not _whole(manifest["max_tokens"], 2, MAX_TOKENS_CAP):
        raise MMIMInputError(f"{path}: field 'max_tokens' must be an integer in [2, {MAX_TOKENS_CAP}]")
    dims = manifest["dims"]
    if not isinstance(dims, dict) or not all(_whole(dims.get(field), 1, MAX_DIM) for field in SEQUENCE_FIELDS):
        raise MMIMInputError(
            f"{path}: field 'dims' must give {' and '.join(SEQUENCE_FIELDS)} as integers in [1, {MAX_DIM}]"
        )


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_split_entry(path: Path, name: str, entry: object) -> None:
    """The manifest fields a split is opened with: a missing one is named, not a KeyError."""
    if not isinstance(entry, dict):
        raise MMIMInputError(f"{path}: field 'splits.{name}' must be an object")
    for key in ("count", "sha256"):
        if key not in entry:
            raise MMIMInputError(f"{path}: field 'splits.{name}.{key}' missing")
    if not isinstance(entry["count"], int) or entry["count"] < 0:
        raise MMIMInputError(f"{path}: field 'splits.{name}.count' must be a non-negative integer")
    checksums = entry["sha256"]
    if not isinstance(checksums, dict):
        raise MMIMInputError(f"{path}: field 'splits.{name}.sha256' must be an object (file name -> hash)")
    # Exactly the split's own files, by plain name: a key such as "/etc/shadow" or "../x" is never opened.
    unexpected = sorted(set(checksums) - set(SPLIT_FILES))
    if unexpected:
        raise MMIMInputError(
            f"{path}: field 'splits.{name}.sha256' names {unexpected[0]!r}, not one of the split's files "
            f"({', '.join(SPLIT_FILES)})"
        )
    if not all(isinstance(digest, str) for digest in checksums.values()):
        raise MMIMInputError(f"{path}: field 'splits.{name}.sha256' must map file names to hex digests")


def _check_range(path: Path, array: np.ndarray, what: str, low: float, high: float, why: str = "") -> None:
    """Every value within [low, high]; the first row outside is named."""
    outside = (array < low) | (array > high)
    if outside.any():
        row = int(np.flatnonzero(outside.reshape(len(array), -1).any(axis=1))[0])
        value = array[row] if array.ndim == 1 else array[row][outside[row]][0]
        raise MMIMInputError(f"{path}: {what} {value} at row {row} outside [{low}, {high}]{why}")


def bind_store(config: Config, store: FeatureStore) -> Config:
    """The config with the store's input dims and token cap; refuse a store tokenized for another encoder."""
    if store.text_encoder != config.model.text_encoder:
        raise MMIMInputError(
            f"model.text_encoder {config.model.text_encoder!r} does not match the tokenizer of "
            f"data.store {str(store.root)!r} ({store.text_encoder!r}); re-extract or change the config"
        )
    stored = {
        "audio_dim": store.dims["audio"],
        "vision_dim": store.dims["vision"],
        "max_tokens": store.max_tokens,
        "extractor": store.extractor,
    }
    for field, value in stored.items():
        configured = getattr(config.model, field)
        if configured is not None and configured != value:
            raise MMIMInputError(
                f"model.{field} is {_shown(configured)} but data.store {str(store.root)!r} has "
                f"{_shown(value)} (leave it out: it comes from the store)"
            )
    return config.model_copy(update={"model": config.model.model_copy(update=stored)})


def _shown(value):
    """A setting for an error message: an extractor record by its name, version and settings."""
    if isinstance(value, dict) and "version" in value:
        return f"extractor {value.get('name')} {value['version']} {value.get('settings')}"
    return value
