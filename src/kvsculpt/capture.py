"""Capture of a context's keys, values and reference queries.

One prefill gives, per layer, keys and values ``[Hkv, n, d]`` exactly as the cache holds them (post-RoPE),
and the reference queries the compressed block is fitted to, with the GQA query heads of each KV head
pooled: ``[Hkv, N, d]``. Query sources (SPEC §2):

* ``context``: the context's own prefill queries;
* ``repeat``: prefill ``context + prompt + context`` and take the second copy's queries;
* ``self``: the model samples S continuations of L tokens from the full cache; their queries.

Each query carries a group id (a self sample, or a block of 32 positions) so that whole groups can be held
out for validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .attention import capture_queries, check_supported, logits, model_dims

QUERY_SOURCES = ("self", "context", "repeat")
REPEAT_PROMPT = "\n\nRepeat the text above.\n\n"
POSITION_GROUP = 32  # context/repeat queries: positions per group for held-out splits


@dataclass
class Capture:
    """What one context gives the solvers. Per-layer lists; tensors are fp32 on the model's device."""

    keys: list[torch.Tensor]  # [Hkv, n, d]
    values: list[torch.Tensor]  # [Hkv, n, d]
    queries: list[torch.Tensor]  # [Hkv, N, d]
    groups: torch.Tensor  # [N] group id of each query (before pooling over GQA heads, see pool_gqa)
    scale: float
    last_logits: torch.Tensor  # [vocab] logits after the context
    prefill_seconds: float
    query_seconds: float = 0.0  # extra time spent making queries (sampling, repeat prefill)
    samples: torch.Tensor | None = None  # [S, L] self-sampled tokens, if any
    context_queries: list[torch.Tensor] | None = None  # [Hkv, G, n, d] per layer, if asked for
    context_ids: torch.Tensor | None = None  # [1, n]
    info: dict = field(default_factory=dict)
    # [Hkv, N] per layer: log-sum-exp of each query's logits over the keys it sees besides the context (the
    # repeat prompt and copy so far); -inf where there are none (context and self queries, for now)
    local_lse: list[torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return self.keys[0].shape[1]


def pool_gqa(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries ``[B, H, T, d]`` → ``[Hkv, B·G·T, d]``: the G query heads sharing a KV head are pooled."""
    B, H, T, d = q.shape
    G = H // kv_heads
    return q.reshape(B, kv_heads, G, T, d).permute(1, 0, 2, 3, 4).reshape(kv_heads, B * G * T, d)


def pooled_groups(group_of_token: torch.Tensor, batch: int, G: int) -> torch.Tensor:
    """Group id of each pooled query, for tokens ``[B, T]`` of group ids, matching :func:`pool_gqa`'s order."""
    return group_of_token.reshape(batch, 1, -1).expand(batch, G, -1).reshape(-1)


def _check_ids(model, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise TypeError("context ids must be a LongTensor of token ids")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"context ids must have shape [1, n]; got {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the context is empty")
    return ids.to(model.device)


@torch.inference_mode()
def prefill(model, context_ids: torch.Tensor, with_queries: bool = False):
    """Run the context once. Returns ``(cache, last_logits [vocab], queries or None, seconds)``.

    ``queries`` is a per-layer list of ``[1, H, n, d]`` when ``with_queries``.
    """
    context_ids = _check_ids(model, context_ids)
    cache = DynamicCache()
    t0 = time.perf_counter()
    if with_queries:
        with capture_queries(model) as sinks:
            out = model(context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        queries = [torch.cat(s, dim=2) for s in sinks]
    else:
        out = model(context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        queries = None
    return cache, out.logits[0, -1].float(), queries, time.perf_counter() - t0


def _expand_cache(keys, values, batch: int) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1), i)
    return cache


def sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator
) -> torch.Tensor:
    """Sample one token per row of ``logits [B, V]`` → ``[B, 1]``."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0.0
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=gen).to(order.device)
    return order.gather(-1, choice)


@torch.inference_mode()
def sample_self_queries(
    model,
    keys,
    values,
    last_logits,
    samples=8,
    length=64,
    temperature=1.0,
    top_p=0.95,
    seed=0,
    progress=False,
):
    """Sample ``samples`` continuations of ``length`` tokens from the full cache (K/V per layer ``[Hkv, n, d]``).

    Returns ``(queries per layer [Hkv, S·G·L, d], groups [S·G·L], tokens [S, L])``; the group is the sample.
    """
    n = keys[0].shape[1]
    _, H, Hkv, _, _ = model_dims(model)
    gen = torch.Generator().manual_seed(seed)
    cache = _expand_cache(keys, values, samples)
    x = sample_top_p(last_logits[None].expand(samples, -1), temperature, top_p, gen)
    tokens = [x]
    with capture_queries(model) as sinks:
        for t in tqdm(range(length), desc=f"sample {samples}x{length} self tokens", disable=not progress):
            pos = torch.full((samples, 1), n + t, dtype=torch.long, device=x.device)
            out = model(x, past_key_values=cache, position_ids=pos, use_cache=True)
            if t < length - 1:
                x = sample_top_p(out.logits[:, -1], temperature, top_p, gen)
                tokens.append(x)
    queries = [pool_gqa(torch.cat(s, dim=2).float(), Hkv) for s in sinks]
    token_group = torch.arange(samples).repeat_interleave(length).reshape(samples, length)
    return queries, pooled_groups(token_group, samples, H // Hkv), torch.cat(tokens, dim=1)


def _position_groups(batch_len: int, G: int) -> torch.Tensor:
    return pooled_groups((torch.arange(batch_len) // POSITION_GROUP)[None], 1, G)


def subsample_index(N: int, max_queries: int | None, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of at most ``max_queries`` of ``N`` queries (None: keep all)."""
    if max_queries is None or N <= max_queries:
        return None
    if max_queries <= 0:
        raise ValueError(f"max_queries must be positive; got {max_queries}")
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:max_queries].sort().values


