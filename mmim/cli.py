"""The `mmim` command line.

    mmim data synth --out DIR                     write the synthetic sample (MulT release format)
    mmim extract --source S --input P --out DIR --encoder NAME   source files (or recordings) -> feature store
    mmim data recordings-sample --out DIR         write generated recordings (label.csv + Raw/)
    mmim data check --store DIR [--previous DIR]  leakage, lengths and label drift before training
    mmim train --config FILE [--set key=value]    train (one process, or --workers N with Ray)
    mmim train --config FILE --seeds 1111,1112,1113   once per seed with Ray: mean ± std, gated on the mean
    mmim tune --config FILE --trials N            search hyperparameters with Ray Tune (resumable)
    mmim evaluate --checkpoint DIR --store DIR    metrics of a checkpoint on valid/test
    mmim predict --checkpoint DIR|models:/... --input FILE   scores for raw utterances (JSON)
    mmim predict --checkpoint DIR|models:/... --recording FILE --text "..."   score a recording
    mmim registry {list,promote,rollback} --name mmim-<dataset>   the MLflow model registry
    mmim serve --model models:/mmim-<dataset>@champion             REST /invocations

Bad input of any kind prints one line, `error: ...`, and exits with code 2; a service that
does not answer (MLflow, a DVC remote, a Ray cluster) or a failed run exits with code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mmim.core.config import Config, load_config
from mmim.core.errors import (
    DistributedTrainingError,
    MMIMInputError,
    SearchInterrupted,
    ServiceUnavailableError,
    TrainingDiverged,
)
from mmim.core.limits import MAX_INPUT_BYTES
from mmim.core.metrics import METRIC_NAMES
from mmim.data.extract import SOURCES, extract
from mmim.data.store_writer import ExtractionSummary
from mmim.data.synthetic import write_synthetic_raw
from mmim.terminal import quiet_libraries

# torch, and what needs it (training, checkpoints, predictions), is imported by the commands
# that use it: `mmim extract` and `mmim data synth` (DVC's stage commands) and --help start
# in well under a second.
if TYPE_CHECKING:
    from mmim.cluster.seeds import SeedsResult
    from mmim.registry.tracking import TrainingRun  # imported when tracking is on: it loads MLflow
    from mmim.training.train import TrainingResult

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
CHECKPOINT_HELP = (
    "checkpoint directory, or a registered model: models:/<name>@<alias>, "
    "models:/<name>/<version>, runs:/<run id>/model"
)
console = Console(stderr=True)
stdout = Console()


def _metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per split."""
    table = Table(title=title)
    table.add_column("metric")
    for split in columns:
        table.add_column(split, justify="right")
    for name in METRIC_NAMES:
        table.add_row(name, *(f"{metrics[name]:.4f}" for metrics in columns.values()))
    return table


def _train(config: Config, on_epoch: Callable[[dict], None], overwrite: bool) -> tuple[TrainingResult, str]:
    """The result of one training, with Ray workers or in this process, and a title for its table."""
    title = "selected epoch {} (lowest validation MAE)"
    if config.ray.num_workers > 0:
        from mmim.cluster.distributed import train_distributed  # Ray, only for a Ray run

        result = train_distributed(config, on_epoch, overwrite)
        return result, f"{title.format(result.best_epoch)}, {config.ray.num_workers} Ray workers"
    from mmim.training.progress import ProgressHooks, stage_progress
    from mmim.training.train import train

    with stage_progress(console) as progress:
        result = train(config, ProgressHooks(progress, on_epoch), overwrite)
    return result, title.format(result.best_epoch)


