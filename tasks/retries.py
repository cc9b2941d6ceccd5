"""Which failures are worth another try: a service that did not answer.

Tasks that talk to a DVC remote, the MLflow server or a Ray cluster retry with
exponential backoff when the failure is transient. Bad input (`MMIMInputError`) and a
training run that Ray already gave up on (`DistributedTrainingError`, after
`ray.max_failures` restarts) fail at once: running them again gives the same answer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.tasks import exponential_backoff

from mmim.core.errors import ServiceUnavailableError

ATTEMPTS = 3  # retries after the first try
BACKOFF = exponential_backoff(backoff_factor=10)  # 10 s, 20 s, 40 s (with jitter)


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (ServiceUnavailableError, ConnectionError, TimeoutError)):
        return True
    if "mlflow" not in sys.modules:  # nothing raised an MlflowException without importing mlflow
        return False
    from mlflow.exceptions import MlflowException

    # MLflow reports an unreachable or failing server as an error with HTTP status >= 500
    # (after its own HTTP retries); 4xx statuses are requests that will fail again.
    return isinstance(error, MlflowException) and error.get_http_status_code() >= 500


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only when the failure was transient."""
    try:
        state.result()
    except Exception as error:  # the task's exception, re-raised by the state
        return is_transient(error)
    return False


P = ParamSpec("P")
R = TypeVar("R")


def service_task(
    task_run_name: str, cache_key_fn: Callable[..., str] | None = None
) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A step that talks to a service (DVC remote, MLflow, Ray): retried while the failure is
    transient. With a cache key, its result is stored as JSON and restored for the same key."""
    cached: dict[str, Any] = {"cache_key_fn": cache_key_fn, "result_serializer": "json"} if cache_key_fn else {}
    return task(
        retries=ATTEMPTS,
        retry_delay_seconds=BACKOFF,
        retry_condition_fn=retry_if_transient,
        task_run_name=task_run_name,
        **cached,
    )
