"""Extraction: source files in any supported format -> a feature store.

    mmim extract --source {mult,mmsa,csd,synthetic} --input PATH --out DIR --encoder NAME

This is the DVC stage `extract` (dvc.yaml): deps are the input files and this code,
params the `extraction` section of params.yaml, the output the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mmim.core.errors import MMIMInputError
from mmim.core.store import SEQUENCE_FIELDS
from mmim.core.text_encoder import DEFAULT_MAX_TOKENS, load_tokenizer
from mmim.data.formats.csd import read_csd
from mmim.data.formats.mmsa import read_mmsa
from mmim.data.formats.mult import read_mult
from mmim.data.store_writer import ExtractionSummary, NonFinitePolicy, SourceSplit, check_destination, write_store
from mmim.data.synthetic import synthesize

Source = Literal["mult", "mmsa", "csd", "synthetic"]
SOURCES = ("mult", "mmsa", "csd", "synthetic")


def read_source(
    source: Source, input_path: str | Path | None, *, labels: str | None = None, folds: str | None = None, seed: int = 0
) -> dict[str, SourceSplit]:
    """One SourceSplit per split from the given format (synthetic: generated, no input)."""
    if source == "synthetic":
        return synthesize(seed)
    if input_path is None:
        raise MMIMInputError(f"--input is required for --source {source}")
    if not Path(input_path).exists():
        raise MMIMInputError(f"{input_path}: no such file or directory")
    if source == "mult":
        return read_mult(input_path, labels)
    if source == "mmsa":
        return read_mmsa(input_path)
    if source == "csd":
        return read_csd(input_path, folds)
    raise MMIMInputError(f"--source {source!r}: expected one of {', '.join(SOURCES)}")


def extract(
    source: Source,
    input_path: str | Path | None,
    out: str | Path,
    encoder: str,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    nonfinite: NonFinitePolicy = "zero",
    labels: str | None = None,
    folds: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    on_start: Callable[[int], None] = lambda total: None,
    advance: Callable[[], None] = lambda: None,
) -> ExtractionSummary:
    """Read, validate, tokenize and write; `on_start(total steps)` then `advance()` per step."""
    if max_tokens < 2:
        raise MMIMInputError(f"--max-tokens {max_tokens}: must be at least 2 (CLS and SEP)")
    check_destination(Path(out), overwrite)  # before the slow part; write_store checks again
    splits = read_source(source, input_path, labels=labels, folds=folds, seed=seed)
    tokenizer = load_tokenizer(encoder)
    on_start(sum(len(split.ids) for split in splits.values()) * len(SEQUENCE_FIELDS))
    return write_store(
        out,
        splits,
        tokenizer,
        text_encoder=encoder,
        max_tokens=max_tokens,
        source=source,
        nonfinite=nonfinite,
        overwrite=overwrite,
        advance=advance,
    )
