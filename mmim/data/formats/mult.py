"""The MulT / official-MMIM release: a pickle of splits plus a label CSV with the words.

    mosi_data_noalign.pkl      {"train" | "valid" | "test": {
                                   "text":   (N, 50, 300) GloVe (not read: we tokenize the words)
                                   "audio":  (N, Ta, Da) float, front-padded with zero rows
                                   "vision": (N, Tv, Dv) float, front-padded with zero rows
                                   "labels": (N, 1, 1) float (MOSEI emotions: (N, 1, 7), sentiment first)
                                   "id":     (N, k) bytes or str}}
    MOSI-label.csv             video_id, clip_id, text, ...

MOSI unaligned is (375, 5) audio and (500, 20) vision; MOSEI (500, 74) and (500, 35).
A sequence's length is the number of frames after its leading all-zero rows (the
reference code counts zero rows anywhere; a silent frame inside a sequence would cut
real frames off its start there, not here).

Words are matched to examples by id (`<video_id>_<clip_id>`). Where the pickle's ids
do not name clips at all, the rows are matched in order, as the reference code does
for MOSEI, and every row is checked against the video id the pickle does carry.
"""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_directory, regular_file
from mmim.core.store import SPLITS
from mmim.data.formats import as_text, padded_sequences, sentiment_labels, split_dict
from mmim.data.store_writer import Sequences, SourceSplit
from mmim.data.untrusted_pickle import load_untrusted_pickle

_BRACKETED = re.compile(r"^(?P<video>.+)\[(?P<clip>\d+)\]$")  # "video[3]"

# The release's `text` field: per example, 50 words of 300-dim GloVe vectors. The reader never
# uses it (the model tokenizes the raw sentences of the label CSV for its own text encoder), so
# the writer fills it with zeros: the schema is the release's, the values carry nothing.
GLOVE_WORDS, GLOVE_DIM = 50, 300


def find_files(input_path: Path, labels: Path | None) -> tuple[Path, Path]:
    """(pickle, label CSV) from a file or a directory holding exactly one of each."""
    if input_path.is_dir():
        pickles = sorted(input_path.glob("*.pkl"))
        if len(pickles) != 1:
            raise MMIMInputError(f"{input_path}: expected exactly one .pkl file, found {len(pickles)}")
        input_path = pickles[0]
    if labels is None:
        candidates = sorted(input_path.parent.glob("*label*.csv"))
        if len(candidates) != 1:
            raise MMIMInputError(
                f"{input_path.parent}: expected exactly one *label*.csv beside "
                f"{input_path.name}, found {len(candidates)} (pass --labels)"
            )
        labels = candidates[0]
    return input_path, labels


def read_label_csv(path: Path) -> list[tuple[str, str, str]]:
    """(video_id, clip_id, text) rows, in file order."""
    try:
        with open(regular_file(path), newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"video_id", "clip_id", "text"} - set(reader.fieldnames or [])
            if missing:
                raise MMIMInputError(f"{path}: column(s) {', '.join(sorted(missing))} missing")
            return [(row["video_id"].strip(), row["clip_id"].strip(), row["text"]) for row in reader]
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise MMIMInputError(f"{path}: not a readable CSV ({error})") from None


def example_ids(raw, where: str) -> list[str]:
    """`<video>_<clip>` ids from an (N,), (N, 1) or (N, k) array of bytes/str."""
    array = np.asarray(raw)
    if array.ndim == 0 or array.ndim > 2:
        raise MMIMInputError(f"{where}: id has shape {array.shape}, expected (N,) or (N, k)")
    first = array if array.ndim == 1 else array[:, 0]
    second = array[:, 1] if array.ndim == 2 and array.shape[1] > 1 else None
    ids = []
    for index, value in enumerate(first):
        text = as_text(value).strip()
        bracketed = _BRACKETED.match(text)
        if bracketed:
            text = f"{bracketed['video']}_{bracketed['clip']}"
        elif second is not None and as_text(second[index]).strip().isdigit():
            text = f"{text}_{as_text(second[index]).strip()}"
        ids.append(text)
    return ids


