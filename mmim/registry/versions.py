"""The model registry: every finished run becomes a version; `champion` moves only when earned.

    register(run, head_to_head)
                   -> new version of mmim-<dataset>, alias `challenger`
                   -> its validation figure, and the champion's, both measured on the run's
                      data version X, become tags `valid_<metric>/X` of the two versions
                   -> `champion` moves to the best version with a figure on X if that beats
                      the current champion's figure on X by `tracking.margin` (MAE: lower,
                      Corr: higher) and, with `tracking.min_confidence`, if the bootstrap
                      interval of its improvement over that champion lies above zero
                   -> the decision, both figures, the data version and the champion
                      compared are tags of the new version (`gate.*`, `registry_decision`)
    promote(name, version)   a person moves `champion` (the old one is remembered)
    rollback(name)           `champion` goes back to the version it replaced; the demoted version
                             is tagged rolled_back and never becomes champion by gating again

Figures are compared only when measured on the same data: a figure on another data
version is never read. A champion without a figure on X (it could not be scored there:
another tokenizer, other feature dims, another extractor) is kept, and the new version
is tagged `needs_review` with the reason: a person decides, with `promote`.

A person's choice stands: after `promote` or `rollback`, gating considers only versions
registered after that choice (tag `gating_since`), so a version registered earlier (which
the person saw) cannot undo it; a later challenger that beats the chosen champion by the
gating rule can.

Every move of `champion` is recorded on the registered model: `champion_set_by` (gating,
or person:<user>), `champion_set_at` (ms since the epoch) for the current one, and one
`champion_move.<ns>` tag per move ("v3 by gating: MAE 0.3100 beats v2's 0.3500 on data X").

Concurrency: the registry has no transactions, so gating reconciles instead of deciding
once. Each registration sets `champion` to the best version it can see and re-reads until
the alias is stable. Every version, and its figures, is registered (and visible) before
its own reconciliation, so whichever run on X writes last writes the best of all versions
scored on X, and two runs finishing together cannot leave a worse champion behind. (With
`min_confidence`, a version may only replace the champion its bootstrap was measured
against; if another run moved `champion` meanwhile, the next run compares again.)
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

from mmim.core.errors import MMIMInputError
from mmim.core.selection import Rule
from mmim.registry.gating import HeadToHead
from mmim.registry.server import tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
SET_BY, SET_AT, MOVE_PREFIX = "champion_set_by", "champion_set_at", "champion_move."
GATING_SINCE = "gating_since"  # ms: gating picks only versions registered after a person's last choice
GATING = "gating"
MAX_RECONCILE_ROUNDS = 10
REASON_CHARS = 1000  # of an error message quoted in a tag
WRITE_ATTEMPTS = 4


@dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    candidate: float
    champion_version: str | None  # the champion before this registration
    champion_after: str | None  # and after it
    text: str  # what happened to the alias, as tagged on the version (registry_decision)
    needs_review: str | None = None  # why the gate could not decide (tag needs_review)


def registry_client() -> MlflowClient:
    """A client of the registry that MLFLOW_TRACKING_URI (or the local default) names."""
    return MlflowClient(tracking_uri())


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


def figure_tag(metric: str, data_version: str) -> str:
    """The tag of a version's validation figure on one data version: valid_MAE/<data version>."""
    return f"valid_{metric}/{data_version}"


def figure(version: ModelVersion, metric: str, data_version: str) -> float | None:
    tagged = version.tags.get(figure_tag(metric, data_version))
    return None if tagged is None else float(tagged)


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind `alias`; None only when the model or the alias does not exist (a server
    that fails or does not answer raises)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        missing = error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
            error.get_http_status_code() == 400 and "not found" in error.message
        )
        if missing:
            return None
        raise


def _scored(
    client: MlflowClient, name: str, metric: str, data_version: str, since: int
) -> list[tuple[ModelVersion, float]]:
    """Versions gating may pick on `data_version`: with a figure on it, not rolled back,
    registered after `since` (ms)."""
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    tag = figure_tag(metric, data_version)
    return [  # oldest first: of equal figures, the rule picks the earliest registered
        (v, float(v.tags[tag]))  # figure(v, metric, data_version), present
        for v in versions
        if tag in v.tags and v.tags.get("rolled_back") != "true" and int(v.creation_timestamp or 0) > since
    ]


