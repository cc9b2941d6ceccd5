"""Configuration: typed, validated settings for the model, the data and training.

A config is a YAML file with three sections (`model`, `data`, `train`) plus
`output_dir`. Every field has the official MMIM default (Han et al., 2021), so an
empty section means "as in the paper". Unknown keys and bad values are errors that
name the setting, e.g. `train.lr_main: Input should be greater than 0`.

The official argument names are given next to each field so that people coming
from the reference code can map one onto the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmim.errors import MMIMInputError


class _Section(BaseModel):
    # forbid: a typo in a key must fail, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Architecture. Input dims and the token cap come from the feature store."""

    # Hugging Face name or local directory of a BERT-family encoder (official: bert-base-uncased).
    text_encoder: str = "bert-base-uncased"
    # False builds the encoder from its config with random weights (tests, benchmarks).
    text_pretrained: bool = True
    audio_dim: int | None = Field(default=None, gt=0)  # d_ain; filled from the store
    vision_dim: int | None = Field(default=None, gt=0)  # d_vin; filled from the store
    max_tokens: int | None = Field(default=None, gt=1)  # token cap of the store (50); filled from it
    # A recordings store's extractor (name, version, settings), filled from it: what turns a new
    # recording into this model's inputs at prediction time. None for the community releases.
    extractor: dict[str, Any] | None = None
    audio_hidden: int = Field(default=16, gt=0)  # d_ah
    audio_out: int = Field(default=16, ge=4)  # d_aout (>= 4: MMILB projects to out // 4)
    vision_hidden: int = Field(default=16, gt=0)  # d_vh
    vision_out: int = Field(default=16, ge=4)  # d_vout
    lstm_layers: int = Field(default=1, ge=1)  # n_layer
    bidirectional: bool = False
    dropout_audio: float = Field(default=0.1, ge=0, lt=1)  # dropout_a (only used when lstm_layers > 1)
    dropout_vision: float = Field(default=0.1, ge=0, lt=1)  # dropout_v (idem)
    dropout_fusion: float = Field(default=0.1, ge=0, lt=1)  # dropout_prj
    fusion_hidden: int = Field(default=128, gt=0)  # d_prjh
    mmilb_activation: Literal["ReLU", "Tanh", "ELU", "LeakyReLU", "GELU"] = "ReLU"  # mmilb_mid_activation
    cpc_layers: int = Field(default=1, ge=1)
    cpc_activation: Literal["Tanh", "ReLU", "ELU", "LeakyReLU", "GELU"] = "Tanh"
    add_va: bool = False  # the optional vision-acoustic MMILB (an ablation in the paper)


class DataConfig(_Section):
    store: str = "data/stores/synthetic"  # feature store directory (see mmim.store)
    verify_checksums: bool = True  # hash every array against manifest.json when opening
    # For Ray workers on machines without the store: fetch it with DVC from this Git
    # repository (URL or path) at `dvc_rev`, dataset `dvc_dataset` (data/stores/<name>).
    dvc_url: str | None = None
    dvc_rev: str | None = None
    dvc_dataset: str | None = None


class RayConfig(_Section):
    """Distributed training with Ray Train (`mmim train --workers N`)."""

    num_workers: int = Field(default=0, ge=0)  # 0: single process, no Ray
    use_gpu: bool = False  # one GPU per worker, NCCL; otherwise CPU workers and gloo
    resources_per_worker: dict[str, float] = {}  # e.g. {"CPU": 4, "GPU": 1}
    max_failures: int = Field(default=0, ge=-1)  # worker failures to recover from; -1: no limit
    storage_path: str = "runs/ray"  # local directory or s3://bucket/prefix for checkpoints
    s3_endpoint: str | None = None  # S3-compatible endpoint (MinIO); credentials from AWS_* env
    # Checkpoints kept in storage_path: the best N by validation MAE, plus the latest (Ray
    # always keeps it, to resume from). Each carries the optimizer state (~3x the weights).
    keep_checkpoints: int = Field(default=3, ge=1)
    run_name: str | None = None  # reuse a name to continue that run from its latest checkpoint
    # Driver environment variables handed to the workers (e.g. AWS_ACCESS_KEY_ID for a DVC
    # remote) when the cluster's nodes do not have them; values travel in the runtime_env.
    forward_env: list[str] = []
    # Stream the workers' and Ray Train controller's logs to this terminal (they are always
    # in Ray's session logs, /tmp/ray/session_latest/logs). Used when this process starts Ray.
    log_to_driver: bool = False


