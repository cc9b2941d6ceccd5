"""Prefect tasks: thin wrappers that call `mmim` (imports run `flows -> tasks -> mmim`; the
adapters that load Ray, MLflow or matplotlib are imported inside the task that needs them).

    extract_features   DVC reproduce of extract@<dataset>          -> FeatureStoreRef
    push_features      DVC push of the store to the remote         -> files sent
    check_data         leakage, lengths, drift vs the champion's   -> DataChecks (or the step fails)
    tune_hyperparameters  (optional) Ray Tune on the store         -> TunedConfig: the best config
    train              Ray Train, every epoch logged to an MLflow run -> FinishedTraining
                       (with train.seeds: a run per seed)
    log_model          the selected checkpoint as the run's model  -> TrainedModel
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
from tasks.training import FinishedTraining, TrainedModel, evaluate, log_model, train

__all__ = [
    "DataChecks",
    "FeatureStoreRef",
    "Registration",
    "TrainedModel",
    "FinishedTraining",
    "check_data",
    "evaluate",
    "extract_features",
    "log_model",
    "push_features",
    "register",
    "train",
]
