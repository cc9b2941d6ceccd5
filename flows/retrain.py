"""The retraining pipeline, one Prefect flow from raw files to a gated `champion`.

    retrain(dataset, config)
      extract_features   dvc repro extract@<dataset>   params.yaml + data/raw/<dataset> -> data/stores/<dataset>
      push_features      dvc push                      the store (and its raw inputs) -> the DVC remote
      train              Ray Train + MLflow            store + config -> MLflow run, checkpoint, logged model
      evaluate           the logged checkpoint         -> eval_{valid,test}_* on the run
      register           MLflow Model Registry         -> mmim-<dataset> vN; champion only if better
    -> a summary table in the flow run's log and a markdown artifact `retrain-<dataset>`

Steps whose content key matches an earlier run are restored from Prefect's result
storage instead of running (tasks/caching.py): a rerun with the same data, config and
code skips extraction, training and registration. A failing step fails the flow with a
message that names it; the steps after it, registration included, never run.

Here, with Prefect's ephemeral API:   python -m flows.retrain --dataset synthetic --config configs/demo.yaml
On a schedule: prefect.yaml (see README, "The pipeline").
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mmim.cli import quiet_libraries
from mmim.config import Config, load_config
from mmim.distributed import check_ray_settings
from mmim.errors import MMIMInputError, first_line
from mmim.metrics import METRIC_NAMES
from mmim.tracking import registered_model_name, tracking_uri
from tasks import (FeatureStoreRef, Registration, TrainedModel, evaluate, extract_features, push_features,
                   register, train)

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
    stages_run: list[str]
    files_pushed: int | None  # None: push skipped
    run_id: str
    run_link: str  # the run in the MLflow UI, or its runs:/ URI when there is no UI server
    model_uri: str
    selected_epoch: int
    evaluation: dict[str, dict[str, float]]  # split -> metric -> value, from the logged checkpoint
    registration: Registration
    cached_steps: list[str]  # restored from an earlier run with the same content key

    @property
    def decision(self) -> str:
        r = self.registration
        before = (f"v{r.champion_before} {r.metric}={r.champion_before_value:.4f}"
                  if r.champion_before else "no champion before")
        verdict = "promoted to champion" if r.promoted else "challenger, champion unchanged"
        return f"{r.model_name} v{r.version} ({r.metric}={r.value:.4f}): {verdict} ({before})"


class Steps:
    """Runs the pipeline's steps in order, remembering which were restored from the cache."""

    def __init__(self, refresh: bool):
        self.refresh = refresh
        self.cached: list[str] = []

    def __call__(self, name: str, step: Task, *args: Any) -> Any:
        if self.refresh and step.cache_key_fn is not None:
            step = step.with_options(refresh_cache=True)
        state = step(*args, return_state=True)
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


def pipeline_config(project: Path, config: str, overrides: list[str]) -> Config:
    """The run's config; relative paths in it (and the config's own) are relative to the project."""
    settings = load_config(_under(project, config), overrides)
    check_ray_settings(settings)  # before extraction, which can take a while
    tracking = settings.tracking.model_copy(update={"enabled": True})
    if settings.tracking.artifact_location:
        tracking.artifact_location = _under(project, settings.tracking.artifact_location)
    return settings.model_copy(update={
        "output_dir": _under(project, settings.output_dir),
        "ray": settings.ray.model_copy(update={"storage_path": _under(project, settings.ray.storage_path)}),
        "tracking": tracking})


def run_link(trained: TrainedModel) -> str:
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{trained.experiment_id}/runs/{trained.run_id}"
    return f"runs:/{trained.run_id}"


def summary_table(summary: RetrainSummary) -> Table:
    table = Table(title=f"retrain {summary.dataset}: selected epoch {summary.selected_epoch}, "
                        "logged checkpoint re-evaluated")
    table.add_column("metric")
    for split in summary.evaluation:
        table.add_column(split, justify="right")
    for name in METRIC_NAMES:
        table.add_row(name, *(f"{figures[name]:.4f}" for figures in summary.evaluation.values()))
    return table


def summary_lines(summary: RetrainSummary) -> list[str]:
    extracted = ", ".join(summary.stages_run) if summary.stages_run else "up to date"
    pushed = "skipped" if summary.files_pushed is None else f"{summary.files_pushed} files"
    return [f"data version  {summary.data_version} ({extracted}); DVC push: {pushed}",
            f"MLflow run    {summary.run_link}",
            f"model         {summary.model_uri}",
            f"registry      {summary.decision}",
            f"from cache    {', '.join(summary.cached_steps) or 'nothing'}"]


