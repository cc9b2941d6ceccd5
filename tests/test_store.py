"""The feature store: round trip, batching, and errors that name the file or field."""

import json
import shutil

import numpy as np
import pytest

from mmim.data import make_loader
from mmim.errors import MMIMInputError
from mmim.store import FeatureStore, SplitData, _sha256, write_store


def split_data(n, offset=0, audio_dim=5, vision_dim=20, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 50), dtype=np.int32)
    mask = np.zeros((n, 50), dtype=np.int8)
    for i in range(n):
        length = 3 + i % 6
        tokens[i, :length] = rng.integers(5, 30, length)
        mask[i, :length] = 1
    return SplitData(
        ids=[f"vid{offset + i}_{i}" for i in range(n)],
        texts_tokenized={"input_ids": tokens, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)},
        audio=[rng.normal(size=(1 + (i * 7) % 13, audio_dim)).astype(np.float32) for i in range(n)],
        vision=[rng.normal(size=(1 + (i * 5) % 11, vision_dim)).astype(np.float32) for i in range(n)],
        labels=np.linspace(-3, 3, n).astype(np.float32))


def all_splits():
    return {"train": split_data(10), "valid": split_data(4, 100, seed=1), "test": split_data(4, 200, seed=2)}


def write(tmp_path, splits=None, name="store"):
    return write_store(tmp_path / name, splits or all_splits(), text_encoder="enc", max_tokens=50, source="test")


def test_round_trip_keeps_every_value(tmp_path):
    splits = all_splits()
    store = FeatureStore(write(tmp_path, splits))
    assert store.dims == {"audio": 5, "vision": 20} and store.text_encoder == "enc"
    for name, original in splits.items():
        loaded = store[name]
        assert loaded.ids == original.ids
        np.testing.assert_array_equal(loaded.labels, original.labels)
        for field, array in original.texts_tokenized.items():
            np.testing.assert_array_equal(getattr(loaded, field), array)
        for i in range(len(original.ids)):
            np.testing.assert_array_equal(loaded.sequence("audio", i), original.audio[i])
            np.testing.assert_array_equal(loaded.sequence("vision", i), original.vision[i])
    assert isinstance(store["train"].audio, np.memmap)


def test_collate_pads_each_batch_to_its_own_longest(tmp_path):
    splits = all_splits()
    store = FeatureStore(write(tmp_path, splits))
    batch = next(iter(make_loader(store["train"], 4, shuffle=False)))
    audio_lengths = [len(a) for a in splits["train"].audio[:4]]
    assert batch.audio.shape == (4, max(audio_lengths), 5)
    assert batch.audio_lengths.tolist() == audio_lengths
    assert batch.input_ids.shape[1] == max(3 + i % 6 for i in range(4))  # not 50
    short = int(np.argmin(audio_lengths))
    assert (batch.audio[short, audio_lengths[short]:] == 0).all()
    np.testing.assert_array_equal(batch.audio[short, :audio_lengths[short]].numpy(), splits["train"].audio[short])


def no_leftovers(tmp_path):
    return [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["train"].audio.__setitem__(3, np.full((2, 5), np.nan, np.float32)),
     r"split train, example 'vid3_3' \(index 3\), field audio: contains NaN or inf"),
    (lambda s: s["valid"].vision.__setitem__(0, np.zeros((4, 19), np.float32)),
     r"split valid, example 'vid100_0' \(index 0\), field vision: shape \(4, 19\), expected \(length, 20\)"),
    (lambda s: s["test"].audio.__setitem__(1, np.zeros((0, 5), np.float32)), "empty sequence"),
    (lambda s: s.pop("valid"), r"missing split\(s\) valid"),
    (lambda s: s["train"].ids.__setitem__(1, "vid0_0"), "duplicate id 'vid0_0'"),
    (lambda s: s["train"].labels.__setitem__(0, 3.5), "field labels: 3.5 is not a finite score"),
])
def test_write_rejects_bad_splits_and_leaves_nothing(tmp_path, damage, message):
    splits = all_splits()
    damage(splits)
    with pytest.raises(MMIMInputError, match=message):
        write(tmp_path, splits)
    assert no_leftovers(tmp_path)


def test_truncated_array_is_named(tmp_path):
    root = write(tmp_path)
    path = root / "train" / "audio.npy"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(MMIMInputError, match="train/audio.npy: corrupt or truncated"):
        FeatureStore(root, verify_checksums=False)
    with pytest.raises(MMIMInputError, match="train/audio.npy: checksum mismatch"):
        FeatureStore(root)


def test_nan_in_an_array_is_found_even_with_a_matching_checksum(tmp_path):
    root = write(tmp_path)
    path = root / "valid" / "vision.npy"
    values = np.load(path)
    values[5, 2] = np.inf
    np.save(path, values)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["valid"]["sha256"]["vision.npy"] = _sha256(path)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MMIMInputError, match="valid/vision.npy: NaN or inf at row 5"):
        FeatureStore(root)


def test_missing_split_and_manifest_are_named(tmp_path):
    root = write(tmp_path)
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


def test_existing_store_is_not_overwritten_by_default(tmp_path):
    write(tmp_path)
    with pytest.raises(MMIMInputError, match="already exists"):
        write(tmp_path)
