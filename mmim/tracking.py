"""MLflow adapter: one run per training job, logged from the driver after training.

    params     the flattened, validated config (model.*, data.*, train.*, ray.*)
    tags       git commit, data version, source format, text encoder, Ray workers and GPUs
    metrics    every epoch (step = epoch): stage0_neg_lld, stage1_{loss,task,nce,lld,H},
               lr_{bert,main,mmilb}, {valid,test}_{MAE,Corr,Acc-7,Acc-5,Acc-2_*,F1_*};
               then selected_{valid,test}_* for the epoch chosen on validation
    artifacts  config.json, metrics.json, learning_curves.png, test_scatter.png,
               checkpoint/, and the pyfunc model "model" (tokenizer + config + weights)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

from mmim.checkpoint import load_checkpoint  # noqa: E402
from mmim.config import Config  # noqa: E402
from mmim.data import make_loader  # noqa: E402
from mmim.engine import predict_scores  # noqa: E402
from mmim.errors import MMIMInputError  # noqa: E402
from mmim.registry import Decision, register  # noqa: E402
from mmim.store import FeatureStore  # noqa: E402
from mmim.versioning import STORES_DIR, data_version, local_store  # noqa: E402

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")


@dataclass
class TrackedRun:
    run_id: str
    model_uri: str  # models:/m-... (MLflow 3's logged model)
    experiment_id: str


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def dataset_name(config: Config) -> str:
    return config.data.dvc_dataset or Path(config.data.store).name


def registered_model_name(config: Config) -> str:
    return config.tracking.registered_model or f"mmim-{dataset_name(config)}"


def flatten(config: Config) -> dict[str, str]:
    params = {}
    for section, values in config.model_dump().items():
        if isinstance(values, dict):
            params.update({f"{section}.{key}": str(value) for key, value in values.items()})
        else:
            params[section] = str(values)
    return params


def store_data_version(config: Config) -> str | None:
    """The DVC data version of `data/stores/<name>` in this working directory, if it has one."""
    root = Path.cwd()
    try:
        relative = Path(config.data.store).resolve().relative_to(root / STORES_DIR)
    except ValueError:
        return None
    if len(relative.parts) != 1:
        return None
    try:
        return data_version(relative.parts[0], root)
    except MMIMInputError:
        return None  # not a DVC output (yet): logged as "unversioned"


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def ensure_experiment(config: Config) -> str:
    """The experiment's id; created here, by the driver, with an explicit artifact location."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = config.tracking.artifact_location or Path("mlartifacts").resolve().as_uri()
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    return mlflow.create_experiment(config.tracking.experiment, artifact_location=location)


def _plots(directory: Path, epochs: list[dict], predictions: np.ndarray, truths: np.ndarray) -> None:
    steps = [int(e["epoch"]) for e in epochs]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [e["stage1_loss"] for e in epochs], marker="o", label="stage 1 loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for split in ("valid", "test"):
        axes[1].plot(steps, [e[f"{split}_MAE"] for e in epochs], marker="o", label=f"{split} MAE")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(directory / "learning_curves.png", dpi=100)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(truths, predictions, s=6, alpha=0.5)
    axis.plot([-3, 3], [-3, 3], color="grey", linewidth=1)
    axis.set_xlabel("true sentiment")
    axis.set_ylabel("predicted")
    axis.set_title("test split, selected epoch")
    figure.tight_layout()
    figure.savefig(directory / "test_scatter.png", dpi=100)
    plt.close(figure)


def input_example(store: FeatureStore, texts: list[str]) -> pd.DataFrame:
    """Two rows shaped like real requests, from the store's test split."""
    split = store["test"]
    return pd.DataFrame({
        "text": texts,
        "audio": [split.sequence("audio", i)[:4].tolist() for i in range(len(texts))],
        "vision": [split.sequence("vision", i)[:4].tolist() for i in range(len(texts))],
    })


def log_training(config: Config, epochs: list[dict], selected: dict, checkpoint: Path, *,
                 data_version: str | None = None, source: str | None = None) -> TrackedRun:
    """Log a finished training job (per-epoch flat metrics, the selected epoch's) to MLflow."""
    experiment_id = ensure_experiment(config)
    store = FeatureStore(local_store(config.data), verify_checksums=False)
    model, _, tokenizer = load_checkpoint(checkpoint)
    predictions, truths = predict_scores(model, make_loader(store["test"], 64, shuffle=False),
                                         next(model.parameters()).device)
    tags = {
        "git_commit": git_commit(),
        "data_version": data_version or store_data_version(config) or "unversioned",
        "source_format": source or store.manifest.get("source", "unknown"),
        "text_encoder": config.model.text_encoder,
        "ray_workers": str(config.ray.num_workers),
        "gpus": str(config.ray.num_workers if config.ray.use_gpu else 0),
        "dataset": dataset_name(config),
    }
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run, \
            tempfile.TemporaryDirectory() as workdir:
        mlflow.log_params(flatten(config))
        for epoch in epochs:
            step = int(epoch["epoch"])
            mlflow.log_metrics({k.replace("-", "_"): float(v) for k, v in epoch.items()
                                if k != "epoch" and isinstance(v, (int, float))}, step=step)
        mlflow.log_metrics({f"selected_{k.replace('-', '_')}": float(v) for k, v in selected.items()
                            if k.startswith(("valid_", "test_"))})
        work = Path(workdir)
        (work / "config.json").write_text(json.dumps(config.model_dump(), indent=2))
        (work / "metrics.json").write_text(json.dumps({"epochs": epochs, "selected": selected}, indent=2))
        _plots(work, epochs, predictions, truths)
        for name in ("config.json", "metrics.json", "learning_curves.png", "test_scatter.png"):
            mlflow.log_artifact(str(work / name))
        mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
        example = input_example(store, ["the movie was very good", "the plot was not great"])
        signature = infer_signature(example, pd.DataFrame({"score": [0.0], "polarity": ["positive"],
                                                           "class7": [0]}))
        info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_ENTRY),
                                       artifacts={"checkpoint": str(checkpoint)}, signature=signature,
                                       input_example=example, pip_requirements=["mmim-pipeline"])
        return TrackedRun(run.info.run_id, info.model_uri, experiment_id)


def track_and_register(config: Config, epochs: list[dict], selected: dict, checkpoint: Path,
                       data_version: str | None = None) -> tuple[TrackedRun, Decision]:
    """Log the run and register its model, gating `champion` on the validation metric."""
    run = log_training(config, epochs, selected, checkpoint, data_version=data_version)
    value = float(selected[f"valid_{config.tracking.metric}"])
    decision = register(mlflow.MlflowClient(tracking_uri()), run.model_uri, registered_model_name(config),
                        config.tracking.metric, config.tracking.margin, value)
    return run, decision
