"""The DVC pipeline for real: repro in a git repo, push to S3 (moto's server on 127.0.0.1),
wipe, pull, byte-identical files; a second repro does nothing; a worker fetches without checkout."""

import shutil
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from configobj import ConfigObj

from mmim.core.errors import MMIMInputError, ServiceUnavailableError
from mmim.data.versioning import (
    data_version,
    ensure_store,
    fetch_store,
    input_fingerprint,
    pull,
    push,
    reproduce,
    store_path,
)
from tests.helpers import PROJECT, dvc, free_port, make_dvc_project, run

pytestmark = pytest.mark.service  # DVC remotes: S3 on moto, a local directory


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


def test_repro_leaves_dvc_lock_tracked_by_git(tmp_path):
    """The project's .dvc/config lets DVC `git add` what it writes (dvc.lock, the .gitignore
    files), so that the data version a run recorded can be committed with `git commit`."""
    core = ConfigObj(str(PROJECT / ".dvc" / "config"))["core"]
    assert core.get("autostage") == "true"
    repo = make_dvc_project(tmp_path / "project", str(tmp_path / "dvc-remote"))
    reproduce("synthetic", repo)
    status = subprocess.run(
        ["git", "status", "--porcelain", "dvc.lock"], cwd=repo, capture_output=True, text=True, check=True
    )
    assert status.stdout.strip() == "A  dvc.lock"  # staged, nothing left to `git add`


def test_push_with_nothing_to_send_fails_naming_store_and_remote(dvc_project, bucket):
    where = rf"data/stores/synthetic: .* DVC remote default \({bucket}/cache\)"
    with pytest.raises(MMIMInputError, match=where + ": dvc.lock records no store"):
        push("synthetic", dvc_project)
    reproduce("synthetic", dvc_project)
    shutil.rmtree(dvc_project / ".dvc" / "cache")  # DVC only warns, and sends nothing
    with pytest.raises(MMIMInputError, match=where + r" after the push \(DVC's cache lacks it"):
        push("synthetic", dvc_project)


def test_the_input_fingerprint_counts_params_and_not_outputs(dvc_project):
    """What the flow's extraction cache is keyed on. (That a params change re-extracts, and only
    the extract stage: tests/test_flow.py, test_changed_params_re_extract_and_retrain.)"""
    repo = dvc_project
    fingerprint = input_fingerprint("synthetic", repo)  # known before anything runs
    reproduce("synthetic", repo)
    assert input_fingerprint("synthetic", repo) == fingerprint  # outputs do not count
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extraction"]["max_tokens"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert input_fingerprint("synthetic", repo) != fingerprint


def test_version_before_repro_is_a_clear_error(dvc_project):
    with pytest.raises(MMIMInputError, match="run `dvc repro extract@synthetic` first"):
        data_version("synthetic", dvc_project)


def test_unreachable_remote_is_a_clear_error(dvc_project, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only slow this down
    repo = dvc_project
    reproduce("synthetic", repo)
    dvc("remote", "modify", "default", "endpointurl", f"http://127.0.0.1:{free_port()}", cwd=repo)
    with pytest.raises(ServiceUnavailableError, match="dvc in .*"):  # the pipeline retries these
        push("synthetic", repo)


def test_missing_store_is_restored_or_rebuilt(dvc_project):
    repo = dvc_project
    reproduce("synthetic", repo)
    version = data_version("synthetic", repo)
    store = repo / store_path("synthetic")
    before = snapshot(store)
    shutil.rmtree(store)
    assert ensure_store("synthetic", repo, version) == store  # from DVC's cache, nothing re-run
    assert snapshot(store) == before
    # a checkout that never ran the pipeline (the step came from another checkout's cache)
    for path in (store, repo / "data" / "raw", repo / ".dvc" / "cache"):
        shutil.rmtree(path)
    (repo / "dvc.lock").unlink()
    ensure_store("synthetic", repo, version)
    assert snapshot(store) == before  # extraction is deterministic: the same content
    with pytest.raises(MMIMInputError, match="expected 0123.dir"):
        ensure_store("synthetic", repo, "0123.dir")
