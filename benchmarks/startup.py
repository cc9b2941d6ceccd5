"""How long `mmim` commands take to start working, and where those seconds go.

For `mmim train` (in one process, and with 1 and 2 Ray workers), `mmim evaluate` and
`mmim predict`, on the demo's data: the seconds from the command's start to its first epoch
line (train) or to its scores (evaluate, predict), split at the lines the command prints on
the way ("starting a private Ray cluster", "reading the feature store", ...). Each command
runs as a user runs it, a fresh process; training runs one epoch.

    .venv/bin/python benchmarks/startup.py      # extracts the demo's store first if it is missing

Figures depend on the machine and its load: compare rows of one run, not runs of two machines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
MMIM = str(Path(sys.executable).parent / "mmim")
STORE = PROJECT / "data" / "stores" / "synthetic"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

# What a command prints as it reaches each phase (the phase then lasts until the next line).
PHASES = {
    "starting a private Ray cluster": "Ray start",
    "starting ": "Ray Train workers up, store and model in each",  # "starting 2 Ray Train workers"
    "reading the feature store": "store",
    "building the model": "model build",
    "training ": "epoch 1",  # "training 1 epochs on 320 utterances"
    "loading the checkpoint": "checkpoint",
    "scoring ": "scoring",
}
EPOCH_SECONDS = re.compile(r"\| ([\d.]+)s")  # an epoch line's own duration


def timed_lines(command: list[str], done: re.Pattern) -> tuple[list[tuple[float, str]], float]:
    """Every line the command prints (stdout and stderr) with its second since the start, and the
    second `done` first matched."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, finished = [], None
    assert process.stdout is not None
    for line in process.stdout:
        now = time.perf_counter() - start
        lines.append((now, line.rstrip()))
        if finished is None and done.search(line):
            finished = now
    if process.wait() != 0 or finished is None:
        sys.exit(f"{' '.join(command)} failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return lines, finished


def phases(lines: list[tuple[float, str]], finished: float) -> list[tuple[str, float]]:
    """(phase, seconds) from the start to `finished`: imports and config until the first known line."""
    marks = [(0.0, "imports, config")]
    for at, line in lines:
        if at > finished:
            break
        message = re.sub(r"^(\[[^\]]*\])?\s*INFO\s+", "", line).strip()  # rich's logging columns
        for prefix, phase in PHASES.items():
            if message.startswith(prefix) and phase not in {name for _, name in marks}:
                marks.append((at, phase))
                break
    ends = [at for at, _ in marks[1:]] + [finished]
    return [(name, end - at) for (at, name), end in zip(marks, ends, strict=True)]


def main() -> None:
    if not (STORE / "manifest.json").is_file():
        print(f"extracting the demo's store to {STORE} ...", flush=True)
        subprocess.run(
            [MMIM, "extract", "--source", "synthetic", "--out", str(STORE), "--encoder", ENCODER], check=True
        )
    work = Path(tempfile.mkdtemp(prefix="mmim-startup-"))
    common = ["--config", str(PROJECT / "configs" / "demo.yaml"), "--set", "train.epochs=1"]
    common += ["--set", "tracking.enabled=false", "--set", f"ray.storage_path={work / 'ray'}"]
    epoch_line = re.compile(r"(^|\| )epoch 1/1 \|")
    cases = {
        f"mmim train ({label})": (
            [MMIM, "train", *common, "--workers", str(workers), "--set", f"output_dir={work / label}"],
            epoch_line,
        )
        for label, workers in (("one process", 0), ("1 Ray worker", 1), ("2 Ray workers", 2))
    }
    checkpoint = work / "one process" / "best"
    cases["mmim evaluate"] = (
        [MMIM, "evaluate", "--checkpoint", str(checkpoint), "--store", str(STORE)],
        re.compile("Acc-7"),
    )
    utterances = str(PROJECT / "examples" / "utterances.json")
    cases["mmim predict"] = (
        [MMIM, "predict", "--checkpoint", str(checkpoint), "--input", utterances],
        re.compile('"score"'),
    )

    results = {}
    for name, (command, done) in cases.items():
        print(f"{name} ...", flush=True)
        lines, finished = timed_lines(command, done)
        split = phases(lines, finished)
        epoch = [float(m.group(1)) for _, line in lines if done.search(line) for m in [EPOCH_SECONDS.search(line)] if m]
        results[name] = {"seconds": round(finished, 1), "phases": {phase: round(s, 1) for phase, s in split}}
        if epoch and "train" in name:
            results[name]["epoch_1_itself"] = epoch[0]

    from mmim.core.store import FeatureStore  # after the runs: this process stays light while they time

    version = FeatureStore(STORE, verify_checksums=False).content_version
    print(f"\nseconds to the first epoch line (train) or the scores; data: {STORE} (version {version})")
    for name, figures in results.items():
        where = ", ".join(f"{phase} {seconds}" for phase, seconds in figures["phases"].items())
        own = f" (the epoch itself {figures['epoch_1_itself']})" if "epoch_1_itself" in figures else ""
        print(f"{name:<28}{figures['seconds']:>6.1f}   {where}{own}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
