"""Ray Train on a real local cluster: one worker equals one process, a worker's error, settings.

Several nodes, S3, DVC, MLflow reporting and the loss of a node: tests/test_multinode.py.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from mmim.cluster.distributed import train_distributed
from mmim.core.errors import DistributedTrainingError, MMIMInputError
from mmim.training.train import train
from tests.helpers import PROJECT, free_port

pytestmark = pytest.mark.service  # a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_config(tiny_config, tmp_path, **ray_settings):
    settings = {"num_workers": 2, "storage_path": str(tmp_path / "ray"), "run_name": "run", **ray_settings}
    return tiny_config.model_copy(update={"ray": tiny_config.ray.model_copy(update=settings)})


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


def test_batch_must_divide_among_workers(tiny_config, tmp_path):
    config = ray_config(tiny_config, tmp_path, num_workers=3)
    with pytest.raises(MMIMInputError, match="train.batch_size 16 must be divisible by ray.num_workers 3"):
        train_distributed(config)


@pytest.mark.parametrize(
    ("workers", "minimum", "error"),
    [
        (4, 3, "divisible by every worker count from ray.min_workers 3 to ray.num_workers 4 \\(not by 3\\)"),
        (2, 4, "ray.min_workers 4: more than ray.num_workers 2"),
    ],
)
def test_elastic_worker_counts_must_share_the_batch(tiny_config, tmp_path, workers, minimum, error):
    config = ray_config(tiny_config, tmp_path, num_workers=workers, min_workers=minimum)
    with pytest.raises(MMIMInputError, match=error):
        train_distributed(config)


def test_equal_epochs_select_the_first_in_one_process_and_on_a_ray_worker(ray_cluster, tiny_config, tmp_path):
    """Learning rates so small that no weight moves: both epochs score the same, and the first is
    selected, its checkpoint the one kept (Ray keeps one best checkpoint: ray.keep_checkpoints 1)."""
    still = {"epochs": 2, "lr_main": 1e-30, "lr_bert": 1e-30, "lr_mmilb": 1e-30}
    config = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update=still)})
    alone = train(config.model_copy(update={"output_dir": str(tmp_path / "single")}))
    ray_run = ray_config(config, tmp_path, num_workers=1, keep_checkpoints=1)
    distributed = train_distributed(ray_run.model_copy(update={"output_dir": str(tmp_path / "ray1")}))
    for trained in (alone, distributed):
        assert trained.epochs[0]["valid_MAE"] == trained.epochs[1]["valid_MAE"]  # the tie
        assert trained.best_epoch == 1
        assert json.loads((trained.checkpoint / "metrics.json").read_text())["epoch"] == 1


def test_a_command_starts_a_private_cluster_and_never_joins_the_one_the_machine_names(tmp_path):
    """`ray start` leaves <temp dir>/ray/ray_current_cluster, which a bare ray.init() joins. Here it
    names a cluster that is not there: connect() with no address and no RAY_ADDRESS starts its own."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmim-ray-", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").mkdir()
        stranger = f"127.0.0.1:{free_port()}"
        (ray_tmp / "ray" / "ray_current_cluster").write_text(stranger)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
        probe = (
            "import ray; from mmim.cluster.connect import connect; connect(); "
            "print(ray.get_runtime_context().gcs_address); ray.shutdown()"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180, cwd=PROJECT
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() and done.stdout.strip() != stranger
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
