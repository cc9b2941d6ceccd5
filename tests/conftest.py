"""Shared fixtures: a tiny config-only BERT (no download), a small synthetic store, S3 (moto)
and a DVC project on it. Helpers that tests import by name live in tests/helpers.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow import MlflowClient
from moto.server import ThreadedMotoServer
from transformers import BertConfig, BertTokenizer

from mmim.core.config import Config
from mmim.data.synthetic import write_synthetic_store
from tests.helpers import TINY_SIZES, free_port, make_dvc_project, tiny_vocabulary

# Prefect servers started by the tests (harness, `prefect server start`) are offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Ray Train's controller polls its workers every 2 s by default: a start, each report and the
# end each wait for a poll. Ray propagates this to the controller and workers it starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT: config + WordPiece vocab only, random weights."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(tiny_vocabulary()) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(directory)
    BertConfig(
        vocab_size=len(tiny_vocabulary()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_store(tiny_encoder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores") / "synthetic"
    return write_synthetic_store(root, tiny_encoder, seed=0, sizes=TINY_SIZES).root


@pytest.fixture
def tiny_config(tiny_encoder, tiny_store, tmp_path) -> Config:
    return Config.model_validate(
        {
            "model": {"text_encoder": tiny_encoder, "text_pretrained": False},
            "data": {"store": str(tiny_store)},
            "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
            "output_dir": str(tmp_path / "run"),
        }
    )


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """MLflow on a sqlite file (what `make demo` uses); the client for reading runs back."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # over any an earlier test left in mlflow's global state
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- S3 (moto) and a DVC project


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's threaded S3 server on 127.0.0.1, for the whole session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket() -> str:
    """A new bucket name per test: DVC remembers what it pushed per remote URL."""
    return f"mmim-dvc-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def aws_env(monkeypatch, s3_endpoint, bucket):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return s3_endpoint


@pytest.fixture
def dvc_project(tmp_path, aws_env, bucket):
    """The project with an S3 remote on moto's server."""
    return make_dvc_project(tmp_path / "project", f"s3://{bucket}/cache", aws_env)
