"""Ray Jobs for real: a Ray head started with `ray start --head` (its job server on 127.0.0.1)
with token authentication (as Ray 2.60 clusters run), `mmim train --submit` ships the project in the
job's runtime_env, and the job trains to a checkpoint. The submitting side runs as its own
process, as a user's would: Ray reads its authentication mode once per process."""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.service  # a Ray head (`ray start --head`) and its job server

BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_api(address: str, token: str, path: str) -> dict:
    request = urllib.request.Request(f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(dashboard address, token, environment with the token) of a head started like a real one."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while True:  # the job server answers once the dashboard is up
        assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
        try:
            job_api(address, token, "")
            break
        except (urllib.error.URLError, ConnectionError) as error:
            assert time.monotonic() < deadline, f"Ray's job server did not answer in 120 s: {error}"
            time.sleep(1)
    yield address, token, env
    head.terminate()  # `ray start --block` stops its processes gracefully: ~30 s; 5 s, then they are killed
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # the session: GCS, raylet, dashboard, workers
    head.wait(timeout=60)
    log.close()
    # `ray start` told every later ray.init() on this machine to join this cluster; it is gone
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def mmim(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mmim"), *args], env=env, capture_output=True, text=True, timeout=120)


def test_submitted_job_ships_the_project_and_trains(ray_head, tiny_encoder, tiny_store, tmp_path):
    address, token, env = ray_head
    output = tmp_path / "job-run"
    overrides = [
        f"model.text_encoder={tiny_encoder}",
        "model.text_pretrained=false",
        f"data.store={tiny_store}",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_threads=1",
        "ray.num_workers=1",
        f"ray.storage_path={tmp_path / 'ray'}",
        f"output_dir={output}",
    ]
    submitted = mmim("train", *[arg for o in overrides for arg in ("--set", o)], "--submit", address, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted Ray job ")[1].split()[0]
    deadline = time.monotonic() + 300
    while (job := job_api(address, token, job_id))["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after 300 s"
        time.sleep(2)
    logs = job_api(address, token, f"{job_id}/logs")["logs"]
    assert job["status"] == "SUCCEEDED", logs[-3000:]
    assert "selected epoch 1" in logs and "1 Ray workers" in logs
    # the job ran the project uploaded with it (runtime_env working_dir), not this checkout
    assert job["runtime_env"]["working_dir"].startswith("gcs://")
    assert job["entrypoint"].startswith("python -m mmim.cli train --set")
    assert (output / "best" / "model.safetensors").is_file()


def test_submitting_without_the_token_is_a_clear_error(ray_head):
    address, _, env = ray_head
    without = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"RAY_AUTH_MODE": "disabled"}
    done = mmim("train", "--set", "train.epochs=1", "--submit", address, env=without)
    assert done.returncode == 2
    assert "the cluster requires its auth token" in done.stderr
