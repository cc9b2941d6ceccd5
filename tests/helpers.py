"""Helpers shared by the tests: sizes, paths, server processes, a DVC project, the command line.

Fixtures live in tests/conftest.py (pytest finds them there); everything a test imports by
name lives here: `from tests.helpers import free_port, start`.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import http.client
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from dvc.repo import Repo

from mmim.data.recordings.sample import write_face_clip
from mmim.data.synthetic import INTENSIFIERS, NEGATIONS, NEGATIVE, NEUTRAL, POSITIVE, SUBJECTS

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT / "examples" / "utterances.json"  # the shipped `mmim predict` input
TINY_SIZES = {"train": 96, "valid": 32, "test": 32}  # the tiny synthetic store's splits
# The session's cluster (tests/conftest.py) runs without Ray's token authentication: a `ray start` head would otherwise
# use the token of ~/.ray, whatever the machine holds there, which a driver must then present too.
RAY_NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
POSTGRES_URL = os.environ.get("MMIM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def tiny_vocabulary() -> list[str]:
    """The WordPiece vocabulary of the tiny encoder: every word the synthetic sample uses."""
    words = set(itertools.chain(POSITIVE, NEGATIVE, INTENSIFIERS, NEGATIONS, ["was", "and", "i"]))
    for phrase in itertools.chain(SUBJECTS, NEUTRAL):
        words.update(phrase.split())
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


# ---------------------------------------------------------------- the command line in this process


def run_mmim(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mmim ARGV` run in this process."""
    from mmim.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited: {process.stderr.read().decode()[-2000:]}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def start(command: list[str], url: str, env: dict | None = None) -> subprocess.Popen:
    """Start a server process and wait until `url` answers."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # uvicorn, gunicorn
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PATH": path, **(env or {})}
    )
    wait_for(url, process)
    return process


def start_mlflow_server(backend: str, *options: str) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on `backend` at a free loopback port, answering: (the process, its URI)."""
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "server", "--backend-store-uri", backend, *options, "--host", "127.0.0.1", "--port", str(port)]
    uri = f"http://127.0.0.1:{port}"
    return start([*command, "--workers", "1"], f"{uri}/health"), uri


def invocations(port: int, body: dict) -> list[float]:
    """The scores a model server on 127.0.0.1:`port` answers to a POST /invocations."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return [row["score"] for row in answer["predictions"]]


def refused(port: int, body) -> tuple[int, str]:
    """(HTTP status, message) of a request the server refuses."""
    data = body if not isinstance(body, dict) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    return answer.value.code, json.loads(answer.value.read())["message"]


def announced(port: int, length: int) -> tuple[int, str]:
    """(HTTP status, message) of a request that announces a body of `length` bytes and sends none
    (a client sending the body would race the server's early answer and close)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["message"]
    finally:
        connection.close()


def streamed_past(port: int, cap: int) -> tuple[int, str]:
    """(HTTP status, message) of a chunked request that sends one byte more than `cap` and then
    waits: a server that refuses a body as it arrives answers, one that waits for the whole body
    never does. (Sending the rest would race the server's early answer and close: the client's
    last write can meet a reset connection, which loses the answer.)"""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        connection.send(b"%x\r\n" % (2 * cap) + b" " * (cap + 1))  # a chunk of 2 x cap announced
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["message"]
    finally:
        connection.close()


def rest_contract_holds(port: int, champion) -> None:
    """The REST contract, on a server for `champion` (tests/conftest.py's recordings_champion) on
    127.0.0.1:`port` whose body cap is 0.5 MB: features as dataframe_split and dataframe_records,
    and a base64 recording, each scored as `mmim predict` scores them; a path, deep JSON and
    bodies over the cap refused with the status and message the contract names."""
    frame, text, media_face = champion.features, champion.text, champion.recording
    assert invocations(port, {"dataframe_split": frame.to_dict(orient="split")}) == pytest.approx(
        champion.from_features, abs=1e-5
    )
    assert invocations(port, {"dataframe_records": frame.to_dict(orient="records")}) == pytest.approx(
        champion.from_features, abs=1e-5
    )
    recording = base64.b64encode(media_face.read_bytes()).decode()
    body = {"dataframe_split": {"columns": ["text", "recording"], "data": [[text, recording]]}}
    assert invocations(port, body) == pytest.approx(champion.from_recording, abs=1e-5)
    # a path is not read on the server's side
    path = {"dataframe_split": {"columns": ["text", "recording"], "data": [[text, str(media_face)]]}}
    status, message = refused(port, path)
    assert status == 400 and "recording" in message
    # hostile bodies are refused before MLflow parses them (it would answer 500 to the first)
    assert refused(port, b"[" * 100_000) == (400, "request JSON nested deeper than 32 levels")
    over = (413, "request body over 524288 bytes (mmim serve --max-request-mb)")
    assert announced(port, 600_000) == over  # refused on its Content-Length, before any of it is read
    assert streamed_past(port, 524288) == over  # chunked: refused as it arrives, before its end


def postgres_database(prefix: str) -> str:
    """A fresh database `<prefix>_<random>` on the local PostgreSQL, as a psycopg2 SQLAlchemy URL;
    skipped (not under CI) when none answers."""
    import psycopg2

    try:
        connection = psycopg2.connect(POSTGRES_URL, connect_timeout=3)
    except psycopg2.OperationalError as error:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"PostgreSQL at {POSTGRES_URL} (MMIM_TEST_POSTGRES_URL) is required under CI: {error}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set MMIM_TEST_POSTGRES_URL): {error}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    # SQLAlchemy's default PostgreSQL driver is psycopg 3; name psycopg2, which is installed.
    return POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1) + f"/{name}"