def match_rows(
    ids: list[str], rows: list[tuple[str, str, str]], csv_path: Path, pickle_path: Path
) -> tuple[list[str], list[str]]:
    """(ids, texts) for the pickle's examples, in order, from the CSV rows."""
    by_id = {f"{video}_{clip}": text for video, clip, text in rows}
    if any(example_id in by_id for example_id in ids):
        for index, example_id in enumerate(ids):
            if example_id not in by_id:
                raise MMIMInputError(
                    f"{pickle_path}: example {example_id!r} (index {index} over all splits) has no row in {csv_path}"
                )
        return ids, [by_id[example_id] for example_id in ids]
    # No id names a clip: match by row order, checking the video ids the pickle carries.
    if len(rows) != len(ids):
        raise MMIMInputError(
            f"{pickle_path}: ids do not name clips and {csv_path} has {len(rows)} rows "
            f"for {len(ids)} examples; cannot match words to examples"
        )
    for index, (example_id, (video, _clip, _text)) in enumerate(zip(ids, rows)):
        if video not in example_id:
            raise MMIMInputError(
                f"{pickle_path}: example {index} is {example_id!r} but row {index + 2} of "
                f"{csv_path} is video {video!r}; pickle and CSV disagree"
            )
    return [f"{video}_{clip}" for video, clip, _ in rows], [text for _, _, text in rows]


def read_mult(input_path: str | Path, labels: str | Path | None = None) -> dict[str, SourceSplit]:
    pickle_path, csv_path = find_files(Path(input_path), Path(labels) if labels else None)
    data = load_untrusted_pickle(pickle_path)
    splits_raw = {
        name: split_dict(data, name, str(pickle_path), ("audio", "vision", "labels", "id")) for name in SPLITS
    }
    raw_ids = {
        name: example_ids(raw["id"], f"{pickle_path}: split {name}, field id") for name, raw in splits_raw.items()
    }
    all_ids, all_texts = match_rows(
        [i for name in SPLITS for i in raw_ids[name]], read_label_csv(csv_path), csv_path, pickle_path
    )
    splits, start = {}, 0
    for name, raw in splits_raw.items():
        stop = start + len(raw_ids[name])
        ids, texts, start = all_ids[start:stop], all_texts[start:stop], stop
        where = f"{pickle_path}: split {name}"
        sequences = {
            modality: padded_sequences(raw[modality], None, "front", f"{where}, field {modality}")
            for modality in ("audio", "vision")
        }
        splits[name] = SourceSplit(
            origin=str(pickle_path),
            ids=ids,
            texts=texts,
            labels=sentiment_labels(raw["labels"], f"{where}, field labels"),
            audio=sequences["audio"],
            vision=sequences["vision"],
        )
    return splits


def _front_pad(sequences: Sequences) -> np.ndarray:
    frames = max(sequences.length(i) for i in range(len(sequences)))
    padded = np.zeros((len(sequences), frames, sequences.dim), dtype=np.float32)
    for row in range(len(sequences)):
        padded[row, frames - sequences.length(row) :] = sequences[row]
    return padded


def write_mult(directory: str | Path, name: str, splits: dict[str, SourceSplit]) -> Path:
    """Write splits in this format (`<name>_data_noalign.pkl` + `<name>-label.csv`), with every
    field of the release, `text` included (zeros: see GLOVE_WORDS). Used for the synthetic sample.
    """
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        data, rows = {}, []
        for split_name in SPLITS:
            split = splits[split_name]
            data[split_name] = {
                "text": np.zeros((len(split.ids), GLOVE_WORDS, GLOVE_DIM), dtype=np.float32),
                "audio": _front_pad(split.audio),
                "vision": _front_pad(split.vision),
                "labels": np.asarray(split.labels, dtype=np.float32).reshape(-1, 1, 1),
                "id": np.array([[i.encode()] for i in split.ids]),
            }
            for example_id, text, label in zip(split.ids, split.texts, split.labels):
                video, clip = example_id.rsplit("_", 1)
                rows.append((video, clip, text, f"{label:.1f}", split_name))
        with open(staging / f"{name}_data_noalign.pkl", "wb") as handle:
            pickle.dump(data, handle, protocol=4)
        with open(staging / f"{name}-label.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["video_id", "clip_id", "text", "label", "mode"])
            writer.writerows(rows)
    return directory
