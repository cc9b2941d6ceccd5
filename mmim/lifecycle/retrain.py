"""A whole retraining in one process, without Prefect: what `mmim train --track` runs. The
same steps, in the same order, as the flow's tasks (flows/retrain.py). Without tracking,
`mmim train` runs the first two (`train_checked`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmim.core.config import Config
from mmim.data.versioning import local_store, store_version
from mmim.lifecycle.checks import DataReport, check_config_store, check_data
from mmim.lifecycle.training import EpochCallback, EpochReports, Trained, TrainingHooks, check_training, train_model
from mmim.registry.server import answering, registered_model_name

if TYPE_CHECKING:  # MLflow: imported when a run is tracked
    from mmim.lifecycle.registration import Decision, HeadToHead
    from mmim.registry.tracking import TrackedRun


@dataclass
class Retrained:
    checks: DataReport
    trained: Trained
    logged: TrackedRun
    compared: HeadToHead
    decision: Decision


def retrain(
    config: Config,
    on_epoch: EpochCallback,
    overwrite: bool = False,
    hooks: Callable[[EpochCallback], TrainingHooks] = EpochReports,
    on_step: Callable[[str], None] = lambda step: None,
) -> Retrained:
    """Check, train, log, score and register on `config`'s store; `on_step(what)` hears each step
    but training (which reports its epochs to `on_epoch`) as it starts, for progress output."""
    from mmim.lifecycle.registration import champion_now, log_trained, register_model, score
    from mmim.registry.tracking import TrainingRun, ending

    check_training(config, overwrite)  # before an MLflow run exists for a training refused here
    store, model_name = local_store(config.data), registered_model_name(config)
    data_version = store_version(store)  # the store fetched once, when it comes from a DVC remote
    on_step("checking the data")
    with answering(f"registered model {model_name}"):  # a server that does not answer: before anything trains
        checks = check_data(store, data_version, model_name)
        run = TrainingRun.start(config, data_version=data_version, tags=checks.tags())
    # Left open after training: logging the model ends it, as in the pipeline.
    with ending(run, finished=False):
        trained = train_model(config, run, on_epoch, overwrite, hooks)
    with answering(f"MLflow run {run.run_id}", quick=False):  # the training is done: MLflow's own retries
        on_step("logging the model to MLflow")
        logged = log_trained(config, run.run_id, trained)
        on_step("scoring the model and the registry's champion on the same data")
        reported = trained.result.best["valid_MAE"]
        compared = score(config, logged, reported, trained.other_seeds, store, model_name, champion_now(model_name))
        on_step("registering the model")
        tracking = config.tracking
        decision = register_model(logged.model_uri, compared, model_name, tracking.margin, tracking.min_confidence)
    return Retrained(checks, trained, logged, compared, decision)


def train_checked(
    config: Config,
    on_epoch: EpochCallback,
    overwrite: bool = False,
    hooks: Callable[[EpochCallback], TrainingHooks] = EpochReports,
) -> Trained:
    """The data checks (with no drift comparison: no registry to compare with), then the
    training, with nothing logged or registered."""
    check_training(config, overwrite)
    check_config_store(config)
    return train_model(config, None, on_epoch, overwrite, hooks)
