"""The feature store: streaming writer round trip, batching, and errors naming file and field."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmim.cli import main
from mmim.core.batches import make_loader
from mmim.core.errors import MMIMInputError
from mmim.core.store import FeatureStore, sha256_of
from mmim.core.text_encoder import load_tokenizer, tokenize
from mmim.data.store_writer import PaddedSequences, SequenceList, SourceSplit, write_store
from mmim.data.synthetic import synthesize

WORDS = ["the movie was good", "the plot was not bad", "i watched it", "the acting was very dull and weak"]


def source_split(n, offset=0, audio_dim=5, vision_dim=20, seed=0):
    rng = np.random.default_rng(seed)
    return SourceSplit(
        origin="test.pkl",
        ids=[f"vid{offset + i}_{i}" for i in range(n)],
        texts=[WORDS[i % len(WORDS)] for i in range(n)],
        labels=np.linspace(-3, 3, n).astype(np.float32),
        audio=SequenceList(
            [rng.normal(size=(1 + (i * 7) % 13, audio_dim)).astype(np.float32) for i in range(n)], audio_dim
        ),
        vision=SequenceList(
            [rng.normal(size=(1 + (i * 5) % 11, vision_dim)).astype(np.float32) for i in range(n)], vision_dim
        ),
    )


def all_splits():
    return {"train": source_split(10), "valid": source_split(4, 100, seed=1), "test": source_split(4, 200, seed=2)}


@pytest.fixture
def write(tmp_path, tiny_encoder):
    tokenizer = load_tokenizer(tiny_encoder)

    def write(splits=None, name="store", **options):
        return write_store(
            tmp_path / name,
            splits or all_splits(),
            tokenizer,
            text_encoder=tiny_encoder,
            max_tokens=50,
            source="test",
            **options,
        )

    write.tokenizer = tokenizer
    return write


def test_round_trip_keeps_every_value(write):
    splits = all_splits()
    summary = write(splits)
    store = FeatureStore(summary.root)
    assert store.dims == {"audio": 5, "vision": 20} and summary.counts == {"train": 10, "valid": 4, "test": 4}
    for name, original in splits.items():
        loaded = store[name]
        assert loaded.ids == original.ids
        np.testing.assert_array_equal(loaded.labels, original.labels)
        for field, array in tokenize(write.tokenizer, original.texts, 50).items():
            np.testing.assert_array_equal(getattr(loaded, field), array)
        for i in range(len(original.ids)):
            np.testing.assert_array_equal(loaded.sequence("audio", i), original.audio[i])
            np.testing.assert_array_equal(loaded.sequence("vision", i), original.vision[i])
    assert isinstance(store["train"].audio, np.memmap)


def test_padded_sources_front_and_back(write):
    splits = all_splits()
    audio = np.zeros((4, 6, 5), dtype=np.float32)
    audio[0, 4:] = 1.0  # front padded, length 2
    audio[1, 1:] = 2.0  # length 5
    audio[2, :] = 3.0  # length 6
    audio[3, 5:] = np.array([1, np.nan, 2, -np.inf, 3])  # length 1, two non-finite values
    splits["valid"].audio = PaddedSequences(audio, np.array([2, 5, 6, 1]), "front")
    splits["test"].audio = PaddedSequences(np.ones((4, 6, 5), np.float32), np.array([0, 3, 6, 1]), "back")
    summary = write(splits)
    store = FeatureStore(summary.root)
    assert [len(store["valid"].sequence("audio", i)) for i in range(4)] == [2, 5, 6, 1]
    assert (store["valid"].sequence("audio", 2) == 3.0).all()
    np.testing.assert_array_equal(store["valid"].sequence("audio", 3), [[1, 0, 2, 0, 3]])
    assert summary.nonfinite_zeroed[("valid", "audio")] == 2
    # an empty sequence becomes one zero frame, as in the reference code
    np.testing.assert_array_equal(store["test"].sequence("audio", 0), np.zeros((1, 5)))
    assert summary.empty_padded[("test", "audio")] == 1


def test_nonfinite_fail_policy_names_example(write, tmp_path):
    splits = all_splits()
    splits["train"].audio.sequences[3][0, 1] = -np.inf
    with pytest.raises(
        MMIMInputError,
        match=r"test.pkl: split train, example 'vid3_3' \(index 3\), "
        r"field audio: 1 NaN/inf values",
    ):
        write(splits, nonfinite="fail")
    assert list(tmp_path.iterdir()) == []


def test_empty_text_is_dropped_with_its_reason(write):
    splits = all_splits()
    splits["train"].texts[2] = "   "
    summary = write(splits)
    assert summary.dropped == [("train", "vid2_2", "empty text")]
    assert "vid2_2" not in FeatureStore(summary.root)["train"].ids


def test_collate_pads_each_batch_to_its_own_longest(write):
    splits = all_splits()
    store = FeatureStore(write(splits).root)
    batch = next(iter(make_loader(store["train"], 4, shuffle=False)))
    audio_lengths = [len(a) for a in splits["train"].audio.sequences[:4]]
    assert batch.audio.shape == (4, max(audio_lengths), 5)
    assert batch.audio_lengths.tolist() == audio_lengths
    assert batch.input_ids.shape[1] == int(batch.attention_mask.sum(1).max()) < 50
    short = int(np.argmin(audio_lengths))
    assert (batch.audio[short, audio_lengths[short] :] == 0).all()
    np.testing.assert_array_equal(batch.audio[short, : audio_lengths[short]].numpy(), splits["train"].audio[short])


def _set_vision(splits):
    splits["valid"].vision = SequenceList([np.zeros((4, 19), np.float32)] * 4, 19)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_set_vision, "test.pkl: split valid, field vision: dim 19, but split train has 20"),
        (lambda s: s.pop("valid"), r"test.pkl: missing split\(s\) valid"),
        (
            lambda s: s["test"].ids.__setitem__(1, "vid0_0"),
            r"duplicate id 'vid0_0' \(split test, also in split train\)",
        ),
        (lambda s: s["train"].labels.__setitem__(0, 3.5), r"example 'vid0_0' \(index 0\), field labels: 3.5 is not"),
        (lambda s: s["train"].labels.__setitem__(1, np.nan), "field labels: nan is not a finite score"),
        (lambda s: s["train"].texts.pop(), "split train: texts has 9 entries for 10 ids"),
    ],
)
def test_write_rejects_bad_splits_and_leaves_nothing(write, tmp_path, damage, message):
    splits = all_splits()
    damage(splits)
    with pytest.raises(MMIMInputError, match=message):
        write(splits)
    assert list(tmp_path.iterdir()) == []


def test_truncated_array_is_named(write):
    root = write().root
    path = root / "train" / "audio.npy"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MMIMInputError, match="train/audio.npy: corrupt or truncated"):
        FeatureStore(root, verify_checksums=False)
    with pytest.raises(MMIMInputError, match="train/audio.npy: checksum mismatch"):
        FeatureStore(root)


def test_nan_in_an_array_is_found_even_with_a_matching_checksum(write):
    root = write().root
    path = root / "valid" / "vision.npy"
    values = np.load(path)
    values[5, 2] = np.inf
    np.save(path, values)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["valid"]["sha256"]["vision.npy"] = sha256_of(path)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MMIMInputError, match="valid/vision.npy: NaN or inf at row 5"):
        FeatureStore(root)


def test_missing_split_and_manifest_are_named(write):
    root = write().root
    shutil.rmtree(root / "test")
    with pytest.raises(MMIMInputError, match="test/.*: missing"):
        FeatureStore(root)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MMIMInputError, match=r"manifest.json: split 'test' missing \(has train, valid\)"):
        FeatureStore(root)
    (root / "manifest.json").unlink()
    with pytest.raises(MMIMInputError, match="manifest.json: missing"):
        FeatureStore(root)


def test_existing_store_is_not_overwritten_by_default(write):
    write()
    with pytest.raises(MMIMInputError, match="already exists"):
        write()


# ---------------------------------------------------------------- integrity of the manifest


def edit_manifest(root, edit):
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)


def test_emptied_checksums_do_not_switch_the_check_off(write):
    root = write().root
    flip_a_byte(root / "train" / "labels.npy")
    edit_manifest(root, lambda m: m["splits"]["train"]["sha256"].clear())
    with pytest.raises(
        MMIMInputError,
        match=r"train/input_ids.npy: no checksum in manifest.json "
        r"\(splits.train.sha256\)",
    ):
        FeatureStore(root)
    edit_manifest(
        root,
        lambda m: m["splits"]["train"]["sha256"].update(
            {name: sha256_of(root / "train" / name) for name in ("input_ids.npy", "attention_mask.npy")}
        ),
    )
    with pytest.raises(MMIMInputError, match="train/token_type_ids.npy: no checksum"):
        FeatureStore(root)


@pytest.mark.parametrize("field", ["sha256", "count"])
def test_missing_split_field_is_named(write, field):
    root = write().root
    edit_manifest(root, lambda m: m["splits"]["valid"].pop(field))
    with pytest.raises(MMIMInputError, match=rf"manifest.json: field 'splits.valid.{field}' missing"):
        FeatureStore(root, verify_checksums=False)


def rewrite_array(root, filename, change):
    """Change an array and record its new checksum, as someone editing the store would."""
    path = root / "train" / filename
    array = np.load(path)
    change(array)
    np.save(path, array)
    edit_manifest(root, lambda m: m["splits"]["train"]["sha256"].__setitem__(filename, sha256_of(path)))


def test_label_outside_the_range_is_named(write):
    root = write().root
    rewrite_array(root, "labels.npy", lambda labels: labels.__setitem__(4, 7.5))
    with pytest.raises(MMIMInputError, match=r"train/labels.npy: label 7.5 at row 4 outside \[-3.0, 3.0\]"):
        FeatureStore(root)


@pytest.mark.parametrize("token", [-1, 10_000])
def test_token_id_outside_the_vocabulary_is_named(write, token):
    root = write().root
    assert json.loads((root / "manifest.json").read_text())["vocab_size"] == len(write.tokenizer)
    rewrite_array(root, "input_ids.npy", lambda ids: ids.__setitem__((2, 1), token))
    with pytest.raises(
        MMIMInputError,
        match=rf"train/input_ids.npy: token id {token} at row 2 outside "
        rf"\[0, {len(write.tokenizer) - 1}\] \(vocab_size",
    ):
        FeatureStore(root)
    # A store written before vocab_size was recorded opens as before: the range is unknown.
    edit_manifest(root, lambda m: m.pop("vocab_size"))
    assert FeatureStore(root)["train"].input_ids[2, 1] == token


# ---------------------------------------------------------------- --out and --overwrite


def extract_synthetic(capsys, out, encoder, *extra):
    code = main(["extract", "--source", "synthetic", "--out", str(out), "--encoder", encoder, *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def small_synthetic(monkeypatch):
    """`--source synthetic` at a few examples per split, so an extraction takes no time."""
    sizes = {"train": 8, "valid": 4, "test": 4}
    monkeypatch.setattr("mmim.data.extract.synthesize", lambda seed: synthesize(seed, sizes))


def _precious_directory(out, write):
    out.mkdir()
    (out / "important.txt").write_text("precious")


def _store_with_a_stranger(out, write):
    write(name=out.name)
    (out / "important.txt").write_text("precious")


def _fake_manifest(out, write):
    out.mkdir()
    (out / "manifest.json").write_text('{"not": "a store"}')


@pytest.mark.parametrize("make", [_precious_directory, _store_with_a_stranger, _fake_manifest])
def test_overwrite_refuses_what_is_not_a_store(tmp_path, tiny_encoder, capsys, write, make):
    out = tmp_path / "d"
    make(out, write)
    before = sorted(p.name for p in out.iterdir())
    code, err = extract_synthetic(capsys, out, tiny_encoder, "--overwrite")
    assert code == 2 and f"{out}: not a feature store" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def _file(tmp_path, monkeypatch):
    (tmp_path / "out").write_text("a file")
    return tmp_path / "out"


def _link_to_a_store(tmp_path, monkeypatch):
    (tmp_path / "out").symlink_to(tmp_path / "store")
    return tmp_path / "out"


def _under_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file")
    return tmp_path / "file" / "out"


def _in_a_read_only_directory(tmp_path, monkeypatch):
    (tmp_path / "read-only").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: make access() answer as for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "read-only" and real_access(path, mode))
    return tmp_path / "read-only" / "out"


@pytest.mark.parametrize(
    "place, message",
    [
        (_file, "exists and is not a directory"),
        (_link_to_a_store, "is a symbolic link; refusing to replace it"),
        (_under_a_file, "is a file, not a directory"),
        (_in_a_read_only_directory, "cannot write in"),
    ],
)
def test_bad_out_is_one_line_and_exit_2(tmp_path, tiny_encoder, capsys, monkeypatch, write, place, message):
    kept = write(name="store").root
    manifest = (kept / "manifest.json").read_bytes()
    out = place(tmp_path, monkeypatch)
    code, err = extract_synthetic(capsys, out, tiny_encoder, "--overwrite")
    assert code == 2 and err.strip().startswith(f"error: {out}: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert (kept / "manifest.json").read_bytes() == manifest and FeatureStore(kept).manifest["source"] == "test"


@pytest.mark.parametrize("existing", ["store", "empty directory"])
def test_overwrite_replaces_a_store_or_an_empty_directory(
    tmp_path, tiny_encoder, capsys, write, small_synthetic, existing
):
    out = tmp_path / "d"
    write(name="d") if existing == "store" else out.mkdir()
    code, err = extract_synthetic(capsys, out, tiny_encoder, "--overwrite")
    assert code == 0, err
    assert FeatureStore(out).manifest["source"] == "synthetic" and len(FeatureStore(out)["train"]) == 8
