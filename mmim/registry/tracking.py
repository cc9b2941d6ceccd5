"""MLflow adapter: one run per training job, logged from the driver while it trains.

params     the flattened, validated config (model.*, data.*, train.*, ray.*)
tags       git commit, data version, source format, text encoder, Ray workers and GPUs
metrics    every epoch (step = epoch): stage0_neg_lld, stage1_{loss,task,nce,lld,H},
           lr_{bert,main,mmilb}, {valid,test}_{MAE,Corr,Acc-7,Acc-5,Acc-2_*,F1_*};
           then selected_{valid,test}_* for the epoch chosen on validation
artifacts  config.json, metrics.json, learning_curves.png, test_scatter.png,
           data_profile.json (the labels of each split: the next data version's drift
           check compares with it), and the pyfunc model "model" (its
           artifacts/checkpoint: weights, config, tokenizer)
gate       the run's model and the registry's champion scored on the run's data
           (mmim.registry.gating): tags gate.*, metrics eval_<split>_* and champion_<split>_*
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from mmim.core.config import Config  # noqa: E402
from mmim.core.errors import MMIMInputError, first_line  # noqa: E402
from mmim.core.store import FeatureStore  # noqa: E402
from mmim.data.checks import LabelProfile  # noqa: E402
from mmim.data.versioning import STORES_DIR, data_version, local_store  # noqa: E402
from mmim.registry.gating import HeadToHead, head_to_head  # noqa: E402
from mmim.registry.server import dataset_name, registered_model_name, tracking_uri  # noqa: E402
from mmim.registry.serving import model_signature  # noqa: E402
from mmim.registry.versions import Decision, champion_version, register  # noqa: E402
from mmim.training.predict import predict_checkpoint  # noqa: E402
from mmim.training.train import TrainingResult  # noqa: E402

# MLflow 3's UI opens an experiment without this tag on its GenAI overview; with it, on the runs.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")
DATA_PROFILE = "data_profile.json"  # the run's LabelProfile

log = logging.getLogger(__name__)


@dataclass
class TrackedRun:
    run_id: str
    model_uri: str  # models:/m-... (MLflow 3's logged model)
    experiment_id: str
    data_version: str  # of the store it trained on


def flatten(config: Config) -> dict[str, str]:
    params = {}
    for section, values in config.model_dump().items():
        if isinstance(values, dict):
            params.update({f"{section}.{key}": str(value) for key, value in values.items()})
        else:
            params[section] = str(values)
    return params


def store_data_version(config: Config) -> str | None:
    """The DVC data version of `data/stores/<name>` in this working directory, if it has one."""
    root = Path.cwd()
    try:
        relative = Path(config.data.store).resolve().relative_to(root / STORES_DIR)
    except ValueError:
        return None
    if len(relative.parts) != 1:
        return None
    try:
        return data_version(relative.parts[0], root)
    except MMIMInputError:
        return None  # not a DVC output (yet): named by its manifest (FeatureStore.content_version)


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parents[2],
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def ensure_experiment(config: Config) -> str:
    """The experiment's id; created here, by the driver, with an explicit artifact location."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    location = config.tracking.artifact_location or Path("mlartifacts").resolve().as_uri()
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return mlflow.create_experiment(
        config.tracking.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )


