"""Single-process training on a feature store: what `mmim train` runs.

config -> open store (dims, tokenizer name) -> build model -> Engine.fit
       -> OUTPUT_DIR/best/ (checkpoint of the selected epoch), OUTPUT_DIR/metrics.json
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from mmim.checkpoint import save_checkpoint
from mmim.config import Config
from mmim.data import make_loader
from mmim.engine import Engine, EpochRecord, FitResult, TrainingHooks, fit, seed_everything
from mmim.errors import MMIMInputError
from mmim.model import build_model
from mmim.store import FeatureStore
from mmim.text_encoder import load_tokenizer

BEST_CHECKPOINT = "best"
METRICS_FILE = "metrics.json"


def bind_store(config: Config, store: FeatureStore) -> Config:
    """The config with the store's input dims and token cap; refuse a store tokenized for another encoder."""
    if store.text_encoder != config.model.text_encoder:
        raise MMIMInputError(
            f"model.text_encoder {config.model.text_encoder!r} does not match the tokenizer of "
            f"data.store {str(store.root)!r} ({store.text_encoder!r}); re-extract or change the config"
        )
    stored = {
        "audio_dim": store.dims["audio"],
        "vision_dim": store.dims["vision"],
        "max_tokens": store.max_tokens,
        "extractor": store.extractor,
    }
    for field, value in stored.items():
        configured = getattr(config.model, field)
        if configured is not None and configured != value:
            raise MMIMInputError(
                f"model.{field} is {_shown(configured)} but data.store {str(store.root)!r} has "
                f"{_shown(value)} (leave it out: it comes from the store)"
            )
    return config.model_copy(update={"model": config.model.model_copy(update=stored)})


def _shown(value):
    """A setting for an error message: an extractor record by its name, version and settings."""
    if isinstance(value, dict) and "version" in value:
        return f"extractor {value.get('name')} {value['version']} {value.get('settings')}"
    return value


def prepare_output_dir(config: Config, overwrite: bool) -> Path:
    """OUTPUT_DIR, checked before the first epoch: writable, and not holding another run's
    checkpoint unless `overwrite` (a worse run must not silently replace a better one)."""
    output = Path(config.output_dir)
    earlier = output / BEST_CHECKPOINT
    if earlier.exists() and not overwrite:
        raise MMIMInputError(
            f"output_dir {output}: holds the checkpoint of an earlier run ({_describe(earlier)}); "
            "choose another output_dir, or pass --overwrite to replace it"
        )
    try:
        output.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output).close()
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


class _SaveBest(TrainingHooks):
    """Writes the checkpoint whenever validation improves, then calls the caller's hooks."""

    def __init__(self, inner: TrainingHooks, engine: Engine, config: Config, tokenizer, directory: Path):
        self.inner, self.engine, self.config = inner, engine, config
        self.tokenizer, self.directory = tokenizer, directory

    def on_stage_start(self, epoch: int, stage: int, batches: int) -> None:
        self.inner.on_stage_start(epoch, stage, batches)

    def on_batch_end(self, epoch: int, stage: int, loss: float) -> None:
        self.inner.on_batch_end(epoch, stage, loss)

    def on_epoch_end(self, record: EpochRecord, improved: bool) -> None:
        if improved:
            save_checkpoint(
                self.directory,
                self.engine.core,
                self.config,
                self.tokenizer,
                {"epoch": record.epoch, "valid": record.valid, "test": record.test},
            )
        self.inner.on_epoch_end(record, improved)


def train(config: Config, hooks: TrainingHooks | None = None, overwrite: bool = False) -> tuple[FitResult, Path]:
    """Train on `config.data.store`; returns the result and the best checkpoint's path.
    `overwrite` lets the run replace an earlier run's checkpoint in OUTPUT_DIR."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    store = FeatureStore(config.data.store, verify_checksums=config.data.verify_checksums)
    config = bind_store(config, store)
    output = prepare_output_dir(config, overwrite)
    seed_everything(config.train.seed)
    model = build_model(config.model)
    tokenizer = load_tokenizer(config.model.text_encoder)
    batch_size, seed = config.train.batch_size, config.train.seed
    train_loader = make_loader(store["train"], batch_size, shuffle=True, seed=seed)
    valid_loader = make_loader(store["valid"], batch_size, shuffle=False)
    test_loader = make_loader(store["test"], batch_size, shuffle=False)
    engine = Engine(model, config.train)
    saver = _SaveBest(hooks or TrainingHooks(), engine, config, tokenizer, output / BEST_CHECKPOINT)
    result = fit(engine, train_loader, valid_loader, test_loader, saver)
    write_metrics(output / METRICS_FILE, result)
    return result, output / BEST_CHECKPOINT


def write_metrics(path: Path, result: FitResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(asdict(result), indent=2))
    temporary.replace(path)
