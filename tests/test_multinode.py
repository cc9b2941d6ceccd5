"""Ray Train across nodes that share no disk, and the loss of a node mid-run.

A head and two worker nodes on this machine (`ray.cluster_utils.Cluster`, the way Ray tests
itself). Checkpoints go to S3 (moto's server) and every worker fetches the feature store
from the DVC remote on S3 into its own temporary directory: nothing is read from a path
that another node wrote.
"""

import shutil
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from mmim.cluster.distributed import train_distributed
from mmim.core.errors import DistributedTrainingError
from mmim.core.files import read_json
from mmim.data.versioning import push, reproduce
from mmim.registry.logged_model import log_model
from mmim.registry.tracking import tracked_run
from mmim.training.checkpoint import load_checkpoint
from tests.helpers import make_dvc_project, run, run_in_thread, tracked

pytestmark = pytest.mark.service  # a three-node Ray cluster, S3, DVC

# A custom resource that decides placement: each worker node offers one "node slot" (one worker
# per node, whatever Ray prefers; the head offers none).
NODE_SLOT = "mmim_node_slot"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def add_worker_node(cluster: Cluster) -> None:
    cluster.add_node(num_cpus=1, resources={NODE_SLOT: 1})
    cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def cluster():
    # Dead nodes are noticed after 5 missed 1-second health checks (Ray's default: 30 s).
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": system}
    )
    for _ in range(2):
        add_worker_node(cluster)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def remote_store(tiny_encoder, s3_endpoint, tmp_path_factory):
    """A DVC project whose feature store (tiny encoder) exists only on its S3 remote: (project, bucket)."""
    bucket = f"mmim-nodes-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as environment:
        for name, value in AWS.items():
            environment.setenv(name, value)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
        # Epochs of a few seconds: time to lose a node inside one.
        sizes = {"train": 200, "valid": 32, "test": 32}
        project = make_dvc_project(
            tmp_path_factory.mktemp("nodes") / "project", f"s3://{bucket}/dvc", s3_endpoint, tiny_encoder, sizes
        )
        reproduce("synthetic", project)
        push("synthetic", project)
        run("git", "add", "-A", cwd=project)
        run("git", "commit", "-qm", "data", cwd=project)
        for directory in (project / ".dvc" / "cache", project / "data" / "stores"):
            shutil.rmtree(directory)  # the store is on no node now, only on S3
        yield project, bucket


def cluster_config(tiny_config, remote_store, s3_endpoint, tmp_path, run_name, **ray_settings):
    project, bucket = remote_store
    ray_settings = {
        "num_workers": 2,
        "storage_path": f"s3://{bucket}/runs",
        "s3_endpoint": s3_endpoint,
        "run_name": run_name,
        "forward_env": list(AWS),
        "resources_per_worker": {"CPU": 1, NODE_SLOT: 1},
        "placement_strategy": "SPREAD",
        "keep_storage": True,  # the tests read the checkpoints Ray kept
        **ray_settings,
    }
    data = {"store": str(tmp_path / "on-no-node"), "dvc_url": str(project), "dvc_dataset": "synthetic"}
    return tiny_config.model_copy(
        update={
            "data": tiny_config.data.model_copy(update=data),
            "ray": tiny_config.ray.model_copy(update=ray_settings),
            "output_dir": str(tmp_path / run_name),
        }
    )


