"""Training progress in a terminal: a rich bar per stage, every finished epoch to a callback."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mmim.training.engine import EpochReports


def stage_progress(console: Console) -> Progress:
    """The bars `ProgressHooks` draws on; they vanish when training ends."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


class ProgressHooks(EpochReports):
    """A rich bar per stage; every finished epoch's flat metrics go to `on_epoch`."""

    def __init__(self, progress: Progress, on_epoch: Callable[[dict], None]) -> None:
        super().__init__(on_epoch)
        self.progress = progress
        self.task: TaskID | None = None

    def on_stage_start(self, epoch: int, stage: int, batches: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        label = "stage 0 (MMILB lld)" if stage == 0 else "stage 1 (task + MI)"
        self.task = self.progress.add_task(f"epoch {epoch} {label}", total=batches)

    def on_batch_end(self, epoch: int, stage: int) -> None:
        # No loss here: reading it every batch would make the host wait for the GPU. The
        # stage means are in the epoch's line.
        if self.task is not None:  # the engine starts a stage before its batches
            self.progress.update(self.task, advance=1)
