"""Hostile files and bad input, third round: the extractor child, the cache, crafted sizes,
links out of the dataset, special files, concurrent writers, and one line (never a traceback)
for every case. Each group is one test; the one-line cases are a table."""

import csv
import hashlib
import io
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmim.cluster.tune import load_search_spec
from mmim.core.errors import MMIMInputError, ServiceUnavailableError
from mmim.core.files import read_npz
from mmim.core.model import build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import load_tokenizer
from mmim.data.recordings.cache import FeatureCache
from mmim.data.recordings.extractor import ClipFeatures, ExtractorSettings, IsolatedExtractor
from mmim.data.recordings.job import RecordingsProgress, extract_recordings
from mmim.data.recordings.layout import read_dataset
from mmim.data.recordings.sample import write_voice
from mmim.registry.serving import _recording_bytes, check_address
from mmim.training.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import run_mmim

SETTINGS = ExtractorSettings()
COLUMNS = ["video_id", "clip_id", "text", "label", "mode"]


def voice_dataset(root: Path, extra_rows: list[dict] = ()) -> Path:
    """Three short voice clips, one per split (audio only: fast to extract)."""
    rows = []
    for index, mode in enumerate(("train", "valid", "test")):
        write_voice(root / "Raw" / f"v{index}" / "1.wav", seconds=0.6, label=index - 1.0, seed=index)
        rows.append({"video_id": f"v{index}", "clip_id": "1", "text": "fine", "label": str(index - 1), "mode": mode})
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows([*rows, *extra_rows])
    return root


def extract(root: Path, tmp_path: Path, **options):
    return extract_recordings(
        root,
        tmp_path / "store",
        str(options.pop("encoder")),
        SETTINGS,
        cache_dir=tmp_path / "cache",
        max_tokens=16,
        workers=0,
        overwrite=True,
        **options,
    )


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_extractor_child_never_imports_from_the_working_directory(tmp_path, monkeypatch):
    planted = tmp_path / "cwd" / "mmim"
    planted.mkdir(parents=True)
    marker = tmp_path / "ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    voice = write_voice(tmp_path / "voice.wav", seconds=0.5)
    monkeypatch.chdir(planted.parent)
    monkeypatch.setenv("PYTHONPATH", str(planted.parent))  # also where the environment points
    with IsolatedExtractor(SETTINGS) as extractor:
        assert extractor(voice).audio.shape[1] == 25
    assert not marker.exists()


