"""The DVC pipeline for real: repro in a git repo, push to S3 (moto's server on 127.0.0.1),
wipe, pull, byte-identical files; a second repro does nothing; a worker fetches without checkout."""

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

from mmim.errors import MMIMInputError
from mmim.versioning import data_version, fetch_store, pull, push, reproduce, store_path

PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
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
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    # the stages run `mmim` from this environment
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return s3_endpoint


def run(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


def dvc(*args, cwd):
    run(str(Path(sys.executable).parent / "dvc"), *args, cwd=cwd)


@pytest.fixture
def dvc_project(tmp_path, aws_env, bucket):
    """A git repository with the project's dvc.yaml/params.yaml (a small sample) and code."""
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(PROJECT / "mmim", repo / "mmim", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["synthetic"].update(train=40, valid=12, test=12)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.email", "ci@example.invalid", cwd=repo)
    run("git", "config", "user.name", "ci", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    dvc("remote", "add", "-d", "s3", f"s3://{bucket}/cache", cwd=repo)
    dvc("remote", "modify", "s3", "endpointurl", aws_env, cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "project", cwd=repo)
    return repo


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_repro_push_wipe_pull_and_no_rework(dvc_project, aws_env, bucket, tmp_path):
    repo = dvc_project
    assert reproduce("synthetic", repo) == ["synthesize", "extract@synthetic"]
    store = repo / store_path("synthetic")
    before = snapshot(store)
    assert "manifest.json" in before and "train/audio.npy" in before
    version = data_version("synthetic", repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert version == lock["stages"]["extract@synthetic"]["outs"][0]["md5"] and version.endswith(".dir")

    assert push("synthetic", repo) > 0
    objects = boto3.client("s3", endpoint_url=aws_env).list_objects_v2(Bucket=bucket)
    assert objects["KeyCount"] > 0

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(store)
    shutil.rmtree(repo / "data" / "raw")
    assert pull("synthetic", repo) == store
    assert snapshot(store) == before

    assert reproduce("synthetic", repo) == []  # nothing changed: no stage runs
    assert data_version("synthetic", repo) == version

    # a worker with no checkout: dvc.lock from git, the files from the S3 remote
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "data", cwd=repo)
    fetched = fetch_store(str(repo), "synthetic", tmp_path / "worker" / "store")
    assert snapshot(fetched) == before


def test_changed_params_re_extract(dvc_project):
    repo = dvc_project
    reproduce("synthetic", repo)
    first = data_version("synthetic", repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extraction"]["max_tokens"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert reproduce("synthetic", repo) == ["extract@synthetic"]  # the raw sample is unchanged
    assert data_version("synthetic", repo) != first


def test_version_before_repro_is_a_clear_error(dvc_project):
    with pytest.raises(MMIMInputError, match="run `dvc repro extract@synthetic` first"):
        data_version("synthetic", dvc_project)


def test_unreachable_remote_is_a_clear_error(dvc_project):
    repo = dvc_project
    reproduce("synthetic", repo)
    dvc("remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{free_port()}", cwd=repo)
    with pytest.raises(MMIMInputError, match="dvc in .*"):
        push("synthetic", repo)
