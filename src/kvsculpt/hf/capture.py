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

from ..cache import block_and_part, roomy_cache
from ..config import CompressConfig
from ..core.attention import Reference, local_lse, logits, reference
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
    """What one context gives the solvers. Per-layer lists on the model's device: keys and values in the model's
    dtype, exactly as the cache holds them (no fp32 copy of the whole cache: a consumer upcasts one layer at a
    time), everything else fp32."""

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
    # with CompressConfig.repeat_fit_rows: per layer, what every repeat query gave the entries of its own chunk
    # (peak and total [Hkv, n], Reference's), counted during the pass before most of those queries were let go
    repeat_scores: list | None = None
    prescored: torch.Tensor | None = None  # [N] bool: the kept queries whose attention repeat_scores counts
    # capture_part with read_to: the tokens read past the part, (keys, values) per layer [Hkv, t, d] and the
    # logits [vocab] after them, for the next part to take over instead of reading those tokens again
    ahead: tuple | None = None

    @property
    def n(self) -> int:
        return self.keys[0].shape[1]


def source_rows(info: dict, N: int, source: str) -> torch.Tensor:
    """Which of a capture's ``N`` kept queries came from ``source`` (``"self"``, ``"repeat"``, …): ``[N]`` bool,
    from the span ``info[source + "_span"]`` the source took in the pooled order before any subsampling."""
    start, end = info[f"{source}_span"]
    keep = info.get("subsample_index")
    idx = torch.arange(N) if keep is None else keep  # position in the unsubsampled order
    return (idx >= start) & (idx < end)


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
REPEAT_FORWARD = 2048  # tokens per forward of a repeat request; its transients grow with it (O(G·w·n))
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


def request_queries(model, cache, ids: torch.Tensor, start: int, t: int, span: tuple[int, int] | None = None,
                    rows: torch.Tensor | None = None):  # fmt: skip
    """Run one repeat request ``ids [1, p]`` over ``cache`` (logical length ``start``) and return, per layer, its
    last ``t`` queries pooled over the GQA heads ``[Hkv, G·t, d]`` (fp32, :func:`pool_gqa`'s order), their
    log-mass on the request's own keys, seen causally ``[Hkv, G·t]``, and with ``span = (a, b)`` what they give
    the context's entries ``[a, b)``: a :class:`~kvsculpt.core.attention.Reference` (``peak`` and ``total``
    ``[Hkv, b − a]``; each query normalised over ``[a, b)`` and its own keys, as the chunked solve reads it),
    else None. ``rows`` (sorted indices into the ``G·t`` pooled queries): only those are returned, while every
    query still scores the span. The cache is cropped back to ``start``.

    Forwards of :data:`REPEAT_FORWARD` tokens; each layer's queries are scored and thinned inside the forward, as
    soon as the layer has attended (:func:`~kvsculpt.hf.attention.capture_queries` with ``consume``), so the
    pass holds one layer's queries of one forward at a time, not every layer's: O(G·chunk·d) working memory
    beyond what is kept. Scoring costs two matmuls per layer, ``G·t × t`` (own keys) and ``G·t × (b − a)``."""
    dims = model_dims(model)
    Hkv, G, p = dims.kv_heads, dims.groups, ids.shape[1]
    held = torch.ones(G, t, dtype=torch.bool)  # [G, t]: which pooled queries are returned
    if rows is not None:
        held = torch.zeros(G * t, dtype=torch.bool).index_fill_(0, rows.cpu(), True).view(G, t)
    parts = [[] for _ in range(dims.layers)]  # per layer: (pooled index, queries, masses) of each forward
    scored = [None] * dims.layers  # per layer: [peak, total] over the span
    window = {}  # the forward now running: its first token

    def consume(li):
        def take(query, key):
            c0, q_len = window["first"], query.shape[2]
            first = max(c0, p - t)  # this forward's first query that is one of the last t
            if first >= c0 + q_len:
                return
            q = query[:, :, first - c0 :].float()  # [1, H, t', d]
            own = key[0, :, -(c0 + q_len) :].float()  # the request's keys so far [Hkv, s, d] (a compressed
            # cache hands the attention only its appended keys, so they are counted from the end)
            lse = local_lse(q, own, dims.scale)
            q, lse = pool_gqa(q, Hkv), pool_gqa(lse[..., None], Hkv)[..., 0]  # (g, token) order
            if span is not None:  # a plain cache: its keys are the context's positions, then the request's
                ref = reference(q, key[0, :, span[0] : span[1]].float(), None, dims.scale, lse)
                if scored[li] is None:
                    scored[li] = [ref.peak, ref.total]
                else:
                    torch.maximum(scored[li][0], ref.peak, out=scored[li][0])
                    scored[li][1] += ref.total
            tok = torch.arange(first - (p - t), c0 + q_len - (p - t))  # token index within the last t
            pick = held[:, tok].reshape(-1).nonzero().squeeze(1)
            index = (torch.arange(G)[:, None] * t + tok[None]).reshape(-1)[pick]
            parts[li].append((index, q[:, pick.to(q.device)], lse[:, pick.to(lse.device)]))

        return take

    with capture_queries(model, consume=consume):
        for c in range(0, p, REPEAT_FORWARD):
            window.update(first=c)
            forward(model, ids[:, c : c + REPEAT_FORWARD], cache, start + c, last_only=True)
    qs, lses = [], []
    for li in range(dims.layers):
        if len(parts[li]) == 1:  # one forward: already in pool_gqa's order
            qs.append(parts[li][0][1])
            lses.append(parts[li][0][2])
        else:  # forwards cut the tokens: back to pool_gqa's order (GQA head, then token) over the request
            order = torch.cat([x[0] for x in parts[li]]).argsort().to(parts[li][0][1].device)
            qs.append(torch.cat([x[1] for x in parts[li]], dim=1)[:, order])
            lses.append(torch.cat([x[2] for x in parts[li]], dim=1)[:, order])
        parts[li] = None
    cache.crop(start - cache.get_seq_length())  # back to the context (a negative crop drops tokens)
    refs = None if span is None else [Reference(None, None, peak, total) for peak, total in scored]
    return qs, lses, refs


