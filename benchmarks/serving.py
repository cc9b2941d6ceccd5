"""Serving throughput and latency: MLflow's server against Ray Serve, and batch scoring on Ray Data.

One registered model (configs/demo.yaml's MiniLM model, trained for an epoch on a generated
recordings sample, registered as `bench-serve` in a sqlite registry of its own) is served by

    mmim serve                                  MLflow's scoring server, one process
    mmim serve --ray --replicas 1               Ray Serve (a private local cluster)
    mmim serve --ray --replicas 2

each on loopback under bounded load: REQUESTS requests, CONCURRENCY at a time, each one
utterance given as features ("features"), then RECORDING_REQUESTS requests carrying a 3 s
recording ("recording": decoded and featurised by the server). It prints requests per second
and the p50/p99 latency of each, then `mmim score` over SCORED utterances with 1 and 2
workers (utterances per second, the Ray start included). Ray Serve's replicas reserve half a
CPU each here, so that two fit a 2-core machine beside the featurizer.

    .venv/bin/python benchmarks/serving.py
"""

from __future__ import annotations

import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REQUESTS, RECORDING_REQUESTS, CONCURRENCY, SCORED = 300, 40, 8, 2000
MODEL = "models:/bench-serve@champion"
MMIM = str(Path(sys.executable).parent / "mmim")


def registered_model(root: Path) -> tuple[list[dict], Path]:
    """Register the demo model trained on a generated recordings sample: (a request's utterances, a 3 s clip)."""
    from mmim.core.config import load_config
    from mmim.core.store import FeatureStore
    from mmim.data.recordings.extractor import ExtractorSettings
    from mmim.data.recordings.job import extract_recordings
    from mmim.data.recordings.sample import write_face_clip, write_sample_dataset
    from mmim.lifecycle.retrain import retrain
    from mmim.registry.logged_model import input_example

    write_sample_dataset(root / "raw", videos=8, clips_per_video=2)
    config = load_config("configs/demo.yaml")
    encoder = config.model.text_encoder
    extract_recordings(
        root / "raw", root / "store", encoder, ExtractorSettings(), cache_dir=root / "cache", max_tokens=50, workers=0
    )
    settings = {
        "data": config.data.model_copy(update={"store": str(root / "store")}),
        "train": config.train.model_copy(update={"epochs": 1, "batch_size": 4}),
        "output_dir": str(root / "run"),
        "tracking": config.tracking.model_copy(
            update={"enabled": True, "artifact_location": str(root / "artifacts"), "registered_model": "bench-serve"}
        ),
    }
    assert retrain(config.model_copy(update=settings), lambda metrics: None).decision.promoted
    features = input_example(FeatureStore(root / "store"), ["the movie was very good"])
    return features.to_dict(orient="records"), write_face_clip(root / "clip.mp4", seconds=3.0, label=1.0, seed=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def started(command: list[str], port: int) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{command} exited with {server.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{command} did not answer in 300 s")


def load(port: int, body: bytes, requests: int) -> tuple[float, float, float]:
    """(requests per second, p50 ms, p99 ms) of `requests` POSTs, CONCURRENCY at a time."""

    def one(_) -> float:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        begun = time.perf_counter()
        urllib.request.urlopen(request, timeout=120).read()
        return time.perf_counter() - begun

    one(None)  # the first request warms the server (a recording starts the extractor child)
    begun = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - begun
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return requests / wall, statistics.median(latencies) * 1000, p99 * 1000


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ.pop("RAY_ADDRESS", None)  # each server starts its own cluster
    utterances, clip = registered_model(root)
    features = json.dumps({"dataframe_records": utterances}).encode()
    recording = base64.b64encode(clip.read_bytes()).decode()
    with_recording = json.dumps(
        {"dataframe_split": {"columns": ["text", "recording"], "data": [["the movie was very good", recording]]}}
    ).encode()

    servers = {
        "mmim serve (MLflow)": [],
        "mmim serve --ray, 1 replica": ["--ray", "--replicas", "1", "--replica-cpus", "0.5"],
        "mmim serve --ray, 2 replicas": ["--ray", "--replicas", "2", "--replica-cpus", "0.5"],
    }
    print(f"{REQUESTS} feature requests / {RECORDING_REQUESTS} recording requests, {CONCURRENCY} at a time")
    print(f"{'server':<30} {'input':<10} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, options in servers.items():
        port = free_port()
        server = started([MMIM, "serve", "--model", MODEL, "--port", str(port), *options], port)
        try:
            for label, body, count in (
                ("features", features, REQUESTS),
                ("recording", with_recording, RECORDING_REQUESTS),
            ):
                rate, p50, p99 = load(port, body, count)
                print(f"{name:<30} {label:<10} {rate:7.1f} {p50:8.0f} {p99:8.0f}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=120)

    with open(root / "utterances.jsonl", "w") as handle:
        for i in range(SCORED):
            handle.write(json.dumps({"id": f"u{i}", **utterances[0]}) + "\n")
    print(f"\nmmim score, {SCORED} utterances (the Ray start included)")
    for workers in (1, 2):
        out = root / f"scores-{workers}.parquet"
        begun = time.perf_counter()
        command = [MMIM, "score", "--model", MODEL, "--input", str(root / "utterances.jsonl"), "--out", str(out)]
        subprocess.run([*command, "--workers", str(workers)], check=True, capture_output=True)
        print(f"{workers} worker(s): {SCORED / (time.perf_counter() - begun):7.1f} utterances/s", flush=True)


if __name__ == "__main__":
    main()
