"""`mmim predict` on the shipped example input, and registry commands that cannot reach MLflow.

Serving a registered model, and `predict`/`evaluate` from the registry, run against a
real MLflow server in tests/test_tracking.py (they share its registered model).
"""

import io
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mmim.core.model import build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import load_tokenizer
from mmim.data.synthetic import AUDIO_DIM, VISION_DIM
from mmim.registry.serving import MMIMPyfunc
from mmim.training.checkpoint import save_checkpoint
from mmim.training.predict import MAX_FRAMES, MAX_INPUT_BYTES, MAX_UTTERANCES
from tests.helpers import EXAMPLE, free_port, run_mmim


def test_predict_accepts_the_shipped_example(tiny_config, tmp_path):
    store = FeatureStore(tiny_config.data.store)
    # the example has the dims of the demo's synthetic store; the test store is synthetic too
    assert (store.dims["audio"], store.dims["vision"]) == (AUDIO_DIM, VISION_DIM)
    config = bind_store(tiny_config, store)
    checkpoint = save_checkpoint(
        tmp_path / "untrained", build_model(config.model), config, load_tokenizer(config.model.text_encoder)
    )
    code, out, err = run_mmim("predict", "--checkpoint", str(checkpoint), "--input", str(EXAMPLE))
    assert code == 0, err
    predictions = json.loads(out)
    assert len(predictions) == len(json.loads(EXAMPLE.read_text())) == 3
    assert all(set(p) == {"score", "polarity", "class7"} for p in predictions)


@pytest.mark.parametrize("command", [["serve", "--model"], ["predict", "--input", str(EXAMPLE), "--checkpoint"]])
def test_an_unreachable_registry_is_one_line(command, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    code, _, err = run_mmim(*command, "models:/mmim-synthetic@champion")
    assert code == 1 and "Traceback" not in err, err  # a service that does not answer: exit 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: models:/mmim-synthetic@champion: tracking server http://127.0.0.1:")
    )


@pytest.mark.parametrize(
    "options,message",
    [
        (["--model", "runs:/abc/model"], "--model 'runs:/abc/model': Ray Serve serves a registered model"),
        (["--replicas", "0"], "--replicas 0 --max-replicas None: expected 1 <= min <= max"),
        (["--replicas", "3", "--max-replicas", "2"], "--replicas 3 --max-replicas 2: expected 1 <= min <= max"),
        (["--replica-cpus", "nan"], "--replica-cpus nan: expected a number of CPUs"),
        (["--batch-size", "0"], "--batch-size 0: expected 1 to 1024"),
        (["--follow-every", "0"], "--follow-every 0.0: expected 0.1 to 86400 seconds"),
    ],
)
def test_bad_ray_serve_options_are_one_line_before_the_registry_is_asked(options, message, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens: never asked
    code, _, err = run_mmim("serve", "--ray", "--port", str(free_port()), *options)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {message}"), err


@pytest.mark.parametrize("command", [["list"], ["rollback"], ["promote", "--version", "1"]])
def test_registry_commands_fail_fast_when_mlflow_does_not_answer(command, monkeypatch):
    """Not MLflow's minutes of HTTP retries, and not "no champion" when nobody could be asked."""
    uri = f"http://127.0.0.1:{free_port()}"  # a closed port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    code, _, err = run_mmim("registry", *command, "--name", "mmim-synthetic")
    assert time.monotonic() - started < 30
    assert code == 1 and "Traceback" not in err and "no champion" not in err
    assert f"error: registered model mmim-synthetic: tracking server {uri} does not answer" in err


# ---------------------------------------------------------------- caps on a request, and hostile JSON


@pytest.fixture
def untrained_checkpoint(tiny_config, tmp_path) -> Path:
    config = bind_store(tiny_config, FeatureStore(tiny_config.data.store))
    return save_checkpoint(
        tmp_path / "untrained", build_model(config.model), config, load_tokenizer(config.model.text_encoder)
    )


def utterances(count: int = 1, frames: int = 3) -> list[dict]:
    return [
        {"text": "the movie was good", "audio": [[0.5] * AUDIO_DIM] * frames, "vision": [[0.5] * VISION_DIM] * frames}
        for _ in range(count)
    ]


OVER_THE_CAPS = [  # (utterances, the error) for predict, the pyfunc and the server alike
    (utterances(frames=MAX_FRAMES + 1), "utterance 0, field audio: 10001 frames, at most 10000 per utterance"),
    (utterances(MAX_UTTERANCES + 1), "257 utterances, at most 256 per request"),
]


@pytest.mark.parametrize("request_, message", OVER_THE_CAPS, ids=["frames", "utterances"])
def test_predict_refuses_requests_over_the_caps(untrained_checkpoint, tmp_path, request_, message):
    path = tmp_path / "utterances.json"
    path.write_text(json.dumps(request_))
    code, _, err = run_mmim("predict", "--checkpoint", str(untrained_checkpoint), "--input", str(path))
    assert (code, err.strip()) == (2, f"error: {message}")


@pytest.mark.parametrize("request_, message", OVER_THE_CAPS, ids=["frames", "utterances"])
def test_the_pyfunc_refuses_requests_over_the_caps(untrained_checkpoint, request_, message):
    model = MMIMPyfunc()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(untrained_checkpoint)}))
    with pytest.raises(MlflowException) as raised:
        model.predict(None, pd.DataFrame(request_))
    assert (raised.value.message, raised.value.get_http_status_code()) == (message, 400)


