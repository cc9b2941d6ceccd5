"""The model registry: every finished run becomes a version; `champion` only ever improves.

    register(run)  -> new version of mmim-<dataset>, alias `challenger`, tag valid_<metric>
                   -> `champion` moves to the best eligible version if that beats the current
                      champion by `tracking.margin` (MAE: lower, Corr: higher)
                   -> the decision and both figures are tags of the new version
    promote(name, version)   a person moves `champion` (the old one is remembered)
    rollback(name)           `champion` goes back to the previous one; the demoted version
                             is tagged rolled_back and never becomes champion by gating again

Concurrency: the registry has no transactions, so gating reconciles instead of deciding
once. Each registration sets `champion` to the best eligible version it can see and
re-reads until the alias is stable. Every version is registered (and visible) before its
own reconciliation, so whichever run writes last writes the best of all versions, and
two runs finishing together cannot leave a worse champion behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mmim.errors import MMIMInputError

CHAMPION, CHALLENGER = "champion", "challenger"
MAX_RECONCILE_ROUNDS = 10
WRITE_ATTEMPTS = 4


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    candidate: float
    champion_version: str | None  # the champion before this registration
    champion_value: float | None


def _write(call, *args) -> None:
    """A tag or alias write, retried: MLflow stores insert-or-update non-atomically, so two
    writers of the same key at the same moment can fail with a unique-constraint error;
    written again, it is an update (the last writer wins, as intended)."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            call(*args)
            return
        except MlflowException:
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def metric_tag(metric: str) -> str:
    return f"valid_{metric}"


def _better(a: float, b: float, metric: str, margin: float) -> bool:
    return a < b - margin if metric == "MAE" else a > b + margin


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _eligible(client: MlflowClient, name: str, metric: str) -> list[tuple[ModelVersion, float]]:
    versions = client.search_model_versions(f"name='{name}'")
    return [(v, float(v.tags[metric_tag(metric)])) for v in versions
            if metric_tag(metric) in v.tags and v.tags.get("rolled_back") != "true"]


def reconcile(client: MlflowClient, name: str, metric: str, margin: float) -> ModelVersion | None:
    """Point `champion` at the best eligible version if it beats the current one by `margin`."""
    for _ in range(MAX_RECONCILE_ROUNDS):
        champion = _alias(client, name, CHAMPION)
        eligible = _eligible(client, name, metric)
        if not eligible:
            return champion
        pick = min if metric == "MAE" else max
        best, best_value = pick(eligible, key=lambda item: item[1])
        if champion is None:
            _write(client.set_registered_model_alias, name, CHAMPION, best.version)
            continue
        champion_value = dict((v.version, value) for v, value in eligible).get(champion.version)
        if best.version == champion.version or (
                champion_value is not None and not _better(best_value, champion_value, metric, margin)):
            return champion
        _write(client.set_model_version_tag, name, best.version, "previous_champion", champion.version)
        _write(client.set_registered_model_alias, name, CHAMPION, best.version)
    return _alias(client, name, CHAMPION)


def _registered_from(client: MlflowClient, name: str, model_uri: str) -> str | None:
    """The version of `name` already registered from `model_uri`, if any."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v.version for v in versions if v.source == model_uri), None)


def register(client: MlflowClient, model_uri: str, name: str, metric: str, margin: float,
             value: float) -> Decision:
    """Register `model_uri` as a new version of `name` and gate `champion`.

    Idempotent: registering the same model again (a retried pipeline step) gates the
    version it already has instead of adding a second one.
    """
    before = _alias(client, name, CHAMPION)
    before_value = float(before.tags[metric_tag(metric)]) if before and metric_tag(metric) in before.tags else None
    version = _registered_from(client, name, model_uri) or mlflow.register_model(model_uri, name).version
    _write(client.set_model_version_tag, name, version, metric_tag(metric), repr(value))
    _write(client.set_registered_model_alias, name, CHALLENGER, version)
    champion = reconcile(client, name, metric, margin)
    promoted = champion is not None and champion.version == version
    decision = "promoted to champion" if promoted else (
        f"kept champion v{champion.version}" if champion else "no champion")
    _write(client.set_model_version_tag, name, version, "registry_decision", decision)
    _write(client.set_model_version_tag, name, version, "champion_before", f"v{before.version}" if before else "none")
    _write(client.set_model_version_tag, name, version, f"champion_before_{metric_tag(metric)}",
           repr(before_value) if before_value is not None else "none")
    return Decision(name, version, promoted, value, before.version if before else None, before_value)


def promote(client: MlflowClient, name: str, version: str) -> None:
    current = _alias(client, name, CHAMPION)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise MMIMInputError(f"registered model {name!r} has no version {version}") from None
    if current is not None:
        client.set_model_version_tag(name, version, "previous_champion", current.version)
    if "rolled_back" in client.get_model_version(name, version).tags:
        client.delete_model_version_tag(name, version, "rolled_back")  # a person chose it again
    client.set_registered_model_alias(name, CHAMPION, version)


def rollback(client: MlflowClient, name: str) -> str:
    """Move `champion` back to the version it replaced; returns that version."""
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise MMIMInputError(f"registered model {name!r} has no champion to roll back")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise MMIMInputError(f"{name} v{current.version} has no previous champion recorded")
    client.set_model_version_tag(name, current.version, "rolled_back", "true")
    client.set_registered_model_alias(name, CHAMPION, previous)
    return previous


def describe(client: MlflowClient, name: str) -> list[dict]:
    """Versions, newest first, with their aliases, metric tags and decisions."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = client.get_registered_model(name).aliases  # alias -> version
    except MlflowException as error:
        raise MMIMInputError(f"registered model {name!r}: {error.message}") from None
    return [{"version": v.version, "run_id": v.run_id,
             "aliases": ",".join(sorted(a for a, version in aliases.items() if str(version) == str(v.version))),
             **{k: v.tags[k] for k in sorted(v.tags)}}
            for v in sorted(versions, key=lambda v: int(v.version), reverse=True)]
