"""The per-clip feature cache: a weekly run extracts only the clips it has not seen.

    CACHE/<k0k1>/<key>.npz    audio, vision (float32) of one clip, and the key it was stored under

A clip's key is a hash of its file's content, its span, the extractor's settings and
the extractor's version (`mmim.data.recordings.extractor.EXTRACTOR_VERSION`): renaming a
file costs nothing, editing it or changing a setting or the code re-extracts it. Every run
reads every recording in full to hash it (no shortcut by size and modification time, which
an edit can keep): about a second per GB, next to ~0.7 s of extraction per clip.

The cache verifies itself: an entry is used only if it carries the key it was looked up by,
its arrays are what their headers declare, and their widths are the settings' (any other
entry - damaged, copied over another, left by other code - is re-extracted and counted in
`replaced`). It lives beside the project, not in the DVC-tracked store, and deleting it is
always safe, also during a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_write, read_npz
from mmim.core.store import sha256_of
from mmim.data.recordings.audio import FEATURE_SETS
from mmim.data.recordings.extractor import EXTRACTOR_VERSION, ClipFeatures, ExtractorSettings
from mmim.data.recordings.face import FACE_DIM
from mmim.data.recordings.layout import Clip

log = logging.getLogger(__name__)


def largest_entry(settings: ExtractorSettings) -> int:
    """Bytes of the largest entry `settings` can make: a clip of max-seconds at both frame rates
    (a frame more for rounding), float32, and its key."""
    frames = {"audio": settings.max_seconds * settings.audio_rate, "vision": settings.max_seconds * settings.video_fps}
    widths = {"audio": FEATURE_SETS[settings.audio_features], "vision": FACE_DIM}
    return sum(4 * (round(frames[name]) + 1) * widths[name] for name in widths) + 4 * 64


class FeatureCache:
    def __init__(self, root: str | Path, settings: ExtractorSettings) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as error:
            raise MMIMInputError(f"--cache {self.root}: not a writable directory ({error.strerror or error})") from None
        self._settings = json.dumps(settings.features(), sort_keys=True)
        self.dims = {"audio": FEATURE_SETS[settings.audio_features], "vision": FACE_DIM}  # features per frame
        self._largest = largest_entry(settings)
        self._hashes: dict[Path, str] = {}  # this run's, so a video cut into many clips is read once
        self.replaced: set[str] = set()  # keys whose entry was there but not usable

    def key(self, clip: Clip) -> str:
        path = clip.path.resolve()
        if path not in self._hashes:
            self._hashes[path] = sha256_of(path)
        material = json.dumps([self._hashes[path], clip.start, clip.end, self._settings, EXTRACTOR_VERSION])
        return hashlib.sha256(material.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> ClipFeatures | None:
        """The cached features, or None: absent, or not usable (then counted and later replaced)."""
        if not self._path(key).exists():
            return None
        try:
            saved = read_npz(self._path(key), ("audio", "vision", "key"), self._largest)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, MMIMInputError) as error:
            self._unusable(key, f"unreadable ({error})")
            return None
        if saved["key"].shape != () or str(saved["key"]) != key:
            self._unusable(key, "stored under another key")
        elif not all(
            saved[name].dtype == np.float32
            and saved[name].ndim == 2
            and len(saved[name]) > 0
            and saved[name].shape[1] == width
            for name, width in self.dims.items()
        ):
            self._unusable(key, "not the settings' feature widths")
        else:
            return ClipFeatures(saved["audio"], saved["vision"])
        return None

    def _unusable(self, key: str, why: str) -> None:
        if key not in self.replaced:
            log.warning("%s: cache entry %s, extracting the clip again", self._path(key), why)
            self.replaced.add(key)

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, features: ClipFeatures) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)  # parents: the cache may have been deleted
        buffer = io.BytesIO()
        np.savez(buffer, audio=features.audio, vision=features.vision, key=np.array(key))
        atomic_write(path, buffer.getvalue())
