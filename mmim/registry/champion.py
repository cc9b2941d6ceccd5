"""The registry's champion, read for a new run: the data it was trained on (for the drift check)
and its scores on the run's data (for the head-to-head)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from mmim.core.errors import MMIMInputError, first_line
from mmim.data.checks import LabelProfile
from mmim.registry.gating import Scores
from mmim.registry.server import local_checkpoint, tracking_uri
from mmim.registry.tracking import DATA_PROFILE
from mmim.registry.versions import champion_version
from mmim.training.predict import predict_checkpoint

log = logging.getLogger(__name__)


def logged_profile(run_id: str) -> LabelProfile | None:
    """The label profile a run logged (None, with a warning, when it has none or it is unreadable:
    runs from before profiles, models registered by hand)."""
    with tempfile.TemporaryDirectory(prefix="mmim-profile-") as workdir:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=DATA_PROFILE, dst_path=workdir, tracking_uri=tracking_uri()
            )
            return LabelProfile.model_validate_json(Path(path).read_bytes())
        except (MlflowException, OSError, ValidationError) as error:
            log.warning("run %s: no readable %s (%s); drift not compared", run_id, DATA_PROFILE, first_line(error))
            return None


def champion_profile(model_name: str) -> LabelProfile | None:
    """The label profile of the data the registry's champion was trained on (None: no champion,
    or its run logged none)."""
    client = MlflowClient(tracking_uri())
    version = champion_version(client, model_name)
    if version is None:
        return None
    run_id = client.get_model_version(model_name, version).run_id
    return logged_profile(run_id) if run_id else None


def champion_scores(model_name: str, version: str, store: str | Path) -> tuple[Scores | None, str | None]:
    """Version `version` of `model_name` scored on the valid and test splits of `store`: (scores,
    None), or (None, why) when it cannot be scored on this data (another tokenizer, other feature
    dims, another extractor: no guess)."""
    try:
        with local_checkpoint(f"models:/{model_name}/{version}") as checkpoint:
            return predict_checkpoint(checkpoint, store), None
    except MMIMInputError as error:
        reason = first_line(error)
        log.warning("champion v%s cannot be scored on %s: %s", version, store, reason)
        return None, reason
