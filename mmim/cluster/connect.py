"""Which Ray cluster a command runs on: the one it is told, or a private one it starts.

    connect(address)   `address` (ray.address, --ray-address), else RAY_ADDRESS; with neither,
                       a new local cluster for this process alone

A bare `ray.init()` would join whatever cluster the machine's last `ray start` left in
<temp dir>/ray/ray_current_cluster: another project's, possibly on another Python or Ray,
which ends in a version-mismatch traceback or in work landing on a stranger's cluster.
So the cluster is always named or private, never found. A cluster that does not answer
is one line naming its address (ServiceUnavailableError, exit 1).
"""

from __future__ import annotations

import logging
import os

import ray

from mmim.core.errors import ServiceUnavailableError, first_line

LOCAL = "local"  # Ray's address for "start a new local cluster, even if one is running"


def connect(address: str | None = None, *, log_to_driver: bool = False, logging_level: int = logging.ERROR) -> None:
    """Join the cluster `address` or RAY_ADDRESS names, else start a private local one; nothing
    when this process is connected already (a test's cluster, the flow's first step)."""
    if ray.is_initialized():
        return
    chosen = address or os.environ.get("RAY_ADDRESS") or LOCAL
    try:
        ray.init(address=chosen, log_to_driver=log_to_driver, logging_level=logging_level)
    except (ConnectionError, TimeoutError, RuntimeError) as error:  # unreachable, or another Ray/Python
        where = "a new local Ray cluster" if chosen == LOCAL else f"Ray cluster {chosen}"
        raise ServiceUnavailableError(f"{where} does not answer ({first_line(error)})") from None
