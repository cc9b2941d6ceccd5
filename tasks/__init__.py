"""Prefect tasks: thin wrappers that call `mmim` (see DESIGN.md, `flows -> tasks -> mmim`).

    extract_features   DVC reproduce of extract@<dataset>          -> FeatureStoreRef
    push_features      DVC push of the store to the remote         -> files sent
    check_data         leakage, lengths, drift vs the champion's   -> DataChecks (or the step fails)
    train              Ray Train + MLflow run                      -> TrainedModel
    evaluate           the logged checkpoint and the champion,     -> HeadToHead
                       on valid/test of the same data version
    register           MLflow Model Registry, gated champion       -> Registration

Results are stored as JSON (never pickled). A task is skipped when a previous run had
the same content key (tasks/caching.py); the tasks that talk to a service retry when it
does not answer (tasks/retries.py).
"""

from tasks.checks import DataChecks, check_data
from tasks.features import FeatureStoreRef, extract_features, push_features
from tasks.registration import Registration, register
from tasks.training import TrainedModel, evaluate, train

__all__ = [
    "DataChecks",
    "FeatureStoreRef",
    "Registration",
    "TrainedModel",
    "check_data",
    "evaluate",
    "extract_features",
    "push_features",
    "register",
    "train",
]