def _learning_curves(path: Path, epochs: list[dict]) -> None:
    steps = [int(e["epoch"]) for e in epochs]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [e["stage1_loss"] for e in epochs], marker="o", label="stage 1 loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for split in ("valid", "test"):
        axes[1].plot(steps, [e[f"{split}_MAE"] for e in epochs], marker="o", label=f"{split} MAE")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _test_scatter(path: Path, predictions: np.ndarray, truths: np.ndarray) -> None:
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(truths, predictions, s=6, alpha=0.5)
    axis.plot([-3, 3], [-3, 3], color="grey", linewidth=1)
    axis.set_xlabel("true sentiment")
    axis.set_ylabel("predicted")
    axis.set_title("test split, selected epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def input_example(store: FeatureStore, texts: list[str]) -> pd.DataFrame:
    """Two rows shaped like real requests, from the store's test split."""
    split = store["test"]
    return pd.DataFrame(
        {
            "text": texts,
            "audio": [split.sequence("audio", i)[:4].tolist() for i in range(len(texts))],
            "vision": [split.sequence("vision", i)[:4].tolist() for i in range(len(texts))],
        }
    )


class TrainingRun:
    """One MLflow run per training job, open from before the first epoch to the logged model.

    Started by the driver before training starts, so the run's duration is the training's
    and the UI shows each epoch as it is reported; `tracked_run` marks it FAILED when
    training raises. The model is logged after training, possibly by another process that
    attaches to the run by id (the pipeline's log_model step). All writes name the run id
    (no active-run state), so `log_epoch` may be called from another thread of the driver
    (Ray reports arrive on one).
    """

    def __init__(self, config: Config, run_id: str, experiment_id: str, data_version: str):
        self.config, self.run_id, self.experiment_id, self.data_version = config, run_id, experiment_id, data_version
        self.store = FeatureStore(local_store(config.data), verify_checksums=False)
        self.client = MlflowClient(tracking_uri())

    @classmethod
    def start(cls, config: Config, *, data_version: str | None = None, tags: dict[str, str] | None = None):
        """A new run: tags, the flattened config as params, the data's label profile."""
        store = FeatureStore(local_store(config.data), verify_checksums=False)
        experiment_id = ensure_experiment(config)
        data_version = data_version or store_data_version(config) or store.content_version
        tags = {
            **(tags or {}),
            "git_commit": git_commit(),
            "data_version": data_version,
            "source_format": store.manifest.get("source", "unknown"),
            "text_encoder": config.model.text_encoder,
            "ray_workers": str(config.ray.num_workers),
            "gpus": str(config.ray.num_workers if config.ray.use_gpu else 0),
            "dataset": dataset_name(config),
        }
        client = MlflowClient(tracking_uri())
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(config).items()])
        client.log_dict(run_id, LabelProfile.of(store, data_version).model_dump(), DATA_PROFILE)
        return cls(config, run_id, experiment_id, data_version)

    @classmethod
    def attach(cls, config: Config, run_id: str) -> TrainingRun:
        """A run `start` created, e.g. in the process that trained."""
        run = MlflowClient(tracking_uri()).get_run(run_id)
        return cls(config, run_id, run.info.experiment_id, run.data.tags["data_version"])

    def log_epoch(self, metrics: dict) -> None:
        """An epoch's flat metrics (a Ray report or `flat_metrics(record)`), at step = epoch."""
        log_epoch_metrics(self.client, self.run_id, metrics)

    def log_model(self, result: TrainingResult) -> TrackedRun:
        """Log the selected epoch's figures, the learning curves, the config and the pyfunc model.
        (Logging a model needs MLflow's active-run API, which marks the run FINISHED as it lets go
        of it; `tracked_run` still sets the final status, FAILED if anything after this raises.)"""
        selected = {f"selected_{k}": v for k, v in result.best.items() if k.startswith(("valid_", "test_"))}
        log_figures(self.client, self.run_id, selected)
        epochs = sorted(result.epochs, key=lambda e: e["epoch"])
        with tempfile.TemporaryDirectory() as workdir:
            work = Path(workdir)
            (work / "config.json").write_text(json.dumps(self.config.model_dump(), indent=2))
            (work / "metrics.json").write_text(json.dumps({"epochs": epochs, "selected": result.best}, indent=2))
            _learning_curves(work / "learning_curves.png", epochs)
            for name in ("config.json", "metrics.json", "learning_curves.png"):
                self.client.log_artifact(self.run_id, str(work / name))
        example = input_example(self.store, ["the movie was very good", "the plot was not great"])
        signature = model_signature(example, recordings=self.store.extractor is not None)
        # The model carries the checkpoint (weights, config, tokenizer): the run's only copy.
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_ENTRY),
                artifacts={"checkpoint": str(result.checkpoint)},
                signature=signature,
                input_example=example,
                pip_requirements=["mmim-pipeline"],
            )
        return TrackedRun(self.run_id, info.model_uri, self.experiment_id, self.data_version)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


@contextmanager
def ending(run: TrainingRun, *, finished: bool = True) -> Iterator[TrainingRun]:
    """`run`, marked FAILED when the block raises; FINISHED when it completes, unless not
    `finished` (the model is still to be logged, by `attach`ing later)."""
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    if finished:
        run.end("FINISHED")


def tracked_run(
    config: Config, *, data_version: str | None = None, tags: dict[str, str] | None = None, finished: bool = True
) -> contextlib.AbstractContextManager[TrainingRun]:
    """A new `TrainingRun` for the block (see `ending`)."""
    return ending(TrainingRun.start(config, data_version=data_version, tags=tags), finished=finished)


