"""The retraining pipeline, one Prefect flow from raw files to a gated `champion`.

    retrain(dataset, config)
      extract_features   dvc repro extract@<dataset>   params.yaml + data/raw/<dataset> -> data/stores/<dataset>
      push_features      dvc push                      the store (restored first if missing) -> the DVC remote
      check_data         mmim.data.checks              leakage, lengths, drift against the champion's data; a
                                                       failed check stops the flow (artifact data-checks-<dataset>)
      tune (off unless   Ray Tune + MLflow             a search over the space file on this data version; its
      tune_trials > 0)                                 best config is what the flow trains, and is written to
                                                       `tuned_config` for later runs
      train              Ray Train + MLflow            store + config -> MLflow run (every epoch), checkpoint
                                                       (with train.seeds: a run per seed, each a child run)
      log_model          MLflow                        the selected checkpoint as the run's pyfunc model
      evaluate           the logged checkpoint and     both on valid/test of this data version, a paired
                         the registry's champion       bootstrap on valid -> eval_*, champion_*, gate.* on the run
      register           MLflow Model Registry         -> mmim-<dataset> vN; champion only if it beats the
                                                       champion on the same data (or needs_review)
    -> the decision in the flow run's log, a summary as markdown artifact `retrain-<dataset>`;
       the command line prints the summary and the commands to look at the results

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

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import yaml
from prefect import State, Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.logging.handlers import PrefectConsoleHandler
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mmim.core.config import Config, check_ray_settings, load_config
from mmim.core.errors import MMIMInputError, first_line
from mmim.core.metrics import METRIC_NAMES
from mmim.data.recordings.layout import read_dataset
from mmim.data.versioning import check_inputs, store_path
from mmim.registry.server import registered_model_name, tracking_uri
from mmim.terminal import quiet_libraries
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
from tasks.caching import Origin
from tasks.checks import artifact_key
from tasks.registration import Champion, champion_to_compare, current_champion
from tasks.tuning import TunedConfig, tune_hyperparameters

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


class StepFailed(RuntimeError):
    """A pipeline step failed; the message names the step."""

    def __init__(self, step: str, error: BaseException):
        reason = first_line(error)
        super().__init__(f"step {step} failed: {reason}")
        self.step, self.bad_input = step, isinstance(error, MMIMInputError)


class RetrainSummary(BaseModel):
    dataset: str
    data_version: str
    stages_run: list[str]  # what DVC ran for the extraction step (this run's, or the restored run's)
    extraction: Origin | None  # the flow run that extracted
    files_pushed: int | None  # None: push skipped
    data_checks: DataChecks
    run_id: str
    run_link: str  # the run in the MLflow UI, or its runs:/ URI when there is no UI for the tracking URI
    model_uri: str
    checkpoint: str | None  # the local copy of the selected epoch's checkpoint (OUTPUT_DIR/best)
    selected_epoch: int
    evaluation: dict[str, dict[str, float]]  # split -> metric -> value, from the logged checkpoint
    registration: Registration
    champion: Champion | None  # the registry's champion when the run ended
    cached_steps: list[str]  # restored from an earlier run with the same content key
    config: str  # the config file trained (as given, or `tuned_config`)
    tuning: TunedConfig | None = None  # this run's search, when it ran one
    seeds: dict | None = None  # with train.seeds: each seed's figures, their mean and std

    @property
    def decision(self) -> str:
        r = self.registration
        return f"{r.model_name} v{r.version}: {r.decision}"

    def provenance(self, step: str, what: str, origin: Origin | None = None) -> str:
        """`what` a step did in this run, or which earlier flow run did it when it was restored."""
        if step not in self.cached_steps:
            return f"this run: {what}"
        source = f"flow run {origin.flow_run} at {origin.at}" if origin else "an earlier flow run"
        return f"restored from cache: {what}, by {source}"


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


def _under(project: Path, path: str) -> str:
    """`path` as given if absolute or a URI, otherwise relative to the project."""
    return path if "://" in path or Path(path).is_absolute() else str(project / path)


def config_file(project: Path, config: str, tuned_config: str | None, tune_trials: int) -> str:
    """The config file a run trains: `tuned_config` (a search's best) when it exists and this run
    does not search itself, else `config`."""
    if tune_trials < 0:
        raise MMIMInputError(f"tune_trials {tune_trials}: 0 (no search) or more")
    if tuned_config and not tune_trials and Path(_under(project, tuned_config)).is_file():
        return tuned_config
    return config


def pipeline_config(project: Path, config: str, overrides: list[str]) -> Config:
    """The run's config; relative paths in it (and the config's own) are relative to the project."""
    settings = load_config(_under(project, config), overrides)
    check_ray_settings(settings)  # before extraction, which can take a while
    tracking = settings.tracking.model_copy(update={"enabled": True})
    if settings.tracking.artifact_location:
        tracking.artifact_location = _under(project, settings.tracking.artifact_location)
    return settings.model_copy(
        update={
            "output_dir": _under(project, settings.output_dir),
            "ray": settings.ray.model_copy(update={"storage_path": _under(project, settings.ray.storage_path)}),
            "tracking": tracking,
        }
    )


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local tracking store


def what_was_trained(trained: TrainedModel) -> dict[str, Any]:
    """The summary's fields about the trained model: its run, model and checkpoint."""
    return {
        "run_id": trained.run_id,
        "run_link": run_link(trained),
        "model_uri": trained.model_uri,
        "checkpoint": trained.checkpoint,
        "selected_epoch": trained.epoch,
    }


