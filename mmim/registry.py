"""The model registry: every finished run becomes a version; `champion` moves only when earned.

    register(run)  -> new version of mmim-<dataset>, alias `challenger`, tag valid_<metric>
                   -> `champion` moves to the best eligible version if that beats the current
                      champion by `tracking.margin` (MAE: lower, Corr: higher)
                   -> the decision and both figures are tags of the new version
    promote(name, version)   a person moves `champion` (the old one is remembered)
    rollback(name)           `champion` goes back to the version it replaced; the demoted version
                             is tagged rolled_back and never becomes champion by gating again

A person's choice stands: after `promote` or `rollback`, gating considers only versions
registered after that choice (tag `gating_since`), so a version registered earlier (which
the person saw) cannot undo it; a later challenger that beats the chosen champion by the
gating rule can.

Every move of `champion` is recorded on the registered model: `champion_set_by` (gating,
or person:<user>), `champion_set_at` (ms since the epoch) for the current one, and one
`champion_move.<ns>` tag per move ("v3 by gating: MAE 0.3100 beats v2's 0.3500").

Concurrency: the registry has no transactions, so gating reconciles instead of deciding
once. Each registration sets `champion` to the best eligible version it can see and
re-reads until the alias is stable. Every version is registered (and visible) before its
own reconciliation, so whichever run writes last writes the best of all versions, and
two runs finishing together cannot leave a worse champion behind.
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from mmim.errors import MMIMInputError

CHAMPION, CHALLENGER = "champion", "challenger"
SET_BY, SET_AT, MOVE_PREFIX = "champion_set_by", "champion_set_at", "champion_move."
GATING_SINCE = "gating_since"  # ms: gating picks only versions registered after a person's last choice
GATING = "gating"
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
    text: str  # what happened to the alias, as tagged on the version (registry_decision)


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
    """The version behind `alias`; None only when the model or the alias does not exist (a server
    that fails or does not answer raises)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        missing = error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
            error.get_http_status_code() == 400 and "not found" in error.message)
        if missing:
            return None
        raise


def _eligible(client: MlflowClient, name: str, metric: str, since: int) -> list[tuple[ModelVersion, float]]:
    """Versions gating may pick: with the metric tag, not rolled back, registered after `since` (ms)."""
    versions = client.search_model_versions(f"name='{name}'")
    return [(v, float(v.tags[metric_tag(metric)])) for v in versions
            if metric_tag(metric) in v.tags and v.tags.get("rolled_back") != "true"
            and int(v.creation_timestamp or 0) > since]


def _chosen_since(client: MlflowClient, name: str) -> int:
    """When a person last chose the champion (ms), 0 if nobody ever did."""
    return int(client.get_registered_model(name).tags.get(GATING_SINCE, 0))