def test_the_cache_detects_a_swapped_entry_and_an_edit_that_keeps_size_and_mtime(tmp_path, tiny_encoder):
    root = voice_dataset(tmp_path / "data")
    first = extract(root, tmp_path, encoder=tiny_encoder)
    assert (first.extracted, first.cached, first.replaced) == (3, 0, 0)
    before = FeatureStore(tmp_path / "store")["train"].sequence("audio", 0).copy()
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    shutil.copy(entries[1], entries[0])  # one clip's entry now holds another clip's features
    again = extract(root, tmp_path, encoder=tiny_encoder)
    assert (again.extracted, again.replaced) == (1, 1)
    for name in ("train", "valid", "test"):
        assert FeatureStore(tmp_path / "store")[name].sequence("audio", 0).shape[0] > 0
    assert np.array_equal(FeatureStore(tmp_path / "store")["train"].sequence("audio", 0), before)

    clip = root / "Raw" / "v0" / "1.wav"  # same size, same mtime, other samples
    stat = clip.stat()
    data = bytearray(clip.read_bytes())
    data[200:4000] = bytes(reversed(data[200:4000]))
    clip.write_bytes(bytes(data))
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (clip.stat().st_size, clip.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    edited = extract(root, tmp_path, encoder=tiny_encoder)
    assert (edited.extracted, edited.cached) == (1, 2)
    assert not np.array_equal(FeatureStore(tmp_path / "store")["train"].sequence("audio", 0), before)

    # an entry under the right key with other feature widths: extracted again, not reported against another clip
    cache = FeatureCache(tmp_path / "cache", SETTINGS)
    key = cache.key(read_dataset(root)[0][1])
    cache.put(key, ClipFeatures(np.zeros((4, 7), np.float32), np.zeros((4, 150), np.float32)))
    widths = extract(root, tmp_path, encoder=tiny_encoder)
    assert (widths.extracted, widths.replaced) == (1, 1)

    # the cache deleted while a run extracts: the run puts back what it needs and finishes
    data[4000:8000] = bytes(reversed(data[4000:8000]))  # one clip to extract, then the cache goes
    clip.write_bytes(bytes(data))
    deleted = extract(
        root,
        tmp_path,
        encoder=tiny_encoder,
        progress=RecordingsProgress(advance=lambda: shutil.rmtree(tmp_path / "cache", ignore_errors=True)),
    )
    assert deleted.extracted == 1 and all(len(split) == 1 for split in FeatureStore(tmp_path / "store").splits.values())


def test_declared_sizes_are_refused_before_anything_is_built(tiny_config, tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    assert len(bomb) < 600
    (tmp_path / "bomb.yaml").write_text(bomb)
    config = bind_store(tiny_config, FeatureStore(tiny_config.data.store))
    checkpoint = save_checkpoint(
        tmp_path / "ck", build_model(config.model), config, load_tokenizer(config.model.text_encoder)
    )
    encoder = checkpoint / "text_encoder" / "config.json"
    run_config = checkpoint / "config.json"
    giant = tmp_path / "giant.npz"  # a cache entry whose header declares 10^12 frames
    with zipfile.ZipFile(giant, "w") as archive:
        header = io.BytesIO()
        declared = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 25)}
        np.lib.format.write_array_header_1_0(header, declared)
        archive.writestr("audio.npy", header.getvalue() + bytes(100))

    originals = {path: path.read_text() for path in (encoder, run_config)}

    def refused_checkpoint(path: Path, change: dict):
        """A call that loads the checkpoint with `change` made to one of its configs (only)."""

        def attempt():
            for original, text in originals.items():
                original.write_text(text)
            edited = json.loads(originals[path])
            (edited["model"] if path == run_config else edited).update(change)
            path.write_text(json.dumps(edited))
            load_checkpoint(checkpoint)

        return attempt

    cases = [
        (lambda: load_search_spec(tmp_path / "bomb.yaml"), "values once its aliases are expanded"),
        (refused_checkpoint(encoder, {"num_hidden_layers": 3000}), "num_hidden_layers is 3000"),
        (refused_checkpoint(encoder, {"num_hidden_layers": 40}), "builds 608 parameter(s) the file lacks"),
        (refused_checkpoint(encoder, {"num_attention_heads": 0}), "describes no encoder that can be built"),
        (refused_checkpoint(run_config, {"cpc_layers": 100000}), "model.cpc_layers"),
        (refused_checkpoint(run_config, {"lstm_layers": 100}), "the file lacks, e.g. acoustic_enc.rnn"),
    ]
    for attempt, message in cases:
        started, peak = time.monotonic(), peak_mb()
        with pytest.raises(MMIMInputError, match=re.escape(message)):
            attempt()
        assert time.monotonic() - started < 2 and peak_mb() - peak < 300, message
    with pytest.raises(ValueError, match="not what the file holds"):
        read_npz(giant, ("audio",), 2**30)
    fifo_in_place_of(checkpoint / "model.safetensors")
    with pytest.raises(MMIMInputError, match="model.safetensors: not a regular file"):
        load_checkpoint(checkpoint)


def fifo_in_place_of(path: Path) -> None:
    """`path` becomes a FIFO that nobody writes: opening it to read would wait for ever."""
    path.unlink()
    os.mkfifo(path)


def test_reads_stay_inside_the_dataset_and_the_store_and_special_files_are_refused(tmp_path, tiny_store):
    root = voice_dataset(tmp_path / "data")
    outside = write_voice(tmp_path / "elsewhere" / "secret.wav", seconds=0.5)
    (root / "Raw" / "v3").mkdir()
    (root / "Raw" / "v3" / "1.wav").symlink_to(outside)
    (root / "Raw" / "v4").symlink_to(outside.parent, target_is_directory=True)
    (outside.parent / "1.wav").symlink_to(outside)
    rows = [{"video_id": f"v{i}", "clip_id": "1", "text": "x", "label": "0", "mode": "train"} for i in (3, 4)]
    voice_dataset(root, rows)
    clips, rejected = read_dataset(root)
    assert len(clips) == 3 and [r.reason for r in rejected] == ["outside the dataset"] * 2

    store = tmp_path / "store"
    outside_key = {"/etc/shadow": "0" * 64}
    tampered_store(tiny_store, store, lambda manifest, _: manifest["splits"]["train"]["sha256"].update(outside_key))
    with pytest.raises(MMIMInputError, match=r"manifest.json: field 'splits.train.sha256' names '/etc/shadow'"):
        FeatureStore(store)

    labels = root / "label.csv"
    labels.unlink()
    labels.symlink_to("/dev/zero")
    with pytest.raises(MMIMInputError, match="label.csv: not a regular file"):
        read_dataset(root)
    fifo_in_place_of(labels)
    with pytest.raises(MMIMInputError, match="label.csv: not a regular file"):
        read_dataset(root)


