"""The steps after training: log the model, score it against the champion on the same data,
register it. Each names the MLflow run it works on, so the pipeline can run them as separate
tasks (a retried step does not retrain) and `mmim train --track` one after the other."""

from __future__ import annotations

import logging
from pathlib import Path

from mmim.core.config import Config
from mmim.core.errors import MMIMInputError
from mmim.lifecycle.training import Trained
from mmim.registry import versions
from mmim.registry.gating import HeadToHead
from mmim.registry.logged_model import log_model
from mmim.registry.scoring import compare_with_champion
from mmim.registry.tracking import TrackedRun, TrainingRun, ending

log = logging.getLogger(__name__)

__all__ = ["Decision", "HeadToHead", "champion_now", "log_trained", "register_model", "score"]
Decision = versions.Decision  # register_model's result

# Training and the re-evaluation of its logged checkpoint run the same code on the same
# weights; larger gaps mean the logged artifact is not what was trained (or another device).
EVALUATION_TOLERANCE = 1e-3


def log_trained(config: Config, run_id: str, trained: Trained) -> TrackedRun:
    """Log the selected checkpoint as run `run_id`'s pyfunc model, with its figures and plots, and
    end the run (FINISHED; FAILED if logging fails)."""
    with ending(TrainingRun.attach(config, run_id)) as run:
        return log_model(run, trained.result)


def champion_now(model_name: str) -> str | None:
    """The version `champion` points at now: the one a challenger scored next is compared with."""
    return versions.champion_version(versions.registry_client(), model_name)


def score(
    config: Config,
    logged: TrackedRun,
    reported: float,
    other_seeds: list[Path],
    store: str | Path,
    model_name: str,
    champion: str | None,
) -> HeadToHead:
    """The model as logged to MLflow (not the local copy; training reported valid MAE `reported`
    for it) and version `champion` of `model_name` (None: no champion), scored on valid and test of
    `store` at the run's data version; recorded on the run (eval_*, champion_*, gate.*). With
    `other_seeds` (the other seeds' checkpoints), the challenger's figures are the seeds' mean."""
    missing = [str(path) for path in other_seeds if not path.is_dir()]
    if missing:
        raise MMIMInputError(f"{missing[0]}: a seed's checkpoint is not on this machine; rerun with refresh=True")
    compared = compare_with_champion(
        config, logged.run_id, logged.model_uri, store, logged.data_version, model_name, champion, other_seeds
    )
    gap = abs(compared.challenger["valid"]["MAE"] - reported)
    if compared.seeds == 1 and gap > EVALUATION_TOLERANCE:  # with seeds, the figures are their mean
        log.warning(
            "the logged checkpoint scores valid MAE %.4f, training reported %.4f",
            compared.challenger["valid"]["MAE"],
            reported,
        )
    return compared


def register_model(
    model_uri: str, compared: HeadToHead, model_name: str, margin: float, min_confidence: float | None
) -> versions.Decision:
    """A new version of `model_name` from the logged model `model_uri`; `champion` moves only if it
    beats the champion on the same data (by `margin`; with `min_confidence`, confidently)."""
    return versions.register(versions.registry_client(), model_uri, model_name, compared, margin, min_confidence)
