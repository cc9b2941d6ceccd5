"""What does Ray Train cost over the plain engine, and what do 2 CPU workers buy?

On a MOSI-sized synthetic store with the MiniLM encoder (the demo's), trains for
--epochs epochs three ways and prints per-epoch times (stage 0 + 1 + valid/test, as
measured inside the training loop; the first epoch is left out as warm-up):

  single process   mmim.training.train.train, 2 torch threads: once with no Ray running, once
                   beside an idle Ray cluster (its daemons share these cores)
  1 Ray worker     DDP over one rank, 2 CPUs and 2 threads for the worker
  2 Ray workers    DDP over two ranks, 1 CPU and 1 thread each (same global batch)

and the ratios 1 worker / single process (target <= 1.10; against the run beside the
idle cluster, that is Ray Train's own cost) and 2 workers / 1 worker.
It also prints the wall time per epoch of the Ray runs including reporting and
checkpointing, but not cluster start-up.

    python benchmarks/ray_overhead.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from mmim.cluster.distributed import train_distributed
from mmim.core.config import Config
from mmim.data.synthetic import MOSI_SIZES, write_synthetic_store
from mmim.training.train import train

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


def ray_run(base: Config, work: Path, name: str, workers: int, threads: int) -> tuple[list[float], float]:
    config = base.model_copy(
        update={
            "train": base.train.model_copy(update={"num_threads": threads}),
            "ray": base.ray.model_copy(
                update={
                    "num_workers": workers,
                    "run_name": name,
                    "storage_path": str(work / "ray"),
                    "resources_per_worker": {"CPU": float(threads)},
                }
            ),
            "output_dir": str(work / name),
        }
    )
    start = time.perf_counter()
    result = train_distributed(config)
    wall = time.perf_counter() - start
    return [epoch["seconds"] for epoch in result.epochs], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        store = write_synthetic_store(work / "store", ENCODER, seed=0, sizes=MOSI_SIZES).root
        base = Config.model_validate(
            {
                "model": {"text_encoder": ENCODER},
                "data": {"store": str(store)},
                "train": {"epochs": args.epochs, "patience": args.epochs, "device": "cpu"},
            }
        )

        def single_run(name: str) -> list[float]:
            result = train(
                base.model_copy(
                    update={"train": base.train.model_copy(update={"num_threads": 2}), "output_dir": str(work / name)}
                )
            )
            return [epoch["seconds"] for epoch in result.epochs]

        alone_epochs = single_run("single-alone")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        # The same single-process run while the (idle) Ray daemons share the 2 cores.
        beside_epochs = single_run("single-beside-ray")
        one_epochs, one_wall = ray_run(base, work, "one", workers=1, threads=2)
        two_epochs, two_wall = ray_run(base, work, "two", workers=2, threads=1)
        ray.shutdown()

    def steady(times: list[float]) -> float:
        return statistics.mean(times[1:]) if len(times) > 1 else times[0]

    alone, beside = steady(alone_epochs), steady(beside_epochs)
    one, two = steady(one_epochs), steady(two_epochs)
    print(f"store: {sum(MOSI_SIZES.values())} examples (MOSI sizes), encoder {ENCODER}, {args.epochs} epochs, CPU")
    print(f"epoch time, single process, no Ray running:      {alone:.1f} s")
    print(f"epoch time, single process, idle Ray cluster up: {beside:.1f} s")
    print(f"epoch time, 1 Ray worker (2 threads):            {one:.1f} s")
    print(f"  ratio 1 worker / single process beside Ray:    {one / beside:.3f} (target <= 1.10: Ray Train's own cost)")
    print(f"  ratio 1 worker / single process without Ray:   {one / alone:.3f} (includes the Ray daemons' CPU)")
    print(f"epoch time, 2 Ray workers (1 thread each):      {two:.1f} s   ratio to 1 worker {two / one:.3f}")
    print(
        f"wall per epoch incl. report + checkpoint: 1 worker {one_wall / args.epochs:.1f} s, "
        f"2 workers {two_wall / args.epochs:.1f} s (cluster already running)"
    )


if __name__ == "__main__":
    main()