def cmd_train(args: argparse.Namespace) -> None:
    overrides = _training_overrides(args)
    config = load_config(args.config, overrides)
    if args.submit:
        from mmim.cluster.jobs import submit_training_job

        job_id = submit_training_job(args.submit, args.config, overrides)
        stdout.print(f"submitted Ray job {job_id} to {args.submit}")
        return
    from mmim.training.engine import epoch_line
    from mmim.training.train import prepare_output_dir

    prepare_output_dir(config, args.overwrite)  # before an MLflow run exists for a training refused here
    if config.train.seeds:
        from mmim.cluster.seeds import check_seeds

        check_seeds(config)
    opened: contextlib.AbstractContextManager[TrainingRun | None] = contextlib.nullcontext()
    if config.tracking.enabled:  # the MLflow run exists from before the first epoch
        from mmim.registry.tracking import tracked_run

        if not args.verbose:  # importing mlflow configures its own logger at INFO
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        opened = tracked_run(config)

    other_seeds: list[Path] = []
    with opened as tracking:
        if config.train.seeds:
            from mmim.cluster.seeds import train_seeds

            seeds = train_seeds(config, tracking, args.overwrite)
            stdout.print(_seeds_table(seeds))
            result, other_seeds = seeds.best, seeds.other_checkpoints()
            stdout.print(f"selected: seed {seeds.best_seed}, epoch {result.best_epoch} (lowest validation MAE)")
        else:

            def on_epoch(metrics: dict) -> None:
                stdout.print(epoch_line(metrics, config.train.epochs), highlight=False)
                if tracking is not None:
                    tracking.log_epoch(metrics)

            result, title = _train(config, on_epoch, args.overwrite)
            selected = result.best
            stdout.print(
                _metrics_table(
                    title,
                    {
                        split: {name: selected[f"{split}_{name}"] for name in METRIC_NAMES}
                        for split in ("valid", "test")
                    },
                )
            )
        stdout.print(f"checkpoint: {result.checkpoint}")
        if tracking is not None:
            with console.status("logging the model to MLflow"):
                tracked = tracking.log_model(result)
    if tracking is not None:
        from mmim.registry.tracking import register_run

        with console.status("scoring the model and the registry's champion on the same data"):
            decision = register_run(config, tracked, result.checkpoint, other_seeds)
        stdout.print(f"MLflow run {tracked.run_id}; {decision.name} v{decision.version}: {decision.text}")


def _seeds_table(seeds: SeedsResult) -> Table:
    """MMSA's way: each metric's mean ± standard deviation over seeds, then every seed's test figure."""
    table = Table(
        title=f"{len(seeds.seeds)} seeds, each at its selected epoch: mean ± std on valid and test, "
        "then each seed's test figure"
    )
    table.add_column("metric")
    for column in ("valid", "test", *(f"seed {seed}" for seed in seeds.seeds)):
        table.add_column(column, justify="right", no_wrap=True)
    for name in METRIC_NAMES:
        spread = [seeds.statistics[f"{split}_{name}"] for split in ("valid", "test")]
        each = [f"{result.best[f'test_{name}']:.4f}" for result in seeds.seeds.values()]
        table.add_row(name, *(f"{mean:.4f} ± {std:.4f}" for mean, std in spread), *each)
    return table


def _training_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if getattr(args, "seeds", None) is not None:  # `mmim train` only
        listed = args.seeds.replace(" ", "")
        if not re.fullmatch(r"\d+(,\d+)*", listed):
            raise MMIMInputError(f"--seeds {args.seeds!r}: comma-separated whole numbers, e.g. 1111,1112,1113")
        seeds = [int(seed) for seed in listed.split(",")]  # 0011 is 11, not YAML's octal
        overrides.append(f"train.seeds={json.dumps(seeds)}")
    if args.workers is not None:
        overrides.append(f"ray.num_workers={args.workers}")
    if args.gpu:
        overrides += ["ray.use_gpu=true", "train.device=cuda"]
    return overrides


