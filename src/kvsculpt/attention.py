"""kvsculpt's attention: one function registered with transformers' ``AttentionInterface``.

It is plain SDPA plus two things, both opt-in per call and never global:

* a per-entry additive bias on the keys (``β`` of compressed entries, ``-inf`` on padding), carried by the
  key tensor that a :class:`~kvsculpt.cache.CompressedCache` returns (attribute ``kvsculpt_bias``);
* query capture: when a list is attached to an attention module (see :func:`capture_queries`), the module's
  post-RoPE queries ``[B, H, q, d]`` are appended to it.

The mask is built here, not by transformers' mask utilities: the keys are ``prefix + new tokens``, every
new token sees the whole prefix and the new tokens causally (padding in a batch is not supported).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "kvsculpt"
BIAS_ATTR = "kvsculpt_bias"  # on a key tensor: [Hkv, P] additive bias over its first P entries
QUERY_SINK_ATTR = "_kvsculpt_query_sink"  # on an attention module: list receiving queries


def logits(Q: torch.Tensor, K: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention logits ``s·Q·Kᵀ + β``: Q ``[..., N, d]``, K ``[..., m, d]``, bias ``[..., m]`` → ``[..., N, m]``."""
    out = torch.matmul(Q, K.transpose(-1, -2)) * scale
    return out if bias is None else out + bias.unsqueeze(-2)


def attend(Q, K, V, scale: float, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of Q over (K, V): returns output ``[..., N, d]`` and log-mass ``z`` ``[..., N]``."""
    lg = logits(Q, K, scale, bias)
    z = torch.logsumexp(lg, dim=-1)
    return torch.matmul(torch.exp(lg - z.unsqueeze(-1)), V), z


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _mask(q_len: int, kv_len: int, key_bias, groups: int, dtype, device):
    """Float mask ``[1, H or 1, q, kv]``: causal over the last ``q_len`` keys, ``key_bias`` on the prefix."""
    prefix = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(kv_len, device=device)[None, :]
    mask = torch.zeros(1, 1, q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(cols > rows + prefix, float("-inf"))
    if key_bias is not None:
        b = key_bias.to(dtype).repeat_interleave(groups, dim=0)  # [H, P]
        full = torch.zeros(b.shape[0], kv_len, dtype=dtype, device=device)
        full[:, : b.shape[1]] = b
        mask = mask + full[None, :, None, :]
    return mask


def kvsculpt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query ``[B, H, q, d]``, key/value ``[B, Hkv, kv, d]`` → ``([B, q, H, d], None)``."""
    sink = getattr(module, QUERY_SINK_ATTR, None)
    if sink is not None:
        sink.append(query.detach())
    key_bias = getattr(key, BIAS_ATTR, None)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    groups = query.shape[1] // key.shape[1]
    if key_bias is None and q_len == kv_len:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
    elif key_bias is None and q_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    else:
        mask = _mask(q_len, kv_len, key_bias, groups, query.dtype, query.device)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
        )
    return out.transpose(1, 2).contiguous(), None


def kvsculpt_mask(
    batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None, **kw
):
    """The matching mask function: the attention builds its own mask, so this only rejects padding."""
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "kvsculpt attention does not support padded batches (attention_mask has zeros); "
            "run sequences of equal length or one at a time"
        )
    return None


AttentionInterface.register(ATTENTION_NAME, kvsculpt_attention)
AttentionMaskInterface.register(ATTENTION_NAME, kvsculpt_mask)


def use_kvsculpt_attention(model) -> None:
    """Switch ``model`` to kvsculpt's attention (a no-op if already set). Only this model is affected."""
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


def attention_modules(model) -> list:
    """The self-attention modules of ``model``, in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


@contextlib.contextmanager
def capture_queries(model):
    """Within the block, every forward appends each layer's post-RoPE queries ``[B, H, q, d]``.

    Yields a list (one list per layer) that fills up as the model runs.
    """
    use_kvsculpt_attention(model)
    mods = attention_modules(model)
    sinks = [[] for _ in mods]
    for mod, sink in zip(mods, sinks, strict=True):
        setattr(mod, QUERY_SINK_ATTR, sink)
    try:
        yield sinks
    finally:
        for mod in mods:
            delattr(mod, QUERY_SINK_ATTR)


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")


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


def model_dims(model) -> tuple[int, int, int, int, float]:
    """``(layers, heads, kv_heads, head_dim, scale)`` of a supported model."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    scale = getattr(attention_modules(model)[0], "scaling", None) or default_scale(head_dim)
    return cfg.num_hidden_layers, heads, cfg.num_key_value_heads, head_dim, float(scale)
