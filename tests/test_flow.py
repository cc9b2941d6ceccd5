"""The retraining flow under Prefect's test harness: a real DVC repository with a local
remote, a local Ray cluster (2 CPU workers), MLflow on sqlite. First run registers a
champion; a rerun is served from the cache and says so; a second checkout sharing the
cache still pushes to its own remote; a params change re-extracts; a failing step fails
the flow and registers nothing; a remote that does not answer is retried; bad input is
one line before the flow starts."""

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

import mmim.cluster.distributed
from flows.command_line import main
from flows.retrain import config_file, pipeline_config, retrain
from flows.summary import RetrainSummary, summary_rows
from mmim.core.errors import DistributedTrainingError, MMIMInputError, ServiceUnavailableError
from mmim.data.formats.mult import write_mult
from mmim.data.synthetic import synthesize
from mmim.data.versioning import data_version, reproduce
from tasks import FeatureStoreRef, push_features
from tasks.retries import is_transient
from tests.helpers import (
    PROJECT,
    busy_cores,
    dvc,
    free_port,
    make_dvc_project,
    run,
    run_mmim,
    store_files,
    stored_in_remote,
)

MODEL = "mmim-flowtest"
STEPS = ["extract_features", "push_features", "check_data", "train", "log_model", "evaluate", "register"]
# A rerun on the same data and config: the push and the data checks run again (they talk to
# the remote and the registry), everything else is restored from the first run.
RERUN_STEPS = dict.fromkeys(STEPS, "Cached") | {"push_features": "Completed", "check_data": "Completed"}


@dataclass
class Pipeline:
    project: Path
    remote: Path
    mlflow: MlflowClient
    first: dict  # the first run's summary
    first_steps: dict[str, str]
    first_flow_run: str  # its name
    first_flow_run_id: str


def flow_run_name(state) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def write_config(project: Path, encoder: str, artifacts: Path) -> None:
    (project / "configs").mkdir()
    (project / "configs" / "flowtest.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"text_encoder": encoder, "text_pretrained": False},
                "train": {"epochs": 2, "batch_size": 16, "num_threads": 1},
                "ray": {"num_workers": 2},
                "output_dir": "runs/flowtest",
                "tracking": {"experiment": "flowtest", "registered_model": MODEL, "artifact_location": str(artifacts)},
            }
        )
    )


def run_flow(pipeline_project: Path, dataset: str = "synthetic", **parameters):
    """The flow's final state and {step: state name} of its task runs."""
    state = retrain(
        dataset=dataset,
        config="configs/flowtest.yaml",
        project_dir=str(pipeline_project),
        return_state=True,
        **parameters,
    )
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return state, {run.name.split("[")[0]: run.state.name for run in runs}


@pytest.fixture(scope="module")
def pipeline(tiny_encoder, tmp_path_factory, ray_head):
    # Imported here, not at the top: the harness brings Prefect's whole server (2-3 s), which the
    # tests of this module that `make test-fast` runs never start.
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("flow")
    remote = root / "dvc-remote"
    project = make_dvc_project(root / "project", str(remote), encoder=tiny_encoder)
    write_config(project, tiny_encoder, root / "mlartifacts")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with (
        pytest.MonkeyPatch.context() as patch,
        prefect_test_harness(),
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / "prefect-results"}),
    ):
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("RAY_AUTH_MODE", "disabled")  # as the session's cluster runs (tests/conftest.py)
        ray.init(address=ray_head, log_to_driver=False)  # the session's cluster, for the module
        try:
            state, steps = run_flow(project)
            assert state.is_completed(), state.message
            first = (state.result(), steps, flow_run_name(state), str(state.state_details.flow_run_id))
            yield Pipeline(project, remote, MlflowClient(uri), *first)
        finally:
            ray.shutdown()
            mlflow.set_tracking_uri(None)