def _confident(version: ModelVersion, champion: ModelVersion, data_version: str, min_confidence: float) -> bool:
    """`version`'s bootstrap was measured against `champion` on `data_version`, at
    `min_confidence` or more, and its interval lies above zero."""
    tags = version.tags
    return (
        tags.get("gate.champion") == f"v{champion.version}"
        and tags.get("gate.data_version") == data_version
        and float(tags.get("gate.confidence", 0)) >= min_confidence
        and float(tags.get("gate.interval_low", "-inf")) > 0
    )


def _chosen_since(client: MlflowClient, name: str) -> int:
    """When a person last chose the champion (ms), 0 if nobody ever did."""
    return int(client.get_registered_model(name).tags.get(GATING_SINCE, 0))


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version `champion` points at now (None: no champion, or no such model yet)."""
    champion = _alias(client, name, CHAMPION)
    return None if champion is None else str(champion.version)


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


def reconcile(
    client: MlflowClient, name: str, metric: str, data_version: str, margin: float, min_confidence: float | None = None
) -> ModelVersion | None:
    """Point `champion` at the best version scored on `data_version` if it beats the current
    champion's figure on that data by `margin` (and, with `min_confidence`, confidently)."""
    for _ in range(MAX_RECONCILE_ROUNDS):
        champion = _alias(client, name, CHAMPION)
        scored = _scored(client, name, metric, data_version, _chosen_since(client, name))
        rule = Rule(metric)
        if champion is None:
            if not scored:
                return None
            best, best_value = scored[rule.best_index([value for _, value in scored])]
            move_champion(
                client,
                name,
                best.version,
                GATING,
                f"{metric} {best_value:.4f} on data {data_version}, no champion before",
            )
            continue
        champion_value = figure(champion, metric, data_version)
        if champion_value is None:  # not measured on this data: nothing to compare with
            return champion
        candidates = [
            (v, value)
            for v, value in scored
            if v.version != champion.version
            and rule.beats(value, champion_value, margin)
            and (min_confidence is None or _confident(v, champion, data_version, min_confidence))
        ]
        if not candidates:
            return champion
        best, best_value = candidates[rule.best_index([value for _, value in candidates])]
        _write(client.set_model_version_tag, name, best.version, "previous_champion", champion.version)
        move_champion(
            client,
            name,
            best.version,
            GATING,
            f"{metric} {best_value:.4f} beats v{champion.version}'s {champion_value:.4f} on data {data_version}",
        )
    return _alias(client, name, CHAMPION)


