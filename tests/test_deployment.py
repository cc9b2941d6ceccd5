"""prefect.yaml for real: a `prefect server` on PostgreSQL (127.0.0.1:5432), `prefect deploy
--all`, and one deployment run by a process worker, as a user would: the worker finds the flow
and hands it our parameters merged with the deployment's. (The flow itself, end to end:
tests/test_flow.py; here it stops at its first step, on a setting it refuses.)"""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PROJECT, free_port, postgres_database, start

pytestmark = pytest.mark.service  # a Prefect server on PostgreSQL, a process worker

BIN = Path(sys.executable).parent


def api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{base}{path}",
        method="GET" if body is None else "POST",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def prefect(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_deploy_all_and_run_one_deployment_through_a_process_worker(tmp_path):
    database = postgres_database("prefect").replace("+psycopg2", "+asyncpg", 1)
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": base,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"{base}/health",
        env={**env, "PREFECT_API_DATABASE_CONNECTION_URL": database},
    )
    try:
        prefect("work-pool", "create", "mmim-process", "--type", "process", env=env, cwd=PROJECT)
        prefect("--no-prompt", "deploy", "--all", env=env, cwd=PROJECT)

        deployments = {d["name"]: d for d in api(base, "/deployments/filter", {})}
        assert set(deployments) == {"retrain-mosi", "tune-mosi", "retrain-mosei", "retrain-synthetic"}
        crons = {name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployments.items()}
        assert crons == {
            "retrain-mosi": ["0 3 * * 1"],
            "tune-mosi": ["0 3 1 * *"],
            "retrain-mosei": ["0 5 * * 1"],
            "retrain-synthetic": [],
        }
        # the monthly search writes the config the weekly retraining reads
        tuning, weekly = deployments["tune-mosi"]["parameters"], deployments["retrain-mosi"]["parameters"]
        assert tuning["tune_trials"] > 0 and tuning["tuned_config"] == weekly["tuned_config"] == "runs/search/mosi.yaml"
        assert {d["work_pool_name"] for d in deployments.values()} == {"mmim-process"}
        assert deployments["retrain-mosi"]["parameters"]["config"] == "configs/mosi.yaml"

        # the synthetic deployment with a setting the flow refuses before its first step: the
        # worker's run ends with the flow's own answer, which names our override
        flow_run = api(
            base,
            f"/deployments/{deployments['retrain-synthetic']['id']}/create_flow_run",
            {"parameters": {"overrides": ["train.epochs=0"]}},
        )
        worker_env = {**env, "MMIM_PROJECT_DIR": str(PROJECT)}
        prefect("worker", "start", "--pool", "mmim-process", "--run-once", "--limit", "1", env=worker_env, cwd=tmp_path)

        finished = api(base, f"/flow_runs/{flow_run['id']}")
        assert finished["state"]["type"] == "FAILED", finished["state"]
        assert finished["parameters"] == {
            **deployments["retrain-synthetic"]["parameters"],
            "overrides": ["train.epochs=0"],
        }
        refused = f"step load_config failed: {PROJECT / 'configs' / 'demo.yaml'} with --set: train.epochs: "
        assert finished["state"]["message"].endswith(refused + "Input should be greater than 0")
    finally:
        server.terminate()
        server.wait(timeout=30)
