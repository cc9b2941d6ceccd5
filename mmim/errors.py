"""The exception types that mean "the user gave us something we cannot use".

Everything that a person can fix by changing a file, a setting or a command line
raises `MMIMInputError` with a one-line message that names the file, field or
setting. The CLI turns it into that line on stderr and exit code 2; anything else
is a bug and keeps its traceback.

`ServiceUnavailableError` is the one kind of bad input that may fix itself: a remote
service (a DVC remote, an MLflow server, a Ray cluster) that did not answer. The
pipeline retries those; everything else fails at once.
"""


class MMIMInputError(Exception):
    """Bad input: a config value, a feature store file, a checkpoint, a request."""


class ServiceUnavailableError(MMIMInputError):
    """A remote service did not answer (refused, timed out, unreachable); worth retrying."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
