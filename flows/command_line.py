"""`python -m flows.retrain`: the flow from a terminal. Bad input is refused in one line before
Prefect starts; the summary and the commands to look at the results are printed at the end."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

import yaml
from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console
from rich.text import Text

from flows.retrain import EXIT_BAD_INPUT, EXIT_FAILED, StepFailed, config_file, in_project, pipeline_config, retrain
from flows.summary import RetrainSummary, checkpoint_here, local, summary_rows, summary_table
from mmim.core.errors import MMIMInputError
from mmim.data.recordings.layout import read_dataset
from mmim.data.versioning import check_inputs, store_path
from mmim.registry.server import tracking_uri
from mmim.terminal import quiet_libraries


def _hints(summary: RetrainSummary, project: Path) -> list[str]:
    scripts = local(Path(sys.executable).parent)  # where mlflow, prefect and mmim are
    uri = tracking_uri()
    mlflow_ui = (
        summary.run_link
        if uri.startswith("http")
        else f"{scripts}/mlflow ui --backend-store-uri {uri}   then {summary.run_link}"
    )
    name = summary.registration.model_name
    checkpoints = [c for c in (checkpoint_here(summary), f"models:/{name}@champion") if c]
    given = _prediction_input(project, summary.dataset)
    predict = [f"{scripts}/mmim predict --checkpoint {c} {given}" for c in checkpoints]
    return [
        f"MLflow UI:   {mlflow_ui}",
        f"Prefect UI:  {scripts}/prefect server start   (http://127.0.0.1:4200; shows this run)",
        *(f"{'predict:' if i == 0 else '':<13}{line}" for i, line in enumerate(predict)),
        (
            f"evaluate:    {scripts}/mmim evaluate --checkpoint {checkpoints[0]} "
            f"--store {local(project / store_path(summary.dataset))}"
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
            return f"--recording {local(whole.path)} --text {shlex.quote(whole.text)}"
    return f"--input {local(project / 'examples' / 'utterances.json')}"


def _print_error(message: str) -> None:
    Console(stderr=True, markup=False, emoji=False).print(Text.assemble(("error: ", "red"), message), soft_wrap=True)


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
    # Prefect's temporary API server (started with the flow, from this environment) would send
    # usage figures, and log an ERROR on each failure to on a machine with no way out; set the
    # variable to true to send them.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
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

            load_search_spec(in_project(project, args.search_space))
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
    stdout = Console(markup=False, emoji=False)  # ids and paths printed as they are
    stdout.print(summary_table(summary))
    for label, text in summary_rows(summary):
        stdout.print(f"{label:<14}{text}", highlight=False, soft_wrap=True)
    stdout.print()
    for line in _hints(summary, project):
        stdout.print(line, highlight=False, soft_wrap=True)
    return 0