class TrainConfig(_Section):
    batch_size: int = Field(default=32, gt=1)  # > 1: MMILB/CPC statistics need a batch
    epochs: int = Field(default=40, gt=0)  # num_epochs
    lr_main: float = Field(default=1e-3, gt=0)
    lr_bert: float = Field(default=5e-5, gt=0)
    lr_mmilb: float = Field(default=1e-3, gt=0)
    weight_decay_main: float = Field(default=1e-4, ge=0)
    weight_decay_bert: float = Field(default=1e-4, ge=0)
    weight_decay_mmilb: float = Field(default=1e-4, ge=0)  # weight_decay_club
    optimizer: Literal["Adam", "RMSprop"] = "Adam"  # optim
    alpha: float = Field(default=0.1, ge=0)  # weight of the CPC (nce) term
    beta: float = Field(default=0.1, ge=0)  # weight of the MMILB (lld and H) terms
    clip: float = Field(default=1.0, gt=0)  # max gradient norm
    when: int = Field(default=20, ge=0)  # ReduceLROnPlateau patience
    patience: int = Field(default=10, gt=0)  # early stopping patience (epochs)
    seed: int = Field(default=1111, ge=0, le=2**32 - 1)  # numpy and torch take 32-bit seeds
    contrast: bool = True  # run stage 0 and the nce/lld terms (official --contrast)
    # Share of the training batches used in stage 0; the official code uses 0.5 on MOSEI.
    stage0_fraction: float = Field(default=1.0, gt=0, le=1)
    # fast: stage 0 runs the encoders without autograd (same MMILB gradients, ~half the
    # cost, but the clip norm then covers only MMILB gradients). official: back-propagate
    # -lld through the encoders as the reference code does and clip over all gradients.
    stage0_mode: Literal["fast", "official"] = "fast"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False  # bf16 autocast for the encoders on GPU; losses stay fp32
    num_threads: int | None = Field(default=None, gt=0)  # torch CPU threads; None = torch default


class TrackingConfig(_Section):
    """MLflow tracking and the model registry (the driver logs; workers never do)."""

    enabled: bool = False  # log the run, the model and register a version
    experiment: str = "mmim"
    # Where the experiment's artifacts go when it is created: a directory or s3://bucket/prefix.
    # Default: ./mlartifacts. The tracking server itself comes from MLFLOW_TRACKING_URI
    # (default sqlite:///mlflow.db in the working directory).
    artifact_location: str | None = None
    registered_model: str | None = None  # default: mmim-<store directory name>
    metric: Literal["MAE", "Corr"] = "MAE"  # validation metric that gates `champion`
    margin: float = Field(default=0.0, ge=0)  # how much better than the champion a challenger must be
    # Also require the paired bootstrap's interval of the improvement, at this confidence
    # (0.95: the 95% interval), to lie above zero. None: the margin rule alone.
    min_confidence: float | None = Field(default=None, gt=0.5, lt=1.0)
    bootstrap_resamples: int = Field(default=1000, ge=100, le=100_000)  # over the validation utterances


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "runs/latest"  # where the best checkpoint and metrics go


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `["train.epochs=3", "model.add_va=true"]` into a nested dict.

    Values are parsed as YAML scalars, so `3` is an int, `true` a bool, `1e-4` a float.
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MMIMInputError(f"--set {pair!r}: expected key=value, e.g. train.epochs=3")
        # YAML scalars; "1e-4" stays a string here and pydantic turns it into a float.
        value = yaml.safe_load(raw) if raw else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MMIMInputError(f"--set {pair!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise MMIMInputError(_describe(error, source)) from None


# A YAML file of settings that belong to a site rather than to a run: where checkpoints,
# artifacts and data live on this cluster (see infra/). Applied over every config file.
SITE_CONFIG_ENV = "MMIM_SITE_CONFIG"


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise MMIMInputError(f"{path}: cannot read {what} ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise MMIMInputError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise MMIMInputError(f"{path}: expected a mapping of sections (model, data, train, ray, tracking)")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None), then the site config named by
    $MMIM_SITE_CONFIG (if set), then the `--set` overrides; later ones win."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = _read_yaml(path, "config")
    site = os.environ.get(SITE_CONFIG_ENV)
    if site:
        raw = _merge(raw, _read_yaml(site, f"site config (${SITE_CONFIG_ENV})"))
        source = f"{source} with site config {site}"
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source = f"{source} with --set"
    return config_from_dict(raw, source)


def config_to_json(config: Config) -> str:
    return json.dumps(config.model_dump(), indent=2, sort_keys=True)


def check_ray_settings(config: Config) -> None:
    """Settings that Ray training cannot run with, reported before anything starts."""
    if config.ray.num_workers < 1:
        raise MMIMInputError("ray.num_workers: must be at least 1 for Ray training")
    if not config.train.contrast:
        raise MMIMInputError(
            "train.contrast: false is not supported with Ray workers (DDP needs every "
            "forward output in the loss); train it in one process (--workers 0)"
        )
    if config.train.batch_size % config.ray.num_workers:
        raise MMIMInputError(
            f"train.batch_size {config.train.batch_size} must be divisible by "
            f"ray.num_workers {config.ray.num_workers} (it is the global batch)"
        )
