"""Challenger and champion scored on the same data, and the comparison recorded on the run.

The challenger is the model as logged to MLflow (its checkpoint fetched back), not the local
copy that training left: what is registered is what was scored.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient

from mmim.core.config import Config
from mmim.registry.champion import champion_scores
from mmim.registry.gating import HeadToHead, head_to_head
from mmim.registry.plots import scatter_on_test
from mmim.registry.server import local_checkpoint, tracking_uri
from mmim.registry.tracking import log_figures
from mmim.training.predict import predict_checkpoint


def compare_with_champion(
    config: Config,
    run_id: str,
    model: str | Path,
    store: str | Path,
    data_version: str,
    name: str,
    champion: str | None,
    other_seeds: list[Path] | None = None,
) -> HeadToHead:
    """Score `model` (a checkpoint directory, or a logged model's URI: fetched back from MLflow)
    and version `champion` of `name` (None: no champion) on `store` (data
    version `data_version`) and record both on the run: tags gate.*, metrics eval_* and champion_*,
    and test_scatter.png (the only time the run's model is scored on test after training).
    `other_seeds`: the checkpoints of the run's other seeds; the run is then gated on the mean."""
    client = MlflowClient(tracking_uri())
    with local_checkpoint(str(model)) as checkpoint:
        ours = predict_checkpoint(checkpoint, store)
    with tempfile.TemporaryDirectory() as workdir:
        scatter = Path(workdir) / "test_scatter.png"
        scatter_on_test(scatter, *ours["test"])
        client.log_artifact(run_id, str(scatter))
    seeds = [ours, *(predict_checkpoint(other, store) for other in other_seeds or [])]
    theirs, unscorable = champion_scores(name, champion, store) if champion else (None, None)
    compared = head_to_head(
        data_version,
        config.tracking.metric,
        seeds,
        theirs,
        champion,
        unscorable=unscorable,
        resamples=config.tracking.bootstrap_resamples,
        confidence=config.tracking.min_confidence,
    )
    scored = [(f"eval_{split}", values) for split, values in compared.challenger.items()]
    scored += [(f"champion_{split}", values) for split, values in (compared.champion or {}).items()]
    figures = {f"{prefix}_{metric}": value for prefix, values in scored for metric, value in values.items()}
    log_figures(client, run_id, figures, tags=compared.tags())
    return compared
