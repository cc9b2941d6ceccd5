"""Training on a feature store: the setup every path shares, and the single process.

    setup_training(config, store, rank, world, device)      one process, or one Ray worker
      -> model (wrapped in DDP when world > 1), Engine, train/valid/test loaders, tokenizer
    train(config)                                            `mmim train` without Ray
      -> engine.fit -> OUTPUT_DIR/best/ (checkpoint of the selected epoch), OUTPUT_DIR/metrics.json
      -> TrainingResult (mmim.cluster.distributed.train_distributed returns the same type)

Both paths shuffle with a DistributedSampler (one replica here) and reseed every epoch
from (seed, epoch, rank), so one Ray worker trains exactly what this process trains.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mmim.core.batches import SplitDataset, make_loader
from mmim.core.config import Config
from mmim.core.errors import MMIMInputError
from mmim.core.model import MMIM, build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import load_tokenizer
from mmim.training.checkpoint import save_checkpoint
from mmim.training.engine import (
    Engine,
    EpochRecord,
    FitResult,
    Loaders,
    TrainingHooks,
    fit,
    flat_metrics,
    seed_everything,
)

BEST_CHECKPOINT = "best"
METRICS_FILE = "metrics.json"

log = logging.getLogger(__name__)


def prepare_output_dir(config: Config, overwrite: bool, create: bool = True) -> Path:
    """OUTPUT_DIR, checked before the first epoch: writable, and not holding another run's
    checkpoint unless `overwrite` (a worse run must not silently replace a better one).
    Created only with `create`: a run refused by a later check leaves no empty directory."""
    output = Path(config.output_dir)
    earlier = output / BEST_CHECKPOINT
    if earlier.exists() and not overwrite:
        raise MMIMInputError(
            f"output_dir {output}: holds the checkpoint of an earlier run ({_describe(earlier)}); "
            "choose another output_dir, or pass --overwrite to replace it"
        )
    try:
        if create:
            output.mkdir(parents=True, exist_ok=True)
        existing = next(folder for folder in (output, *output.absolute().parents) if folder.exists())
        tempfile.TemporaryFile(dir=existing).close()  # where the directory is, or will be, made
    except OSError as error:
        raise MMIMInputError(f"output_dir {output}: not writable ({error.strerror or error})") from None
    return output


def _describe(checkpoint: Path) -> str:
    """What an earlier checkpoint scored, from its metrics.json, for the refusal above."""
    try:
        metrics = json.loads((checkpoint / "metrics.json").read_text())
        return f"epoch {metrics['epoch']}, valid MAE {metrics['valid']['MAE']:.4f}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(checkpoint)


@dataclass
class TrainingResult:
    """What a training run produced, whichever path ran it."""

    epochs: list[dict[str, float]]  # every epoch's flat metrics (mmim.training.engine.flat_metrics), by epoch
    best: dict[str, float]  # the flat metrics of the selected epoch (lowest validation MAE)
    checkpoint: Path  # the selected epoch's checkpoint: OUTPUT_DIR/best
    stopped_early: bool
    ray_run: str | None = None  # where Ray keeps the run's checkpoints (None: single process)

    @property
    def best_epoch(self) -> int:
        return int(self.best["epoch"])


@dataclass
class Training:
    """One process's share of a run, ready for `fit`."""

    model: MMIM  # the plain model (under DDP, `engine.model` is the wrapper)
    engine: Engine
    loaders: Loaders
    tokenizer: PreTrainedTokenizerBase
    config: Config  # with the store's dims and token cap

    def save_checkpoint(self, directory: Path, record: EpochRecord) -> None:
        """The inference checkpoint of the model as it is after `record`'s epoch."""
        metrics = {"epoch": record.epoch, "valid": record.valid, "test": record.test}
        save_checkpoint(directory, self.model, self.config, self.tokenizer, metrics)


def setup_training(
    config: Config, store: FeatureStore, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> Training:
    """Model, engine and loaders for rank `rank` of `world` processes (1: no DDP)."""
    config = bind_store(config, store)
    seed_everything(config.train.seed)  # the same initial weights on every rank (DDP also syncs them)
    model = build_model(config.model)
    ddp = None
    if world > 1:
        # find_unused_parameters: stage 0 leaves everything but the MMILB heads unused, and
        # the BERT pooler is never used.
        model = model.to(device)
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device is not None and device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    engine = Engine(model, config.train, device, ddp=ddp)
    # train.batch_size is the global batch: each of `world` processes takes its share.
    batch_size = config.train.batch_size // world
    sampler: DistributedSampler[int] = DistributedSampler(  # yields example indices
        SplitDataset(store["train"]), num_replicas=world, rank=rank, shuffle=True, seed=config.train.seed
    )
    on_gpu = engine.device.type == "cuda"
    workers = config.train.loader_workers if config.train.loader_workers is not None else (2 if on_gpu else 0)
    loaders = Loaders(
        train=make_loader(
            store["train"], batch_size, shuffle=False, sampler=sampler, num_workers=workers, pin_memory=on_gpu
        ),
        valid=make_loader(store["valid"], batch_size, shuffle=False, pin_memory=on_gpu),
        test=make_loader(store["test"], batch_size, shuffle=False, pin_memory=on_gpu),
    )
    return Training(model, engine, loaders, load_tokenizer(config.model.text_encoder), config)


class _SaveBest(TrainingHooks):
    """Writes the checkpoint whenever validation improves, then calls the caller's hooks."""

    def __init__(self, inner: TrainingHooks, training: Training, directory: Path):
        self.inner, self.training, self.directory = inner, training, directory

    def on_stage_start(self, epoch: int, stage: int, batches: int) -> None:
        self.inner.on_stage_start(epoch, stage, batches)

    def on_batch_end(self, epoch: int, stage: int) -> None:
        self.inner.on_batch_end(epoch, stage)

    def on_epoch_end(self, record: EpochRecord, improved: bool) -> None:
        if improved:
            self.training.save_checkpoint(self.directory, record)
        self.inner.on_epoch_end(record, improved)


def train(config: Config, hooks: TrainingHooks | None = None, overwrite: bool = False) -> TrainingResult:
    """Train on `config.data.store` in this process. `overwrite` lets the run replace an
    earlier run's checkpoint in OUTPUT_DIR."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    log.info("reading the feature store %s", config.data.store)
    store = FeatureStore(config.data.store, verify_checksums=config.data.verify_checksums)
    output = prepare_output_dir(config, overwrite)
    log.info("building the model (text encoder %s)", config.model.text_encoder)
    training = setup_training(config, store)
    log.info("training %d epochs on %d utterances", config.train.epochs, len(store["train"]))
    saver = _SaveBest(hooks or TrainingHooks(), training, output / BEST_CHECKPOINT)
    fitted = fit(training.engine, training.loaders, saver)
    result = result_of(fitted, output / BEST_CHECKPOINT)
    write_metrics(output / METRICS_FILE, result)
    return result


def result_of(fitted: FitResult, checkpoint: Path) -> TrainingResult:
    epochs = [flat_metrics(record) for record in fitted.history]
    return TrainingResult(epochs, flat_metrics(fitted.best), checkpoint, fitted.stopped_early)


def write_metrics(path: Path, result: TrainingResult) -> None:
    """OUTPUT_DIR/metrics.json: every epoch and the selected one, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({**asdict(result), "checkpoint": str(result.checkpoint)}, indent=2))
    temporary.replace(path)
