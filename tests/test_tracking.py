"""MLflow against a real `mlflow server` on 127.0.0.1, on PostgreSQL with artifacts on S3
(moto), as a team runs it: tracking, pyfunc, registry gating, rollback. (The server on sqlite
with local artifacts, gating head to head and concurrent registrations: tests/test_gating.py;
the champion over REST: tests/test_recordings.py.)"""

import re

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmim.core.store import FeatureStore
from mmim.lifecycle.retrain import retrain
from mmim.registry.logged_model import input_example
from mmim.registry.server import registered_model_name
from mmim.registry.versions import describe, promote, rollback
from tests.helpers import EXAMPLE, postgres_database, run_mmim, start_mlflow_server

pytestmark = pytest.mark.service  # an MLflow server on PostgreSQL and S3 (moto)


@pytest.fixture
def tracking(monkeypatch, aws_env, bucket):
    """(tracking URI, artifact location) of a real MLflow server process."""
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", aws_env)
    backend, artifacts = postgres_database("mlflow"), f"s3://{bucket}/mlflow"
    server, uri = start_mlflow_server(backend)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri, artifacts
    mlflow.set_tracking_uri(None)  # the tracked run set mlflow's process-wide URI to this server
    server.terminate()
    server.wait(timeout=30)


def tracked_config(tiny_config, tmp_path, artifacts, name, **train):
    return tiny_config.model_copy(
        update={
            "tracking": tiny_config.tracking.model_copy(
                update={"enabled": True, "artifact_location": artifacts, "experiment": "mmim-test"}
            ),
            "train": tiny_config.train.model_copy(update=train),
            "output_dir": str(tmp_path / name),
        }
    )


def train_and_track(config):
    """`mmim train --track` in this process: checks, training, logging, scoring, registration."""
    done = retrain(config, lambda metrics: None)
    return done.logged, done.decision


def test_tracking_registry_gating_and_rollback(tracking, tiny_config, tmp_path):
    uri, artifacts = tracking
    client = MlflowClient(uri)
    good = tracked_config(tiny_config, tmp_path, artifacts, "good", epochs=2)
    run, decision = train_and_track(good)
    name = registered_model_name(good)
    assert decision.promoted and decision.champion_version is None

    logged = client.get_run(run.run_id)
    assert logged.data.params["train.lr_main"] == "0.001" and logged.data.params["model.add_va"] == "False"
    assert logged.data.tags["data_version"] == FeatureStore(good.data.store).content_version  # not a DVC output
    assert logged.data.tags["ray_workers"] == "0" and logged.data.tags["data_checks"] == "passed"
    assert len(client.get_metric_history(run.run_id, "valid_MAE")) == 2
    assert {"stage0_neg_lld", "stage1_H", "lr_bert", "test_Acc_2_non0", "selected_test_MAE"} <= set(logged.data.metrics)
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.json", "metrics.json", "learning_curves.png", "test_scatter.png"} <= names
    assert "checkpoint" not in names  # the logged model carries the run's only copy
    assert logged.info.status == "FINISHED"
    assert client.get_experiment(run.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    frame = input_example(FeatureStore(good.data.store), ["the movie was very good", "the plot was dull"])
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predicted = champion.predict(frame)
    assert list(predicted.columns) == ["score", "polarity", "class7"] and np.isfinite(predicted["score"]).all()

    # a deliberately worse run: learning rates so small that nothing is learnt
    worse = tracked_config(
        tiny_config, tmp_path, artifacts, "worse", epochs=1, lr_main=1e-9, lr_bert=1e-9, lr_mmilb=1e-9
    )
    _, second = train_and_track(worse)
    assert not second.promoted and second.champion_version == decision.version
    versions = {v["version"]: v for v in describe(client, name)}
    assert "champion" in versions[decision.version]["aliases"]
    assert versions[second.version]["aliases"] == "challenger"
    assert versions[second.version]["registry_decision"].startswith(f"kept champion v{decision.version}: MAE ")

    # a person promotes the worse one; rollback restores the previous champion
    promote(client, name, second.version)
    assert client.get_model_version_by_alias(name, "champion").version == second.version
    assert rollback(client, name) == decision.version
    assert client.get_model_version_by_alias(name, "champion").version == decision.version

    # bad requests: clear errors, not torch stack traces
    # (a missing column is caught by the logged signature before the model runs)
    for broken, message in [
        (frame.drop(columns=["vision"]), "missing inputs ['vision']"),
        (frame.assign(text=["", "ok"]), "utterance 0, field text: empty"),
        (frame.assign(audio=[[[0.0] * 3]] * 2), "utterance 0, field audio: shape (1, 3)"),
    ]:
        with pytest.raises(MlflowException, match=re.escape(message)):
            champion.predict(broken)

    # evaluate shares predict's way to a logged model; here by its run
    code, out, err = run_mmim(
        "evaluate", "--checkpoint", f"runs:/{run.run_id}/model", "--store", good.data.store, "--split", "test"
    )
    assert code == 0 and "MAE" in out, err
    # a model the registry does not have: one line naming it, exit 2, before any server starts
    for command in (["serve", "--model"], ["predict", "--input", str(EXAMPLE), "--checkpoint"]):
        code, _, err = run_mmim(*command, f"models:/{name}@nosuch")
        assert code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"error: models:/{name}@nosuch: ")
