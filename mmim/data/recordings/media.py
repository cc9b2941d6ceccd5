"""Decoding recordings with PyAV (FFmpeg): 16 kHz mono audio and sampled video frames.

A clip is a whole file, or the span [start, end) seconds of one. Media files are
untrusted input, so decoding is bounded before it begins and checked after it ends:

  - the clip may last at most `max-seconds`; a file that declares a longer
    duration is refused, and decoding never runs past the clip's end, so a small file
    that lies about its length cannot make us decode hours of media;
  - video frames may hold at most `max-pixels` pixels (checked per frame: a
    stream may change resolution midway), and are scaled down to `limits.width`
    before anything else sees them;
  - a clip whose audio ends well before its declared end (a cut download, damaged
    data) is refused as truncated: FFmpeg often decodes what is there without complaint.

The demuxer is chosen from the file's first bytes (MP4/MOV, Matroska/WebM, AVI, WAV,
FLAC), never left to FFmpeg's guess, and only local files may be opened: a "video"
that is really a playlist must not make FFmpeg fetch URLs or read other files.

Every refusal is a `MediaError` whose message says what is wrong with the file. A
decoder that crashes outright is handled one level up (`mmim.data.recordings.extractor`
decodes in a child process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16_000  # what openSMILE's feature sets are made for
SEEK_PREROLL = 0.1  # seconds decoded before a span's start, so its first samples are complete
# The end of the audio may fall short of the declared duration by an encoder's last
# frame (AAC: 1024 samples) and some rounding; a larger gap means the file was cut.
TRUNCATION_TOLERANCE = 0.25
MIN_SECONDS = 0.1  # shorter clips carry no usable audio frame (openSMILE's windows are 20-60 ms)
MAX_SOURCE_FPS = 300  # frames decoded per second of clip before a video is refused as malformed


class MediaError(Exception):
    """The file cannot be used. `reason` is short and stable (summaries count clips by it),
    `detail` says what exactly; neither names the file: callers do."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class MediaLimits:
    max_seconds: float  # longest clip decoded
    max_pixels: int  # largest video frame, width x height
    width: int  # frames are scaled down to at most this width


@dataclass(frozen=True)
class Span:
    """The part of a file that a clip is: [start, end) seconds."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def container_format(path: str | Path) -> str:
    """FFmpeg's demuxer for the file, from its first bytes; anything else is refused."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as error:
        raise MediaError("unreadable media", f"cannot read: {error.strerror or error}") from None
    if head[4:8] == b"ftyp":
        return "mp4"  # FFmpeg's mov,mp4,m4a,3gp demuxer
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # also WebM
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WAVE"):
        return "avi" if head[8:12] == b"AVI " else "wav"
    if head[:4] == b"fLaC":
        return "flac"
    raise MediaError("unsupported format", "not MP4/MOV, MKV/WebM, AVI, WAV or FLAC")


def open_media(path: str | Path) -> av.container.InputContainer:
    form = container_format(path)
    try:
        return av.open(
            str(path), format=form, metadata_errors="ignore", container_options={"protocol_whitelist": "file"}
        )
    except av.FFmpegError as error:
        raise MediaError("unreadable media", _describe(error)) from None
    except OSError as error:
        raise MediaError("unreadable media", f"cannot read: {error.strerror or error}") from None


def _describe(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def declared_seconds(container: av.container.InputContainer) -> float | None:
    """The duration the container declares (None when it declares none)."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    stream = container.streams.audio[0] if container.streams.audio else None
    if stream is not None and stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def clip_span(
    container: av.container.InputContainer, start: float | None, end: float | None, limits: MediaLimits
) -> Span:
    """The span to decode: checked against the file's declared duration and the caps."""
    declared = declared_seconds(container)
    if start is None and end is None:
        if declared is None:
            raise MediaError("unreadable media", "the file declares no duration; give start and end in label.csv")
        span = Span(0.0, declared)
    else:
        span = Span(start or 0.0, end if end is not None else (declared or math.inf))
        if span.start < 0 or span.end <= span.start:
            raise MediaError("span outside the file", f"start {span.start:g} s, end {span.end:g} s")
        if declared is not None and span.end > declared + TRUNCATION_TOLERANCE:
            raise MediaError("span outside the file", f"{span.start:g}-{span.end:g} s of a {declared:.2f} s file")
    if span.seconds < MIN_SECONDS:
        raise MediaError("zero-length clip", f"{span.seconds:.3f} s; at least {MIN_SECONDS} s needed")
    if span.seconds > limits.max_seconds:
        raise MediaError(
            "too long", f"{span.seconds:.1f} s, more than extraction.recordings.max-seconds ({limits.max_seconds:g} s)"
        )
    return span


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, seconds: float) -> None:
    """Position `stream` shortly before `seconds`. A video stream lands on the keyframe
    before it (possibly far before); decoding from there up to the span is bounded by
    the file, and what precedes the span is dropped as it is decoded."""
    if seconds > SEEK_PREROLL and stream.time_base:
        container.seek(int((seconds - SEEK_PREROLL) / stream.time_base), stream=stream)


