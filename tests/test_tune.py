"""`mmim tune` on a local Ray cluster: Optuna's proposals, ASHA's early stops, a trial that
fails, every trial an MLflow child run, a best config that trains, and a search that resumes
after its driver dies."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.util.state import list_actors

from mmim.cli import _training_overrides, build_parser, main
from mmim.cluster.seeds import train_seeds
from mmim.cluster.tune import load_search_spec, search
from mmim.core.config import load_config
from mmim.core.errors import DistributedTrainingError, MMIMInputError
from mmim.tables import seeds_table
from tests.helpers import tracked

pytestmark = pytest.mark.service  # a local Ray cluster

BIN = Path(sys.executable).parent

# Three learning rates tried in this order, one of which the config refuses (it must be > 0).
SPACE = {
    "space": {"train.lr_main": {"choice": [0.003, 1.0e-7, 0.0]}},
    "start_from": [{"train.lr_main": 0.003}, {"train.lr_main": 1.0e-7}, {"train.lr_main": 0.0}],
    "early_stopping": {"grace_period": 1, "reduction_factor": 2},
}


def search_config(tiny_config, tmp_path):
    ray_settings = {"num_workers": 1, "storage_path": str(tmp_path / "ray")}
    config = tiny_config.model_copy(update={"ray": tiny_config.ray.model_copy(update=ray_settings)})
    return tracked(config, tmp_path)


def write_space(tmp_path, space=SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def children(client, parent_id: str) -> list:
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return sorted(runs, key=lambda run: run.info.start_time)


@pytest.mark.service
def test_a_search_stops_poor_trials_goes_on_past_a_failed_one_and_writes_the_best_config(
    ray_cluster, tiny_config, tmp_path, mlflow_sqlite
):
    config = search_config(tiny_config, tmp_path)
    best_path = tmp_path / "best.yaml"
    spec = load_search_spec(write_space(tmp_path))
    result = search(config, spec, trials=3, name="lr", best_config_path=best_path, concurrent=1)

    by_rate = {trial.settings["train.lr_main"]: trial for trial in result.trials}
    assert len(result.trials) == 3 and set(by_rate) == {0.003, 1.0e-7, 0.0}
    refused = by_rate[0.0]
    assert refused.status == "failed" and refused.epochs == 0
    assert "train.lr_main" in refused.error and "greater than 0" in refused.error
    # ASHA at epoch 1: the near-frozen trial trails the first one and stops there
    assert by_rate[1.0e-7].status == "stopped early" and by_rate[1.0e-7].epochs == 1
    assert by_rate[0.003].status == "finished" and by_rate[0.003].epochs == 2
    assert result.best_settings == {"train.lr_main": 0.003}
    assert result.best_valid_MAE == min(t.valid_MAE for t in result.trials if t.epochs)

    # MLflow: a parent with the best figure and config, a child per trial with its epochs
    parent = mlflow_sqlite.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_valid_MAE"] == result.best_valid_MAE
    assert "best.yaml" in {a.path for a in mlflow_sqlite.list_artifacts(result.parent_run_id)}
    runs = children(mlflow_sqlite, result.parent_run_id)
    assert len(runs) == 3
    for run in runs:
        trial = next(t for t in result.trials if t.trial_id == run.data.tags["mmim.trial_id"])
        steps = [m.step for m in mlflow_sqlite.get_metric_history(run.info.run_id, "valid_MAE")]
        assert sorted(steps) == list(range(1, trial.epochs + 1))
        assert run.info.status == ("FAILED" if trial.status == "failed" else "FINISHED")
        assert run.data.params["search.train.lr_main"] == str(trial.settings["train.lr_main"])
    failed = next(run for run in runs if run.info.status == "FAILED")
    assert "greater than 0" in failed.data.tags["mmim.error"]
    assert {run.data.tags.get("mmim.stopped_early") for run in runs if run.info.status == "FINISHED"} >= {"true"}

    # the trials' Ray Train runs (their checkpoints) are gone once the search has ended
    assert not [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith("lr-")]
    # the best config is a config file (that it trains: tests/test_flow.py, the tuning run)
    best = load_config(best_path)
    assert best.train.lr_main == 0.003 and best.model == config.model


def test_a_search_space_is_checked_before_anything_runs(tmp_path):
    bad = {"space": {"train.learning_rate": {"uniform": [0.1, 0.2]}}}
    with pytest.raises(MMIMInputError, match=r"space.yaml: train.learning_rate: not a setting"):
        load_search_spec(write_space(tmp_path, bad))
    reversed_bounds = {"space": {"train.lr_main": {"loguniform": [0.1, 0.01]}}}
    with pytest.raises(MMIMInputError, match=r"space.train.lr_main: .*low end must be below the high end"):
        load_search_spec(write_space(tmp_path, reversed_bounds))
    outside = {"space": {"train.lr_main": {"uniform": [0.1, 0.2]}}, "start_from": [{"train.alpha": 0.1}]}
    with pytest.raises(MMIMInputError, match=r"start_from: train.alpha is not in the space"):
        load_search_spec(write_space(tmp_path, outside))
    off_the_list = {"space": {"train.batch_size": {"choice": [16, 32]}}, "start_from": [{"train.batch_size": 64}]}
    with pytest.raises(MMIMInputError, match=r"start_from: train.batch_size=64 is outside its distribution"):
        load_search_spec(write_space(tmp_path, off_the_list))


@pytest.mark.service
def test_a_trial_that_cannot_fit_on_the_cluster_is_refused(ray_cluster, tiny_config, tmp_path, mlflow_sqlite):
    config = search_config(tiny_config, tmp_path)
    config = config.model_copy(update={"ray": config.ray.model_copy(update={"resources_per_worker": {"CPU": 3}})})
    with pytest.raises(MMIMInputError, match="a trial's 1 Ray workers need 3 CPU and the cluster has 2"):
        search(config, load_search_spec(write_space(tmp_path)), 2, "too-big", tmp_path / "best.yaml")
    assert not mlflow_sqlite.search_experiments(filter_string="name = 'mmim'") or not mlflow_sqlite.search_runs(
        [mlflow_sqlite.get_experiment_by_name("mmim").experiment_id]
    )


def finished_in_state(experiment: Path) -> set[str]:
    """Trial ids Tune's saved experiment state records as finished."""
    finished = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                finished.add(trial["trial_id"])
    return finished


