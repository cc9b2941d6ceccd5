"""The `mmim` command line end to end: train, evaluate, predict, and exit code 2 on bad input."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file, save_file

from mmim.cli import main
from mmim.core.config import load_config
from mmim.core.errors import MMIMInputError
from tests.helpers import free_port


def write_config(tmp_path, config, **sections):
    raw = config.model_dump()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_evaluate_predict(tiny_config, tmp_path, capsys):
    path = write_config(tmp_path, tiny_config)
    code, out, _ = run_cli(capsys, "train", "--config", str(path), "--set", "train.epochs=1")
    assert code == 0
    assert "Acc-2_non0" in out and "test" in out
    assert re.search(r"^epoch 1/1 \| loss [\d.]+ \| valid MAE [\d.]+ Corr", out, re.MULTILINE)  # progress per epoch
    checkpoint = tmp_path / "run" / "best"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "text_encoder" / "tokenizer.json").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best"]["epoch"] == 1 and len(metrics["epochs"]) == 1

    code, out, _ = run_cli(
        capsys,
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--store",
        tiny_config.data.store,
        "--json",
        str(tmp_path / "eval.json"),
    )
    assert code == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    # the checkpoint's own test metrics are reproduced by evaluate
    assert evaluated["test"]["MAE"] == pytest.approx(metrics["best"]["test_MAE"], abs=1e-6)

    utterances = [
        {"text": "the movie was very good", "audio": np.zeros((4, 5)).tolist(), "vision": np.ones((3, 20)).tolist()},
        {"text": "the plot was terrible", "audio": [[0.1] * 5], "vision": [[0.0] * 20] * 2},
    ]
    (tmp_path / "in.json").write_text(json.dumps(utterances))
    code, out, _ = run_cli(capsys, "predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "in.json"))
    assert code == 0
    predictions = json.loads(out)
    assert len(predictions) == 2 and all(np.isfinite(p["score"]) for p in predictions)
    assert {p["polarity"] for p in predictions} <= {"positive", "negative", "neutral"}

    utterances[1]["vision"] = [[0.0] * 7]
    (tmp_path / "bad.json").write_text(json.dumps(utterances))
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "bad.json"))
    assert code == 2 and "utterance 1, field vision: shape (1, 7), expected (frames >= 1, 20)" in err


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown setting"),
        ({"train": {"lr_main": -1}}, "train.lr_main: Input should be greater than 0"),
        ({"model": {"bidirectional": "sideways"}}, "model.bidirectional: Input should be a valid boolean"),
        ({"data": {"store": "/nonexistent/store"}}, "/nonexistent/store: feature store not found"),
        ({"train": {"seed": -1}}, "train.seed: Input should be greater than or equal to 0"),
        ({"train": {"seed": 2**32}}, "train.seed: Input should be less than or equal to 4294967295"),
        ({"model": {"max_tokens": 7}}, "model.max_tokens is 7 but data.store"),
        ({"output_dir": "/etc/hostname/run"}, "output_dir /etc/hostname/run: not writable"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tiny_config, tmp_path, capsys, sections, message):
    path = write_config(tmp_path, tiny_config, **sections)
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err


def test_an_earlier_runs_checkpoint_is_kept_unless_overwrite(tiny_config, tmp_path, capsys):
    path = write_config(tmp_path, tiny_config, train={"epochs": 1})
    assert run_cli(capsys, "train", "--config", str(path))[0] == 0
    best = tmp_path / "run" / "best" / "model.safetensors"
    before = best.read_bytes()
    worse = write_config(tmp_path, tiny_config, train={"epochs": 1, "lr_main": 1e-9, "lr_bert": 1e-9})
    code, _, err = run_cli(capsys, "train", "--config", str(worse))
    assert code == 2 and "holds the checkpoint of an earlier run (epoch 1, valid MAE" in err
    assert best.read_bytes() == before  # refused before the first epoch, nothing replaced
    code, _, _ = run_cli(capsys, "train", "--config", str(worse), "--overwrite")
    assert code == 0 and best.read_bytes() != before


def test_diverging_training_is_one_line_and_exit_1(tiny_config, tmp_path, capsys):
    path = write_config(tmp_path, tiny_config, train={"epochs": 1, "lr_main": 1e8, "lr_bert": 1e8, "lr_mmilb": 1e8})
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 1 and "Traceback" not in err
    assert re.search(r"error: training diverged at epoch 1, stage \d, batch \d+: loss is (nan|inf)", err)


def test_hostile_checkpoints_are_refused_before_allocating(tiny_config, tmp_path, capsys):
    path = write_config(tmp_path, tiny_config, train={"epochs": 1})
    assert run_cli(capsys, "train", "--config", str(path))[0] == 0
    checkpoint = tmp_path / "run" / "best"
    example = tmp_path / "in.json"
    example.write_text(json.dumps([{"text": "good", "audio": [[0.0] * 5], "vision": [[0.0] * 20]}]))

    encoder_config = checkpoint / "text_encoder" / "config.json"
    original = encoder_config.read_text()
    encoder_config.write_text(json.dumps({**json.loads(original), "vocab_size": 10**11}))
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(checkpoint), "--input", str(example))
    assert code == 2 and "word_embeddings.weight has shape" in err and "100000000000" in err
    encoder_config.write_text(original)

    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    state["fusion_prj.linear_3.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(checkpoint), "--input", str(example))
    assert code == 2 and "model.safetensors: fusion_prj.linear_3.weight contains NaN or inf" in err


def test_store_problems_exit_2_naming_the_file(tiny_config, tiny_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    path = write_config(tmp_path, tiny_config, data={"store": str(store), "verify_checksums": False})

    vision = store / "test" / "vision.npy"
    values = np.load(vision)
    values[3, 7] = np.nan
    np.save(vision, values)
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "test/vision.npy: NaN or inf at row 3" in err

    audio = store / "valid" / "audio.npy"
    audio.write_bytes(audio.read_bytes()[:100])
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "valid/audio.npy: corrupt or truncated" in err

    shutil.rmtree(store / "train")
    code, _, err = run_cli(capsys, "train", "--config", str(path))
    assert code == 2 and "train" in err and "missing" in err
    assert not (tmp_path / "run").exists()  # a refused run leaves no output directory


def test_set_overrides_and_their_errors(tmp_path):
    config = load_config(None, ["train.epochs=3", "train.lr_bert=1e-4", "model.add_va=true"])
    assert config.train.epochs == 3 and config.train.lr_bert == 1e-4 and config.model.add_va
    with pytest.raises(MMIMInputError, match="expected key=value"):
        load_config(None, ["train.epochs"])
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(MMIMInputError, match="broken.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_site_config_sits_between_the_config_file_and_set(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"train": {"epochs": 5}, "ray": {"storage_path": "runs/ray"}}))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"ray": {"storage_path": "s3://ray/checkpoints", "num_workers": 4}}))
    monkeypatch.setenv("MMIM_SITE_CONFIG", str(site))
    config = load_config(tmp_path / "run.yaml", ["ray.num_workers=2"])
    assert config.train.epochs == 5 and config.ray.storage_path == "s3://ray/checkpoints"
    assert config.ray.num_workers == 2  # --set wins
    site.write_text(yaml.safe_dump({"ray": {"storage": "s3://typo"}}))
    with pytest.raises(MMIMInputError, match=r"site config .*site.yaml.*: ray.storage: unknown setting"):
        load_config(tmp_path / "run.yaml")
    monkeypatch.setenv("MMIM_SITE_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(MMIMInputError, match=r"missing.yaml: cannot read site config \(\$MMIM_SITE_CONFIG\)"):
        load_config(None)


def test_console_script_exit_code(tmp_path):
    """The installed `mmim` entry point itself returns 2 on bad input."""
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "mmim.cli", "train", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "train.batch_size: Input should be greater than 1" in done.stderr


def test_ray_job_entrypoint_ships_config_inside_the_project(tmp_path):
    from mmim.cluster.jobs import PROJECT_ROOT, training_entrypoint

    command = training_entrypoint(PROJECT_ROOT / "configs" / "mosi.yaml", ["ray.num_workers=4", "train.epochs=2"])
    assert command == (
        "python -m mmim.cli train --config configs/mosi.yaml --set ray.num_workers=4 --set train.epochs=2"
    )
    (tmp_path / "outside.yaml").write_text("train: {}\n")
    with pytest.raises(MMIMInputError, match="must be inside the project"):
        training_entrypoint(tmp_path / "outside.yaml", [])


def test_submit_to_an_unreachable_cluster_exits_1(capsys):
    """Nothing wrong with the input: the service did not answer (exit 1, not 2)."""
    code, _, err = run_cli(capsys, "train", "--config", "configs/demo.yaml", "--submit", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the Ray job server" in err


def test_an_unreachable_ray_address_is_one_line_naming_it(tiny_config, tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"  # nothing listens
    config = write_config(tmp_path, tiny_config, ray={"address": address, "num_workers": 1})
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 1 and f"Ray cluster {address}" in err and len(err.strip().splitlines()) == 1


def test_a_ray_version_mismatch_is_one_line_with_both_versions():
    """Ray's own check, with a cluster's metadata from another Ray and Python."""
    from ray._private.utils import check_version_info

    from mmim.cluster.connect import why_not

    with pytest.raises(RuntimeError) as raised:
        check_version_info({"ray_version": "2.9.0", "python_version": "3.11.7"}, "127.0.0.1:6379")
    line = why_not("Ray cluster 127.0.0.1:6379", raised.value)
    assert "\n" not in line
    assert line.startswith("Ray cluster 127.0.0.1:6379 runs Ray 2.9.0 on Python 3.11.7, this process Ray 2.")


def test_train_track_with_no_tracking_server_is_one_line_before_anything_trains(
    tiny_config, tmp_path, capsys, monkeypatch
):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, _, err = run_cli(capsys, "train", "--config", str(write_config(tmp_path, tiny_config)), "--track")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: registered model mmim-synthetic: tracking server {uri}")
    assert not (tmp_path / "run" / "best").exists()


def test_rays_false_alarms_are_dropped_where_ray_prints_them_and_errors_are_not(capsys):
    import ray._private.worker as ray_worker

    from mmim.cluster.connect import quiet_false_alarms

    quiet_false_alarms()
    alarm = "WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1."
    error = "ERROR: a worker died: the raylet is out of memory"
    ray_worker.print_to_stdstream({"lines": [alarm, error], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printed = capsys.readouterr().out
    assert error in printed and "PYTHON worker processes" not in printed