@pytest.fixture
def undone(pipeline):
    """For a test that changes the project or the registry: afterwards params.yaml, the store and
    the champion are as before it, so that the module's tests pass in any order."""
    params = (pipeline.project / "params.yaml").read_text()
    champion = pipeline.mlflow.get_model_version_by_alias(MODEL, "champion").version
    yield
    (pipeline.project / "params.yaml").write_text(params)
    reproduce("synthetic", pipeline.project)  # the store of those params, from DVC's run cache
    pipeline.mlflow.set_registered_model_alias(MODEL, "champion", champion)


def flow_artifact(key: str, flow_run_id: str):
    """The artifact `key` that the flow run `flow_run_id` made."""
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return artifact


def children(client: MlflowClient, parent_id: str) -> list:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def versions(pipeline: Pipeline) -> list[str]:
    return sorted(str(v.version) for v in pipeline.mlflow.search_model_versions(f"name='{MODEL}'"))


def rows(summary: dict) -> dict[str, str]:
    """The summary as the command line prints it: label -> text."""
    return dict(summary_rows(RetrainSummary.model_validate(summary)))


@pytest.mark.service
def test_first_run_extracts_trains_and_registers_a_champion(pipeline):
    summary = pipeline.first
    assert pipeline.first_steps == dict.fromkeys(STEPS, "Completed")
    assert summary["stages_run"] == ["synthesize", "extract@synthetic"] and summary["files_pushed"] > 0
    assert stored_in_remote(pipeline.remote, summary["data_version"]) == store_files(pipeline.project)
    champion = pipeline.mlflow.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == summary["registration"]["version"] == "1" and summary["registration"]["promoted"]
    assert champion.run_id == summary["run_id"]
    run = pipeline.mlflow.get_run(summary["run_id"])
    assert run.data.tags["data_version"] == summary["data_version"]
    assert run.data.tags["ray_workers"] == "2"
    # the logged checkpoint was re-evaluated, and gating used that figure, on this data version
    assert run.data.metrics["eval_valid_MAE"] == pytest.approx(summary["evaluation"]["valid"]["MAE"])
    assert float(champion.tags[f"valid_MAE/{summary['data_version']}"]) == pytest.approx(
        summary["evaluation"]["valid"]["MAE"]
    )
    assert champion.tags["gate.champion"] == run.data.tags["gate.champion"] == "none"
    # the data checks ran before training: their tags are on the run, its label profile logged
    assert run.data.tags["data_checks"] == "passed" and run.data.tags["data_checks.videos"] == "ok"
    assert "data_profile.json" in {a.path for a in pipeline.mlflow.list_artifacts(summary["run_id"])}
    artifact = flow_artifact("retrain-synthetic", pipeline.first_flow_run_id)  # not a later run's
    assert artifact.type == "markdown"
    assert f"this run: {MODEL} v1" in artifact.data and "promoted to champion" in artifact.data
    # a link that opens under `mlflow ui` (the tracking store is a sqlite file), not runs:/
    link = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{summary['run_id']}?workflowType=machine_learning"
    assert summary["run_link"] == link and f"[{summary['run_id']}]({link})" in artifact.data
    assert Path(summary["checkpoint"]).is_dir()


@pytest.mark.service
def test_mmim_train_track_decides_as_the_flow_did(pipeline, monkeypatch):
    """The same store and settings through `mmim train --track` (one process, no Prefect): the same
    data checks, decision text and gate.* tags as the flow's first run, ids and times aside. (Next
    to the first run: later tests in this module change the project's data.)"""
    monkeypatch.chdir(pipeline.project)
    name = "mmim-clitest"  # a registry of its own, as the flow's had no champion either
    settings = ["--set", f"tracking.registered_model={name}", "--set", "output_dir=runs/clitest"]
    code, out, err = run_mmim("train", "--config", "configs/flowtest.yaml", "--track", *settings)
    assert code == 0, err
    flow, cli = pipeline.mlflow.get_model_version(MODEL, "1"), pipeline.mlflow.get_model_version(name, "1")
    assert cli.tags["data_version"] == flow.tags["data_version"] == pipeline.first["data_version"]

    def decided(version) -> dict[str, str]:
        figure = f"valid_MAE/{pipeline.first['data_version']}"
        return {k: v for k, v in version.tags.items() if k.startswith("gate.") or k in ("registry_decision", figure)}

    assert decided(cli) == decided(flow) and len(decided(flow)) >= 6
    assert f"{name} v1: {flow.tags['registry_decision']}" in out
    checks = {k: v for k, v in pipeline.mlflow.get_run(cli.run_id).data.tags.items() if k.startswith("data_checks")}
    assert checks == {
        k: v for k, v in pipeline.mlflow.get_run(flow.run_id).data.tags.items() if k.startswith("data_checks")
    }


