"""The trained model as an MLflow run logs it: the selected epoch's figures, the config, the
learning curves, and the pyfunc model that carries the checkpoint (weights, config, tokenizer).

The logged model (`models:/m-...`) is what gets scored against the champion and registered:
the local checkpoint is only a copy of it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from mmim.core.store import FeatureStore
from mmim.registry.plots import learning_curves
from mmim.registry.serving import model_signature
from mmim.registry.tracking import TrackedRun, TrainingRun, log_figures
from mmim.training.train import TrainingResult

PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_entry.py")


def input_example(store: FeatureStore, texts: list[str]) -> pd.DataFrame:
    """Two rows shaped like real requests, from the store's test split."""
    split = store["test"]
    return pd.DataFrame(
        {
            "text": texts,
            "audio": [split.sequence("audio", i)[:4].tolist() for i in range(len(texts))],
            "vision": [split.sequence("vision", i)[:4].tolist() for i in range(len(texts))],
        }
    )


def log_model(run: TrainingRun, result: TrainingResult) -> TrackedRun:
    """Log the selected epoch's figures (selected_*), the learning curves, the config and the pyfunc
    model to `run`. (Logging a model needs MLflow's active-run API, which marks the run FINISHED as
    it lets go of it; `tracked_run` still sets the final status, FAILED if anything after this raises.)"""
    selected = {f"selected_{k}": v for k, v in result.best.items() if k.startswith(("valid_", "test_"))}
    log_figures(run.client, run.run_id, selected)
    epochs = sorted(result.epochs, key=lambda e: e["epoch"])
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        (work / "config.json").write_text(json.dumps(run.config.model_dump(), indent=2))
        (work / "metrics.json").write_text(json.dumps({"epochs": epochs, "selected": result.best}, indent=2))
        learning_curves(work / "learning_curves.png", epochs)
        for name in ("config.json", "metrics.json", "learning_curves.png"):
            run.client.log_artifact(run.run_id, str(work / name))
    example = input_example(run.store, ["the movie was very good", "the plot was not great"])
    signature = model_signature(example, recordings=run.store.extractor is not None)
    # The model carries the checkpoint (weights, config, tokenizer): the run's only copy.
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_ENTRY),
            artifacts={"checkpoint": str(result.checkpoint)},
            signature=signature,
            input_example=example,
            pip_requirements=["mmim-pipeline"],
        )
    return TrackedRun(run.run_id, info.model_uri, run.experiment_id, run.data_version)
