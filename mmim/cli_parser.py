"""The `mmim` command line's options: every command, its arguments and their help."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mmim.core.errors import MMIMInputError
from mmim.core.limits import MAX_INPUT_BYTES
from mmim.data.extract import SOURCES

CHECKPOINT_HELP = (
    "checkpoint directory, or a registered model: models:/<name>@<alias>, "
    "models:/<name>/<version>, runs:/<run id>/model"
)
RAY_ADDRESS_HELP = "Ray cluster to run on (default: RAY_ADDRESS, else a private local one)"
Command = Callable[[argparse.Namespace], None]


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


def build_parser(handlers: dict[str, Command]) -> argparse.ArgumentParser:
    """The parser; each command's `run` is `handlers[<its name>]` (mmim.cli's cmd_* functions)."""
    parser = argparse.ArgumentParser(prog="mmim", description="MMIM multimodal sentiment pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train_cmd = commands.add_parser(
        "train", help="check a feature store and train on it (one process, Ray workers, or a run per seed)"
    )
    _add_training_options(train_cmd)
    train_cmd.add_argument(
        "--seeds",
        metavar="S1,S2,...",
        help="train once per seed, side by side on Ray (e.g. 1111,1112,1113,1114,1115): mean ± std over seeds, "
        "the best-validation seed registered, champion gated on the mean (train.seeds)",
    )
    train_cmd.add_argument(
        "--track",
        action="store_true",
        help="the whole retraining in this process: data checks, training, the MLflow run and model, "
        "the head-to-head with the champion, a registered version (tracking.enabled)",
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
    train_cmd.set_defaults(run=handlers["train"])

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
    tune_cmd.set_defaults(run=handlers["tune"])

    evaluate_cmd = commands.add_parser("evaluate", help="metrics of a checkpoint on a feature store")
    evaluate_cmd.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    evaluate_cmd.add_argument("--store", required=True)
    evaluate_cmd.add_argument("--split", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    evaluate_cmd.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    evaluate_cmd.set_defaults(run=handlers["evaluate"])

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
    predict.set_defaults(run=handlers["predict"])

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
    recordings.add_argument("--ray-address", dest="ray_address", metavar="ADDRESS", help=RAY_ADDRESS_HELP)
    extract_cmd.set_defaults(run=handlers["extract"])

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
        sub.add_argument(
            "--json", action="store_true", help="print the versions as JSON, every value whole, instead of the table"
        )
        sub.set_defaults(run=handlers["registry"])

    serve = commands.add_parser(
        "serve", help="REST predictions from a registered model (MLflow's scoring server, or Ray Serve)"
    )
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
    on_ray = serve.add_argument_group("on Ray Serve (--ray): replicas, batching, the alias followed")
    on_ray.add_argument("--ray", action="store_true", help="serve on Ray Serve instead of MLflow's one-process server")
    on_ray.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default: 1)")
    on_ray.add_argument("--max-replicas", type=int, metavar="M", help="autoscale between --replicas and M")
    on_ray.add_argument("--replica-cpus", type=float, default=1.0, metavar="C", help="CPUs per model replica (1)")
    on_ray.add_argument(
        "--featurizer-replicas", type=int, default=1, metavar="N", help="replicas that decode recordings (1)"
    )
    on_ray.add_argument("--batch-size", type=int, default=16, help="utterances scored at once (default: 16)")
    on_ray.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (10)")
    on_ray.add_argument(
        "--follow-every", type=float, default=10.0, metavar="S", help="seconds between checks of the alias (10)"
    )
    on_ray.add_argument("--ray-address", dest="ray_address", metavar="ADDRESS", help=RAY_ADDRESS_HELP)
    serve.set_defaults(run=handlers["serve"])

    score = commands.add_parser("score", help="score a whole archive with a registered model (Ray Data) into Parquet")
    score.add_argument("--model", required=True, help="models:/<name>@<alias> (resolved once) or /<version>")
    score.add_argument("--input", required=True, help="a store, a recordings dataset, or .json/.jsonl/.csv utterances")
    score.add_argument("--out", required=True, help="the .parquet file to write; a rerun finishes an interrupted one")
    score.add_argument("--workers", type=int, default=1, metavar="N", help="scoring actors (default: 1)")
    score.add_argument("--batch-size", type=int, default=64, help="utterances an actor scores at once (64)")
    score.add_argument("--ray-address", dest="ray_address", metavar="ADDRESS", help=RAY_ADDRESS_HELP)
    score.set_defaults(run=handlers["score"])

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic sample in the MulT release format")
    synth.add_argument("--out", required=True, help="directory to create (pickle + label CSV)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=1284, help="examples (default: MOSI's %(default)s)")
    synth.add_argument("--valid", type=int, default=229)
    synth.add_argument("--test", type=int, default=686)
    synth.set_defaults(run=handlers["synth"])
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
    sample.set_defaults(run=handlers["recordings_sample"])
    check = data.add_parser("check", help="check a feature store before training (leakage, lengths, drift)")
    check.add_argument("--store", required=True, help="the feature store to check")
    check.add_argument("--previous", help="an earlier version of it: sizes and label drift are compared")
    check.set_defaults(run=handlers["check"])
    return parser


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


def extractor_settings(args: argparse.Namespace):
    """The recordings extractor's settings from `mmim extract`'s options; a bad one names its option."""
    from pydantic import ValidationError

    from mmim.data.recordings.extractor import ExtractorSettings

    given = {name: getattr(args, name) for name in RECORDING_OPTIONS if getattr(args, name) is not None}
    try:
        return ExtractorSettings(**given)
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0])
        raise MMIMInputError(f"{RECORDING_OPTIONS.get(name, name)} {given.get(name)!r}: {problem['msg']}") from None
