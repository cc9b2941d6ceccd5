"""The `mmim` command line.

    mmim data synth --out DIR                     write the synthetic sample (MulT release format)
    mmim extract --source S --input P --out DIR --encoder NAME   source files (or recordings) -> feature store
    mmim data recordings-sample --out DIR         write generated recordings (label.csv + Raw/)
    mmim data check --store DIR [--previous DIR]  leakage, lengths and label drift before training
    mmim train --config FILE [--set key=value]    train (one process, or --workers N with Ray)
    mmim train --config FILE --track              and log, score against the champion, register
    mmim train --config FILE --seeds 1111,1112,1113   once per seed with Ray: mean ± std, gated on the mean
    mmim tune --config FILE --trials N            search hyperparameters with Ray Tune (resumable)
    mmim evaluate --checkpoint DIR --store DIR    metrics of a checkpoint on valid/test
    mmim predict --checkpoint DIR|models:/... --input FILE   scores for raw utterances (JSON)
    mmim predict --checkpoint DIR|models:/... --recording FILE --text "..."   score a recording
    mmim registry {list,promote,rollback} --name mmim-<dataset>   the MLflow model registry
    mmim serve --model models:/mmim-<dataset>@champion             REST /invocations
    mmim serve --ray --replicas 2 --model models:/...@champion   on Ray Serve, following the alias
    mmim score --model models:/...@champion --input STORE|FILE --out FILE.parquet   batch, on Ray Data

Bad input of any kind prints one line, `error: ...`, and exits with code 2; a service that
does not answer (MLflow, a DVC remote, a Ray cluster) or a failed run exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from mmim import cli_parser, tables
from mmim.core.config import Config, load_config
from mmim.core.errors import (
    DistributedTrainingError,
    MMIMInputError,
    SearchInterrupted,
    ServiceUnavailableError,
    TrainingDiverged,
)
from mmim.core.metrics import METRIC_NAMES
from mmim.data.extract import extract
from mmim.data.store_writer import ExtractionSummary
from mmim.data.synthetic import write_synthetic_raw
from mmim.terminal import configure_logging, counter

# torch, and what needs it (training, checkpoints, predictions), is imported by the commands
# that use it: `mmim extract` and `mmim data synth` (DVC's stage commands) and --help start
# in well under a second.
if TYPE_CHECKING:
    from mmim.lifecycle.training import Trained

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# Ids, paths and messages are printed as they are: no rich markup or :emoji: codes in them.
console = Console(stderr=True, markup=False, emoji=False)
stdout = Console(markup=False, emoji=False)


def cmd_train(args: argparse.Namespace) -> None:
    overrides = _training_overrides(args)
    config = load_config(args.config, overrides)
    if args.submit:
        from mmim.cluster.jobs import submit_training_job

        job_id = submit_training_job(args.submit, args.config, overrides)
        stdout.print(f"submitted Ray job {job_id} to {args.submit}")
        return
    from mmim.lifecycle.retrain import retrain, train_checked  # MLflow is imported only to track
    from mmim.training.engine import epoch_line
    from mmim.training.progress import ProgressHooks, stage_progress

    def on_epoch(metrics: dict) -> None:
        stdout.print(epoch_line(metrics, config.train.epochs), highlight=False)

    with stage_progress(console) as progress:
        bars = partial(ProgressHooks, progress)  # a bar per stage, when training in this process
        if config.tracking.enabled:
            if not args.verbose:  # importing mlflow configures its own logger at INFO
                logging.getLogger("mlflow").setLevel(logging.WARNING)
            done = retrain(config, on_epoch, args.overwrite, bars, on_step=lambda what: console.print(what + " ..."))
            trained = done.trained
        else:
            trained = train_checked(config, on_epoch, args.overwrite, bars)
    _print_training(config, trained)
    if config.tracking.enabled:
        stdout.print(
            f"data checks: {done.checks.tags()['data_checks']}\n"
            f"MLflow run {done.logged.run_id}; {done.decision.name} v{done.decision.version}: {done.decision.text}",
            highlight=False,
            soft_wrap=True,  # one line each, to read or to grep
        )


def _print_training(config: Config, trained: Trained) -> None:
    result = trained.result
    if trained.seeds:
        stdout.print(tables.seeds_table(trained.seeds))
        stdout.print(f"selected: seed {trained.seeds['best_seed']}, epoch {result.best_epoch} (lowest validation MAE)")
    else:
        title = f"selected epoch {result.best_epoch} (lowest validation MAE)"
        if config.ray.num_workers > 0:
            title += f", {config.ray.num_workers} Ray workers"
        stdout.print(tables.metrics_table(title, {split: _split(result.best, split) for split in ("valid", "test")}))
    stdout.print(f"checkpoint: {result.checkpoint}")


def _split(flat: dict[str, float], split: str) -> dict[str, float]:
    return {name: flat[f"{split}_{name}"] for name in METRIC_NAMES}


def _training_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if getattr(args, "seeds", None) is not None:  # `mmim train` only
        listed = args.seeds.replace(" ", "")
        if not re.fullmatch(r"\d{1,10}(,\d{1,10})*", listed):
            raise MMIMInputError(f"--seeds {args.seeds[:40]!r}: comma-separated whole numbers, e.g. 1111,1112,1113")
        seeds = [int(seed) for seed in listed.split(",")]  # 0011 is 11, not YAML's octal
        overrides.append(f"train.seeds={json.dumps(seeds)}")
    if args.workers is not None:
        overrides.append(f"ray.num_workers={args.workers}")
    if args.gpu:
        overrides += ["ray.use_gpu=true", "train.device=cuda"]
    if getattr(args, "track", False):  # `mmim train` only
        overrides.append("tracking.enabled=true")
    return overrides


def cmd_tune(args: argparse.Namespace) -> None:
    from mmim.cluster.tune import load_search_spec, search
    from mmim.lifecycle.checks import check_config_store

    config = load_config(args.config, _training_overrides(args))
    spec = load_search_spec(args.search)
    stem = Path(args.config).stem if args.config else "defaults"
    name = args.name or "search-" + re.sub(r"[^A-Za-z0-9_.-]", "-", stem)
    best_path = Path(args.best_config or Path("runs") / "search" / f"{name}.yaml")
    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    check_config_store(config)  # before any trial, as mmim train and the flow
    result = search(config, spec, args.trials, name, best_path, args.concurrent)
    stdout.print(
        tables.trials_table(
            f"search {name}: {len(result.trials)} trials" + (" (resumed)" if result.resumed else ""), result.trials
        )
    )
    for line in tables.trial_errors(result.trials):
        stdout.print(line, highlight=False, soft_wrap=True, markup=False)
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
    stdout.print(tables.metrics_table(f"{args.checkpoint} on {args.store}", results))
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
    title = f"data checks of {args.store}" + (f" against {args.previous}" if args.previous else "")
    stdout.print(tables.checks_table(title, report))
    if report.failed:
        raise MMIMInputError(f"{args.store}: data check(s) failed: " + "; ".join(c.line() for c in report.failed))


def _print_store_summary(summary: ExtractionSummary, listed: frozenset[str] = frozenset()) -> None:
    """The store's table (or one line), then what was dropped, except the ids already `listed`."""
    repaired = sum(summary.nonfinite_zeroed.values()) + sum(summary.empty_padded.values())
    if summary.dropped or repaired:  # the table, when there is something in it to read
        stdout.print(tables.store_table(summary))
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
    with counter(console, "extracting") as (progress, task):
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


