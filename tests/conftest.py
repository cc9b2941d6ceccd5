"""Shared fixtures: a tiny config-only BERT (no download) and a small synthetic store."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from transformers import BertConfig, BertTokenizer

from mmim.config import Config
from mmim.synthetic import NEGATIVE, NEGATIONS, NEUTRAL, INTENSIFIERS, POSITIVE, SUBJECTS, write_synthetic_store

TINY_SIZES = {"train": 96, "valid": 32, "test": 32}


def _vocabulary() -> list[str]:
    words = set(itertools.chain(POSITIVE, NEGATIVE, INTENSIFIERS, NEGATIONS, ["was", "and", "i"]))
    for phrase in itertools.chain(SUBJECTS, NEUTRAL):
        words.update(phrase.split())
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT: config + WordPiece vocab only, random weights."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(_vocabulary()) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(directory)
    BertConfig(vocab_size=len(_vocabulary()), hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
               ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_store(tiny_encoder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores") / "synthetic"
    return write_synthetic_store(root, tiny_encoder, seed=0, sizes=TINY_SIZES).root


@pytest.fixture
def tiny_config(tiny_encoder, tiny_store, tmp_path) -> Config:
    return Config.model_validate({
        "model": {"text_encoder": tiny_encoder, "text_pretrained": False},
        "data": {"store": str(tiny_store)},
        "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
        "output_dir": str(tmp_path / "run"),
    })
