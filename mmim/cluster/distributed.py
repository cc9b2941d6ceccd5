"""Ray Train adapter: the single process's setup and epoch loop in every worker, under DDP.

    driver: train_distributed(config, on_report)
              -> Trainer(train_loop_per_worker, ScalingConfig, RunConfig)  (mmim.cluster.placement: TorchTrainer
                 whose placement-group cleaner waits for a real death)
              -> every epoch's report, as it arrives: on_report(metrics) (MLflow, a line)
              -> the selected epoch's checkpoint (mmim.core.selection), weights only, in OUTPUT_DIR/best
              -> TrainingResult, as mmim.training.train.train returns
    worker: train_loop_per_worker
              store (local, or fetched with DVC) -> mmim.training.train.setup_training (DDP when N > 1)
              -> resume state from Ray's latest checkpoint, if any
              -> mmim.training.engine.fit, whose epoch hook calls ray.train.report(metrics, checkpoint
                 and resume state from rank 0)

Choices, and why:
  - `train.batch_size` is the global batch: each of N workers takes batch_size / N,
    so the optimisation sees the official batch of 32 whatever N is.
  - Validation and test run on every rank over the whole split. The weights are the
    same on all ranks after each synchronised step, so every rank computes the same
    figures and the scheduler and early stopping agree without a broadcast.
  - Training means (loss, nce, lld, H) are averaged over all ranks; the entropy
    memory (previous batch's label groups) is per rank, i.e. of its own shard.
  - Random numbers are reseeded at every epoch from (seed, epoch, rank) (in `fit`): a
    run that resumes from a checkpoint draws the same dropout masks and shuffles as one
    that never stopped.
  - Checkpoints (rank 0) are the ordinary mmim checkpoint plus the resume state
    (optimizers, scheduler, epoch, model selection), all safetensors + JSON, written and
    read here. The resume state (twice the weights' size with Adam) stays in Ray's
    storage, where resuming needs it; OUTPUT_DIR/best gets the weights only.
  - The driver sees every report. Ray's own record of them (`Result.metrics_dataframe`)
    keeps only the reports whose checkpoints survived `ray.keep_checkpoints`, so a
    callback in Ray's controller (a separate process on the driver's node) forwards each
    report to a small actor that the driver drains while `fit` runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmim.cluster.connect import connect
from mmim.cluster.placement import Trainer
from mmim.cluster.reports import ForwardReports, ReportFollower
from mmim.core.config import Config, check_ray_settings, config_from_dict
from mmim.core.errors import DistributedTrainingError, MMIMInputError, first_line
from mmim.core.files import atomic_directory, read_json
from mmim.core.store import FeatureStore
from mmim.data.versioning import local_store
from mmim.training.checkpoint import load_weights
from mmim.training.engine import Engine, EpochRecord, ModelSelection, TrainingHooks, fit, flat_metrics
from mmim.training.train import (
    BEST_CHECKPOINT,
    METRICS_FILE,
    Training,
    TrainingResult,
    prepare_output_dir,
    setup_training,
    write_metrics,
)

log = logging.getLogger(__name__)

# What CheckpointConfig keeps the best checkpoint by: the epoch if the worker's ModelSelection
# selected it when it ended, else 0. The highest is the selected epoch, whatever its figure ties
# with, so Ray keeps exactly the epoch the one rule (mmim.core.selection) chose.
SELECTED = "selected_epoch_rank"


def parameter_digest(model: torch.nn.Module) -> int:
    """A 63-bit digest of all parameter bytes: equal on every rank iff the weights are."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def ranks_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    digests = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, torch.tensor([parameter_digest(model)], dtype=torch.int64, device=device))
    return len({int(d.item()) for d in digests}) == 1


TRAINING_TENSORS = "training_state.safetensors"
TRAINING_STATE = "training_state.json"


