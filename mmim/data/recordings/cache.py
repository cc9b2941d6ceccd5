"""The per-clip feature cache: a weekly run extracts only the clips it has not seen.

    CACHE/
      <k0k1>/<key>.npz       audio, vision (float32) of one clip
      content-hashes.json    path -> size, mtime, sha256 of the files hashed before

A clip's key is a hash of its file's content, its span, the extractor's settings and
the extractor's version (`mmim.data.recordings.extractor.EXTRACTOR_VERSION`): renaming a
file costs nothing, editing it or changing a setting or the code re-extracts it. The
cache lives beside the project (not in the DVC-tracked store) and is never read for
anything but a key it wrote, so deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_write
from mmim.core.store import sha256_of
from mmim.data.recordings.extractor import EXTRACTOR_VERSION, ClipFeatures, ExtractorSettings
from mmim.data.recordings.layout import Clip

HASHES_FILE = "content-hashes.json"


class FeatureCache:
    def __init__(self, root: str | Path, settings: ExtractorSettings) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as error:
            raise MMIMInputError(f"--cache {self.root}: not a writable directory ({error.strerror or error})") from None
        self._settings = json.dumps(settings.features(), sort_keys=True)
        self._hashes = self._read_hashes()

    def _read_hashes(self) -> dict[str, list]:
        try:
            hashes = json.loads((self.root / HASHES_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return hashes if isinstance(hashes, dict) else {}

    def content_hash(self, path: Path) -> str:
        """sha256 of the file, reused while its size and modification time stay the same."""
        stat = path.stat()
        seen = self._hashes.get(str(path.resolve()))
        if isinstance(seen, list) and seen[:2] == [stat.st_size, stat.st_mtime_ns]:
            return seen[2]
        digest = sha256_of(path)
        self._hashes[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def save_hashes(self) -> None:
        atomic_write(self.root / HASHES_FILE, json.dumps(self._hashes))

    def key(self, clip: Clip) -> str:
        material = json.dumps([self.content_hash(clip.path), clip.start, clip.end, self._settings, EXTRACTOR_VERSION])
        return hashlib.sha256(material.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> ClipFeatures | None:
        """The cached features, or None (also for a damaged entry, which is then replaced)."""
        try:
            with np.load(self._path(key), allow_pickle=False) as saved:
                features = ClipFeatures(saved["audio"], saved["vision"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return None
        valid = all(
            array.dtype == np.float32 and array.ndim == 2 and len(array) > 0
            for array in (features.audio, features.vision)
        )
        return features if valid else None

    def put(self, key: str, features: ClipFeatures) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, audio=features.audio, vision=features.vision)
        atomic_write(path, buffer.getvalue())
