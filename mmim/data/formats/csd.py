"""CMU-MultimodalSDK computational sequences (.csd files, HDF5).

A .csd file holds one modality for many videos:

    /<root>/data/<video_id>/features    (T, D)   per-frame features (words: (T, 1) bytes)
    /<root>/data/<video_id>/intervals   (T, 2)   start and end time of each frame, seconds
    /<root>/metadata/...                        descriptive strings (not read)

The input directory holds four of them, recognised by name: the words
(`*Words*.csd`), acoustic features (`*COVAREP*.csd` or `*Acoustic*.csd`), visual
features (`*Facet*.csd`, `*FACET*.csd`, `*OpenFace*.csd` or `*Visual*.csd`) and the
opinion-segment labels (`*Label*.csd`: one row per segment, sentiment first). One
example is one labelled segment: `<video_id>_<n>` for the n-th segment (1-based,
by start time). Its words and frames are those whose midpoint falls inside the
segment's interval; "sp" (speech pause) tokens are left out of the text.

Splits come from a folds file: `{"train": [video ids], "valid": [...], "test": [...]}`.
`--folds cmu_mosi` uses the SDK's standard CMU-MOSI folds shipped with mmim.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import regular_file
from mmim.core.store import SPLITS
from mmim.data.formats import as_text, numeric_array
from mmim.data.store_writer import SequenceList, SourceSplit

STANDARD_FOLDS = {"cmu_mosi": Path(__file__).parent / "folds" / "cmu_mosi.json"}
PATTERNS = {
    "words": ("*Words*.csd",),
    "audio": ("*COVAREP*.csd", "*Acoustic*.csd"),
    "vision": ("*Facet*.csd", "*FACET*.csd", "*OpenFace*.csd", "*Visual*.csd"),
    "labels": ("*Label*.csd",),
}
PAUSE_TOKENS = {"sp", "SP"}


def _find(directory: Path, modality: str) -> Path:
    found = sorted({p for pattern in PATTERNS[modality] for p in directory.glob(pattern)})
    if len(found) != 1:
        raise MMIMInputError(
            f"{directory}: expected one {modality} .csd file ({' or '.join(PATTERNS[modality])}), found {len(found)}"
        )
    return found[0]


def read_folds(folds: str | Path | None, directory: Path) -> dict[str, list[str]]:
    if folds is None:
        path = directory / "folds.json"
    else:
        path = STANDARD_FOLDS.get(str(folds), Path(folds))
    try:
        data = json.loads(regular_file(path).read_text())
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: folds file not found (pass --folds FILE or cmu_mosi)") from None
    except json.JSONDecodeError:
        raise MMIMInputError(f"{path}: not valid JSON") from None
    missing = [name for name in SPLITS if not isinstance(data.get(name), list)]
    if missing:
        raise MMIMInputError(f"{path}: fold(s) {', '.join(missing)} missing (need lists of video ids)")
    return {name: [str(v) for v in data[name]] for name in SPLITS}


class _Sequence:
    """One .csd file, opened read-only; videos are read on demand."""

    def __init__(self, path: Path):
        import h5py  # only needed for this format

        self.path = path
        try:
            self.handle = h5py.File(regular_file(path), "r")
        except OSError as error:
            raise MMIMInputError(f"{path}: not a readable HDF5 computational sequence ({error})") from None
        self._refuse_data_from_elsewhere(h5py)
        roots = list(self.handle.keys())
        if len(roots) != 1 or "data" not in self.handle[roots[0]]:
            raise MMIMInputError(f"{path}: expected one root group with a 'data' group, found {roots}")
        self.data = self.handle[roots[0]]["data"]

    def _refuse_data_from_elsewhere(self, h5py) -> None:
        """HDF5 can make an object of this file read another file (external links, external
        storage, virtual datasets): bytes of any local file would end up in the store. A .csd
        file holds its data itself, so only plain (hard) links and contiguous data pass."""

        def problem(name: str, link) -> str | None:  # a message stops the visit
            if not isinstance(link, h5py.HardLink):
                return f"/{name} is a {type(link).__name__}"
            item = self.handle[name]
            if isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
                return f"/{name} reads its data from other files (external storage or a virtual dataset)"
            return None

        found = self.handle.visititems_links(problem)
        if found:
            self.handle.close()
            raise MMIMInputError(f"{self.path}: {found}; refused (a .csd file must hold its data itself)")

    def video(self, video_id: str, numeric: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(features, intervals) of a video, checked to be numbers (the features of the words
        are text: `numeric=False`), so that text never reaches `astype(np.float32)`."""
        if video_id not in self.data:
            raise MMIMInputError(f"{self.path}: video {video_id!r} missing")
        group = self.data[video_id]
        try:
            features, intervals = group["features"][()], group["intervals"][()]
        except KeyError as error:
            raise MMIMInputError(f"{self.path}: video {video_id!r} lacks {error}") from None
        where = f"{self.path}: video {video_id!r}"
        numeric_array(intervals, f"{where}, intervals")
        if numeric:
            numeric_array(features, f"{where}, features")
            if features.ndim != 2 or features.shape[1] == 0:
                raise MMIMInputError(f"{where}, features: shape {features.shape}, expected (frames, dim)")
        if intervals.ndim != 2 or intervals.shape != (len(features), 2):
            raise MMIMInputError(
                f"{self.path}: video {video_id!r}: intervals {intervals.shape} do not match features {features.shape}"
            )
        return features, intervals

    def close(self) -> None:
        self.handle.close()


