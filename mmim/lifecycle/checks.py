"""The first step: the store is checked before anything trains on it."""

from __future__ import annotations

from pathlib import Path

from mmim.core.config import Config
from mmim.core.errors import MMIMInputError
from mmim.data.checks import DataReport, check_store
from mmim.data.versioning import local_store, store_version

__all__ = ["DataChecksFailed", "DataReport", "check_data", "check_config_store"]  # the step, its result and its refusal


class DataChecksFailed(MMIMInputError):
    """A hard data check failed: nothing trains on this data. Carries the whole report."""

    def __init__(self, report: DataReport):
        super().__init__(
            f"data version {report.data_version} failed the data checks: "
            + "; ".join(check.line() for check in report.failed)
        )
        self.report = report


def check_data(store: str | Path, data_version: str, model_name: str | None) -> DataReport:
    """The checks of `store` (data version `data_version`), with drift against the data the
    champion of `model_name` was trained on (None: no registry, no drift). A failed hard check
    raises DataChecksFailed (bad input: exit 2) naming the checks and the ids."""
    previous = None
    if model_name is not None:
        from mmim.registry.champion import champion_profile  # MLflow, only with a registry

        previous = champion_profile(model_name)
    report = check_store(store, data_version, previous)
    if report.failed:
        raise DataChecksFailed(report)
    return report


def check_config_store(config: Config) -> DataReport:
    """The checks of the store `config` trains on, at its data version, with no drift comparison
    (no registry): what `mmim train` and `mmim tune` run before anything trains."""
    store = local_store(config.data)
    return check_data(store, store_version(store), None)