def read_audio(path: str | Path, span: Span) -> np.ndarray:
    """The span's audio as 16 kHz mono float32; refuses a file without audio or cut short."""
    wanted = round(span.seconds * SAMPLE_RATE)
    with open_media(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        _seek(container, stream, span.start)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        kept, count, position, stopped = [], 0, None, ""
        try:
            for frame in container.decode(stream):
                if position is None:  # the time of the next resampled sample
                    position = frame.time if frame.time is not None else 0.0
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    before = round((span.start - position) * SAMPLE_RATE)  # samples preceding the span
                    position += len(samples) / SAMPLE_RATE
                    if before < len(samples):
                        kept.append(samples[max(before, 0) :])
                        count += len(kept[-1])
                if count >= wanted:
                    break  # never decode past the clip: a file's claims about its length are not trusted
        except av.FFmpegError as error:  # damaged data: keep what came before it, judged below
            stopped = f"; the decoder stopped: {_describe(error)}"
        if count < wanted:
            kept += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    clip = np.concatenate(kept)[:wanted] if kept else np.zeros(0, dtype=np.float32)
    if len(clip) < wanted - TRUNCATION_TOLERANCE * SAMPLE_RATE or len(clip) < MIN_SECONDS * SAMPLE_RATE:
        raise MediaError(
            "truncated", f"{len(clip) / SAMPLE_RATE:.2f} s of audio decoded, {span.seconds:.2f} s declared{stopped}"
        )
    return np.ascontiguousarray(clip, dtype=np.float32)


def sample_frames(path: str | Path, span: Span, fps: float, limits: MediaLimits) -> Iterator[tuple[int, np.ndarray]]:
    """(step, RGB frame) for the first frame of each 1/fps step of the span that has one.

    Frames are scaled to at most `limits.width` wide; steps without a frame of their own
    (a source slower than `fps`) are left out, and filled by the caller. Yields nothing
    for a file without video.
    """
    with open_media(path) as container:
        if not container.streams.video:
            return
        stream = container.streams.video[0]
        declared = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
        if declared > limits.max_pixels:  # refused before a decoder allocates such frames
            raise MediaError(
                "frames too large",
                f"{stream.codec_context.width}x{stream.codec_context.height}, "
                f"more than extraction.recordings.max-pixels ({limits.max_pixels})",
            )
        _seek(container, stream, span.start)
        steps = max(1, round(span.seconds * fps))
        last_step, inside, most = -1, 0, span.seconds * MAX_SOURCE_FPS
        try:
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else index / float(stream.average_rate or fps)
                if time >= span.end:
                    break
                if time >= span.start:
                    inside += 1
                    if inside > most:
                        raise MediaError("unreadable media", f"more than {MAX_SOURCE_FPS} video frames per second")
                step = math.floor((time - span.start) * fps)
                if step <= last_step or step < 0 or step >= steps:
                    continue  # before the span, or a step that already has its frame
                last_step = step
                yield step, _scaled_rgb(frame, limits)
        except av.FFmpegError:
            return  # damaged data: the steps decoded so far stand, the rest are filled (the audio
            # of a cut file is checked for truncation)


def _scaled_rgb(frame: av.VideoFrame, limits: MediaLimits) -> np.ndarray:
    if frame.width * frame.height > limits.max_pixels:
        raise MediaError(
            "frames too large",
            f"{frame.width}x{frame.height}, more than extraction.recordings.max-pixels ({limits.max_pixels})",
        )
    scale = min(1.0, limits.width / frame.width)
    width, height = max(2, round(frame.width * scale)), max(2, round(frame.height * scale))
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
