"""MMIM (MultiModal InfoMax, EMNLP 2021) for multimodal sentiment analysis.

The public API (docs/training.md, "From Python"):

    from mmim import ModelConfig, build_model, load_official_state_dict, compute_metrics
    model = build_model(ModelConfig(text_encoder="bert-base-uncased", audio_dim=5, vision_dim=20))
    out = model(input_ids, attention_mask, token_type_ids, audio, audio_lengths,
                vision, vision_lengths, labels=labels, memory=previous.memory)
    out.score, out.lld, out.nce, out.entropy   # entropy is H in the paper

The core (config, model, engine, metrics, store, data) loads none of Ray, MLflow, DVC, Prefect
or matplotlib (tests/test_import_contract.py).
"""

from importlib import import_module

# Imported on first use (PEP 562), so that `import mmim.<module>` of a light module (the
# recordings extractor's child processes, the CLI's --help) does not load torch.
_EXPORTS = {
    "load_checkpoint": "mmim.training.checkpoint",
    "read_official_weights": "mmim.training.checkpoint",
    "save_checkpoint": "mmim.training.checkpoint",
    "Config": "mmim.core.config",
    "DataConfig": "mmim.core.config",
    "ModelConfig": "mmim.core.config",
    "TrainConfig": "mmim.core.config",
    "load_config": "mmim.core.config",
    "MMIMInputError": "mmim.core.errors",
    "compute_metrics": "mmim.core.metrics",
    "MMIM": "mmim.core.model",
    "MMIMOutput": "mmim.core.model",
    "build_model": "mmim.core.model",
    "load_official_state_dict": "mmim.core.model",
    "FeatureStore": "mmim.core.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmim' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
