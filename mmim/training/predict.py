"""Predictions from a checkpoint: on raw utterances, or over a feature store split."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmim.core.batches import Batch, make_loader, pad_sequences
from mmim.core.errors import MMIMInputError
from mmim.core.limits import MAX_FRAMES, MAX_INPUT_BYTES, MAX_UTTERANCES
from mmim.core.metrics import compute_metrics
from mmim.core.model import MMIM
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import DEFAULT_MAX_TOKENS, tokenize
from mmim.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_scores(model: MMIM, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(predicted scores, true labels) over a whole loader, in loader order."""
    model.eval()
    scores, labels = [], []
    with model.reusing_bf16_weights():
        for batch in loader:
            batch = batch.to(device)
            scores.append(model(**batch.model_inputs()).score.float().cpu())
            labels.append(batch.labels.cpu())
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def sentiment_classes(score: float) -> dict[str, Any]:
    """The Acc-2 (non0 convention) and Acc-7 classes of a predicted score."""
    return {
        "polarity": "positive" if score > 0 else "negative" if score < 0 else "neutral",
        "class7": int(np.round(np.clip(score, -3.0, 3.0))),
    }


def _cap_frames(frames: int, where: str) -> None:
    if frames > MAX_FRAMES:
        raise MMIMInputError(f"{where}: {frames} frames, at most {MAX_FRAMES} per utterance")


def _frames(value: Any, field: str, index: int, dim: int) -> np.ndarray:
    where = f"utterance {index}, field {field}"
    if isinstance(value, (list, tuple)):  # counted before converting: that costs time too
        _cap_frames(len(value), where)
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise MMIMInputError(f"{where}: expected a list of frames of {dim} numbers") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise MMIMInputError(f"{where}: shape {array.shape}, expected (frames >= 1, {dim})")
    _cap_frames(len(array), where)  # an array passed from Python
    if not np.isfinite(array).all():
        raise MMIMInputError(f"{where}: contains NaN or inf")
    return array


def utterances_to_batch(utterances: list[dict[str, Any]], tokenizer, model: MMIM) -> Batch:
    """Validate raw utterances ({"text", "audio", "vision"}) and collate them into a Batch."""
    if not utterances:
        raise MMIMInputError("no utterances given")
    if len(utterances) > MAX_UTTERANCES:
        raise MMIMInputError(f"{len(utterances)} utterances, at most {MAX_UTTERANCES} per request")
    audio_dim, vision_dim = model.config.audio_dim, model.config.vision_dim
    if audio_dim is None or vision_dim is None:  # MMIM refuses to build without them
        raise MMIMInputError("model.audio_dim / model.vision_dim: not set in the model's config")
    texts, audio, vision = [], [], []
    for index, utterance in enumerate(utterances):
        if not isinstance(utterance, dict):
            raise MMIMInputError(f"utterance {index}: expected an object with text, audio, vision")
        missing = [key for key in ("text", "audio", "vision") if key not in utterance]
        if missing:
            raise MMIMInputError(f"utterance {index}: missing field(s) {', '.join(missing)}")
        text = utterance["text"]
        if not isinstance(text, str) or not text.strip():
            raise MMIMInputError(f"utterance {index}, field text: empty or not a string")
        texts.append(text)
        audio.append(_frames(utterance["audio"], "audio", index, audio_dim))
        vision.append(_frames(utterance["vision"], "vision", index, vision_dim))
    tokens = tokenize(tokenizer, texts, model.config.max_tokens or DEFAULT_MAX_TOKENS)
    width = int(tokens["attention_mask"].sum(axis=1).max())
    audio_tensor, audio_lengths = pad_sequences(audio)
    vision_tensor, vision_lengths = pad_sequences(vision)
    return Batch(
        input_ids=torch.from_numpy(tokens["input_ids"][:, :width].astype(np.int64)),
        attention_mask=torch.from_numpy(tokens["attention_mask"][:, :width].astype(np.int64)),
        token_type_ids=torch.from_numpy(tokens["token_type_ids"][:, :width].astype(np.int64)),
        audio=audio_tensor,
        audio_lengths=audio_lengths,
        vision=vision_tensor,
        vision_lengths=vision_lengths,
        labels=torch.zeros(len(texts)),
        ids=[str(i) for i in range(len(texts))],
    )