@pytest.mark.service
def test_rerun_with_nothing_changed_hits_the_caches(pipeline):
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    versions_before = versions(pipeline)
    state, steps = run_flow(pipeline.project)
    assert state.is_completed(), state.message
    # no extraction, no training, no registration: restored from the first run
    assert steps == RERUN_STEPS
    summary = state.result()
    assert summary["data_checks"]["previous_version"] == pipeline.first["data_version"]  # the champion's data
    assert summary["cached_steps"] == ["extract_features", "train", "log_model", "evaluate", "register"]
    assert summary["run_id"] == pipeline.first["run_id"] and summary["files_pushed"] == 0
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert versions(pipeline) == versions_before
    # it says what it restored, and from which run, not "promoted" as if it had decided now
    assert rows(summary)["registry"].startswith(f"restored from cache: {MODEL} v1: ")
    assert rows(summary)["registry"].endswith(
        f"by flow run {pipeline.first_flow_run} at {pipeline.first['registration']['origin']['at']}"
    )


@pytest.mark.service
def test_cached_rerun_prints_what_it_restored_and_the_champion_now(pipeline, capfd):
    champion = pipeline.mlflow.get_model_version_by_alias(MODEL, "champion")
    code = main(["--project-dir", str(pipeline.project), "--config", "configs/flowtest.yaml"])
    out, err = capfd.readouterr()
    assert code == 0, err
    print(out)  # shown when an assertion fails
    lines = out.splitlines()
    assert out.count("┏") == 1  # the table, once
    assert "Finished in state" not in err and "Beginning flow run" not in err  # routine lines stay in the UI
    assert f"registry      restored from cache: {MODEL} v1: " in out
    assert f"by flow run {pipeline.first_flow_run} at " in out and "this run:" not in out
    figure = float(champion.tags[f"valid_MAE/{pipeline.first['data_version']}"])
    assert f"champion now  {MODEL} v{champion.version} (valid_MAE={figure:.4f} on this data)" in lines
    assert any(line.startswith("MLflow UI:") and line.endswith(pipeline.first["run_link"]) for line in lines)
    checkpoint = pipeline.first["checkpoint"]
    assert f"checkpoint    {checkpoint}" in lines
    assert any(
        line.endswith(
            f"mmim predict --checkpoint {checkpoint} --input {pipeline.project / 'examples' / 'utterances.json'}"
        )
        for line in lines
    )


@pytest.mark.service
def test_fresh_clone_with_the_same_cache_pushes_to_its_own_remote(pipeline, tiny_encoder, tmp_path):
    """Extraction is restored from the first checkout's cache: the store is not here, and
    the push must not report 0 files for a store that is missing (DVC rebuilds it)."""
    remote, clone = tmp_path / "dvc-remote", tmp_path / "clone"
    run("git", "clone", "-q", str(pipeline.project), str(clone), cwd=tmp_path)  # no dvc.lock, no store
    dvc("remote", "modify", "default", "url", str(remote), cwd=clone)
    write_config(clone, tiny_encoder, pipeline.project.parent / "mlartifacts")
    state, steps = run_flow(clone)
    assert state.is_completed(), state.message
    assert steps == RERUN_STEPS
    summary = state.result()
    assert summary["data_version"] == pipeline.first["data_version"] and summary["files_pushed"] > 0
    assert stored_in_remote(remote, summary["data_version"]) == store_files(pipeline.project)
    assert rows(summary)["data version"].startswith(
        f"{summary['data_version']} (restored from cache: ran synthesize, extract@synthetic, "
        f"by flow run {pipeline.first_flow_run} at "
    )


