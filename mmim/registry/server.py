"""Which MLflow tracking server this process talks to, what things are called there, and how
its failures read. Light on purpose: mlflow itself is imported only where a call needs it, so
`mmim predict` on a directory and the pipeline's modules load without it.

    tracking_uri()          MLFLOW_TRACKING_URI, default sqlite:///mlflow.db (the working directory)
    registered_model_name() tracking.registered_model, default mmim-<dataset>
    answering(what)         a block of MLflow calls for a command a person waits on: a server
                            that does not answer fails within seconds, as one line (or, not
                            quick, after MLflow's own retries)
    local_checkpoint(spec)  a checkpoint directory, or the one inside a registered model

MLflow's HTTP client retries a failing request for minutes (7 retries with exponential
backoff, 120 s timeout each). That suits a training job logging its last artifacts, not
`mmim registry list` typed at a prompt. Inside `answering`, unless the user has set them,
one retry and a 10 s timeout apply: MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_TIMEOUT set in the environment win.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmim.core.config import Config
from mmim.core.errors import MMIMInputError, ServiceUnavailableError, first_line

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
QUICK_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# A database (SQLAlchemy URL) or a tracking server. MLflow's file store ("./mlruns", file://)
# has no model registry aliases and is in maintenance mode: refused rather than half working.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), refused in one line naming the variable
    when it is not a database or a server, or names a sqlite file in a directory that does not
    exist (MLflow would create the directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI  # set but empty: as unset
    scheme = uri.partition(":")[0].partition("+")[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise MMIMInputError(
            f"MLFLOW_TRACKING_URI {uri!r}: not a database or a tracking server (expected e.g. "
            "sqlite:///mlflow.db, postgresql://..., http://host:5000)"
        )
    if scheme == "sqlite" and uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not directory.is_dir():
            raise MMIMInputError(f"MLFLOW_TRACKING_URI {uri!r}: directory {directory} does not exist")
    return uri


def absolute_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI as a Ray worker can use it: a relative sqlite path made absolute (workers
    run in directories of their own). On a cluster of several machines, use a tracking server."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    return uri


def dataset_name(config: Config) -> str:
    return config.data.dvc_dataset or Path(config.data.store).name


def registered_model_name(config: Config) -> str:
    return config.tracking.registered_model or f"mmim-{dataset_name(config)}"


@contextmanager
def answering(what: str, quick: bool = True) -> Iterator[None]:
    """MLflow failures inside the block as one-line errors about `what`: a server that does not
    answer (or fails) is a ServiceUnavailableError, anything it refuses an MMIMInputError. Not
    `quick`: MLflow keeps its own retries (for what comes after an hour of training)."""
    from mlflow.exceptions import MlflowException

    unset = [key for key in QUICK_FAILURE if key not in os.environ] if quick else []
    os.environ.update({key: QUICK_FAILURE[key] for key in unset})
    try:
        yield
    except MlflowException as error:
        if error.get_http_status_code() >= 500:  # how MLflow reports a server it cannot reach
            raise ServiceUnavailableError(
                f"{what}: tracking server {tracking_uri()} does not answer (MLFLOW_TRACKING_URI; {first_line(error)})"
            ) from None
        raise MMIMInputError(f"{what}: {first_line(error)}") from None
    except (ConnectionError, TimeoutError) as error:
        raise ServiceUnavailableError(
            f"{what}: tracking server {tracking_uri()} does not answer ({first_line(error)})"
        ) from None
    finally:
        for key in unset:
            os.environ.pop(key, None)


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def is_model_uri(spec: str) -> bool:
    """Whether `spec` names an MLflow model (models:/..., runs:/...) rather than a directory."""
    return spec.startswith(MODEL_URI_SCHEMES)


def _checkpoint_in(model_dir: Path, uri: str) -> Path:
    """The checkpoint directory inside a downloaded mmim pyfunc model (its artifact "checkpoint")."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    except (OSError, MlflowException):
        raise MMIMInputError(f"{uri}: not an MLflow model (no readable MLmodel file)") from None
    path = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if path is None:
        raise MMIMInputError(f'{uri}: not an mmim model (its MLmodel has no "checkpoint" artifact)')
    return model_dir / path


def model_version_uri(uri: str) -> str:
    """models:/<name>@<alias> as the version the alias names now (models:/<name>/<version>), so
    that a long job scores with one version throughout; other URIs as they are."""
    found = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", uri)
    if not found:
        return uri
    from mlflow import MlflowClient

    with answering(uri):
        version = MlflowClient(tracking_uri()).get_model_version_by_alias(found[1], found[2]).version
    return f"models:/{found[1]}/{version}"


@contextmanager
def local_checkpoint(spec: str) -> Iterator[Path]:
    """A checkpoint directory: `spec` itself, or, for an MLflow model URI (models:/<name>@<alias>,
    models:/<name>/<version>, runs:/<run id>/model), the checkpoint the model carries, downloaded
    to a temporary directory that is removed afterwards."""
    if not is_model_uri(spec):
        yield Path(spec)
        return
    import mlflow

    log.info("downloading the checkpoint of %s", spec)
    with tempfile.TemporaryDirectory(prefix="mmim-model-") as workdir:
        with answering(spec):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=spec, dst_path=workdir, tracking_uri=tracking_uri()
            )
        yield _checkpoint_in(Path(local), spec)
