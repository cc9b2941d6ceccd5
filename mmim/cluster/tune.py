"""Ray Tune adapter: a hyperparameter search whose every trial is a Ray Train run.

    driver: search(config, spec, trials, name)
              -> Tuner(run_trial, param_space=spec's distributions,
                       Optuna proposes settings (seeded; `start_from` first),
                       ASHA stops trials whose validation MAE trails at epoch
                       grace_period, grace_period * reduction_factor, ...)
                 or, when the search `name` exists in ray.storage_path, Tuner.restore:
                 finished trials are kept, unfinished ones continue
              -> each trial an MLflow child run of one parent run (TrialRuns, in the driver)
              -> SearchResult: the best trial's config, written as a YAML file to train with
    trial:  run_trial(settings)  (Tune's function trainable, one per trial)
              base config + sampled settings -> mmim.cluster.distributed.build_trainer
              -> every epoch's report goes on to Tune (TuneReportCallback)

Choices, and why:
  - A function trainable that builds the TorchTrainer (Ray 2.60's way; Tune no longer
    takes a Trainer). The function holds no CPU: a trial's resources are its Ray Train
    workers'. A trial whose workers find no room waits, retrying every
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, so the search runs as many trials at once as
    the cluster has room for (or `concurrent`), and refuses a trial that cannot fit at all.
  - Trials are new actors (no reuse): the actor of a trial that ASHA stops is killed with
    the Ray Train run it owns. Ray Train then frees that run's placement group once the
    dashboard's state API reports its controller dead, so the cluster needs its dashboard.
  - A trial's figure is its selected epoch's validation MAE (mmim.core.selection, as training);
    ASHA compares trials at the same epoch.
  - A setting that cannot be trained (a sampled value the config refuses) fails its own
    trial with the config's message; the search goes on.
  - Each trial's Ray Train run is named `<search>-<trial id>`: a trial restarted after
    the driver died continues from its own latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from mlflow import MlflowClient
from mlflow.entities import Param
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from mmim.cluster.connect import connect
from mmim.cluster.distributed import (
    build_trainer,
    check_config,
    remove_storage,
    storage_location,
    with_absolute_paths,
    worker_error,
)
from mmim.core.config import RUN_NAME_PATTERN, Config, config_from_dict, config_to_yaml, read_yaml
from mmim.core.errors import MMIMInputError, SearchInterrupted, first_line
from mmim.core.files import atomic_write
from mmim.core.selection import SELECTION
from mmim.registry.server import answering, tracking_uri
from mmim.registry.tracking import TrainingRun, ending, flatten, log_epoch_metrics
from mmim.training.engine import epoch_line

log = logging.getLogger(__name__)

METRIC, MODE = SELECTION.key, SELECTION.mode  # ASHA compares trials at an epoch on this
PARENT_TAG, TRIAL_OF_TAG, TRIAL_ID_TAG = "mmim.search", "mmim.trial_of", "mmim.trial_id"
FINGERPRINT_TAG = "mmim.search_fingerprint"
SEARCH_METRIC = "best_valid_MAE"  # what Optuna learns from: a trial's selected epoch so far
# A trial's driver function only starts and watches its Ray Train run: no CPU (Tune's default
# is 1, which on a small cluster leaves no room for the workers), a little memory (Ray needs
# some resource to place it).
TRIAL_DRIVER_RESOURCES = {"CPU": 0.0, "memory": float(256 * 2**20)}


# --- the search space file -------------------------------------------------------------


class Distribution(BaseModel):
    """One setting's distribution: exactly one of the four kinds."""

    model_config = ConfigDict(extra="forbid")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = None  # both ends included
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def one_kind(self) -> Distribution:
        kinds = [name for name in ("uniform", "loguniform", "integer", "choice") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of uniform, loguniform, integer, choice")
        for name in ("uniform", "loguniform", "integer"):
            bounds = getattr(self, name)
            # finite, and integers that Tune's samplers (numpy int64, Optuna) can draw
            if bounds is not None and not all(math.isfinite(end) and abs(end) <= 2**53 for end in bounds):
                raise ValueError(f"{name}: both ends must be finite numbers of at most 2**53")
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: the low end must be below the high end")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: both ends must be above 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: give at least one value")
        return self

    def admits(self, value: Any) -> bool:
        """Whether `value` is one this distribution can draw (start_from points must be)."""
        if self.choice is not None:
            return value in self.choice
        if self.integer is not None:
            return isinstance(value, int) and self.integer[0] <= value <= self.integer[1]
        bounds = self.uniform or self.loguniform
        return isinstance(value, (int, float)) and bounds is not None and bounds[0] <= value <= bounds[1]

    def domain(self):
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.integer is not None:
            return tune.randint(self.integer[0], self.integer[1] + 1)  # Tune's high end is excluded
        return tune.choice(self.choice)


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(default=5, ge=1, description="Epochs every trial trains before ASHA may stop it.")
    reduction_factor: float = Field(default=2.0, gt=1, description="At each rung, ASHA keeps the best 1/factor.")


