"""Data checks before training, one test per check and boundary: a clean store passes against
another version's profile, a video or an id in two splits fails naming it, a sequence over the
frame cap fails, a shrunk split and label drift past KS 0.2 warn (0.2 itself does not), a split
with nothing before warns, a damaged store fails naming the file."""

import json

import numpy as np
import pytest

from mmim.core.limits import MAX_FRAMES
from mmim.core.store import SPLITS, FeatureStore, sha256_of
from mmim.core.text_encoder import load_tokenizer
from mmim.data.checks import LabelProfile, check_store, ks_statistic
from mmim.data.store_writer import SequenceList, write_store
from mmim.data.synthetic import synthesize
from tests.helpers import TINY_SIZES, run_mmim


def store(root, encoder, splits):
    return write_store(
        root, splits, load_tokenizer(encoder), text_encoder=encoder, max_tokens=16, source="synthetic"
    ).root


def profile_of(root, version: str = "v1.dir", **labels: list[float]) -> LabelProfile:
    """The store's own label profile with the splits in `labels` replaced: a previous version."""
    opened = FeatureStore(root)
    own = {name: opened[name].labels.tolist() for name in SPLITS}
    return LabelProfile(data_version=version, labels=own | labels)


def moved(root, count: int) -> LabelProfile:
    """A previous version whose valid labels differ from the store's by a known KS: the largest
    `count` of its 32 labels above every label of the store: KS count/32."""
    before = np.sort(FeatureStore(root)["valid"].labels).astype(np.float64)
    before[len(before) - count :] = before[-1] + 1.0
    return profile_of(root, valid=before.tolist())


def test_a_clean_store_passes_against_another_versions_profile(tiny_store):
    report = check_store(tiny_store, "v2.dir", moved(tiny_store, 5))  # labels that differ, KS 5/32
    assert not report.failed and not report.warnings
    assert [check.name for check in report.checks] == ["store", "ids", "videos", "lengths", "sizes", "labels drift"]
    assert "KS 0.156" in report.checks[-1].detail
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


def test_label_drift_warns_past_ks_0_2(tiny_store):
    assert not check_store(tiny_store, "v2.dir", moved(tiny_store, 6)).warnings  # KS 6/32 = 0.1875
    past = check_store(tiny_store, "v2.dir", moved(tiny_store, 7))  # KS 7/32 = 0.219
    assert [check.name for check in past.warnings] == ["labels drift"] and not past.failed
    assert "valid mean" in past.warnings[0].detail and "KS 0.219" in past.warnings[0].detail
    assert past.warnings[0].detail.endswith("(KS over 0.2 in valid)")
    assert past.tags()["data_checks"] == "warnings"


def test_ks_exactly_0_2_is_not_drift(tiny_encoder, tmp_path):
    """Valid labels 0, 1, 1, 1, 1 against five 1s before: the ECDFs differ by 1/5 at 0 and nowhere
    else, KS 0.2 exactly (the double 1/5), which is not over the threshold."""
    splits = synthesize(0, {"train": 10, "valid": 5, "test": 5})
    splits["valid"].labels = np.array([0.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    root = store(tmp_path / "five", tiny_encoder, splits)
    assert ks_statistic(splits["valid"].labels, np.ones(5)) == 0.2
    assert not check_store(root, "v2.dir", profile_of(root, valid=[1.0] * 5)).warnings
    over = check_store(root, "v2.dir", profile_of(root, valid=[1.0] * 3 + [2.0] * 2))  # KS 0.4, at 1
    assert [check.name for check in over.warnings] == ["labels drift"]


def test_a_shrunk_split_warns_and_a_grown_one_does_not(tiny_store):
    valid = FeatureStore(tiny_store)["valid"].labels.tolist()
    shrunk = check_store(tiny_store, "v2.dir", profile_of(tiny_store, valid=valid + valid[:3]))
    sizes = next(check for check in shrunk.checks if check.name == "sizes")
    assert not sizes.passed and not sizes.hard and not shrunk.failed
    assert sizes.detail == "train 96 -> 96; valid 35 -> 32; test 32 -> 32 (fewer examples in valid)"
    grown = check_store(tiny_store, "v2.dir", profile_of(tiny_store, valid=valid[:-3]))
    assert next(check for check in grown.checks if check.name == "sizes").passed


def test_a_split_with_nothing_before_warns_and_no_previous_version_checks_no_drift(tiny_store):
    report = check_store(tiny_store, "v2.dir", profile_of(tiny_store, test=[]))
    assert [check.name for check in report.warnings] == ["labels drift"]
    assert "test: none before" in report.warnings[0].detail and "(KS over 0.2 in test)" in report.warnings[0].detail
    first = check_store(tiny_store, "v1.dir")  # nothing to compare with: sizes only, no drift check
    assert [check.name for check in first.checks][-1] == "sizes" and not first.warnings
    assert first.checks[-1].detail == "train 96; valid 32; test 32 (no previous version to compare with)"
    assert first.markdown().startswith("# Data checks of v1.dir (no previous version)")


def test_a_sequence_over_the_frame_cap_fails_naming_it(tiny_encoder, tmp_path):
    splits = synthesize(0, TINY_SIZES)
    audio = splits["valid"].audio
    sequences = [audio[index] for index in range(len(audio))]
    sequences[3] = np.zeros((MAX_FRAMES + 1, audio.dim), dtype=np.float32)
    splits["valid"].audio = SequenceList(sequences, audio.dim)
    root = store(tmp_path / "long", tiny_encoder, splits)
    report = check_store(root, "long.dir")
    assert [check.name for check in report.failed] == ["lengths"]
    assert report.failed[0].offending == [f"valid/{splits['valid'].ids[3]} (audio {MAX_FRAMES + 1})"]
    assert report.failed[0].detail == f"1 sequences outside 1-{MAX_FRAMES} frames"


def test_a_damaged_store_fails_naming_the_file_and_checks_nothing_else(tiny_encoder, tmp_path):
    root = store(tmp_path / "damaged", tiny_encoder, synthesize(0, TINY_SIZES))
    (root / "valid" / "labels.npy").write_bytes(b"\x93NUMPY broken")
    (report_check,) = check_store(root, "v2.dir").checks
    assert report_check.name == "store" and not report_check.passed and "valid/labels.npy" in report_check.detail


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
