"""The MMSA release: `unaligned_50.pkl` / `aligned_50.pkl`.

    {"train" | "valid" | "test": {
        "raw_text": (N,) str          the utterance
        "audio": (N, Ta, Da), "vision": (N, Tv, Dv)   padded at the back
        "audio_lengths", "vision_lengths": (N,)        unaligned only
        "id": (N,) "video$_$clip"
        "regression_labels": (N,) float
        ("text", "text_bert", "annotations", "classification_labels": not read)}}

Aligned files carry no lengths: a sequence then ends at its last non-zero frame.
COVAREP audio contains -inf values; they go through the NaN/inf policy of extraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.store import SPLITS
from mmim.data.formats import as_text, padded_sequences, sentiment_labels, split_dict
from mmim.data.store_writer import SourceSplit
from mmim.data.untrusted_pickle import load_untrusted_pickle

REQUIRED = ("raw_text", "audio", "vision", "id", "regression_labels")


def read_mmsa(input_path: str | Path) -> dict[str, SourceSplit]:
    path = Path(input_path)
    if path.is_dir():
        pickles = sorted(path.glob("*.pkl"))
        if len(pickles) != 1:
            raise MMIMInputError(f"{path}: expected exactly one .pkl file, found {len(pickles)}")
        path = pickles[0]
    data = load_untrusted_pickle(path)
    splits = {}
    for name in SPLITS:
        raw = split_dict(data, name, str(path), REQUIRED)
        where = f"{path}: split {name}"
        sequences = {
            modality: padded_sequences(
                raw[modality], raw.get(f"{modality}_lengths"), "back", f"{where}, field {modality}"
            )
            for modality in ("audio", "vision")
        }
        ids = [as_text(value).replace("$_$", "_") for value in np.asarray(raw["id"]).reshape(-1)]
        texts = [as_text(value) for value in np.asarray(raw["raw_text"]).reshape(-1)]
        labels = sentiment_labels(raw["regression_labels"], f"{where}, field regression_labels")
        splits[name] = SourceSplit(
            origin=str(path), ids=ids, texts=texts, labels=labels, audio=sequences["audio"], vision=sequences["vision"]
        )
    return splits
