"""MMIM (MultiModal InfoMax, EMNLP 2021) for multimodal sentiment analysis.

The public API (see README "Python API"):

    from mmim import ModelConfig, build_model, load_official_state_dict, compute_metrics
    model = build_model(ModelConfig(text_encoder="bert-base-uncased", audio_dim=5, vision_dim=20))
    out = model(input_ids, attention_mask, token_type_ids, audio, audio_lengths,
                vision, vision_lengths, labels=labels, memory=previous.memory)
    out.score, out.lld, out.nce, out.entropy   # entropy is H in the paper

The core (model, engine, metrics, store) needs only torch, numpy and transformers.
"""

from mmim.checkpoint import load_checkpoint, read_official_weights, save_checkpoint
from mmim.config import Config, DataConfig, ModelConfig, TrainConfig, load_config
from mmim.errors import MMIMInputError
from mmim.metrics import compute_metrics
from mmim.model import MMIM, MMIMOutput, build_model, load_official_state_dict
from mmim.store import FeatureStore

__all__ = [
    "MMIM", "MMIMOutput", "MMIMInputError", "Config", "DataConfig", "ModelConfig", "TrainConfig",
    "FeatureStore", "build_model", "compute_metrics", "load_checkpoint", "load_config",
    "load_official_state_dict", "read_official_weights", "save_checkpoint",
]