@pytest.mark.service
def test_failure_in_train_fails_the_flow_and_registers_nothing(pipeline, monkeypatch):
    def lost_worker(config, on_report, overwrite):
        on_report({"epoch": 1, "valid_MAE": 0.9, "stage1_loss": 1.0, "valid_Corr": 0.1, "seconds": 1.0})
        raise DistributedTrainingError("Ray training failed (ray.max_failures=0): worker died")

    monkeypatch.setattr(mmim.cluster.distributed, "train_distributed", lost_worker)  # what the task imports
    versions_before = versions(pipeline)
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    # another config, so that training is not restored from the cache
    state, steps = run_flow(pipeline.project, overrides=["train.epochs=1"])
    assert state.is_failed()
    assert "step train failed: Ray training failed" in state.message
    assert steps == {
        "extract_features": "Cached",
        "push_features": "Completed",
        "check_data": "Completed",
        "train": "Failed",
    }
    assert versions(pipeline) == versions_before
    # the run that was watching the training is left FAILED, with the epoch reported before the crash
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"])
    assert len(runs) == runs_before + 1
    assert runs.iloc[0]["status"] == "FAILED" and runs.iloc[0]["metrics.valid_MAE"] == 0.9


@pytest.mark.service
def test_changed_params_re_extract_and_retrain(pipeline, undone):
    params_file = pipeline.project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["extraction"]["max_tokens"] = 24
    params_file.write_text(yaml.safe_dump(params))
    champion, registered = pipeline.mlflow.get_model_version_by_alias(MODEL, "champion"), versions(pipeline)
    state, steps = run_flow(pipeline.project)
    assert state.is_completed(), state.message
    assert steps == dict.fromkeys(STEPS, "Completed")
    summary = state.result()
    assert summary["stages_run"] == ["extract@synthetic"]  # the raw sample did not change
    assert summary["data_version"] != pipeline.first["data_version"]
    assert summary["registration"]["version"] == str(max(map(int, registered)) + 1)
    tags = pipeline.mlflow.get_run(summary["run_id"]).data.tags
    assert tags["data_version"] == summary["data_version"]
    # the champion (trained on the first data version) was scored on the new one, head to head
    compared, v = summary["registration"]["compared"], str(champion.version)  # sqlite: an int
    assert compared["champion_version"] == v and compared["data_version"] == summary["data_version"]
    assert (
        tags["gate.champion"] == f"v{v}"
        and float(tags["gate.champion_valid_MAE"]) == compared["champion"]["valid"]["MAE"]
    )
    assert compared["bootstrap"]["resamples"] == 1000
    scored = pipeline.mlflow.get_model_version(MODEL, v)
    assert float(scored.tags[f"valid_MAE/{summary['data_version']}"]) == compared["champion"]["valid"]["MAE"]
    assert rows(summary)["compared"].startswith(
        f"challenger MAE {compared['challenger']['valid']['MAE']:.4f}, "
        f"champion v{v} {compared['champion']['valid']['MAE']:.4f}, "
        f"both on data {summary['data_version']}; improvement "
    )


