"""Extraction throughput and peak memory on a MOSEI-sized input.

Writes a MulT-format pickle + label CSV the size of CMU-MOSEI (16326/1871/4659
examples, audio dim 74, vision dim 35, front-padded to --frames frames, real lengths
drawn between 10% and 100% of that), then runs `mmim extract --source mult` on it in
a child process and prints examples/s, the child's peak resident memory, and that
peak as a multiple of the loaded pickle's arrays. The pickle itself must be in memory
(and unpickling an array briefly holds its bytes twice); the store is streamed to disk
one example at a time, so no split is held a second time.

The input is written by a separate child, and the extraction reports its own peak
(Linux carries the peak RSS of a forked parent into the child, so the parent stays small).

    python benchmarks/extract.py [--frames 150]
"""

from __future__ import annotations

import argparse
import csv
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmim.data.synthetic import synthesize

MOSEI_SIZES = {"train": 16326, "valid": 1871, "test": 4659}
DIMS = {"audio": 74, "vision": 35}
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def front_padded(rng: np.random.Generator, count: int, frames: int, dim: int) -> np.ndarray:
    array = rng.standard_normal((count, frames, dim), dtype=np.float32)
    lengths = rng.integers(max(frames // 10, 1), frames + 1, size=count)
    for row, length in enumerate(lengths):
        array[row, : frames - length] = 0.0
    return array


def write_input(directory: Path, frames: int) -> int:
    """The MOSEI-sized MulT files; returns the bytes of the feature arrays."""
    rng = np.random.default_rng(0)
    sample = synthesize(seed=0, sizes=MOSEI_SIZES)
    data, rows, array_bytes = {}, [], 0
    for name, split in sample.items():
        audio = front_padded(rng, len(split.ids), frames, DIMS["audio"])
        vision = front_padded(rng, len(split.ids), frames, DIMS["vision"])
        array_bytes += audio.nbytes + vision.nbytes
        data[name] = {
            "audio": audio,
            "vision": vision,
            "labels": split.labels.reshape(-1, 1, 1),
            "id": np.array([[i.encode()] for i in split.ids]),
        }
        rows += [(*example_id.rsplit("_", 1), text) for example_id, text in zip(split.ids, split.texts)]
    with open(directory / "mosei_senti_data_noalign.pkl", "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    with open(directory / "MOSEI-label.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "clip_id", "text"])
        writer.writerows(rows)
    return array_bytes


# Runs `mmim extract` and prints its own peak RSS (KiB on Linux) as the last line.
MEASURED_EXTRACT = """
import resource, sys
from mmim.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150, help="padded frames per sequence")
    parser.add_argument("--write-input", metavar="DIR", help=argparse.SUPPRESS)  # the input child
    args = parser.parse_args()
    if args.write_input:
        print(write_input(Path(args.write_input), args.frames))
        return
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        (work / "raw").mkdir()
        written = subprocess.run(
            [sys.executable, __file__, "--write-input", str(work / "raw"), "--frames", str(args.frames)],
            check=True,
            capture_output=True,
            text=True,
        )
        array_bytes = int(written.stdout.split()[-1])
        command = [
            sys.executable,
            "-c",
            MEASURED_EXTRACT,
            "extract",
            "--source",
            "mult",
            "--input",
            str(work / "raw"),
            "--out",
            str(work / "store"),
            "--encoder",
            ENCODER,
        ]
        start = time.perf_counter()
        extraction = subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak = int(extraction.stdout.split()[-1]) * 1024
        examples = sum(MOSEI_SIZES.values())
    print(
        f"input: {examples} examples, audio (N, {args.frames}, 74) + vision (N, {args.frames}, 35) "
        f"float32 = {array_bytes / 2**30:.2f} GiB of arrays"
    )
    print(f"extraction (child process, tokenizer load included): {seconds:.1f} s, {examples / seconds:.0f} examples/s")
    print(
        f"peak resident memory of the extraction: {peak / 2**30:.2f} GiB = {peak / array_bytes:.2f} x the input arrays"
    )


if __name__ == "__main__":
    main()
