"""The one exception type that means "the user gave us something we cannot use".

Everything that a person can fix by changing a file, a setting or a command line
raises `MMIMInputError` with a one-line message that names the file, field or
setting. The CLI turns it into that line on stderr and exit code 2; anything else
is a bug and keeps its traceback.
"""


class MMIMInputError(Exception):
    """Bad input: a config value, a feature store file, a checkpoint, a request."""
