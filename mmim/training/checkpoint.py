"""Checkpoints: everything needed to rebuild and run a trained model, and no pickle.

    CHECKPOINT/
      model.safetensors   the state dict (official parameter names)
      config.json         the validated run config, with the store's input dims
      text_encoder/       the encoder's Hugging Face config + tokenizer files
      metrics.json        optional: selected epoch, valid/test metrics

This is the inference artifact: serving and evaluation load it, and nothing here
imports training. (A Ray checkpoint adds the resume state beside it: mmim.cluster.distributed.)

A checkpoint is self-contained: evaluating or serving it needs neither the network
nor the original encoder directory. It is written to a temporary directory and
renamed into place.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mmim.core.config import Config, config_from_dict, config_to_json
from mmim.core.errors import MMIMInputError, first_line
from mmim.core.files import atomic_directory, read_json, regular_file
from mmim.core.limits import MAX_LAYERS
from mmim.core.model import MMIM, load_official_state_dict
from mmim.core.text_encoder import load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT_ENCODER = "text_encoder"
METRICS = "metrics.json"
# How Hugging Face configs name their layer count (BERT, GPT-2 and DistilBERT, T5 and others).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def save_checkpoint(
    directory: str | Path, model: MMIM, config: Config, tokenizer: PreTrainedTokenizerBase, metrics: dict | None = None
) -> Path:
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(config_to_json(config))
        model.text_enc.bertmodel.config.save_pretrained(staging / TEXT_ENCODER)
        tokenizer.save_pretrained(staging / TEXT_ENCODER)
        if metrics is not None:
            (staging / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return directory


def read_official_weights(path: str | Path) -> dict:
    """The state dict the reference code saves (`torch.save(model.state_dict(), ...)`).

    Read with `weights_only=True`: tensors and plain containers only; anything else in
    the pickle (code to run on load included) is refused, never executed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = first_line(error)
        raise MMIMInputError(f"{path}: not a plain state dict of tensors ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MMIMInputError(f"{path}: expected a state dict (parameter name -> tensor)")
    return state


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[MMIM, Config, PreTrainedTokenizerBase]:
    """(model in eval mode, its config, its tokenizer) from a checkpoint directory."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, TEXT_ENCODER):
        if not (directory / name).exists():
            raise MMIMInputError(f"{directory / name}: missing; {directory} is not an mmim checkpoint")
    regular_file(directory / WEIGHTS)  # a FIFO there would block the read for ever
    config = config_from_dict(read_json(directory / CONFIG), str(directory / CONFIG))  # a non-object is refused there
    encoder_dir = str(directory / TEXT_ENCODER)
    _check_layer_counts(directory / TEXT_ENCODER / "config.json")
    try:
        encoder_config = AutoConfig.from_pretrained(encoder_dir)
        # Built without memory first: a config that asks for more than the weights file holds
        # (a vocab_size of 1e11, say) is refused before anything is allocated.
        with torch.device("meta"):
            planned = MMIM(config.model, AutoModel.from_config(encoder_config))
    except Exception as error:  # noqa: BLE001 - transformers builds what an untrusted file says: its failure is the file's
        raise MMIMInputError(
            f"{encoder_dir}: config.json describes no encoder that can be built ({type(error).__name__}: "
            f"{first_line(error)})"
        ) from None
    _check_shapes(directory / WEIGHTS, planned)
    backbone = AutoModel.from_config(encoder_config)
    model = MMIM(config.model, backbone)
    load_weights(directory, model)
    return model.to(device).eval(), config, load_tokenizer(encoder_dir)


def _check_layer_counts(path: Path) -> None:
    """Refuse an encoder config that asks for more layers than any model has, before even the
    meta-device model (whose construction takes time per layer) is built."""
    encoder = read_json(path)
    if not isinstance(encoder, dict):
        raise MMIMInputError(f"{path}: expected a JSON object (a Hugging Face model config)")
    for key in LAYER_COUNT_KEYS:
        count = encoder.get(key)
        if isinstance(count, (int, float)) and not 1 <= count <= MAX_LAYERS:
            raise MMIMInputError(f"{path}: {key} is {count}, expected 1 to {MAX_LAYERS}")


def _check_shapes(path: Path, model: MMIM) -> None:
    """`model` (built on the meta device) has exactly the parameters the weights file declares,
    each with its shape: a config that builds more (layers the file lacks) is refused too."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            declared = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise MMIMInputError(f"{path}: corrupt or truncated ({error})") from None
    built = model.state_dict()
    extra = sorted(set(built) - set(declared))
    if extra:
        raise MMIMInputError(
            f"{path}: the checkpoint's config builds {len(extra)} parameter(s) the file lacks, e.g. {extra[0]}"
        )
    for name, tensor in built.items():
        if declared[name] != tuple(tensor.shape):
            raise MMIMInputError(
                f"{path}: {name} has shape {declared[name]}, but the checkpoint's config builds {tuple(tensor.shape)}"
            )


def load_weights(directory: str | Path, model: MMIM) -> None:
    """Load a checkpoint's `model.safetensors` into an already built model (strict)."""
    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as error:
        raise MMIMInputError(f"{path}: corrupt or truncated ({error})") from None
    broken = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise MMIMInputError(f"{path}: {broken} contains NaN or inf")
    try:
        load_official_state_dict(model, state)
    except MMIMInputError as error:
        raise MMIMInputError(f"{path}: {error}") from None
