"""A recordings dataset on disk, in the layout MMSA-FET users keep:

    data/raw/<dataset>/
      label.csv                        video_id, clip_id, text, label, mode[, start, end]
      Raw/<video_id>/<clip_id>.<ext>   one file per clip
      Raw/<video_id>.<ext>             or one file per video, cut by the rows' start/end

`label` is the sentiment in [-3, 3]; `mode` is train, valid, test or empty. The example
id in the store is `<video_id>_<clip_id>`, as in the releases, so a clip_id holds no "_"
(the data checks read the video back from the id). A clip with
an empty mode takes the split of its video's other clips when they name one, else a
split drawn from a hash of `video_id`: all clips of a video stay together, and the split
of a video never changes when the dataset grows. A clip with `start`/`end` (seconds) is
that span of its file: `Raw/<video_id>/<clip_id>.<ext>` if there is one, else the
whole-video file `Raw/<video_id>.<ext>`.

Rows that cannot be used (no file, a label that is not a score, ...) are returned as
rejections with a reason rather than raised: one bad row must not stop a dataset.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from mmim.core.errors import MMIMInputError
from mmim.core.files import regular_file
from mmim.core.store import LABEL_RANGE, SPLITS

LABELS_FILE = "label.csv"
MEDIA_DIR = "Raw"
MEDIA_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".wav", ".flac")
REQUIRED_COLUMNS = ("video_id", "clip_id", "text", "label")
MAX_ID_BYTES = 200  # a video or clip id is a file name: 255 bytes at most on common file systems
# Where a video without a mode goes: the first split whose cumulative share exceeds its hash.
HASH_SPLIT_SHARES = (("train", 0.70), ("valid", 0.15), ("test", 0.15))


@dataclass(frozen=True)
class Clip:
    video_id: str
    clip_id: str
    text: str
    label: float
    split: str
    path: Path
    start: float | None = None  # seconds; None: from the beginning of the file
    end: float | None = None  # None: to its end

    @property
    def id(self) -> str:
        """The example id in the feature store, as for the community releases."""
        return f"{self.video_id}_{self.clip_id}"


@dataclass(frozen=True)
class Rejected:
    where: str  # "label.csv line 7 (video abc, clip 3)"
    clip_id: str  # the example id it would have had
    reason: str  # short and stable: the summary counts clips by it
    detail: str = ""


def hash_split(video_id: str) -> str:
    """A split for `video_id` that depends on nothing else, so it never changes."""
    position = int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:8], "big") / 2**64
    cumulative = 0.0
    for split, share in HASH_SPLIT_SHARES:
        cumulative += share
        if position < cumulative:
            return split
    return HASH_SPLIT_SHARES[-1][0]


def _number(text: str | None, column: str) -> float | None:
    """A finite number from a CSV cell; None for an empty cell."""
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text.strip()!r} is not a finite number")
    return value


def _media_file(root: Path, video_id: str, clip_id: str, is_span: bool) -> Path | None:
    """The file of a clip (see the module docstring), or None."""
    candidates = [root / MEDIA_DIR / video_id / clip_id]
    if is_span:
        candidates.append(root / MEDIA_DIR / video_id)
    for stem in candidates:
        for suffix in MEDIA_SUFFIXES:
            path = stem.with_name(stem.name + suffix)
            if path.is_file():
                return _inside(root, path)
            if path.is_symlink() or path.exists():
                raise ValueError(f"not a regular file: {path} is a directory, device, FIFO or dangling link")
    return None


def _inside(root: Path, path: Path) -> Path:
    """`path`, unless it is (or passes through) a link to somewhere outside the dataset."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"outside the dataset: {path} leads to {path.resolve()}; refusing to read it")
    return path


