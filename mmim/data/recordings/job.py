"""A recordings dataset -> a feature store, extracted on a Ray cluster, only for new clips.

    read label.csv (layout.py) -> key every clip (cache.py) -> extract the clips not in
    the cache with Ray Data (a pool of extractor actors, one CPU each) -> write the store
    from the cache, in clip order, with the same writer as every other source.

Ray Data streams results back as workers finish them; the driver puts each in the cache
at once, so memory holds a few clips, not the dataset. `workers=0` extracts in this
process instead (still in a child process per clip stream, as untrusted media must be).

A clip that cannot be used is skipped and counted by reason (`on_error="skip"`, the
default), or stops the job before any store is written (`on_error="fail"`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import writing
from mmim.core.store import SPLITS
from mmim.core.text_encoder import load_tokenizer
from mmim.data.recordings.cache import FeatureCache
from mmim.data.recordings.extractor import ClipFeatures, ExtractorSettings, IsolatedExtractor, describe_extractor
from mmim.data.recordings.layout import LABELS_FILE, Clip, Rejected, read_dataset
from mmim.data.recordings.media import MediaError
from mmim.data.store_writer import ExtractionSummary, NonFinitePolicy, SourceSplit, check_destination, write_store

log = logging.getLogger(__name__)

OnError = Literal["skip", "fail"]
CLIPS_PER_BLOCK = 8  # clips per Ray Data block: small, so that work spreads and progress is smooth


@dataclass
class RecordingsProgress:
    """Callbacks for a progress display: `start(clips to extract)`, then `advance()` per clip."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[], None] = lambda: None


@dataclass
class RecordingsSummary:
    store: ExtractionSummary
    clips: int  # rows of label.csv
    extracted: int  # clips extracted in this run
    cached: int  # clips whose features came from the cache
    replaced: int = 0  # cache entries that were there but not usable (damaged, another clip's), re-extracted
    skipped: list[Rejected] = field(default_factory=list)


@dataclass
class _Outcome:
    index: int  # into the pending list
    features: ClipFeatures | None
    reason: str = ""
    detail: str = ""


# ---------------------------------------------------------------- extraction, here or on Ray


def _extract_here(clips: list[Clip], settings: ExtractorSettings) -> Iterator[_Outcome]:
    with IsolatedExtractor(settings) as extract:
        for index, clip in enumerate(clips):
            yield _run(extract, index, clip.path, clip.start, clip.end)


def _run(extract: IsolatedExtractor, index: int, path, start, end) -> _Outcome:
    try:
        return _Outcome(index, extract(path, start, end))
    except MediaError as error:
        return _Outcome(index, None, error.reason, error.detail)


def _extract_row(extract: IsolatedExtractor, row: dict) -> dict:
    """One Ray Data row: the clip's features, or the reason there are none."""
    start, end = (None if np.isnan(row[key]) else float(row[key]) for key in ("start", "end"))
    outcome = _run(extract, int(row["index"]), row["path"], start, end)
    # Raw bytes with their shapes: arrays of any length travel through Arrow unchanged.
    audio = outcome.features.audio if outcome.features else np.zeros((0, 0), np.float32)
    vision = outcome.features.vision if outcome.features else np.zeros((0, 0), np.float32)
    return {
        "index": outcome.index,
        "reason": outcome.reason,
        "detail": outcome.detail,
        "audio": audio.tobytes(),
        "audio_shape": list(audio.shape),
        "vision": vision.tobytes(),
        "vision_shape": list(vision.shape),
    }


def _actor_class(settings: ExtractorSettings) -> type:
    """The Ray Data actor class: models loaded once per actor, each clip decoded in its child
    process. The settings travel inside the class (defined here, so Ray ships it by value)
    rather than as constructor arguments, which Ray keeps in its object store."""
    settings_json = settings.model_dump_json()

    class RecordingExtractor:
        def __init__(self) -> None:
            self.extract = IsolatedExtractor(ExtractorSettings.model_validate_json(settings_json))

        def __call__(self, row: dict) -> dict:
            return _extract_row(self.extract, row)

    return RecordingExtractor


