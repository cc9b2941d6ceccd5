"""Shared fixtures: a tiny config-only BERT (no download), a small synthetic store, one local Ray
cluster for the session, S3 (moto) and a DVC project on it. Helpers that tests import by name
live in tests/helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest
import ray
import torch
from mlflow import MlflowClient
from moto.server import ThreadedMotoServer
from transformers import BertConfig, BertTokenizer

from mmim.core.config import Config
from mmim.core.store import FeatureStore
from mmim.data.synthetic import write_synthetic_store
from mmim.training.train import TrainingResult, train
from tests.helpers import (
    RAY_NO_AUTH,
    TINY_SIZES,
    face_clips,
    free_port,
    good_rows,
    make_dvc_project,
    run_mmim,
    stop_ray_head,
    tiny_vocabulary,
    write_dataset,
)

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


def tiny_settings(encoder: str, store: Path, output_dir: Path) -> Config:
    return Config.model_validate(
        {
            "model": {"text_encoder": encoder, "text_pretrained": False},
            "data": {"store": str(store)},
            "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
            "output_dir": str(output_dir),
        }
    )


@pytest.fixture
def tiny_config(tiny_encoder, tiny_store, tmp_path) -> Config:
    return tiny_settings(tiny_encoder, tiny_store, tmp_path / "run")


@pytest.fixture(scope="session")
def baseline_training(tiny_encoder, tiny_store, tmp_path_factory) -> TrainingResult:
    """The tiny config trained once in this process: what a second run with the same seed (test_engine)
    and a Ray worker (test_distributed) must reproduce bit for bit."""
    threads = torch.get_num_threads()  # train() sets train.num_threads for the process
    try:
        return train(tiny_settings(tiny_encoder, tiny_store, tmp_path_factory.mktemp("baseline") / "run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema made, which each test copies: making the schema
    (MLflow's migrations) takes a second or two, copying the file nothing."""
    path = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch, migrated_mlflow_db):
    """MLflow on a sqlite file (what `make demo` uses); the client for reading runs back."""
    shutil.copy(migrated_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # over any an earlier test left in mlflow's global state
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- one Ray cluster


@pytest.fixture(scope="session")
def ray_head() -> str:
    """One local Ray cluster (2 CPUs) for every test that trains on Ray in this process: its GCS
    address. Started by `ray start` in a temp dir of its own, so that no bare ray.init() on the
    machine finds it, with its dashboard (the state API, and Ray Train's release of a trial ASHA
    stopped, use it). Its workers inherit this environment, as they would from ray.init()."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmim-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)} | RAY_NO_AUTH
    port = free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}"]
    command += ["--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={free_port()}", "--disable-usage-stats"]
    # ports of its own for what would take Ray's fixed defaults (the dashboard agent's 52365, the
    # client server's 10001, ...), so that a test's own `ray start` head can take those
    for option in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"):
        command.append(f"--{option}={free_port()}")
    command += [f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}"]
    head = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 120
    while not (address_file.is_file() and address_file.read_text().strip()):
        assert head.poll() is None and time.monotonic() < deadline, "the session's Ray head did not start"
        time.sleep(0.5)
    yield address_file.read_text().strip()
    stop_ray_head(head, ray_tmp)


@pytest.fixture
def ray_cluster(ray_head, monkeypatch) -> str:
    """This test's driver on the session's Ray cluster, disconnected after it (a job of its own:
    what it started ends with it). The address, for commands run in a child process."""
    for name, value in RAY_NO_AUTH.items():  # for the driver, and commands the test starts
        monkeypatch.setenv(name, value)
    ray.init(address=ray_head, log_to_driver=False)
    yield ray_head
    ray.shutdown()


# ---------------------------------------------------------------- a champion trained on recordings


@dataclass(frozen=True)
class Champion:
    """A model trained on a recordings store, registered as `uri`, and what `mmim predict` answers."""

    tracking_uri: str  # its registry (sqlite)
    uri: str  # models:/mmim-rec@champion
    store: Path  # the store it was trained on
    features: pd.DataFrame  # two utterances as frames (a request's table)
    recording: Path  # a face clip, said with `text`
    text: str
    from_features: list[float]  # `mmim predict --input` on `features`
    from_recording: list[float]  # `mmim predict --recording` on `recording`


@pytest.fixture(scope="session")
def recordings_champion(tiny_encoder, tiny_store, tmp_path_factory) -> Champion:
    """One served model for the session: trained for an epoch on six extracted face clips and
    registered as champion in a sqlite registry of its own (the REST servers' tests share it)."""
    # imported here: the lifecycle, MLflow's model code and the extractor cost `make test-fast` 3 s
    from mmim.data.recordings.extractor import ExtractorSettings
    from mmim.data.recordings.job import extract_recordings
    from mmim.data.recordings.sample import write_face_clip
    from mmim.lifecycle.retrain import retrain
    from mmim.registry.logged_model import input_example

    root = tmp_path_factory.mktemp("champion")
    dataset = write_dataset(root / "data", *good_rows(face_clips(root / "made", 6)))
    store = root / "store"
    extract_recordings(
        dataset, store, tiny_encoder, ExtractorSettings(), cache_dir=root / "cache", max_tokens=16, workers=0
    )
    tiny = tiny_settings(tiny_encoder, tiny_store, root / "run")
    config = tiny.model_copy(
        update={
            "data": tiny.data.model_copy(update={"store": str(store)}),
            "train": tiny.train.model_copy(update={"epochs": 1, "batch_size": 2}),
            "tracking": tiny.tracking.model_copy(
                update={"enabled": True, "artifact_location": str(root / "artifacts"), "registered_model": "mmim-rec"}
            ),
        }
    )
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    recording = write_face_clip(root / "face.mp4", seconds=2.0, label=1.5, seed=1)
    features = input_example(FeatureStore(store), ["the movie was very good", "the plot was dull"])
    (root / "utterances.json").write_text(features.to_json(orient="records"))
    champion, text = "models:/mmim-rec@champion", "a really good movie"
    threads = torch.get_num_threads()  # train() sets train.num_threads for the process
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        try:
            assert retrain(config, lambda metrics: None).decision.promoted
            scores = [
                predicted(champion, "--input", str(root / "utterances.json")),
                predicted(champion, "--recording", str(recording), "--text", text),
            ]
        finally:
            mlflow.set_tracking_uri(None)  # the tracked run set mlflow's global one to this registry
            torch.set_num_threads(threads)
    return Champion(tracking_uri, champion, store, features, recording, text, *scores)


def predicted(checkpoint: str, *arguments: str) -> list[float]:
    """The scores `mmim predict --checkpoint CHECKPOINT ARGUMENTS` prints."""
    code, out, err = run_mmim("predict", "--checkpoint", checkpoint, *arguments)
    assert code == 0, err
    return [row["score"] for row in json.loads(out)]


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
