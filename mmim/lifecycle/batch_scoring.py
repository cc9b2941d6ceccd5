"""Scoring a whole archive with a registered model: Ray Data over an actor pool, Parquet out,
and a rerun after a kill scores only what is missing.

    mmim score --model models:/mmim-synthetic@champion --input data/stores/synthetic --out scores.parquet

The input is a feature store (every split), a recordings dataset (label.csv + Raw/; each clip
featurised with the model's extractor) or a file of utterances: a JSON list as `mmim predict
--input` reads it, JSON Lines or CSV; text with audio and vision frames, or text with a
recording (an "id" is kept, else the line number). The alias is resolved once, so every row is scored by
the same version. Each actor of the pool (`workers`) loads that version once and scores
`batch_size` utterances at a time; each batch lands in `<out>.parts/` as its own Parquet file,
written under a temporary name and renamed. A rerun of the same model version on the same data
skips the rows the parts hold; at the end the parts become `out` (one file, renamed into place)
with the columns id, split, score, polarity, class7, model_version and data_version.

Figures compare only on the same data: `data_version` is the store's content version
(`manifest-<hash>`), or a SHA-256 over the file (or label.csv) and the media it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_write, read_json
from mmim.core.store import FeatureStore

if TYPE_CHECKING:  # imported by an actor with its first recording: OpenCV, dlib, openSMILE
    from mmim.data.recordings.scoring import RecordingFeaturizer
from mmim.registry.server import absolute_tracking_uri, local_checkpoint, model_version_uri

log = logging.getLogger(__name__)

COLUMNS = ["id", "split", "score", "polarity", "class7", "model_version", "data_version"]


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    rows: int
    scored: int  # this run
    already: int  # found in the parts of an interrupted run
    skipped: int  # rows of a recordings dataset that name no usable clip (logged)
    model_version: str
    data_version: str

    def __str__(self) -> str:
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (
            f"{self.out}: {self.rows} rows, {self.scored} scored now, {self.already} by an earlier run{skipped}\n"
            f"{self.model_version} on data {self.data_version}"
        )


# ---------------------------------------------------------------- the input's rows


def input_rows(source: Path) -> tuple[list[dict], list[str], str]:
    """(rows, what was skipped, data version). Every row has a unique "key", an "id" and a "split",
    and one of: "index" (a store's row), "utterance" (features, as JSON) or "recording" (a file's
    absolute path, with "text", "start" and "end")."""
    if (source / "manifest.json").is_file():
        store = FeatureStore(source)
        rows = [
            {"key": f"{name}/{id_}", "id": id_, "split": name, "index": index}
            for name, split in store.splits.items()
            for index, id_ in enumerate(split.ids)
        ]
        return rows, [], store.content_version
    if (source / "label.csv").is_file():
        return _recordings_dataset_rows(source)
    if not source.is_file():
        raise MMIMInputError(
            f"--input {source}: not a feature store (manifest.json), a recordings dataset (label.csv) or a file"
        )
    utterances = _utterances(source)
    rows = [_utterance_row(source, number, utterance) for number, utterance in enumerate(utterances, start=1)]
    if len({row["key"] for row in rows}) != len(rows):
        raise MMIMInputError(f"{source}: two utterances share an id")
    media = sorted({str(row["recording"]) for row in rows if "recording" in row})
    return rows, [], _content_version([source, *(Path(path) for path in media)])


def _recordings_dataset_rows(root: Path) -> tuple[list[dict], list[str], str]:
    from mmim.data.recordings.layout import read_dataset

    clips, rejected = read_dataset(root)
    rows = [
        {"key": clip.id, "id": clip.id, "split": clip.split, "recording": str(clip.path.resolve()), "text": clip.text}
        | {"start": clip.start, "end": clip.end}
        for clip in clips
    ]
    skipped = [f"{rejected.where}: {rejected.reason}" for rejected in rejected]
    return rows, skipped, _content_version([root / "label.csv", *sorted({clip.path for clip in clips})])


def _utterances(source: Path) -> list:
    """The utterances of a JSON list (as `mmim predict --input` reads it), JSON Lines or CSV."""
    if source.suffix == ".csv":
        import csv

        with open(source, newline="", encoding="utf-8", errors="replace") as handle:
            return list(csv.DictReader(handle))
    if source.suffix != ".jsonl":
        from mmim.training.predict import read_utterances

        return read_utterances(str(source))
    utterances = []
    for number, line in enumerate(source.read_text(errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                utterances.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise MMIMInputError(f"{source} line {number}: not valid JSON ({error.msg})") from None
    return utterances


def _utterance_row(source: Path, number: int, utterance) -> dict:
    """One utterance of a file: text with audio and vision frames (JSON text in a CSV cell), or
    text with a recording (a path relative to the file's directory)."""
    where = f"{source} utterance {number}"
    if not isinstance(utterance, dict) or "text" not in utterance:
        raise MMIMInputError(f"{where}: expected text with audio and vision, or text with recording")
    id_ = str(utterance.get("id") or number)
    row = {"key": id_, "id": id_, "split": ""}
    if utterance.get("recording"):
        path = (source.parent / str(utterance["recording"])).resolve()
        if not path.is_file():
            raise MMIMInputError(f"{where}, field recording: {path}: no such file")
        return row | {"recording": str(path), "text": utterance["text"], "start": None, "end": None}
    if not {"audio", "vision"} <= set(utterance):
        raise MMIMInputError(f"{where}: expected text with audio and vision, or text with recording")
    if source.suffix == ".csv":  # frames as JSON text in their cells
        try:
            utterance = utterance | {field: json.loads(utterance[field]) for field in ("audio", "vision")}
        except json.JSONDecodeError as error:
            raise MMIMInputError(f"{where}: audio and vision must be JSON lists of frames ({error.msg})") from None
    return row | {"utterance": json.dumps(utterance)}


def _content_version(paths: list[Path]) -> str:
    """sha256-<16 hex> over the bytes of `paths`, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return f"sha256-{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------- one actor of the pool


class BatchScorer:
    """Loads the model version once; each call scores a batch of rows and writes it as one part."""

    def __init__(self, model_uri: str, tracking_uri: str, parts: str, stamp: dict, store: str) -> None:
        from mmim.training.checkpoint import load_checkpoint

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        with local_checkpoint(model_uri) as checkpoint:
            self.model, config, self.tokenizer = load_checkpoint(checkpoint)
        self.extractor = config.model.extractor  # what featurises its recordings
        self.recordings: RecordingFeaturizer | None = None  # started with the first recording
        self.parts, self.stamp, self.store_path = Path(parts), stamp, store
        self.store: FeatureStore | None = None  # opened with the first batch from a store

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from mmim.training.predict import sentiment_classes

        scores = self._scores(batch)
        table = pd.DataFrame(
            {
                "key": batch["key"].tolist(),
                "id": batch["id"].tolist(),
                "split": batch["split"].tolist(),
                "score": scores,
                "polarity": [sentiment_classes(score)["polarity"] for score in scores],
                "class7": [sentiment_classes(score)["class7"] for score in scores],
                **{name: [value] * len(batch) for name, value in self.stamp.items()},
            }
        )
        partial = self.parts / f".{uuid.uuid4().hex}.partial"
        table.to_parquet(partial, index=False)
        partial.rename(self.parts / f"part-{uuid.uuid4().hex}.parquet")  # a part is whole or absent
        return table[["key"]]

    def _scores(self, batch: pd.DataFrame) -> list[float]:
        from mmim.training.predict import predict_utterances

        if "index" in batch.columns:
            return self._store_scores(batch)
        if "utterance" in batch.columns:
            utterances = [json.loads(text) for text in batch["utterance"]]
        else:
            utterances = self._featurized(batch)
        return [row["score"] for row in predict_utterances(self.model, self.tokenizer, utterances)]

    def _featurized(self, batch: pd.DataFrame) -> list[dict]:
        from mmim.data.recordings.scoring import RecordingFeaturizer

        if self.recordings is None:
            self.recordings = RecordingFeaturizer()
        rows = [
            (row.recording, row.text, f"{row.id} ({row.recording})", _seconds(row.start), _seconds(row.end))
            for row in batch.itertuples(index=False)
        ]
        return self.recordings(self.extractor, rows)

    def _store_scores(self, batch: pd.DataFrame) -> list[float]:
        from mmim.core.batches import make_loader
        from mmim.training.predict import predict_scores

        if self.store is None:
            self.store = FeatureStore(self.store_path)
        scores = pd.Series(0.0, index=batch.index)
        for name, rows in batch.groupby("split"):
            indices = rows["index"].tolist()  # a list of indices serves as the loader's sampler
            loader = make_loader(self.store[str(name)], len(rows), shuffle=False, sampler=indices)
            predicted, _ = predict_scores(self.model, loader, next(self.model.parameters()).device)
            scores[rows.index] = predicted
        return scores.tolist()


def _seconds(value) -> float | None:
    """A span's bound as Ray Data hands it over: None or NaN for none."""
    return None if value is None or pd.isna(value) else float(value)


# ---------------------------------------------------------------- the job


def score_archive(
    model: str,
    source: Path,
    out: Path,
    *,
    workers: int = 1,
    batch_size: int = 64,
    ray_address: str | None = None,
    advance: Callable[[int], None] = lambda rows: None,
) -> ScoreSummary:
    """Score every row of `source` with `model` into the Parquet file `out` (see the module's text)."""
    if workers < 1 or batch_size < 1:
        raise MMIMInputError(f"--workers {workers} --batch-size {batch_size}: expected at least 1 each")
    if out.suffix != ".parquet" or not out.parent.is_dir():
        raise MMIMInputError(f"--out {out}: expected a .parquet file in an existing directory")
    rows, skipped, data_version = input_rows(source)
    for line in skipped[:20]:
        log.warning("skipped %s", line)
    version_uri = model_version_uri(model)  # the alias, resolved once
    stamp = {"model_version": version_uri, "data_version": data_version}
    parts = out.with_name(out.name + ".parts")
    done = _resume(parts, {**stamp, "input": str(source.resolve())})
    todo = [row for row in rows if row["key"] not in done]
    log.info("%d rows, %d scored already; scoring %d with %s", len(rows), len(done), len(todo), version_uri)
    if todo:
        scorer: dict[str, object] = {
            "model_uri": version_uri,
            "tracking_uri": absolute_tracking_uri(),
            "parts": str(parts),
        }
        scorer |= {"stamp": stamp, "store": str(source.resolve())}
        _run_pool(todo, scorer, workers, batch_size, ray_address, advance)
    table = pd.concat([pd.read_parquet(path) for path in sorted(parts.glob("part-*.parquet"))], ignore_index=True)
    table = table.drop_duplicates("key")  # an interrupted run's actor may finish a batch after the rerun began
    order = {row["key"]: position for position, row in enumerate(rows)}
    table = table.sort_values("key", key=lambda keys: keys.map(order)).drop(columns="key")
    partial = out.with_name(f".{out.name}.partial")
    table[COLUMNS].to_parquet(partial, index=False)
    partial.rename(out)
    shutil.rmtree(parts)
    return ScoreSummary(out, len(rows), len(todo), len(done), len(skipped), version_uri, data_version)


def _resume(parts: Path, run: dict) -> set[str]:
    """The keys an interrupted run of the same model version on the same input scored; parts of
    another run are removed."""
    if (parts / "run.json").is_file() and read_json(parts / "run.json") == run:
        return {key for path in parts.glob("part-*.parquet") for key in pd.read_parquet(path, columns=["key"])["key"]}
    if parts.exists():
        log.info("%s holds another run's parts: starting over", parts)
        shutil.rmtree(parts)
    parts.mkdir()
    atomic_write(parts / "run.json", json.dumps(run))
    return set()


def _run_pool(todo: list[dict], scorer: dict, workers: int, batch_size: int, ray_address: str | None, advance) -> None:
    """The rows through a pool of `workers` BatchScorer actors, `batch_size` rows a call."""
    import ray

    from mmim.cluster.connect import connect, quiet_ray_data

    connect(ray_address)
    quiet_ray_data(log)
    dataset = ray.data.from_items(todo).map_batches(
        BatchScorer,
        fn_constructor_kwargs=scorer,
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
        advance(len(batch))
