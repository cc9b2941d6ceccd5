"""Data checks as a pipeline step: the run's store, before anything trains on it."""

from __future__ import annotations

import re

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from mmim.data.checks import DataReport
from mmim.data.versioning import ensure_store
from mmim.lifecycle import checks as lifecycle_checks
from mmim.lifecycle.checks import DataChecksFailed
from tasks.features import FeatureStoreRef
from tasks.retries import service_task


class DataChecks(BaseModel):
    data_version: str
    previous_version: str | None  # the champion's data version, compared with (None: nothing to compare)
    verdict: str  # passed or warnings (a failed check fails the step)
    warnings: list[str]  # one line per soft check that warned
    tags: dict[str, str]  # for the training run


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from `parts`."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())


@service_task("check_data[{features.dataset}]")
def check_data(features: FeatureStoreRef, project_dir: str, model_name: str) -> DataChecks:
    """The store's checks (mmim.data.checks), drift against the data the champion was trained on.

    The report is the markdown artifact `data-checks-<dataset>`; a failed hard check fails
    the step, naming the check and the ids, before anything trains.
    """
    log = get_run_logger()
    store = ensure_store(features.dataset, project_dir, features.data_version)
    try:
        report = lifecycle_checks.check_data(store, features.data_version, model_name)
    except DataChecksFailed as failed:
        _report(features, failed.report)
        raise
    tags = _report(features, report)
    for check in report.warnings:
        log.warning("data check %s", check.line())
    log.info(
        "data checks of %s %s%s",
        features.data_version,
        tags["data_checks"],
        f" (compared with {report.previous_version})" if report.previous_version else "",
    )
    return DataChecks(
        data_version=features.data_version,
        previous_version=report.previous_version,
        verdict=tags["data_checks"],
        warnings=[check.line() for check in report.warnings],
        tags=tags,
    )


def _report(features: FeatureStoreRef, report: DataReport) -> dict[str, str]:
    """The report as the markdown artifact data-checks-<dataset>; its tags."""
    tags = report.tags()
    create_markdown_artifact(
        report.markdown(),
        key=artifact_key("data-checks", features.dataset),
        description=f"data checks of {features.data_version}: {tags['data_checks']}",
    )
    return tags