@pytest.mark.service
def test_a_search_resumes_after_its_driver_dies(ray_cluster, tiny_config, tmp_path, mlflow_sqlite):
    """The driver is killed (SIGKILL) once Tune has recorded a finished trial; the same command
    again resumes: the finished trial is neither rerun nor logged twice, the others run."""
    config = search_config(tiny_config, tmp_path)
    # paths relative to the driver's directory, as configs/*.yaml have them (Tune runs trials elsewhere)
    relative = {"store": os.path.relpath(config.data.store, tmp_path)}
    config = config.model_copy(
        update={
            "data": config.data.model_copy(update=relative),
            "ray": config.ray.model_copy(update={"storage_path": "ray"}),
        }
    )
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump()))
    space = {**SPACE, "space": {"train.lr_main": {"choice": [0.003, 0.001]}}}
    space["start_from"] = [{"train.lr_main": rate} for rate in (0.003, 0.001)]
    command = [str(BIN / "mmim"), "tune", "--config", str(config_path), "--search", str(write_space(tmp_path, space))]
    command += ["--trials", "2", "--name", "again", "--concurrent", "1", "--best-config", str(tmp_path / "b.yaml")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not finished_in_state(tmp_path / "ray" / "again"):
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = finished_in_state(tmp_path / "ray" / "again")
    assert len(done_before) == 1  # killed while the other trial ran
    parent_id = mlflow_sqlite.search_runs(
        [mlflow_sqlite.get_experiment_by_name("mmim").experiment_id], filter_string="tags.`mmim.search` = 'again'"
    )[0].info.run_id
    before = {run.data.tags["mmim.trial_id"]: run for run in children(mlflow_sqlite, parent_id)}

    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "(resumed)" in again.stdout
    after = {run.data.tags["mmim.trial_id"]: run for run in children(mlflow_sqlite, parent_id)}
    assert len(after) == 2 and len(children(mlflow_sqlite, parent_id)) == 2  # one run per trial, none twice
    for trial_id in done_before:  # not rerun: its run's end and its epochs are as they were
        assert after[trial_id].info.end_time == before[trial_id].info.end_time
        history = mlflow_sqlite.get_metric_history(after[trial_id].info.run_id, "valid_MAE")
        assert sorted(m.step for m in history) == [1, 2]
    assert all(run.info.status == "FINISHED" for run in after.values())
    assert mlflow_sqlite.get_run(parent_id).info.status == "FINISHED"
    assert load_config(tmp_path / "b.yaml").train.lr_main in (0.003, 0.001)

    # the same name with other settings is not silently the old search
    other = subprocess.run(
        [*command[:-8], "--trials", "3", *command[-6:]], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert other.returncode == 2 and "pass --name for a new search" in " ".join(other.stderr.split())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--trials", "0"], "--trials 0: must be at least 1"),
        (["--trials", "2", "--name", "../x"], "--name '../x': letters, digits"),
        (["--trials", "2", "--name", "n" * 300], f"--name '{'n' * 40}'...: letters, digits"),
        (["--trials", "2", "--concurrent", "0"], "--concurrent 0: must be at least 1"),
        (["--trials", "2", "--workers", "0"], "ray.num_workers: must be at least 1"),
    ],
)
def test_bad_search_options_are_refused_before_anything_starts(
    tiny_config, tmp_path, monkeypatch, capsys, arguments, message
):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(search_config(tiny_config, tmp_path).model_dump()))
    monkeypatch.chdir(tmp_path)
    command = ["tune", "--config", str(config_path), "--search", str(write_space(tmp_path)), *arguments]
    assert main(command) == 2
    assert message in " ".join(capsys.readouterr().err.split())  # as one line, however rich wraps it
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------- training once per seed


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "7,7"], "train.seeds: Value error, seed 7 is given twice"),
        (["--seeds", "7,x"], "--seeds '7,x': comma-separated whole numbers"),
        (["--seeds", ""], "--seeds '': comma-separated whole numbers"),
        (["--seeds", "7", "--set", "train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
        (["--seeds", "7,8", "--workers", "0"], "train.seeds: each seed trains with Ray workers"),
    ],
)
def test_bad_seeds_are_refused_before_anything_starts(tiny_config, tmp_path, monkeypatch, capsys, arguments, message):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(search_config(tiny_config, tmp_path).model_dump()))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config_path), *arguments]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