def move_champion(client: MlflowClient, name: str, version: str, by: str, why: str) -> None:
    """Point `champion` at `version` and record the move: who or what, when, why. A person's
    move also sets the floor below which gating no longer looks."""
    now = time.time_ns()
    _write(client.set_registered_model_alias, name, CHAMPION, version)
    _write(client.set_registered_model_tag, name, SET_BY, by)
    _write(client.set_registered_model_tag, name, SET_AT, str(now // 1_000_000))
    if by != GATING:
        _write(client.set_registered_model_tag, name, GATING_SINCE, str(now // 1_000_000))
    _write(client.set_registered_model_tag, name, f"{MOVE_PREFIX}{now}", f"v{version} by {by}: {why}")


def reconcile(client: MlflowClient, name: str, metric: str, margin: float) -> ModelVersion | None:
    """Point `champion` at the best eligible version if it beats the current one by `margin`."""
    for _ in range(MAX_RECONCILE_ROUNDS):
        champion = _alias(client, name, CHAMPION)
        eligible = _eligible(client, name, metric, _chosen_since(client, name))
        if not eligible:
            return champion
        pick = min if metric == "MAE" else max
        best, best_value = pick(eligible, key=lambda item: item[1])
        if champion is None:
            move_champion(client, name, best.version, GATING, f"{metric} {best_value:.4f}, no champion before")
            continue
        tagged = champion.tags.get(metric_tag(metric))
        champion_value = float(tagged) if tagged is not None else None
        if best.version == champion.version or (
                champion_value is not None and not _better(best_value, champion_value, metric, margin)):
            return champion
        _write(client.set_model_version_tag, name, best.version, "previous_champion", champion.version)
        why = (f"{metric} {best_value:.4f} beats v{champion.version}'s {champion_value:.4f}"
               if champion_value is not None else f"v{champion.version} has no {metric} figure")
        move_champion(client, name, best.version, GATING, why)
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
    decision = _decision_text(client, name, metric, margin, value, promoted, champion)
    _write(client.set_model_version_tag, name, version, "registry_decision", decision)
    _write(client.set_model_version_tag, name, version, "champion_before", f"v{before.version}" if before else "none")
    _write(client.set_model_version_tag, name, version, f"champion_before_{metric_tag(metric)}",
           repr(before_value) if before_value is not None else "none")
    return Decision(name, version, promoted, value, before.version if before else None, before_value, decision)


def _decision_text(client: MlflowClient, name: str, metric: str, margin: float, value: float, promoted: bool,
                   champion: ModelVersion | None) -> str:
    if promoted:
        return "promoted to champion"
    if champion is None:
        return "no champion"
    by = client.get_registered_model(name).tags.get(SET_BY, GATING)
    chosen = f", chosen by {by.removeprefix('person:')}" if by != GATING else ""
    figure = champion.tags.get(metric_tag(metric))
    reason = (f"{metric} {value:.4f} does not beat its {float(figure):.4f} by margin {margin}"
              if figure is not None else f"it has no {metric} figure")
    return f"kept champion v{champion.version}{chosen}: {reason}"


def _person(action: str) -> str:
    try:
        return f"person:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name (e.g. a container without an /etc/passwd entry)
        return f"person:unknown ({action})"


def promote(client: MlflowClient, name: str, version: str) -> None:
    """A person points `champion` at `version`; gating keeps that choice (see the module docstring)."""
    current = _alias(client, name, CHAMPION)
    try:
        chosen = client.get_model_version(name, version)
    except MlflowException:
        raise MMIMInputError(f"registered model {name!r} has no version {version}") from None
    if current is not None:
        client.set_model_version_tag(name, version, "previous_champion", current.version)
    if "rolled_back" in chosen.tags:
        client.delete_model_version_tag(name, version, "rolled_back")  # a person chose it again
    move_champion(client, name, version, _person("promote"), "mmim registry promote")


def rollback(client: MlflowClient, name: str) -> str:
    """Move `champion` back to the version it replaced; returns that version."""
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise MMIMInputError(f"registered model {name!r} has no champion to roll back")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise MMIMInputError(f"{name} v{current.version} has no previous champion recorded")
    client.set_model_version_tag(name, current.version, "rolled_back", "true")
    move_champion(client, name, previous, _person("rollback"), f"mmim registry rollback from v{current.version}")
    return previous


def champion_moves(client: MlflowClient, name: str) -> list[str]:
    """Every recorded move of `champion`, oldest first."""
    tags = client.get_registered_model(name).tags
    return [tags[key] for key in sorted((k for k in tags if k.startswith(MOVE_PREFIX)),
                                        key=lambda k: int(k[len(MOVE_PREFIX):]))]


def describe(client: MlflowClient, name: str) -> list[dict]:
    """Versions, newest first, with their aliases, metric tags and decisions."""
    versions = client.search_model_versions(f"name='{name}'")
    aliases = client.get_registered_model(name).aliases  # alias -> version
    return [{"version": v.version, "run_id": v.run_id,
             "aliases": ",".join(sorted(a for a, version in aliases.items() if str(version) == str(v.version))),
             **{k: v.tags[k] for k in sorted(v.tags)}}
            for v in sorted(versions, key=lambda v: int(v.version), reverse=True)]