def _registered_from(client: MlflowClient, name: str, model_uri: str) -> str | None:
    """The version of `name` already registered from `model_uri`, if any."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v.version for v in versions if v.source == model_uri), None)


def register(
    client: MlflowClient,
    model_uri: str,
    name: str,
    compared: HeadToHead,
    margin: float = 0.0,
    min_confidence: float | None = None,
) -> Decision:
    """Register `model_uri` as a new version of `name` and gate `champion` on the figures of
    `compared` (the new model and the champion, scored on the same data).

    Idempotent: registering the same model again (a retried pipeline step) gates the
    version it already has instead of adding a second one.
    """
    metric, data_version = compared.metric, compared.data_version
    before = _alias(client, name, CHAMPION)
    version = _registered_from(client, name, model_uri) or mlflow.register_model(model_uri, name).version
    for key, value in {**compared.tags(), figure_tag(metric, data_version): repr(compared.challenger_value)}.items():
        _write(client.set_model_version_tag, name, version, key, value)
    if compared.champion_value is not None:  # the champion's figure on this data, for every later run too
        _write(
            client.set_model_version_tag,
            name,
            compared.champion_version,
            figure_tag(metric, data_version),
            repr(compared.champion_value),
        )
    _write(client.set_registered_model_alias, name, CHALLENGER, version)
    champion = reconcile(client, name, metric, data_version, margin, min_confidence)
    promoted = champion is not None and champion.version == version
    review = None if promoted or champion is None else _review(compared, champion)
    if promoted and before is not None and str(before.version) == str(version):
        decision = "stays champion (this model was registered, and promoted, before)"
    else:
        decision = _decision_text(client, name, compared, margin, min_confidence, promoted, champion, review)
    if review:
        _write(client.set_model_version_tag, name, version, "needs_review", review)
    _write(client.set_model_version_tag, name, version, "registry_decision", decision)
    _write(client.set_model_version_tag, name, version, "champion_before", f"v{before.version}" if before else "none")
    return Decision(
        name,
        version,
        promoted,
        compared.challenger_value,
        None if before is None else str(before.version),
        None if champion is None else str(champion.version),
        decision,
        review,
    )


def _review(compared: HeadToHead, champion: ModelVersion) -> str | None:
    """Why a person has to decide: the champion has no figure on this data."""
    if figure(champion, compared.metric, compared.data_version) is not None:
        return None
    if compared.unscorable and compared.champion_version == str(champion.version):
        return (
            f"champion v{champion.version} cannot be scored on data {compared.data_version}: "
            f"{compared.unscorable[:REASON_CHARS]}"
        )
    return (
        f"champion v{champion.version} has no {compared.metric} figure on data {compared.data_version} "
        f"(it became champion while this run compared with v{compared.champion_version})"
    )


def _decision_text(
    client: MlflowClient,
    name: str,
    compared: HeadToHead,
    margin: float,
    min_confidence: float | None,
    promoted: bool,
    champion: ModelVersion | None,
    review: str | None,
) -> str:
    metric, value, data = compared.metric, compared.challenger_value, compared.data_version
    ours = f"{metric} {value:.4f}" + (f" (mean of {compared.seeds} seeds)" if compared.seeds > 1 else "")
    if promoted:
        if compared.champion_value is None:
            return f"promoted to champion: {ours} on data {data}, no champion before"
        confidence = f" ({compared.bootstrap.text()})" if compared.bootstrap else ""
        return (
            f"promoted to champion: {ours} beats v{compared.champion_version}'s "
            f"{compared.champion_value:.4f} on data {data}{confidence}"
        )
    if champion is None:
        return "no champion"
    by = client.get_registered_model(name).tags.get(SET_BY, GATING)
    chosen = f", chosen by {by.removeprefix('person:')}" if by != GATING else ""
    theirs = figure(champion, metric, data)
    if review:
        reason = f"needs review: {review}"
    elif theirs is None:  # register() passes a review (see _review) for this case
        reason = f"it has no {metric} figure on data {data}"
    elif not Rule(metric).beats(value, theirs, margin):
        reason = f"{ours} does not beat its {theirs:.4f} on data {data} by margin {margin}"
    elif compared.bootstrap is not None and compared.champion_version == str(champion.version):
        reason = (
            f"{ours} beats its {theirs:.4f} on data {data}, but the {compared.bootstrap.text()} "
            f"does not lie above zero (min_confidence {min_confidence})"
        )
    else:
        reason = (
            f"{ours} beats its {theirs:.4f} on data {data}, but was not compared with it "
            f"by bootstrap (min_confidence {min_confidence})"
        )
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
    return [
        tags[key]
        for key in sorted((k for k in tags if k.startswith(MOVE_PREFIX)), key=lambda k: int(k[len(MOVE_PREFIX) :]))
    ]


def describe(client: MlflowClient, name: str) -> list[dict]:
    """Versions, newest first, with their aliases, metric tags and decisions."""
    versions = client.search_model_versions(f"name='{name}'")
    aliases = client.get_registered_model(name).aliases  # alias -> version
    return [
        {
            "version": v.version,
            "run_id": v.run_id,
            "aliases": ",".join(sorted(a for a, version in aliases.items() if str(version) == str(v.version))),
            **{k: v.tags[k] for k in sorted(v.tags)},
        }
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]
