"""How much of the machine an epoch uses: FLOPs per stage, FLOP/s achieved, and the share of peak.

On a MOSI-shaped feature store (320/106/106 utterances; audio sequences of 100-375 frames of
5 features and vision of 100-500 frames of 20, the shapes of the MulT release's unaligned
MOSI, with lengths drawn uniformly) and a bert-base-shaped text encoder (random weights, no
download), in fp32 and in bf16 autocast:

  peak     this machine's matmul rate, (1600 x 768) @ (768 x 3072) as in a BERT feed-forward
           layer, per dtype, with the threads training uses
  FLOPs    torch's FLOP counter over one pass of each stage on the real model and batches:
           stage 0 (the MMILB step of `train.stage0_mode`), stage 1 (forward, backward, step)
           and evaluation (valid + test). It counts matrix products (mm, bmm, attention),
           which are nearly all of the arithmetic, so the share is of the matmul peak.
  time     each stage over the whole epoch through the DataLoader, after a warm-up

and prints seconds, GFLOP, GFLOP/s and the share of the dtype's peak per stage, then the
epoch's bf16 / fp32 speed-up. On a CPU without bf16 instructions training keeps fp32, so bf16
is not measured there (the script says so).

    .venv/bin/python benchmarks/efficiency.py [--device cuda] [--hidden-layers 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from train_step import bert_base_encoder, fresh_engine, synchronize

from mmim.core.batches import make_loader
from mmim.core.config import Config
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import DEFAULT_MAX_TOKENS, load_tokenizer
from mmim.data.store_writer import SequenceList, write_store
from mmim.data.synthetic import synthesize
from mmim.training.engine import Engine, bf16_instructions, evaluate

SIZES = {"train": 320, "valid": 106, "test": 106}
AUDIO_FRAMES, VISION_FRAMES = (100, 375), (100, 500)  # MOSI unaligned: at most 375 x 5 and 500 x 20
STAGES = ("stage 0", "stage 1", "evaluation")


def mosi_shaped_store(directory: Path, encoder: str) -> Path:
    """The synthetic utterances with sequences as long as the MOSI release's."""
    rng = np.random.default_rng(0)
    splits = synthesize(seed=0, sizes=SIZES)
    for split in splits.values():
        for name, (low, high), dim in (("audio", AUDIO_FRAMES, 5), ("vision", VISION_FRAMES, 20)):
            frames = [rng.normal(size=(int(rng.integers(low, high + 1)), dim)).astype(np.float32) for _ in split.ids]
            setattr(split, name, SequenceList(frames, dim))
    tokenizer = load_tokenizer(encoder)
    write_store(directory, splits, tokenizer, text_encoder=encoder, max_tokens=DEFAULT_MAX_TOKENS, source="synthetic")
    return directory


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a BERT-sized matrix product, the best of 5 rounds."""
    a = torch.randn(1600, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    repeats = 200 if device.type == "cuda" else 20
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * 1600 * 768 * 3072 / best


def stage_runs(engine: Engine, loaders: dict) -> dict[str, Callable[[], object]]:
    return {
        "stage 0": lambda: engine.train_stage0(loaders["train"]),
        "stage 1": lambda: engine.train_stage1(loaders["train"]),
        "evaluation": lambda: [evaluate(engine.core, loaders[split], engine.device) for split in ("valid", "test")],
    }


def count_flops(config: Config, loaders: dict) -> dict[str, int]:
    """FLOPs of one pass of each stage (the same in both dtypes: autocast changes types, not work)."""
    runs = stage_runs(fresh_engine(config), loaders)
    flops = {}
    for stage in STAGES:
        with FlopCounterMode(display=False) as counter:
            runs[stage]()
        flops[stage] = counter.get_total_flops()
    return flops


def time_stages(config: Config, loaders: dict, warmup: list) -> dict[str, float]:
    engine = fresh_engine(config)
    engine.train_stage0(warmup)  # first calls: kernel choice, allocator growth, autocast's casts
    engine.train_stage1(warmup)
    seconds = {}
    for stage, run in stage_runs(engine, loaders).items():
        synchronize(engine.device)
        start = time.perf_counter()
        run()
        synchronize(engine.device)
        seconds[stage] = time.perf_counter() - start
    return seconds


def row(label: str, dtype: str, seconds: float, flops: int, peak: float) -> str:
    rate = flops / seconds
    return f"{label:<11} {dtype:<5} {seconds:8.2f} {flops / 1e9:8.1f} {rate / 1e9:8.1f} {rate / peak:8.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden-layers", type=int, default=12, help="BERT layers (bert-base: 12)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure on cuda")
        return
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        encoder = bert_base_encoder(work / "encoder", args.hidden_layers)
        store_dir = mosi_shaped_store(work / "store", encoder)
        store = FeatureStore(store_dir)
        base = Config.model_validate(
            {
                "model": {"text_encoder": encoder, "text_pretrained": False},
                "data": {"store": str(store_dir)},
                "train": {"device": args.device},
            }
        )
        base = bind_store(base, store)
        on_gpu = device.type == "cuda"
        size = base.train.batch_size
        loaders = {
            split: make_loader(store[split], size, shuffle=split == "train", seed=0, pin_memory=on_gpu)
            for split in ("train", "valid", "test")
        }
        warmup = list(make_loader(store["train"], size, shuffle=False))[:2]
        dtypes = {"fp32": torch.float32}
        if bf16_instructions(device):
            dtypes["bf16"] = torch.bfloat16
        flops = count_flops(base, loaders)
        rows = {}
        for name, dtype in dtypes.items():
            config = base.model_copy(update={"train": base.train.model_copy(update={"bf16": name == "bf16"})})
            rows[name] = (matmul_peak(device, dtype), time_stages(config, loaders, warmup))

    threads = torch.get_num_threads() if not on_gpu else None
    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu, {threads} torch threads"
    print(f"device: {where}; torch {torch.__version__}")
    print(f"store: {SIZES} utterances, batch {size}; text encoder: BERT-base shape, {args.hidden_layers} layers")
    if "bf16" not in dtypes:
        print("this device has no bf16 instructions: training keeps fp32, bf16 is not measured")
    print(f"{'stage':<11} {'dtype':<5} {'seconds':>8} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for name, (peak, seconds) in rows.items():
        for stage in STAGES:
            print(row(stage, name, seconds[stage], flops[stage], peak))
        print(row("epoch", name, sum(seconds.values()), sum(flops.values()), peak))
        print(f"{'(peak)':<11} {name:<5} {'':>8} {'':>8} {peak / 1e9:8.1f}")
    if "bf16" in rows:
        speedup = sum(rows["fp32"][1].values()) / sum(rows["bf16"][1].values())
        print(f"bf16 epoch {speedup:.2f}x as fast as fp32")


if __name__ == "__main__":
    main()
