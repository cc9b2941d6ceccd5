"""Extraction from small files in each real schema: MulT, MMSA, CMU-SDK .csd, and bad inputs."""

import csv
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mmim.cli import main
from mmim.core.errors import MMIMInputError
from mmim.core.store import FeatureStore
from mmim.core.text_encoder import load_tokenizer, tokenize
from mmim.data.extract import extract
from mmim.data.synthetic import synthesize, write_synthetic_raw
from mmim.data.untrusted_pickle import load_untrusted_pickle

SPLIT_SIZES = {"train": 4, "valid": 2, "test": 3}
WORDS = [
    "the movie was good",
    "the plot was terrible",
    "i watched it last weekend",
    "the acting was not bad",
    "the story was very boring",
    "it is about a family",
    "the music was amazing",
    "the ending was dull",
    "the cast was nice",
]


def ragged_examples(seed=0):
    """Per split: ids, texts, labels and ragged (length, dim) audio/vision."""
    rng = np.random.default_rng(seed)
    examples, n = {}, 0
    for name, size in SPLIT_SIZES.items():
        rows = []
        for _ in range(size):
            audio = rng.normal(size=(int(rng.integers(1, 7)), 5)).astype(np.float32) + 0.5
            vision = rng.normal(size=(int(rng.integers(1, 9)), 20)).astype(np.float32) + 0.5
            rows.append(
                {
                    "video": f"vid{n // 2:03d}",
                    "clip": str(n % 2 + 1),
                    "text": WORDS[n],
                    "label": float(np.round(rng.uniform(-3, 3), 1)),
                    "audio": audio,
                    "vision": vision,
                }
            )
            n += 1
        examples[name] = rows
    return examples


