"""Short synthetic recordings with a real face and a voice, deterministic from a seed.

Tests, the extraction benchmark and the `recordings-sample` dataset need recordings that
exercise the whole path from a video file to a trained model: FFmpeg decoding, openSMILE
audio descriptors, dlib face detection and 68 landmarks, and a tokenizer. Real corpora
are large and licensed, so this module draws its own, offline, in a few seconds:

- Picture: the astronaut's face that ships with scikit-image (`skimage.data.astronaut()`,
  a real photograph, so dlib's HOG detector finds it), cut out with a soft elliptical
  mask and laid on a noisy gradient background. Over a clip it drifts, turns (roll
  within +-12 degrees) and zooms (+-10 %), each clip with its own slow motion. The label
  shows in the face geometry: a positive label widens the mouth and lifts its corners,
  a negative one narrows it and pulls the corners down, so landmark distances carry it.
  The face is about 0.42 of the frame height (~100 px at 320x240): dlib's detector
  without upsampling needs faces of ~80 px and more.
- Voice: a harmonic series (a glottal-like tone with a few overtones), light breath
  noise and a syllable envelope near 4 Hz. Its pitch carries the label: 140 Hz + 15 Hz
  per label point, rising through a positive clip and falling through a negative one.
- Text: a short review sentence whose words carry the label's sign and strength.

`write_sample_dataset` writes the MMSA-FET layout that the recordings extraction reads:

    OUT/label.csv                      video_id,clip_id,text,label,mode,start,end
    OUT/Raw/<video_id>/<clip_id>.mp4   one file per clip
    OUT/Raw/<video_id>.mp4             for two videos, one longer file instead: their
                                       clips are spans of it (start, end in seconds)

`mode` is train, valid or test, or empty for about a quarter of the videos, whose
split the pipeline assigns by a hash of the video id.

The same arguments give the same files, byte for byte (with the same FFmpeg build): the
encoders run with one thread (by default x264 takes as many as the machine has cores,
and its output changes with that number), and the muxers run bitexact (no random ids,
no version tags).

Every file is written under a hidden temporary name and renamed when complete, so an
interrupted run leaves no half-written recording behind.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from mmim.core.errors import MMIMInputError

log = logging.getLogger(__name__)

AUDIO_RATE = 16000  # sample rate of the audio track in videos: speech features need no more
AUDIO_CHUNK = 1024  # samples per audio frame handed to the encoder (one AAC frame)
MIN_SECONDS = 0.1  # shortest recording: a few frames

# Container by file suffix: (FFmpeg format, video codec, audio codec).
VIDEO_FORMATS = {
    ".mp4": ("mp4", "libx264", "aac"),
    ".mkv": ("matroska", "libx264", "aac"),
    ".webm": ("webm", "libvpx-vp9", "libopus"),
}
VIDEO_OPTIONS = {
    # veryfast: a third of ultrafast's file size for ~25 % more time (at 320x240).
    "libx264": {"preset": "veryfast", "crf": "23"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"},
}
AUDIO_FORMATS = {".wav": ("wav", "pcm_s16le"), ".flac": ("flac", "flac")}

# Places in astronaut() (512x512, x to the right, y down), in photograph pixels. dlib's
# detector boxes the face at (179, 83)-(266, 170); the head with its hair spans about
# x 142-312, y 15-215; the crop leaves room around it for the soft edge of the cut-out.
CROP = (120, 0, 330, 240)  # x0, y0, x1, y1
HEAD_ELLIPSE = ((227.0, 115.0), (85.0, 100.0))  # centre (x, y) and semi-axes of the cut-out
FACE_CENTER = (222.5, 126.5)
FACE_BOX = 87.0  # side of dlib's box
MOUTH_CENTER = (223.0, 147.0)
MOUTH_HALF_WIDTH = 22.0
FACE_SHARE = 0.42  # face box side / frame height: ~100 px at 240, safely above dlib's 80

# Motion amplitudes over a clip: shift as a share of the frame, roll in degrees, zoom.
MAX_SHIFT = (0.08, 0.05)
MAX_ROLL = 12.0
MAX_ZOOM = 0.10

# Voice: pitch in Hz at label 0, Hz per label point, and the rise (or fall) through a
# segment per label point.
BASE_PITCH, PITCH_PER_POINT, GLIDE_PER_POINT = 140.0, 15.0, 5.0
HARMONICS = (1.0, 0.5, 0.3, 0.18, 0.1)  # amplitudes of f0, 2 f0, ...

# Sentences by rounded label, -3 .. 3; the words carry sign and strength. Commas and one
# pair of quotes make label.csv exercise CSV quoting.
SENTENCES = {
    3: (
        "this was truly wonderful",
        "an absolutely brilliant film",
        "i loved every single minute",
        'a real "must see", simply amazing',
    ),
    2: ("a really good movie", "i enjoyed it a lot", "the acting was great"),
    1: ("it was pretty nice", "a fairly good story", "i mostly liked it"),
    0: ("it was okay i guess", "the film runs about two hours", "nothing special, either way"),
    -1: ("it was a bit dull", "somewhat disappointing", "not very good, honestly"),
    -2: ("a really bad film", "the plot was awful", "i did not enjoy it at all"),
    -3: ("a truly terrible film", "the worst movie i have ever seen", "an absolutely horrible mess"),
}
LEAD_INS = ("", "", "honestly, ", "well, ", "i think ")

# The dataset: frame size and rate, clip durations, at least this many videos with an
# explicit mode per split, and how many videos are one longer recording with a stretch
# of other talk before, between and after its clips.
DATASET_SIZE, DATASET_FPS = (320, 240), 25
CLIP_SECONDS = (1.6, 1.8, 2.0, 2.2, 2.4)  # multiples of 1/25 s: spans start on frames
MIN_VIDEOS_PER_SPLIT = 2
SPAN_VIDEOS = 2
SPAN_GAP = 0.4
LABEL_CSV_FIELDS = ("video_id", "clip_id", "text", "label", "mode", "start", "end")


@dataclass(frozen=True)
class SampleSummary:
    """What `write_sample_dataset` wrote."""

    root: Path
    videos: int
    clips: int  # rows of label.csv
    counts: dict[str, int]  # rows per mode: train, valid, test, and unassigned (empty mode)
    files: int  # media files under Raw/
    seconds: float  # total duration of those files


@dataclass(frozen=True)
class _Segment:
    """A stretch of a recording with one label (a clip, or the talk between clips)."""

    seconds: float
    label: float


# ---------------------------------------------------------------- public API


def write_face_clip(
    path: str | os.PathLike,
    *,
    seconds: float = 2.0,
    label: float = 0.0,
    seed: int = 0,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    audio: bool = True,
) -> Path:
    """A moving face (and a voice) whose expression and pitch follow `label` in [-3, 3].

    The container follows the suffix: .mp4 or .mkv hold H.264 (yuv420p) and AAC, .webm
    holds VP9 and Opus. `size` is (width, height) and must be even (yuv420p halves both).
    """
    path = Path(path)
    _check_clip(seconds, label)
    _write_video(path, [_Segment(seconds, label)], seed=seed, size=size, fps=fps, face=True, audio=audio)
    return path


def write_blank_clip(
    path: str | os.PathLike, *, seconds: float = 2.0, seed: int = 0, size: tuple[int, int] = (320, 240), fps: int = 25
) -> Path:
    """A clip with no face, only the noisy background, and a neutral voice."""
    path = Path(path)
    _check_clip(seconds, 0.0)
    _write_video(path, [_Segment(seconds, 0.0)], seed=seed, size=size, fps=fps, face=False, audio=True)
    return path


def write_voice(
    path: str | os.PathLike, *, seconds: float = 2.0, label: float = 0.0, seed: int = 0, sample_rate: int = 16000
) -> Path:
    """Mono speech-like audio whose pitch follows `label`; .wav (16-bit PCM) or .flac."""
    path = Path(path)
    _check_clip(seconds, label)
    try:
        container_format, codec = AUDIO_FORMATS[path.suffix.lower()]
    except KeyError:
        raise MMIMInputError(f"{path}: audio files are {', '.join(AUDIO_FORMATS)}") from None
    samples = _voice([_Segment(seconds, label)], seed=seed, sample_rate=sample_rate)
    with _atomic(path) as partial, _open_output(partial, container_format) as container:
        _AudioTrack(container, codec, samples, sample_rate).finish()
    return path


def write_sample_dataset(
    out: str | os.PathLike, *, videos: int = 16, clips_per_video: int = 3, seed: int = 0
) -> SampleSummary:
    """The `recordings-sample` dataset: label.csv and Raw/ under `out`, a new or empty directory.

    `videos` videos (at least 6) of `clips_per_video` clips of 1.6-2.4 s each, at 320x240
    and 25 fps, named vid00, vid01, ... and 1, 2, ... Each video has a sentiment tendency,
    spread evenly over [-2.4, 2.4] across the videos; its clips' labels scatter around it
    (sd 0.5, one decimal, clipped to [-3, 3]). A quarter of the videos keep an empty mode
    (fewer when a split would get under 2 videos); the rest go about 60/20/20 to
    train/valid/test, at least 2 videos each. Two videos are one recording each,
    Raw/<video_id>.mp4, whose rows name their clips "span<n>" and give start
    and end in seconds. The default takes 6-8 s on a 2-core machine.

    Raises MMIMInputError when `out` holds anything or an argument is out of range.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MMIMInputError(
            f"{out}: already exists and is not an empty directory; the sample is written only into a new or empty one"
        )
    if videos < 3 * MIN_VIDEOS_PER_SPLIT:
        raise MMIMInputError(
            f"videos={videos}: the sample needs at least {3 * MIN_VIDEOS_PER_SPLIT} ({MIN_VIDEOS_PER_SPLIT} per split)"
        )
    if clips_per_video < 1:
        raise MMIMInputError(f"clips_per_video={clips_per_video}: needs at least 1")

    started = time.perf_counter()
    rows: list[dict[str, str]] = []
    files, seconds = 0, 0.0
    # One file after another, on purpose: with two libx264 encoders running side by side
    # in one process (a thread pool), a few of the 44 default files came out with other
    # bytes from run to run, though each encoder ran on one thread.
    for plan in _plan_videos(videos, clips_per_video, seed):
        video_rows, video_files, video_seconds = _write_video_clips(out / "Raw", plan)
        rows += video_rows
        files += video_files
        seconds += video_seconds
    # label.csv last: a dataset without it is visibly unfinished.
    with _atomic(out / "label.csv") as partial:
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LABEL_CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    counts = {mode: sum(row["mode"] == mode for row in rows) for mode in ("train", "valid", "test")}
    counts["unassigned"] = sum(row["mode"] == "" for row in rows)
    summary = SampleSummary(
        root=out, videos=videos, clips=len(rows), counts=counts, files=files, seconds=round(seconds, 3)
    )
    log.info(
        "wrote %d clips of %d videos (%d files, %.1f s of media) to %s in %.1f s; rows per mode %s",
        summary.clips,
        videos,
        files,
        seconds,
        out,
        time.perf_counter() - started,
        counts,
    )
    return summary


