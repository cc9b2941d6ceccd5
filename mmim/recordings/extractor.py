"""One clip -> (audio frames, vision frames): the extractor that training and serving share.

    settings = ExtractorSettings(video_fps=15)
    features = ClipExtractor(settings)("Raw/v1/3.mp4")          # in this process
    with IsolatedExtractor(settings) as extract:               # in a child process
        features = extract("Raw/v1/3.mp4")                       # -> ClipFeatures or MediaError

Audio: openSMILE low-level descriptors of the 16 kHz mono track (`audio.py`), at
`audio_rate` frames per second. Vision: face geometry (`face.py`) of the first video
frame in each 1/`video_fps` step; a step without a frame of its own (a source slower
than `video_fps`) repeats its nearest neighbour; a file without video gives one zero
frame (face-found flag 0), as does a video without a decodable frame.

`IsolatedExtractor` is what runs on untrusted files (every extraction job, every
prediction): FFmpeg has had crashing bugs, so decoding runs in a child process that is
replaced when it dies or hangs, and that clip alone is reported as unreadable.

`EXTRACTOR_VERSION` changes whenever this package's code or the libraries it calls
change; with the settings, it keys the per-clip cache and is written to the store's
manifest and every model trained on it.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from dataclasses import dataclass
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmim.recordings.audio import AudioFeatures
from mmim.recordings.face import FACE_DIM, FaceGeometry
from mmim.recordings.media import MediaError, MediaLimits, clip_span, open_media, read_audio, sample_frames

log = logging.getLogger(__name__)

EXTRACTOR_NAME = "mmim-recordings"
LIBRARIES = ("av", "opensmile", "dlib-bin", "face-recognition-models", "opencv-python-headless")


class ExtractorSettings(BaseModel):
    """params.yaml `extraction.recordings` (the keys are written with dashes there, as the
    `mmim extract` options they become)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    audio_features: Literal["eGeMAPSv02", "ComParE_2016"] = "eGeMAPSv02"  # openSMILE LLD set
    audio_rate: float = Field(default=50.0, gt=0, le=100)  # audio frames per second (openSMILE: 100)
    video_fps: float = Field(default=15.0, gt=0, le=60)  # video frames analysed per second
    video_width: int = Field(default=480, ge=64, le=3840)  # frames scaled down to this width first
    max_seconds: float = Field(default=60.0, gt=0, le=3600)  # longest clip decoded
    max_pixels: int = Field(default=3840 * 2160, gt=0)  # largest source video frame (width x height)
    clip_timeout: float = Field(default=120.0, gt=0)  # seconds one clip may take before it is abandoned

    def limits(self) -> MediaLimits:
        return MediaLimits(max_seconds=self.max_seconds, max_pixels=self.max_pixels, width=self.video_width)

    def features(self) -> dict:
        """The settings that decide the features (the timeout does not): the cache key's part."""
        return self.model_dump(exclude={"clip_timeout"})


