"""Shared fixtures: a tiny config-only BERT (no download) and a small synthetic store."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer
from transformers import BertConfig, BertTokenizer

from mmim.config import Config
from mmim.synthetic import INTENSIFIERS, NEGATIONS, NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS, write_synthetic_store

TINY_SIZES = {"train": 96, "valid": 32, "test": 32}

# Prefect servers started by the tests (harness, `prefect server start`) are offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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
    BertConfig(
        vocab_size=len(_vocabulary()),
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


# ---------------------------------------------------------------- S3 (moto) and a DVC project

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ---------------------------------------------------------------- server processes

POSTGRES_URL = os.environ.get("MMIM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def wait_for(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited: {process.stderr.read().decode()[-2000:]}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def start(command: list[str], url: str, env: dict | None = None) -> subprocess.Popen:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # uvicorn, gunicorn
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PATH": path, **(env or {})}
    )
    wait_for(url, process)
    return process


def postgres_database(prefix: str) -> str:
    """A fresh database `<prefix>_<random>` on the local PostgreSQL, as a psycopg2 SQLAlchemy URL;
    skipped (not under CI) when none answers."""
    import psycopg2

    try:
        connection = psycopg2.connect(POSTGRES_URL, connect_timeout=3)
    except psycopg2.OperationalError as error:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"PostgreSQL at {POSTGRES_URL} (MMIM_TEST_POSTGRES_URL) is required under CI: {error}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set MMIM_TEST_POSTGRES_URL): {error}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    # SQLAlchemy's default PostgreSQL driver is psycopg 3; name psycopg2, which is installed.
    return POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1) + f"/{name}"


def run(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


def dvc(*args, cwd):
    run(str(Path(sys.executable).parent / "dvc"), *args, cwd=cwd)


def make_dvc_project(repo: Path, remote_url: str, endpoint: str | None = None, encoder: str | None = None) -> Path:
    """A git repository with the project's dvc.yaml/params.yaml (a small sample) and code, whose
    default DVC remote is `remote_url`; `encoder` replaces the synthetic dataset's tokenizer."""
    repo.mkdir(parents=True)
    shutil.copytree(PROJECT / "mmim", repo / "mmim", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["synthetic"].update(train=40, valid=12, test=12)
    if encoder:
        params["datasets"]["synthetic"]["encoder"] = encoder
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.email", "ci@example.invalid", cwd=repo)
    run("git", "config", "user.name", "ci", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    dvc("config", "core.autostage", "true", cwd=repo)  # as the project's .dvc/config
    dvc("remote", "add", "-d", "default", remote_url, cwd=repo)
    if endpoint:
        dvc("remote", "modify", "default", "endpointurl", endpoint, cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "project", cwd=repo)
    return repo


@pytest.fixture
def dvc_project(tmp_path, aws_env, bucket):
    """The project with an S3 remote on moto's server."""
    return make_dvc_project(tmp_path / "project", f"s3://{bucket}/cache", aws_env)
