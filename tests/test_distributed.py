"""Ray Train on a real local cluster: one worker equals one process, a worker's error, settings.

Several nodes, S3, DVC, MLflow reporting and the loss of a node: tests/test_multinode.py.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmim.cluster.distributed import train_distributed
from mmim.core.errors import DistributedTrainingError, MMIMInputError
from mmim.training.train import train
from tests.helpers import PROJECT, free_port, stop_ray_head


def ray_config(tiny_config, tmp_path, **ray_settings):
    settings = {"num_workers": 2, "storage_path": str(tmp_path / "ray"), "run_name": "run", **ray_settings}
    return tiny_config.model_copy(update={"ray": tiny_config.ray.model_copy(update=settings)})


@pytest.mark.service
def test_one_worker_trains_exactly_what_one_process_trains(ray_cluster, baseline_training, tiny_config, tmp_path):
    """The same setup and epoch loop: bit-identical weights and figures. (With N > 1 workers each
    rank's CPC and entropy terms see its own batch_size / N utterances, so figures differ by design.)"""
    alone = baseline_training  # the same config in this process
    ray_run = ray_config(tiny_config, tmp_path, num_workers=1).model_copy(update={"output_dir": str(tmp_path / "ray1")})
    distributed = train_distributed(ray_run)
    assert not (tmp_path / "ray" / "run").exists()  # Ray's storage of the run, once its best is copied out
    assert [e["valid_MAE"] for e in distributed.epochs] == [e["valid_MAE"] for e in alone.epochs]
    assert [e["stage1_loss"] for e in distributed.epochs] == [e["stage1_loss"] for e in alone.epochs]
    ours = load_file(str(alone.checkpoint / "model.safetensors"))
    theirs = load_file(str(distributed.checkpoint / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.service
def test_diverging_training_names_the_workers_error(ray_cluster, tiny_config, tmp_path):
    config = ray_config(tiny_config, tmp_path, max_failures=0)  # a retry would diverge again
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"epochs": 1, "lr_main": 1e8, "lr_bert": 1e8, "lr_mmilb": 1e8})}
    )
    with pytest.raises(
        DistributedTrainingError,
        # both ranks diverge at the same batch; whichever Ray reports first is named
        match=r"ray.max_failures=0\): rank [01]: training diverged at epoch 1, stage \d, batch \d+",
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


@pytest.mark.service
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


@pytest.mark.service
def test_mmim_train_neither_joins_nor_disturbs_the_cluster_the_machine_runs(tiny_config, tmp_path):
    """Another project's cluster, live, named in <temp dir>/ray/ray_current_cluster (where a bare
    ray.init() finds it): `mmim train --workers 1` starts its own, finishes, and the stranger
    still answers with no driver of ours in its job table."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmim-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    port = free_port()
    ray_bin = Path(sys.executable).parent / "ray"
    start = [str(ray_bin), "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=false"]
    start += [f"--port={port}", "--disable-usage-stats"]
    stranger_env = env | {"RAY_AUTH_MODE": "disabled"}  # whatever ~/.ray holds: the probe below joins it
    started = subprocess.Popen(
        start, env=stranger_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        address_file = ray_tmp / "ray" / "ray_current_cluster"
        for _ in range(120):
            if address_file.is_file() and address_file.read_text().strip():
                break
            time.sleep(1)
        stranger = address_file.read_text().strip()
        assert stranger.endswith(f":{port}")
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(tiny_config.model_dump()))
        training = [str(Path(sys.executable).parent / "mmim"), "train", "--config", str(config), "--workers", "1"]
        training += ["--set", "train.epochs=1", "--set", f"ray.storage_path={tmp_path / 'ray'}"]
        trained = subprocess.run(training, env=env, capture_output=True, text=True, timeout=300, cwd=PROJECT)
        assert trained.returncode == 0, trained.stderr
        assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
        assert address_file.read_text().strip() == stranger  # still names the stranger

        probe = (
            "import os, ray; ray.init(address=os.environ['STRANGER'], log_to_driver=False); "
            "print(sorted({job['DriverPid'] for job in ray._private.state.jobs()} - {os.getpid()}))"
        )
        probed = subprocess.run(
            [sys.executable, "-c", probe],
            env=stranger_env | {"STRANGER": stranger},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probed.returncode == 0, probed.stderr
        assert probed.stdout.strip().splitlines()[-1] == "[]"  # no driver but the probe ever joined it
    finally:
        stop_ray_head(started, ray_tmp)