def summary_markdown(summary: RetrainSummary) -> str:
    splits = list(summary.evaluation)
    rows = "\n".join(f"| {name} | " + " | ".join(f"{summary.evaluation[s][name]:.4f}" for s in splits) + " |"
                     for name in METRIC_NAMES)
    extracted = ", ".join(summary.stages_run) if summary.stages_run else "up to date (nothing re-extracted)"
    pushed = "skipped" if summary.files_pushed is None else f"{summary.files_pushed} files"
    return f"""# Retraining on {summary.dataset}

| | |
|---|---|
| data version | `{summary.data_version}` ({extracted}) |
| DVC push | {pushed} |
| MLflow run | [{summary.run_id}]({summary.run_link}) |
| logged model | `{summary.model_uri}` |
| registry | {summary.decision} |
| steps restored from cache | {', '.join(summary.cached_steps) or 'none'} |
| serve | `mmim serve --model models:/{summary.registration.model_name}@champion` |

Selected epoch {summary.selected_epoch} (lowest validation MAE); figures of the logged checkpoint:

| metric | {' | '.join(splits)} |
|---|{'---|' * len(splits)}
{rows}
"""


def _log_table(table: Table) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=110, color_system=None).print(table)
    return buffer.getvalue()


@flow(name="retrain", description="DVC extraction -> Ray training -> MLflow -> gated registration")
def retrain(dataset: str = "synthetic", config: str = "configs/demo.yaml", overrides: list[str] | None = None,
            project_dir: str = ".", push: bool = True, remote: str | None = None,
            refresh: bool = False) -> dict[str, Any]:
    """Retrain MMIM on `dataset` (an entry of params.yaml `datasets`) with `config`.

    Args:
        dataset: the DVC stage extract@<dataset> builds the store data/stores/<dataset>.
        config: YAML config, relative to `project_dir` unless absolute (configs/mosi.yaml).
        overrides: `section.key=value` settings applied on top of the config.
        project_dir: the checkout holding dvc.yaml, params.yaml and the configs.
        push: send the store to the DVC remote after extraction.
        remote: DVC remote name (default: the repository's default remote).
        refresh: ignore cached step results (DVC still skips an up-to-date extraction).
    """
    log = get_run_logger()
    project = Path(project_dir).resolve()
    settings: Config = _run("load_config", pipeline_config, project, config, overrides or [])
    model_name = registered_model_name(settings.model_copy(
        update={"data": settings.data.model_copy(update={"dvc_dataset": dataset})}))

    step = Steps(refresh)
    features: FeatureStoreRef = step("extract_features", extract_features, dataset, str(project))
    pushed = step("push_features", push_features, features, str(project), remote) if push else None
    trained: TrainedModel = step("train", train, features, settings, str(project))
    evaluation = step("evaluate", evaluate, trained, features, str(project))
    registration: Registration = step("register", register, trained, evaluation, model_name,
                                      settings.tracking.metric, settings.tracking.margin)

    summary = RetrainSummary(dataset=dataset, data_version=features.data_version, stages_run=features.stages_run,
                             files_pushed=pushed, run_id=trained.run_id, run_link=run_link(trained),
                             model_uri=trained.model_uri, selected_epoch=trained.epoch, evaluation=evaluation,
                             registration=registration, cached_steps=step.cached)
    log.info("summary\n%s%s", _log_table(summary_table(summary)), "\n".join(summary_lines(summary)))
    key = re.sub(r"[^a-z0-9-]+", "-", f"retrain-{dataset.lower()}")
    create_markdown_artifact(summary_markdown(summary), key=key, description=summary.decision)
    return summary.model_dump()


# ---------------------------------------------------------------- command line

def _hints(summary: RetrainSummary) -> list[str]:
    scripts = os.path.relpath(Path(sys.executable).parent)  # where mlflow, prefect and mmim are
    scripts = scripts if not scripts.startswith("..") else str(Path(sys.executable).parent)
    uri = tracking_uri()
    mlflow_ui = uri if uri.startswith("http") else f"{scripts}/mlflow ui --backend-store-uri {uri}   (http://127.0.0.1:5000)"
    name = summary.registration.model_name
    return [f"MLflow UI:   {mlflow_ui}",
            f"Prefect UI:  {scripts}/prefect server start   (http://127.0.0.1:4200; shows this run)",
            f"registry:    {scripts}/mmim registry list --name {name}",
            f"serve:       {scripts}/mmim serve --model models:/{name}@champion"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    parser.add_argument("--dataset", default="synthetic", help="entry of params.yaml `datasets`")
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (relative to --project-dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--project-dir", default=".", help="checkout with dvc.yaml and params.yaml")
    parser.add_argument("--no-push", action="store_true", help="do not push the store to the DVC remote")
    parser.add_argument("--remote", help="DVC remote (default: the repository's default)")
    parser.add_argument("--refresh", action="store_true", help="ignore cached step results")
    args = parser.parse_args(argv)
    quiet_libraries()
    for library in ("mlflow", "dvc"):  # their progress lines repeat what the steps log
        logging.getLogger(library).setLevel(logging.WARNING)
    console = Console(stderr=True)
    try:
        result = retrain(dataset=args.dataset, config=args.config, overrides=args.set,
                         project_dir=args.project_dir, push=not args.no_push, remote=args.remote,
                         refresh=args.refresh)
    except StepFailed as error:
        console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        return EXIT_BAD_INPUT if error.bad_input else EXIT_FAILED
    summary = RetrainSummary.model_validate(result)
    stdout = Console()
    stdout.print(summary_table(summary))
    for line in summary_lines(summary) + [""] + _hints(summary):
        stdout.print(line, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
