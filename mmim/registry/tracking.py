"""MLflow runs: one run per training job, logged from the driver while it trains.

params     the flattened, validated config (model.*, data.*, train.*, ray.*)
tags       git commit, data version, source format, text encoder, Ray workers and GPUs
metrics    every epoch (step = epoch): stage0_neg_lld, stage1_{loss,task,nce,lld,H},
           lr_{bert,main,mmilb}, {valid,test}_{MAE,Corr,Acc-7,Acc-5,Acc-2_*,F1_*}
artifacts  data_profile.json (the labels of each split: the next data version's drift
           check compares with it)

What is logged after training lives beside this module: the model, its selected figures and
plots (mmim.registry.logged_model), and the head-to-head with the champion
(mmim.registry.scoring: tags gate.*, metrics eval_<split>_* and champion_<split>_*).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from mmim.core.config import Config
from mmim.core.store import FeatureStore
from mmim.data.checks import LabelProfile
from mmim.data.versioning import local_store, store_version
from mmim.registry.server import dataset_name, tracking_uri

# MLflow 3's UI opens an experiment without this tag on its GenAI overview; with it, on the runs.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DATA_PROFILE = "data_profile.json"  # the run's LabelProfile


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


class TrainingRun:
    """One MLflow run per training job, open from before the first epoch to the logged model.

    Started by the driver before training starts, so the run's duration is the training's
    and the UI shows each epoch as it is reported; `tracked_run` marks it FAILED when
    training raises. The model is logged after training (mmim.registry.logged_model),
    possibly by another process that attaches to the run by id (the pipeline's log_model
    step). All writes name the run id (no active-run state), so `log_epoch` may be called
    from another thread of the driver (Ray reports arrive on one).
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
        data_version = data_version or store_version(store.root)
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