def log_epoch_metrics(client: MlflowClient, run_id: str, metrics: dict) -> None:
    """An epoch's flat metrics (a Ray or Tune report, or `flat_metrics(record)`) at step = epoch;
    what is not a number (Tune's trial id, a checkpoint path) stays out."""
    figures = {
        k: v for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    log_figures(client, run_id, figures, step=int(metrics["epoch"]))


def log_figures(
    client: MlflowClient, run_id: str, figures: dict, step: int = 0, tags: dict[str, str] | None = None
) -> None:
    """`figures` (name -> number) as MLflow metrics at `step`, and `tags`, in one request."""
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(metric_name(k), float(v), now, step) for k, v in figures.items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def metric_name(key: str) -> str:
    return key.replace("-", "_")  # MLflow metric names: Acc-7 -> Acc_7


def logged_profile(run_id: str) -> LabelProfile | None:
    """The label profile a run logged (None, with a warning, when it has none or it is unreadable:
    runs from before profiles, models registered by hand)."""
    with tempfile.TemporaryDirectory(prefix="mmim-profile-") as workdir:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=DATA_PROFILE, dst_path=workdir, tracking_uri=tracking_uri()
            )
            return LabelProfile.model_validate_json(Path(path).read_bytes())
        except (MlflowException, OSError, ValidationError) as error:
            log.warning("run %s: no readable %s (%s); drift not compared", run_id, DATA_PROFILE, first_line(error))
            return None


def champion_profile(model_name: str) -> LabelProfile | None:
    """The label profile of the data the registry's champion was trained on (None: no champion,
    or its run logged none)."""
    client = MlflowClient(tracking_uri())
    version = champion_version(client, model_name)
    if version is None:
        return None
    run_id = client.get_model_version(model_name, version).run_id
    return logged_profile(run_id) if run_id else None


def track_and_register(
    config: Config, result: TrainingResult, data_version: str | None = None
) -> tuple[TrackedRun, Decision]:
    """Log a finished training and register its model, gating `champion` head to head."""
    with tracked_run(config, data_version=data_version) as run:
        for epoch in result.epochs:
            run.log_epoch(epoch)
        tracked = run.log_model(result)
    return tracked, register_run(config, tracked, result.checkpoint)


def compare_with_champion(
    config: Config,
    run_id: str,
    checkpoint: Path,
    store: str | Path,
    data_version: str,
    name: str,
    champion: str | None,
    other_seeds: list[Path] | None = None,
) -> HeadToHead:
    """Score `checkpoint` and version `champion` of `name` (None: no champion) on `store` (data
    version `data_version`) and record both on the run: tags gate.*, metrics eval_* and champion_*,
    and test_scatter.png (the only time the run's model is scored on test after training).
    `other_seeds`: the checkpoints of the run's other seeds; the run is then gated on the mean."""
    client = MlflowClient(tracking_uri())
    ours = predict_checkpoint(checkpoint, store)
    with tempfile.TemporaryDirectory() as workdir:
        scatter = Path(workdir) / "test_scatter.png"
        _test_scatter(scatter, *ours["test"])
        client.log_artifact(run_id, str(scatter))
    seeds = [ours, *(predict_checkpoint(other, store) for other in other_seeds or [])]
    compared = head_to_head(
        checkpoint,
        store,
        data_version,
        config.tracking.metric,
        f"models:/{name}/{champion}" if champion else None,
        champion,
        resamples=config.tracking.bootstrap_resamples,
        confidence=config.tracking.min_confidence,
        challenger_scores=seeds,
    )
    scored = [(f"eval_{split}", values) for split, values in compared.challenger.items()]
    scored += [(f"champion_{split}", values) for split, values in (compared.champion or {}).items()]
    figures = {f"{prefix}_{metric}": value for prefix, values in scored for metric, value in values.items()}
    log_figures(client, run_id, figures, tags=compared.tags())
    return compared


def register_run(config: Config, run: TrackedRun, checkpoint: Path, other_seeds: list[Path] | None = None) -> Decision:
    """Register a tracked run's model as a new version; `champion` moves only if the model (with
    `other_seeds`, the mean of the run's seeds) beats it on the run's own data."""
    client, name = MlflowClient(tracking_uri()), registered_model_name(config)
    compared = compare_with_champion(
        config,
        run.run_id,
        checkpoint,
        local_store(config.data),
        run.data_version,
        name,
        champion_version(client, name),
        other_seeds,
    )
    return register(client, run.model_uri, name, compared, config.tracking.margin, config.tracking.min_confidence)
