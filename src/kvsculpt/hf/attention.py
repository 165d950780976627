"""kvsculpt's attention: one function for transformers' ``AttentionInterface``, registered by :func:`register`.

It is plain SDPA plus two things, both opt-in per call and never global:

* a compressed block shared by the whole batch: a :class:`~kvsculpt.cache.CompressedCache` hands the attention
  only each row's appended tokens, carrying the block (keys and values ``[Hkv, P, d]``, a per-entry additive
  bias ``[Hkv, P]``: ``β`` of compressed entries, ``-inf`` on padding) as the attribute ``kvsculpt_block``. Every
  query sees the whole block and the appended tokens causally; the block is read once for all rows of the
  batch, never copied per row (B sequences continuing one context cost one context's memory traffic);
* query capture: when a list is attached to an attention module (see :func:`capture_queries`), the module's
  post-RoPE queries ``[B, H, q, d]`` are appended to it.

The mask is built here, not by transformers' mask utilities (padding in a batch is not supported).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..core.attention import future_mask
from .dims import attention_modules

ATTENTION_NAME = "kvsculpt"
BLOCK_ATTR = "kvsculpt_block"  # on a key tensor: (keys [Hkv, P, d], values [Hkv, P, d], bias [Hkv, P] | None)
KEY_BIAS_ATTR = "kvsculpt_key_bias"  # on a key tensor: [B, Hkv, a] fp32 additive bias of the appended keys
SCORES_ATTR = "kvsculpt_scores"  # on a key tensor: [B, Hkv, a] fp32, to which each forward adds its attention
QUERIES_ATTR = (
    "kvsculpt_queries"  # on a key tensor: a list receiving (query [B, H, q, d], scale) of each forward
)
QUERY_SINK_ATTR = "_kvsculpt_query_sink"  # on an attention module: a callable receiving (queries, keys)


LOGITS_AT_ONCE = 1 << 22  # block_attention's default slice: this many logits (16 MB in fp32)


def block_attention(
    query, key, value, block, scale: float, rows_at_once: int | None = None, scores=None, key_bias=None
) -> torch.Tensor:
    """Attention over a shared block and each row's own appended tokens: query ``[B, H, q, d]``, key/value
    ``[B, Hkv, a, d]`` (the query's tokens are the last ``q`` of the ``a``), block ``(K [Hkv, P, d],
    V [Hkv, P, d], bias [Hkv, P] or None)`` → ``[B, H, q, d]`` in the query's dtype. One softmax over ``P + a``
    logits; the block's part is one matmul over all rows' queries. Computed in fp32 at least, as SDPA
    accumulates (a bf16 block is upcast one layer at a time, transiently; nothing is kept in fp32), and
    ``rows_at_once`` queries at a time, so a long forward over a block (a part read after a compressed prefix)
    holds ``[B, H, rows_at_once, P + a]`` logits, not ``[B, H, q, P + a]`` (default: as many rows as keep a
    slice's logits to :data:`LOGITS_AT_ONCE` numbers, at least 16: 16 MB in fp32, three such tensors live;
    1 << 22 rather than 1 << 24 cut the peak of reading 4096 tokens in two parts by 155 MB, at the same speed
    and KL). ``block`` may also be a callable returning that triple (a quantised block, dequantised here, one
    layer at a time). ``scores [B, Hkv, a]``: if given, each appended key's attention probability, summed over
    the queries and the query heads sharing it, is added to it (a decode budget's record of what the
    generation reads). ``key_bias [B, Hkv, a]``: an additive bias on the appended keys' logits (block entries a
    fork took over, with their ``β``)."""
    bk, bv, bias = block() if callable(block) else block
    B, H, q, d = query.shape
    Hkv, P, a = bk.shape[0], bk.shape[1], key.shape[-2]
    G, c = H // Hkv, torch.promote_types(query.dtype, torch.float32)
    rows_at_once = rows_at_once or max(16, LOGITS_AT_ONCE // (B * H * (P + a)))
    bk, bv, k, v = bk.to(c), bv.to(c), key.to(c), value.to(c)
    out = query.new_empty(B, H, q, d)
    for i in range(0, q, rows_at_once):
        j = min(q, i + rows_at_once)
        seen = a - q + j  # the appended keys the last of these queries sees
        qc = query[:, :, i:j].to(c).reshape(B, Hkv, G * (j - i), d) * scale
        rows = qc.transpose(0, 1).reshape(
            Hkv, B * G * (j - i), d
        )  # all rows' queries against the block at once
        s_block = torch.matmul(rows, bk.transpose(-1, -2)).view(Hkv, B, G * (j - i), P).transpose(0, 1)
        s = torch.cat([s_block, torch.matmul(qc, k[..., :seen, :].transpose(-1, -2))], -1)
        s = s.view(B, Hkv, G, j - i, P + seen)
        if bias is not None:
            s[..., :P] += bias.to(c)[None, :, None, None]
        if key_bias is not None:
            s[..., P:] += key_bias[..., :seen].to(c)[:, :, None, None]
        s[..., P:].masked_fill_(future_mask(j - i, seen, query.device), float("-inf"))
        p = torch.softmax(s, -1).view(B, Hkv, G * (j - i), P + seen)
        p_block = p[..., :P].transpose(0, 1).reshape(Hkv, B * G * (j - i), P)
        o = torch.matmul(p_block, bv).view(Hkv, B, G * (j - i), d).transpose(0, 1)
        o = o + torch.matmul(p[..., P:], v[..., :seen, :])
        if scores is not None:
            scores[..., :seen] += p[..., P:].sum(2).detach().float()
        out[:, :, i:j] = o.reshape(B, H, j - i, d).to(query.dtype)
    return out


def kvsculpt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query ``[B, H, q, d]``, key/value ``[B, Hkv, kv, d]`` → ``([B, q, H, d], None)``."""
    sink = getattr(module, QUERY_SINK_ATTR, None)
    if sink is not None:  # capture_queries: the layer's queries and the keys they attend to
        sink(query.detach(), key.detach())
    block = getattr(key, BLOCK_ATTR, None)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if block is not None:
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        read_by = getattr(key, QUERIES_ATTR, None)
        if read_by is not None:  # a decode budget that refits keeps the generation's queries
            read_by.append((query.detach(), scale))
        out = block_attention(query, key, value, block, scale, scores=getattr(key, SCORES_ATTR, None),
                              key_bias=getattr(key, KEY_BIAS_ATTR, None))  # fmt: skip
    elif q_len == kv_len:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
    elif q_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=causal_mask(q_len, kv_len, query.dtype, query.device),
            scale=scaling,
            enable_gqa=True,
        )
    return out.transpose(1, 2).contiguous(), None


