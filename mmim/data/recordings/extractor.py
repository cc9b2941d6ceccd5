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
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmim.core.child_process import python_module_command
from mmim.data.recordings.audio import AudioFeatures
from mmim.data.recordings.face import FACE_DIM, FaceGeometry
from mmim.data.recordings.frames import fill_gaps
from mmim.data.recordings.media import MediaError, MediaLimits, clip_span, open_media, read_audio, sample_frames

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
    clip_timeout: float = Field(default=120.0, gt=0, le=86_400)  # seconds one clip may take before it is abandoned

    def limits(self) -> MediaLimits:
        return MediaLimits(max_seconds=self.max_seconds, max_pixels=self.max_pixels, width=self.video_width)

    def features(self) -> dict:
        """The settings that decide the features (the timeout does not): the cache key's part."""
        return self.model_dump(exclude={"clip_timeout"})


def _code_version() -> str:
    digest = hashlib.sha256()
    for module in ("media.py", "audio.py", "face.py", "frames.py", "extractor.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    for library in LIBRARIES:
        digest.update(f"{library}=={version(library)}".encode())
    return digest.hexdigest()[:16]


EXTRACTOR_VERSION = _code_version()


def describe_extractor(settings: ExtractorSettings) -> dict:
    """What the store's manifest (and so every model trained on it) records."""
    return {
        "name": EXTRACTOR_NAME,
        "version": EXTRACTOR_VERSION,
        "settings": settings.features(),
        "libraries": {library: version(library) for library in LIBRARIES},
    }


@dataclass
class ClipFeatures:
    audio: np.ndarray  # (audio frames, audio dim) float32
    vision: np.ndarray  # (vision frames, FACE_DIM) float32


class ClipExtractor:
    """Features of one clip at a time, in this process (models are loaded once)."""

    def __init__(self, settings: ExtractorSettings) -> None:
        self.settings = settings
        self.audio = AudioFeatures(settings.audio_features, settings.audio_rate)
        self._face: FaceGeometry | None = None

    @property
    def face(self) -> FaceGeometry:
        """The face model, loaded with the first video frame (0.7 s and 100 MB that a run over
        audio-only files never needs)."""
        if self._face is None:
            self._face = FaceGeometry()
        return self._face

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
        return ClipFeatures(audio, fill_gaps(vision, present))


# ---------------------------------------------------------------- the same, in a child process
#
# The child is `python -m mmim.data.recordings.extractor` (isolated: mmim.core.child_process),
# talking over two pipes: a fresh interpreter (not a fork of a parent with threads, such as a
# Ray worker) that imports this module only (multiprocessing's spawn would import the parent's
# main script too, which for the CLI costs seconds at every start and restart).


def _next_request(requests: Connection) -> tuple | None:
    """The next clip to extract; None when asked to stop or when the parent is gone."""
    try:
        return requests.recv()
    except (EOFError, OSError):
        return None


def _serve(requests: Connection, answers: Connection, settings_json: str) -> None:
    """The child: extract each requested clip, answer with features or the reason it failed."""
    extractor = ClipExtractor(ExtractorSettings.model_validate_json(settings_json))
    answers.send(("ready", extractor.dims))
    while (request := _next_request(requests)) is not None:
        try:
            features = extractor(*request)
            answers.send(("ok", features.audio, features.vision))
        except MediaError as error:
            answers.send(("error", error.reason, error.detail))
        except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is that file's
            answers.send(("error", "unreadable media", f"{type(error).__name__}: {error}"))


class IsolatedExtractor:
    """`ClipExtractor` in a child process that is restarted after a crash or a hang.

    Calls return ClipFeatures or raise MediaError (reason "decoder crashed" or "timed out"
    when the child died or did not answer within `settings.clip_timeout`).
    """

    START_TIMEOUT = 120.0  # seconds for a child to load its models

    def __init__(self, settings: ExtractorSettings) -> None:
        self.settings = settings
        self._child: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._answers: Connection | None = None

    def __enter__(self) -> "IsolatedExtractor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> None:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        command = python_module_command(__name__, str(to_child), str(from_child), self.settings.model_dump_json())
        self._child = subprocess.Popen(command, pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._requests = Connection(from_parent, readable=False)
        self._answers = Connection(to_parent, writable=False)
        if not self._answers.poll(self.START_TIMEOUT):
            self.close(kill=True)
            raise RuntimeError(f"the extractor process did not start in {self.START_TIMEOUT:g} s")
        self._answers.recv()  # ("ready", dims)

    def _pipes(self) -> tuple[Connection, Connection]:
        """(requests, answers): the running child's pipes."""
        if self._requests is None or self._answers is None:  # _start sets them with the child
            raise RuntimeError("the extractor process is not running")
        return self._requests, self._answers

    def __call__(self, path: str | Path, start: float | None = None, end: float | None = None) -> ClipFeatures:
        if self._child is None:
            self._start()
        requests, answers = self._pipes()
        try:
            requests.send((str(path), start, end))
            if not answers.poll(self.settings.clip_timeout):
                self.close(kill=True)
                raise MediaError(
                    "timed out",
                    f"no result after {self.settings.clip_timeout:g} s (extraction.recordings.clip-timeout)",
                )
            answer = answers.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self.close(kill=True)
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            raise MediaError("decoder crashed", f"the extractor process was {how}") from None
        if answer[0] == "error":
            raise MediaError(answer[1], answer[2])
        return ClipFeatures(answer[1], answer[2])

    def close(self, kill: bool = False) -> int | None:
        """Stop the child (a new one starts on the next call): ask it to finish, or kill it.
        Returns its exit code (negative: the signal that ended it)."""
        if self._child is None:
            return None
        if not kill and self._requests is not None:
            try:
                self._requests.send(None)
            except OSError:
                pass
        for pipe in (self._requests, self._answers):
            if pipe is not None:
                pipe.close()
        if kill and self._child.poll() is None:
            self._child.kill()
        try:
            code = self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._child.kill()
            code = self._child.wait()
        self._child = self._requests = self._answers = None
        return code


if __name__ == "__main__":  # the child process of IsolatedExtractor
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False), sys.argv[3])