def read_utterances(source: str) -> list:
    """The utterances in a JSON file (a list of them, or one), or on stdin for "-"."""
    data = _read_capped(source)
    try:
        utterances = json.loads(data)
    except json.JSONDecodeError as error:
        raise MMIMInputError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError:
        raise MMIMInputError(f"{source}: not UTF-8 text") from None
    except RecursionError:  # json's parser recurses once per open bracket
        raise MMIMInputError(f"{source}: JSON nested too deeply") from None
    if isinstance(utterances, dict):
        utterances = [utterances]
    if not isinstance(utterances, list):
        raise MMIMInputError(f"{source}: expected a list of utterances")
    return utterances


def _read_capped(source: str) -> bytes:
    """The bytes of `source` ("-": stdin), refused over MAX_INPUT_BYTES: a file by its size,
    before reading; a pipe after reading one byte past the cap."""
    too_large = MMIMInputError(
        f"{source}: larger than {MAX_INPUT_BYTES // 2**20} MB, the cap on mmim predict's input (split it)"
    )
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > MAX_INPUT_BYTES:
                    raise too_large
                data = handle.read(MAX_INPUT_BYTES + 1)  # a FIFO or /dev/stdin has no size
    except OSError as error:
        raise MMIMInputError(f"{source}: cannot read ({error.strerror})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise too_large
    return data


@torch.no_grad()
def predict_utterances(model: MMIM, tokenizer, utterances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scores and classes for raw utterances with a loaded model."""
    device = next(model.parameters()).device
    batch = utterances_to_batch(utterances, tokenizer, model).to(device)
    model.eval()
    scores = model(**batch.model_inputs()).score.float().cpu().tolist()
    if not all(math.isfinite(score) for score in scores):
        raise RuntimeError("the model produced a non-finite score")
    return [{"score": score, **sentiment_classes(score)} for score in scores]


def predict_checkpoint(
    checkpoint: str | Path, store_dir: str | Path, splits: tuple[str, ...] = ("valid", "test"), batch_size: int = 64
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(predicted scores, true labels) of a checkpoint on splits of a feature store, in store order.

    The store may cap texts at another token count than the model was trained with (the
    same text, cut elsewhere: a new data version, and a fair comparison on it); its
    tokenizer, feature dims and extractor must be the model's.
    """
    log.info("loading the checkpoint %s", checkpoint)
    model, config, _ = load_checkpoint(checkpoint)
    log.info("reading the feature store %s", store_dir)
    store = FeatureStore(store_dir, verify_checksums=config.data.verify_checksums)
    positions = model.text_enc.bertmodel.config.max_position_embeddings
    if store.max_tokens > positions:
        raise MMIMInputError(
            f"data.store {str(store.root)!r} caps texts at {store.max_tokens} tokens, "
            f"more than the model's text encoder takes ({positions})"
        )
    uncapped = config.model_copy(update={"model": config.model.model_copy(update={"max_tokens": None})})
    bind_store(uncapped, store)  # same tokenizer, dims and extractor, or a clear error
    device = next(model.parameters()).device
    scores = {}
    for name in splits:
        log.info("scoring %s (%d utterances)", name, len(store[name]))
        scores[name] = predict_scores(model, make_loader(store[name], batch_size, shuffle=False), device)
    return scores


def evaluate_checkpoint(
    checkpoint: str | Path, store_dir: str | Path, splits: tuple[str, ...] = ("valid", "test"), batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Metrics of a checkpoint on splits of a feature store."""
    return {
        name: compute_metrics(*scores)
        for name, scores in predict_checkpoint(checkpoint, store_dir, splits, batch_size).items()
    }