def subsample(queries: list[torch.Tensor], groups: torch.Tensor, max_queries: int | None, seed: int = 0):
    """Keep at most ``max_queries`` queries per layer (the same random subset for every layer and head)."""
    keep = subsample_index(groups.shape[0], max_queries, seed)
    if keep is None:
        return queries, groups
    return [q[:, keep.to(q.device)] for q in queries], groups[keep]


def capture(
    model,
    context_ids: torch.Tensor,
    queries: str | tuple[str, ...] = "self",
    max_queries: int | None = None,
    tokenizer=None,
    self_samples: int = 8,
    self_length: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    keep_context_queries: bool = False,
    progress: bool = False,
) -> Capture:
    """Prefill ``context_ids [1, n]`` and collect K, V and reference queries from one or more sources.

    ``queries``: ``"self"``, ``"context"``, ``"repeat"``, or several joined by ``+`` (e.g. ``"self+context"``).
    """
    sources = queries.split("+") if isinstance(queries, str) else tuple(queries)
    bad = [s for s in sources if s not in QUERY_SOURCES]
    if bad or not sources:
        raise ValueError(
            f"unknown query source {bad or queries!r}; choose from {', '.join(QUERY_SOURCES)} (or join with '+')"
        )
    check_supported(model)
    context_ids = _check_ids(model, context_ids)
    _, H, Hkv, _, scale = model_dims(model)
    G = H // Hkv
    n = context_ids.shape[1]
    want_ctx = "context" in sources or keep_context_queries
    cache, last, ctx_q, prefill_s = prefill(model, context_ids, with_queries=want_ctx)
    keys = [layer.keys[0].float() for layer in cache.layers]
    values = [layer.values[0].float() for layer in cache.layers]
    del cache
    parts, part_groups, local_parts, info = [], [], [], {"sources": list(sources)}
    samples = None
    t0 = time.perf_counter()
    next_group = 0
    for src in sources:
        if src == "context":
            q = [pool_gqa(x.float(), Hkv) for x in ctx_q]
            g = _position_groups(n, G)
            lse = None
        elif src == "repeat":
            q, g, lse = _repeat_queries(model, context_ids, tokenizer, Hkv, G)
        else:
            q, g, samples = sample_self_queries(
                model, keys, values, last, self_samples, self_length, temperature, top_p, seed, progress
            )
            lse = None
        local_parts.append(
            lse if lse is not None else [torch.full(x.shape[:2], float("-inf"), device=x.device) for x in q]
        )
        start = sum(int(x.shape[0]) for x in part_groups)
        info[f"{src}_span"] = (
            start,
            start + int(g.shape[0]),
        )  # [start, end) of its queries before subsampling
        parts.append(q)
        part_groups.append(g + next_group)
        info[f"{src}_groups"] = (next_group, next_group + int(g.max()) + 1)  # [start, end) of its group ids
        next_group += int(g.max()) + 1
        info[f"{src}_queries"] = int(g.shape[0])
    query_s = time.perf_counter() - t0
    qs = [torch.cat([p[i] for p in parts], dim=1) for i in range(len(keys))]
    groups = torch.cat(part_groups)
    local = None
    if "repeat" in sources:  # the only source with keys outside the context, so far
        local = [torch.cat([p[i] for p in local_parts], dim=1) for i in range(len(keys))]
    keep = subsample_index(groups.shape[0], max_queries, seed)
    if keep is not None:
        qs, groups = [q[:, keep.to(q.device)] for q in qs], groups[keep]
        local = None if local is None else [x[:, keep.to(x.device)] for x in local]
    info["subsample_index"] = keep
    per_head = None
    if keep_context_queries:
        per_head = [x[0].float().reshape(Hkv, G, n, -1) for x in ctx_q]
    return Capture(
        keys, values, qs, groups, scale, last, prefill_s, query_s, samples, per_head, context_ids.cpu(), info,
        local,
    )  # fmt: skip