def test_predict_refuses_an_input_file_over_the_size_cap(untrained_checkpoint, tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as handle:  # sparse: no disk space, and never read
        handle.truncate(MAX_INPUT_BYTES + 1)
    code, _, err = run_mmim("predict", "--checkpoint", str(untrained_checkpoint), "--input", str(path))
    assert (code, err.strip()) == (2, f"error: {path}: larger than 64 MB, the cap on mmim predict's input (split it)")


@pytest.mark.parametrize("from_stdin", [False, True])
def test_predict_refuses_deeply_nested_json(untrained_checkpoint, tmp_path, monkeypatch, from_stdin):
    """A RecursionError traceback before. (Served, such a body fails in MLflow's own JSON parser
    before the model sees it: HTTP 500, see the README.)"""
    nested = b"[" * 100_000
    source = "-" if from_stdin else str(tmp_path / "nested.json")
    if from_stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(nested)))
    else:
        Path(source).write_bytes(nested)
    code, _, err = run_mmim("predict", "--checkpoint", str(untrained_checkpoint), "--input", source)
    assert (code, err.strip()) == (2, f"error: {source}: JSON nested too deeply")


def test_a_model_logged_before_the_layered_layout_still_loads(tiny_config, tmp_path, mlflow_sqlite):
    """Its MLflow artifact holds the old entry file, which imports mmim.serving: a champion logged by
    an earlier release must stay servable and scorable."""
    import mlflow

    config = bind_store(tiny_config, FeatureStore(tiny_config.data.store))
    checkpoint = save_checkpoint(
        tmp_path / "old", build_model(config.model), config, load_tokenizer(config.model.text_encoder)
    )
    old_entry = tmp_path / "pyfunc_entry.py"  # as logged by 0.1
    old_entry.write_text("import mlflow\nfrom mmim.serving import MMIMPyfunc\nmlflow.models.set_model(MMIMPyfunc())\n")
    experiment = mlflow.create_experiment("old-models", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(old_entry),
            artifacts={"checkpoint": str(checkpoint)},
            pip_requirements=["mmim-pipeline"],
        )
    frame = pd.DataFrame(json.loads(EXAMPLE.read_text()))
    scores = mlflow.pyfunc.load_model(info.model_uri).predict(frame)
    assert len(scores) == len(frame) and list(scores.columns) == ["score", "polarity", "class7"]
