"""Feature extraction as pipeline steps: DVC builds the store, DVC shares it."""

from __future__ import annotations

from prefect import get_run_logger, task
from pydantic import BaseModel

from mmim.data.versioning import check_inputs, data_version, ensure_store, push, reproduce, stage_name, store_path
from tasks.caching import Origin, extraction_key, origin
from tasks.retries import service_task


class FeatureStoreRef(BaseModel):
    """A feature store by content: `store` is relative to the project directory."""

    dataset: str
    store: str  # data/stores/<dataset>
    data_version: str  # DVC's content hash of the store (dvc.lock), e.g. 3f2a...e1.dir
    stages_run: list[str]  # what DVC had to run; empty when the store was up to date
    origin: Origin | None = None  # the flow run that extracted it (None: results cached before origins)


@task(cache_key_fn=extraction_key, result_serializer="json", task_run_name="extract_features[{dataset}]")
def extract_features(dataset: str, project_dir: str) -> FeatureStoreRef:
    """`dvc repro extract@<dataset>` in `project_dir`: runs only the stages whose inputs changed."""
    log = get_run_logger()
    check_inputs(dataset, project_dir)  # one line naming a missing release, not DVC's failure to run
    ran = reproduce(dataset, project_dir)
    version = data_version(dataset, project_dir)
    log.info("%s: %s; data version %s", stage_name(dataset), f"ran {', '.join(ran)}" if ran else "up to date", version)
    return FeatureStoreRef(
        dataset=dataset, store=store_path(dataset), data_version=version, stages_run=ran, origin=origin()
    )


@service_task("push_features[{features.dataset}]")
def push_features(features: FeatureStoreRef, project_dir: str, remote: str | None = None) -> int:
    """`dvc push` of the store and the inputs DVC tracks for it (the default remote unless named).

    When extraction was restored from the cache (possibly another checkout's), the store may
    not be in this checkout: DVC restores or rebuilds it first, at the same data version.
    """
    ensure_store(features.dataset, project_dir, features.data_version)
    sent = push(features.dataset, project_dir, remote)
    get_run_logger().info("pushed %d files to DVC remote %s", sent, remote or "(default)")
    return sent
