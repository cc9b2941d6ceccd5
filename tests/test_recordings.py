"""Recordings -> features on generated media: the extractor, the dataset job (in this process
and with Ray Data), its cache, bad and hostile input, and a served model scoring a recording."""

import sys
from pathlib import Path

import av
import numpy as np
import pytest

from mmim.core.store import FeatureStore
from mmim.data.recordings.extractor import ClipExtractor, ExtractorSettings, IsolatedExtractor
from mmim.data.recordings.job import extract_recordings
from mmim.data.recordings.layout import hash_split, read_dataset
from mmim.data.recordings.media import MediaError
from mmim.data.recordings.sample import write_blank_clip, write_face_clip, write_voice
from tests.helpers import face_clips, free_port, good_rows, rest_contract_holds, run_mmim, start, write_dataset

SETTINGS = ExtractorSettings()  # the defaults: eGeMAPSv02 at 50 Hz, faces at 15 fps


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    write_face_clip(directory / "face.mp4", seconds=2.0, label=1.5, seed=1)
    write_blank_clip(directory / "blank.mp4", seconds=2.0, seed=2)
    write_voice(directory / "voice.wav", seconds=1.3, label=-1.0, seed=3)
    return directory


@pytest.fixture(scope="module")
def extractor() -> ClipExtractor:
    return ClipExtractor(SETTINGS)


# ---------------------------------------------------------------- one clip


def test_faces_are_found_in_a_face_clip_and_never_in_a_blank_one(media, extractor):
    face, blank = extractor(media / "face.mp4"), extractor(media / "blank.mp4")
    assert face.vision.shape == (30, 150)  # 2 s at 15 fps
    assert face.vision[:, 0].mean() >= 0.9  # the face-found flag
    assert blank.vision[:, 0].sum() == 0 and not blank.vision.any()  # no face: zero vectors


@pytest.mark.parametrize("rate", [50.0, 30.0])
def test_audio_frames_are_finite_at_the_configured_rate(media, rate):
    extract = ClipExtractor(ExtractorSettings(audio_rate=rate))
    whole, span = extract(media / "voice.wav"), extract(media / "face.mp4", 0.25, 1.65)
    for features, seconds in ((whole, 1.3), (span, 1.4)):
        assert features.audio.shape[1] == 25 and np.isfinite(features.audio).all()
        assert abs(len(features.audio) - seconds * rate) <= 1
    # an audio-only file: one zero vision frame, face-found flag 0
    assert whole.vision.shape == (1, 150) and not whole.vision.any()


def faststart_copy(source: Path, target: Path) -> Path:
    """`source` remuxed with its index first (as streaming sites serve MP4), so that a cut copy
    still opens and decodes up to the cut."""
    with av.open(str(source)) as reader, av.open(str(target), "w", options={"movflags": "faststart"}) as writer:
        streams = {stream.index: writer.add_stream_from_template(stream) for stream in reader.streams}
        for packet in reader.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                writer.mux(packet)
    return target


