"""The retraining pipeline, one Prefect flow from raw files to a gated `champion`.

    retrain(dataset, config)
      extract_features   dvc repro extract@<dataset>   params.yaml + data/raw/<dataset> -> data/stores/<dataset>
      push_features      dvc push                      the store (restored first if missing) -> the DVC remote
      check_data         lifecycle.checks              leakage, lengths, drift against the champion's data; a
                                                       failed check stops the flow (artifact data-checks-<dataset>)
      tune (off unless   Ray Tune + MLflow             a search over the space file on this data version; its
      tune_trials > 0)                                 best config is what the flow trains, and is written to
                                                       `tuned_config` for later runs
      train              lifecycle.training (Ray)      store + config -> MLflow run (every epoch), checkpoint
                                                       (with train.seeds: a run per seed, each a child run)
      log_model          lifecycle.registration        the selected checkpoint as the run's pyfunc model
      evaluate           lifecycle.registration: the   both on valid/test of this data version, a paired
                         logged model and the champion bootstrap on valid -> eval_*, champion_*, gate.* on the run
      register           lifecycle.registration        -> mmim-<dataset> vN; champion only if it beats the
                                                       champion on the same data (or needs_review)
    -> the decision in the flow run's log, a summary as markdown artifact `retrain-<dataset>`
       (flows/summary.py); the command line (flows/command_line.py) prints the summary and the
       commands to look at the results

The steps are mmim.lifecycle's functions, which `mmim train --track` runs in one process.

Steps whose content key matches an earlier run are restored from Prefect's result
storage instead of running (tasks/caching.py): a rerun with the same data, config and
code skips extraction, training and registration, and the summary says which flow run
they come from; the registry's current champion is read when the run ends. A failing
step fails the flow with a message that names it; the steps after it, registration
included, never run.

Here, with Prefect's ephemeral API:   python -m flows.retrain --dataset synthetic --config configs/demo.yaml
On a schedule: prefect.yaml (docs/pipeline.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from prefect import State, Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.summary import RetrainSummary, champion_line, summary_markdown, what_was_trained
from mmim.core.config import Config, check_ray_settings, load_config
from mmim.core.errors import MMIMInputError, first_line
from mmim.registry.server import registered_model_name
from tasks import (
    DataChecks,
    FeatureStoreRef,
    FinishedTraining,
    Registration,
    TrainedModel,
    check_data,
    evaluate,
    extract_features,
    log_model,
    push_features,
    register,
    train,
)
from tasks.checks import artifact_key
from tasks.registration import champion_to_compare, current_champion
from tasks.tuning import TunedConfig, tune_hyperparameters

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step."""

    def __init__(self, step: str, error: BaseException):
        reason = first_line(error)
        super().__init__(f"step {step} failed: {reason}")
        self.step, self.bad_input = step, isinstance(error, MMIMInputError)


class Steps:
    """Runs the pipeline's steps in order, remembering which were restored from the cache."""

    def __init__(self, refresh: bool):
        self.refresh = refresh
        self.cached: list[str] = []

    def __call__(self, name: str, step: Task, *args: Any) -> Any:
        if self.refresh and step.cache_key_fn is not None:
            step = step.with_options(refresh_cache=True)
        # Prefect's first __call__ overload (async tasks) matches any unparameterised Task; the
        # pipeline's tasks are sync, and return_state=True gives their State.
        state = cast(State, step(*args, return_state=True))
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            error = state.result(raise_on_failure=False)
            raise StepFailed(name, error if isinstance(error, BaseException) else RuntimeError(state.message))
        if state.name == "Cached":
            self.cached.append(name)
        return state.result()


def _run(name: str, call: Callable[..., Any], *args: Any) -> Any:
    """A step of the flow itself (not a task)."""
    try:
        return call(*args)
    except Exception as error:
        raise StepFailed(name, error) from error


def in_project(project: Path, path: str) -> str:
    """`path` as given if absolute or a URI, otherwise relative to the project."""
    return path if "://" in path or Path(path).is_absolute() else str(project / path)


def config_file(project: Path, config: str, tuned_config: str | None, tune_trials: int) -> str:
    """The config file a run trains: `tuned_config` (a search's best) when it exists and this run
    does not search itself, else `config`."""
    if tune_trials < 0:
        raise MMIMInputError(f"tune_trials {tune_trials}: 0 (no search) or more")
    if tuned_config and not tune_trials and Path(in_project(project, tuned_config)).is_file():
        return tuned_config
    return config