# ---------------------------------------------------------------- the dataset plan


@dataclass(frozen=True)
class _ClipPlan:
    """One row of label.csv and what its media shows."""

    clip_id: str
    label: float
    seconds: float
    text: str
    seed: int


@dataclass(frozen=True)
class _VideoPlan:
    """A video: its split, its clips, and whether they are spans of one recording."""

    video_id: str
    mode: str  # "" leaves the split to the pipeline's hash
    spans: bool  # one longer file whose spans are the clips
    tendency: float  # the video's overall sentiment, also the label of talk between clips
    seed: int
    clips: tuple[_ClipPlan, ...]


def _plan_videos(videos: int, clips_per_video: int, seed: int) -> list[_VideoPlan]:
    """Ids, modes, labels, durations and sentences of every clip, all from `seed`."""
    rng = np.random.default_rng(seed)
    # Tendencies spread evenly over the label range, so every dataset size covers it.
    tendencies = rng.permutation(np.linspace(-2.4, 2.4, videos))
    modes = rng.permutation(_modes(videos))
    spans = set(rng.choice(videos, size=SPAN_VIDEOS, replace=False).tolist())
    width = max(2, len(str(videos - 1)))
    plans = []
    for index in range(videos):
        video_id = f"vid{index:0{width}d}"
        clips = []
        for number in range(1, clips_per_video + 1):
            label = round(float(np.clip(tendencies[index] + rng.normal(0.0, 0.5), -3.0, 3.0)), 1)
            clip_seed = int(rng.integers(2**31))
            clips.append(
                _ClipPlan(
                    clip_id=f"span{number}" if index in spans else str(number),
                    label=label,
                    seconds=float(rng.choice(CLIP_SECONDS)),
                    text=_sentence(label, clip_seed),
                    seed=clip_seed,
                )
            )
        plans.append(
            _VideoPlan(
                video_id=video_id,
                mode=str(modes[index]),
                spans=index in spans,
                tendency=round(float(tendencies[index]), 1),
                seed=int(rng.integers(2**31)),
                clips=tuple(clips),
            )
        )
    return plans