def save_training_state(directory: str | Path, engine: Engine, selection: ModelSelection, epoch: int) -> None:
    """Optimizer and scheduler state, model selection and the epoch, beside a checkpoint.

    Tensors (Adam moments and steps) go to safetensors, everything else to JSON.
    """
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    optimizers = {}
    for name, optimizer in engine.optimizers().items():
        state = optimizer.state_dict()
        keys = {}
        for param_id, entries in state["state"].items():
            keys[str(param_id)] = sorted(entries)
            for key, value in entries.items():
                tensors[f"{name}/{param_id}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        optimizers[name] = {"param_groups": state["param_groups"], "state_keys": keys}
    save_file(tensors, str(directory / TRAINING_TENSORS))
    (directory / TRAINING_STATE).write_text(
        json.dumps(
            {
                "epoch": epoch,
                "optimizers": optimizers,
                "scheduler": engine.scheduler.state_dict(),
                "selection": selection.state_dict(),
            }
        )
    )


def remove_training_state(directory: str | Path) -> None:
    """Leave only what inference needs: drop the optimizer/scheduler state of a Ray checkpoint."""
    for name in (TRAINING_TENSORS, TRAINING_STATE):
        (Path(directory) / name).unlink(missing_ok=True)


def load_training_state(directory: str | Path, engine: Engine, selection: ModelSelection) -> int:
    """Restore what `save_training_state` wrote; returns the epoch it was saved after."""
    directory = Path(directory)
    meta = read_json(directory / TRAINING_STATE)
    try:
        tensors = load_file(str(directory / TRAINING_TENSORS), device=str(engine.device))
    except (SafetensorError, OSError) as error:
        raise MMIMInputError(f"{directory / TRAINING_TENSORS}: corrupt or truncated ({error})") from None
    for name, optimizer in engine.optimizers().items():
        saved = meta["optimizers"][name]
        state = {
            int(param_id): {key: tensors[f"{name}/{param_id}/{key}"] for key in keys}
            for param_id, keys in saved["state_keys"].items()
        }
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    engine.scheduler.load_state_dict(meta["scheduler"])
    selection.load_state_dict(meta["selection"])
    return int(meta["epoch"])


class ReportEpochs(TrainingHooks):
    """A worker's end of each epoch: `ray.train.report` with rank 0's checkpoint and resume state."""

    def __init__(self, training: Training, selection: ModelSelection, rank: int, world: int, resumed_from: int):
        self.training, self.selection = training, selection
        self.rank, self.world, self.resumed_from = rank, world, resumed_from

    def on_epoch_end(self, record: EpochRecord, improved: bool) -> None:
        training = self.training
        best_so_far = self.selection.best.valid["MAE"] if self.selection.best else record.valid["MAE"]
        metrics = {
            # first: the columns Tune's trials table shows (it takes a report's first four figures)
            "epoch": record.epoch,
            "valid_MAE": record.valid["MAE"],
            # the validation MAE of the epoch training would select so far (what a search ranks by)
            "best_valid_MAE": best_so_far,
            "valid_Corr": record.valid["Corr"],
            **flat_metrics(record),
            "improved": int(improved),
            SELECTED: record.epoch if improved else 0,
            "resumed_from": self.resumed_from,  # > 0 after a restart (a lost worker or node, a resize)
            "workers": self.world,  # changes when elastic training (ray.min_workers) resizes
        }
        # A health check worth its cost (one hash of the weights per epoch): DDP must keep
        # every rank's weights identical.
        metrics["ranks_in_sync"] = int(self.world == 1 or ranks_in_sync(training.model, training.engine.device))
        with tempfile.TemporaryDirectory() as staging:
            reported = None
            if self.rank == 0:
                directory = Path(staging) / "checkpoint"
                training.save_checkpoint(directory, record)
                save_training_state(directory, training.engine, self.selection, record.epoch)
                reported = Checkpoint.from_directory(str(directory))
            ray.train.report(metrics, checkpoint=reported, checkpoint_dir_name=f"epoch_{record.epoch:03d}")


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: the same setup and `fit` as one process, on its shard."""
    config = config_from_dict(loop_config["config"], "train_loop_config")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)  # Ray sets 1 thread per worker CPU otherwise
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    store = FeatureStore(local_store(config.data), verify_checksums=config.data.verify_checksums)
    training = setup_training(config, store, rank, world, ray.train.torch.get_device())
    selection = ModelSelection(config.train.patience)

    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            load_weights(directory, training.model)
            resumed_from = load_training_state(directory, training.engine, selection)
        log.info("rank %d resumed after epoch %d", rank, resumed_from)

    hooks = ReportEpochs(training, selection, rank, world, resumed_from)
    fit(training.engine, training.loaders, hooks, selection=selection, start_epoch=resumed_from + 1, rank=rank)


def storage_location(ray_config, with_keys: bool = True) -> tuple[str, object | None]:
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig. `with_keys=False` leaves the
    AWS keys to the S3 client's own lookup (environment, ~/.aws, instance role): for a filesystem
    that Ray pickles into storage, as Tune does with its experiment (keys would land in the bucket)."""
    if not ray_config.storage_path.startswith("s3://"):
        return str(Path(ray_config.storage_path).resolve()), None
    from pyarrow import fs

    parsed = urlparse(ray_config.storage_path)
    endpoint = ray_config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, str | None] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if with_keys:
        options["access_key"] = os.environ.get("AWS_ACCESS_KEY_ID")
        options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if endpoint:
        endpoint_url = urlparse(endpoint)
        options.update(endpoint_override=endpoint_url.netloc, scheme=endpoint_url.scheme or "https")
    filesystem = fs.S3FileSystem(**{k: v for k, v in options.items() if v is not None})
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), filesystem


def remove_storage(ray_config, path: str) -> None:
    """Remove a finished run's directory `path` from Ray's storage (its checkpoints, with their
    optimizer state), unless ray.keep_storage: what is worth keeping was copied out."""
    if ray_config.keep_storage:
        return
    from pyarrow import fs

    filesystem: Any = storage_location(ray_config)[1] or fs.LocalFileSystem()
    if filesystem.get_file_info(path).type != fs.FileType.NotFound:
        filesystem.delete_dir(path)
        log.debug("removed Ray's storage of the finished run: %s (ray.keep_storage keeps it)", path)


