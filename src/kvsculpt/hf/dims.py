"""A model's attention dimensions, read once, and the check that kvsculpt can compress its cache."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
_DIMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ModelDims:
    layers: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    scale: float  # the attention's logit scale (1/sqrt(head_dim) unless the model says otherwise)

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads


def attention_modules(model) -> list:
    """The self-attention modules of ``model``, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def model_dims(model) -> ModelDims:
    """The :class:`ModelDims` of a supported model (computed once per model object)."""
    if model not in _DIMS:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        scale = getattr(attention_modules(model)[0], "scaling", None) or 1.0 / math.sqrt(head_dim)
        _DIMS[model] = ModelDims(
            cfg.num_hidden_layers, heads, cfg.num_key_value_heads, head_dim, float(scale)
        )
    return _DIMS[model]


def check_supported(model) -> None:
    """Raise a clear error for models whose cache kvsculpt cannot compress."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", "?")
    if getattr(cfg, "kv_lora_rank", None) is not None or "deepseek" in mtype:
        raise NotImplementedError(f"{mtype}: multi-head latent attention (MLA) caches are not supported")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model type {mtype!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(cfg, "use_cache", True) is False and not hasattr(cfg, "num_key_value_heads"):
        raise NotImplementedError(f"{mtype}: the model has no KV cache")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if (window is not None and uses_window) or any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(f"{mtype}: sliding-window attention layers are not supported")
    if len(attention_modules(model)) != cfg.num_hidden_layers:
        raise NotImplementedError(f"{mtype}: could not find one attention module per layer")