def cmd_tune(args: argparse.Namespace) -> None:
    from mmim.cluster.tune import load_search_spec, search

    config = load_config(args.config, _training_overrides(args))
    spec = load_search_spec(args.search)
    stem = Path(args.config).stem if args.config else "defaults"
    name = args.name or "search-" + re.sub(r"[^A-Za-z0-9_.-]", "-", stem)
    best_path = Path(args.best_config or Path("runs") / "search" / f"{name}.yaml")
    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    result = search(config, spec, args.trials, name, best_path, args.concurrent)
    table = Table(title=f"search {name}: {len(result.trials)} trials" + (" (resumed)" if result.resumed else ""))
    for column in ("trial", "status", "epochs", "valid MAE", "settings"):
        table.add_column(column, justify="right" if column in ("epochs", "valid MAE") else "left")
    for trial in sorted(result.trials, key=lambda t: (t.valid_MAE != t.valid_MAE, t.valid_MAE)):  # nan last
        settings = ", ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in sorted(trial.settings.items())
        )
        status = f"{trial.status}: {trial.error}" if trial.error else trial.status
        figure = "" if trial.valid_MAE != trial.valid_MAE else f"{trial.valid_MAE:.4f}"
        table.add_row(trial.trial_id, status, str(trial.epochs), figure, settings)
    stdout.print(table)
    stdout.print(
        f"best: valid MAE {result.best_valid_MAE:.4f} at epoch {result.best_epoch}; its config: {best_path}\n"
        f"MLflow parent run {result.parent_run_id} (each trial a child run)\n"
        f"train it: mmim train --config {best_path}"
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mmim.registry.server import local_checkpoint
    from mmim.training.predict import evaluate_checkpoint

    with local_checkpoint(args.checkpoint) as checkpoint:
        results = evaluate_checkpoint(checkpoint, args.store, tuple(args.split))
    stdout.print(_metrics_table(f"{args.checkpoint} on {args.store}", results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from mmim.registry.server import local_checkpoint
    from mmim.training.checkpoint import load_checkpoint
    from mmim.training.predict import predict_utterances, read_utterances

    if (args.input is None) == (args.recording is None):
        raise MMIMInputError("give --input FILE (frames as JSON), or --recording FILE with --text")
    if args.recording is not None and not (args.text or "").strip():
        raise MMIMInputError("--recording needs --text, the transcript of what is said")
    if args.recording is not None and not Path(args.recording).is_file():
        raise MMIMInputError(f"{args.recording}: no such file")
    utterances = read_utterances(args.input) if args.input else []  # before a model download: bad input fails fast
    with local_checkpoint(args.checkpoint) as checkpoint:
        model, config, tokenizer = load_checkpoint(checkpoint)
    if args.recording is not None:
        from mmim.data.recordings.scoring import model_extractor, recording_utterance

        with model_extractor(config.model.extractor) as extract, console.status("extracting features"):
            utterances = [recording_utterance(extract, args.recording, args.text, args.recording)]
    print(json.dumps(predict_utterances(model, tokenizer, utterances), indent=2))


def cmd_synth(args: argparse.Namespace) -> None:
    sizes = {"train": args.train, "valid": args.valid, "test": args.test}
    for name, size in sizes.items():
        if size < 2:
            raise MMIMInputError(f"--{name}: need at least 2 examples, got {size}")
    with console.status("synthesizing"):
        path = write_synthetic_raw(args.out, seed=args.seed, sizes=sizes)
    stdout.print(f"synthetic sample (MulT format): {path} ({', '.join(f'{k}={v}' for k, v in sizes.items())})")


def cmd_recordings_sample(args: argparse.Namespace) -> None:
    from mmim.data.recordings.sample import write_sample_dataset

    if args.videos < 6 or args.clips_per_video < 1:
        raise MMIMInputError(
            f"--videos {args.videos} --clips-per-video {args.clips_per_video}: need at least "
            "6 videos (2 per split) and 1 clip each"
        )
    with console.status("writing recordings"):
        sample = write_sample_dataset(
            args.out, videos=args.videos, clips_per_video=args.clips_per_video, seed=args.seed
        )
    stdout.print(
        f"recordings sample: {sample.root} ({', '.join(f'{k}={v}' for k, v in sample.counts.items())}; "
        f"{sample.seconds:.0f} s of media)",
        highlight=False,
        soft_wrap=True,
    )


def cmd_check(args: argparse.Namespace) -> None:
    from mmim.data.checks import check_store, store_profile

    previous = store_profile(args.previous, args.previous) if args.previous else None
    report = check_store(args.store, args.store, previous)
    table = Table(title=f"data checks of {args.store}" + (f" against {args.previous}" if args.previous else ""))
    for column in ("check", "kind", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        result = "ok" if check.passed else ("[red]FAILED[/red]" if check.hard else "[yellow]warning[/yellow]")
        table.add_row(check.name, "hard" if check.hard else "soft", result, check.line().split(": ", 1)[1])
    stdout.print(table)
    if report.failed:
        raise MMIMInputError(f"{args.store}: data check(s) failed: " + "; ".join(c.line() for c in report.failed))


def _summary_table(summary: ExtractionSummary) -> Table:
    table = Table(title=f"feature store {summary.root}")
    for column in ("split", "examples", "dropped", "NaN/inf zeroed (audio/vision)", "empty padded (audio/vision)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, count in summary.counts.items():
        dropped = sum(1 for split, _, _ in summary.dropped if split == name)
        zeroed = "/".join(str(summary.nonfinite_zeroed[(name, m)]) for m in ("audio", "vision"))
        empty = "/".join(str(summary.empty_padded[(name, m)]) for m in ("audio", "vision"))
        table.add_row(name, str(count), str(dropped), zeroed, empty)
    table.caption = f"dims: audio {summary.dims['audio']}, vision {summary.dims['vision']}"
    return table


def _print_store_summary(summary: ExtractionSummary, listed: frozenset[str] = frozenset()) -> None:
    """The store's table (or one line), then what was dropped, except the ids already `listed`."""
    repaired = sum(summary.nonfinite_zeroed.values()) + sum(summary.empty_padded.values())
    if summary.dropped or repaired:  # the table, when there is something in it to read
        stdout.print(_summary_table(summary))
    else:
        counts = ", ".join(f"{name} {count}" for name, count in summary.counts.items())
        stdout.print(
            f"feature store {summary.root}: {counts} examples, dims audio {summary.dims['audio']}, "
            f"vision {summary.dims['vision']}; nothing dropped, zeroed or padded",
            highlight=False,
            soft_wrap=True,
        )
    dropped = [entry for entry in summary.dropped if entry[1] not in listed]
    for split, example_id, reason in dropped[:20]:
        stdout.print(f"dropped {split}/{example_id}: {reason}", highlight=False)
    if len(dropped) > 20:
        stdout.print(f"... and {len(dropped) - 20} more dropped")


def cmd_extract(args: argparse.Namespace) -> None:
    if args.source == "recordings":
        _extract_recordings(args)
        return
    with _counter("extracting") as (progress, task):
        summary = extract(
            args.source,
            args.input,
            args.out,
            args.encoder,
            labels=args.labels,
            folds=args.folds,
            seed=args.seed,
            on_start=lambda total: progress.update(task, total=total),
            advance=lambda: progress.advance(task),
            **_store_options(args),
        )
    _print_store_summary(summary)


def _store_options(args: argparse.Namespace) -> dict:
    """What `mmim extract` passes to every source's store writer."""
    return {"max_tokens": args.max_tokens, "nonfinite": args.nonfinite, "overwrite": args.overwrite}


@contextlib.contextmanager
def _counter(description: str) -> Iterator[tuple[Progress, TaskID]]:
    """A transient progress bar with a count, on stderr: (progress, its task)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress, progress.add_task(description, total=None)


# `mmim extract --source recordings` options -> ExtractorSettings fields (params.yaml extraction.recordings)
RECORDING_OPTIONS = {
    "audio_features": "--audio-features",
    "audio_rate": "--audio-rate",
    "video_fps": "--video-fps",
    "video_width": "--video-width",
    "max_seconds": "--max-seconds",
    "max_pixels": "--max-pixels",
    "clip_timeout": "--clip-timeout",
}


def _extractor_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from mmim.data.recordings.extractor import ExtractorSettings

    given = {name: getattr(args, name) for name in RECORDING_OPTIONS if getattr(args, name) is not None}
    try:
        return ExtractorSettings(**given)
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0])
        raise MMIMInputError(f"{RECORDING_OPTIONS.get(name, name)} {given.get(name)!r}: {problem['msg']}") from None


def _extract_recordings(args: argparse.Namespace) -> None:
    from mmim.data.recordings.job import RecordingsProgress, extract_recordings

    if args.input is None:
        raise MMIMInputError("--input is required for --source recordings (data/raw/<dataset>)")
    if args.workers is not None and args.workers < 0:
        raise MMIMInputError(f"--workers {args.workers}: must be 0 (in this process) or more")
    settings = _extractor_settings(args)
    with _counter("reading clips") as (progress, task):
        recordings = extract_recordings(
            args.input,
            args.out,
            args.encoder,
            settings,
            cache_dir=args.cache,
            on_error=args.on_error,
            workers=args.workers,
            ray_address=args.ray_address,
            progress=RecordingsProgress(
                start=lambda total: progress.update(task, description="extracting clips", total=total),
                advance=lambda: progress.advance(task),
            ),
            **_store_options(args),
        )
    reasons = Counter(rejected.reason for rejected in recordings.skipped)
    skipped = f"{len(recordings.skipped)} skipped" + (
        f" ({', '.join(f'{reason}: {count}' for reason, count in reasons.most_common())})" if reasons else ""
    )
    stdout.print(
        f"{recordings.clips} clips in label.csv: {recordings.extracted} extracted, "
        f"{recordings.cached} from the cache {args.cache}, {skipped}",
        highlight=False,
        soft_wrap=True,
    )
    for rejected in recordings.skipped[:20]:
        detail = f" ({rejected.detail})" if rejected.detail else ""
        stdout.print(f"skipped {rejected.where}: {rejected.reason}{detail}", highlight=False, soft_wrap=True)
    if len(recordings.skipped) > 20:
        stdout.print(f"... and {len(recordings.skipped) - 20} more skipped")
    _print_store_summary(recordings.store, listed=frozenset(rejected.clip_id for rejected in recordings.skipped))


def cmd_registry(args: argparse.Namespace) -> None:
    from mlflow import MlflowClient

    from mmim.registry.server import answering, tracking_uri
    from mmim.registry.versions import describe, promote, rollback

    client = MlflowClient(tracking_uri())
    with answering(f"registered model {args.name}"):
        if args.registry_command == "promote":
            promote(client, args.name, args.version)
            stdout.print(f"{args.name}: champion -> v{args.version}")
        elif args.registry_command == "rollback":
            stdout.print(f"{args.name}: champion -> v{rollback(client, args.name)}")
        rows = describe(client, args.name)
    stdout.print(_registry_table(f"{args.name} ({tracking_uri()})", rows))


def _metric_cell(row: dict) -> str:
    """`MAE 0.8123` from the version's figure on its own data version (tag `valid_MAE/<data
    version>`; the value as written, if not a number)."""
    own = f"/{row.get('data_version')}"
    key, value = next(((k, v) for k, v in row.items() if k.startswith("valid_") and k.endswith(own)), ("", ""))
    try:
        value = f"{float(value):.4f}"
    except ValueError:
        pass
    return f"{key.removeprefix('valid_').removesuffix(own)} {value}".strip()


def _registry_table(title: str, rows: list[dict]) -> Table:
    """Versions and aliases never wrap or shorten; at 80 columns the decision and the
    run id (folded, never cut) take the lines they need."""
    table = Table(title=title)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("aliases", no_wrap=True)
    table.add_column("valid", no_wrap=True)
    table.add_column("decision", overflow="fold")
    table.add_column("run", overflow="fold")
    for row in rows:
        table.add_row(
            str(row["version"]),
            row["aliases"],
            _metric_cell(row),
            row.get("registry_decision", ""),
            row["run_id"] or "",
        )
    return table


def cmd_serve(args: argparse.Namespace) -> None:
    """MLflow's scoring server for a registered model, behind request limits, with this
    environment's uvicorn; a model that does not resolve is a one-line error before anything starts."""
    from mmim.registry.serving import check_model, serve_command

    if args.max_request_mb <= 0:
        raise MMIMInputError(f"--max-request-mb {args.max_request_mb}: must be positive")
    check_model(args.model)
    command, env = serve_command(args.model, args.host, args.port, int(args.max_request_mb * 2**20))
    os.execve(command[0], command, env)


def _add_training_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML config (see configs/); defaults when omitted")
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.epochs=3 (repeatable)",
    )
    command.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray Train workers (DDP); 0: one process without Ray (default: ray.num_workers)",
    )
    command.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (NCCL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmim", description="MMIM multimodal sentiment pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train_cmd = commands.add_parser("train", help="train in one process on a feature store")
    _add_training_options(train_cmd)
    train_cmd.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="train once per seed, side by side on Ray (e.g. 1111,1112,1113,1114,1115): mean ± std over seeds, "
        "the best-validation seed registered, champion gated on the mean (train.seeds)",
    )
    train_cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint an earlier run left in output_dir (refused otherwise)",
    )
    train_cmd.add_argument(
        "--submit",
        metavar="ADDRESS",
        help="submit this training as a Ray Job to the cluster at ADDRESS "
        "(e.g. http://head:8265), shipping the project with runtime_env",
    )
    train_cmd.set_defaults(run=cmd_train)

    tune_cmd = commands.add_parser(
        "tune", help="search hyperparameters with Ray Tune: every trial a Ray Train run and an MLflow child run"
    )
    _add_training_options(tune_cmd)
    tune_cmd.add_argument("--trials", type=int, required=True, metavar="N", help="trials to run")
    tune_cmd.add_argument(
        "--search", default="configs/search/mmim.yaml", metavar="FILE", help="search space file (default: %(default)s)"
    )
    tune_cmd.add_argument(
        "--name",
        help="the search's name in ray.storage_path and MLflow; run the same command again to resume it "
        "(default: search-<config file name>)",
    )
    tune_cmd.add_argument(
        "--best-config", metavar="FILE", help="where the best trial's config goes (default: runs/search/<name>.yaml)"
    )
    tune_cmd.add_argument(
        "--concurrent", type=int, metavar="K", help="trials at once (default: as many as the cluster has room for)"
    )
    tune_cmd.set_defaults(run=cmd_tune)

    evaluate_cmd = commands.add_parser("evaluate", help="metrics of a checkpoint on a feature store")
    evaluate_cmd.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    evaluate_cmd.add_argument("--store", required=True)
    evaluate_cmd.add_argument("--split", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    evaluate_cmd.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    evaluate_cmd.set_defaults(run=cmd_evaluate)

    predict = commands.add_parser("predict", help="scores for raw utterances given as JSON")
    predict.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, help=CHECKPOINT_HELP)
    predict.add_argument(
        "--input", metavar="FILE", help='JSON list of {"text": str, "audio": [[...]], "vision": [[...]]}; - for stdin'
    )
    predict.add_argument(
        "--recording",
        metavar="FILE",
        help="a recording (mp4, mkv, webm, avi, wav, flac) for a model trained on recordings; "
        "its features come from the extractor the model was trained with",
    )
    predict.add_argument("--text", help="with --recording: the transcript of what is said")
    predict.set_defaults(run=cmd_predict)

    extract_cmd = commands.add_parser("extract", help="source files -> feature store (the DVC stage)")
    extract_cmd.add_argument("--source", required=True, choices=(*SOURCES, "recordings"))
    extract_cmd.add_argument(
        "--input",
        help="pickle, directory or .csd directory (not for synthetic); "
        "recordings: data/raw/<dataset> with label.csv and Raw/",
    )
    extract_cmd.add_argument("--out", required=True, help="store directory to create")
    extract_cmd.add_argument("--encoder", required=True, help="tokenizer: Hugging Face name or local directory")
    extract_cmd.add_argument("--max-tokens", type=int, default=50)
    extract_cmd.add_argument(
        "--nonfinite",
        choices=["zero", "fail"],
        default="zero",
        help="NaN/inf in features: replace by 0 and count (default), or fail",
    )
    extract_cmd.add_argument("--labels", help="mult: the label CSV (default: the *label*.csv beside the pickle)")
    extract_cmd.add_argument("--folds", help="csd: folds JSON, or cmu_mosi (default: INPUT/folds.json)")
    extract_cmd.add_argument("--seed", type=int, default=0, help="synthetic: the seed")
    extract_cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing feature store or an empty directory (anything else at --out is refused)",
    )
    recordings = extract_cmd.add_argument_group(
        "recordings", "--source recordings only (params.yaml extraction.recordings; defaults in parentheses)"
    )
    recordings.add_argument(
        "--audio-features",
        dest="audio_features",
        choices=["eGeMAPSv02", "ComParE_2016"],
        help="openSMILE low-level descriptor set (eGeMAPSv02: 25 per frame; ComParE_2016: 65)",
    )
    recordings.add_argument(
        "--audio-rate", dest="audio_rate", type=float, metavar="HZ", help="audio frames per second, at most 100 (50)"
    )
    recordings.add_argument(
        "--video-fps", dest="video_fps", type=float, metavar="FPS", help="video frames analysed per second (15)"
    )
    recordings.add_argument(
        "--video-width",
        dest="video_width",
        type=int,
        metavar="PIXELS",
        help="frames are scaled down to this width before face detection (480)",
    )
    recordings.add_argument(
        "--max-seconds",
        dest="max_seconds",
        type=float,
        metavar="S",
        help="longer clips are skipped, never decoded (60)",
    )
    recordings.add_argument(
        "--max-pixels",
        dest="max_pixels",
        type=int,
        metavar="N",
        help="videos with larger frames (width x height) are skipped (3840x2160)",
    )
    recordings.add_argument(
        "--clip-timeout",
        dest="clip_timeout",
        type=float,
        metavar="S",
        help="a clip taking longer is abandoned and skipped (120)",
    )
    recordings.add_argument(
        "--cache",
        default="data/cache/recordings",
        help="per-clip feature cache, reused across runs (default: %(default)s)",
    )
    recordings.add_argument(
        "--on-error",
        dest="on_error",
        choices=["skip", "fail"],
        default="skip",
        help="a clip that cannot be used: skip it and count it (default), or stop with exit code 2 and write no store",
    )
    recordings.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray Data extractor actors (default: the cluster's CPUs); 0: in this process",
    )
    recordings.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="ADDRESS",
        help="Ray cluster to extract on (default: RAY_ADDRESS, else a local one)",
    )
    extract_cmd.set_defaults(run=cmd_extract)

    registry = commands.add_parser("registry", help="the MLflow model registry (MLFLOW_TRACKING_URI)")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True)
    for name, text in (
        ("list", "versions, aliases and gating decisions"),
        ("promote", "point champion at a version"),
        ("rollback", "champion back to the version it replaced"),
    ):
        sub = registry_commands.add_parser(name, help=text)
        sub.add_argument("--name", required=True, help="registered model, e.g. mmim-mosi")
        if name == "promote":
            sub.add_argument("--version", required=True)
        sub.set_defaults(run=cmd_registry)

    serve = commands.add_parser("serve", help="REST predictions from a registered model (MLflow's scoring server)")
    serve.add_argument(
        "--model",
        default="models:/mmim-synthetic@champion",
        help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/model (default: %(default)s)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument(
        "--max-request-mb",
        type=float,
        default=MAX_INPUT_BYTES / 2**20,
        help="larger request bodies are refused with HTTP 413 (default: %(default)s)",
    )
    serve.set_defaults(run=cmd_serve)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic sample in the MulT release format")
    synth.add_argument("--out", required=True, help="directory to create (pickle + label CSV)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=1284, help="examples (default: MOSI's %(default)s)")
    synth.add_argument("--valid", type=int, default=229)
    synth.add_argument("--test", type=int, default=686)
    synth.set_defaults(run=cmd_synth)
    sample = data.add_parser(
        "recordings-sample", help="write generated recordings (label.csv + Raw/) for --source recordings"
    )
    sample.add_argument("--out", required=True, help="directory to create")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--videos", type=int, default=16, help="videos (default: %(default)s)")
    sample.add_argument(
        "--clips-per-video",
        dest="clips_per_video",
        type=int,
        default=3,
        help="clips of each video (default: %(default)s)",
    )
    sample.set_defaults(run=cmd_recordings_sample)
    check = data.add_parser("check", help="check a feature store before training (leakage, lengths, drift)")
    check.add_argument("--store", required=True, help="the feature store to check")
    check.add_argument("--previous", help="an earlier version of it: sizes and label drift are compared")
    check.set_defaults(run=cmd_check)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    if not verbose:  # the progress hooks print one line per epoch, extract its own summary
        for module in (
            "mmim.training.engine",
            "mmim.data.store_writer",
            "mmim.data.recordings.job",
            "mmim.data.recordings.sample",
        ):
            logging.getLogger(module).setLevel(logging.WARNING)
        quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        args.run(args)
    except MMIMInputError as error:
        console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        return EXIT_BAD_INPUT
    except (ServiceUnavailableError, DistributedTrainingError, TrainingDiverged, SearchInterrupted) as error:
        console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        return EXIT_FAILED
    except BrokenPipeError:  # `mmim predict ... | head`: the reader is gone, nothing is wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
