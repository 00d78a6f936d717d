"""Dense and MoE transformer language models whose MLP activation is a setting.

``get_preset("tiny", activation="polynorm")`` -> :class:`ModelConfig`; ``Transformer(config)``;
``model(tokens).logits``; ``model.num_params(non_embedding=..., active=...)``; ``model.generate(...)``.
"""

from polycom.models.config import ModelConfig, MoEConfig
from polycom.models.layers import KVCache
from polycom.models.presets import get_preset, list_presets
from polycom.models.transformer import ModelOutput, Transformer, count_params

__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "MoEConfig",
    "Transformer",
    "count_params",
    "get_preset",
    "list_presets",
]
