"""Every epoch's report reaches the driver as it arrives, whatever Ray keeps.

Ray's own record of the reports (`Result.metrics_dataframe`) keeps only those whose
checkpoints survived `ray.keep_checkpoints`, and only at the end. So a callback in Ray
Train's controller (a separate process on the driver's node) forwards each report to a
small actor beside it, which a driver thread drains while `fit` runs.

This module imports Ray and nothing of the model: the controller and the inbox actor load
it to run these classes, and need neither torch nor transformers for that.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import ray
from ray.train import UserCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

DRAIN_SECONDS = 0.5  # how often the driver collects the reports forwarded so far


@ray.remote(num_cpus=0)
class ReportInbox:
    """Reports forwarded by the controller, until the driver takes them."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def put(self, metrics: dict) -> None:
        self.reports.append(metrics)

    def take(self) -> list[dict]:
        reports, self.reports = self.reports, []
        return reports


class ForwardReports(UserCallback):
    """Runs in Ray Train's controller: hands rank 0's metrics of every report to the inbox."""

    def __init__(self, inbox) -> None:
        self.inbox = inbox

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        # Waited for, so that a report is in the inbox before `fit` returns.
        ray.get(self.inbox.put.remote(dict(metrics[0])))


class ReportFollower:
    """Drains the inbox in a driver thread while `fit` runs; calls `on_report` for each report."""

    def __init__(self, on_report: Callable[[dict], None] | None) -> None:
        self.on_report = on_report
        # On the driver's node, beside Ray Train's controller: losing another node must not lose reports.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.inbox = ReportInbox.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
        self.reports: list[dict] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="mmim-reports", daemon=True)

    def __enter__(self) -> "ReportFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()
        ray.kill(self.inbox)

    def _follow(self) -> None:
        while True:
            finished = self._done.wait(DRAIN_SECONDS)
            for metrics in ray.get(self.inbox.take.remote()):
                self.reports.append(metrics)
                if self.on_report is not None:
                    try:
                        self.on_report(metrics)
                    except Exception:  # a tracking hiccup must not lose the training
                        log.warning("handling the report of epoch %s failed", metrics.get("epoch"), exc_info=True)
            if finished:
                return

    def epochs(self) -> list[dict]:
        """One report per epoch, in epoch order; an epoch redone after a failure keeps its last try."""
        return sorted({int(m["epoch"]): m for m in self.reports}.values(), key=lambda m: m["epoch"])