class SearchSpec(BaseModel):
    """A search space file (configs/search/mmim.yaml)."""

    model_config = ConfigDict(extra="forbid")
    space: dict[str, Distribution] = Field(min_length=1)
    start_from: list[dict[str, Any]] = Field(
        default=[], description="Settings tried first, in order, before Optuna proposes its own."
    )
    early_stopping: EarlyStopping = EarlyStopping()


def _known_setting(key: str) -> bool:
    section, _, name = key.partition(".")
    field = Config.model_fields.get(section)
    annotation = field.annotation if field else None
    return isinstance(annotation, type) and issubclass(annotation, BaseModel) and name in annotation.model_fields


def load_search_spec(path: str | Path) -> SearchSpec:
    """Read and check a search space file; errors name the file and the setting."""
    raw = read_yaml(path, "the search space")
    try:
        spec = SearchSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise MMIMInputError(f"{path}: {where}: {first['msg']}") from None
    for key in [*spec.space, *(key for point in spec.start_from for key in point)]:
        if not _known_setting(key):
            raise MMIMInputError(
                f"{path}: {key}: not a setting of the training config (section.name, e.g. train.lr_main)"
            )
    for point in spec.start_from:
        outside = sorted(set(point) - set(spec.space))
        if outside:
            raise MMIMInputError(f"{path}: start_from: {outside[0]} is not in the space")
        for key, value in point.items():
            if not spec.space[key].admits(value):
                raise MMIMInputError(f"{path}: start_from: {key}={value!r} is outside its distribution")
    return spec


def trial_config(base: Config, settings: dict[str, Any]) -> Config:
    """The base config with a trial's sampled settings (`{"train.lr_main": 1e-3, ...}`)."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    raw = base.model_dump()
    for section, values in nested.items():
        raw[section] = {**raw[section], **values}
    described = ", ".join(f"{key}={value!r}" for key, value in sorted(settings.items()))
    return config_from_dict(raw, f"trial settings ({described})")


# --- one trial ---------------------------------------------------------------------------


def trial_run_name(search_name: str, trial_id: str) -> str:
    """The Ray Train run (in ray.storage_path) and the MLflow child run of a trial of `search_name`."""
    return f"{search_name}-{trial_id}"


def run_trial(settings: dict[str, Any], base: dict, search_name: str) -> None:
    """What every trial runs: its config trained by Ray Train, each epoch reported on to Tune."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(config_from_dict(base, "search base config"), settings)
    run_name = trial_run_name(search_name, trial_id)
    config = config.model_copy(update={"ray": config.ray.model_copy(update={"run_name": run_name})})
    check_config(config)
    build_trainer(config, [TuneReportCallback()]).fit()


# --- MLflow: a parent run, a child run per trial --------------------------------------


