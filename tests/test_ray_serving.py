"""`mmim serve --ray`: the session's champion on Ray Serve answers as `mmim predict` and as
MLflow's server do, and follows its alias while it serves."""

import json
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import RAY_NO_AUTH, free_port, rest_contract_holds, start


@pytest.fixture(scope="module")
def ray_server(recordings_champion, ray_head):
    """`mmim serve --ray` on the session's Ray cluster, asking where champion points every 0.5 s."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mmim"), "serve", "--ray", "--model", recordings_champion.uri]
    command += ["--port", str(port), "--max-request-mb", "0.5", "--follow-every", "0.5", "--replica-cpus", "0.5"]
    env = {"MLFLOW_TRACKING_URI": recordings_champion.tracking_uri, "RAY_ADDRESS": ray_head, **RAY_NO_AUTH}
    server = start(command, f"http://127.0.0.1:{port}/ping", env=env)
    yield port
    server.terminate()
    server.wait(timeout=60)


def answer(port: int, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


@pytest.mark.service
def test_ray_serve_answers_like_predict_and_refuses_like_mlflows_server(ray_server, recordings_champion):
    rest_contract_holds(ray_server, recordings_champion)


@pytest.mark.service
def test_when_champion_moves_every_request_succeeds_and_answers_name_the_new_version(
    ray_server, recordings_champion, monkeypatch
):
    """A client sends requests one after another while champion moves from v1 to v2 (the same
    model registered again): every answer is 200 and names v1 or v2; within 30 s all name v2."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", recordings_champion.tracking_uri)  # where the source resolves
    client = MlflowClient(recordings_champion.tracking_uri)
    first = client.get_model_version_by_alias("mmim-rec", "champion")
    second = client.create_model_version("mmim-rec", first.source, first.run_id, model_id=first.model_id)
    old, new = str(first.version), str(second.version)  # the sqlite registry's are ints
    body = {"dataframe_split": recordings_champion.features.to_dict(orient="split")}
    versions: list[str] = []
    try:
        assert answer(ray_server, body)["model_version"] == old
        client.set_registered_model_alias("mmim-rec", "champion", new)
        moved = time.monotonic()
        while time.monotonic() - moved < 30 and versions[-5:] != [new] * 5:
            reply = answer(ray_server, body)  # a failed request raises
            assert reply["predictions"] and [row["score"] for row in reply["predictions"]] == pytest.approx(
                recordings_champion.from_features, abs=1e-5
            )
            versions.append(reply["model_version"])
        assert set(versions) <= {old, new}
        assert versions[-5:] == [new] * 5, versions
        assert versions == sorted(versions, key=int)  # once v2 answers, v1 never again
    finally:
        client.set_registered_model_alias("mmim-rec", "champion", old)
