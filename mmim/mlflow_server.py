"""Which MLflow tracking server this process talks to, and how its failures read.

    tracking_uri()          MLFLOW_TRACKING_URI, default sqlite:///mlflow.db (the working directory)
    answering(what)         a block of MLflow calls for a command a person waits on: a server
                            that does not answer fails within seconds, as one line

MLflow's HTTP client retries a failing request for minutes (7 retries with exponential
backoff, 120 s timeout each). That suits a training job logging its last artifacts, not
`mmim registry list` typed at a prompt. Inside `answering`, unless the user has set them,
one retry and a 10 s timeout apply: MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_TIMEOUT set in the environment win.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException

from mmim.errors import MMIMInputError, ServiceUnavailableError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
QUICK_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


@contextmanager
def answering(what: str) -> Iterator[None]:
    """MLflow failures inside the block as one-line errors about `what`: a server that does not
    answer (or fails) is a ServiceUnavailableError, anything it refuses an MMIMInputError."""
    unset = [key for key in QUICK_FAILURE if key not in os.environ]
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
