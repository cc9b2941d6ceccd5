"""Data checks before training: a clean store passes, a video in two splits fails naming it,
label drift against the previous version warns, a damaged store fails naming the file."""

import json

import numpy as np
import pytest

from mmim.core.store import sha256_of
from mmim.core.text_encoder import load_tokenizer
from mmim.data.checks import check_store, ks_statistic, store_profile
from mmim.data.store_writer import write_store
from mmim.data.synthetic import synthesize
from tests.helpers import TINY_SIZES, run_mmim


def store(root, encoder, splits):
    return write_store(
        root, splits, load_tokenizer(encoder), text_encoder=encoder, max_tokens=16, source="synthetic"
    ).root


def test_a_clean_store_passes_and_names_its_versions(tiny_store):
    report = check_store(tiny_store, "v2.dir", store_profile(tiny_store, "v1.dir"))
    assert not report.failed and not report.warnings
    assert [check.name for check in report.checks] == ["store", "ids", "videos", "lengths", "sizes", "labels drift"]
    assert report.markdown().startswith("# Data checks of v2.dir against v1.dir")
    assert report.tags()["data_checks"] == "passed" and report.tags()["data_checks.previous_version"] == "v1.dir"


def leaky_store(root, encoder) -> tuple:
    """A store with a new clip of a training video in test: (its root, the video)."""
    splits = synthesize(0, TINY_SIZES)
    leaked_video = splits["train"].ids[0].rsplit("_", 1)[0]
    splits["test"].ids[0] = f"{leaked_video}_99"
    return store(root, encoder, splits), leaked_video


def test_a_video_in_train_and_test_fails_naming_it(tiny_encoder, tmp_path):
    root, leaked_video = leaky_store(tmp_path / "leaky", tiny_encoder)
    report = check_store(root, "leaky.dir")
    assert [check.name for check in report.failed] == ["videos"]
    assert report.failed[0].offending == [f"{leaked_video} (train+test)"]
    code, _, err = run_mmim("data", "check", "--store", str(root))
    assert code == 2 and f"videos: 1 videos in more than one split ({leaked_video} (train+test))" in err


@pytest.mark.parametrize(
    "command", [("train", "--track", "--workers", "0"), ("tune", "--trials", "1", "--workers", "1")], ids=str
)
def test_mmim_train_and_tune_refuse_a_leaky_store_before_anything_trains_or_registers(
    command, tiny_encoder, tmp_path, mlflow_sqlite
):
    """The same guarantee as the flow's check_data step: exit 2, the check's message, no MLflow run,
    no model version."""
    root, leaked_video = leaky_store(tmp_path / "leaky", tiny_encoder)
    settings = {
        "model.text_encoder": tiny_encoder,
        "model.text_pretrained": "false",
        "data.store": str(root),
        "output_dir": str(tmp_path / "run"),
        "tracking.artifact_location": str(tmp_path / "artifacts"),
    }
    overrides = [argument for key, value in settings.items() for argument in ("--set", f"{key}={value}")]
    code, _, err = run_mmim(*command, *overrides)
    assert code == 2, err
    assert "failed the data checks: videos: 1 videos in more than one split" in err and leaked_video in err
    assert mlflow_sqlite.search_registered_models() == []
    experiments = [experiment.experiment_id for experiment in mlflow_sqlite.search_experiments()]
    assert mlflow_sqlite.search_runs(experiments) == []
    assert not (tmp_path / "run" / "best").exists()


def test_label_drift_warns_and_a_damaged_store_fails(tiny_encoder, tiny_store, tmp_path):
    splits = synthesize(0, TINY_SIZES)
    splits["valid"].labels = np.clip(splits["valid"].labels + 1.5, -3, 3)  # a much harder validation split
    root = store(tmp_path / "shifted", tiny_encoder, splits)
    report = check_store(root, "v2.dir", store_profile(tiny_store, "v1.dir"))
    assert not report.failed and [check.name for check in report.warnings] == ["labels drift"]
    assert "KS over 0.2 in valid" in report.warnings[0].detail
    # an edited file: the store check fails, naming it, and nothing else is checked
    (root / "valid" / "labels.npy").write_bytes(b"\x93NUMPY broken")
    (report_check,) = check_store(root, "v2.dir").checks
    assert not report_check.passed and "valid/labels.npy" in report_check.detail


def test_two_ids_in_one_split_pair_are_named(tiny_encoder, tmp_path):
    root = store(tmp_path / "dup", tiny_encoder, synthesize(0, TINY_SIZES))
    # a hand-edited store whose manifest was updated to match: the writer never produces it
    ids = json.loads((root / "train" / "ids.json").read_text())
    valid_ids = json.loads((root / "valid" / "ids.json").read_text())
    valid_ids[0] = ids[0]
    (root / "valid" / "ids.json").write_text(json.dumps(valid_ids))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["valid"]["sha256"]["ids.json"] = sha256_of(root / "valid" / "ids.json")
    (root / "manifest.json").write_text(json.dumps(manifest))
    failed = {check.name: check for check in check_store(root, "dup.dir").failed}
    assert f"{ids[0]} (train+valid)" in failed["ids"].offending


def test_ks_statistic_is_the_largest_ecdf_gap():
    assert ks_statistic(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0
    assert ks_statistic(np.array([0.0, 0.0]), np.array([1.0, 1.0])) == 1.0
    assert ks_statistic(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.0, 3.0])) == 0.5
