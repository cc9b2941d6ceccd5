"""Ray Train on a real local cluster: DDP with 2 CPU workers, checkpoints, fault tolerance, S3."""

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import boto3
import mlflow
import psutil
import pytest
import ray
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from mmim.checkpoint import load_checkpoint
from mmim.distributed import train_distributed
from mmim.errors import DistributedTrainingError, MMIMInputError
from mmim.files import read_json
from mmim.synthetic import write_synthetic_store
from mmim.tracking import tracked_run
from mmim.train import train
from tests.helpers import run

pytestmark = pytest.mark.service  # a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_config(tiny_config, tmp_path, **ray_settings):
    settings = {"num_workers": 2, "storage_path": str(tmp_path / "ray"), "run_name": "run", **ray_settings}
    return tiny_config.model_copy(update={"ray": tiny_config.ray.model_copy(update=settings)})


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """MLflow on a sqlite file (what `make demo` uses); the client for reading runs back."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def tracked(config, tmp_path):
    return config.model_copy(
        update={
            "tracking": config.tracking.model_copy(
                update={"enabled": True, "artifact_location": str(tmp_path / "artifacts")}
            )
        }
    )


def test_two_workers_report_every_epoch_to_mlflow(ray_cluster, tiny_config, tmp_path, mlflow_sqlite):
    config = tracked(ray_config(tiny_config, tmp_path, keep_checkpoints=1), tmp_path)
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 4})})
    reported_at = {}

    def on_report(metrics):  # what the flow and the CLI do with each report
        reported_at[int(metrics["epoch"])] = int(time.time() * 1000)
        run.log_epoch(metrics)

    with tracked_run(config) as run:
        result = train_distributed(config, on_report)
        tracked_model = run.log_model(result)
    ray_run = Path(result.ray_run)
    # Ray keeps the best checkpoint and the latest; the driver still saw every epoch
    kept = sorted(p.name for p in ray_run.iterdir() if p.name.startswith("epoch_"))
    assert 1 <= len(kept) <= 2 and "epoch_004" in kept
    assert [int(e["epoch"]) for e in result.epochs] == [1, 2, 3, 4] == sorted(reported_at)
    assert result.epochs[-1]["ranks_in_sync"] == 1 and result.epochs[-1]["epoch"] == 4
    # the best checkpoint is the epoch with the lowest validation MAE, copied without training state
    assert result.best["valid_MAE"] == min(e["valid_MAE"] for e in result.epochs)
    assert not list(result.checkpoint.glob("training_state*"))
    model, loaded_config, _ = load_checkpoint(result.checkpoint)
    assert loaded_config.model.audio_dim == 5

    # MLflow: every epoch at steps 1..4, logged as it was reported, in a run opened before epoch 1 ended
    logged = mlflow_sqlite.get_run(tracked_model.run_id)
    history = mlflow_sqlite.get_metric_history(logged.info.run_id, "valid_MAE")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [e["valid_MAE"] for e in result.epochs]
    assert logged.info.start_time <= reported_at[1] <= min(m.timestamp for m in history)
    assert max(m.timestamp for m in history) < logged.info.end_time and logged.info.status == "FINISHED"
    with tempfile.TemporaryDirectory() as workdir:
        metrics = read_json(
            Path(
                mlflow.artifacts.download_artifacts(
                    run_id=logged.info.run_id, artifact_path="metrics.json", dst_path=workdir
                )
            )
        )
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]  # what learning_curves.png plots
    assert "learning_curves.png" in {a.path for a in mlflow_sqlite.list_artifacts(logged.info.run_id)}
    assert read_json(Path(config.output_dir) / "metrics.json")["best"] == result.best


def test_one_worker_trains_exactly_what_one_process_trains(ray_cluster, tiny_config, tmp_path):
    """The same setup and epoch loop: bit-identical weights and figures. (With N > 1 workers each
    rank's CPC and entropy terms see its own batch_size / N utterances, so figures differ by design.)"""
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"num_threads": 1})})
    threads = torch.get_num_threads()
    try:
        alone = train(config.model_copy(update={"output_dir": str(tmp_path / "single")}))
    finally:
        torch.set_num_threads(threads)
    ray_run = ray_config(config, tmp_path, num_workers=1).model_copy(update={"output_dir": str(tmp_path / "ray1")})
    distributed = train_distributed(ray_run)
    assert [e["valid_MAE"] for e in distributed.epochs] == [e["valid_MAE"] for e in alone.epochs]
    assert [e["stage1_loss"] for e in distributed.epochs] == [e["stage1_loss"] for e in alone.epochs]
    ours = load_file(str(alone.checkpoint / "model.safetensors"))
    theirs = load_file(str(distributed.checkpoint / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def checkpoint_registered(run: Path, name: str) -> bool:
    """Ray has recorded the checkpoint (not merely started copying it)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and name in snapshot.read_text()


def kill_a_worker_during_epoch_2(run: Path, trainer: threading.Thread) -> int:
    """SIGKILL one Ray Train worker once epoch 1's checkpoint is recorded (from outside the loop)."""
    deadline = time.monotonic() + 300  # a loaded 2-core machine takes minutes to start Ray Train
    while not checkpoint_registered(run, "epoch_001"):
        assert trainer.is_alive() and time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.05)
    assert not checkpoint_registered(run, "epoch_002"), "epoch 2 finished before the kill; make epochs longer"
    # Ray names worker processes by their actor class ("ray::RayTrainWorker..."). Only this
    # test's cluster (its raylet is a child of this process): another job's workers on the
    # same machine are not ours to kill.
    workers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))
        and os.getpid() in {parent.pid for parent in p.parents()}
    ]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)
    return workers[0]