def run_link(trained: TrainedModel) -> str:
    """The run's page: on the tracking server, or under `mlflow ui` for a local store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    elif uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        base = MLFLOW_UI
    else:  # databricks and other hosted stores: no URL we can know
        return f"runs:/{trained.run_id}"
    # MLflow 3.17's UI opens in its GenAI mode unless the address (or the browser's last
    # choice) asks for model training, whatever the experiment's kind tag says.
    return f"{base}/#/experiments/{trained.experiment_id}/runs/{trained.run_id}?workflowType=machine_learning"


def _local(path: str | Path) -> str:
    """`path` relative to the working directory when it is below it (shorter to copy)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def figure_columns(summary: RetrainSummary) -> dict[str, dict[str, float]]:
    """Column -> metric -> value: the new model's figures, then the champion's on the same data."""
    compared = summary.registration.compared
    columns = dict(summary.evaluation)
    columns.update(
        {
            f"champion v{compared.champion_version} {split}": figures
            for split, figures in (compared.champion or {}).items()
        }
    )
    return columns


def summary_table(summary: RetrainSummary) -> Table:
    table = Table(
        title=f"retrain {summary.dataset}: selected epoch {summary.selected_epoch}, "
        f"scored on data {summary.data_version}"
    )
    table.add_column("metric")
    columns = figure_columns(summary)
    for column in columns:
        table.add_column(column, justify="right")
    for name in METRIC_NAMES:
        table.add_row(name, *(f"{figures[name]:.4f}" for figures in columns.values()))
    return table


def _checkpoint_here(summary: RetrainSummary) -> str | None:
    """The local checkpoint, if it is on this machine (a cached result may name another's)."""
    if summary.checkpoint and Path(summary.checkpoint).is_dir():
        return _local(summary.checkpoint)
    return None


def _champion(champion: Champion | None) -> str:
    if champion is None:
        return "none"
    figure = (
        f"no {champion.metric} on this data"
        if champion.value is None
        else f"{champion.metric}={champion.value:.4f} on this data"
    )
    return f"{champion.model_name} v{champion.version} ({figure})"


def _seeds(seeds: dict) -> str:
    mean, std = seeds["mean"]["valid_MAE"], seeds["std"]["valid_MAE"]
    listed = ", ".join(seeds["seeds"])
    return f"{listed}: valid MAE {mean:.4f} ± {std:.4f} (gated on the mean); registered: seed {seeds['best_seed']}"


def _checks(checks: DataChecks) -> str:
    against = f"against {checks.previous_version}" if checks.previous_version else "no previous data to compare with"
    return f"{checks.verdict} ({against})" + "".join(f"; {warning}" for warning in checks.warnings)


