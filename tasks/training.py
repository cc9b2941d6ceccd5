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
from mmim.core.errors import MMIMInputError
from mmim.data.versioning import ensure_store
from mmim.registry.gating import HeadToHead
from mmim.registry.server import local_checkpoint
from mmim.training.engine import epoch_line
from mmim.training.train import BEST_CHECKPOINT, TrainingResult
from tasks.caching import evaluation_key, logging_key, training_key
from tasks.features import FeatureStoreRef
from tasks.retries import service_task

# Training and the re-evaluation of its logged checkpoint run the same code on the same
# weights; larger gaps mean the logged artifact is not what was trained (or another device).
EVALUATION_TOLERANCE = 1e-3


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

    def result(self) -> TrainingResult:
        return TrainingResult(self.epochs, self.best, Path(self.checkpoint), self.stopped_early, self.ray_run)


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
    """Ray Train on the store (RAY_ADDRESS names the cluster), every epoch logged as it is
    reported to a new MLflow run (tagged with `run_tags`: the data checks' results). With
    `train.seeds`, one Ray Train run per seed, each a child run; the best seed is the result."""
    from mmim.cluster.distributed import train_distributed
    from mmim.cluster.seeds import train_seeds
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
    # Left open when training succeeds: log_model attaches to it and ends it.
    with tracked_run(config, data_version=features.data_version, tags=run_tags, finished=False) as run:
        log.info("MLflow run %s", run.run_id)

        def on_report(metrics: dict) -> None:
            log.info(epoch_line(metrics, config.train.epochs))
            run.log_epoch(metrics)

        if (Path(config.output_dir) / BEST_CHECKPOINT).exists():
            log.info(
                "replacing %s/%s: every run's checkpoint is kept in its MLflow run's model",
                config.output_dir,
                BEST_CHECKPOINT,
            )
        other_seeds, seeds = [], None
        if config.train.seeds:
            trained = train_seeds(config, run, overwrite=True)
            result, other_seeds, seeds = trained.best, trained.other_checkpoints(), trained.summary()
            log.info("seeds %s: selected seed %d", ", ".join(map(str, trained.seeds)), trained.best_seed)
        else:
            result = train_distributed(config, on_report, overwrite=True)
    log.info("selected epoch %d, valid MAE %.4f", result.best_epoch, result.best["valid_MAE"])
    return FinishedTraining(
        run_id=run.run_id,
        checkpoint=str(result.checkpoint),
        epochs=result.epochs,
        best=result.best,
        stopped_early=result.stopped_early,
        ray_run=result.ray_run,
        other_seeds=[str(path) for path in other_seeds],
        seeds=seeds,
    )


@service_task("log_model[{features.dataset}]", logging_key)
def log_model(training: FinishedTraining, features: FeatureStoreRef, config: Config, project_dir: str) -> TrainedModel:
    """Log the selected epoch's checkpoint as the run's pyfunc model, with its figures and plots."""
    from mmim.registry.tracking import TrainingRun, ending

    config = run_config(config, features, project_dir)
    with ending(TrainingRun.attach(config, training.run_id)) as run:
        tracked = run.log_model(training.result())
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
    """Score the checkpoint as logged to MLflow (not the local copy) and version `champion` of
    `model_name` (None: no champion) on valid and test of the run's data version.

    The figures go back to the run (eval_*, champion_*, gate.*); registration gates on them.
    """
    from mmim.registry.tracking import compare_with_champion

    log = get_run_logger()
    store = ensure_store(features.dataset, project_dir, features.data_version)
    other_seeds = [Path(path) for path in trained.other_seeds]
    missing = [str(path) for path in other_seeds if not path.is_dir()]
    if missing:
        raise MMIMInputError(f"{missing[0]}: a seed's checkpoint is not on this machine; rerun with refresh=True")
    with local_checkpoint(trained.model_uri) as checkpoint:
        compared = compare_with_champion(
            config, trained.run_id, checkpoint, store, features.data_version, model_name, champion, other_seeds
        )
    gap = abs(compared.challenger["valid"]["MAE"] - trained.metrics["valid_MAE"])
    if compared.seeds == 1 and gap > EVALUATION_TOLERANCE:  # with seeds, the figures are their mean
        log.warning(
            "the logged checkpoint scores valid MAE %.4f, training reported %.4f",
            compared.challenger["valid"]["MAE"],
            trained.metrics["valid_MAE"],
        )
    log.info("%s", compared.text())
    return compared
