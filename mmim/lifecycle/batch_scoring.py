"""Scoring a whole archive with a registered model: Ray Data over an actor pool, Parquet out,
and a rerun after a kill scores only what is missing.

    mmim score --model models:/mmim-synthetic@champion --input data/stores/synthetic --out scores.parquet

The input is a feature store (every split) or a file of utterances: a JSON list as `mmim
predict --input` reads it, or JSON Lines, one utterance per line (text, audio, vision; an
"id" is kept, else the line number). The alias is resolved once, so every row is scored by
the same version. Each actor of the pool (`workers`) loads that version once and scores
`batch_size` utterances at a time; each batch lands in `<out>.parts/` as its own Parquet file,
written under a temporary name and renamed. A rerun of the same model version on the same data
skips the rows the parts hold; at the end the parts become `out` (one file, renamed into place)
with the columns id, split, score, polarity, class7, model_version and data_version.

Figures compare only on the same data: `data_version` is the store's content version
(`manifest-<hash>`) or the input file's SHA-256.
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

import pandas as pd

from mmim.core.errors import MMIMInputError
from mmim.core.files import atomic_write, read_json
from mmim.core.store import FeatureStore
from mmim.registry.server import absolute_tracking_uri, local_checkpoint, model_version_uri

log = logging.getLogger(__name__)

COLUMNS = ["id", "split", "score", "polarity", "class7", "model_version", "data_version"]


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    rows: int
    scored: int  # this run
    already: int  # found in the parts of an interrupted run
    model_version: str
    data_version: str

    def __str__(self) -> str:
        return (
            f"{self.out}: {self.rows} rows ({self.scored} scored now, {self.already} by an earlier run), "
            f"{self.model_version} on {self.data_version}"
        )


# ---------------------------------------------------------------- the input's rows


def input_rows(source: Path) -> tuple[list[dict], str]:
    """(rows, data version): a store's rows name their split and index, a file's rows carry the
    utterance. Every row has a unique "key"."""
    if (source / "manifest.json").is_file():
        store = FeatureStore(source)
        rows = [
            {"key": f"{name}/{id_}", "id": id_, "split": name, "index": index}
            for name, split in store.splits.items()
            for index, id_ in enumerate(split.ids)
        ]
        return rows, store.content_version
    if not source.is_file():
        raise MMIMInputError(f"--input {source}: neither a feature store (no manifest.json) nor a file")
    data = source.read_bytes()
    if source.suffix == ".jsonl":
        utterances = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    utterances.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise MMIMInputError(f"{source} line {number}: not valid JSON ({error.msg})") from None
    else:
        from mmim.training.predict import read_utterances

        utterances = read_utterances(str(source))
    rows = []
    for number, utterance in enumerate(utterances, start=1):
        if not isinstance(utterance, dict) or not {"text", "audio", "vision"} <= set(utterance):
            raise MMIMInputError(f"{source} utterance {number}: expected an object with text, audio and vision")
        id_ = str(utterance.get("id", number))
        rows.append({"key": id_, "id": id_, "split": "", "utterance": json.dumps(utterance)})
    if len({row["key"] for row in rows}) != len(rows):
        raise MMIMInputError(f"{source}: two utterances share an id")
    return rows, f"sha256-{hashlib.sha256(data).hexdigest()[:16]}"


# ---------------------------------------------------------------- one actor of the pool


class BatchScorer:
    """Loads the model version once; each call scores a batch of rows and writes it as one part."""

    def __init__(self, model_uri: str, tracking_uri: str, parts: str, stamp: dict, store: str) -> None:
        from mmim.training.checkpoint import load_checkpoint

        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        with local_checkpoint(model_uri) as checkpoint:
            self.model, _, self.tokenizer = load_checkpoint(checkpoint)
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

        if "utterance" in batch.columns:
            utterances = [json.loads(text) for text in batch["utterance"]]
            return [row["score"] for row in predict_utterances(self.model, self.tokenizer, utterances)]
        return self._store_scores(batch)

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
    rows, data_version = input_rows(source)
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
    return ScoreSummary(out, len(rows), len(todo), len(done), version_uri, data_version)


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