def summary_rows(
    summary: RetrainSummary, link: Callable[[str, str], str] = lambda text, url: url
) -> list[tuple[str, str]]:
    """(label, text) of what this run did and what it restored; `link(text, url)` renders a link."""
    ran = f"ran {', '.join(summary.stages_run)}" if summary.stages_run else "store up to date"
    pushed = (
        "skipped"
        if summary.files_pushed is None
        else f"{summary.files_pushed} files sent"
        if summary.files_pushed
        else "0 files sent (the remote had them)"
    )
    extracted = summary.provenance("extract_features", ran, summary.extraction)
    trained = summary.provenance("train", f"epoch {summary.selected_epoch} selected")
    review = summary.registration.needs_review
    return [
        ("data version", f"{summary.data_version} ({extracted})"),
        ("DVC push", pushed),
        ("data checks", _checks(summary.data_checks)),
        ("config", summary.tuning.text() if summary.tuning else summary.config),
        *([("seeds", _seeds(summary.seeds))] if summary.seeds else []),
        ("MLflow run", f"{link(summary.run_id, summary.run_link)} ({trained})"),
        ("model", summary.model_uri),
        ("checkpoint", _checkpoint_here(summary) or "not on this machine (use the model)"),
        ("compared", summary.registration.compared.text()),
        ("registry", summary.provenance("register", summary.decision, summary.registration.origin)),
        *(
            [
                (
                    "NEEDS REVIEW",
                    f"{review}; a person decides: mmim registry promote --name "
                    f"{summary.registration.model_name} --version {summary.registration.version}",
                )
            ]
            if review
            else []
        ),
        ("champion now", _champion(summary.champion)),
        ("from cache", ", ".join(summary.cached_steps) or "nothing"),
    ]


def summary_markdown(summary: RetrainSummary) -> str:
    columns = figure_columns(summary)
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{figures[name]:.4f}" for figures in columns.values()) + " |"
        for name in METRIC_NAMES
    )
    facts = "\n".join(
        f"| {label} | {text} |" for label, text in summary_rows(summary, lambda text, url: f"[{text}]({url})")
    )
    return f"""# Retraining on {summary.dataset}

| | |
|---|---|
{facts}
| serve | `mmim serve --model models:/{summary.registration.model_name}@champion` |

Selected epoch {summary.selected_epoch} (lowest validation MAE); figures of the logged checkpoint,
and of the champion it was compared with, on data {summary.data_version}:

| metric | {" | ".join(columns)} |
|---|{"---|" * len(columns)}
{rows}
"""


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
        best_path = _under(project, tuned_config or f"runs/search/{dataset}.yaml")
        space = _under(project, search_space)
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
    log.info("%s; champion now %s", registry_row, _champion(champion))
    if registration.needs_review:
        log.warning("%s v%s needs review: %s", model_name, registration.version, registration.needs_review)
    create_markdown_artifact(summary_markdown(summary), key=artifact_key("retrain", dataset), description=registry_row)
    return summary.model_dump()


# ---------------------------------------------------------------- command line


def _hints(summary: RetrainSummary, project: Path) -> list[str]:
    scripts = _local(Path(sys.executable).parent)  # where mlflow, prefect and mmim are
    uri = tracking_uri()
    mlflow_ui = (
        summary.run_link
        if uri.startswith("http")
        else f"{scripts}/mlflow ui --backend-store-uri {uri}   then {summary.run_link}"
    )
    name = summary.registration.model_name
    checkpoints = [c for c in (_checkpoint_here(summary), f"models:/{name}@champion") if c]
    given = _prediction_input(project, summary.dataset)
    predict = [f"{scripts}/mmim predict --checkpoint {c} {given}" for c in checkpoints]
    return [
        f"MLflow UI:   {mlflow_ui}",
        f"Prefect UI:  {scripts}/prefect server start   (http://127.0.0.1:4200; shows this run)",
        *(f"{'predict:' if i == 0 else '':<13}{line}" for i, line in enumerate(predict)),
        (
            f"evaluate:    {scripts}/mmim evaluate --checkpoint {checkpoints[0]} "
            f"--store {_local(project / store_path(summary.dataset))}"
        ),
        f"registry:    {scripts}/mmim registry list --name {name}",
        f"serve:       {scripts}/mmim serve --model models:/{name}@champion",
    ]