def _modes(videos: int) -> list[str]:
    """About 60/20/20 train/valid/test by video, with a quarter left empty for the hash."""
    hashed = min(videos // 4, videos - 3 * MIN_VIDEOS_PER_SPLIT)
    explicit = videos - hashed
    held_out = max(MIN_VIDEOS_PER_SPLIT, round(0.2 * explicit))
    train = explicit - 2 * held_out
    return ["train"] * train + ["valid"] * held_out + ["test"] * held_out + [""] * hashed


def _write_video_clips(raw: Path, plan: _VideoPlan) -> tuple[list[dict[str, str]], int, float]:
    """A video's files under `raw` and its label.csv rows; returns (rows, files written, seconds)."""

    def row(clip: _ClipPlan, start: str = "", end: str = "") -> dict[str, str]:
        return {
            "video_id": plan.video_id,
            "clip_id": clip.clip_id,
            "text": clip.text,
            "label": f"{clip.label:.1f}",
            "mode": plan.mode,
            "start": start,
            "end": end,
        }

    if not plan.spans:
        for clip in plan.clips:
            write_face_clip(
                raw / plan.video_id / f"{clip.clip_id}.mp4",
                seconds=clip.seconds,
                label=clip.label,
                seed=clip.seed,
                size=DATASET_SIZE,
                fps=DATASET_FPS,
            )
        return [row(clip) for clip in plan.clips], len(plan.clips), sum(c.seconds for c in plan.clips)

    # One recording: talk at the video's tendency, then each clip, with talk between.
    segments, rows, cursor = [_Segment(SPAN_GAP, plan.tendency)], [], SPAN_GAP
    for clip in plan.clips:
        segments += [_Segment(clip.seconds, clip.label), _Segment(SPAN_GAP, plan.tendency)]
        rows.append(row(clip, start=_seconds_text(cursor), end=_seconds_text(cursor + clip.seconds)))
        cursor += clip.seconds + SPAN_GAP
    _write_video(
        raw / f"{plan.video_id}.mp4",
        segments,
        seed=plan.seed,
        size=DATASET_SIZE,
        fps=DATASET_FPS,
        face=True,
        audio=True,
    )
    return rows, 1, cursor


def _seconds_text(seconds: float) -> str:
    """A time for label.csv: 2.8, not 2.8000000000000003."""
    return f"{round(seconds, 3):g}"


def _sentence(label: float, seed: int) -> str:
    """A review sentence for the label rounded to a whole point, picked by `seed`."""
    rng = np.random.default_rng(seed)
    choices = SENTENCES[int(np.clip(round(label), -3, 3))]
    return str(rng.choice(LEAD_INS)) + str(rng.choice(choices))


# ---------------------------------------------------------------- picture


@functools.cache
def _head() -> tuple[np.ndarray, np.ndarray]:
    """The astronaut's head (RGB uint8) and its alpha, a feathered ellipse (read-only, cached)."""
    try:
        from skimage import data
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the sample face comes from scikit-image: pip install 'mmim-pipeline[demo]'"
        ) from error
    x0, y0, x1, y1 = CROP
    rgb = np.ascontiguousarray(data.astronaut()[y0:y1, x0:x1])
    (cx, cy), (rx, ry) = _in_crop(HEAD_ELLIPSE[0]), HEAD_ELLIPSE[1]
    rows, cols = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]].astype(np.float32)
    inside = (((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1.0).astype(np.float32)
    # A soft edge: a hard one would give the detector a strong contour that is not a face.
    alpha = cv2.GaussianBlur(inside, (0, 0), sigmaX=5.0)
    rgb.setflags(write=False)
    alpha.setflags(write=False)
    return rgb, alpha


def _in_crop(point: tuple[float, float]) -> tuple[float, float]:
    """A photograph position in the coordinates of the cropped head."""
    return point[0] - CROP[0], point[1] - CROP[1]


def _expression(head: np.ndarray, label: float) -> np.ndarray:
    """The head with its mouth widened and corners lifted (label > 0) or the reverse.

    A smooth local warp (cv2.remap) around the mouth: it moves the mouth corners by ~4 px
    at |label| = 3 on the photograph, a change the 68 landmarks pick up, while the rest of
    the face, which the detector relies on, stays as it is.
    """
    if label == 0:
        return head
    rows, cols = np.mgrid[0 : head.shape[0], 0 : head.shape[1]].astype(np.float32)
    mouth_x, mouth_y = _in_crop(MOUTH_CENTER)
    dx, dy = cols - mouth_x, rows - mouth_y
    weight = np.exp(-0.5 * ((dx / (1.3 * MOUTH_HALF_WIDTH)) ** 2 + (dy / 14.0) ** 2))
    # remap reads each output pixel from (map_x, map_y): reading nearer the centre widens
    # the mouth, reading from below lifts what sits there.
    map_x = cols - 0.08 * label * dx * weight
    map_y = rows + 1.5 * label * (dx / MOUTH_HALF_WIDTH) ** 2 * weight
    return cv2.remap(head, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted two-colour gradient with a little static noise, RGB uint8."""
    width, height = size
    top, bottom = rng.uniform(60, 200, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    picture = top + ramp * (bottom - top) + rng.normal(0.0, 4.0, size=(height, width, 3))
    return picture.clip(0, 255).astype(np.uint8)


class _Motion:
    """Slow drift, roll and zoom of the head, each a sine with its own rate and phase."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]) -> None:
        width, height = size
        self.amplitude = np.array([MAX_SHIFT[0] * width, MAX_SHIFT[1] * height, MAX_ROLL, MAX_ZOOM])
        self.rate = rng.uniform(0.15, 0.45, size=4)  # Hz: a 2 s clip shows part of a swing
        self.phase = rng.uniform(0.0, 2 * np.pi, size=4)

    def at(self, t: float) -> tuple[float, float, float, float]:
        """(shift x, shift y, roll in degrees, zoom factor) at `t` seconds."""
        dx, dy, roll, zoom = self.amplitude * np.sin(2 * np.pi * self.rate * t + self.phase)
        return float(dx), float(dy), float(roll), 1.0 + float(zoom)


def _frames(
    segments: Sequence[_Segment], *, seed: int, size: tuple[int, int], fps: int, face: bool
) -> Iterator[np.ndarray]:
    """RGB uint8 frames of the whole recording, the expression changing per segment."""
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    motion = _Motion(rng, size)
    frames = _count(sum(segment.seconds for segment in segments), fps)
    if not face:
        for _ in range(frames):
            yield background
        return
    width, height = size
    scale = FACE_SHARE * height / FACE_BOX
    ends = np.cumsum([segment.seconds for segment in segments])
    head, alpha = _head()
    heads = [_expression(head, segment.label) for segment in segments]
    face_center = _in_crop(FACE_CENTER)  # the point the head turns about and is placed by
    for index in range(frames):
        t = index / fps
        segment = min(int(np.searchsorted(ends, t, side="right")), len(heads) - 1)
        dx, dy, roll, zoom = motion.at(t)
        matrix: np.ndarray = cv2.getRotationMatrix2D(face_center, roll, scale * zoom)  # 2x3 float64
        matrix[:, 2] += (width / 2 + dx - face_center[0], height / 2 + dy - face_center[1])
        layer = cv2.warpAffine(heads[segment], matrix, size, flags=cv2.INTER_LINEAR)
        weight = cv2.warpAffine(alpha, matrix, size, flags=cv2.INTER_LINEAR)  # 0 outside the head
        yield cv2.blendLinear(layer, background, weight, 1.0 - weight)


# ---------------------------------------------------------------- voice


def _voice(segments: Sequence[_Segment], *, seed: int, sample_rate: int) -> np.ndarray:
    """Mono float32 samples in [-1, 1]: pitch and glide follow each segment's label."""
    rng = np.random.default_rng(seed)
    pitch = np.concatenate(
        [
            BASE_PITCH
            + PITCH_PER_POINT * s.label
            + GLIDE_PER_POINT * s.label * np.linspace(-1.0, 1.0, _count(s.seconds, sample_rate))
            for s in segments
        ]
    )
    t = np.arange(len(pitch)) / sample_rate
    # A slow wobble so the pitch track is not a ruler line, as in real speech.
    pitch = pitch + 2.0 * np.sin(2 * np.pi * rng.uniform(0.5, 1.0) * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate  # integrated, so pitch changes do not click
    tone = sum(amplitude * np.sin(k * phase) for k, amplitude in enumerate(HARMONICS, start=1))
    # Syllables: the voice is on for ~60 % of each ~1/4 s and silent between.
    syllables = np.sin(2 * np.pi * rng.uniform(3.5, 4.5) * t + rng.uniform(0, 2 * np.pi))
    envelope = np.clip((syllables + 0.3) / 1.3, 0.0, 1.0) ** 2
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.05)  # 50 ms in and out
    breath = rng.normal(0.0, 1.0, len(t))
    signal = fade * (envelope * (tone + 0.05 * breath) + 0.01 * breath)
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


# ---------------------------------------------------------------- encoding


def _write_video(
    path: Path, segments: Sequence[_Segment], *, seed: int, size: tuple[int, int], fps: int, face: bool, audio: bool
) -> None:
    """Encode the segments one after another into `path` (codecs by its suffix)."""
    try:
        container_format, video_codec, audio_codec = VIDEO_FORMATS[path.suffix.lower()]
    except KeyError:
        raise MMIMInputError(f"{path}: video files are {', '.join(VIDEO_FORMATS)}") from None
    width, height = size
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise MMIMInputError(f"size={size}: width and height must be even and positive (yuv420p)")

    samples = _voice(segments, seed=seed, sample_rate=AUDIO_RATE) if audio else None
    with _atomic(path) as partial, _open_output(partial, container_format) as container:
        video = container.add_stream(video_codec, rate=fps)
        if not isinstance(video, av.VideoStream):
            raise TypeError(f"{video_codec} is not a video codec")
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1  # the same bytes on any machine (module docstring)
        video.codec_context.gop_size = fps  # a keyframe a second, as streamed video has: spans seek
        # PyAV's stub types Stream.options dict[str, object]; it is the codec context's dict[str, str].
        video.options = VIDEO_OPTIONS[video_codec]  # type: ignore[assignment]
        sound = _AudioTrack(container, audio_codec, samples, AUDIO_RATE) if samples is not None else None
        for index, rgb in enumerate(_frames(segments, seed=seed, size=size, fps=fps, face=face)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
            if sound is not None:
                # Audio up to the end of this frame, so the file comes out interleaved.
                sound.encode_until(round((index + 1) * AUDIO_RATE / fps))
        container.mux(video.encode(None))
        if sound is not None:
            sound.finish()
    log.debug("wrote %s", path)


class _AudioTrack:
    """An audio stream and its samples, encoded a stretch at a time."""

    def __init__(
        self, container: av.container.OutputContainer, codec: str, samples: np.ndarray, sample_rate: int
    ) -> None:
        self.container, self.samples, self.sample_rate = container, samples, sample_rate
        stream = container.add_stream(codec, rate=sample_rate)
        if not isinstance(stream, av.AudioStream):
            raise TypeError(f"{codec} is not an audio codec")
        self.stream = stream
        self.stream.layout = "mono"
        if codec == "aac":
            self.stream.bit_rate = 48000  # plenty for a 16 kHz mono voice
        self.stream.codec_context.thread_count = 1
        self.encoded = 0  # samples handed to the encoder so far

    def encode_until(self, end: int) -> None:
        """Encode samples up to `end` in AUDIO_CHUNK frames (PyAV re-chunks for the codec)."""
        end = min(end, len(self.samples))
        while self.encoded < end:
            chunk = self.samples[self.encoded : min(end, self.encoded + AUDIO_CHUNK)]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self.encoded
            frame.time_base = Fraction(1, self.sample_rate)
            self.container.mux(self.stream.encode(frame))
            self.encoded += len(chunk)

    def finish(self) -> None:
        """Encode what is left and flush the encoder."""
        self.encode_until(len(self.samples))
        self.container.mux(self.stream.encode(None))


def _count(seconds: float, rate: float) -> int:
    """Frames or samples in `seconds` (rounded: 2.2 s at 25 fps is 55 frames, not 54)."""
    return int(round(seconds * rate))


def _check_clip(seconds: float, label: float) -> None:
    if not seconds >= MIN_SECONDS:
        raise MMIMInputError(f"seconds={seconds}: a recording lasts at least {MIN_SECONDS} s")
    if not -3.0 <= label <= 3.0:
        raise MMIMInputError(f"label={label}: sentiment labels lie in [-3, 3]")


def _open_output(path: Path, container_format: str) -> av.container.OutputContainer:
    # bitexact: no random Matroska segment id and no muxer version tag in the file.
    return av.open(str(path), "w", format=container_format, container_options={"fflags": "+bitexact"})


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside `path`, renamed to `path` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