def test_hostile_media_is_refused_with_a_reason(media, tmp_path):
    playlist = tmp_path / "clip.mp4"  # a "video" that would make FFmpeg open other files
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    whole = faststart_copy(media / "face.mp4", tmp_path / "whole.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])  # opens, says 2 s, holds half of that
    silent = write_face_clip(tmp_path / "silent.mp4", seconds=1.0, audio=False)
    face = media / "face.mp4"  # 2 s
    cases = [
        (playlist, SETTINGS, None, "unsupported format"),
        (cut, SETTINGS, None, "truncated"),
        (silent, SETTINGS, None, "no audio stream"),
        (face, SETTINGS, (1.5, 5.0), "span outside the file"),
        (face, SETTINGS, (1.0, 1.05), "zero-length clip"),
        (face, ExtractorSettings(max_seconds=1.5), None, "too long"),
        (face, ExtractorSettings(max_pixels=320 * 100), None, "frames too large"),
    ]
    for path, settings, span, reason in cases:
        with pytest.raises(MediaError) as refused:
            ClipExtractor(settings)(path, *(span or ()))
        assert refused.value.reason == reason


def test_a_crashed_or_hung_extractor_process_costs_one_clip(media):
    with IsolatedExtractor(SETTINGS) as extract:
        assert extract(media / "voice.wav").audio.shape == (65, 25)
        extract._child.kill()  # as a decoder crash would end it (SIGSEGV, SIGABRT, the OOM killer)
        with pytest.raises(MediaError, match="decoder crashed"):
            extract(media / "voice.wav")
        assert extract(media / "voice.wav").audio.shape == (65, 25)  # a new child took over
    with IsolatedExtractor(ExtractorSettings(clip_timeout=0.01)) as extract:
        with pytest.raises(MediaError, match="timed out"):
            extract(media / "face.mp4")


# ---------------------------------------------------------------- a dataset


def test_splits_come_from_mode_else_the_video_else_a_stable_hash(media, tmp_path):
    rows = [
        {"video_id": "a", "clip_id": "1", "text": "x", "label": "0", "mode": "test"},
        {"video_id": "a", "clip_id": "2", "text": "x", "label": "0"},  # a's other clip: test
        {"video_id": "b", "clip_id": "1", "text": "x", "label": "0"},
    ]  # hashed
    root = write_dataset(
        tmp_path / "d",
        rows,
        {"a/1.wav": media / "voice.wav", "a/2.wav": media / "voice.wav", "b/1.wav": media / "voice.wav"},
    )
    clips, rejected = read_dataset(root)
    assert not rejected and [clip.split for clip in clips] == ["test", "test", hash_split("b")]
    # more data never moves a video: b keeps its split when other videos arrive
    more = rows + [{"video_id": f"n{i}", "clip_id": "1", "text": "x", "label": "0"} for i in range(20)]
    write_dataset(root, more, {f"n{i}/1.wav": media / "voice.wav" for i in range(20)})
    assert read_dataset(root)[0][2].split == hash_split("b")
    assert {clip.split for clip in read_dataset(root)[0]} == {"train", "valid", "test"}


def test_extraction_is_incremental_and_skips_bad_clips_by_reason(media, tmp_path, tiny_encoder):
    files = face_clips(tmp_path / "made", 6)
    rows, clips = good_rows(files[:3])
    truncated = tmp_path / "made" / "cut.mp4"
    truncated.write_bytes((media / "face.mp4").read_bytes()[:20_000])
    rows += [
        {"video_id": "v0", "clip_id": "cut", "text": "fine", "label": "1", "mode": "train"},
        {"video_id": "v0", "clip_id": "voice", "text": "fine", "label": "-1", "mode": "train"},
        {"video_id": "v0", "clip_id": "gone", "text": "fine", "label": "0", "mode": "train"},
        {"video_id": "v1", "clip_id": "2", "text": "again", "label": "abc", "mode": "valid"},
    ]
    clips |= {"v0/cut.mp4": truncated, "v0/voice.wav": media / "voice.wav"}
    root = write_dataset(tmp_path / "data", rows, clips)

    def run(**options):
        return extract_recordings(
            root,
            tmp_path / "store",
            tiny_encoder,
            SETTINGS,
            cache_dir=tmp_path / "cache",
            max_tokens=16,
            workers=0,
            overwrite=True,
            **options,
        )

    first = run()
    assert (first.extracted, first.cached) == (4, 0)  # 3 faces and the audio-only file; the cut file failed
    reasons = sorted(rejected.reason for rejected in first.skipped)
    assert reasons == ["bad label or span", "missing file", "unreadable media"]
    store = FeatureStore(tmp_path / "store")
    assert store.manifest["dropped"] == {"bad label or span": 1, "missing file": 1, "unreadable media": 1}
    assert store.manifest["extractor"]["settings"]["video_fps"] == 15.0
    assert len(store["train"]) == 2 and "v0_voice" in store["train"].ids

    again = run()
    assert (again.extracted, again.cached) == (0, 4)  # nothing new: nothing extracted
    more, more_clips = good_rows(files[3:], start=3)
    write_dataset(root, rows + more, clips | more_clips)
    assert run().extracted == 3  # only the new clips

    # --on-error fail: exit 2 naming the file and clip, and no store
    code, _, err = run_mmim(
        "extract",
        "--source",
        "recordings",
        "--input",
        str(root),
        "--out",
        str(tmp_path / "strict"),
        "--encoder",
        tiny_encoder,
        "--cache",
        str(tmp_path / "cache"),
        "--workers",
        "0",
        "--on-error",
        "fail",
    )
    assert code == 2 and "label.csv line" in err and "(--on-error fail; no store written)" in err
    assert not (tmp_path / "strict").exists()


@pytest.mark.service
def test_ray_data_workers_give_the_in_process_features(ray_cluster, media, extractor, tmp_path, tiny_encoder):
    files = face_clips(tmp_path / "made", 3) + [media / "blank.mp4"]
    rows, clips = good_rows(files)
    root = write_dataset(tmp_path / "data", rows, clips)
    summary = extract_recordings(
        root, tmp_path / "store", tiny_encoder, SETTINGS, cache_dir=tmp_path / "cache", max_tokens=16, workers=2
    )
    assert summary.extracted == 4 and not summary.skipped
    store = FeatureStore(tmp_path / "store")
    for name in ("train", "valid", "test"):
        for index, clip_id in enumerate(store[name].ids):
            expected = extractor(root / "Raw" / clip_id.split("_")[0] / "1.mp4")
            assert np.array_equal(store[name].sequence("audio", index), expected.audio)
            assert np.array_equal(store[name].sequence("vision", index), expected.vision)


# ---------------------------------------------------------------- the champion over REST


@pytest.mark.service
def test_the_registered_champion_over_rest_answers_like_predict(recordings_champion):
    """MLflow's scoring server through `mmim serve` (the installed console script, without its
    environment on PATH; MLflow on sqlite, no other service): the session's champion, trained on
    recordings, answers features, records and base64 recordings as `mmim predict` does, and
    refuses bad bodies with the status the contract names."""
    champion = recordings_champion
    port = free_port()
    server = start(
        [str(Path(sys.executable).parent / "mmim"), "serve", "--model", champion.uri, "--port", str(port)]
        + ["--max-request-mb", "0.5"],
        f"http://127.0.0.1:{port}/ping",
        env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": champion.tracking_uri},
    )
    try:
        rest_contract_holds(port, champion)
    finally:
        server.terminate()
        server.wait(timeout=30)
