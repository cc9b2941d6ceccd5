"""What the libraries we call may print on a terminal that a person reads (`mmim`, the flow)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


def quiet_libraries() -> None:
    """No per-file progress bars or hints from the libraries we call."""
    # MLflow's artifact download bars and its integer-column schema hint (class7 is an int).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
    # transformers (and the Hugging Face hub) read these when they are imported; a command
    # that never needs them does not pay for importing them here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: tell it directly
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def counter(console: Console, description: str) -> Iterator[tuple[Progress, TaskID]]:
    """A transient progress bar with a count, on `console`: (progress, its task)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress, progress.add_task(description, total=None)


class OneLine(logging.Formatter):
    """A log record as one line, as the commands print theirs: `message`, or `warning: message`."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def configure_logging(console: Console, verbose: bool) -> None:
    """The command line's logging, on `console`: a line per message, or with -v, debug and rich's columns."""
    # -v: rich's columns (time, level) for reading a long run; otherwise a line per message, so
    # that an epoch's line fits the terminal's 80 columns (rich's handler still: it writes above
    # the progress bars)
    handler = RichHandler(console=console, show_path=False, show_time=verbose, show_level=verbose)
    if not verbose:
        handler.setFormatter(OneLine())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    if not verbose:  # the progress hooks print one line per epoch, extract its own summary
        for module in (
            "mmim.training.engine",
            "mmim.data.store_writer",
            "mmim.data.recordings.job",
            "mmim.data.recordings.sample",
            "mmim.lifecycle.batch_scoring",
        ):
            logging.getLogger(module).setLevel(logging.WARNING)
        quiet_libraries()