@pytest.fixture(scope="module")
def slower_store(tiny_encoder, tmp_path_factory):
    """Enough examples that an epoch lasts a few seconds: time to kill a worker inside it."""
    root = tmp_path_factory.mktemp("stores") / "slower"
    return write_synthetic_store(root, tiny_encoder, seed=1, sizes={"train": 1600, "valid": 32, "test": 32}).root


def run_in_thread(config):
    """Train tracked in MLflow, as the flow does, in a thread: the test kills a worker meanwhile."""
    outcome = {}

    def target():
        try:
            with tracked_run(config) as run:
                outcome["run_id"] = run.run_id
                outcome["result"] = train_distributed(config, run.log_epoch)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("max_failures", [1, 0])
def test_killed_worker(ray_cluster, tiny_config, slower_store, tmp_path, max_failures, mlflow_sqlite):
    config = tracked(ray_config(tiny_config, tmp_path, max_failures=max_failures), tmp_path)
    config = config.model_copy(
        update={
            "data": config.data.model_copy(update={"store": str(slower_store)}),
            "train": config.train.model_copy(update={"epochs": 3}),
        }
    )
    thread, outcome = run_in_thread(config)
    kill_a_worker_during_epoch_2(tmp_path / "ray" / "run", thread)
    thread.join(timeout=600)
    assert not thread.is_alive()
    logged = mlflow_sqlite.get_run(outcome["run_id"])
    steps = sorted(m.step for m in mlflow_sqlite.get_metric_history(outcome["run_id"], "valid_MAE"))
    if max_failures:
        result = outcome["result"]
        assert result.epochs[-1]["epoch"] == 3 and result.epochs[-1]["resumed_from"] == 1
        assert [int(e["epoch"]) for e in result.epochs] == [1, 2, 3]  # the redone epoch 2 once
        assert logged.info.status == "FINISHED" and steps == [1, 2, 3]
        for epoch in (1, 2, 3):  # none lost, each complete and of its own epoch
            directory = tmp_path / "ray" / "run" / f"epoch_{epoch:03d}"
            load_checkpoint(directory)
            assert read_json(directory / "metrics.json")["epoch"] == epoch
    else:
        error = outcome["error"]
        assert isinstance(error, DistributedTrainingError)
        assert "ray.max_failures=0" in str(error)
        # the crash is visible in MLflow: the run FAILED, with the epochs finished before it
        assert logged.info.status == "FAILED" and steps == [1]
        load_checkpoint(tmp_path / "ray" / "run" / "epoch_001")  # what was written stays whole


def test_diverging_training_names_the_workers_error(ray_cluster, tiny_config, tmp_path):
    config = ray_config(tiny_config, tmp_path)
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"epochs": 1, "lr_main": 1e8, "lr_bert": 1e8, "lr_mmilb": 1e8})}
    )
    with pytest.raises(
        DistributedTrainingError,
        match=r"ray.max_failures=0\): rank 0: training diverged at epoch 1, stage \d, batch \d+",
    ):
        train_distributed(config)


def test_checkpoints_on_s3(ray_cluster, tiny_config, tmp_path, aws_env, bucket):
    """storage_path on s3:// served by moto on 127.0.0.1 (pyarrow S3 with endpoint_override)."""
    config = ray_config(tiny_config, tmp_path, storage_path=f"s3://{bucket}/mmim", s3_endpoint=aws_env)
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    result = train_distributed(config)
    s3 = boto3.client("s3", endpoint_url=aws_env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mmim/run/")["Contents"]]
    assert "mmim/run/epoch_001/model.safetensors" in keys
    assert "mmim/run/epoch_001/training_state.json" in keys
    load_checkpoint(result.checkpoint)  # the local copy of the best checkpoint


def test_batch_must_divide_among_workers(tiny_config, tmp_path):
    config = ray_config(tiny_config, tmp_path, num_workers=3)
    with pytest.raises(MMIMInputError, match="train.batch_size 16 must be divisible by ray.num_workers 3"):
        train_distributed(config)


def test_workers_fetch_the_store_with_dvc(ray_cluster, tiny_config, dvc_project, tmp_path):
    """Nodes without the store: workers fetch the DVC version named in the config."""
    from mmim.versioning import push, reproduce

    reproduce("synthetic", dvc_project)
    push("synthetic", dvc_project)
    run("git", "add", "-A", cwd=dvc_project)
    run("git", "commit", "-qm", "data", cwd=dvc_project)
    shutil.rmtree(dvc_project / ".dvc" / "cache")  # the only copy left is on the S3 remote
    encoder = "sentence-transformers/all-MiniLM-L6-v2"  # what params.yaml extracts the sample for
    forward = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]
    config = ray_config(tiny_config, tmp_path, forward_env=forward).model_copy(
        update={
            "model": tiny_config.model.model_copy(update={"text_encoder": encoder}),
            "data": tiny_config.data.model_copy(
                update={
                    "store": str(tmp_path / "not-on-this-node"),
                    "dvc_url": str(dvc_project),
                    "dvc_dataset": "synthetic",
                }
            ),
            "train": tiny_config.train.model_copy(update={"epochs": 1}),
        }
    )
    result = train_distributed(config)
    assert result.epochs[-1]["epoch"] == 1 and result.epochs[-1]["ranks_in_sync"] == 1
