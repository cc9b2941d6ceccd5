"""Recordings -> features throughput with 1 and 2 Ray Data workers, and peak memory.

Writes --clips generated face clips (mmim.data.recordings.sample.write_face_clip: 320x240,
25 fps, H.264 + AAC voice) of --seconds each, every one from its own seed so that no
two share a cache entry, as a recordings dataset (label.csv + Raw/<video>/1.mp4, one
video per clip, modes cycling train/valid/test). Then it runs
`mmim.data.recordings.job.extract_recordings` on it, each run into a fresh store:

  0 workers              in this process (the extractor's child process, no Ray), fresh
                         cache; run before the Ray cluster starts
  1 Ray worker           one Ray Data actor, fresh cache
  2 Ray workers          two Ray Data actors, fresh cache
  2 workers, warm cache  the previous run's cache: nothing is extracted; what is left is
                         keying the clips, reading the cache and writing the store

The Ray runs share one local cluster, started once before them with
ray.init(num_cpus=2). Wall times are the whole call, with no warm-up run: they include
loading the tokenizer, writing the store and starting the extractors. Each Ray run
starts its own actor pool, and each actor spawns an extractor child that loads the
openSMILE and dlib models (~1-2 s per actor). The ratio 2 workers / 1 worker compares
two runs of this same invocation on this same machine.

Peak memory: during each run a thread samples, every 0.2 s, the resident set size of
this process plus all its descendants and keeps the largest sum. Once ray.init has
started the local cluster, its GCS, raylet, workers and their extractor children are
all descendants, so the Ray figures count the whole local Ray cluster, not only the
extraction. Pages shared between processes (libraries, Ray's object store) count once
per process that maps them, so the sum overstates the memory actually used.

    python benchmarks/extract_recordings.py [--clips 24 --seconds 3]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray

from mmim.data.recordings.extractor import ExtractorSettings
from mmim.data.recordings.job import extract_recordings
from mmim.data.recordings.sample import write_face_clip

log = logging.getLogger("extract_recordings")

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 50
SETTINGS = ExtractorSettings()  # the defaults: eGeMAPSv02 at 50 Hz, faces at 15 fps
COLUMNS = ("video_id", "clip_id", "text", "label", "mode", "start", "end")
MODES = ("train", "valid", "test")
LABELS = (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
FIRST_SEED = 1000
SAMPLE_EVERY = 0.2  # seconds between memory samples


# ---------------------------------------------------------------- the input


def write_dataset(root: Path, clips: int, seconds: float) -> None:
    """label.csv and one face clip per video under Raw/, each clip from its own seed."""
    rows = []
    for index in range(clips):
        video = f"v{index:03d}"
        label = LABELS[index % len(LABELS)]
        write_face_clip(root / "Raw" / video / "1.mp4", seconds=seconds, label=label, seed=FIRST_SEED + index)
        rows.append(
            {
                "video_id": video,
                "clip_id": "1",
                "text": "a really good movie",
                "label": f"{label:.1f}",
                "mode": MODES[index % len(MODES)],
            }
        )
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- peak memory


def resident_bytes() -> int:
    """RSS of this process plus all its descendants (processes that end meanwhile are skipped)."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakMemory:
    """The largest `resident_bytes()` seen while the block runs, sampled in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, resident_bytes())
            if self._stop.wait(SAMPLE_EVERY):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


# ---------------------------------------------------------------- the runs


@dataclass
class Run:
    name: str
    wall: float
    extracted: int
    cached: int
    skipped: int
    peak: int  # bytes


def run(name: str, dataset: Path, store: Path, cache: Path, workers: int) -> Run:
    log.info("run: %s", name)
    with PeakMemory() as memory:
        start = time.perf_counter()
        summary = extract_recordings(
            dataset, store, ENCODER, SETTINGS, cache_dir=cache, max_tokens=MAX_TOKENS, workers=workers
        )
        wall = time.perf_counter() - start
    for rejected in summary.skipped:
        log.warning("%s skipped %s: %s %s", name, rejected.where, rejected.reason, rejected.detail)
    return Run(name, wall, summary.extracted, summary.cached, len(summary.skipped), memory.peak)


def run_all(dataset: Path, work: Path) -> list[Run]:
    """workers 0 (before Ray starts), then 1, 2 and 2 again on the last cache, on one cluster."""
    runs = [run("0 workers (no Ray)", dataset, work / "store0", work / "cache0", workers=0)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        log.info("local Ray cluster started; idle, with this process: %.0f MB", resident_bytes() / 2**20)
        runs.append(run("1 Ray worker", dataset, work / "store1", work / "cache1", workers=1))
        runs.append(run("2 Ray workers", dataset, work / "store2", work / "cache2", workers=2))
        runs.append(run("2 workers, warm cache", dataset, work / "store2-again", work / "cache2", workers=2))
    finally:
        ray.shutdown()
    return runs


# ---------------------------------------------------------------- the figures


def report(runs: list[Run], clips: int, seconds: float, load: float) -> None:
    media = clips * seconds
    print(
        f"machine: {os.cpu_count()} CPUs, 1-minute load average before the runs {load:.2f} "
        "(other work on the machine slows every run)"
    )
    print(f"input: {clips} face clips x {seconds:g} s = {media:g} s of media (320x240, 25 fps, H.264 + AAC)")
    print(f"extractor: ExtractorSettings() defaults; text encoder {ENCODER}, max_tokens {MAX_TOKENS}")
    print(
        "wall s = the whole extract_recordings call: tokenizer load, extractor start-up (every Ray run "
        "starts its own actors, each spawning a child that loads openSMILE + dlib) and the store write"
    )
    print(
        f"{'run':<24}{'extracted':>10}{'cached':>8}{'skipped':>8}{'wall s':>9}{'clips/s':>9}"
        f"{'media s/s':>11}{'peak MB':>9}"
    )
    for r in runs:
        rate = (
            f"{r.extracted / r.wall:9.2f}{r.extracted * seconds / r.wall:11.2f}"
            if r.extracted
            else f"{'-':>9}{'-':>11}"
        )
        print(f"{r.name:<24}{r.extracted:>10}{r.cached:>8}{r.skipped:>8}{r.wall:>9.1f}{rate}{r.peak / 2**20:>9.0f}")
    one, two = runs[1], runs[2]
    if one.extracted and two.extracted:
        speedup = (two.extracted / two.wall) / (one.extracted / one.wall)
        print(f"2 Ray workers vs 1: {speedup:.2f} x the clips/s (both measured in this run)")
    print(
        f"peak MB: largest sum of RSS over this process and all its descendants, sampled every "
        f"{SAMPLE_EVERY:g} s; the Ray runs include the whole local Ray cluster (GCS, raylet, workers, "
        "extractor children), and shared pages count once per process"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="face clips in the dataset")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each clip")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        start = time.perf_counter()
        write_dataset(work / "dataset", args.clips, args.seconds)
        log.info("wrote %d clips in %.1f s", args.clips, time.perf_counter() - start)
        runs = run_all(work / "dataset", work)
    report(runs, args.clips, args.seconds, load)


if __name__ == "__main__":
    main()