def _safe_name(value: str) -> bool:
    """A video or clip id usable as a file name inside Raw/ (no way out of it, and short enough
    for any file system with room for a suffix)."""
    return (
        bool(value)
        and value not in (".", "..")
        and "/" not in value
        and "\\" not in value
        and "\0" not in value
        and len(value.encode("utf-8", "replace")) <= MAX_ID_BYTES
    )


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.parent.is_dir():
        raise MMIMInputError(
            f"{path.parent}: not a directory (a recordings dataset holds {LABELS_FILE} and {MEDIA_DIR}/)"
        )
    try:
        with open(regular_file(path), newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise MMIMInputError(
                    f"{path}: missing column(s) {', '.join(missing)} "
                    f"(expected {', '.join(REQUIRED_COLUMNS)}, mode[, start, end])"
                )
            return list(reader)
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: missing (a recordings dataset needs {LABELS_FILE} and {MEDIA_DIR}/)") from None
    except UnicodeDecodeError:
        raise MMIMInputError(f"{path}: not UTF-8 text") from None
    except csv.Error as error:
        raise MMIMInputError(f"{path}: not a readable CSV ({error})") from None


def read_dataset(root: str | Path) -> tuple[list[Clip], list[Rejected]]:
    """Every usable clip of the dataset at `root`, in file order, and the rows rejected."""
    root = Path(root)
    rows = _read_rows(root / LABELS_FILE)
    modes = _video_modes(rows)
    clips: list[Clip] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        video_id, clip_id = (row.get("video_id") or "").strip(), (row.get("clip_id") or "").strip()
        where = f"{root / LABELS_FILE} line {line} (video {video_id!r}, clip {clip_id!r})"
        example_id = f"{video_id}_{clip_id}"
        try:
            clip = _clip(root, row, video_id, clip_id, modes)
        except ValueError as error:
            reason, _, detail = str(error).partition(": ")
            rejected.append(Rejected(where, example_id, reason, detail))
            continue
        if clip.id in seen:
            rejected.append(
                Rejected(where, example_id, "duplicate clip", "an earlier row has the same video and clip id")
            )
            continue
        seen.add(clip.id)
        clips.append(clip)
    return clips, rejected


def _video_modes(rows: list[dict[str, str]]) -> dict[str, str]:
    """The mode a video's rows name, for videos whose rows name exactly one."""
    named: dict[str, set[str]] = {}
    for row in rows:
        mode = (row.get("mode") or "").strip()
        if mode in SPLITS:
            named.setdefault((row.get("video_id") or "").strip(), set()).add(mode)
    return {video: next(iter(modes)) for video, modes in named.items() if len(modes) == 1}


def _clip(root: Path, row: dict[str, str], video_id: str, clip_id: str, modes: dict[str, str]) -> Clip:
    """The clip of one row; a ValueError's text is "reason: detail"."""
    if not (_safe_name(video_id) and _safe_name(clip_id)):
        raise ValueError(
            f"bad id: video_id and clip_id must be non-empty file names (no / or \\, at most {MAX_ID_BYTES} bytes)"
        )
    if "_" in clip_id:  # the store's id is <video_id>_<clip_id>; the video is read back from it
        raise ValueError("bad id: clip_id must not contain '_' (the example id is <video_id>_<clip_id>)")
    try:
        label = _number(row.get("label"), "label")
        start, end = _number(row.get("start"), "start"), _number(row.get("end"), "end")
    except ValueError as error:
        raise ValueError(f"bad label or span: {error}") from None
    if label is None or not LABEL_RANGE[0] <= label <= LABEL_RANGE[1]:
        shown = "empty" if label is None else f"{label:g}"
        raise ValueError(f"bad label or span: label {shown} is not a score in [{LABEL_RANGE[0]:g}, {LABEL_RANGE[1]:g}]")
    mode = (row.get("mode") or "").strip()
    if mode and mode not in SPLITS:
        raise ValueError(f"bad mode: {mode!r} is not one of {', '.join(SPLITS)} or empty")
    path = _media_file(root, video_id, clip_id, is_span=start is not None or end is not None)
    if path is None:
        whole = f" or {MEDIA_DIR}/{video_id}.<ext>" if start is not None or end is not None else ""
        raise ValueError(
            f"missing file: no {MEDIA_DIR}/{video_id}/{clip_id}.<ext>{whole} "
            f"(ext: {', '.join(s.lstrip('.') for s in MEDIA_SUFFIXES)})"
        )
    split = mode or modes.get(video_id) or hash_split(video_id)
    return Clip(video_id, clip_id, row.get("text") or "", label, split, path, start, end)