# ---------------------------------------------------------------- the model registry


def compared(client, value: float, data: str, name: str, metric: str = "MAE"):
    """A challenger with validation `metric` `value` on `data`, and the champion of `name` as
    scored there (its figure recorded on that data: the same model on the same data scores the same)."""
    from mmim.registry.gating import HeadToHead
    from mmim.registry.versions import champion_version, figure

    champion = champion_version(client, name)
    theirs = None if champion is None else figure(client.get_model_version(name, champion), metric, data)
    return HeadToHead(
        data_version=data,
        metric=metric,
        challenger={"valid": {metric: value}},
        champion_version=champion,
        champion=None if theirs is None else {"valid": {metric: theirs}},
    )


# ---------------------------------------------------------------- a DVC project


def stored_in_remote(remote: Path, data_version: str) -> set[str]:
    """The files of the store `data_version` (DVC's `<md5>.dir`) that the local DVC remote
    `remote` holds: its listing and every object it names, each present."""

    def object_path(md5: str) -> Path:
        return remote / "files" / "md5" / md5[:2] / md5[2:]

    listing = object_path(data_version)
    if not listing.is_file():
        return set()
    return {entry["relpath"] for entry in json.loads(listing.read_text()) if object_path(entry["md5"]).is_file()}


def store_files(project: Path, dataset: str = "synthetic") -> set[str]:
    """Every file of the project's feature store of `dataset`, relative to the store."""
    store = project / "data" / "stores" / dataset
    return {str(path.relative_to(store)) for path in store.rglob("*") if path.is_file()}


def run(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)


def dvc(*args, cwd):
    run(str(Path(sys.executable).parent / "dvc"), *args, cwd=cwd)


