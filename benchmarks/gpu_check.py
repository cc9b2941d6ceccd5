"""One GPU check of MMIM training: throughput, memory, Ray Train's cost, and whether the GPU waits.

On a MOSI-sized synthetic store (1284/229/686) with a bert-base-shaped text encoder (random
weights, no download; see train_step.py), on the first CUDA device:

  fp32, bf16        one epoch each (stage 0 + 1 through the DataLoader, pinned memory and
                    loader workers as training uses them) after a warm-up: samples/s and
                    peak GPU memory
  host syncs        synchronising CUDA calls per training step (torch's sync debug mode),
                    counted over 10 and 20 batches so the stage's one read at its end cancels
  host wait         the share of a stage-1 epoch's wall time the GPU is idle (the torch
                    profiler's device time against the wall clock; the profiler's own host
                    cost makes this an upper bound)
  Ray Train         two epochs in this process and with 1 GPU worker: the second epoch's
                    time, and the ratio worker / process (Ray Train's overhead)

Prints "no CUDA device" and exits 0 where there is none; `--smoke` runs the same steps on the
CPU with a 1-layer encoder and a small store, to check the script itself.

    bash benchmarks/gpu_check.sh [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from train_step import bert_base_encoder, fresh_engine, synchronize, timed_epoch

from mmim.core.batches import make_loader
from mmim.core.config import Config
from mmim.core.store import FeatureStore, bind_store
from mmim.data.synthetic import MOSI_SIZES, write_synthetic_store
from mmim.training.train import train

SMOKE_SIZES = {"train": 96, "valid": 32, "test": 32}


def training_loader(config: Config, store: FeatureStore, device: torch.device):
    """The training split as training reads it on this device (pinned memory, loader workers on a GPU)."""
    gpu = device.type == "cuda"
    split = store["train"]
    return make_loader(split, config.train.batch_size, shuffle=True, num_workers=2 if gpu else 0, pin_memory=gpu)


def precision_epoch(config: Config, store: FeatureStore, device: torch.device) -> tuple[float, float]:
    """(samples/s, peak GiB) of one epoch after a warm-up of a few steps."""
    engine = fresh_engine(config)
    loader = training_loader(config, store, device)
    timed_epoch(engine, list(loader)[:3])  # kernel selection, allocator growth
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    seconds = timed_epoch(engine, loader)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return len(store["train"]) / seconds, peak


def syncs_per_step(config: Config, store: FeatureStore, device: torch.device) -> float | None:
    """Synchronising CUDA calls per batch of stage 0 + stage 1 (None on the CPU)."""
    if device.type != "cuda":
        return None
    engine = fresh_engine(config)
    batches = list(make_loader(store["train"], config.train.batch_size, shuffle=False, pin_memory=True))[:20]
    engine.train_stage0(batches[:2])  # first calls (allocator, kernel choice) are not what is counted
    engine.train_stage1(batches[:2])
    counts = []
    for many in (10, 20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.train_stage0(batches[:many])
                engine.train_stage1(batches[:many])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / 10


def host_wait_share(config: Config, store: FeatureStore, device: torch.device) -> float | None:
    """1 - GPU busy time / wall time over a stage-1 epoch (None on the CPU)."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine = fresh_engine(config)
    loader = training_loader(config, store, device)
    timed_epoch(engine, list(loader)[:3])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        synchronize(device)
        start = time.perf_counter()
        engine.train_stage1(loader)
        synchronize(device)
        wall = time.perf_counter() - start
    # Kernels' own time, as the profiler's table totals it: not the CPU ops that launched them,
    # nor annotated regions (an optimizer step, a DataLoader fetch), which span other events.
    kernels = [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    busy = sum(event.self_device_time_total for event in kernels) / 1e6
    return max(0.0, 1 - busy / wall)


def ray_overhead(config: Config, work: Path, device: torch.device) -> tuple[float, float]:
    """Second-epoch seconds of (this process, 1 Ray worker on the same device)."""
    import ray

    from mmim.cluster.distributed import train_distributed

    two_epochs = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 2, "patience": 2})})
    alone = train(two_epochs.model_copy(update={"output_dir": str(work / "process")}))
    gpu = device.type == "cuda"
    ray.init(num_cpus=4, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    try:
        ray_settings = {"num_workers": 1, "use_gpu": gpu, "storage_path": str(work / "ray"), "run_name": "check"}
        in_ray = train_distributed(
            two_epochs.model_copy(
                update={"ray": two_epochs.ray.model_copy(update=ray_settings), "output_dir": str(work / "worker")}
            )
        )
    finally:
        ray.shutdown()
    return alone.epochs[-1]["seconds"], in_ray.epochs[-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU, small and fast")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        if shutil.which("nvidia-smi") and torch.version.cuda is None:
            sys.exit(f"nvidia-smi is here, but torch {torch.__version__} is a CPU build: install a CUDA build of torch")
        print("no CUDA device: nothing to measure (gpu_check needs a GPU; --smoke checks the script on the CPU)")
        return
    device = torch.device("cpu" if args.smoke else "cuda:0")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (smoke run)'}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        encoder = bert_base_encoder(work / "encoder", 1 if args.smoke else 12)
        sizes = SMOKE_SIZES if args.smoke else MOSI_SIZES
        store_dir = write_synthetic_store(work / "store", encoder, seed=0, sizes=sizes).root
        store = FeatureStore(store_dir)
        config = Config.model_validate(
            {
                "model": {"text_encoder": encoder, "text_pretrained": False},
                "data": {"store": str(store_dir)},
                "train": {"device": device.type},
                "output_dir": str(work / "run"),
            }
        )
        config = bind_store(config, store)
        print(f"store: {sizes} examples, batch {config.train.batch_size}, text encoder BERT-base shape")
        figures = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            precise = config.model_copy(update={"train": config.train.model_copy(update={"bf16": bf16})})
            figures[name] = precision_epoch(precise, store, device)
            peak = "n/a" if device.type != "cuda" else f"{figures[name][1]:.2f} GiB"
            print(f"{name}: {figures[name][0]:.1f} samples/s, peak GPU memory {peak}")
        print(f"bf16 / fp32 throughput: {figures['bf16'][0] / figures['fp32'][0]:.2f}x")
        syncs = syncs_per_step(config, store, device)
        print(f"synchronising CUDA calls per training step: {'n/a' if syncs is None else f'{syncs:.1f}'}")
        wait = host_wait_share(config, store, device)
        print(f"share of stage-1 time the GPU waits on the host: {'n/a' if wait is None else f'{wait:.1%}'}")
        alone, worker = ray_overhead(config, work, device)
        print(f"epoch 2: this process {alone:.1f} s, 1 Ray Train worker {worker:.1f} s, ratio {worker / alone:.3f}")


if __name__ == "__main__":
    main()