def test_two_nodes_that_share_no_disk_train_and_every_epoch_reaches_mlflow_as_reported(
    cluster, tiny_config, remote_store, s3_endpoint, tmp_path, mlflow_sqlite
):
    """One worker per node, the store fetched from S3 on each, checkpoints to S3; tracked as the flow
    tracks it. (That a Ray run trains bit for bit what one process trains: tests/test_distributed.py.)"""
    two_nodes = tracked(
        cluster_config(tiny_config, remote_store, s3_endpoint, tmp_path, "two-nodes", keep_checkpoints=1), tmp_path
    )
    reported_at = {}

    def on_report(metrics):  # what the flow and the CLI do with each report
        reported_at[int(metrics["epoch"])] = int(time.time() * 1000)
        run.log_epoch(metrics)

    with tracked_run(two_nodes) as run:
        spread = train_distributed(two_nodes, on_report)
        tracked_model = log_model(run, spread)
    assert spread.epochs[-1]["ranks_in_sync"] == 1 and spread.epochs[-1]["workers"] == 2

    # S3 holds the best checkpoint and the latest (ray.keep_checkpoints 1); the driver saw every epoch
    _, bucket = remote_store
    kept = {key.split("/")[2] for key in s3_keys(s3_endpoint, bucket, "runs/two-nodes/epoch_")}
    assert 1 <= len(kept) <= 2 and "epoch_002" in kept
    assert [int(e["epoch"]) for e in spread.epochs] == [1, 2] == sorted(reported_at)
    assert spread.best["valid_MAE"] == min(e["valid_MAE"] for e in spread.epochs)
    assert not list(spread.checkpoint.glob("training_state*"))  # the local copy: weights only
    load_checkpoint(spread.checkpoint)

    # MLflow: every epoch at its step, logged as it was reported, in a run opened before epoch 1 ended
    logged = mlflow_sqlite.get_run(tracked_model.run_id)
    history = sorted(mlflow_sqlite.get_metric_history(logged.info.run_id, "valid_MAE"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(e["epoch"], e["valid_MAE"]) for e in spread.epochs]
    assert logged.info.start_time <= reported_at[1] <= min(m.timestamp for m in history)
    assert max(m.timestamp for m in history) < logged.info.end_time and logged.info.status == "FINISHED"
    assert {"metrics.json", "learning_curves.png"} <= {a.path for a in mlflow_sqlite.list_artifacts(logged.info.run_id)}
    assert read_json(Path(two_nodes.output_dir) / "metrics.json")["best"] == spread.best


def lose_node(cluster: Cluster) -> None:
    """A worker node vanishes at once, as a preempted machine: SIGKILL to its Ray services and to
    its worker processes (Ray's `remove_node` kills only the services; the workers would run on,
    even finish an epoch, until they notice that their raylet is gone)."""
    node = next(iter(cluster.worker_nodes))
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    workers = raylet.children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass


def s3_keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def checkpoint_registered(endpoint: str, bucket: str, run_name: str, epoch: int) -> bool:
    """Ray has recorded the epoch's checkpoint in its snapshot on S3 (not merely started uploading it)."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        snapshot = s3.get_object(Bucket=bucket, Key=f"runs/{run_name}/checkpoint_manager_snapshot.json")
    except s3.exceptions.NoSuchKey:
        return False
    return f"epoch_{epoch:03d}" in snapshot["Body"].read().decode()


def load_checkpoint_from_s3(endpoint: str, bucket: str, prefix: str):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    with tempfile.TemporaryDirectory() as directory:
        for key in s3_keys(endpoint, bucket, prefix):
            if key.endswith("/"):  # a directory marker
                continue
            target = Path(directory) / key.removeprefix(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
        return load_checkpoint(directory)


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_lost_node(
    cluster, tiny_config, remote_store, s3_endpoint, tmp_path, mlflow_sqlite, monkeypatch, max_failures
):
    """A worker node disappears (SIGKILL, as a preempted spot instance) once epoch 1 is checkpointed.

    With a failure allowed and ray.min_workers 1, training restarts from that checkpoint on the
    node that is left and finishes; without, a clear error, and the checkpoint still loads.
    """
    # Ray may first retry the old size before it sees the node gone; it waits this long for
    # the resources (60 s by default) before it tries the size the cluster has. Only the
    # placement group's reservation waits on it, which takes milliseconds when the nodes exist.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")
    run_name = f"lost-node-{max_failures}"
    elastic = {"max_failures": max_failures, "min_workers": 1 if max_failures else None}
    config = tracked(cluster_config(tiny_config, remote_store, s3_endpoint, tmp_path, run_name, **elastic), tmp_path)
    _, bucket = remote_store
    thread, outcome = run_in_thread(config)
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine takes minutes to start Ray Train
        while not checkpoint_registered(s3_endpoint, bucket, run_name, 1):
            assert thread.is_alive() and time.monotonic() < deadline, f"epoch 1 never finished: {outcome}"
            time.sleep(0.05)
        assert not checkpoint_registered(s3_endpoint, bucket, run_name, 2), "epoch 2 finished first: lengthen it"
        lose_node(cluster)
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        add_worker_node(cluster)  # back to three nodes for the next test
    steps = sorted(m.step for m in mlflow_sqlite.get_metric_history(outcome["run_id"], "valid_MAE"))
    status = mlflow_sqlite.get_run(outcome["run_id"]).info.status
    if max_failures:
        result = outcome["result"]
        # epoch 1 on two nodes; epoch 2 on the one left, resumed after epoch 1
        assert [(e["epoch"], e["workers"], e["resumed_from"]) for e in result.epochs] == [(1, 2, 0), (2, 1, 1)]
        # the restart is in MLflow: every epoch, and the resume and worker count at each
        assert status == "FINISHED" and steps == [1, 2]
        resumed = mlflow_sqlite.get_metric_history(outcome["run_id"], "resumed_from")
        assert sorted((m.step, m.value) for m in resumed) == [(1, 0.0), (2, 1.0)]
        for epoch in (1, 2):  # none lost, each whole
            load_checkpoint_from_s3(s3_endpoint, bucket, f"runs/{run_name}/epoch_{epoch:03d}/")
    else:
        error = outcome["error"]
        assert isinstance(error, DistributedTrainingError) and "ray.max_failures=0" in str(error)
        assert status == "FAILED" and steps == [1]
        load_checkpoint_from_s3(s3_endpoint, bucket, f"runs/{run_name}/epoch_001/")