def _inside(intervals: np.ndarray, start: float, end: float) -> np.ndarray:
    middle = intervals.mean(axis=1)
    return (middle >= start) & (middle <= end)


def read_csd(input_path: str | Path, folds: str | Path | None = None) -> dict[str, SourceSplit]:
    directory = Path(input_path)
    if not directory.is_dir():
        raise MMIMInputError(f"{directory}: expected a directory of .csd files")
    fold_ids = read_folds(folds, directory)
    sequences = {modality: _Sequence(_find(directory, modality)) for modality in PATTERNS}
    try:
        splits = {}
        for name in SPLITS:
            ids, texts, labels, audio, vision = [], [], [], [], []
            for video_id in fold_ids[name]:
                segment_labels, segment_intervals = sequences["labels"].video(video_id)
                words, word_intervals = sequences["words"].video(video_id, numeric=False)
                audio_frames, audio_intervals = sequences["audio"].video(video_id)
                vision_frames, vision_intervals = sequences["vision"].video(video_id)
                for number, segment in enumerate(np.argsort(segment_intervals[:, 0], kind="stable"), 1):
                    start, end = segment_intervals[segment]
                    tokens = [as_text(w) for w in words[_inside(word_intervals, start, end)].reshape(-1)]
                    ids.append(f"{video_id}_{number}")
                    texts.append(" ".join(t for t in tokens if t not in PAUSE_TOKENS))
                    labels.append(float(np.asarray(segment_labels[segment]).reshape(-1)[0]))
                    audio.append(audio_frames[_inside(audio_intervals, start, end)].astype(np.float32))
                    vision.append(vision_frames[_inside(vision_intervals, start, end)].astype(np.float32))
            if not ids:  # no SequenceList (nor its dim) can be made of nothing
                raise MMIMInputError(
                    f"{sequences['labels'].path}: split {name} has no examples (no labelled "
                    f"segments in its {len(fold_ids[name])} fold video(s))"
                )
            origin = ", ".join(str(s.path) for s in sequences.values())
            splits[name] = SourceSplit(
                origin=origin,
                ids=ids,
                texts=texts,
                labels=np.asarray(labels, dtype=np.float32),
                audio=SequenceList(audio, _dim(audio, sequences["audio"].path)),
                vision=SequenceList(vision, _dim(vision, sequences["vision"].path)),
            )
        return splits
    finally:
        for sequence in sequences.values():
            sequence.close()


def _dim(sequences: list[np.ndarray], path: Path) -> int:
    dims = {s.shape[1] for s in sequences if s.ndim == 2}
    if len(dims) != 1 or any(s.ndim != 2 for s in sequences):
        raise MMIMInputError(f"{path}: features of different dims across videos: {sorted(dims)}")
    return dims.pop()