def test_three_extractions_to_one_store_end_with_one_store_and_sentences(tmp_path, tiny_encoder):
    root = voice_dataset(tmp_path / "data")
    command = [sys.executable, "-m", "mmim.cli", "extract", "--source", "recordings", "--input", str(root)]
    command += ["--out", str(tmp_path / "store"), "--encoder", tiny_encoder, "--workers", "0", "--overwrite"]
    runs = [
        subprocess.Popen([*command, "--cache", str(tmp_path / f"cache{i}")], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    ended = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert all("Traceback" not in err for _, err in ended), ended
    assert any(code == 0 for code, _ in ended), ended
    for code, err in ended:
        assert code == 0 or (code == 2 and "is writing it now" in err.strip().splitlines()[-1]), err
    assert len(FeatureStore(tmp_path / "store")["train"]) == 1
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging, no lock


def test_the_server_checks_its_address_and_reads_base64_with_line_breaks():
    payload = bytes(range(256)) * 4
    wrapped = subprocess.run(["base64"], input=payload, capture_output=True, check=True).stdout.decode()
    assert "\n" in wrapped.strip() and _recording_bytes(wrapped, 0) == payload
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ServiceUnavailableError, match="already in use"):
            check_address("127.0.0.1", busy.getsockname()[1], 64.0)


def test_ids_and_paths_are_printed_as_they_are(tmp_path, tiny_encoder):
    rows = [
        {"video_id": name, "clip_id": "1", "text": "x", "label": "0", "mode": "train"}
        for name in ("nosuch[/x]", "v[bold red]PWN")
    ]
    root = voice_dataset(tmp_path / "data", rows)
    argv = [part.format(tmp=tmp_path, encoder=tiny_encoder) for part in extract_argv(str(root))]
    code, out, err = run_mmim(*argv, "--cache", str(tmp_path / "cache"), "--workers", "0")
    assert code == 0, err
    assert "video 'nosuch[/x]'" in out and "video 'v[bold red]PWN'" in out


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tampered_store(source: Path, store: Path, change) -> None:
    """A copy of `source` changed by `change(manifest, store)`, its checksums updated to match."""
    shutil.copytree(source, store)
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest, store)
    digests = manifest["splits"]["train"]["sha256"]
    digests["ids.json"] = hashlib.sha256((store / "train" / "ids.json").read_bytes()).hexdigest()
    write(store / "manifest.json", json.dumps(manifest))


def extract_argv(input_dir: str) -> list[str]:
    return ["extract", "--source", "recordings", "--input", input_dir, "--out", "{tmp}/s", "--encoder", "{encoder}"]


def tracking_uri_case(what: str, uri: str, line: str) -> tuple:
    """`mmim registry list` with MLFLOW_TRACKING_URI=`uri`: one line, `line` after the variable's name."""
    return (
        what,
        ["registry", "list", "--name", "m"],
        {"MLFLOW_TRACKING_URI": uri},
        f"error: MLFLOW_TRACKING_URI {line}",
        2,
    )


