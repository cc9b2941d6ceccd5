"""The optional search step (`mmim tune`): Ray Tune over a search space, on a store that passed
the data checks. In the flow, `check_data` is the step before it; its best config then goes
through the rest of the lifecycle like any other config."""

from __future__ import annotations

from pathlib import Path

from mmim.cluster.tune import SearchResult, SearchSpec, search
from mmim.core.config import Config
from mmim.data.versioning import local_store, store_version
from mmim.lifecycle.checks import check_data


def search_checked(
    config: Config,
    spec: SearchSpec,
    trials: int,
    name: str,
    best_config_path: str | Path,
    concurrent: int | None = None,
) -> SearchResult:
    """The data checks (no drift comparison: no registry here), then the search `name` (resumed
    when ray.storage_path has it), its best trial's config written to `best_config_path`."""
    check_data(local_store(config.data), store_version(config.data), None)
    return search(config, spec, trials, name, best_config_path, concurrent)
