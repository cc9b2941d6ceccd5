"""Which failures are worth another try: a service that did not answer.

Tasks that talk to a DVC remote, the MLflow server or a Ray cluster retry with
exponential backoff when the failure is transient. Bad input (`MMIMInputError`) and a
training run that Ray already gave up on (`DistributedTrainingError`, after
`ray.max_failures` restarts) fail at once: running them again gives the same answer.
"""

from __future__ import annotations

import sys

from prefect.tasks import exponential_backoff

from mmim.errors import ServiceUnavailableError

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