def max_request(tokenizer, context_ids: torch.Tensor, cfg: CompressConfig) -> int:
    """The most tokens one repeat request of ``cfg`` takes after ``context_ids [1, n]``, so that the context's
    cache can hold them from its prefill on (tokenising only)."""
    if tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    chunk = REPEAT_CHUNK if cfg.repeat_chunk is None else cfg.repeat_chunk
    return max(
        ids.shape[1] for _, _, ids in repeat_requests(tokenizer, context_ids, cfg.repeat_prompt, chunk)
    )


@torch.inference_mode()
def _repeat_queries(model, context_ids, tokenizer, style: str, cache=None, chunk: int | None = None,
                    keep: int | None = None, seed: int = 0):  # fmt: skip
    """Queries ``[Hkv, N, d]`` per layer while the model repeats the context after a request (the copy's
    ``t = n`` queries; with ``style="kvzip"`` the requests' too, as KVzip scores them), pooled over the GQA heads
    request by request (order: request, GQA head, token), their groups ``[N]``, each query's log-mass on the
    keys outside the context (its request and its copy so far) ``[Hkv, N]``, the chunk ``[a, b)`` of the context
    each query reconstructs ``[N, 2]``, and the running scores (None without ``keep``).

    The context is repeated in requests of ``chunk`` tokens (:func:`repeat_requests`; default
    :data:`REPEAT_CHUNK`, 0: one request for the whole context), each one forward over the context's own cache
    (``cache``: its prefill, cropped back to n after each request; None: the context is prefilled here). Each
    forward holds ``p + chunk`` queries over ``n + p + chunk`` keys, so the pass costs O(n·chunk) attention
    beyond the prefill instead of the O(n²) of one whole copy, and no query sees more than a chunk of its own
    copy.

    ``keep`` (where the context takes more than one request): every query of a request first scores its
    chunk's entries (per layer, a
    :class:`~kvsculpt.core.attention.Reference` ``[Hkv, n]`` whose ``peak`` and ``total`` are filled chunk by
    chunk: each entry is read only by its own chunk's request), then only a fixed random ``keep`` of the
    request's ``G·t`` pooled queries per KV head are held for the value fit. Memory for queries is then
    O(requests · keep · d) per layer instead of O(G · n · d)."""
    if tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    dims = model_dims(model)
    n, G = context_ids.shape[1], dims.groups
    if cache is None:
        cache = DynamicCache()
        forward(model, context_ids, cache, 0, last_only=True)
    requests = repeat_requests(tokenizer, context_ids, style, REPEAT_CHUNK if chunk is None else chunk)
    keep = keep if len(requests) > 1 else None  # one request (a short context) holds every query, as before
    qs = [[] for _ in range(dims.layers)]
    lses = [[] for _ in range(dims.layers)]
    spans, groups, position = [], [], 0
    scored = None
    if keep is not None:
        dev = context_ids.device
        scored = [Reference(None, None, torch.zeros(dims.kv_heads, n, device=dev),
                            torch.zeros(dims.kv_heads, n, device=dev)) for _ in range(dims.layers)]  # fmt: skip
    for r, (a, b, ids) in enumerate(requests):
        t = (b - a) + (ids.shape[1] - (b - a) if style == "kvzip" else 0)
        rows = None if keep is None else subsample_index(G * t, keep, seed + r)
        q, lse, refs = request_queries(model, cache, ids, n, t, None if keep is None else (a, b), rows)
        g = pooled_groups(((position + torch.arange(t)) // POSITION_GROUP)[None], 1, G)
        if rows is not None:
            g = g[rows]
        for li in range(dims.layers):
            if refs is not None:
                scored[li].peak[:, a:b], scored[li].total[:, a:b] = refs[li].peak, refs[li].total
            qs[li].append(q[li])
            lses[li].append(lse[li])
        del q, lse, refs
        groups.append(g)
        spans.append(torch.tensor([[a, b]]).expand(g.shape[0], 2))
        position += t
    return _cat_freeing(qs), torch.cat(groups), _cat_freeing(lses), torch.cat(spans), scored


def _cat_freeing(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per layer, its parts joined along dim 1; each layer's parts are let go as soon as they are joined, so
    the join holds one layer twice, not every layer."""
    out = []
    for li in range(len(parts)):
        out.append(parts[li][0] if len(parts[li]) == 1 else torch.cat(parts[li], dim=1))
        parts[li] = None
    return out


def join_sources(found, n: int, cfg: CompressConfig, info: dict):
    """Join the query sources ``found`` (in order; each ``(name, queries per layer [Hkv, N_s, d], groups [N_s],
    log-mass outside the block per layer [Hkv, N_s] or None, spans [N_s, 2] or None, seconds)``) into one set:
    ``(queries per layer [Hkv, N, d], groups [N] numbered apart per source, log-mass outside the block per layer
    or None when no source has any, spans [N, 2] or None when every query reads [0, n))``, subsampled to
    ``cfg.max_queries``. Each source's span, groups, count and seconds are recorded in ``info``."""
    L = len(found[0][1])
    parts, groups, local_parts, span_parts, next_group, start = [], [], [], [], 0, 0
    has_local, has_spans = [f[3] for f in found], [f[4] for f in found]
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
    by_layer = [[p[i] for p in parts] for i in range(L)]
    local = [[p[i] for p in local_parts] for i in range(L)] if any(x is not None for x in has_local) else None
    found.clear()  # the caller's list: each layer's parts are let go as soon as that layer is joined
    parts.clear()
    local_parts.clear()
    qs = _cat_freeing(by_layer)
    local = None if local is None else _cat_freeing(local)
    groups = torch.cat(groups)
    spans = torch.cat(span_parts) if any(x is not None for x in has_spans) else None
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
    # room for the longest repeat request after the context: the pass then never copies the cache
    reserve = max_request(tokenizer, context_ids, cfg) if "repeat" in cfg.sources else 0
    if want_ctx:
        with capture_queries(model) as sinks:
            cache, last, prefill_s = prefill(model, context_ids, reserve=reserve)
        ctx_q = [torch.cat(s, dim=2) for s in sinks]  # [1, H, n, d] per layer
    else:
        cache, last, prefill_s = prefill(model, context_ids, reserve=reserve)
    keys = [layer.keys[0] for layer in cache.layers]  # the model's dtype, as the cache holds them
    values = [layer.values[0] for layer in cache.layers]
    if "repeat" not in cfg.sources:
        del cache  # else the repeat pass continues it
    info, found, samples, scored = {"sources": list(cfg.sources)}, [], None, None
    t0 = time.perf_counter()
    for src in cfg.sources:
        lse, spans, t_src = None, None, time.perf_counter()
        if src == "context":
            q, g = [pool_gqa(x.float(), Hkv) for x in ctx_q], _position_groups(n, G)
        elif src == "repeat":
            stage(progress, f"repeat pass (prompt + {n} tokens, after the context's prefill)")
            keys = values = (
                None  # the pass reallocates the cache: holding the prefill's tensors would double it
            )
            q, g, lse, spans, scored = _repeat_queries(model, context_ids, tokenizer, cfg.repeat_prompt, cache,
                                                       cfg.repeat_chunk, cfg.repeat_fit_rows, cfg.seed)  # fmt: skip
            info["repeat_chunks"] = len(torch.unique(spans[:, 0]))
            spans = spans if info["repeat_chunks"] > 1 else None  # None: one request reads the whole context
            ((keys, values),) = _copy_out(cache, [(0, n)])  # cropped back to n; its room goes
            del cache
        else:
            # the context's keys as the samples' shared block, read in place: they may be views of a cache with
            # room for the repeat request, which a flat copy (shared_cache) would copy whole
            q, g, samples = sample_self_queries(
                model, block_and_part(model, None, keys, values, n), n, last, cfg, progress
            )
        found.append((src, q, g, lse, spans, time.perf_counter() - t_src))
        del q, lse
    query_s = time.perf_counter() - t0
    qs, groups, local, spans = join_sources(found, n, cfg, info)
    prescored = None
    if scored is not None:  # which of the kept queries the running scores already count
        prescored = source_rows(info, groups.shape[0], "repeat")
    per_head = [x[0].float().reshape(Hkv, G, n, -1) for x in ctx_q] if keep_context else None
    return Capture(keys, values, qs, groups, dims.scale, last, prefill_s, query_s, samples, per_head,
                   context_ids.cpu(), info, local, spans, scored, prescored)  # fmt: skip


def _copy_out(cache, spans: list[tuple[int, int]]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per span ``(start, end)`` of each layer's tokens (its keys ``[1, Hkv, a, d]``): copies of the keys and
    values ``[Hkv, end − start, d]`` per layer, in the model's dtype. Made layer by layer, each layer of
    ``cache`` reset as soon as it is copied, so its buffer (with any room for a request) is freed then, not
    held beside the copies; the cache is spent."""
    out = [([], []) for _ in spans]
    for layer in cache.layers:
        for (keys, values), (start, end) in zip(out, spans, strict=True):
            keys.append(layer.keys[0, :, start:end].clone())
            values.append(layer.values[0, :, start:end].clone())
        layer.reset()
    return out


def prefix_lse(
    prefix,
    queries: list[torch.Tensor],
    scale: float,
    ahead: list[torch.Tensor] | None = None,
    rows: int = 256,
) -> list[torch.Tensor] | None:
    """Each pooled query's log-mass outside a part, per layer ``[Hkv, N]`` from ``queries`` ``[Hkv, N, d]``:
    on a compressed prefix's entries (its padding's ``-inf`` bias included) and on ``ahead [Hkv, t, d]``, the
    keys of the tokens read past the part (compress-while-reading's ``read_ahead``). What a part's query
    attended to outside the part, carried so that its weight on the part is exact. None when there is neither.
    ``rows`` queries at a time: O(N · (m + t) · d) time per layer, and two ``[Hkv, rows, m]`` fp32 logits at a
    time (at n = 8192 on SmolLM2, 768 self queries at once held 108 MB at the reader's peak)."""
    if prefix is None and (ahead is None or ahead[0].shape[1] == 0):
        return None
    out = []
    for li, x in enumerate(queries):
        parts = []  # (keys [Hkv, s, d] fp32, bias [Hkv, s] or None) outside the part
        if prefix is not None:
            bk, _, bias = prefix.layers[li].padded_block(torch.float32)
            parts.append((bk.float(), None if bias is None else bias.float()))
        if ahead is not None and ahead[li].shape[1]:
            parts.append((ahead[li].float(), None))
        lse = [torch.cat([torch.logsumexp(logits(x[:, i : i + rows], k, scale, bias), -1)
                          for i in range(0, x.shape[1], rows)], dim=1) for k, bias in parts]  # fmt: skip
        out.append(lse[0] if len(lse) == 1 else torch.logaddexp(lse[0], lse[1]))
    return out


@torch.inference_mode()
def capture_part(model, prefix, context_ids: torch.Tensor, a: int, b: int, cfg: CompressConfig, tokenizer=None,
                 progress: bool = False, read_to: int | None = None, read: tuple | None = None) -> Capture:  # fmt: skip
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
    whatever ``a`` is.

    ``read_to > b`` (compress-while-reading's ``read_ahead``): the tokens ``[b, read_to)`` are read too, after
    the part; the repeat request (of the part alone) runs after them, and the self samples are drawn after them,
    so the part's entries are scored and fitted on queries that have seen more of the context. A self query's
    log-mass on the tokens read ahead is carried outside the part too; a repeat query's is left out, as the
    one-shot pass leaves out the other chunks. The capture holds the part's own keys and values; those of the
    tokens read ahead, and the logits after them, are its ``ahead``. ``read``: the previous part's ``ahead``, the
    first tokens from ``a`` already read (over the exact previous part): they are taken over, not read again, so
    each token is read once; its lists of keys and values are emptied once the cache holds them."""
    check_supported(model)
    context_ids = check_ids(context_ids, model.device)
    dims = model_dims(model)
    Hkv, G, c = dims.kv_heads, dims.groups, b - a
    if "repeat" in cfg.sources and tokenizer is None:
        raise ValueError("query source 'repeat' needs the tokenizer (pass tokenizer=...)")
    want_ctx = "context" in cfg.sources or cfg.solver.needs_context_queries
    e = b if read_to is None else read_to  # the tokens read: the part and those read ahead
    if e < b or (e > b and want_ctx):
        raise ValueError(
            f"read_to must be >= b = {b} and cannot combine with the context's own queries; got {e}"
        )
    # room for every token appended (read, read ahead, then the request): the cache never reallocates, so the
    # views of the part's keys below are the cache's own memory, not a second copy held beside a new one
    request = (
        repeat_request(tokenizer, context_ids, a, b, cfg.repeat_prompt) if "repeat" in cfg.sources else None
    )
    reserve = e - a + (0 if request is None else request.shape[1])
    # a few long forwards over the prefix: its padded layout is made per forward, not held
    cache = roomy_cache(reserve) if prefix is None else prefix.fork(hold_layout=False, reserve=reserve)
    where = "" if prefix is None else f" after {prefix.kept_entries()} compressed entries"
    done = 0  # tokens from a already read by the previous part (read ahead), taken over as they are
    if read is not None:
        done = read[0][0].shape[1]
        if want_ctx or done > e - a:
            raise ValueError(f"read: {done} tokens from {a} cannot be taken over here (read_to {e})")
        for li, (k, v) in enumerate(zip(*read[:2], strict=True)):
            cache.update(k[None], v[None], li)
        read[0].clear(), read[1].clear()  # taken over: from here the cache's copy is the only one
    stage(progress, f"read tokens {a + done}-{e}{where}")
    t0 = time.perf_counter()
    last = None if read is None else read[2]
    if a + done < e:
        with capture_queries(model) if want_ctx else contextlib.nullcontext() as sinks:
            last = forward(model, context_ids[:, a + done : e], cache, a + done, last_only=True)[
                0, -1
            ].float()
    prefill_s = time.perf_counter() - t0
    ctx_q = [torch.cat(s, dim=2) for s in sinks] if want_ctx else None  # [1, H, c, d] per layer
    read_keys = [
        layer.keys[0, :, -(e - a) :] for layer in cache.layers
    ]  # [Hkv, e − a, d]: the part, then ahead
    read_values = [layer.values[0, :, -(e - a) :] for layer in cache.layers]

    info, found, samples, scored = {"sources": list(cfg.sources), "part": (a, b)}, [], None, None
    t0 = time.perf_counter()
    for src in cfg.sources:
        t_src = time.perf_counter()
        if src == "context":
            q, g = [pool_gqa(x.float(), Hkv) for x in ctx_q], _position_groups(c, G)
            lse = prefix_lse(prefix, q, dims.scale)
        elif src == "repeat":
            ids = request
            t = c + (ids.shape[1] - c if cfg.repeat_prompt == "kvzip" else 0)
            # read in several parts: every query scores the part's entries during the pass (span (0, c): the
            # part's keys are the first the attention is handed), and only repeat_fit_rows are held for the fit
            several = (a, b) != (0, context_ids.shape[1])
            rows = subsample_index(G * t, cfg.repeat_fit_rows, cfg.seed + a) if several else None
            q, lse, scored = request_queries(model, cache, ids, e, t, None if rows is None else (0, c), rows)
            g = _position_groups(t, G) if rows is None else _position_groups(t, G)[rows]
        else:
            joined = block_and_part(model, prefix, read_keys, read_values, e)
            q, g, samples = sample_self_queries(model, joined, e, last, cfg, progress)
            del joined  # block and part read together (no copy): its per-forward layout is gone with it
            lse = prefix_lse(prefix, q, dims.scale, ahead=[k[:, c:] for k in read_keys])
        found.append((src, q, g, lse, None, time.perf_counter() - t_src))
        del q, lse
    query_s = time.perf_counter() - t0
    qs, groups, local, _ = join_sources(found, c, cfg, info)
    prescored = None if scored is None else source_rows(info, groups.shape[0], "repeat")
    per_head = (
        [x[0].float().reshape(Hkv, G, c, -1) for x in ctx_q] if cfg.solver.needs_context_queries else None
    )
    info["read_to"] = e
    # copies: a view would keep the cache's whole buffer (the part, the tokens read ahead and the repeat request's
    # room: up to 3× the part) through the solve and the join, and the tokens read ahead through the next part
    del read_keys, read_values
    first = cache.layers[0].keys.shape[-2] - (e - a)  # the part's first token among the appended ones (0)
    (keys, values), (ahead_keys, ahead_values) = _copy_out(
        cache, [(first, first + c), (first + c, first + e - a)]
    )
    ahead = (ahead_keys, ahead_values, last) if e > b else None
    return Capture(keys, values, qs, groups, dims.scale, last, prefill_s, query_s, samples, per_head,
                   context_ids[:, a:b].cpu(), info, local, None, scored, prescored, ahead)  # fmt: skip


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
    start = cap.info["self_span"][0]
    keep = cap.info.get("subsample_index")
    idx = torch.arange(cap.groups.shape[0]) if keep is None else keep  # position in the unsubsampled order
    where = source_rows(cap.info, cap.groups.shape[0], "self").nonzero().squeeze(1)  # which are self queries
    out = []
    for q_old, sink in zip(cap.queries, sinks, strict=True):
        fresh = pool_gqa(torch.cat(sink, dim=2).float(), Hkv)  # [Hkv, S·G·L, d]
        q = q_old.clone()
        q[:, where.to(q.device)] = fresh[:, (idx[where] - start).to(q.device)]
        out.append(q)
    return out