def make_dvc_project(
    repo: Path, remote_url: str, endpoint: str | None = None, encoder: str | None = None, sizes: dict | None = None
) -> Path:
    """A git repository with the project's dvc.yaml/params.yaml (a small sample, or `sizes`) and code,
    whose default DVC remote is `remote_url`; `encoder` replaces the synthetic dataset's tokenizer."""
    repo.mkdir(parents=True)
    shutil.copytree(PROJECT / "mmim", repo / "mmim", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(PROJECT / name, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["synthetic"].update(sizes or {"train": 40, "valid": 12, "test": 12})
    if encoder:
        params["datasets"]["synthetic"]["encoder"] = encoder
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    run("git", "init", "-q", cwd=repo)
    run("git", "config", "user.email", "ci@example.invalid", cwd=repo)
    run("git", "config", "user.name", "ci", cwd=repo)
    # `dvc init` and the settings of the project's .dvc/config, in this process (a `dvc` command
    # costs half a second of imports each)
    with contextlib.redirect_stdout(io.StringIO()):
        Repo.init(str(repo))
    with Repo(str(repo)) as project, project.config.edit() as config:
        config["core"].update({"analytics": False, "autostage": True, "remote": "default"})
        config["remote"]["default"] = {"url": remote_url, **({"endpointurl": endpoint} if endpoint else {})}
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "project", cwd=repo)
    return repo


# ---------------------------------------------------------------- Ray training


def stop_ray_head(head: subprocess.Popen, directory: Path) -> None:
    """Stop a `ray start --head --block` begun in a session of its own (start_new_session) for a
    cluster living in `directory`, and remove the directory. Never `ray stop`: that stops every
    Ray cluster on the machine. The whole process group goes (some of Ray's processes rename
    themselves, so their command line no longer names the directory), then anything left that
    names it."""
    head.terminate()  # `ray start --block` stops its processes gracefully: ~30 s; 5 s, then they are killed
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                process.kill()
    shutil.rmtree(directory, ignore_errors=True)


def tracked(config, tmp_path):
    """`config` with MLflow tracking on, artifacts under `tmp_path`."""
    update = {"enabled": True, "artifact_location": str(tmp_path / "artifacts")}
    return config.model_copy(update={"tracking": config.tracking.model_copy(update=update)})


def run_in_thread(config) -> tuple[threading.Thread, dict]:
    """Ray training tracked in MLflow, as the flow runs it, in a thread (the test harms it meanwhile):
    the thread and what it leaves: run_id, then result or error."""
    from mmim.cluster.distributed import train_distributed
    from mmim.registry.tracking import tracked_run

    outcome: dict = {}

    def target():
        try:
            with tracked_run(config) as run:
                outcome["run_id"] = run.run_id
                outcome["result"] = train_distributed(config, run.log_epoch)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@contextlib.contextmanager
def busy_cores(count: int = 2, seconds: float = 600.0) -> Iterator[None]:
    """`count` processes that each keep a core busy, for at most `seconds`: a shared machine
    where other work runs."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass"
    processes = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- recordings datasets (label.csv + Raw/)

RECORDING_COLUMNS = ["video_id", "clip_id", "text", "label", "mode", "start", "end"]


def write_dataset(root: Path, rows: list[dict], clips: dict[str, Path] = {}) -> Path:
    """label.csv from `rows`; `clips` maps "video/clip.ext" (under Raw/) to a file to copy."""
    (root / "Raw").mkdir(parents=True, exist_ok=True)
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, RECORDING_COLUMNS)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in RECORDING_COLUMNS} for row in rows)
    for name, source in clips.items():
        (root / "Raw" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / "Raw" / name)
    return root


def face_clips(directory: Path, count: int, first_seed: int = 10) -> list[Path]:
    """`count` distinct 1 s face clips (distinct content: the cache keys files by content)."""
    return [
        write_face_clip(directory / f"face{seed}.mp4", seconds=1.0, label=0.5, seed=seed)
        for seed in range(first_seed, first_seed + count)
    ]


def good_rows(files: list[Path], start: int = 0) -> tuple[list[dict], dict[str, Path]]:
    """One video per file; modes cycle train, valid, test."""
    rows, clips = [], {}
    for index, path in enumerate(files, start=start):
        video = f"v{index}"
        rows.append(
            {
                "video_id": video,
                "clip_id": "1",
                "text": "a really good movie",
                "label": "1.5",
                "mode": ("train", "valid", "test")[index % 3],
            }
        )
        clips[f"{video}/1.mp4"] = path
    return rows, clips
