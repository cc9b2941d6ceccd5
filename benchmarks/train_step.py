"""Does the data path cost anything next to the model?

Builds a MOSI-sized synthetic store (1284/229/686) and the default MMIM config with a
bert-base-sized text encoder (config only, random weights: no download; the tokenizer
is MiniLM's, which is bert-base-uncased's vocabulary), then times on CPU:

  full epoch   stage 0 + stage 1 of the engine, reading batches through the DataLoader
               from the memory-mapped store (what training does)
  model only   the same steps on batches collated in advance (forward, backward, step)

and prints samples/s of the full epoch, the ratio model-only / full (target >= 0.9), and
the time of the data path alone (reading and collating the epoch's batches twice).

    python benchmarks/train_step.py [--hidden-layers 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig

from mmim.core.batches import make_loader
from mmim.core.config import Config
from mmim.core.model import build_model
from mmim.core.store import FeatureStore, bind_store
from mmim.core.text_encoder import resolve
from mmim.data.synthetic import MOSI_SIZES, write_synthetic_store
from mmim.training.engine import Engine, seed_everything
from mmim.training.predict import predict_scores

TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"


def bert_base_encoder(directory: Path, layers: int) -> str:
    """A bert-base-uncased-shaped encoder directory: BERT-base config + the uncased tokenizer."""
    from transformers import AutoTokenizer

    BertConfig(num_hidden_layers=layers).save_pretrained(directory)  # 768 wide, 30522 vocab
    AutoTokenizer.from_pretrained(resolve(TOKENIZER)).save_pretrained(directory)
    return str(directory)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's), so that a timer reads the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epoch(engine: Engine, batches) -> float:
    start = time.perf_counter()
    engine.train_stage0(batches)
    engine.train_stage1(batches)
    return time.perf_counter() - start


def fresh_engine(config: Config) -> Engine:
    seed_everything(config.train.seed)
    return Engine(build_model(config.model), config.train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-layers", type=int, default=12, help="BERT layers (bert-base: 12)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        encoder = bert_base_encoder(work / "encoder", args.hidden_layers)
        store_dir = write_synthetic_store(work / "store", encoder, seed=0, sizes=MOSI_SIZES).root
        config = Config.model_validate(
            {
                "model": {"text_encoder": encoder, "text_pretrained": False},
                "data": {"store": str(store_dir)},
                "train": {"device": "cpu"},
            }
        )
        store = FeatureStore(store_dir)
        config = bind_store(config, store)
        loader = make_loader(store["train"], config.train.batch_size, shuffle=True, seed=config.train.seed)
        prebuilt = list(loader)  # the same batches, in the same order (seeded shuffle)
        samples = len(store["train"])

        # Warm-up: one forward pass over every batch shape, so that first-call costs
        # (allocations, kernel selection) fall on neither measurement.
        warmup = fresh_engine(config)
        predict_scores(warmup.core, prebuilt, warmup.device)
        timed_epoch(warmup, prebuilt[:2])
        del warmup

        # The full epoch is timed first: any leftover warm-up cost counts against it.
        full = timed_epoch(fresh_engine(config), loader)
        model_only = timed_epoch(fresh_engine(config), prebuilt)
        start = time.perf_counter()
        for _ in range(2):  # stage 0 and stage 1 each read the epoch once
            for _batch in loader:
                pass
        data_only = time.perf_counter() - start

    print(
        f"device: cpu, torch threads: {torch.get_num_threads()}, text encoder: "
        f"BERT-base shape ({args.hidden_layers} layers, random weights)"
    )
    print(f"batches per stage: {len(prebuilt)} x {config.train.batch_size}, stage 0 mode: {config.train.stage0_mode}")
    print(f"full epoch (stage 0 + 1, DataLoader): {full:.1f} s, {samples / full:.1f} samples/s")
    print(f"model only (pre-built batches):       {model_only:.1f} s")
    print(f"data path alone (2 passes, collate):  {data_only:.3f} s")
    print(f"ratio model-only / full epoch:        {model_only / full:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
