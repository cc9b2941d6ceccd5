"""The exception types behind the command line's exit codes.

    0  done
    1  a service did not answer, or the run failed (ServiceUnavailableError, a failed training)
    2  bad input: something a person fixes by changing a file, a setting or a command line

Bad input raises `MMIMInputError` with a one-line message that names the file, field
or setting. `ServiceUnavailableError` is a remote service (a DVC remote, an MLflow
server, a Ray cluster) that did not answer: nothing is wrong with the input, and the
same command may succeed later, so the pipeline retries those; everything else fails
at once. The CLI prints either as one line on stderr; anything else is a bug and keeps
its traceback.
"""


class MMIMInputError(Exception):
    """Bad input: a config value, a feature store file, a checkpoint, a request."""


class ServiceUnavailableError(Exception):
    """A remote service did not answer (refused, timed out, unreachable); worth retrying."""


class DistributedTrainingError(RuntimeError):
    """A Ray training run that failed for good (after `ray.max_failures` retries)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (with the next, when the first only announces it; its
    class name when it has none), for one-line reports."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return error.__class__.__name__
    # "Training failed due to controller error:" says nothing before the line that follows it
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: the weights are lost, nothing later in the run is worth having."""


class SearchInterrupted(RuntimeError):
    """A hyperparameter search stopped before its trials ended (Ctrl-C); the same command resumes it."""