def _code_version() -> str:
    digest = hashlib.sha256()
    for module in ("media.py", "audio.py", "face.py", "extractor.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    for library in LIBRARIES:
        digest.update(f"{library}=={version(library)}".encode())
    return digest.hexdigest()[:16]


EXTRACTOR_VERSION = _code_version()


def describe_extractor(settings: ExtractorSettings) -> dict:
    """What the store's manifest (and so every model trained on it) records."""
    return {"name": EXTRACTOR_NAME, "version": EXTRACTOR_VERSION, "settings": settings.features(),
            "libraries": {library: version(library) for library in LIBRARIES}}


@dataclass
class ClipFeatures:
    audio: np.ndarray  # (audio frames, audio dim) float32
    vision: np.ndarray  # (vision frames, FACE_DIM) float32


def _fill_gaps(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows not `present` take the nearest present row (the earlier one on a tie)."""
    where = np.flatnonzero(present)
    if where.size == 0 or where.size == len(values):
        return values
    after = np.clip(np.searchsorted(where, np.arange(len(values))), 0, where.size - 1)
    before = np.clip(after - 1, 0, where.size - 1)
    rows = np.arange(len(values))
    nearest = np.where(np.abs(rows - where[before]) <= np.abs(where[after] - rows), where[before], where[after])
    return values[nearest]


class ClipExtractor:
    """Features of one clip at a time, in this process (models are loaded once)."""

    def __init__(self, settings: ExtractorSettings) -> None:
        self.settings = settings
        self.audio = AudioFeatures(settings.audio_features, settings.audio_rate)
        self.face = FaceGeometry()

    @property
    def dims(self) -> dict[str, int]:
        return {"audio": self.audio.dim, "vision": FACE_DIM}

    def __call__(self, path: str | Path, start: float | None = None, end: float | None = None) -> ClipFeatures:
        limits = self.settings.limits()
        with open_media(path) as container:
            span = clip_span(container, start, end, limits)
            has_video = bool(container.streams.video)
        audio = self.audio(read_audio(path, span), span.seconds)
        if not has_video:
            return ClipFeatures(audio, np.zeros((1, FACE_DIM), dtype=np.float32))
        steps = max(1, round(span.seconds * self.settings.video_fps))
        vision = np.zeros((steps, FACE_DIM), dtype=np.float32)
        present = np.zeros(steps, dtype=bool)
        for step, frame in sample_frames(path, span, self.settings.video_fps, limits):
            vision[step], present[step] = self.face(frame), True
        return ClipFeatures(audio, _fill_gaps(vision, present))


# ---------------------------------------------------------------- the same, in a child process

def _serve(connection: Connection, settings_json: str) -> None:
    """The child: extract each requested clip, answer with features or the reason it failed."""
    extractor = ClipExtractor(ExtractorSettings.model_validate_json(settings_json))
    connection.send(("ready", extractor.dims))
    while (request := connection.recv()) is not None:
        try:
            features = extractor(*request)
            connection.send(("ok", features.audio, features.vision))
        except MediaError as error:
            connection.send(("error", error.reason, error.detail))
        except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is that file's
            connection.send(("error", "unreadable media", f"{type(error).__name__}: {error}"))


class IsolatedExtractor:
    """`ClipExtractor` in a child process that is restarted after a crash or a hang.

    Calls return ClipFeatures or raise MediaError (reason "decoder crashed" or "timed out"
    when the child died or did not answer within `settings.clip_timeout`).
    """

    def __init__(self, settings: ExtractorSettings) -> None:
        self.settings = settings
        self._child: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None
        self._exit_code: int | None = None  # of the last child that stopped
        self.dims: dict[str, int] = {}

    def __enter__(self) -> "IsolatedExtractor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> Connection:
        # spawn, not fork: the parent may be a Ray worker with threads of its own
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        self._child = context.Process(target=_serve, args=(child_end, self.settings.model_dump_json()),
                                      name="mmim-extractor", daemon=True)
        self._child.start()
        child_end.close()
        self._connection = parent_end
        if not parent_end.poll(max(self.settings.clip_timeout, 120.0)):  # loading the models
            self.close()
            raise RuntimeError("the extractor process did not start")
        _, self.dims = parent_end.recv()
        return parent_end

    def __call__(self, path: str | Path, start: float | None = None, end: float | None = None) -> ClipFeatures:
        connection = self._connection or self._start()
        try:
            connection.send((str(path), start, end))
            if not connection.poll(self.settings.clip_timeout):
                self.close(kill=True)
                raise MediaError("timed out", f"no result after {self.settings.clip_timeout:g} s "
                                              "(extraction.recordings.clip-timeout)")
            answer = connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.close(kill=True)
            code = self._exit_code
            raise MediaError("decoder crashed", f"the extractor process died (exit code {code})") from None
        if answer[0] == "error":
            raise MediaError(answer[1], answer[2])
        return ClipFeatures(answer[1], answer[2])

    def close(self, kill: bool = False) -> None:
        """Stop the child (a new one starts on the next call): ask it to finish, or kill it."""
        if self._connection is not None:
            if not kill:
                try:
                    self._connection.send(None)
                except (OSError, ValueError):
                    pass
            self._connection.close()
        if self._child is not None:
            if kill:
                self._child.kill()
            self._child.join(timeout=5)
            if self._child.is_alive():
                self._child.kill()
                self._child.join()
            self._exit_code = self._child.exitcode
        self._child, self._connection = None, None