def pipeline_config(project: Path, config: str, overrides: list[str]) -> Config:
    """The run's config; relative paths in it (and the config's own) are relative to the project."""
    settings = load_config(in_project(project, config), overrides)
    check_ray_settings(settings)  # before extraction, which can take a while
    tracking = settings.tracking.model_copy(update={"enabled": True})
    if settings.tracking.artifact_location:
        tracking.artifact_location = in_project(project, settings.tracking.artifact_location)
    return settings.model_copy(
        update={
            "output_dir": in_project(project, settings.output_dir),
            "ray": settings.ray.model_copy(update={"storage_path": in_project(project, settings.ray.storage_path)}),
            "tracking": tracking,
        }
    )


@flow(name="retrain", description="DVC extraction -> Ray training -> MLflow -> gated registration")
def retrain(
    dataset: str = "synthetic",
    config: str = "configs/demo.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    push: bool = True,
    remote: str | None = None,
    refresh: bool = False,
    tune_trials: int = 0,
    search_space: str = "configs/search/mmim.yaml",
    tuned_config: str | None = None,
) -> dict[str, Any]:
    """Retrain MMIM on `dataset` (an entry of params.yaml `datasets`) with `config`.

    Args:
        dataset: the DVC stage extract@<dataset> builds the store data/stores/<dataset>.
        config: YAML config, relative to `project_dir` unless absolute (configs/mosi.yaml).
        overrides: `section.key=value` settings applied on top of the config.
        project_dir: the checkout holding dvc.yaml, params.yaml and the configs.
        push: send the store to the DVC remote after extraction.
        remote: DVC remote name (default: the repository's default remote).
        refresh: ignore cached step results (DVC still skips an up-to-date extraction).
        tune_trials: above 0, search hyperparameters (Ray Tune, that many trials) on this data
            version before training, and train the best config.
        search_space: the search space file (relative to `project_dir`).
        tuned_config: where a search writes its best config (default runs/search/<dataset>.yaml);
            a run that does not search trains it instead of `config` when it exists.
    """
    log = get_run_logger()
    project = Path(project_dir).resolve()
    config = _run("load_config", config_file, project, config, tuned_config, tune_trials)
    settings: Config = _run("load_config", pipeline_config, project, config, overrides or [])
    model_name = registered_model_name(
        settings.model_copy(update={"data": settings.data.model_copy(update={"dvc_dataset": dataset})})
    )

    step = Steps(refresh)
    features: FeatureStoreRef = step("extract_features", extract_features, dataset, str(project))
    pushed = step("push_features", push_features, features, str(project), remote) if push else None
    checks: DataChecks = step("check_data", check_data, features, str(project), model_name)
    tuned: TunedConfig | None = None
    if tune_trials:
        best_path = in_project(project, tuned_config or f"runs/search/{dataset}.yaml")
        space = in_project(project, search_space)
        tuned = step("tune", tune_hyperparameters, features, settings, str(project), tune_trials, space, best_path)
        settings = tuned.config
    training: FinishedTraining = step("train", train, features, settings, str(project), checks.tags)
    trained: TrainedModel = step("log_model", log_model, training, features, settings, str(project))
    compare_with = _run("read_champion", champion_to_compare, model_name)
    compared = step("evaluate", evaluate, trained, features, str(project), settings, model_name, compare_with)
    registration: Registration = step(
        "register", register, trained, compared, model_name, settings.tracking.margin, settings.tracking.min_confidence
    )

    champion = _run("read_champion", current_champion, model_name, settings.tracking.metric, features.data_version)

    summary = RetrainSummary(
        dataset=dataset,
        data_version=features.data_version,
        stages_run=features.stages_run,
        extraction=features.origin,
        files_pushed=pushed,
        data_checks=checks,
        **what_was_trained(trained),
        evaluation=compared.challenger,
        registration=registration,
        champion=champion,
        cached_steps=step.cached,
        config=config,
        tuning=tuned,
        seeds=trained.seeds,
    )
    registry_row = summary.provenance("register", summary.decision, registration.origin)
    log.info("%s; champion now %s", registry_row, champion_line(champion))
    if registration.needs_review:
        log.warning("%s v%s needs review: %s", model_name, registration.version, registration.needs_review)
    create_markdown_artifact(summary_markdown(summary), key=artifact_key("retrain", dataset), description=registry_row)
    return summary.model_dump()


if __name__ == "__main__":
    from flows.command_line import main

    sys.exit(main())