def test_seeds_are_whole_decimal_numbers(tiny_config, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config.model_dump()))
    args = build_parser().parse_args(["train", "--config", str(config_path), "--seeds", "0011, 12"])
    assert load_config(args.config, _training_overrides(args)).train.seeds == [11, 12]  # not YAML's octal 9


def newest_checkpoint(storage: Path) -> dict[str, int]:
    """Each Ray Train run's newest epoch_NNN checkpoint directory in `storage`, by run."""
    newest: dict[str, int] = {}
    for directory in storage.glob("killed-*/epoch_*"):
        run = directory.parent.name
        newest[run] = max(newest.get(run, 0), int(directory.name.removeprefix("epoch_")))
    return newest


@pytest.mark.service
def test_a_seed_whose_worker_is_killed_resumes_and_the_seeds_table_is_complete(ray_cluster, tiny_config, tmp_path):
    """One seed's Ray Train worker killed once, after its first checkpoints: that seed continues
    from its checkpoint (ray.max_failures), the run succeeds, and every seed has every epoch."""
    settings = {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "run_name": "killed", "max_failures": 1}
    config = tiny_config.model_copy(
        update={
            "ray": tiny_config.ray.model_copy(update=settings),
            "train": tiny_config.train.model_copy(update={"seeds": [1, 2], "epochs": 6}),
        }
    )
    outcome: dict = {}
    training = threading.Thread(target=lambda: outcome.update(result=train_seeds(config)))
    training.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and training.is_alive() and time.monotonic() < deadline:
        # every seed past its first checkpoint (a later one is being written): any worker can go.
        # Each seed's newest checkpoint, since Ray deletes older ones the selection did not keep.
        newest = newest_checkpoint(tmp_path / "ray")
        if len(newest) == 2 and min(newest.values()) >= 2:
            mine = ("job_id", "=", ray.get_runtime_context().get_job_id())  # not an earlier test's
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), mine])
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    training.join(timeout=300)
    assert killed is not None, "no worker was found to kill"
    result = outcome["result"]  # absent if train_seeds raised (its error is in the thread's output)
    for seed in (1, 2):
        assert [int(epoch["epoch"]) for epoch in result.seeds[seed].epochs] == list(range(1, 7))
    assert max(epoch["resumed_from"] for r in result.seeds.values() for epoch in r.epochs) >= 1
    assert not list((tmp_path / "ray").iterdir())  # every seed's Ray storage, and Tune's, removed
    table = seeds_table(result.summary())
    assert [cell for cell in table.columns[0].cells][:2] == ["1", "2"]


@pytest.mark.service
def test_a_seed_that_fails_past_its_retries_fails_the_run_naming_it(ray_cluster, tiny_config, tmp_path):
    settings = {"num_workers": 1, "storage_path": str(tmp_path / "ray"), "run_name": "diverged", "max_failures": 0}
    diverging = {"seeds": [7], "epochs": 1, "lr_main": 1e8, "lr_bert": 1e8, "lr_mmilb": 1e8}
    config = tiny_config.model_copy(
        update={
            "ray": tiny_config.ray.model_copy(update=settings),
            "train": tiny_config.train.model_copy(update=diverging),
        }
    )
    with pytest.raises(DistributedTrainingError) as failed:
        train_seeds(config)
    message = str(failed.value)
    assert message.startswith("seed 7 failed (its retries, ray.max_failures=0, spent): ")
    assert "training diverged at epoch 1" in message
    assert not (tmp_path / "run" / "best").exists()  # nothing selected from a failed run
