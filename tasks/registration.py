"""Registration as a pipeline step: a new version of mmim-<dataset>, champion gated on validation."""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import get_run_logger, task
from pydantic import BaseModel

from mmim import registry
from mmim.mlflow_server import tracking_uri
from tasks.caching import Origin, origin, registration_key
from tasks.retries import ATTEMPTS, BACKOFF, retry_if_transient
from tasks.training import TrainedModel


class Registration(BaseModel):
    model_name: str
    version: str
    promoted: bool  # this version became `champion`
    metric: str  # valid_MAE or valid_Corr
    value: float  # this version's figure
    champion_before: str | None  # the champion's version before this registration
    champion_before_value: float | None
    origin: Origin | None = None  # the flow run that decided (None: results cached before origins)
    decision: str = ""  # what happened to `champion` and why ("kept champion v2, chosen by ana: ...")


class Champion(BaseModel):
    """What the registry calls `champion` now, with its validation figure."""

    model_name: str
    version: str
    metric: str  # the tag, e.g. valid_MAE
    value: float | None  # None: the version has no such tag (promoted by hand)


@task(retries=ATTEMPTS, retry_delay_seconds=BACKOFF, retry_condition_fn=retry_if_transient,
      cache_key_fn=registration_key, result_serializer="json", task_run_name="register[{model_name}]")
def register(trained: TrainedModel, evaluation: dict[str, dict[str, float]], model_name: str,
             metric: str, margin: float) -> Registration:
    """Register the run's model; `champion` moves only if it beats the champion by `margin`."""
    value = evaluation["valid"][metric]
    decision = registry.register(MlflowClient(tracking_uri()), trained.model_uri, model_name, metric, margin, value)
    get_run_logger().info("%s v%s: %s", model_name, decision.version, decision.text)
    return Registration(model_name=model_name, version=str(decision.version), promoted=decision.promoted,
                        metric=registry.metric_tag(metric), value=value,
                        champion_before=None if decision.champion_version is None else str(decision.champion_version),
                        champion_before_value=decision.champion_value,
                        origin=origin(), decision=decision.text)


def current_champion(model_name: str, metric: str) -> Champion | None:
    """The registry's `champion` of `model_name` as it is now (None when there is none)."""
    client = MlflowClient(tracking_uri())
    version = client.get_registered_model(model_name).aliases.get(registry.CHAMPION)
    if version is None:
        return None
    tag = registry.metric_tag(metric)
    value = client.get_model_version(model_name, version).tags.get(tag)
    return Champion(model_name=model_name, version=str(version), metric=tag,
                    value=None if value is None else float(value))
