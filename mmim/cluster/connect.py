"""Which Ray cluster a command runs on: the one it is told, or a private one it starts.

    connect(address)   `address` (ray.address, --ray-address), else RAY_ADDRESS; with neither,
                       a new local cluster for this process alone

A bare `ray.init()` would join whatever cluster the machine's last `ray start` left in
<temp dir>/ray/ray_current_cluster: another project's, possibly on another Python or Ray,
which ends in a version-mismatch traceback or in work landing on a stranger's cluster.
So the cluster is always named or private, never found. A cluster that does not answer
is one line naming its address (ServiceUnavailableError, exit 1): refused within seconds when
nothing listens there (`listening`; Ray would retry for minutes), and a version mismatch is
the two versions side by side (`why_not`).

Ray prints a few lines on the driver's terminal that say nothing is wrong; `quiet_false_alarms`
drops those (FALSE_ALARMS) where Ray prints them, and nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import socket

import ray
from ray._private.utils import get_num_cpus

from mmim.core.errors import ServiceUnavailableError, first_line

log = logging.getLogger(__name__)

LOCAL = "local"  # Ray's address for "start a new local cluster, even if one is running"


def connect(address: str | None = None, *, log_to_driver: bool = False, logging_level: int = logging.ERROR) -> None:
    """Join the cluster `address` or RAY_ADDRESS names, else start a private local one; nothing
    when this process is connected already (a test's cluster, the flow's first step)."""
    if ray.is_initialized():
        return
    chosen = address or os.environ.get("RAY_ADDRESS") or LOCAL
    listening(chosen)
    quiet_false_alarms()
    if chosen == LOCAL:
        log.info("starting a private Ray cluster (%d CPUs)", get_num_cpus())  # as Ray counts them (cgroups)
    else:
        log.info("joining the Ray cluster %s", chosen)
    try:
        ray.init(address=chosen, log_to_driver=log_to_driver, logging_level=logging_level)
    except (ConnectionError, TimeoutError, RuntimeError) as error:  # unreachable, or another Ray/Python
        where = "a new local Ray cluster" if chosen == LOCAL else f"Ray cluster {chosen}"
        raise ServiceUnavailableError(why_not(where, error)) from None


# What Ray prints on the driver's terminal that says nothing is wrong, dropped where Ray prints
# it (its cluster messages and, with ray.log_to_driver, the workers' lines); errors all pass.
FALSE_ALARMS = (
    # the raylet, once Tune trials, Ray Train controllers and workers outnumber the CPUs: they are
    # meant to, most of them wait without a CPU
    re.compile(r"PYTHON worker processes have been started on node"),
)


def quiet_false_alarms() -> None:
    """Filter FALSE_ALARMS out of what Ray prints on this driver (once per process)."""
    printer = ray._private.worker.print_to_stdstream
    if getattr(printer, "drops_false_alarms", False):
        return

    def print_without_false_alarms(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data["lines"] if not any(alarm.search(line) for alarm in FALSE_ALARMS)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    print_without_false_alarms.drops_false_alarms = True  # type: ignore[attr-defined]
    ray._private.worker.print_to_stdstream = print_without_false_alarms


def quiet_ray_data(log: logging.Logger) -> None:
    """Ray Data without its progress bars and start banner (the caller draws its own progress), and,
    where `log` is quiet, without its notes and operator statistics too."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def listening(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once an address (`host:port`, `ray://host:port`) where nothing listens: Ray
    itself would retry for minutes before it gives up."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address)
    if not found:  # "local", "auto": Ray finds them on this machine
        return
    host, port = found.group(1), int(found.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except (OSError, ValueError, OverflowError) as error:
        raise ServiceUnavailableError(
            f"Ray cluster {address} does not answer ({getattr(error, 'strerror', None) or error})"
        ) from None


def why_not(where: str, error: Exception) -> str:
    """One line for a cluster this process cannot use; Ray's version mismatch (a list over eight
    lines) becomes the two versions side by side."""
    versions = re.findall(r"Ray: (\S+)\s+Python: (\S+)", str(error))
    if str(error).startswith("Version mismatch") and len(versions) == 2:
        (ray_there, python_there), (ray_here, python_here) = versions
        return (
            f"{where} runs Ray {ray_there} on Python {python_there}, this process Ray {ray_here} on Python "
            f"{python_here}: use a cluster started from this environment, or name none (unset ray.address and "
            "RAY_ADDRESS) for a private one"
        )
    return f"{where} does not answer ({first_line(error)})"
