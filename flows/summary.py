"""What a retraining did, as the flow returns it, and its renderings: the table and lines the
command line prints, and the markdown artifact `retrain-<dataset>`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from mmim.core.metrics import METRIC_NAMES
from mmim.registry.server import tracking_uri
from mmim.tables import metrics_table, one_line, shorten
from tasks import DataChecks, Registration, TrainedModel
from tasks.caching import Origin
from tasks.registration import Champion
from tasks.tuning import TunedConfig


class RetrainSummary(BaseModel):
    dataset: str
    data_version: str
    stages_run: list[str]  # what DVC ran for the extraction step (this run's, or the restored run's)
    extraction: Origin | None  # the flow run that extracted
    files_pushed: int | None  # None: push skipped
    data_checks: DataChecks
    run_id: str
    run_link: str  # the run in the MLflow UI, or its runs:/ URI when there is no UI for the tracking URI
    model_uri: str
    checkpoint: str | None  # the local copy of the selected epoch's checkpoint (OUTPUT_DIR/best)
    selected_epoch: int
    evaluation: dict[str, dict[str, float]]  # split -> metric -> value, from the logged checkpoint
    registration: Registration
    champion: Champion | None  # the registry's champion when the run ended
    cached_steps: list[str]  # restored from an earlier run with the same content key
    config: str  # the config file trained (as given, or `tuned_config`)
    tuning: TunedConfig | None = None  # this run's search, when it ran one
    seeds: dict | None = None  # with train.seeds: each seed's figures, their mean and std

    @property
    def decision(self) -> str:
        r = self.registration
        return f"{r.model_name} v{r.version}: {r.decision}"

    def provenance(self, step: str, what: str, origin: Origin | None = None) -> str:
        """`what` a step did in this run, or which earlier flow run did it when it was restored."""
        if step not in self.cached_steps:
            return f"this run: {what}"
        source = f"flow run {origin.flow_run} at {origin.at}" if origin else "an earlier flow run"
        return f"restored from cache: {what}, by {source}"


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local tracking store


def what_was_trained(trained: TrainedModel) -> dict[str, Any]:
    """The summary's fields about the trained model: its run, model and checkpoint."""
    return {
        "run_id": trained.run_id,
        "run_link": run_link(trained),
        "model_uri": trained.model_uri,
        "checkpoint": trained.checkpoint,
        "selected_epoch": trained.epoch,
    }


def run_link(trained: TrainedModel) -> str:
    """The run's page: on the tracking server, or under `mlflow ui` for a local store."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    elif uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        base = MLFLOW_UI
    else:  # databricks and other hosted stores: no URL we can know
        return f"runs:/{trained.run_id}"
    # MLflow 3.17's UI opens in its GenAI mode unless the address (or the browser's last
    # choice) asks for model training, whatever the experiment's kind tag says.
    return f"{base}/#/experiments/{trained.experiment_id}/runs/{trained.run_id}?workflowType=machine_learning"


def local(path: str | Path) -> str:
    """`path` relative to the working directory when it is below it (shorter to copy)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def figure_columns(summary: RetrainSummary) -> dict[str, dict[str, float]]:
    """Column -> metric -> value: the new model's figures, then the champion's on the same data."""
    compared = summary.registration.compared
    columns = dict(summary.evaluation)
    columns.update(
        {
            f"champion v{compared.champion_version} {split}": figures
            for split, figures in (compared.champion or {}).items()
        }
    )
    return columns


def summary_table(summary: RetrainSummary) -> Table:
    version = shorten(summary.data_version, 20)  # whole on the `data version` line below the table
    title = f"retrain {summary.dataset}: epoch {summary.selected_epoch}, on data {version}"
    return one_line(metrics_table(title, figure_columns(summary)))


def checkpoint_here(summary: RetrainSummary) -> str | None:
    """The local checkpoint, if it is on this machine (a cached result may name another's)."""
    if summary.checkpoint and Path(summary.checkpoint).is_dir():
        return local(summary.checkpoint)
    return None


def champion_line(champion: Champion | None) -> str:
    if champion is None:
        return "none"
    figure = (
        f"no {champion.metric} on this data"
        if champion.value is None
        else f"{champion.metric}={champion.value:.4f} on this data"
    )
    return f"{champion.model_name} v{champion.version} ({figure})"


def _seeds(seeds: dict) -> str:
    mean, std = seeds["mean"]["valid_MAE"], seeds["std"]["valid_MAE"]
    listed = ", ".join(seeds["seeds"])
    return f"{listed}: valid MAE {mean:.4f} ± {std:.4f} (gated on the mean); registered: seed {seeds['best_seed']}"


def _checks(checks: DataChecks) -> str:
    against = f"against {checks.previous_version}" if checks.previous_version else "no previous data to compare with"
    return f"{checks.verdict} ({against})" + "".join(f"; {warning}" for warning in checks.warnings)


def summary_rows(
    summary: RetrainSummary, link: Callable[[str, str], str] = lambda text, url: url
) -> list[tuple[str, str]]:
    """(label, text) of what this run did and what it restored; `link(text, url)` renders a link."""
    ran = f"ran {', '.join(summary.stages_run)}" if summary.stages_run else "store up to date"
    pushed = (
        "skipped"
        if summary.files_pushed is None
        else f"{summary.files_pushed} files sent"
        if summary.files_pushed
        else "0 files sent (the remote had them)"
    )
    extracted = summary.provenance("extract_features", ran, summary.extraction)
    trained = summary.provenance("train", f"epoch {summary.selected_epoch} selected")
    review = summary.registration.needs_review
    return [
        ("data version", f"{summary.data_version} ({extracted})"),
        ("DVC push", pushed),
        ("data checks", _checks(summary.data_checks)),
        ("config", summary.tuning.text() if summary.tuning else summary.config),
        *([("seeds", _seeds(summary.seeds))] if summary.seeds else []),
        ("MLflow run", f"{link(summary.run_id, summary.run_link)} ({trained})"),
        ("model", summary.model_uri),
        ("checkpoint", checkpoint_here(summary) or "not on this machine (use the model)"),
        ("compared", summary.registration.compared.text()),
        ("registry", summary.provenance("register", summary.decision, summary.registration.origin)),
        *(
            [
                (
                    "NEEDS REVIEW",
                    f"{review}; a person decides: mmim registry promote --name "
                    f"{summary.registration.model_name} --version {summary.registration.version}",
                )
            ]
            if review
            else []
        ),
        ("champion now", champion_line(summary.champion)),
        ("from cache", ", ".join(summary.cached_steps) or "nothing"),
    ]


def summary_markdown(summary: RetrainSummary) -> str:
    columns = figure_columns(summary)
    rows = "\n".join(
        f"| {name} | " + " | ".join(f"{figures[name]:.4f}" for figures in columns.values()) + " |"
        for name in METRIC_NAMES
    )
    facts = "\n".join(
        f"| {label} | {text} |" for label, text in summary_rows(summary, lambda text, url: f"[{text}]({url})")
    )
    return f"""# Retraining on {summary.dataset}

| | |
|---|---|
{facts}
| serve | `mmim serve --model models:/{summary.registration.model_name}@champion` |

Selected epoch {summary.selected_epoch} (lowest validation MAE); figures of the logged checkpoint,
and of the champion it was compared with, on data {summary.data_version}:

| metric | {" | ".join(columns)} |
|---|{"---|" * len(columns)}
{rows}
"""