_shared_masks: dict | None = None  # set by reuse_masks(): the masks of the forward now running, by shape


def causal_mask(q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """The additive mask ``[q_len, kv_len]`` of the last ``q_len`` of ``kv_len`` positions (0 where a query sees
    a key, -inf after it). Within :func:`reuse_masks`, built once per shape and shared by every layer."""
    key = (q_len, kv_len, dtype, device)
    if _shared_masks is not None and key in _shared_masks:
        return _shared_masks[key]
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(future_mask(q_len, kv_len, device), float("-inf"))
    if _shared_masks is not None:
        _shared_masks[key] = mask
    return mask


@contextlib.contextmanager
def reuse_masks():
    """Within the block, the attention's causal masks are built once per shape, not once per layer (one forward
    of q tokens over a cache: one ``[q, kv]`` mask instead of one per layer); they are let go at its end."""
    global _shared_masks
    outer, _shared_masks = _shared_masks, {} if _shared_masks is None else _shared_masks
    try:
        yield
    finally:
        _shared_masks = outer


def kvsculpt_mask(*args, attention_mask=None, **kw):
    """The matching mask function: the attention builds its own mask, so this only rejects padding. It takes
    any arguments (transformers 5.2 passes ``cache_position``, 5.1x ``q_length``), all by keyword."""
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
def capture_queries(model, last: int | None = None, consume=None):
    """Within the block, every forward appends each layer's post-RoPE queries ``[B, H, q, d]`` (only the last
    ``last`` positions of each forward if given, ``[B, H, min(q, last), d]``).

    Yields a list (one list per layer) that fills up as the model runs. With ``consume(layer)`` (a function
    returning a callable per layer), each layer's queries and the keys they attend to ``[B, Hkv, kv, d]``
    (the cache's, this forward's included) are passed to ``consume(layer)(query, key)`` inside the forward
    instead, so that no layer's queries outlive its attention unless the callable keeps them.
    """
    use_kvsculpt_attention(model)
    mods = attention_modules(model)
    sinks = [[] for _ in mods]

    def keep(li):
        return lambda query, key: sinks[li].append(query if last is None else query[:, :, -last:])

    for li, mod in enumerate(mods):
        setattr(mod, QUERY_SINK_ATTR, keep(li) if consume is None else consume(li))
    try:
        yield sinks
    finally:
        for mod in mods:
            delattr(mod, QUERY_SINK_ATTR)


@contextlib.contextmanager
def attention_inputs(model, on_input):
    """Within the block, every forward calls ``on_input(layer, hidden [B, q, D])`` with each layer's attention
    input (the hidden states after the layer's norm, as its key and value projections read them), through a
    forward pre-hook on each attention module."""

    def hook(li):
        def read(module, args, kwargs):
            on_input(li, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        return read

    handles = [mod.register_forward_pre_hook(hook(li), with_kwargs=True)
               for li, mod in enumerate(attention_modules(model))]  # fmt: skip
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
