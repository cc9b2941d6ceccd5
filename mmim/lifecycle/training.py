"""The training step: one seed (in this process, or on Ray Train workers) or one Ray run per
seed, every epoch logged to the run's MLflow run as it is reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmim.core.config import Config, check_ray_settings
from mmim.training.engine import EpochReports, TrainingHooks
from mmim.training.train import TrainingResult, prepare_output_dir

if TYPE_CHECKING:
    from mmim.registry.tracking import TrainingRun  # MLflow, only for a tracked run

EpochCallback = Callable[[dict], None]
__all__ = ["EpochCallback", "EpochReports", "Trained", "TrainingHooks", "check_training", "train_model"]


@dataclass
class Trained:
    """What the training step produced, whichever way it trained."""

    result: TrainingResult  # the selected model (with seeds: the best seed's)
    other_seeds: list[Path]  # with train.seeds: the other seeds' checkpoints (gating takes the mean)
    seeds: dict | None = None  # with train.seeds: each seed's figures, their mean and std (seeds.json)


def check_training(config: Config, overwrite: bool) -> None:
    """What would refuse the training, before an MLflow run or a Ray cluster exists for it
    (making nothing: a refused run leaves no directory behind)."""
    prepare_output_dir(config, overwrite, create=False)
    if config.train.seeds:
        from mmim.cluster.seeds import check_seeds

        check_seeds(config)
    elif config.ray.num_workers > 0:
        check_ray_settings(config)


def train_model(
    config: Config,
    run: TrainingRun | None,
    on_epoch: EpochCallback,
    overwrite: bool = False,
    hooks: Callable[[EpochCallback], TrainingHooks] = EpochReports,
) -> Trained:
    """Train `config`: with `train.seeds` once per seed on Ray (each a child run of `run`), with
    `ray.num_workers` > 0 on Ray Train workers, else in this process (`hooks(report)` sees its
    stages and epochs). Every epoch goes to `on_epoch` and, when tracked, to `run`."""
    if config.train.seeds:
        from mmim.cluster.seeds import train_seeds

        seeds = train_seeds(config, run, overwrite)
        return Trained(seeds.best, seeds.other_checkpoints(), seeds.summary())

    def report(metrics: dict) -> None:
        on_epoch(metrics)
        if run is not None:
            run.log_epoch(metrics)

    if config.ray.num_workers > 0:
        from mmim.cluster.distributed import train_distributed  # Ray, only for a Ray run

        return Trained(train_distributed(config, report, overwrite), [])
    from mmim.training.train import train

    return Trained(train(config, hooks(report), overwrite), [])
