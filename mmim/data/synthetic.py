"""A synthetic CMU-MOSI-like sample, deterministic from a seed.

Utterances are built from a small sentiment lexicon with intensifiers ("very") and
negations ("not"); the score is the sum of the clause valences, clipped to [-3, 3],
with a little annotator noise (neutral utterances stay exactly 0, as MOSI has zeros).
Acoustic (5 dims) and visual (20 dims) sequences of varying length carry part of the
signal: some channels drift with the score, the rest is noise. Text carries the most.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmim.core.text_encoder import DEFAULT_MAX_TOKENS, load_tokenizer
from mmim.data.formats.mult import write_mult
from mmim.data.store_writer import ExtractionSummary, SequenceList, SourceSplit, write_store

AUDIO_DIM = 5  # CMU-MOSI COVAREP features in the MulT release
VISION_DIM = 20  # CMU-MOSI FACET features in the MulT release
MOSI_SIZES = {"train": 1284, "valid": 229, "test": 686}

POSITIVE = {
    "good": 1.0,
    "nice": 0.8,
    "great": 1.6,
    "excellent": 2.0,
    "wonderful": 2.0,
    "amazing": 2.2,
    "beautiful": 1.5,
    "funny": 1.0,
    "brilliant": 2.0,
    "enjoyable": 1.2,
}
NEGATIVE = {
    "bad": -1.0,
    "boring": -1.2,
    "terrible": -2.0,
    "awful": -2.2,
    "dull": -1.0,
    "weak": -0.8,
    "horrible": -2.2,
    "disappointing": -1.5,
    "stupid": -1.6,
    "annoying": -1.3,
}
INTENSIFIERS = {"very": 1.5, "really": 1.4, "extremely": 1.8, "so": 1.3}
NEGATIONS = ("not", "never")
NEGATION_FACTOR = -0.7  # "not good" is mildly negative, not the opposite of "good"
SUBJECTS = (
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the story",
    "the ending",
    "the music",
    "the cast",
    "the dialogue",
    "the director",
)
NEUTRAL = (
    "i watched it last weekend",
    "it is about a family in a small town",
    "the film runs about two hours",
    "i saw it with my brother",
    "it came out a few years ago",
    "there is a scene at a train station",
)


def _clause(rng: np.random.Generator) -> tuple[str, float]:
    lexicon = POSITIVE if rng.random() < 0.5 else NEGATIVE
    word = rng.choice(list(lexicon))
    words, valence = [word], lexicon[word]
    if rng.random() < 0.35:
        intensifier = rng.choice(list(INTENSIFIERS))
        words.insert(0, intensifier)
        valence *= INTENSIFIERS[intensifier]
    verb = "was"
    if rng.random() < 0.25:
        negation = rng.choice(NEGATIONS)
        verb = f"was {negation}"
        valence *= NEGATION_FACTOR
    return f"{rng.choice(SUBJECTS)} {verb} {' '.join(words)}", valence


def _utterance(rng: np.random.Generator) -> tuple[str, float]:
    if rng.random() < 0.1:
        return str(rng.choice(NEUTRAL)), 0.0
    clauses = [_clause(rng) for _ in range(1 + int(rng.random() < 0.4))]
    text = " and ".join(c[0] for c in clauses)
    if rng.random() < 0.3:
        text = f"{rng.choice(NEUTRAL)} and {text}"
    score = sum(c[1] for c in clauses) + rng.normal(0.0, 0.2)
    # Annotator averages: MOSI scores sit on a grid of fractions; 0.2 is close enough.
    return text, float(np.clip(np.round(score * 5) / 5, -3.0, 3.0))


def _sequence(
    rng: np.random.Generator, score: float, dim: int, frames: tuple[int, int], signal_channels: int, strength: float
) -> np.ndarray:
    length = int(rng.integers(frames[0], frames[1] + 1))
    values = rng.normal(0.0, 1.0, size=(length, dim)).astype(np.float32)
    values[:, :signal_channels] += np.float32(strength * score)
    return values


def synthesize(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, SourceSplit]:
    """train/valid/test splits of synthetic utterances with audio and vision sequences."""
    sizes = sizes or MOSI_SIZES
    rng = np.random.default_rng(seed)
    splits: dict[str, SourceSplit] = {}
    video = 0
    for name in ("train", "valid", "test"):
        ids, texts, audio, vision, labels = [], [], [], [], []
        for index in range(sizes[name]):
            if index % 10 == 0:
                video += 1  # about ten clips per video, as in MOSI
            text, score = _utterance(rng)
            ids.append(f"synvid{video:04d}_{index % 10 + 1}")
            texts.append(text)
            labels.append(score)
            audio.append(_sequence(rng, score, AUDIO_DIM, (20, 60), signal_channels=2, strength=0.3))
            vision.append(_sequence(rng, score, VISION_DIM, (10, 40), signal_channels=4, strength=0.25))
        splits[name] = SourceSplit(
            origin=f"synthetic sample (seed {seed})",
            ids=ids,
            texts=texts,
            labels=np.asarray(labels, dtype=np.float32),
            audio=SequenceList(audio, AUDIO_DIM),
            vision=SequenceList(vision, VISION_DIM),
        )
    return splits


def write_synthetic_raw(out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """The sample in the MulT release format: `synthetic_data_noalign.pkl` + `synthetic-label.csv`."""
    return write_mult(out, "synthetic", synthesize(seed, sizes))


def write_synthetic_store(
    out: str | Path,
    text_encoder: str,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overwrite: bool = False,
) -> ExtractionSummary:
    """The sample straight into a feature store tokenized for `text_encoder` (tests, benchmarks)."""
    return write_store(
        out,
        synthesize(seed, sizes),
        load_tokenizer(text_encoder),
        text_encoder=text_encoder,
        max_tokens=max_tokens,
        source="synthetic",
        overwrite=overwrite,
    )