@torch.inference_mode()
def replay_self_queries(model, cap: Capture, cache) -> list[torch.Tensor]:
    """``cap.queries`` with the self-sample queries recomputed over ``cache`` (e.g. a partly compressed one).

    The self samples' tokens ``[S, L]`` are teacher-forced through the model on ``cache`` (logical length
    ``cap.n``, expanded to the S samples); the other sources' queries are kept. Returns per layer
    ``[Hkv, N, d]``, in the same order as ``cap.queries``.
    """
    if cap.samples is None or "self_span" not in cap.info:
        raise ValueError("replay needs a capture with self samples")
    _, _, Hkv, _, _ = model_dims(model)
    S, L = cap.samples.shape
    tokens = cap.samples.to(model.device)
    pos = torch.arange(cap.n, cap.n + L, device=model.device)[None].expand(S, -1)
    with capture_queries(model) as sinks:
        model(tokens, past_key_values=cache, position_ids=pos, use_cache=True)
    start, end = cap.info["self_span"]
    keep = cap.info.get("subsample_index")
    idx = torch.arange(cap.groups.shape[0]) if keep is None else keep  # position in the unsubsampled order
    where = ((idx >= start) & (idx < end)).nonzero().squeeze(1)  # which of cap.queries are self queries
    out = []
    for q_old, sink in zip(cap.queries, sinks, strict=True):
        fresh = pool_gqa(torch.cat(sink, dim=2).float(), Hkv)  # [Hkv, S·G·L, d]
        q = q_old.clone()
        q[:, where.to(q.device)] = fresh[:, (idx[where] - start).to(q.device)]
        out.append(q)
    return out


@torch.inference_mode()
def _repeat_queries(model, context_ids, tokenizer, Hkv: int, G: int):
    if tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    prompt = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = context_ids.shape[1]
    ids = torch.cat([context_ids, prompt.to(context_ids.device), context_ids], dim=1)
    cache = DynamicCache()
    with capture_queries(model) as sinks:
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _, _, _, _, scale = model_dims(model)
    qs, lses = [], []
    for s, layer in zip(sinks, cache.layers, strict=True):
        q = torch.cat(s, dim=2)[:, :, -n:].float()  # [1, H, n, d]
        local_k = layer.keys[0, :, n:].float()  # [Hkv, p + n, d]: prompt and copy, seen causally
        qs.append(pool_gqa(q, Hkv))
        lses.append(pool_gqa(local_lse(q, local_k, scale)[..., None], Hkv)[..., 0])
    return qs, _position_groups(n, G), lses


def local_lse(q: torch.Tensor, local_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Log-sum-exp of the last ``t`` queries ``q [1, H, t, d]`` over the local keys ``[Hkv, s, d]`` they see
    causally (``s ≥ t``; query i sees the first ``s − t + i + 1``) → ``[1, H, t]``."""
    _, H, t, _ = q.shape
    Hkv, s_len, _ = local_k.shape
    lg = logits(q[0].reshape(Hkv, H // Hkv, t, -1), local_k[:, None], scale)  # [Hkv, G, t, s]
    future = (
        torch.arange(s_len, device=q.device)[None] > torch.arange(s_len - t, s_len, device=q.device)[:, None]
    )
    return torch.logsumexp(lg.masked_fill(future, float("-inf")), -1).reshape(1, H, t)


def split_heldout(groups: torch.Tensor, fraction: float = 0.25, seed: int = 0) -> torch.Tensor:
    """Boolean mask ``[N]``: True for queries of a random ``fraction`` of groups (held out from fitting)."""
    ids = torch.unique(groups)
    if ids.numel() < 2 or fraction <= 0:
        return torch.zeros_like(groups, dtype=torch.bool)
    k = max(1, int(round(fraction * ids.numel())))
    chosen = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))[:k]]
    return torch.isin(groups, chosen)