# (what, argv with {tmp}, extra environment, the one line's start, exit code)
ONE_LINE_CASES = [
    ("--input a file", [*extract_argv("{tmp}/cfg.yaml")], {}, "error: {tmp}/cfg.yaml: not a directory", 2),
    ("--clip-timeout inf", [*extract_argv("{tmp}"), "--clip-timeout", "inf"], {}, "error: --clip-timeout inf", 2),
    (
        "--clip-timeout 1e300",
        [*extract_argv("{tmp}"), "--clip-timeout", "1e300"],
        {},
        "error: --clip-timeout 1e+300",
        2,
    ),
    (
        "--cache inside --out",
        [*extract_argv("{tmp}"), "--cache", "{tmp}/s/cache"],
        {},
        "error: --cache {tmp}/s/cache and --out {tmp}/s: one is inside the other",
        2,
    ),
    (
        "--set unclosed",
        ["train", "--config", "{tmp}/cfg.yaml", "--set", "train.epochs=[1"],
        {},
        "error: --set 'train.epochs=[1': not valid YAML",
        2,
    ),
    (
        "--set python tag",
        ["train", "--config", "{tmp}/cfg.yaml", "--set", "train.epochs=!!python/object/apply:os.getpid []"],
        {},
        "error: --set 'train.epochs=!!python",
        2,
    ),
    ("deep YAML", ["train", "--config", "{tmp}/deep.yaml"], {}, "error: {tmp}/deep.yaml: nested too deeply", 2),
    ("--seeds of 5000 digits", ["train", "--config", "{tmp}/cfg.yaml", "--seeds", "9" * 5000], {}, "error: --seeds", 2),
    ("--max-request-mb nan", ["serve", "--max-request-mb", "nan"], {}, "error: --max-request-mb nan", 2),
    ("--max-request-mb inf", ["serve", "--max-request-mb", "inf"], {}, "error: --max-request-mb inf", 2),
    ("--port 99999", ["serve", "--port", "99999"], {}, "error: --port 99999", 2),
    tracking_uri_case("file store", "./mlruns", "'./mlruns': not a database or a tracking server"),
    tracking_uri_case("file://", "file:///etc", "'file:///etc'"),
    tracking_uri_case("ftp://", "ftp://host/x", "'ftp://host/x'"),
    tracking_uri_case(
        "sqlite in no directory",
        "sqlite:///{tmp}/no/dir/x.db",
        "'sqlite:///{tmp}/no/dir/x.db': directory {tmp}/no/dir does not exist",
    ),
    (
        "uniform to inf",
        ["tune", "--config", "{tmp}/cfg.yaml", "--trials", "1", "--search", "{tmp}/inf.yaml"],
        {},
        "error: {tmp}/inf.yaml: space.train.lr_main: Value error, uniform: both ends must be finite",
        2,
    ),
    (
        "integer to 10^30",
        ["tune", "--config", "{tmp}/cfg.yaml", "--trials", "1", "--search", "{tmp}/big.yaml"],
        {},
        "error: {tmp}/big.yaml: an integer of 31 digits",
        2,
    ),
    (
        "tampered dims",
        ["data", "check", "--store", "{tmp}/dims"],
        {},
        "error: {tmp}/dims: data check(s) failed: store: {tmp}/dims/manifest.json: field 'dims'",
        2,
    ),
    (
        "ids as numbers",
        ["data", "check", "--store", "{tmp}/ids"],
        {},
        "error: {tmp}/ids: data check(s) failed: store: {tmp}/ids/train/ids.json: expected a list",
        2,
    ),
]


@pytest.mark.parametrize(("what", "argv", "env", "line", "code"), ONE_LINE_CASES, ids=[c[0] for c in ONE_LINE_CASES])
def test_bad_input_is_one_line_naming_it(tmp_path, tiny_config, tiny_store, monkeypatch, what, argv, env, line, code):
    fill = {"tmp": str(tmp_path), "encoder": tiny_config.model.text_encoder}
    write(tmp_path / "cfg.yaml", yaml.safe_dump(tiny_config.model_dump()))
    write(tmp_path / "deep.yaml", "a: " + "[" * 5000 + "]" * 5000)
    write(tmp_path / "inf.yaml", "space:\n  train.lr_main: {uniform: [0, .inf]}\n")
    write(tmp_path / "big.yaml", f"space:\n  train.epochs: {{integer: [1, {10**30}]}}\n")
    write(tmp_path / "label.csv", "video_id,clip_id,text,label\n")
    tampered_store(tiny_store, tmp_path / "dims", lambda manifest, store: manifest.update(dims=5))
    tampered_store(tiny_store, tmp_path / "ids", lambda manifest, store: write(store / "train" / "ids.json", "[1, 2]"))
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(**fill))
    exit_code, _, err = run_mmim(*(part.format(**fill) for part in argv))
    assert exit_code == code and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(line.format(**fill)), err
    assert not (tmp_path / "no").exists()  # MLflow was never asked to create the sqlite directory