def _prediction_input(project: Path, dataset: str) -> str:
    """What the hints give `mmim predict`: a clip of a recordings dataset (a whole file, with its
    transcript), else the shipped example utterances."""
    entry = (yaml.safe_load((project / "params.yaml").read_text()).get("datasets") or {}).get(dataset) or {}
    if entry.get("source") == "recordings":
        clips, _ = read_dataset(project / entry["input"])
        whole = next((clip for clip in clips if clip.start is None and clip.end is None), None)
        if whole is not None:
            return f"--recording {_local(whole.path)} --text {shlex.quote(whole.text)}"
    return f"--input {_local(project / 'examples' / 'utterances.json')}"


def _print_error(message: str) -> None:
    Console(stderr=True).print(Text.assemble(("error: ", "red"), message), soft_wrap=True)


class RoutineLines(logging.Filter):
    """Prefect's console lines that tell a person nothing the summary does not: steps that
    finished or were restored, the flow starting, its temporary API server. They still go to
    the Prefect API (the UI shows them); failures and every step's own lines are printed."""

    ROUTINE = (
        "Finished in state Completed",
        "Finished in state Cached",
        "Beginning flow run",
        "Starting temporary server",
        "Stopping temporary server",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.ROUTINE)


def default_config(project: Path, dataset: str) -> str:
    """configs/<dataset>.yaml when the project has one (mosi, mosei, recordings-sample), else the
    demo's: a dataset's own settings, and its own output_dir and registered model."""
    own = f"configs/{dataset}.yaml"
    return own if (project / own).is_file() else "configs/demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    parser.add_argument("--dataset", default="synthetic", help="entry of params.yaml `datasets`")
    parser.add_argument(
        "--config",
        help="YAML config, relative to --project-dir (default: configs/<dataset>.yaml "
        "when there is one, else configs/demo.yaml)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--project-dir", default=".", help="checkout with dvc.yaml and params.yaml")
    parser.add_argument("--no-push", action="store_true", help="do not push the store to the DVC remote")
    parser.add_argument("--remote", help="DVC remote (default: the repository's default)")
    parser.add_argument("--refresh", action="store_true", help="ignore cached step results")
    parser.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="search hyperparameters with N Ray Tune trials before training, and train the best config",
    )
    parser.add_argument("--search-space", default="configs/search/mmim.yaml", help="search space file")
    parser.add_argument(
        "--tuned-config",
        metavar="FILE",
        help="where a search writes its best config (default runs/search/<dataset>.yaml); "
        "without --tune-trials, trained instead of --config when it exists",
    )
    args = parser.parse_args(argv)
    quiet_libraries()
    for library in ("mlflow", "dvc"):  # their progress lines repeat what the steps log
        logging.getLogger(library).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(RoutineLines())
    project = Path(args.project_dir).resolve()
    args.config = args.config or default_config(project, args.dataset)
    try:  # the flow checks these too; here they fail in one line, before Prefect starts
        pipeline_config(project, config_file(project, args.config, args.tuned_config, args.tune_trials), args.set)
        if args.tune_trials:
            from mmim.cluster.tune import load_search_spec

            load_search_spec(_under(project, args.search_space))
        check_inputs(args.dataset, args.project_dir)  # names data/raw/<dataset> as the user would
    except MMIMInputError as error:
        _print_error(str(error))
        return EXIT_BAD_INPUT
    try:
        result = retrain(
            dataset=args.dataset,
            config=args.config,
            overrides=args.set,
            project_dir=str(project),
            push=not args.no_push,
            remote=args.remote,
            refresh=args.refresh,
            tune_trials=args.tune_trials,
            search_space=args.search_space,
            tuned_config=args.tuned_config,
        )
    except StepFailed as error:
        _print_error(str(error))
        return EXIT_BAD_INPUT if error.bad_input else EXIT_FAILED
    summary = RetrainSummary.model_validate(result)
    stdout = Console()
    stdout.print(summary_table(summary))
    for label, text in summary_rows(summary):
        stdout.print(f"{label:<14}{text}", highlight=False, soft_wrap=True)
    stdout.print()
    for line in _hints(summary, project):
        stdout.print(line, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
