"""Capture of a context's keys, values and reference queries.

One prefill gives, per layer, keys and values ``[Hkv, n, d]`` exactly as the cache holds them (post-RoPE),
and the reference queries the compressed block is fitted to, with the GQA query heads of each KV head
pooled: ``[Hkv, N, d]``. Query sources (SPEC §2), see :data:`kvsculpt.config.QUERY_SOURCES`:

* ``context``: the context's own prefill queries;
* ``repeat``: after the context's prefill, the model is asked to repeat it, ``repeat_chunk`` tokens per request,
  each request read over the context's cache alone (KVzip's reconstruction); the copies' queries;
* ``self``: the model samples S continuations of L tokens from the full cache; their queries.

Each query carries a group id (a self sample, or a block of 32 positions) so that whole groups can be held
out for validation.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import join_blocks, shared_cache
from ..config import CompressConfig
from ..core.attention import local_lse, logits
from ..core.fit import subsample_index
from .attention import capture_queries
from .decode import check_ids, decode, forward, prefill, text_ids, top_p_pick
from .dims import check_supported, model_dims

REPEAT_PROMPT = "\n\nRepeat the text above.\n\n"  # repeat_prompt="plain"
KVZIP_PROMPT = (
    "\n\nRepeat the previous context exactly."  # repeat_prompt="kvzip": KVzip's (and kvpress's) words
)
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
    # repeat prompt and copy so far); -inf where there are none (context and self queries)
    local_lse: list[torch.Tensor] | None = None
    # [N, 2]: the part [a, b) of the context each query reconstructs, where the repeat pass ran in several
    # requests (its queries carry their chunk; the others [0, n)); None when every query reads the whole context
    spans: torch.Tensor | None = None

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


def _position_groups(length: int, G: int) -> torch.Tensor:
    return pooled_groups((torch.arange(length) // POSITION_GROUP)[None], 1, G)


def stage(progress: bool, message: str) -> None:
    """One line on stderr saying what a slow step is doing now (when ``progress``)."""
    if progress:
        tqdm.write(f"kvsculpt: {message}", file=sys.stderr)


def sample_self_queries(model, cache, n: int, last_logits, cfg: CompressConfig, progress=False):
    """Sample ``cfg.self_samples`` continuations of ``cfg.self_length`` tokens from ``cache`` (a
    :class:`~kvsculpt.cache.CompressedCache` of logical length ``n`` whose rows share the context: the full cache,
    :func:`~kvsculpt.cache.shared_cache`, or a compressed prefix and the part just read). Returns ``(queries per
    layer [Hkv, S·G·L, d], groups [S·G·L], tokens [S, L])``; the group is the sample."""
    S, L = cfg.self_samples, cfg.self_length
    dims = model_dims(model)
    pick = top_p_pick(cfg.temperature, cfg.top_p, torch.Generator().manual_seed(cfg.seed))
    first = pick(last_logits[None].expand(S, -1))
    bar = tqdm(total=L, desc=f"sample {S}x{L} self tokens", disable=not progress, leave=False)
    with capture_queries(model) as sinks:
        # L forwards (the first token and L−1 picks); the last pick is not used
        picks = decode(model, cache, first, n, L, pick, progress=bar)
    bar.close()
    queries = [pool_gqa(torch.cat(s, dim=2).float(), dims.kv_heads) for s in sinks]
    token_group = torch.arange(S).repeat_interleave(L).reshape(S, L)
    return queries, pooled_groups(token_group, S, dims.groups), torch.cat([first, picks[:, :-1]], dim=1)


def chat_template_parts(tokenizer) -> tuple[str, str]:
    """What the tokenizer's chat template puts before a user's message and between its end and the assistant's
    reply (``("", "\n")`` without a chat template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    mark = "\n###kvsculpt-mark###"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x" + mark}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    before, after = text.split("x" + mark, 1)
    return before, after


def repeat_prompt_ids(tokenizer, style: str) -> torch.Tensor:
    """The ids ``[1, p]`` put between the context and its copy. ``plain``: "Repeat the text above."; ``kvzip``:
    KVzip's request, closed as a user turn and opened as the assistant's reply by the chat template, so that an
    instruct model really repeats."""

    if style == "plain":
        return text_ids(tokenizer, REPEAT_PROMPT)
    return torch.cat(
        [text_ids(tokenizer, KVZIP_PROMPT), text_ids(tokenizer, chat_template_parts(tokenizer)[1])], dim=1
    )


REPEAT_CHUNK = 2048  # context tokens per repeat request (KVzip and kvpress reconstruct in chunks of 2048 too)
CHUNK_OVERLAP = 8  # tokens of the previous chunk quoted in a later chunk's request, as KVzip does
KVZIP_PART_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def repeat_request(tokenizer, context_ids: torch.Tensor, a: int, b: int, style: str) -> torch.Tensor:
    """The request to repeat the part ``[a, b)`` of ``context_ids [1, n]``, followed by that part: ``[1, p + b − a]``.
    The first part follows the plain prompt (:func:`repeat_prompt_ids`); a later one follows a request to repeat
    the part that starts after the last :data:`CHUNK_OVERLAP` tokens before it (quoted), so that the model finds
    its place in the context instead of copying its own copy (KVzip's words with ``style="kvzip"``)."""
    if a == 0:
        prompt = repeat_prompt_ids(tokenizer, style)
    else:
        words = (
            KVZIP_PART_PROMPT
            if style == "kvzip"
            else "\n\nRepeat the part of the text above that starts with"
        )
        quoted = context_ids[:, max(0, a - CHUNK_OVERLAP) : a].cpu()
        tail = chat_template_parts(tokenizer)[1] if style == "kvzip" else "\n\n"
        prompt = torch.cat([text_ids(tokenizer, words), quoted, text_ids(tokenizer, tail)], dim=1)
    return torch.cat([prompt.to(context_ids.device), context_ids[:, a:b]], dim=1)


def repeat_requests(tokenizer, context_ids: torch.Tensor, style: str, chunk: int | None):
    """The repeat pass's requests: ``[(a, b, ids [1, p_c + b − a])]``, one per chunk ``[a, b)`` of the context
    (:func:`repeat_request`): one for the whole context with ``chunk`` None or not below n, else one per
    ``chunk`` tokens, each read on its own over the context's cache (KVzip's reconstruction)."""
    n = context_ids.shape[1]
    step = n if not chunk or n <= chunk else chunk
    return [(a, min(n, a + step), repeat_request(tokenizer, context_ids, a, min(n, a + step), style))
            for a in range(0, n, step)]  # fmt: skip


def request_queries(model, cache, ids: torch.Tensor, start: int, t: int):
    """Run one repeat request ``ids [1, p]`` over ``cache`` (logical length ``start``) and return, per layer, its
    last ``t`` queries ``[1, H, t, d]`` (fp32) and their log-mass on the request's own keys, seen causally
    ``[1, H, t]``; the cache is cropped back to ``start``. Forwards of :data:`REPEAT_CHUNK` tokens (memory)."""
    dims = model_dims(model)
    with capture_queries(model) as sinks:
        for c in range(0, ids.shape[1], REPEAT_CHUNK):
            forward(model, ids[:, c : c + REPEAT_CHUNK], cache, start + c, last_only=True)
    qs, lses = [], []
    for s, layer in zip(sinks, cache.layers, strict=True):
        q = torch.cat(s, dim=2)[:, :, -t:].float()  # [1, H, t, d]
        qs.append(q)
        lses.append(local_lse(q, layer.keys[0, :, -ids.shape[1] :].float(), dims.scale))  # request and copy
    cache.crop(start - cache.get_seq_length())  # back to the context (a negative crop drops tokens)
    return qs, lses


@torch.inference_mode()
def _repeat_queries(model, context_ids, tokenizer, style: str, cache=None, chunk: int | None = None):
    """Queries ``[Hkv, G·t, d]`` per layer while the model repeats the context after a request (the copy's
    ``t = n`` queries; with ``style="kvzip"`` the requests' too, as KVzip scores them), their groups, each
    query's log-mass on the keys outside the context (its request and its copy so far), and the chunk
    ``[a, b)`` of the context each query reconstructs ``[t, 2]`` (before pooling).

    The context is repeated in requests of ``chunk`` tokens (:func:`repeat_requests`; default
    :data:`REPEAT_CHUNK`, 0: one request for the whole context), each one forward over the context's own cache
    (``cache``: its prefill, cropped back to n after each request; None: the context is prefilled here). Each
    forward holds ``p + chunk`` queries over ``n + p + chunk`` keys, so the pass costs O(n·chunk) attention
    beyond the prefill instead of the O(n²) of one whole copy, and no query sees more than a chunk of its own
    copy."""
    if tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    dims = model_dims(model)
    n = context_ids.shape[1]
    if cache is None:
        cache = DynamicCache()
        forward(model, context_ids, cache, 0, last_only=True)
    requests = repeat_requests(tokenizer, context_ids, style, REPEAT_CHUNK if chunk is None else chunk)
    qs = [[] for _ in range(dims.layers)]
    lses = [[] for _ in range(dims.layers)]
    spans = []
    for a, b, ids in requests:
        t = (b - a) + (ids.shape[1] - (b - a) if style == "kvzip" else 0)
        q, lse = request_queries(model, cache, ids, n, t)
        for li in range(dims.layers):
            qs[li].append(q[li])
            lses[li].append(lse[li])
        spans.append(torch.tensor([[a, b]]).expand(t, 2))
    t_all = sum(x.shape[2] for x in qs[0])
    q_out = [pool_gqa(torch.cat(q, dim=2), dims.kv_heads) for q in qs]
    lse_out = [pool_gqa(torch.cat(x, dim=2)[..., None], dims.kv_heads)[..., 0] for x in lses]
    return q_out, _position_groups(t_all, dims.groups), lse_out, torch.cat(spans)


def join_sources(found, n: int, cfg: CompressConfig, info: dict):
    """Join the query sources ``found`` (in order; each ``(name, queries per layer [Hkv, N_s, d], groups [N_s],
    log-mass outside the block per layer [Hkv, N_s] or None, spans [N_s, 2] or None, seconds)``) into one set:
    ``(queries per layer [Hkv, N, d], groups [N] numbered apart per source, log-mass outside the block per layer
    or None when no source has any, spans [N, 2] or None when every query reads [0, n))``, subsampled to
    ``cfg.max_queries``. Each source's span, groups, count and seconds are recorded in ``info``."""
    L = len(found[0][1])
    parts, groups, local_parts, span_parts, next_group, start = [], [], [], [], 0, 0
    for src, q, g, lse, spans, seconds in found:
        parts.append(q)
        local_parts.append(
            lse if lse is not None else [torch.full(x.shape[:2], float("-inf"), device=x.device) for x in q]
        )
        span_parts.append(spans if spans is not None else torch.tensor([[0, n]]).expand(g.shape[0], 2))
        info[f"{src}_span"] = (
            start,
            start + int(g.shape[0]),
        )  # [start, end) of its queries before subsampling
        info[f"{src}_groups"] = (next_group, next_group + int(g.max()) + 1)  # [start, end) of its group ids
        info[f"{src}_queries"], info[f"{src}_seconds"] = int(g.shape[0]), seconds
        groups.append(g + next_group)
        start, next_group = start + int(g.shape[0]), next_group + int(g.max()) + 1
    qs = [torch.cat([p[i] for p in parts], dim=1) for i in range(L)]
    groups = torch.cat(groups)
    local = None
    if any(f[3] is not None for f in found):
        local = [torch.cat([p[i] for p in local_parts], dim=1) for i in range(L)]
    spans = torch.cat(span_parts) if any(f[4] is not None for f in found) else None
    keep = subsample_index(groups.shape[0], cfg.max_queries, cfg.seed)
    if keep is not None:
        qs, groups = [q[:, keep.to(q.device)] for q in qs], groups[keep]
        local = None if local is None else [x[:, keep.to(x.device)] for x in local]
        spans = None if spans is None else spans[keep]
    info["subsample_index"] = keep
    return qs, groups, local, spans


@torch.inference_mode()
def capture(model, context_ids: torch.Tensor, cfg: CompressConfig | None = None, tokenizer=None,
            progress: bool = False, keep_context_queries: bool | None = None, **changes) -> Capture:  # fmt: skip
    """Prefill ``context_ids [1, n]`` and collect K, V and the reference queries of ``cfg.queries``
    (``changes`` update ``cfg``, e.g. ``queries="context"``). The context's own per-head queries are kept
    (``Capture.context_queries``) if ``keep_context_queries``, by default when the method needs them."""
    cfg = (cfg or CompressConfig()).replace(**changes) if changes else (cfg or CompressConfig())
    check_supported(model)
    context_ids = check_ids(context_ids, model.device)
    dims = model_dims(model)
    Hkv, G, n = dims.kv_heads, dims.groups, context_ids.shape[1]
    keep_context = cfg.solver.needs_context_queries if keep_context_queries is None else keep_context_queries
    want_ctx = "context" in cfg.sources or keep_context
    stage(progress, f"prefill of {n} tokens")
    if want_ctx:
        with capture_queries(model) as sinks:
            cache, last, prefill_s = prefill(model, context_ids)
        ctx_q = [torch.cat(s, dim=2) for s in sinks]  # [1, H, n, d] per layer
    else:
        cache, last, prefill_s = prefill(model, context_ids)
    keys = [layer.keys[0].float() for layer in cache.layers]
    values = [layer.values[0].float() for layer in cache.layers]
    if "repeat" not in cfg.sources:
        del cache  # else the repeat pass continues it
    info, found, samples = {"sources": list(cfg.sources)}, [], None
    t0 = time.perf_counter()
    for src in cfg.sources:
        lse, spans, t_src = None, None, time.perf_counter()
        if src == "context":
            q, g = [pool_gqa(x.float(), Hkv) for x in ctx_q], _position_groups(n, G)
        elif src == "repeat":
            stage(progress, f"repeat pass (prompt + {n} tokens, after the context's prefill)")
            q, g, lse, spans = _repeat_queries(model, context_ids, tokenizer, cfg.repeat_prompt, cache,
                                               cfg.repeat_chunk)  # fmt: skip
            info["repeat_chunks"] = len(torch.unique(spans[:, 0]))
            # pooled order: the GQA heads, then the tokens; None when one request reads the whole context
            spans = spans.repeat(dims.groups, 1) if info["repeat_chunks"] > 1 else None
            del cache
        else:
            shared = shared_cache(model, keys, values)
            q, g, samples = sample_self_queries(model, shared, n, last, cfg, progress)
        found.append((src, q, g, lse, spans, time.perf_counter() - t_src))
    query_s = time.perf_counter() - t0
    qs, groups, local, spans = join_sources(found, n, cfg, info)
    per_head = [x[0].float().reshape(Hkv, G, n, -1) for x in ctx_q] if keep_context else None
    return Capture(keys, values, qs, groups, dims.scale, last, prefill_s, query_s, samples, per_head,
                   context_ids.cpu(), info, local, spans)  # fmt: skip


@torch.inference_mode()
def capture_part(model, prefix, context_ids: torch.Tensor, a: int, b: int, cfg: CompressConfig, tokenizer=None,
                 progress: bool = False) -> Capture:  # fmt: skip
    """Read the part ``[a, b)`` of ``context_ids [1, n]`` after ``prefix`` (a
    :class:`~kvsculpt.cache.CompressedCache` of the first ``a`` tokens, already compressed; None when ``a = 0``)
    and capture what the part's own solve needs, as :func:`capture` does for a whole context: the part's keys
    and values ``[Hkv, b − a, d]``, computed over the compressed prefix (what a reader that keeps only the
    compressed cache has), and the queries of ``cfg.queries`` that read the part:

    * ``context``: the part's prefill queries; ``repeat``: one request to repeat the part
      (:func:`repeat_request`) over prefix and part, its log-mass on its own request and copy carried outside
      the block (the prefix's share is left out, as the whole-context pass leaves out the other chunks);
    * ``self``: samples drawn after the part, over prefix and part.

    A context or self query's log-mass on the prefix's entries is carried outside the block (``local_lse``), so
    its weight on the part is exact. Cost: one forward of ``b − a`` tokens over the prefix's entries, one request
    of ``p + b − a`` tokens, ``S·L`` sampled tokens; memory: the prefix, the part and the part's queries,
    whatever ``a`` is."""
    check_supported(model)
    context_ids = check_ids(context_ids, model.device)
    dims = model_dims(model)
    Hkv, G, c = dims.kv_heads, dims.groups, b - a
    if "repeat" in cfg.sources and tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    want_ctx = "context" in cfg.sources or cfg.solver.needs_context_queries
    cache = DynamicCache() if prefix is None else prefix.fork()
    where = "" if prefix is None else f" after {prefix.kept_entries()} compressed entries"
    stage(progress, f"read tokens {a}-{b}{where}")
    t0 = time.perf_counter()
    with capture_queries(model) if want_ctx else contextlib.nullcontext() as sinks:
        last = forward(model, context_ids[:, a:b], cache, a, last_only=True)[0, -1].float()
    prefill_s = time.perf_counter() - t0
    ctx_q = [torch.cat(s, dim=2) for s in sinks] if want_ctx else None  # [1, H, c, d] per layer
    keys = [layer.keys[0, :, -c:].float() for layer in cache.layers]
    values = [layer.values[0, :, -c:].float() for layer in cache.layers]

    def on_prefix(q: list[torch.Tensor], rows: int = 2048) -> list[torch.Tensor] | None:
        """Each pooled query's log-mass on the prefix's entries ``[Hkv, N]`` per layer (None without a prefix)."""
        if prefix is None:
            return None
        out = []
        for layer, x in zip(prefix.layers, q, strict=True):
            bk, _, bias = layer.padded_block(torch.float32)
            bk, bias = bk.float(), None if bias is None else bias.float()
            out.append(torch.cat([torch.logsumexp(logits(x[:, i : i + rows], bk, dims.scale, bias), -1)
                                  for i in range(0, x.shape[1], rows)], dim=1))  # fmt: skip
        return out

    info, found, samples = {"sources": list(cfg.sources), "part": (a, b)}, [], None
    t0 = time.perf_counter()
    for src in cfg.sources:
        t_src = time.perf_counter()
        if src == "context":
            q, g = [pool_gqa(x.float(), Hkv) for x in ctx_q], _position_groups(c, G)
            lse = on_prefix(q)
        elif src == "repeat":
            ids = repeat_request(tokenizer, context_ids, a, b, cfg.repeat_prompt)
            t = c + (ids.shape[1] - c if cfg.repeat_prompt == "kvzip" else 0)
            q, lse = request_queries(model, cache, ids, b, t)
            q = [pool_gqa(x, Hkv) for x in q]
            lse = [pool_gqa(x[..., None], Hkv)[..., 0] for x in lse]
            g = _position_groups(t, G)
        else:
            joined = join_blocks(model, prefix, shared_cache(model, keys, values), b)
            q, g, samples = sample_self_queries(model, joined, b, last, cfg, progress)
            lse = on_prefix(q)
        found.append((src, q, g, lse, None, time.perf_counter() - t_src))
    query_s = time.perf_counter() - t0
    qs, groups, local, _ = join_sources(found, c, cfg, info)
    per_head = (
        [x[0].float().reshape(Hkv, G, c, -1) for x in ctx_q] if cfg.solver.needs_context_queries else None
    )
    return Capture(keys, values, qs, groups, dims.scale, last, prefill_s, query_s, samples, per_head,
                   context_ids[:, a:b].cpu(), info, local, None)  # fmt: skip


@torch.inference_mode()
def replay_self_queries(model, cap: Capture, cache) -> list[torch.Tensor]:
    """``cap.queries`` with the self-sample queries recomputed over ``cache`` (e.g. a partly compressed one).

    The self samples' tokens ``[S, L]`` are teacher-forced through the model on ``cache`` (logical length
    ``cap.n``, expanded to the S samples); the other sources' queries are kept. Returns per layer
    ``[Hkv, N, d]``, in the same order as ``cap.queries``.
    """
    if cap.samples is None or "self_span" not in cap.info:
        raise ValueError("replay needs a capture with self samples")
    Hkv = model_dims(model).kv_heads
    with capture_queries(model) as sinks:
        forward(model, cap.samples, cache, cap.n)
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