class TrialRuns(tune.Callback):
    """Each trial an MLflow child run of the search's parent run, written by the driver as
    Tune hears from the trials. Tune saves its callbacks with the experiment, so this holds
    plain data; a restored search finds its trials' runs again by their tags."""

    def __init__(self, base: Config, parent: TrainingRun, search_name: str):
        self.base = base.model_dump()
        self.parent_run_id, self.experiment_id = parent.run_id, parent.experiment_id
        self.data_version, self.search_name = parent.data_version, search_name
        self.run_ids: dict[str, str] = {}  # trial id -> child run id, as found or created

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri())

    def child_run_id(self, trial) -> str:
        """The trial's child run: found by its tags (a resumed trial keeps its run) or created,
        with the trial's whole config and its sampled settings as params."""
        if trial.trial_id in self.run_ids:
            return self.run_ids[trial.trial_id]
        self.run_ids[trial.trial_id] = self._find_or_create(trial)
        return self.run_ids[trial.trial_id]

    def _find_or_create(self, trial) -> str:
        mine = f"tags.`{TRIAL_OF_TAG}` = '{self.search_name}' and tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'"
        found = self.client.search_runs([self.experiment_id], filter_string=mine)
        if found:
            return found[0].info.run_id
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "mlflow.runName": self.run_name(trial),
            TRIAL_OF_TAG: self.search_name,
            TRIAL_ID_TAG: trial.trial_id,
            "data_version": self.data_version,
        }
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        settings = {f"search.{key}": str(value) for key, value in trial.config.items()}
        try:
            params = {**flatten(trial_config(config_from_dict(self.base), trial.config)), **settings}
        except MMIMInputError:
            params = settings  # the trial fails with that message
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        return run_id

    def run_name(self, trial) -> str:
        return trial_run_name(self.search_name, trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.client.update_run(self.child_run_id(trial), status="RUNNING")  # also a trial that resumes

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        reported = {key: value for key, value in result.items() if key not in AUTO_RESULT_KEYS}
        log_epoch_metrics(self.client, self.child_run_id(trial), reported)  # the epoch's figures, as in `mmim train`

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        planned = trial_config(config_from_dict(self.base), trial.config).train.epochs
        stopped = int(trial.last_result.get("epoch", 0)) < planned  # by ASHA, or by train.patience
        run_id = self.child_run_id(trial)
        self.client.set_tag(run_id, "mmim.stopped_early", str(stopped).lower())
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.child_run_id(trial)
        self.client.set_tag(run_id, "mmim.error", _error_line(trial.error_file)[:5000])
        self.client.set_terminated(run_id, "FAILED")


class TrialLines(tune.Callback):
    """The project's own progress, in place of Tune's status tables: a line per epoch of each
    trial (`<label> | epoch 3/40 | loss ... | valid MAE ...`), and a line when a trial ends or
    fails. Plain data, as Tune saves its callbacks with the experiment."""

    def __init__(self, epochs: int, setting: str | None = None):
        self.epochs, self.setting = epochs, setting  # setting: what names a trial (train.seed)

    def label(self, trial) -> str:
        return f"seed {trial.config[self.setting]}" if self.setting else f"trial {trial.trial_id}"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "stage1_loss" in result:  # an epoch's report (Tune's own results carry none)
            log.info("%s | %s", self.label(trial), epoch_line(result, self.epochs))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        log.info("%s ended after epoch %s", self.label(trial), trial.last_result.get("epoch", 0))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.error("%s failed: %s", self.label(trial), _error_line(trial.error_file))


def _error_line(error_file: str | None) -> str:
    """The last line of the error Tune has just written for a trial: the trial's own exception
    (`mmim.core.errors.MMIMInputError: trial settings (...): ...`) below Ray's traceback."""
    try:
        lines = Path(error_file).read_text().strip().splitlines() if error_file else []
    except OSError:
        lines = []
    return lines[-1] if lines else "unknown error (no error file)"


def trial_error(error: BaseException | None) -> str:
    """A failed trial's own message (a config error, a diverged loss), not Tune's wrapper."""
    if error is None:
        return "unknown error"
    while True:  # Tune's error wraps Ray's task error, which wraps the trial's own (`.cause`)
        if getattr(error, "worker_failures", None):  # Ray Train's: its workers' own errors inside
            return worker_error(error)
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            return first_line(error)
        error = inner


# --- the search --------------------------------------------------------------------------


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # finished | stopped early | failed | interrupted
    settings: dict[str, Any]
    epochs: int  # reported
    valid_MAE: float  # its best epoch's (nan: none)
    best_epoch: int  # 0: none
    error: str | None


@dataclass
class SearchResult:
    name: str
    best_config: Config
    best_settings: dict[str, Any]
    best_valid_MAE: float
    best_epoch: int
    trials: list[TrialSummary]
    parent_run_id: str
    resumed: bool


def trials_that_fit(config: Config) -> int:
    """How many trials' Ray Train workers the cluster has room for at once (the trials' driver
    functions hold no CPU or GPU); a clear error when not even one fits."""
    # Ray Train's rules per worker: 1 GPU (and no CPU) with GPUs, else 1 CPU; with GPUs it adds
    # 1 GPU to resources_per_worker when they name none
    per_worker = dict(config.ray.resources_per_worker or ({"GPU": 1.0} if config.ray.use_gpu else {"CPU": 1.0}))
    if config.ray.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    per_trial = {name: amount * config.ray.num_workers for name, amount in per_worker.items() if amount}
    available = ray.cluster_resources()
    room = {name: int(available.get(name, 0.0) // amount) for name, amount in per_trial.items()}
    short = [name for name, fits in room.items() if fits < 1]
    if short:
        name = short[0]
        raise MMIMInputError(
            f"a trial's {config.ray.num_workers} Ray workers need {per_trial[name]:g} {name} and the cluster has "
            f"{available.get(name, 0.0):g}: lower --workers or ray.resources_per_worker (or, on a cluster that "
            "scales up, pass --concurrent)"
        )
    return min(room.values(), default=1)


def _summary(result: ray.tune.Result, planned_epochs: int) -> TrialSummary:
    frame = result.metrics_dataframe
    epochs, best = 0, None
    if frame is not None and METRIC in frame and len(frame) > 0:
        epochs = int(frame["epoch"].max())  # a restarted trial reports some epochs twice
        best = selected_report(frame)
    if result.error:
        status = "failed"
    else:  # by ASHA, or by early stopping (train.patience)
        status = "stopped early" if epochs < planned_epochs else "finished"
    return TrialSummary(
        trial_id=str((result.metrics or {}).get("trial_id", Path(result.path).name)),
        status=status,
        settings=dict(result.config or {}),
        epochs=epochs,
        valid_MAE=float(best[METRIC]) if best is not None else math.nan,
        best_epoch=int(best["epoch"]) if best is not None else 0,
        error=trial_error(result.error) if result.error else None,
    )


def reported_epochs(frame: pd.DataFrame) -> pd.DataFrame:
    """A trial's reports (Tune's metrics_dataframe), one per epoch in epoch order: a restarted
    trial reports some epochs again, and its latest report of each counts."""
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def selected_report(frame: pd.DataFrame) -> pd.Series:
    """The report of the epoch a trial's training selected: the one rule (mmim.core.selection) over
    its reports, as its workers' ModelSelection applied it; of equal figures, the earlier epoch."""
    frame = reported_epochs(frame)
    return frame.iloc[SELECTION.best_index(frame[METRIC].tolist())]


def best_trial(trials: list[TrialSummary]) -> TrialSummary:
    """The trial whose selected epoch is best (mmim.core.selection); of equals, the one Tune
    created first (trial ids count up)."""
    ordered = sorted(trials, key=lambda summary: summary.trial_id)
    return ordered[SELECTION.best_index([summary.valid_MAE for summary in ordered])]


def search_fingerprint(config: Config, spec: SearchSpec, trials: int) -> str:
    """What a resumed search must share with the one it resumes (Tune keeps the first's)."""
    text = json.dumps([config.model_dump(), spec.model_dump(mode="json"), trials], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parent_run(config: Config, name: str, spec: SearchSpec, fingerprint: str, resuming: bool) -> TrainingRun:
    """The search's parent run: when resuming, the one the first driver opened (refused if that
    search had other settings); otherwise a new one."""
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    found: list = []
    if resuming and experiment is not None:
        found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{name}'")
    if found:
        if found[0].data.tags.get(FINGERPRINT_TAG) != fingerprint:
            raise MMIMInputError(
                f"search {name} exists in ray.storage_path with another config, search space or --trials: "
                "resume it with the same command, or pass --name for a new search"
            )
        client.update_run(found[0].info.run_id, status="RUNNING")
        return TrainingRun.attach(config, found[0].info.run_id)
    parent = TrainingRun.start(config, tags={PARENT_TAG: name, FINGERPRINT_TAG: fingerprint, "mlflow.runName": name})
    parent.client.log_dict(parent.run_id, spec.model_dump(mode="json"), "search_space.json")
    return parent


def _restorable(experiment_path: str, filesystem) -> bool:
    """Tune saved this search's state (its tuner.pkl alone, from a start that failed, is not enough)."""
    from pyarrow import fs

    filesystem = filesystem or fs.LocalFileSystem()
    listing = filesystem.get_file_info(fs.FileSelector(experiment_path, allow_not_found=True))
    return any(Path(info.path).name.startswith("experiment_state-") for info in listing)


def trial_trainable(config: Config, name: str):
    """Tune's trainable for the trials of `name`: `run_trial` on `config` (paths made absolute,
    since Tune runs each trial in a directory of its own), holding no CPU itself."""
    return tune.with_resources(
        tune.with_parameters(run_trial, base=with_absolute_paths(config).model_dump(), search_name=name),
        TRIAL_DRIVER_RESOURCES,
    )


def trials_run_config(config: Config, name: str, callbacks: list[tune.Callback]) -> tune.RunConfig:
    """Where Tune keeps the experiment `name` (ray.storage_path), and how it treats a failed trial."""
    storage_path, filesystem = storage_location(config.ray, with_keys=False)  # Tune pickles it into storage
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a failed trial is one result
        verbose=0,  # TrialLines reports; Tune's status tables are 30 lines per trial, wider than a terminal
    )


def fit_trials(tuner: tune.Tuner, interrupted: str) -> tune.ResultGrid:
    """Run `tuner`'s trials, Tune's own console output off (TrialLines reports instead), and
    raise `interrupted` when Tune returned before every trial ended (it returns normally on
    Ctrl-C). Tune's current output prints a heading and a box per trial whatever `verbose`
    says; the older one, selected here for the call, honours verbose=0."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        grid = tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
    if grid.num_terminated + grid.num_errors < len(grid):
        raise SearchInterrupted(f"{interrupted} ({grid.num_terminated + grid.num_errors} of {len(grid)} trials ended)")
    return grid


def _new_tuner(config: Config, spec: SearchSpec, trials: int, name: str, trainable, callbacks, concurrent: int):
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            # Optuna is told a trial's last report: the best epoch so far, not the last epoch's.
            search_alg=OptunaSearch(
                metric=SEARCH_METRIC, mode=MODE, seed=config.train.seed, points_to_evaluate=spec.start_from or None
            ),
            scheduler=ASHAScheduler(
                time_attr="epoch",
                metric=METRIC,
                mode=MODE,
                max_t=config.train.epochs,
                grace_period=min(spec.early_stopping.grace_period, config.train.epochs),
                reduction_factor=spec.early_stopping.reduction_factor,
                stop_last_trials=False,  # a trial that reached train.epochs ends by itself
            ),
            num_samples=trials,
            max_concurrent_trials=concurrent,
            reuse_actors=False,  # see the module's docstring
        ),
        run_config=trials_run_config(config, name, callbacks),
    )


def _param_space(spec: SearchSpec) -> dict[str, Any]:
    return {key: distribution.domain() for key, distribution in spec.space.items()}


def search(
    config: Config,
    spec: SearchSpec,
    trials: int,
    name: str,
    best_config_path: str | Path,
    concurrent: int | None = None,
) -> SearchResult:
    """Run the search `name` (resume it, when ray.storage_path has it); write the best trial's
    config to `best_config_path`."""
    if not re.fullmatch(RUN_NAME_PATTERN, name):
        shown = f"{name[:40]!r}{'...' if len(name) > 40 else ''}"
        raise MMIMInputError(f"--name {shown}: letters, digits, '.', '_' and '-', at most 100 (it names a directory)")
    if trials < 1:
        raise MMIMInputError(f"--trials {trials}: must be at least 1")
    if concurrent is not None and concurrent < 1:
        raise MMIMInputError(f"--concurrent {concurrent}: must be at least 1")
    check_config(config)
    connect(config.ray.address, log_to_driver=config.ray.log_to_driver)
    concurrent = concurrent or trials_that_fit(config)
    storage_path, filesystem = storage_location(config.ray, with_keys=False)  # Tune pickles it into storage
    experiment_path = f"{storage_path.rstrip('/')}/{name}"
    resumed = _restorable(experiment_path, filesystem)
    with answering(f"search {name}"):  # before any trial: a tracking server that does not answer
        parent = _parent_run(config, name, spec, search_fingerprint(config, spec, trials), resumed)
    trainable = trial_trainable(config, name)
    with ending(parent):
        if resumed:
            # Tune restores its own space, trial count, scheduler settings and callbacks (the
            # fingerprint above made sure they are this command's); ASHA's rungs start empty.
            log.info("search %s: resuming from %s (finished trials are kept)", name, experiment_path)
            tuner = tune.Tuner.restore(
                experiment_path,
                trainable,
                resume_unfinished=True,
                param_space=_param_space(spec),
                storage_filesystem=filesystem,
            )
        else:
            callbacks = [TrialRuns(config, parent, name), TrialLines(config.train.epochs)]
            tuner = _new_tuner(config, spec, trials, name, trainable, callbacks, concurrent)
        grid = fit_trials(tuner, f"search {name} interrupted: run the same command again to resume it")
        summaries = [_summary(grid[index], config.train.epochs) for index in range(len(grid))]
        for summary in summaries:  # the trials' checkpoints: the best config is trained anew
            remove_storage(config.ray, f"{storage_path.rstrip('/')}/{trial_run_name(name, summary.trial_id)}")
        trained = [s for s in summaries if s.status != "failed" and math.isfinite(s.valid_MAE)]
        if not trained:
            reasons = "; ".join(sorted({s.error for s in summaries if s.error}))
            raise MMIMInputError(f"search {name}: no trial finished an epoch ({reasons})")
        best = best_trial(trained)
        best_config = trial_config(config, best.settings)
        # its own output_dir: training it must not meet the base config's checkpoint there
        best_config = best_config.model_copy(update={"output_dir": str(Path(config.output_dir).parent / name)})
        Path(best_config_path).parent.mkdir(parents=True, exist_ok=True)  # runs/search/ on a first search
        atomic_write(Path(best_config_path), config_to_yaml(best_config))
        parent.client.log_metric(parent.run_id, f"best_{METRIC}", best.valid_MAE)
        parent.client.set_tag(parent.run_id, "search.best_trial", best.trial_id)
        parent.client.log_artifact(parent.run_id, str(best_config_path))
    return SearchResult(
        name, best_config, best.settings, best.valid_MAE, best.best_epoch, summaries, parent.run_id, resumed
    )