def with_absolute_paths(config: Config) -> Config:
    """The config with paths relative to the driver's directory made absolute: Ray's workers (and
    Tune's trials) do not run in it, and configs/*.yaml name data/stores/... relatively."""

    def absolute(value: str) -> str:
        return value if "://" in value else str(Path(value).resolve())

    data = {"store": absolute(config.data.store)}
    if config.data.dvc_url and Path(config.data.dvc_url).exists():
        data["dvc_url"] = absolute(config.data.dvc_url)
    model = {"text_encoder": absolute(config.model.text_encoder)} if Path(config.model.text_encoder).exists() else {}
    return config.model_copy(
        update={
            "data": config.data.model_copy(update=data),
            "model": config.model.model_copy(update=model),
            "ray": config.ray.model_copy(update={"storage_path": absolute(config.ray.storage_path)}),
        }
    )


def check_config(config: Config) -> None:
    """What would otherwise fail in every worker, reported once by the driver."""
    check_ray_settings(config)
    if not Path(config.data.store).is_dir() and not config.data.dvc_url:
        FeatureStore(config.data.store)  # raises, naming the path


def build_trainer(config: Config, callbacks: list[UserCallback] | None = None) -> Trainer:
    ray_config = config.ray
    storage_path, filesystem = storage_location(ray_config)
    name = ray_config.run_name or f"mmim-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return Trainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump()},
        torch_config=TorchConfig(backend="nccl" if ray_config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            # (min, max): elastic, Ray Train restarts the group with what the cluster has (a v2
            # ScalingConfig, as RunConfig below; mypy reads v1's, which takes an int only)
            num_workers=(ray_config.min_workers, ray_config.num_workers)  # type: ignore[arg-type]
            if ray_config.min_workers is not None
            else ray_config.num_workers,
            use_gpu=ray_config.use_gpu,
            resources_per_worker=ray_config.resources_per_worker or None,
            placement_strategy=ray_config.placement_strategy,
        ),
        # ray.train rebinds RunConfig to Train v2's class at import (UserCallback exists only in
        # v2), but mypy reads the v1 one, which lacks worker_runtime_env and takes v1 callbacks.
        run_config=RunConfig(  # type: ignore[call-arg]
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=ray_config.keep_checkpoints,
                checkpoint_score_attribute=SELECTED,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=ray_config.max_failures),
            callbacks=callbacks,  # type: ignore[arg-type]
            worker_runtime_env={
                "env_vars": {name: os.environ[name] for name in ray_config.forward_env if name in os.environ}
            },
        ),
    )


def worker_error(error: BaseException) -> str:
    """The first worker's own error (e.g. "training diverged at epoch 1, ..."), not Ray's traceback digest."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        return f"rank {rank}: {first_line(failures[rank])}"
    return first_line(error)


def train_distributed(
    config: Config, on_report: Callable[[dict], None] | None = None, overwrite: bool = False
) -> TrainingResult:
    """Run Ray training; `on_report(metrics)` sees every epoch's report as it arrives (in a driver
    thread). The best epoch's weights are copied to OUTPUT_DIR/best, replacing an earlier run's
    only with `overwrite`."""
    check_config(config)
    prepare_output_dir(config, overwrite)
    # Worker and controller logs, and the driver's own notices (token auth on, dashboard URL),
    # stay in Ray's session logs unless ray.log_to_driver asks for them; errors always show.
    verbose = config.ray.log_to_driver
    connect(config.ray.address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    with ReportFollower(on_report) as follower:
        trainer = build_trainer(with_absolute_paths(config), [ForwardReports(follower.inbox)])
        log.info(
            "starting %d Ray Train workers: each reads the store and builds the model before epoch 1",
            config.ray.num_workers,
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as error:
            raise DistributedTrainingError(
                f"Ray training failed (ray.max_failures={config.ray.max_failures}): {worker_error(error)}"
            ) from None
    if not result.best_checkpoints:
        raise DistributedTrainingError("Ray training finished without reporting a checkpoint")
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda item: item[1][SELECTED])
    destination = Path(config.output_dir) / BEST_CHECKPOINT
    with atomic_directory(destination) as staging:
        best_checkpoint.to_directory(str(staging))
        remove_training_state(staging)  # serving and evaluation need the weights only
    epochs = follower.epochs()
    stopped_early = int(epochs[-1]["epoch"]) < config.train.epochs if epochs else False
    kept = result.path if config.ray.keep_storage else None
    trained = TrainingResult(epochs, best_metrics, destination, stopped_early, ray_run=kept)
    write_metrics(Path(config.output_dir) / METRICS_FILE, trained)
    remove_storage(config.ray, result.path)
    return trained
