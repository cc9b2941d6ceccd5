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

`mmim.store_writer` writes stores; this module opens and checks them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmim.errors import MMIMInputError
from mmim.files import read_json


SCHEMA_VERSION = 1
SPLITS = ("train", "valid", "test")
TEXT_FIELDS = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8}
SEQUENCE_FIELDS = ("audio", "vision")
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
                if sha256_of(path) != expected:
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
