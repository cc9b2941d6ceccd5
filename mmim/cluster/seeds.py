"""Training once per seed: every seed a Ray Train run, side by side, and their mean ± std.

One seed's figures say little: MMIM's validation and test figures move by a point or more
from seed to seed, and MMSA reports every model as the mean over several. So with
`train.seeds` (`mmim train --seeds 1111,1112,1113`):

    driver: train_seeds(config, parent)
              -> Tuner(run_trial, param_space={"train.seed": grid_search(seeds)})
                 (mmim.cluster.tune's trial: the project's Ray Train run; no search, no early stopping),
                 as many seeds at once as the cluster has room for
              -> each seed an MLflow child run of `parent`, every epoch logged (SeedRuns)
              -> each seed's selected epoch (mmim.core.selection): its checkpoint copied from
                 Ray's storage to OUTPUT_DIR/seed-<seed>/best, its figures to .../metrics.json
              -> the best seed (the same rule; a tie goes to the seed listed first): its checkpoint to OUTPUT_DIR/best
                 (what the parent run logs and registers)
              -> SeedsResult: every seed's TrainingResult and each metric's mean and standard
                 deviation over seeds (the parent's metrics seeds_mean_* / seeds_std_*)

The registry then gates `champion` on the seeds' mean (mmim.registry.gating), not on the best seed.
A seed's Ray Train run recovers from failures (a lost worker, process or node) as any Ray run
does, continuing from its own latest checkpoint, `ray.max_failures` times. A seed that still
fails fails the run, naming the seed and its error: a mean over the seeds that happened to work
is not the figure that was asked for.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pandas.api.types import is_numeric_dtype
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.result import AUTO_RESULT_KEYS, DONE

from mmim.cluster.connect import connect
from mmim.cluster.distributed import check_config, remove_storage, remove_training_state, storage_location
from mmim.cluster.tune import (
    TrialLines,
    TrialRuns,
    fit_trials,
    reported_epochs,
    selected_report,
    trial_error,
    trial_trainable,
    trials_run_config,
    trials_that_fit,
)
from mmim.core.config import Config
from mmim.core.errors import DistributedTrainingError, MMIMInputError
from mmim.core.files import atomic_directory, atomic_write
from mmim.core.metrics import METRIC_NAMES, over_seeds
from mmim.core.selection import SELECTION
from mmim.registry.tracking import TrainingRun, log_figures
from mmim.training.train import BEST_CHECKPOINT, METRICS_FILE, TrainingResult, prepare_output_dir, write_metrics

log = logging.getLogger(__name__)

SEEDS_FILE = "seeds.json"  # OUTPUT_DIR/seeds.json and the parent run's artifact: every seed's figures
SEED_TAG = "mmim.seeds"  # on the parent run: the seeds, comma-separated


@dataclass
class SeedsResult:
    seeds: dict[int, TrainingResult]  # seed -> its training (checkpoint: OUTPUT_DIR/seed-<seed>/best)
    best_seed: int  # the lowest validation MAE at its selected epoch
    best: TrainingResult  # that seed's, with its checkpoint copied to OUTPUT_DIR/best
    statistics: dict[str, tuple[float, float]]  # valid_<metric> / test_<metric> -> (mean, std) over seeds

    def other_checkpoints(self) -> list[Path]:
        """Every seed's checkpoint but the registered one: with it, what gating averages."""
        return [result.checkpoint for seed, result in self.seeds.items() if seed != self.best_seed]

    def metrics(self) -> dict[str, float]:
        """seeds_mean_<split>_<metric> and seeds_std_<split>_<metric>, for the parent run."""
        figures = {}
        for key, (mean, std) in self.statistics.items():
            figures[f"seeds_mean_{key}"], figures[f"seeds_std_{key}"] = mean, std
        return figures

    def summary(self) -> dict:
        """OUTPUT_DIR/seeds.json: each seed's selected epoch and figures, and mean and std per metric."""
        return {
            "seeds": {str(seed): {"epoch": r.best_epoch, **_figures(r.best)} for seed, r in self.seeds.items()},
            "best_seed": self.best_seed,
            "mean": {key: mean for key, (mean, _) in self.statistics.items()},
            "std": {key: std for key, (_, std) in self.statistics.items()},
        }


class SeedRuns(TrialRuns):
    """A child run per seed, named after it."""

    def run_name(self, trial) -> str:
        return f"seed-{trial.config['train.seed']}"


def _figures(metrics: dict[str, float]) -> dict[str, float]:
    return {
        f"{split}_{name}": float(metrics[f"{split}_{name}"]) for split in ("valid", "test") for name in METRIC_NAMES
    }


def _run_name(config: Config) -> str:
    return config.ray.run_name or f"mmim-seeds-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def check_seeds(config: Config) -> None:
    """What training over seeds cannot run with, reported before anything starts."""
    if not config.train.seeds:
        raise MMIMInputError("train.seeds: empty; give the seeds to train with, e.g. --seeds 1111,1112,1113")
    if config.ray.num_workers < 1:
        raise MMIMInputError(
            "train.seeds: each seed trains with Ray workers; set --workers (ray.num_workers) to 1 or more"
        )
    check_config(config)