def _from_row(row: dict) -> _Outcome:
    if row["reason"]:
        return _Outcome(int(row["index"]), None, row["reason"], row["detail"])
    audio = np.frombuffer(row["audio"], dtype=np.float32).reshape(row["audio_shape"])
    vision = np.frombuffer(row["vision"], dtype=np.float32).reshape(row["vision_shape"])
    return _Outcome(int(row["index"]), ClipFeatures(audio.copy(), vision.copy()))


def connect_ray(address: str | None) -> int:
    """Join the cluster at `address` (None: RAY_ADDRESS, else a private local one: see
    mmim.cluster.connect); returns its CPUs."""
    import ray

    from mmim.cluster.connect import connect

    connect(address)
    return int(ray.cluster_resources().get("CPU", 1))


def _extract_on_ray(
    clips: list[Clip], settings: ExtractorSettings, workers: int | None, address: str | None
) -> Iterator[_Outcome]:
    import ray

    from mmim.cluster.connect import quiet_ray_data

    cpus = connect_ray(address)
    actors = max(1, min(workers or cpus, len(clips)))
    quiet_ray_data(log)
    items = [
        {
            "index": index,
            "path": str(clip.path.resolve()),
            "start": np.nan if clip.start is None else clip.start,
            "end": np.nan if clip.end is None else clip.end,
        }
        for index, clip in enumerate(clips)
    ]
    blocks = max(min(len(items), actors * 2), -(-len(items) // CLIPS_PER_BLOCK))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map(
        _actor_class(settings), compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1
    )
    log.info("extracting %d clips with %d Ray workers", len(clips), actors)
    for row in dataset.iter_rows():
        yield _from_row(row)


# ---------------------------------------------------------------- the job


def _skip_or_fail(rejected: Rejected, on_error: OnError) -> None:
    if on_error == "fail":
        detail = f": {rejected.detail}" if rejected.detail else ""
        raise MMIMInputError(f"{rejected.where}: {rejected.reason}{detail} (--on-error fail; no store written)")
    log.info("skipped %s: %s%s", rejected.where, rejected.reason, f" ({rejected.detail})" if rejected.detail else "")


def refill_cache(cache: FeatureCache, missing: list[Clip], keys: dict[str, str], settings: ExtractorSettings) -> None:
    """Extract again, here, the clips whose entries went missing during the run (the cache was
    deleted or cleaned meanwhile: deleting it is always safe)."""
    if missing:
        log.warning("%s: %d cached clips vanished during the run; extracting them again", cache.root, len(missing))
    with IsolatedExtractor(settings) as extract:
        for clip in missing:
            try:
                cache.put(keys[clip.id], extract(clip.path, clip.start, clip.end))
            except MediaError as error:
                raise MMIMInputError(f"{clip.path} (clip {clip.id}): {error.reason}, on a second reading") from None


class CachedSequences:
    """One modality of a split's clips, read from the cache one clip at a time (the store
    writer streams them to disk, so the dataset is never in memory)."""

    def __init__(self, cache: FeatureCache, keys: list[str], lengths: list[int], modality: str, dim: int) -> None:
        self.cache, self.keys, self.lengths, self.modality, self.dim = cache, keys, lengths, modality, dim

    def __len__(self) -> int:
        return len(self.keys)

    def length(self, index: int) -> int:
        return self.lengths[index]

    def __getitem__(self, index: int) -> np.ndarray:
        features = self.cache.get(self.keys[index])
        if features is None:
            raise MMIMInputError(
                f"{self.cache.root}: the cached features of a clip vanished while the store was written; run again"
            )
        return getattr(features, self.modality)


def _source_split(
    name: str,
    clips: list[Clip],
    cache: FeatureCache,
    keys: dict[str, str],
    lengths: dict[str, tuple[int, int]],
    dims: dict[str, int],
    origin: str,
) -> SourceSplit:
    members = [clip for clip in clips if clip.split == name]
    member_keys = [keys[clip.id] for clip in members]
    return SourceSplit(
        origin=origin,
        ids=[clip.id for clip in members],
        texts=[clip.text for clip in members],
        labels=np.array([clip.label for clip in members], dtype=np.float32),
        audio=CachedSequences(cache, member_keys, [lengths[c.id][0] for c in members], "audio", dims["audio"]),
        vision=CachedSequences(cache, member_keys, [lengths[c.id][1] for c in members], "vision", dims["vision"]),
    )


def _cached_lengths(cache: FeatureCache, clips: list[Clip], keys: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(audio, vision) frame counts by clip id, for the clips the cache has."""
    found = {}
    for clip in clips:
        cached = cache.get(keys[clip.id])
        if cached is not None:
            found[clip.id] = (len(cached.audio), len(cached.vision))
    return found


def extract_recordings(
    input_dir: str | Path,
    out: str | Path,
    encoder: str,
    settings: ExtractorSettings,
    *,
    cache_dir: str | Path,
    max_tokens: int,
    nonfinite: NonFinitePolicy = "zero",
    on_error: OnError = "skip",
    overwrite: bool = False,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: RecordingsProgress = RecordingsProgress(),
) -> RecordingsSummary:
    """Extract what the cache lacks (`workers`: Ray actors, None = the cluster's CPUs, 0 = here)
    and write the store at `out`."""
    input_dir, out, cache_dir = Path(input_dir), Path(out), Path(cache_dir)
    if out.resolve().is_relative_to(cache_dir.resolve()) or cache_dir.resolve().is_relative_to(out.resolve()):
        raise MMIMInputError(f"--cache {cache_dir} and --out {out}: one is inside the other; keep them apart")
    with writing(out):  # one extraction per store at a time; another stops here with a sentence
        origin = str(input_dir / LABELS_FILE)
        check_destination(out, overwrite)
        clips, skipped = read_dataset(input_dir)
        rows = len(clips) + len(skipped)
        for rejected in skipped:
            _skip_or_fail(rejected, on_error)
        tokenizer = load_tokenizer(encoder)  # before the slow part: a wrong name fails now

        cache = FeatureCache(cache_dir, settings)
        keys = {clip.id: cache.key(clip) for clip in clips}
        lengths = _cached_lengths(cache, clips, keys)
        pending = [clip for clip in clips if clip.id not in lengths]
        log.info("%d clips, %d in the cache, %d to extract", len(clips), len(lengths), len(pending))

        progress.start(len(pending))
        outcomes: Iterable[_Outcome] = ()
        if pending:
            outcomes = (
                _extract_here(pending, settings)
                if workers == 0
                else _extract_on_ray(pending, settings, workers, ray_address)
            )
        for outcome in outcomes:
            clip = pending[outcome.index]
            if outcome.features is None:
                rejected = Rejected(f"{clip.path} (clip {clip.id})", clip.id, outcome.reason, outcome.detail)
                _skip_or_fail(rejected, on_error)
                skipped.append(rejected)
            else:
                cache.put(keys[clip.id], outcome.features)
                lengths[clip.id] = (len(outcome.features.audio), len(outcome.features.vision))
            progress.advance()

        usable = [clip for clip in clips if clip.id in lengths]
        if not usable:
            raise MMIMInputError(
                f"{origin}: no usable clips ({len(skipped)} skipped: {', '.join(sorted({r.reason for r in skipped}))})"
            )
        refill_cache(cache, [clip for clip in usable if not cache.has(keys[clip.id])], keys, settings)
        splits = {name: _source_split(name, usable, cache, keys, lengths, cache.dims, origin) for name in SPLITS}
        split_of = {clip.id: clip.split for clip in clips}
        dropped = [(split_of.get(rejected.clip_id, ""), rejected.clip_id, rejected.reason) for rejected in skipped]
        summary = write_store(
            out,
            splits,
            tokenizer,
            text_encoder=encoder,
            max_tokens=max_tokens,
            source="recordings",
            nonfinite=nonfinite,
            overwrite=overwrite,
            dropped=dropped,
            manifest_extra={"extractor": describe_extractor(settings)},
        )
        extracted = len(pending) - (len(clips) - len(usable))
        return RecordingsSummary(
            summary,
            clips=rows,
            extracted=extracted,
            cached=len(clips) - len(pending),
            replaced=len(cache.replaced),
            skipped=skipped,
        )
