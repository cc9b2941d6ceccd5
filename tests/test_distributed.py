"""Ray Train on a real local cluster: DDP with 2 CPU workers, checkpoints, fault tolerance, S3."""

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import boto3
import psutil
import pytest
import ray

from mmim.checkpoint import load_checkpoint
from mmim.distributed import DistributedTrainingError, train_distributed
from mmim.errors import MMIMInputError
from mmim.files import read_json
from mmim.synthetic import write_synthetic_store
from mmim.train import train
from tests.conftest import run


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_config(tiny_config, tmp_path, **ray_settings):
    settings = {"num_workers": 2, "storage_path": str(tmp_path / "ray"), "run_name": "run", **ray_settings}
    return tiny_config.model_copy(update={"ray": tiny_config.ray.model_copy(update=settings)})


def test_two_workers_match_single_process(ray_cluster, tiny_config, tmp_path):
    config = ray_config(tiny_config, tmp_path)
    result = train_distributed(config)
    run = Path(result.run_path)
    epochs = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch_"))
    assert epochs == ["epoch_001", "epoch_002"]  # a checkpoint per epoch
    assert result.last["ranks_in_sync"] == 1 and result.last["epoch"] == 2
    # the best checkpoint is the one with the lowest validation MAE
    maes = {name: read_json(run / name / "metrics.json")["valid"]["MAE"] for name in epochs}
    assert result.best["valid_MAE"] == pytest.approx(min(maes.values()))
    model, loaded_config, _ = load_checkpoint(result.checkpoint)
    assert loaded_config.model.audio_dim == 5
    # against one process on the same data and seed (different sharding, same optimisation)
    single, _ = train(tiny_config.model_copy(update={"output_dir": str(tmp_path / "single")}))
    assert result.best["valid_MAE"] == pytest.approx(single.valid["MAE"], abs=0.25)
    assert result.best["test_MAE"] == pytest.approx(single.test["MAE"], abs=0.25)


def checkpoint_registered(run: Path, name: str) -> bool:
    """Ray has recorded the checkpoint (not merely started copying it)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and name in snapshot.read_text()


def kill_a_worker_during_epoch_2(run: Path, trainer: threading.Thread) -> int:
    """SIGKILL one Ray Train worker once epoch 1's checkpoint is recorded (from outside the loop)."""
    deadline = time.monotonic() + 120
    while not checkpoint_registered(run, "epoch_001"):
        assert trainer.is_alive() and time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.05)
    assert not checkpoint_registered(run, "epoch_002"), "epoch 2 finished before the kill; make epochs longer"
    # Ray names worker processes by their actor class ("ray::RayTrainWorker...").
    workers = [p.pid for p in psutil.process_iter(["cmdline"])
               if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)
    return workers[0]


@pytest.fixture(scope="module")
def slower_store(tiny_encoder, tmp_path_factory):
    """Enough examples that an epoch lasts a few seconds: time to kill a worker inside it."""
    root = tmp_path_factory.mktemp("stores") / "slower"
    return write_synthetic_store(root, tiny_encoder, seed=1, sizes={"train": 1600, "valid": 32, "test": 32}).root


def run_in_thread(config):
    outcome = {}

    def target():
        try:
            outcome["result"] = train_distributed(config)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error
    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("max_failures", [1, 0])
def test_killed_worker(ray_cluster, tiny_config, slower_store, tmp_path, max_failures):
    config = ray_config(tiny_config, tmp_path, max_failures=max_failures)
    config = config.model_copy(update={
        "data": config.data.model_copy(update={"store": str(slower_store)}),
        "train": config.train.model_copy(update={"epochs": 3})})
    thread, outcome = run_in_thread(config)
    kill_a_worker_during_epoch_2(tmp_path / "ray" / "run", thread)
    thread.join(timeout=600)
    assert not thread.is_alive()
    if max_failures:
        result = outcome["result"]
        assert result.last["epoch"] == 3 and result.last["resumed_from"] == 1
        for name in ("epoch_001", "epoch_002", "epoch_003"):  # none lost, each complete
            model, _, _ = load_checkpoint(tmp_path / "ray" / "run" / name)
            assert model is not None
    else:
        error = outcome["error"]
        assert isinstance(error, DistributedTrainingError)
        assert "ray.max_failures=0" in str(error)
        load_checkpoint(tmp_path / "ray" / "run" / "epoch_001")  # what was written stays whole


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
    config = ray_config(tiny_config, tmp_path, forward_env=forward).model_copy(update={
        "model": tiny_config.model.model_copy(update={"text_encoder": encoder}),
        "data": tiny_config.data.model_copy(update={
            "store": str(tmp_path / "not-on-this-node"), "dvc_url": str(dvc_project), "dvc_dataset": "synthetic"}),
        "train": tiny_config.train.model_copy(update={"epochs": 1})})
    result = train_distributed(config)
    assert result.last["epoch"] == 1 and result.last["ranks_in_sync"] == 1