def pad(sequences, frames, front):
    out = np.zeros((len(sequences), frames, sequences[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(sequences):
        if front:
            out[i, frames - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def write_mult_files(directory, examples, id_style="bytes"):
    directory.mkdir(parents=True, exist_ok=True)
    data, rows = {}, []
    for name, split in examples.items():
        ids = [f"{e['video']}_{e['clip']}" for e in split]
        data[name] = {
            "text": np.zeros((len(split), 50, 300), dtype=np.float32),  # GloVe, not read
            "audio": pad([e["audio"] for e in split], 8, front=True),
            "vision": pad([e["vision"] for e in split], 10, front=True),
            "labels": np.array([e["label"] for e in split], dtype=np.float32).reshape(-1, 1, 1),
            "id": np.array([[i.encode()] for i in ids]) if id_style == "bytes" else np.array([[i] for i in ids]),
        }
        rows += [(e["video"], e["clip"], e["text"]) for e in split]
    (directory / "mosi_data_noalign.pkl").write_bytes(pickle.dumps(data, protocol=4))
    with open(directory / "MOSI-label.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "clip_id", "text", "label", "annotation", "mode"])
        writer.writerows([(v, c, t, 0.0, "Neutral", "train") for v, c, t in rows])
    return directory


def assert_store_matches(store_dir, examples, tokenizer, audio_override=None):
    store = FeatureStore(store_dir)
    for name, split in examples.items():
        loaded = store[name]
        assert loaded.ids == [f"{e['video']}_{e['clip']}" for e in split]
        np.testing.assert_allclose(loaded.labels, [e["label"] for e in split], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(
            loaded.input_ids, tokenize(tokenizer, [e["text"] for e in split], 50)["input_ids"]
        )
        for i, e in enumerate(split):
            expected_audio = audio_override(name, i, e["audio"]) if audio_override else e["audio"]
            np.testing.assert_array_equal(loaded.sequence("audio", i), expected_audio)
            np.testing.assert_array_equal(loaded.sequence("vision", i), e["vision"])


@pytest.mark.parametrize("id_style", ["bytes", "str"])
def test_mult_round_trip(tmp_path, tiny_encoder, id_style):
    examples = ragged_examples()
    source = write_mult_files(tmp_path / "mosi", examples, id_style)
    summary = extract("mult", source, tmp_path / "store", tiny_encoder)
    assert summary.counts == SPLIT_SIZES and summary.dims == {"audio": 5, "vision": 20}
    assert_store_matches(summary.root, examples, load_tokenizer(tiny_encoder))


def test_the_synthetic_sample_has_the_release_schema_and_reads_back(tmp_path, tiny_encoder):
    sizes = {"train": 6, "valid": 3, "test": 4}
    source = write_synthetic_raw(tmp_path / "synthetic", seed=0, sizes=sizes)
    written = load_untrusted_pickle(source / "synthetic_data_noalign.pkl")  # as the reader loads it
    release = pickle.loads(
        (write_mult_files(tmp_path / "mosi", ragged_examples()) / "mosi_data_noalign.pkl").read_bytes()
    )
    assert set(written) == set(release) == {"train", "valid", "test"}
    for name, size in sizes.items():
        split = written[name]
        assert set(split) == set(release[name]) == {"text", "audio", "vision", "labels", "id"}
        assert split["text"].shape == (size, 50, 300) and split["text"].dtype == np.float32  # GloVe words
        for field, array in split.items():  # as many rows as examples, the release's ranks and kinds
            assert len(array) == size, field
            assert (array.ndim, array.dtype.kind) == (release[name][field].ndim, release[name][field].dtype.kind)

    summary = extract("mult", source, tmp_path / "store", tiny_encoder)
    assert summary.counts == sizes
    store, tokenizer, splits = FeatureStore(summary.root), load_tokenizer(tiny_encoder), synthesize(0, sizes)
    for name, split in splits.items():  # the words come from the label CSV, not from `text`
        assert store[name].ids == split.ids
        np.testing.assert_array_equal(store[name].input_ids, tokenize(tokenizer, split.texts, 50)["input_ids"])
        np.testing.assert_allclose(store[name].labels, split.labels, rtol=0, atol=1e-6)


def test_mmsa_round_trip_with_minus_inf(tmp_path, tiny_encoder):
    examples = ragged_examples(seed=1)
    examples["train"][1]["audio"][0, 2] = -np.inf  # COVAREP has -inf
    data = {}
    for name, split in examples.items():
        data[name] = {
            "raw_text": np.array([e["text"] for e in split], dtype=object),
            "audio": pad([e["audio"] for e in split], 8, front=False),
            "vision": pad([e["vision"] for e in split], 10, front=False),
            "audio_lengths": np.array([len(e["audio"]) for e in split]),
            "vision_lengths": np.array([len(e["vision"]) for e in split]),
            "id": np.array([f"{e['video']}$_${e['clip']}" for e in split], dtype=object),
            "regression_labels": np.array([e["label"] for e in split], dtype=np.float32),
            "text_bert": np.zeros((len(split), 3, 50)),
            "classification_labels": np.zeros(len(split)),
        }
    (tmp_path / "unaligned_50.pkl").write_bytes(pickle.dumps(data, protocol=4))
    summary = extract("mmsa", tmp_path / "unaligned_50.pkl", tmp_path / "store", tiny_encoder)
    assert summary.nonfinite_zeroed[("train", "audio")] == 1

    def zeroed(name, index, audio):
        return np.where(np.isfinite(audio), audio, 0.0) if (name, index) == ("train", 1) else audio

    assert_store_matches(summary.root, examples, load_tokenizer(tiny_encoder), zeroed)


def write_csd(path, root, videos):
    with h5py.File(path, "w") as handle:
        data = handle.create_group(root).create_group("data")
        handle[root].create_group("metadata")
        for video, (features, intervals) in videos.items():
            group = data.create_group(video)
            group.create_dataset("features", data=features)
            group.create_dataset("intervals", data=intervals)


def write_csd_sample(source, examples):
    """The four .csd files and folds.json of `examples` in `source`."""
    per_video = {}
    for split in examples.values():
        for e in split:
            per_video.setdefault(e["video"], []).append(e)
    words, audio, vision, labels = {}, {}, {}, {}
    for video, segments in per_video.items():
        w, wi, a, ai, v, vi, lab, li = [], [], [], [], [], [], [], []
        for k, e in enumerate(segments):
            start = 10.0 * k  # segment k spans [start, start + 8]
            lab.append([e["label"]])
            li.append([start, start + 8.0])
            tokens = e["text"].split()
            for j, token in enumerate(tokens + ["sp"]):  # a speech pause that must not reach the text
                w.append([token.encode()])
                wi.append([start + j * 0.5, start + j * 0.5 + 0.4])
            a += list(e["audio"])
            ai += [[start + j * 0.1, start + j * 0.1 + 0.1] for j in range(len(e["audio"]))]
            v += list(e["vision"])
            vi += [[start + j * 0.2, start + j * 0.2 + 0.2] for j in range(len(e["vision"]))]
        a.append(np.full(5, 9.0, np.float32))
        ai.append([9.0, 9.2])  # a frame between segments: ignored
        words[video] = (np.array(w), np.array(wi))
        audio[video] = (np.array(a, np.float32), np.array(ai))
        vision[video] = (np.array(v, np.float32), np.array(vi))
        labels[video] = (np.array(lab, np.float32), np.array(li))
    source.mkdir()
    write_csd(source / "CMU_MOSI_TimestampedWords.csd", "words", words)
    write_csd(source / "CMU_MOSI_COVAREP.csd", "COVAREP", audio)
    write_csd(source / "CMU_MOSI_Visual_Facet_41.csd", "FACET", vision)
    write_csd(source / "CMU_MOSI_Opinion_Labels.csd", "labels", labels)
    folds = {name: sorted({e["video"] for e in split}) for name, split in examples.items()}
    (source / "folds.json").write_text(json.dumps(folds))
    return source


def test_csd_round_trip_aligns_segments(tmp_path, tiny_encoder):
    examples = ragged_examples(seed=2)
    source = write_csd_sample(tmp_path / "csd", examples)
    summary = extract("csd", source, tmp_path / "store", tiny_encoder)
    assert_store_matches(summary.root, examples, load_tokenizer(tiny_encoder))


def point_words_elsewhere(words_file, secrets, how):
    """Replace the first video's word features by data that lives outside the .csd file."""
    with h5py.File(words_file, "a") as handle:
        group = handle["words/data"][sorted(handle["words/data"])[0]]
        size = group["features"].shape[0]
        del group["features"]
        if how == "external_link":
            with h5py.File(secrets.with_suffix(".h5"), "w") as other:
                other.create_dataset("secret", data=np.array([[b"hunter2"]] * size))
            group["features"] = h5py.ExternalLink(str(secrets.with_suffix(".h5")), "/secret")
        elif how == "external_storage":
            group.create_dataset("features", shape=(size, 1), dtype="S8", external=[(str(secrets), 0, 8 * size)])
        elif how == "virtual":
            with h5py.File(secrets.with_suffix(".h5"), "w") as other:
                other.create_dataset("secret", data=np.array([[b"hunter2"]] * size))
            layout = h5py.VirtualLayout(shape=(size, 1), dtype="S7")
            layout[:] = h5py.VirtualSource(str(secrets.with_suffix(".h5")), "secret", shape=(size, 1))
            group.create_virtual_dataset("features", layout)
        else:
            group["features"] = h5py.SoftLink("/words/data")


@pytest.mark.parametrize("how", ["external_link", "external_storage", "virtual", "soft_link"])
def test_csd_data_from_other_files_is_refused(tmp_path, tiny_encoder, how):
    source = write_csd_sample(tmp_path / "csd", ragged_examples(seed=2))
    secrets = tmp_path / "secrets.txt"
    secrets.write_bytes(b"hunter2 " * 64)
    point_words_elsewhere(source / "CMU_MOSI_TimestampedWords.csd", secrets, how)
    with pytest.raises(MMIMInputError, match=r"CMU_MOSI_TimestampedWords\.csd: /words/data/vid000/features"):
        extract("csd", source, tmp_path / "store", tiny_encoder)
    assert not (tmp_path / "store").exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def extract_cli(capsys, source, out, encoder, *extra):
    code = main(
        ["extract", "--source", "mult", "--input", str(source), "--out", str(out), "--encoder", encoder, *extra]
    )
    return code, capsys.readouterr().err


def test_hostile_pickle_is_refused_without_running(tmp_path, tiny_encoder, capsys):
    source = write_mult_files(tmp_path / "mosi", ragged_examples())
    marker = tmp_path / "pwned"
    (source / "mosi_data_noalign.pkl").write_bytes(pickle.dumps({"train": Payload(marker)}))
    code, err = extract_cli(capsys, source, tmp_path / "store", tiny_encoder)
    assert code == 2 and "refused global posix.system" in err and not marker.exists()
    assert not (tmp_path / "store").exists()
    with pytest.raises(MMIMInputError, match="refused global"):
        load_untrusted_pickle(source / "mosi_data_noalign.pkl")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated or not a valid pickle"),
        ("missing_split", "split 'valid' missing (has train, test)"),
        ("dims", "split valid, field vision: dim 19, but split train has 20"),
        ("csv_id", "example 'vid000_1' (index 0 over all splits) has no row in"),
    ],
)
def test_bad_sources_exit_2_and_leave_nothing(tmp_path, tiny_encoder, capsys, damage, message):
    source = write_mult_files(tmp_path / "mosi", ragged_examples())
    pickle_path = source / "mosi_data_noalign.pkl"
    if damage == "truncate":
        pickle_path.write_bytes(pickle_path.read_bytes()[:5000])
    elif damage in ("missing_split", "dims"):
        data = pickle.loads(pickle_path.read_bytes())
        if damage == "missing_split":
            del data["valid"]
        else:
            data["valid"]["vision"] = data["valid"]["vision"][:, :, :19]
        pickle_path.write_bytes(pickle.dumps(data, protocol=4))
    else:
        lines = (source / "MOSI-label.csv").read_text().splitlines()
        (source / "MOSI-label.csv").write_text("\n".join([lines[0]] + lines[2:]) + "\n")
    code, err = extract_cli(capsys, source, tmp_path / "out" / "store", tiny_encoder)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_row_order_fallback_checks_video_ids(tmp_path, tiny_encoder):
    """Ids without clip numbers (as some MOSEI pickles have) are matched by row, and checked."""
    examples = ragged_examples()
    source = write_mult_files(tmp_path / "mosei", examples)
    data = pickle.loads((source / "mosi_data_noalign.pkl").read_bytes())
    for name, split in examples.items():
        data[name]["id"] = np.array([[e["video"].encode()] for e in split])
    (source / "mosi_data_noalign.pkl").write_bytes(pickle.dumps(data, protocol=4))
    summary = extract("mult", source, tmp_path / "store", tiny_encoder)
    store = FeatureStore(summary.root)
    np.testing.assert_array_equal(
        store["test"].input_ids,
        tokenize(load_tokenizer(tiny_encoder), [e["text"] for e in examples["test"]], 50)["input_ids"],
    )
    lines = (source / "MOSI-label.csv").read_text().splitlines()
    lines[1], lines[3] = lines[3], lines[1]  # swap rows of two different videos
    (source / "MOSI-label.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MMIMInputError, match="pickle and CSV disagree"):
        extract("mult", source, tmp_path / "store2", tiny_encoder)


# ---------------------------------------------------------------- crafted pickles: numpy state from the file


class Reduced:
    """Pickles as the call `function(*arguments)` followed by BUILD with `state`."""

    def __init__(self, function, arguments, state=None):
        self.reduced = (function, arguments) if state is None else (function, arguments, state)

    def __reduce__(self):
        return self.reduced


def object_field_dtype():
    """A structured dtype whose one field holds objects, with flags 0: numpy then reads the
    array's raw bytes as object pointers (memory corruption on first access)."""
    return Reduced(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


def attacker_array(dtype):
    return Reduced(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), dtype, False, b"A" * 16))


@pytest.mark.parametrize("source", ["mult", "mmsa"])
def test_dtype_state_from_the_file_never_reaches_numpy(tmp_path, tiny_encoder, source):
    """Run as a separate process: a regression is a crash (exit 139), not a dead test run."""
    source_dir = write_mult_files(tmp_path / "mosi", ragged_examples())
    path = source_dir / ("mosi_data_noalign.pkl" if source == "mult" else "unaligned_50.pkl")
    data = pickle.loads((source_dir / "mosi_data_noalign.pkl").read_bytes())
    data["train"]["id" if source == "mult" else "raw_text"] = attacker_array(object_field_dtype())
    path.write_bytes(pickle.dumps(data, protocol=2))
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "mmim"),
            "extract",
            "--source",
            source,
            "--input",
            str(path),
            "--out",
            str(tmp_path / "store"),
            "--encoder",
            tiny_encoder,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "refused dtype 'V8'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "crafted, message",
    [
        (Reduced(bytearray, (2**31,)), "refused bytearray(2147483648)"),
        (Reduced(bytes, (2**31,)), "refused bytes(2147483648)"),
        (
            attacker_array(Reduced(np.dtype, ("f8", False, True), (3, "<", None, ("a",), {}, 8, 1, 0x3F))),
            "refused dtype with fields",
        ),
        (
            attacker_array(Reduced(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 63))),
            "refused object array whose elements do not match its shape",
        ),
        (
            attacker_array(Reduced(np.dtype, ("f4", False, True), (3, "<", None, None, None, -1, -1, 0))),
            "refused array: 16 bytes for shape (2,) of float32",
        ),
        (Reduced(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b")), "refused array without data"),
        (Reduced(np._core.multiarray._reconstruct, (dict, (0,), b"b")), "refused _reconstruct of anything but"),
    ],
)
def test_crafted_numpy_state_is_refused(tmp_path, crafted, message):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(pickle.dumps({"train": crafted}, protocol=2))
    with pytest.raises(MMIMInputError, match=re.escape(message)):
        load_untrusted_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_arrays_round_trip_through_the_stand_ins(tmp_path, protocol):
    arrays = {
        "f4": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.ones((3, 2))),
        "big_endian": np.arange(3, dtype=">i4"),
        "unicode": np.array([["ab"], ["c"]]),
        "bytes": np.array([b"x", b"yz"]),
        "objects": np.array(["a", b"b", np.float32(2.5)], dtype=object),
        "nested": np.array([np.zeros(2), np.ones(3)], dtype=object),
        "scalar": np.float64(1.25),
    }
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    loaded = load_untrusted_pickle(path)
    for name, array in arrays.items():
        if name == "nested":
            assert all(np.array_equal(a, b) for a, b in zip(loaded[name], array, strict=True))
        else:
            assert np.array_equal(loaded[name], array) and loaded[name].dtype == array.dtype, name
    assert type(loaded["nested"][0]) is np.ndarray and loaded["fortran"].flags.f_contiguous
    path.write_bytes(pickle.dumps({"dtype": np.dtype("int16")}, protocol=protocol))
    assert load_untrusted_pickle(path)["dtype"] == np.dtype("int16")


# ---------------------------------------------------------------- empty splits, text where numbers belong


def run_extract(capsys, source, path, out, encoder):
    """(exit code, stderr) of `mmim extract --source SOURCE --input PATH`."""
    code = main(["extract", "--source", source, "--input", str(path), "--out", str(out), "--encoder", encoder])
    return code, capsys.readouterr().err


def mult_as_mmsa(source):
    """The MulT sample's pickle rewritten as an MMSA pickle (for errors only: the padding differs)."""
    data = pickle.loads((source / "mosi_data_noalign.pkl").read_bytes())
    for split in data.values():
        split["raw_text"] = np.array(["the movie was good"] * len(split["id"]), dtype=object)
        split["regression_labels"] = split.pop("labels").reshape(-1)
    path = source / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


@pytest.mark.parametrize(
    "source, field, damage, message",
    [
        ("mult", "labels", "empty", "split valid has no examples"),
        ("mult", "labels", "text", "split train, field labels: values of type <U8, expected numbers"),
        ("mult", "labels", "objects", "split train, field labels: values of type object, expected numbers"),
        (
            "mmsa",
            "regression_labels",
            "text",
            "split train, field regression_labels: values of type <U8, expected numbers",
        ),
    ],
)
def test_pickle_with_an_empty_split_or_text_labels_is_one_line(
    tmp_path, tiny_encoder, capsys, source, field, damage, message
):
    mult_dir = write_mult_files(tmp_path / "mosi", ragged_examples())
    path = mult_dir / "mosi_data_noalign.pkl" if source == "mult" else mult_as_mmsa(mult_dir)
    data = pickle.loads(path.read_bytes())
    if damage == "empty":  # every array of the split with 0 rows
        data["valid"] = {key: value[:0] for key, value in data["valid"].items()}
    elif damage == "text":  # numbers as text ("-1.5"): read as numbers before
        data["train"][field] = data["train"][field].astype("U8")
    else:  # a traceback before
        data["train"][field] = np.full(data["train"][field].shape, "x", dtype=object)
    path.write_bytes(pickle.dumps(data, protocol=4))
    code, err = run_extract(capsys, source, path, tmp_path / "store", tiny_encoder)
    assert (code, err.strip()) == (2, f"error: {path}: {message}")
    assert not (tmp_path / "store").exists()


def features_as_text(csd_file, video, text):
    """Replace a video's features in a .csd file by `text` in every cell (same shape)."""
    with h5py.File(csd_file, "a") as handle:
        group = handle[next(iter(handle))]["data"][video]
        shape = group["features"].shape
        del group["features"]
        group.create_dataset("features", data=np.full(shape, text))


@pytest.mark.parametrize("file", ["CMU_MOSI_COVAREP.csd", "CMU_MOSI_Visual_Facet_41.csd"])
@pytest.mark.parametrize("text", [b"1.5", b"abc"])  # read as 1.5 before; a traceback
def test_csd_bytes_features_are_one_line(tmp_path, tiny_encoder, capsys, file, text):
    source = write_csd_sample(tmp_path / "csd", ragged_examples(seed=2))
    features_as_text(source / file, "vid001", text)
    code, err = run_extract(capsys, "csd", source, tmp_path / "store", tiny_encoder)
    assert code == 2
    assert err.strip() == f"error: {source / file}: video 'vid001', features: values of type |S3, expected numbers"


def test_csd_split_without_segments_is_one_line(tmp_path, tiny_encoder, capsys):
    """Not "features of different dims across videos: []"."""
    source = write_csd_sample(tmp_path / "csd", ragged_examples(seed=2))
    labels = source / "CMU_MOSI_Opinion_Labels.csd"
    with h5py.File(labels, "a") as handle:  # the valid fold's one video has no labelled segment
        group = handle["labels/data/vid002"]
        del group["features"], group["intervals"]
        group.create_dataset("features", data=np.zeros((0, 1), np.float32))
        group.create_dataset("intervals", data=np.zeros((0, 2)))
    code, err = run_extract(capsys, "csd", source, tmp_path / "store", tiny_encoder)
    assert code == 2
    assert err.strip() == f"error: {labels}: split valid has no examples (no labelled segments in its 1 fold video(s))"


def test_extract_prints_one_line_unless_something_was_repaired(tmp_path, tiny_encoder, capsys):
    def extract(source, store):
        main(["extract", "--source", "mult", "--input", str(source), "--out", str(store), "--encoder", tiny_encoder])

    examples = ragged_examples()
    source = write_mult_files(tmp_path / "clean", examples)
    extract(source, tmp_path / "clean-store")
    out = capsys.readouterr().out
    assert "train 4, valid 2, test 3 examples, dims audio 5, vision 20; nothing dropped, zeroed or padded" in out
    assert "NaN/inf zeroed" not in out
    examples["valid"][0]["audio"][0, 1] = np.nan
    source = write_mult_files(tmp_path / "with-nan", examples)
    extract(source, tmp_path / "nan-store")
    out = capsys.readouterr().out
    assert "NaN/inf zeroed" in out and "nothing dropped" not in out  # the table, with its counts
