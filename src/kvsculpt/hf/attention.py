"""kvsculpt's attention: one function for transformers' ``AttentionInterface``, registered by :func:`register`.

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

import torch
import torch.nn.functional as F

from ..core.attention import future_mask
from .dims import attention_modules

ATTENTION_NAME = "kvsculpt"
BIAS_ATTR = "kvsculpt_bias"  # on a key tensor: [Hkv, P] additive bias over its first P entries
QUERY_SINK_ATTR = "_kvsculpt_query_sink"  # on an attention module: list receiving queries


def _mask(q_len: int, kv_len: int, key_bias, groups: int, dtype, device):
    """Float mask ``[1, H or 1, q, kv]``: causal over the last ``q_len`` keys, ``key_bias`` on the prefix."""
    mask = torch.zeros(1, 1, q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(future_mask(q_len, kv_len, device), float("-inf"))
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


def register() -> str:
    """Register kvsculpt's attention and mask functions with transformers (idempotent); returns the name to
    pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, kvsculpt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, kvsculpt_mask)
    return ATTENTION_NAME


def use_kvsculpt_attention(model) -> None:
    """Switch ``model`` to kvsculpt's attention (a no-op if already set). Only this model is affected."""
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(register())


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
