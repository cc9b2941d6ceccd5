"""When a task may be skipped: cache keys built from content, never from paths.

    extract_features   inputs of the DVC pipeline up to extract@<dataset> + code version
    train              data version + config digest + code version + MLflow server/experiment
    log_model          MLflow run + MLflow server
    evaluate           MLflow run + data version + registered model name + bootstrap settings
                       (a run restored from the cache keeps the comparison it was gated on)
    register           MLflow run's model + registered model name + gating settings + MLflow server

A key that matches a completed run of the same task restores that run's result (state
"Cached") instead of running it; results that carry an `Origin` say which flow run made
them, and when, so that a summary can tell a restored result from this run's. Paths
never enter a key: two checkouts with the same content share results, and moving a
checkout does not invalidate them. The MLflow server
does, because the cached results name runs and versions that live there.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from prefect.runtime import flow_run
from pydantic import BaseModel

import mmim
from mmim.core.config import Config
from mmim.data.versioning import input_fingerprint
from mmim.registry.server import tracking_uri

CODE_ROOT = Path(mmim.__file__).parent
# Settings that name places, not content: the data version stands in for the store.
PLACES = {
    "data": ("store", "dvc_url", "dvc_rev"),
    "ray": ("address", "storage_path", "run_name"),
    None: ("output_dir",),
}


class Origin(BaseModel):
    """The flow run that computed a result; a result restored from the cache keeps it."""

    flow_run: str  # its name, e.g. vivacious-husky
    at: str  # when, e.g. 2025-06-02 03:04:05 UTC


def origin() -> Origin:
    """The current flow run (called inside a task)."""
    return Origin(flow_run=flow_run.name or "(no flow run)", at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@cache
def code_version() -> str:
    """A hash of the `mmim` package's source files (code and packaged data)."""
    files = sorted(p for p in CODE_ROOT.rglob("*") if p.suffix in (".py", ".json") and p.is_file())
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(str(path.relative_to(CODE_ROOT)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def config_digest(config: Config) -> str:
    """A hash of the settings that shape the model, the data it sees and how it is tracked."""
    settings: dict[str, Any] = config.model_dump()
    for section, fields in PLACES.items():
        target = settings if section is None else settings[section]
        for field in fields:
            target.pop(field, None)
    return digest(json.dumps(settings, sort_keys=True))


def tracking_server() -> str:
    """The MLflow tracking URI, with a relative sqlite path made absolute."""
    uri = tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


# Prefect calls these with the task run context and the task's arguments.


def extraction_key(context, arguments: dict[str, Any]) -> str:
    fingerprint = input_fingerprint(arguments["dataset"], arguments["project_dir"])
    return digest("extract_features", arguments["dataset"], fingerprint, code_version())


def training_key(context, arguments: dict[str, Any]) -> str:
    config: Config = arguments["config"]
    return digest(
        "train",
        arguments["features"].data_version,
        config_digest(config),
        code_version(),
        tracking_server(),
        config.tracking.experiment,
    )


def logging_key(context, arguments: dict[str, Any]) -> str:
    return digest("log_model", arguments["training"].run_id, tracking_server())


def evaluation_key(context, arguments: dict[str, Any]) -> str:
    tracking = arguments["config"].tracking
    return digest(
        "evaluate",
        arguments["trained"].run_id,
        arguments["features"].data_version,
        arguments["model_name"],
        tracking.metric,
        str(tracking.min_confidence),
        str(tracking.bootstrap_resamples),
        tracking_server(),
    )


def registration_key(context, arguments: dict[str, Any]) -> str:
    return digest(
        "register",
        arguments["trained"].model_uri,
        arguments["model_name"],
        str(arguments["margin"]),
        str(arguments["min_confidence"]),
        tracking_server(),
    )
