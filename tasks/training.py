"""Training as pipeline steps: Ray Train tracked live in an MLflow run, then the model logged
to that run, then the logged model scored against the registry's champion.

Training and logging are two tasks so that an MLflow hiccup while the model is logged
retries the logging, not the training.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from pydantic import BaseModel

from mmim.core.config import Config
from mmim.data.versioning import ensure_store
from mmim.lifecycle.training import Trained
from mmim.registry.gating import HeadToHead
from mmim.training.engine import epoch_line
from mmim.training.train import BEST_CHECKPOINT, TrainingResult
from tasks.caching import evaluation_key, logging_key, training_key
from tasks.features import FeatureStoreRef
from tasks.retries import service_task


class FinishedTraining(BaseModel):
    """A finished training, its MLflow run still open for the model."""

    run_id: str  # the MLflow run, with every epoch logged
    checkpoint: str  # local copy of the selected epoch's checkpoint (weights only): OUTPUT_DIR/best
    epochs: list[dict[str, float]]  # every epoch's report
    best: dict[str, float]  # the selected epoch's report (lowest validation MAE)
    stopped_early: bool
    ray_run: str | None  # where Ray keeps the run's checkpoints
    other_seeds: list[str] = []  # with train.seeds: the other seeds' checkpoints (gating takes the mean)
    seeds: dict | None = None  # with train.seeds: each seed's figures, their mean and std (seeds.json)

    def trained(self) -> Trained:
        result = TrainingResult(self.epochs, self.best, Path(self.checkpoint), self.stopped_early, self.ray_run)
        return Trained(result, [Path(path) for path in self.other_seeds], self.seeds)


class TrainedModel(BaseModel):
    run_id: str  # the MLflow run
    experiment_id: str
    model_uri: str  # the logged pyfunc model (models:/m-...), what gets registered
    checkpoint: str  # local copy of the selected epoch's checkpoint (weights only): OUTPUT_DIR/best
    epoch: int  # the selected epoch (lowest validation MAE)
    metrics: dict[str, float]  # valid_* and test_* of the selected epoch
    other_seeds: list[str] = []  # as FinishedTraining
    seeds: dict | None = None


def run_config(config: Config, features: FeatureStoreRef, project_dir: str) -> Config:
    """`config` pointed at the run's store, restored by DVC at its data version if missing."""
    store = ensure_store(features.dataset, project_dir, features.data_version)
    data = config.data.model_copy(update={"store": str(store.resolve()), "dvc_dataset": features.dataset})
    return config.model_copy(update={"data": data})


@service_task("train[{features.dataset}]", training_key)
def train(
    features: FeatureStoreRef, config: Config, project_dir: str, run_tags: dict[str, str] | None = None
) -> FinishedTraining:
    """mmim.lifecycle's training step on the store (Ray Train; RAY_ADDRESS names the cluster), every
    epoch logged as it is reported to a new MLflow run (tagged with `run_tags`: the data checks'
    results). With `train.seeds`, one Ray Train run per seed, each a child run."""
    from mmim.lifecycle.training import train_model
    from mmim.registry.tracking import tracked_run

    log = get_run_logger()
    config = run_config(config, features, project_dir)
    log.info(
        "training on %s (%s) with %d Ray workers%s",
        features.dataset,
        features.data_version,
        config.ray.num_workers,
        " on GPUs" if config.ray.use_gpu else "",
    )
    if (Path(config.output_dir) / BEST_CHECKPOINT).exists():
        log.info(
            "replacing %s/%s: every run's checkpoint is kept in its MLflow run's model",
            config.output_dir,
            BEST_CHECKPOINT,
        )
    # Left open when training succeeds: log_model attaches to it and ends it.
    with tracked_run(config, data_version=features.data_version, tags=run_tags, finished=False) as run:
        log.info("MLflow run %s", run.run_id)
        trained = train_model(config, run, lambda metrics: log.info(epoch_line(metrics, config.train.epochs)), True)
    result = trained.result
    if trained.seeds:
        log.info("seeds %s: selected seed %s", ", ".join(trained.seeds["seeds"]), trained.seeds["best_seed"])
    log.info("selected epoch %d, valid MAE %.4f", result.best_epoch, result.best["valid_MAE"])
    return FinishedTraining(
        run_id=run.run_id,
        checkpoint=str(result.checkpoint),
        epochs=result.epochs,
        best=result.best,
        stopped_early=result.stopped_early,
        ray_run=result.ray_run,
        other_seeds=[str(path) for path in trained.other_seeds],
        seeds=trained.seeds,
    )


@service_task("log_model[{features.dataset}]", logging_key)
def log_model(training: FinishedTraining, features: FeatureStoreRef, config: Config, project_dir: str) -> TrainedModel:
    """mmim.lifecycle's logging step: the selected checkpoint as the run's pyfunc model."""
    from mmim.lifecycle.registration import log_trained

    tracked = log_trained(run_config(config, features, project_dir), training.run_id, training.trained())
    return TrainedModel(
        run_id=tracked.run_id,
        experiment_id=tracked.experiment_id,
        model_uri=tracked.model_uri,
        checkpoint=training.checkpoint,
        epoch=int(training.best["epoch"]),
        metrics={k: float(v) for k, v in training.best.items() if k.startswith(("valid_", "test_"))},
        other_seeds=training.other_seeds,
        seeds=training.seeds,
    )


@service_task("evaluate[{features.dataset}]", evaluation_key)
def evaluate(
    trained: TrainedModel,
    features: FeatureStoreRef,
    project_dir: str,
    config: Config,
    model_name: str,
    champion: str | None,
) -> HeadToHead:
    """mmim.lifecycle's scoring step: the model as logged to MLflow and version `champion` of
    `model_name` (None: no champion) on valid and test of the run's data version; the figures go
    back to the run (eval_*, champion_*, gate.*), and registration gates on them."""
    from mmim.lifecycle.registration import score
    from mmim.registry.tracking import TrackedRun

    store = ensure_store(features.dataset, project_dir, features.data_version)
    logged = TrackedRun(trained.run_id, trained.model_uri, trained.experiment_id, features.data_version)
    other_seeds = [Path(path) for path in trained.other_seeds]
    compared = score(config, logged, trained.metrics["valid_MAE"], other_seeds, store, model_name, champion)
    get_run_logger().info("%s", compared.text())
    return compared
