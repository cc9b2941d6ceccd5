"""Hyperparameter search as a pipeline step: `mmim tune` on the run's data version. The flow
trains the best trial's config, and writes it where later runs read it (`tuned_config`)."""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger
from pydantic import BaseModel

from mmim.core.config import Config
from tasks.features import FeatureStoreRef
from tasks.retries import service_task
from tasks.training import run_config


class TunedConfig(BaseModel):
    search: str  # its name in ray.storage_path and MLflow (the parent run's tag mmim.search)
    parent_run_id: str  # the search's MLflow run; every trial a child run
    trials: int
    best_valid_MAE: float
    best_settings: dict[str, Any]
    config: Config  # the best trial's config, which the flow trains
    path: str  # where that config was written

    def text(self) -> str:
        return (
            f"search {self.search}: best valid MAE {self.best_valid_MAE:.4f} of {self.trials} trials "
            f"(MLflow run {self.parent_run_id}); its config: {self.path}"
        )


def search_name(features: FeatureStoreRef, fingerprint: str) -> str:
    """One search per dataset, data version and settings: a rerun of the same resumes it (or,
    finished, returns its result at once); new data or new settings start a new one."""
    version = re.sub(r"[^A-Za-z0-9]", "", features.data_version)[:12]
    return f"tune-{features.dataset}-{version}-{fingerprint[:8]}"


@service_task("tune[{features.dataset}]")
def tune_hyperparameters(
    features: FeatureStoreRef, config: Config, project_dir: str, trials: int, search_space: str, best_config: str
) -> TunedConfig:
    """Ray Tune over `search_space` on the run's store: `trials` trials, each a Ray Train run and
    an MLflow child run; the best config is written to `best_config`."""
    from mmim.cluster.tune import load_search_spec, search, search_fingerprint

    log = get_run_logger()
    config = run_config(config, features, project_dir)
    spec = load_search_spec(search_space)
    name = search_name(features, search_fingerprint(config, spec, trials))
    log.info("search %s: %d trials over %s on data %s", name, trials, search_space, features.data_version)
    result = search(config, spec, trials, name, best_config)
    tuned = TunedConfig(
        search=name,
        parent_run_id=result.parent_run_id,
        trials=len(result.trials),
        best_valid_MAE=result.best_valid_MAE,
        best_settings=result.best_settings,
        config=result.best_config,
        path=best_config,
    )
    log.info("%s", tuned.text())
    return tuned
