"""`mmim score`: a store, a recordings dataset or a file of utterances through the session's
champion on Ray Data, equal row by row to what `mmim predict` and `mmim evaluate` compute, and
finished by a rerun after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest

from mmim.registry.server import local_checkpoint
from mmim.training.predict import predict_checkpoint
from tests.helpers import RAY_NO_AUTH, run_mmim, write_dataset

pytestmark = pytest.mark.service


def utterances_file(path, champion, copies: int) -> list[float]:
    """`copies` times the champion's two utterances as JSON Lines (ids u0, u1, ...): their scores."""
    rows = champion.features.to_dict(orient="records")
    with open(path, "w") as handle:
        for i in range(copies * len(rows)):
            handle.write(json.dumps({"id": f"u{i}", **rows[i % len(rows)]}) + "\n")
    return champion.from_features * copies


def test_a_file_and_a_store_score_as_predict_and_evaluate_do(recordings_champion, ray_cluster, tmp_path, monkeypatch):
    champion = recordings_champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.tracking_uri)
    (tmp_path / "utterances.json").write_text(champion.features.to_json(orient="records"))
    out_file = tmp_path / "file.parquet"
    code, out, err = run_mmim(
        "score", "--model", champion.uri, "--input", str(tmp_path / "utterances.json"), "--out", str(out_file)
    )
    assert code == 0, err
    table = pd.read_parquet(out_file)
    assert table["id"].tolist() == ["1", "2"]
    assert table["score"].tolist() == pytest.approx(champion.from_features, abs=1e-5)  # mmim predict's
    assert (
        set(table["model_version"]) == {"models:/mmim-rec/1"} and table["data_version"].str.startswith("sha256-").all()
    )

    code, out, err = run_mmim(
        "score", "--model", champion.uri, "--input", str(champion.store), "--out", str(tmp_path / "store.parquet"),
        "--workers", "2", "--batch-size", "1",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "store.parquet")
    # mlflow's process-wide URI, which an earlier test's tracked run may have left on its own
    # server, wins over MLFLOW_TRACKING_URI for this in-process lookup (see the stop note)
    mlflow.set_tracking_uri(champion.tracking_uri)
    try:
        with local_checkpoint(champion.uri) as checkpoint:
            evaluated = predict_checkpoint(checkpoint, champion.store, splits=("train", "valid", "test"))
    finally:
        mlflow.set_tracking_uri(None)
    for split, (scores, _) in evaluated.items():
        rows = table[table["split"] == split]
        assert rows["score"].tolist() == pytest.approx(scores.tolist(), abs=1e-5), split
    assert not (tmp_path / "store.parquet.parts").exists()


def test_a_killed_run_is_finished_by_a_rerun_that_scores_only_the_rest(
    recordings_champion, ray_cluster, tmp_path, monkeypatch
):
    champion = recordings_champion
    expected = utterances_file(tmp_path / "u.jsonl", champion, copies=200)
    out = tmp_path / "scores.parquet"
    parts = tmp_path / "scores.parquet.parts"
    command = [sys.executable, "-m", "mmim.cli", "score", "--model", champion.uri, "--input", str(tmp_path / "u.jsonl")]
    command += ["--out", str(out), "--batch-size", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.tracking_uri, "RAY_ADDRESS": ray_cluster, **RAY_NO_AUTH}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert first.poll() is None and time.monotonic() < deadline, "no part written"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not out.exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.tracking_uri)
    code, printed, err = run_mmim(*command[3:])
    assert code == 0, err
    done = re.search(r"(\d+) rows, (\d+) scored now, (\d+) by an earlier run", " ".join(printed.split()))
    assert done, printed
    total, now, earlier = map(int, done.groups())
    assert total == len(expected) and now + earlier == total and 3 <= earlier < total  # only the rest scored
    table = pd.read_parquet(out)
    assert table["id"].tolist() == [f"u{i}" for i in range(len(expected))]
    assert table["score"].tolist() == pytest.approx(expected, abs=1e-5)


def test_a_recordings_dataset_and_a_csv_of_recordings_score_as_predict_does(
    recordings_champion, ray_cluster, tmp_path, monkeypatch
):
    """The champion's face clip, said with its text: in a recordings dataset (beside a row whose
    file is missing, skipped and counted) and in a CSV naming it relative to the CSV."""
    champion = recordings_champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.tracking_uri)
    rows = [
        {"video_id": "v0", "clip_id": "1", "text": champion.text, "label": "1", "mode": "test"},
        {"video_id": "v1", "clip_id": "1", "text": champion.text, "label": "1", "mode": "test"},  # no file
    ]
    dataset = write_dataset(tmp_path / "data", rows, {"v0/1.mp4": champion.recording})
    (tmp_path / "clips.csv").write_text(f"id,text,recording\nc1,{champion.text},data/Raw/v0/1.mp4\n")
    for source, ids, skipped in ((dataset, ["v0_1"], 1), (tmp_path / "clips.csv", ["c1"], 0)):
        out = tmp_path / f"{source.stem}.parquet"
        code, printed, err = run_mmim("score", "--model", champion.uri, "--input", str(source), "--out", str(out))
        assert code == 0, err
        said = " ".join(printed.split())  # the line as printed, wrapped or not
        assert ("by an earlier run, 1 skipped" in said) if skipped else ("skipped" not in said), said
        table = pd.read_parquet(out)
        assert table["id"].tolist() == ids
        assert table["score"].tolist() == pytest.approx(champion.from_recording, abs=1e-5)  # mmim predict's
