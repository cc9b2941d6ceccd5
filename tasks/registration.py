"""Registration as a pipeline step: a new version of mmim-<dataset>, `champion` gated head to head."""

from __future__ import annotations

from prefect import get_run_logger
from pydantic import BaseModel

from mmim.registry.gating import HeadToHead
from tasks.caching import Origin, origin, registration_key
from tasks.retries import service_task
from tasks.training import TrainedModel


class Registration(BaseModel):
    model_name: str
    version: str
    promoted: bool  # this version became `champion`
    compared: HeadToHead  # both models' figures on the run's data version
    champion_after: str | None  # the champion once this registration reconciled
    needs_review: str | None = None  # the gate could not decide: a person should (mmim registry promote)
    origin: Origin | None = None  # the flow run that decided (None: results cached before origins)
    decision: str = ""  # what happened to `champion` and why ("kept champion v2, chosen by ana: ...")


class Champion(BaseModel):
    """What the registry calls `champion` now, with its validation figure on one data version."""

    model_name: str
    version: str
    metric: str  # e.g. valid_MAE
    data_version: str
    value: float | None  # None: not measured on that data version


@service_task("register[{model_name}]", registration_key)
def register(
    trained: TrainedModel, compared: HeadToHead, model_name: str, margin: float, min_confidence: float | None
) -> Registration:
    """mmim.lifecycle's registration step: a new version of the run's model; `champion` moves only
    if it beats the champion on the same data."""
    from mmim.lifecycle.registration import register_model

    decision = register_model(trained.model_uri, compared, model_name, margin, min_confidence)
    log = get_run_logger()
    log.info("%s v%s: %s", model_name, decision.version, decision.text)
    if decision.needs_review:
        log.warning("%s v%s needs review: %s", model_name, decision.version, decision.needs_review)
    return Registration(
        model_name=model_name,
        version=str(decision.version),
        promoted=decision.promoted,
        compared=compared,
        champion_after=decision.champion_after,
        needs_review=decision.needs_review,
        origin=origin(),
        decision=decision.text,
    )


def current_champion(model_name: str, metric: str, data_version: str) -> Champion | None:
    """The registry's `champion` of `model_name` as it is now (None when there is none)."""
    from mmim.registry import versions as registry

    client = registry.registry_client()
    version = registry.champion_version(client, model_name)
    if version is None:
        return None
    value = registry.figure(client.get_model_version(model_name, version), metric, data_version)
    return Champion(
        model_name=model_name, version=version, metric=f"valid_{metric}", data_version=data_version, value=value
    )


def champion_to_compare(model_name: str) -> str | None:
    """The champion's version right before evaluation: the one the challenger is scored against."""
    from mmim.lifecycle.registration import champion_now  # MLflow, only when the flow gets here

    return champion_now(model_name)