def train_seeds(config: Config, parent: TrainingRun | None = None, overwrite: bool = False) -> SeedsResult:
    """Train `config` once per seed of `config.train.seeds` with Ray (each seed's run a child run
    of `parent`, when given); see the module's docstring."""
    seeds = config.train.seeds
    check_seeds(config)
    output = prepare_output_dir(config, overwrite)
    connect(config.ray.address, log_to_driver=config.ray.log_to_driver)
    name = _run_name(config)
    callbacks: list[tune.Callback] = [TrialLines(config.train.epochs, setting="train.seed")]
    if parent is not None:
        parent.client.set_tag(parent.run_id, SEED_TAG, ",".join(map(str, seeds)))
        callbacks.append(SeedRuns(config, parent, name))
    tuner = tune.Tuner(
        trial_trainable(config, name),
        param_space={"train.seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(max_concurrent_trials=trials_that_fit(config), reuse_actors=False),
        run_config=trials_run_config(config, name, callbacks),
    )
    log.info("training %d seeds (%s) as %s", len(seeds), ", ".join(map(str, seeds)), name)
    grid = fit_trials(tuner, f"training over seeds {name} interrupted")
    trained = {}
    for index in range(len(grid)):
        result = grid[index]
        seed = _seed(result)
        if result.error:
            raise DistributedTrainingError(
                f"seed {seed} failed (its retries, ray.max_failures={config.ray.max_failures}, spent): "
                f"{trial_error(result.error)}"
            )
        trained[seed] = _fetch_seed(config, result, output / f"seed-{seed}")
    best_seed = pick_seed(trained, seeds)
    with atomic_directory(output / BEST_CHECKPOINT) as staging:
        shutil.copytree(trained[best_seed].checkpoint, staging, dirs_exist_ok=True)
    best = replace(trained[best_seed], checkpoint=output / BEST_CHECKPOINT)
    write_metrics(output / METRICS_FILE, best)
    outcome = SeedsResult(
        seeds={seed: trained[seed] for seed in seeds},
        best_seed=best_seed,
        best=best,
        statistics=over_seeds([_figures(r.best) for r in trained.values()]),
    )
    atomic_write(output / SEEDS_FILE, json.dumps(outcome.summary(), indent=2))
    remove_storage(config.ray, grid.experiment_path)  # Tune's record of the seeds, all copied out
    if parent is not None:
        _record(parent, outcome, output / SEEDS_FILE)
    return outcome


def pick_seed(trained: dict[int, TrainingResult], listed: list[int]) -> int:
    """The seed whose selected epoch is best (mmim.core.selection); of equals, the one listed first."""
    return listed[SELECTION.best_index([trained[seed].best[SELECTION.key] for seed in listed])]


def _record(parent: TrainingRun, outcome: SeedsResult, summary: Path) -> None:
    """On the parent run: the selected seed's epochs (its learning curves), the mean and std of
    every metric over seeds, which seed was selected, and seeds.json."""
    for epoch in outcome.best.epochs:
        parent.log_epoch(epoch)
    log_figures(parent.client, parent.run_id, outcome.metrics(), tags={"seeds.best_seed": str(outcome.best_seed)})
    parent.client.log_artifact(parent.run_id, str(summary))


def _seed(result: tune.Result) -> int:
    return int((result.config or {})["train.seed"])


def _fetch_seed(config: Config, result: tune.Result, directory: Path) -> TrainingResult:
    """A seed's epochs (as Tune heard them) and its selected epoch's checkpoint, copied from the
    seed's Ray Train run (`<run name>-<trial id>` in ray.storage_path) to `directory`/best."""
    frame = result.metrics_dataframe
    if frame is None or SELECTION.key not in frame or frame.empty:
        raise DistributedTrainingError(f"seed {_seed(result)}: no epoch was reported")
    frame = reported_epochs(frame)
    reported = [
        column
        for column in frame.columns
        if column not in (*AUTO_RESULT_KEYS, DONE)  # DONE: Tune's own flag, not in AUTO_RESULT_KEYS
        and not column.startswith("config/")
        and is_numeric_dtype(frame[column])
    ]
    epochs = [{key: float(row[key]) for key in reported} for _, row in frame.iterrows()]
    selected = selected_report(frame)
    best = {key: float(selected[key]) for key in reported}
    # the checkpoint rank 0 reported with that epoch, as Ray Train stored it (TuneReportCallback passes its path)
    _, filesystem = storage_location(config.ray)
    kept = Checkpoint(str(selected[CHECKPOINT_PATH_KEY]), filesystem)
    with atomic_directory(directory / BEST_CHECKPOINT) as staging:
        kept.to_directory(str(staging))
        remove_training_state(staging)
    ray_run = str(Path(kept.path).parent)
    trained = TrainingResult(
        epochs,
        best,
        directory / BEST_CHECKPOINT,
        stopped_early=int(epochs[-1]["epoch"]) < config.train.epochs,
        ray_run=ray_run if config.ray.keep_storage else None,
    )
    write_metrics(directory / METRICS_FILE, trained)
    remove_storage(config.ray, ray_run)
    return trained
