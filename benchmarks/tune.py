"""What does a Ray Tune search cost over running its trials one by one?

On the demo's synthetic store (default sizes, MiniLM encoder) and a local Ray cluster of
2 CPUs, runs --trials trials of --epochs epochs three times, with the same settings (the
learning rates listed below, 1 Ray Train worker of 1 CPU and 1 thread each):

  one by one    mmim.cluster.distributed.train_distributed per setting, tracked in MLflow the way
                `mmim train` tracks a run
  tune, 1       mmim.cluster.tune.search with --concurrent 1: Optuna + ASHA (grace period = all
                epochs, so no trial stops early and every way trains the same epochs),
                each trial an MLflow child run; against one by one, Tune's own cost
  tune          the same search with as many trials at once as the cluster has room for
                (2 here): what a user gets on these 2 CPUs

and prints each one's wall time and trials per hour, and the ratios to one by one. It
names the store's data version: figures from another store are not comparable.

    python benchmarks/tune.py [--trials 4] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from mmim.cluster.distributed import train_distributed
from mmim.cluster.tune import EarlyStopping, SearchSpec, search, trial_config
from mmim.core.config import Config
from mmim.core.store import FeatureStore
from mmim.data.synthetic import write_synthetic_store
from mmim.registry.tracking import tracked_run

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
RATES = [1e-3, 2e-3, 5e-4, 3e-3, 7e-4, 1.5e-3, 4e-3, 2.5e-3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, choices=range(1, len(RATES) + 1))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rates = RATES[: args.trials]
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        store = write_synthetic_store(work / "store", ENCODER, seed=0).root
        version = FeatureStore(store).content_version
        base = Config.model_validate(
            {
                "model": {"text_encoder": ENCODER},
                "data": {"store": str(store)},
                "train": {"epochs": args.epochs, "patience": args.epochs, "device": "cpu", "num_threads": 1},
                "ray": {"num_workers": 1, "storage_path": str(work / "ray")},
                "tracking": {"enabled": True, "artifact_location": str(work / "artifacts")},
                "output_dir": str(work / "out"),
            }
        )
        spec = SearchSpec(
            space={"train.lr_main": {"choice": rates}},
            start_from=[{"train.lr_main": rate} for rate in rates],
            early_stopping=EarlyStopping(grace_period=args.epochs),
        )
        ray.init(num_cpus=2, log_to_driver=False)  # with its dashboard, as `mmim tune` needs
        walls = {}
        for label, concurrent in (("tune, 1", 1), ("tune", None)):
            start = time.perf_counter()
            result = search(base, spec, args.trials, label.replace(", ", "-"), work / "best.yaml", concurrent)
            walls[label] = time.perf_counter() - start
            assert all(trial.epochs == args.epochs for trial in result.trials), result.trials

        start = time.perf_counter()
        for index, rate in enumerate(rates):
            config = trial_config(base, {"train.lr_main": rate})
            config = config.model_copy(
                update={
                    "ray": config.ray.model_copy(update={"run_name": f"alone-{index}"}),
                    "output_dir": str(work / f"alone-{index}"),
                }
            )
            with tracked_run(config) as run:
                train_distributed(config, run.log_epoch)
        walls["one by one"] = time.perf_counter() - start
        ray.shutdown()

    print(f"store: synthetic (default sizes), data version {version}, encoder {ENCODER}, CPU, 2 Ray CPUs")
    print(f"{args.trials} trials x {args.epochs} epochs, 1 Ray Train worker (1 CPU, 1 thread) each")
    alone = walls["one by one"]
    for label in ("one by one", "tune, 1", "tune"):
        wall = walls[label]
        ratio = "" if label == "one by one" else f"   ratio to one by one {wall / alone:.3f}"
        print(f"{label:<11} {wall:7.1f} s   {args.trials / wall * 3600:6.1f} trials/hour{ratio}")


if __name__ == "__main__":
    main()