@pytest.mark.service
def test_a_tuning_run_trains_its_best_config_over_seeds_and_later_runs_read_that_config(pipeline, undone):
    """The monthly deployment's run: a search (1 trial) before training; the best config is
    trained once per seed and gated on their mean; it is written where the weekly run reads it."""
    space = pipeline.project / "configs" / "search" / "tiny.yaml"
    space.parent.mkdir(exist_ok=True)
    space.write_text(yaml.safe_dump({"space": {"train.lr_main": {"choice": [0.002]}}}))
    seeds = ["ray.num_workers=1", "train.seeds=[1, 2]"]  # side by side on the 2 CPUs
    tuned = "runs/search/tuned.yaml"
    with busy_cores(2, seconds=60):  # the machine busy with other work while the search starts
        state, steps = run_flow(
            pipeline.project, overrides=seeds, tune_trials=1, search_space=str(space), tuned_config=tuned
        )
    assert state.is_completed(), state.message
    assert steps["tune"] == steps["train"] == "Completed"
    summary = state.result()
    search = summary["tuning"]
    assert search["search"].startswith("tune-synthetic-") and search["best_settings"] == {"train.lr_main": 0.002}
    assert len(children(pipeline.mlflow, search["parent_run_id"])) == 1  # the trial's run
    parent = pipeline.mlflow.get_run(summary["run_id"])
    assert parent.data.params["train.lr_main"] == "0.002" and parent.data.tags["mmim.seeds"] == "1,2"

    # two seeds, two child runs; the parent's mean and std are those of the children's figures,
    # each at its own selected epoch (the one rule, mmim.core.selection)
    runs = children(pipeline.mlflow, summary["run_id"])
    assert sorted(child.info.run_name for child in runs) == ["seed-1", "seed-2"]
    assert all(child.info.status == "FINISHED" for child in runs) and parent.info.status == "FINISHED"
    selected = {}
    for child in runs:
        history = {
            name: {m.step: m.value for m in pipeline.mlflow.get_metric_history(child.info.run_id, name)}
            for name in ("valid_MAE", "test_MAE", "test_Corr")
        }
        assert sorted(history["valid_MAE"]) == [1, 2]
        epoch = min(sorted(history["valid_MAE"]), key=history["valid_MAE"].get)  # the lowest; of equals, the first
        selected[child.data.params["train.seed"]] = {name: values[epoch] for name, values in history.items()}
    assert len({figures["valid_MAE"] for figures in selected.values()}) == 2  # the seeds made a difference
    for name in ("valid_MAE", "test_MAE", "test_Corr"):
        values = [figures[name] for figures in selected.values()]
        assert parent.data.metrics[f"seeds_mean_{name}"] == pytest.approx(np.mean(values), abs=1e-9)
        assert parent.data.metrics[f"seeds_std_{name}"] == pytest.approx(np.std(values), abs=1e-9)

    # registered: the best seed's model; gated on the two seeds' mean, rescored on the same data
    best_seed = min(["1", "2"], key=lambda seed: selected[seed]["valid_MAE"])  # of equals, the one listed first
    assert parent.data.tags["seeds.best_seed"] == best_seed == str(summary["seeds"]["best_seed"])
    assert "done" not in parent.data.metrics  # Tune's flag is not a figure
    assert parent.data.metrics["selected_valid_MAE"] == pytest.approx(selected[best_seed]["valid_MAE"], abs=1e-9)
    compared = summary["registration"]["compared"]
    assert compared["seeds"] == 2
    assert compared["challenger"]["valid"]["MAE"] == pytest.approx(
        np.mean([f["valid_MAE"] for f in selected.values()]), abs=1e-4
    )
    version = pipeline.mlflow.get_model_version(MODEL, summary["registration"]["version"])
    assert version.run_id == summary["run_id"] and version.tags["gate.seeds"] == "2"
    assert rows(summary)["seeds"].startswith("1, 2: valid MAE ")
    assert "(mean of 2 seeds)" in rows(summary)["compared"]

    # a run that does not search trains the tuned config (the weekly deployment's)
    assert config_file(pipeline.project, "configs/flowtest.yaml", tuned, tune_trials=0) == tuned
    assert pipeline_config(pipeline.project, tuned, []).train.lr_main == 0.002
    assert config_file(pipeline.project, "configs/flowtest.yaml", "runs/search/none.yaml", 0) == "configs/flowtest.yaml"