def _extract_recordings(args: argparse.Namespace) -> None:
    from mmim.data.recordings.job import RecordingsProgress, extract_recordings

    if args.input is None:
        raise MMIMInputError("--input is required for --source recordings (data/raw/<dataset>)")
    if args.workers is not None and args.workers < 0:
        raise MMIMInputError(f"--workers {args.workers}: must be 0 (in this process) or more")
    settings = cli_parser.extractor_settings(args)
    with counter(console, "reading clips") as (progress, task):
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
        f"{recordings.cached} from the cache {args.cache}, {skipped}"
        + (f", {recordings.replaced} cache entries replaced" if recordings.replaced else ""),
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
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        stdout.print(tables.registry_table(f"{args.name} ({tracking_uri()})", rows))


def cmd_score(args: argparse.Namespace) -> None:
    """A whole store or file of utterances through a registered model, on Ray Data, to Parquet."""
    from mmim.lifecycle.batch_scoring import score_archive

    with counter(console, "scoring") as (progress, task):
        summary = score_archive(
            args.model, Path(args.input), Path(args.out), workers=args.workers, batch_size=args.batch_size,
            ray_address=args.ray_address, advance=partial(progress.advance, task),
        )  # fmt: skip
    stdout.print(str(summary))


def cmd_serve(args: argparse.Namespace) -> None:
    """MLflow's scoring server for a registered model behind request limits (this environment's
    uvicorn), or Ray Serve; a model that does not resolve is a one-line error before anything starts."""
    from mmim.registry.serving import check_address, check_model, serve_command

    check_address(args.host, args.port, args.max_request_mb)
    if args.ray:  # replicas, batching, the alias followed
        from mmim.lifecycle.ray_serving import ServeSettings, serve_until_stopped

        settings = ServeSettings.from_options(args)  # bad options fail before the registry is asked
        check_model(args.model)
        return serve_until_stopped(settings, args.host, args.port, args.ray_address)
    check_model(args.model)
    command, env = serve_command(args.model, args.host, args.port, int(args.max_request_mb * 2**20))
    os.execve(command[0], command, env)


COMMANDS = {name.removeprefix("cmd_"): command for name, command in list(globals().items()) if name.startswith("cmd_")}


def build_parser() -> argparse.ArgumentParser:
    return cli_parser.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(console, args.verbose)
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
