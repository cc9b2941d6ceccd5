"""Training and evaluation as pipeline steps: Ray Train, tracked live in an MLflow run from the driver."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from mmim.config import Config
from mmim.distributed import train_distributed
from mmim.engine import epoch_line
from mmim.gating import HeadToHead
from mmim.serving import local_checkpoint
from mmim.tracking import compare_with_champion, tracked_run
from mmim.train import BEST_CHECKPOINT
from mmim.versioning import ensure_store
from tasks.caching import evaluation_key, training_key
from tasks.features import FeatureStoreRef
from tasks.retries import ATTEMPTS, BACKOFF, retry_if_transient

# Training and the re-evaluation of its logged checkpoint run the same code on the same
# weights; larger gaps mean the logged artifact is not what was trained (or another device).
EVALUATION_TOLERANCE = 1e-3


class TrainedModel(BaseModel):
    run_id: str  # the MLflow run
    experiment_id: str
    model_uri: str  # the logged pyfunc model (models:/m-...), what gets registered
    checkpoint: str  # local copy of the selected epoch's checkpoint (weights only): OUTPUT_DIR/best
    epoch: int  # the selected epoch (lowest validation MAE)
    metrics: dict[str, float]  # valid_* and test_* of the selected epoch


@task(
    retries=ATTEMPTS,
    retry_delay_seconds=BACKOFF,
    retry_condition_fn=retry_if_transient,
    cache_key_fn=training_key,
    result_serializer="json",
    task_run_name="train[{features.dataset}]",
)
def train(
    features: FeatureStoreRef, config: Config, project_dir: str, run_tags: dict[str, str] | None = None
) -> TrainedModel:
    """Ray Train on the store (RAY_ADDRESS names the cluster), tracked live in one MLflow run
    (tagged with `run_tags`: the data checks' results)."""
    log = get_run_logger()
    store = ensure_store(features.dataset, project_dir, features.data_version)
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"store": str(store.resolve()), "dvc_dataset": features.dataset})}
    )
    log.info(
        "training on %s (%s) with %d Ray workers%s",
        features.dataset,
        features.data_version,
        config.ray.num_workers,
        " on GPUs" if config.ray.use_gpu else "",
    )
    with tracked_run(config, data_version=features.data_version, tags=run_tags) as run:
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
        result = train_distributed(config, on_report, overwrite=True)
        tracked = run.finish(result.epochs, result.best, result.checkpoint)
    metrics = {k: float(v) for k, v in result.best.items() if k.startswith(("valid_", "test_"))}
    log.info("selected epoch %d, valid MAE %.4f", int(result.best["epoch"]), metrics["valid_MAE"])
    return TrainedModel(
        run_id=tracked.run_id,
        experiment_id=tracked.experiment_id,
        model_uri=tracked.model_uri,
        checkpoint=str(result.checkpoint),
        epoch=int(result.best["epoch"]),
        metrics=metrics,
    )


@task(
    retries=ATTEMPTS,
    retry_delay_seconds=BACKOFF,
    retry_condition_fn=retry_if_transient,
    cache_key_fn=evaluation_key,
    result_serializer="json",
    task_run_name="evaluate[{features.dataset}]",
)
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
    log = get_run_logger()
    store = ensure_store(features.dataset, project_dir, features.data_version)
    with local_checkpoint(trained.model_uri) as checkpoint:
        compared = compare_with_champion(
            config, trained.run_id, checkpoint, store, features.data_version, model_name, champion
        )
    gap = abs(compared.challenger["valid"]["MAE"] - trained.metrics["valid_MAE"])
    if gap > EVALUATION_TOLERANCE:
        log.warning(
            "the logged checkpoint scores valid MAE %.4f, training reported %.4f",
            compared.challenger["valid"]["MAE"],
            trained.metrics["valid_MAE"],
        )
    log.info("%s", compared.text())
    return compared