@pytest.mark.service
def test_a_video_in_train_and_test_fails_at_the_data_checks(pipeline, undone):
    """A data version that leaks a video from train into test: the flow stops before training,
    naming the check and the video; nothing is trained or registered."""
    splits = synthesize(1, {"train": 20, "valid": 6, "test": 6})
    leaked = splits["train"].ids[0].rsplit("_", 1)[0]
    splits["test"].ids[0] = f"{leaked}_77"  # a new clip of a training video, in test
    write_mult(pipeline.project / "data" / "raw" / "leaky", "leaky", splits)
    params_file = pipeline.project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["datasets"]["leaky"] = {**params["datasets"]["synthetic"], "input": "data/raw/leaky"}
    params_file.write_text(yaml.safe_dump(params))
    versions_before, runs_before = versions(pipeline), len(mlflow.search_runs(search_all_experiments=True))
    state, steps = run_flow(pipeline.project, dataset="leaky")
    assert state.is_failed()
    assert steps == {"extract_features": "Completed", "push_features": "Completed", "check_data": "Failed"}
    assert "step check_data failed: data version " in state.message
    assert f"failed the data checks: videos: 1 videos in more than one split ({leaked} (train+test))" in state.message
    assert versions(pipeline) == versions_before
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    report = flow_artifact("data-checks-leaky", str(state.state_details.flow_run_id))
    assert "| videos | hard | FAILED |" in report.data


@pytest.mark.service
def test_unanswered_remote_is_retried_then_fails(pipeline, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # credentials, but nobody listening
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only slow this down
    dvc("remote", "add", "offline", "s3://nowhere/cache", cwd=pipeline.project)
    dvc("remote", "modify", "offline", "endpointurl", f"http://127.0.0.1:{free_port()}", cwd=pipeline.project)
    features = FeatureStoreRef(
        dataset="synthetic",
        store="data/stores/synthetic",  # the store as it is now
        data_version=data_version("synthetic", pipeline.project),
        stages_run=[],
    )
    quick = push_features.with_options(retries=2, retry_delay_seconds=0)
    state = quick(features, str(pipeline.project), "offline", return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        assert client.read_task_run(state.state_details.task_run_id).run_count == 3  # 1 + 2 retries
    with pytest.raises(ServiceUnavailableError):
        state.result()


def test_only_service_errors_are_transient():
    assert is_transient(ServiceUnavailableError("dvc: connection refused"))
    assert is_transient(ConnectionError("ray head"))
    assert not is_transient(MMIMInputError("train.lr_main: must be > 0"))
    assert not is_transient(DistributedTrainingError("worker died after 3 restarts"))
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE))


@pytest.mark.service
def test_bad_settings_stop_the_flow_before_any_step(pipeline):
    state, steps = run_flow(pipeline.project, overrides=["train.batch_size=15"])  # not divisible by 2 workers
    assert state.is_failed() and "step load_config failed: train.batch_size 15" in state.message
    assert steps == {}  # nothing was extracted, trained or registered


@pytest.fixture(scope="module")
def bare_project(tmp_path_factory) -> Path:
    """A checkout that never ran anything: no store, no data/raw/mosi."""
    root = tmp_path_factory.mktemp("bare")
    return make_dvc_project(root / "project", str(root / "dvc-remote"))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--set", "train.epochs=abc"], "train.epochs: Input should be a valid integer"),
        (["--set", "nonsense"], "--set 'nonsense': expected key=value, e.g. train.epochs=3"),
        (["--set", "ray.num_workers=0"], "ray.num_workers: must be at least 1 for Ray training"),
        (
            ["--dataset", "mosi"],
            (
                "data/raw/mosi: missing (an input of stage extract@mosi): "
                'put the mosi release there (docs/data.md, "Sources")'
            ),
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_the_flow_starts(bare_project, monkeypatch, capfd, arguments, message):
    monkeypatch.chdir(bare_project)
    code = main(["--config", str(PROJECT / "configs" / "demo.yaml"), *arguments])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    (line,) = err.splitlines()  # no Prefect traceback, no flow run
    assert line.startswith("error: ") and message in line
