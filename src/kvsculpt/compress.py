"""``compress()``: capture a context, plan the budgets, solve every layer, return a :class:`CompressedCache`."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import time

import torch
from tqdm.auto import tqdm

from .cache import CompressedCache, block_and_part, join_blocks, quantize_cache, shared_cache
from .config import CompressConfig
from .core.attention import Reference, fidelity, logits, reference
from .core.budget import Global, allocate_running, head_floor, kept
from .core.fit import fit_values, refit_for_quantized_keys, split_heldout, stored_keys
from .core.methods import Identity, Learned, Select
from .core.scores import H2O, KVzip, top_indices, value_weighted
from .hf.attention import use_kvsculpt_attention
from .hf.capture import (
    Capture,
    capture,
    capture_part,
    prefix_lse,
    replay_self_queries,
    sample_self_queries,
    source_rows,
    stage,
)
from .hf.decode import check_ids, full_cache
from .hf.dims import model_dims

PILOT = Select(scorer=H2O(), fit=True)  # the pilot of the curves/adaptive rules: Select+Fit


class PeakMemory:
    """Peak memory above the start of a ``with`` block, in bytes (``.extra``): CUDA's max allocated on a CUDA
    device, else the process's peak resident set (Linux: ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``); None where neither can be read. Two corrections on the CPU, both of which
    would otherwise skew it by hundreds of MB:

    * the C allocator first hands its free pages back to the system (glibc's ``malloc_trim``): memory freed
      earlier but still resident would be reused without raising the resident set (the peak would read low);
    * file pages read in during the block are not counted (``RssFile``'s growth): the model's weights, mapped
      from their files, become resident as the first forward touches them (the peak would read high by the
      model's size in a fresh process)."""

    def __init__(self, device):
        self.device, self.extra, self._base, self._file = torch.device(device), None, None, 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident set to the current one
                self._base, self._file = self._status("VmRSS"), self._status("RssFile")
            except (OSError, StopIteration):
                self._base = None
        return self

    def __exit__(self, *exc):
        if self._base is None:
            return
        if self.device.type == "cuda":
            self.extra = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            paged_in = max(0, self._status("RssFile") - self._file)
            self.extra = max(0, self._status("VmHWM") - self._base - paged_in)


def _release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``; nothing where there is none)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compress(model, context_ids: torch.Tensor, config: CompressConfig | None = None, *, tokenizer=None,
             progress: bool = True, **changes) -> CompressedCache:  # fmt: skip
    """Compress the cache of ``context_ids [1, n]`` as ``config`` says (:class:`~kvsculpt.config.CompressConfig`,
    its defaults if None); keyword ``changes`` update it, e.g. ``compress(model, ids, ratio=0.3,
    tokenizer=tok)``. The ``repeat`` query source (the default) needs the tokenizer."""
    t_start = time.perf_counter()
    cfg = (config or CompressConfig()).replace(**changes)
    use_kvsculpt_attention(model)
    with PeakMemory(model.device) as peak:
        if isinstance(cfg.solver, Learned) and cfg.chunk_tokens:
            cache = learned_while_reading(model, context_ids, cfg, progress)
        elif isinstance(cfg.solver, Learned):
            cache = compress_learned(model, context_ids, cfg, progress)
        elif isinstance(cfg.solver, Identity) and cfg.refine == "none" and cfg.kv_bits == 16:
            cache = keep_everything(model, context_ids, cfg, t_start)  # no reference queries needed
        elif cfg.chunk_tokens:
            cache = compress_while_reading(model, context_ids, cfg, tokenizer, progress)
        else:
            cap = capture(model, context_ids, cfg, tokenizer=tokenizer, progress=progress)
            cache = compress_captured(model, cap, cfg, progress, tokenizer)
    dims = model_dims(model)
    cache.info.update(
        compress_seconds=time.perf_counter() - t_start,
        peak_extra_bytes=peak.extra,  # above what was resident before compress (the model, the caller's data)
        full_cache_bytes=2 * cache.n * dims.layers * dims.kv_heads * dims.head_dim * model.dtype.itemsize,
    )
    return cache


def compress_while_reading(model, context_ids: torch.Tensor, cfg: CompressConfig, tokenizer=None,
                           progress: bool = True) -> CompressedCache:  # fmt: skip
    """Compress ``context_ids [1, n]`` while reading it, ``cfg.chunk_tokens`` tokens at a time (how the seeds'
    KV-Distill reads documents longer than its window): each part is read over the compressed cache of the parts
    before it (:func:`~kvsculpt.hf.capture.capture_part`), its kept entries are solved on the part's own queries
    and appended to the block.

    Budgets: under the global rule (the default) the part's entries and those the block holds are ranked
    together by their scores (:func:`~kvsculpt.core.budget.allocate_running`), the block keeps the best
    ``ratio`` of the tokens read so far, and the entries that fall out are dropped from it (the values fitted
    beside them are not re-solved). So budget moves between parts as the one-shot rule moves it. The block's
    scores are renewed by each part's self samples (:func:`kept_records`, :func:`block_peaks`): drawn after more
    of the context, they stand in for the one-shot rule's, drawn after all of it. Under another rule each part
    keeps ``ratio`` of its own entries, split between heads and layers by that rule over the part's scores.

    Memory: the block (≈ ratio · n entries) plus one part, its keys, values and queries, whatever n; time:
    linear in n (each part's forward reads ≈ ratio · a entries). ``chunk_tokens ≥ n``: one part, the same cache
    as the one-shot path.

    ``cfg.ahead_tokens`` (``read_ahead``; by default one part): each part is read with that many tokens after
    it, and its queries, the repeat request's and the self samples drawn after all of them, score and fit the
    part's own entries (:func:`~kvsculpt.hf.capture.capture_part`'s ``read_to``). The next part takes those
    tokens' keys and values over (read over the exact part before them), so each token is still read once; the
    self samples and the repeat request each read one part more. Memory: one more part's keys and values while a
    part is read (at n = 8192 on SmolLM2 the peak is 454 MB against 394 MB for each part alone, measured: it is
    set by the last part's repeat pass: the part, the tokens read ahead and the request's room)."""
    ids = check_ids(context_ids, model.device)
    n, step = ids.shape[1], cfg.chunk_tokens
    part_cfg = cfg.replace(chunk_tokens=0, read_ahead=0, read_slack=1)
    dims = model_dims(model)
    running = isinstance(cfg.rule, Global) and cfg.rule.scope == "all"  # budgets move between parts
    running = running and not isinstance(cfg.solver, Identity)
    block, parts = None, []
    held = None  # per layer and head, in block order: what kept_records says of each entry the block holds
    ahead = None  # the keys, values and last logits of the tokens the previous part read past itself
    for i, a in enumerate(tqdm(range(0, n, step), desc=f"read in parts of {step}", unit="part",
                               disable=not progress)):  # fmt: skip
        b = min(n, a + step)
        cap = capture_part(model, block, ids, a, b, part_cfg, tokenizer, progress, min(n, b + cfg.ahead_tokens),
                           read=ahead)  # fmt: skip
        ahead, cap.ahead = cap.ahead, None  # the tokens read past this part: the next one takes them over
        if not running:
            part = compress_captured(model, cap, part_cfg, progress=False)
            del cap
            block = join_blocks(model, block, part, b, in_place=True)
        else:
            solver = _part_solver(cfg.solver, a)  # sinks are the context's first tokens, not each part's
            scores = captured_entry_scores(cap, part_cfg, solver=solver)  # [L, Hkv, b - a]
            # the block's entries rescored as this part's self samples see them
            if held is not None and "repeat" in held:
                peaks = block_peaks(block, cap, source_rows(cap.info, cap.groups.shape[0], "self"))
                held["score"] = [[torch.maximum(r, p * f) for r, p, f in zip(hr, hp, hf, strict=True)]
                                 for hr, hp, hf in zip(held["repeat"], peaks, held["factor"], strict=True)]  # fmt: skip
            total_kept = block_total(cfg, b, n, dims)
            floor = head_floor(b - a, kept(b - a, cfg.ratio), cfg.rule.floor)  # each head's least of the part
            keep, budgets = allocate_running(
                None if held is None else held["score"], scores.cpu(), total_kept, floor
            )
            part = compress_captured(model, cap, part_cfg, progress=False, budgets=budgets, scores=scores)
            new = kept_records(cap, solver, scores, budgets, i)
            del cap  # the part's keys, values and queries go before the join
            block = join_blocks(model, block, part, b, keep, in_place=True)
            held = {key: _carry(None if held is None else held[key], keep, x) for key, x in new.items()}
        parts.append(part.info)
        del part
    total = lambda key: sum(p[key] for p in parts)  # noqa: E731
    by_source = {}
    for p in parts:
        for src, sec in p["query_seconds_by_source"].items():
            by_source[src] = by_source.get(src, 0.0) + sec
    block.method, block.context_ids = repr(cfg.solver), ids.cpu()
    block.info = {**parts[0], "config": repr(cfg), "budgets": block.budgets, "n": n, "read_in_parts": len(parts),
                  "part_budgets": [p["budgets"] for p in parts],  # what each part kept when it was read
                  "part_entries": [p["budgets"] for p in parts] if held is None else  # what it holds at the end
                  [[[int((x == i).sum()) for x in row] for row in held["part"]] for i in range(len(parts))],
                  "fit_queries": total("fit_queries"), "heldout_queries": total("heldout_queries"),
                  "prefill_seconds": total("prefill_seconds"), "query_seconds": total("query_seconds"),
                  "solve_seconds": total("solve_seconds"), "query_seconds_by_source": by_source,
                  "stats": {key: [row for p in parts for row in p["stats"][key]] for key in parts[0]["stats"]}}  # fmt: skip
    block.info.pop("pilot", None)
    return block


def block_total(cfg: CompressConfig, b: int, n: int, dims) -> int:
    """The entries (all layers and heads) the block of compress-while-reading keeps once ``b`` of the ``n``
    tokens are read, under the global rule: ``ratio`` of them, × ``read_slack`` (at most all) before the last
    part."""
    share = cfg.ratio if b >= n else min(1.0, cfg.ratio * cfg.read_slack)
    return kept(b, share) * dims.layers * dims.kv_heads


def block_peaks(block: CompressedCache, cap: Capture, rows: torch.Tensor, chunk: int = 1024) -> list:
    """The largest attention weight any of ``cap``'s queries ``rows [N]`` (bool) gives each entry of ``block``,
    the compressed prefix they read: per layer and head ``[m_h]`` (CPU). A weight is normalised over what the
    query attended to: the block (its log-mass carried in ``cap.local_lse``) and the part's keys.
    O(N' · (m + c) · d) per layer, ``chunk`` queries at a time."""
    out = []
    for li, layer in enumerate(block.layers):
        bk, _, bias = layer.padded_block(torch.float32)
        bk, bias = bk.float(), None if bias is None else bias.float()
        Q_all, K = cap.queries[li][:, rows.to(cap.queries[li].device)], cap.keys[li].float()
        loc_all = cap.local_lse[li][:, rows.to(cap.local_lse[li].device)]
        peak = torch.full(bk.shape[:2], float("-inf"), device=bk.device)
        for i in range(0, Q_all.shape[1], chunk):
            Q = Q_all[:, i : i + chunk].float()
            total = torch.logaddexp(
                loc_all[:, i : i + chunk].float(), torch.logsumexp(logits(Q, K, cap.scale), -1)
            )
            peak = torch.maximum(peak, (logits(Q, bk, cap.scale, bias) - total[..., None]).amax(1))
        out.append([peak[h, :m].exp().cpu() for h, m in enumerate(layer.lengths)])
    return out


def kept_records(cap: Capture, solver, scores: torch.Tensor, budgets: torch.Tensor, part: int) -> dict:
    """What compress-while-reading keeps of the entries a part keeps (``budgets [L, Hkv]``, each head's best by
    ``scores [L, Hkv, c]``, as the solver selects them), per layer and head, in the order the block holds
    them: ``score`` (the global rule's) and ``part``, and for KVzip-type scores (the default, with repeat and
    self queries) what rescores them later: ``repeat``, their repeat queries' score, and ``factor``, their
    relative value norm to the scorer's power. A KVzip score is the peak weight any query gives the entry
    (× factor), so it is exactly max(repeat, self samples' peak × factor) (a test); a later part replaces the
    self samples' share by its own, drawn after more of the context, as one-shot draws them after all of it."""
    L, H = budgets.shape
    idx = [
        [top_indices(scores[li, h : h + 1], int(budgets[li, h]))[0].cpu() for h in range(H)]
        for li in range(L)
    ]
    pick = lambda x: [[x[li][h].cpu()[j] for h, j in enumerate(row)] for li, row in enumerate(idx)]  # noqa: E731
    out = {"score": pick(scores), "part": [[torch.full_like(j, part) for j in row] for row in idx]}
    scorer = getattr(solver, "scorer", None)
    if isinstance(scorer, KVzip) and {"self", "repeat"} <= set(cap.info["sources"]):
        rows = source_rows(cap.info, cap.groups.shape[0], "repeat")
        out["repeat"] = pick(entry_scores(cap, solver, [q[:, rows.to(q.device)] for q in cap.queries],
                                          [x[:, rows.to(x.device)] for x in cap.local_lse],
                                          prescored=torch.ones(int(rows.sum()), dtype=torch.bool)))  # fmt: skip
        out["factor"] = pick([value_weighted(torch.ones(k.shape[:2]), v.float().cpu(), scorer.value_power)
                              for k, v in zip(cap.keys, cap.values, strict=True)])  # fmt: skip
    return out


def _carry(held: list[list[torch.Tensor]] | None, keep: list[list[torch.Tensor]] | None,
           new: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:  # fmt: skip
    """Per layer and head: what ``held`` keeps (``keep``, bool masks), then ``new`` (``held`` None: ``new``)."""
    if held is None:
        return new
    return [[torch.cat([x[k], y]) for x, k, y in zip(hx, hk, hy, strict=True)]
            for hx, hk, hy in zip(held, keep, new, strict=True)]  # fmt: skip


@dataclasses.dataclass
class LearnedScores:
    """What :func:`learned_scores` gives :func:`compress_learned`: the prefill's cache, the scorer's log scores
    ``[L, Hkv, n]``, per layer the fit queries ``[Hkv, N, d]`` (self samples or the prefill's tail), seconds."""

    full: object
    scores: torch.Tensor
    queries: list[torch.Tensor]
    n: int
    prefill_seconds: float
    query_seconds: float


def learned_scores(
    model, context_ids: torch.Tensor, cfg: CompressConfig, progress: bool = True
) -> LearnedScores:
    """The ratio-independent part of ``method="learned"``: one prefill that scores every entry as it is produced
    (:func:`kvsculpt.learned.prefill_scores`, the weights ``train-scorer`` fitted for this model) and, with
    ``fit_queries="self"``, the default's self samples decoded from the full cache. Reused by
    :func:`compress_learned` for any number of ratios (the tasks benchmark does)."""
    from .learned import load_weights, prefill_scores

    weights, _ = load_weights(model, cfg.solver.weights, cfg.solver.snapshot)
    ids = check_ids(context_ids, model.device)
    n, solver = ids.shape[1], cfg.solver
    stage(progress, f"learned scores in one prefill of {n} tokens")
    last = solver.fit_window if solver.fit and solver.fit_queries == "tail" else None
    full, scores, tail, last_logits, prefill_s = prefill_scores(model, ids, weights, solver.sinks, last)
    t0 = time.perf_counter()
    if solver.fit and solver.fit_queries == "self":  # the default's self samples, from the full cache
        keys_values = [[layer.keys[0] for layer in full.layers], [layer.values[0] for layer in full.layers]]
        tail, _, _ = sample_self_queries(
            model, shared_cache(model, *keys_values), n, last_logits, cfg, progress
        )
    return LearnedScores(full, scores, tail, n, prefill_s, time.perf_counter() - t0)


def compress_learned(model, context_ids: torch.Tensor, cfg: CompressConfig, progress: bool = True,
                     scored: LearnedScores | None = None) -> CompressedCache:  # fmt: skip
    """``method="learned"``: the scores of one prefill (:func:`learned_scores`, or ``scored`` made by it for the
    same context and method), the budget rule splits ``cfg.ratio`` between heads and layers over them, and each
    head keeps its best entries. Values: copied (``fit=False``: nothing runs but the prefill), or fitted by
    ridge on the default's self samples (``fit_queries="self"``, ``S·L`` decoded tokens) or on the prefill's last
    ``fit_window`` queries (``"tail"``). Time: the prefill, O(n · D · Hkv) per layer and a top-k, and with the fit
    O(N · (n·d + m²) + m³) per head for N fit queries; memory: the prefill's cache, ``[L, Hkv, n]`` scores and
    the fit queries."""
    scored = scored or learned_scores(model, context_ids, cfg, progress)
    ids = check_ids(context_ids, model.device)
    dims, n, solver = model_dims(model), scored.n, cfg.solver
    L, Hkv = dims.layers, dims.kv_heads
    t0 = time.perf_counter()
    budgets, _ = cfg.rule.plan(n, cfg.ratio, L, Hkv, entry_scores=lambda: scored.scores)
    keys, values = [], []
    for li in range(L):
        K, V = scored.full.layers[li].keys[0], scored.full.layers[li].values[0]
        Q = K.new_zeros(Hkv, 0, K.shape[-1]) if not solver.fit else scored.queries[li]
        heads = cfg.solver(K, V, Q, budgets[li], dims.scale, scores=scored.scores[li].to(K.device))
        keys.append([k.to(model.dtype) for k, _, _ in heads])
        values.append([v.to(model.dtype) for _, v, _ in heads])
    info = _info(
        cfg,
        solver.fit_queries if solver.fit else "none",
        budgets,
        n,
        scored.prefill_seconds,
        scored.query_seconds,
        time.perf_counter() - t0,
        int(scored.queries[0].shape[1]) if solver.fit else 0,
    )
    cache = CompressedCache.from_heads(model, keys, values, n, None, repr(cfg.solver), info, ids.cpu())
    return quantize_cache(cache, cfg.kv_bits, cfg.kv_group, cfg.key_bits)


def learned_while_reading(model, context_ids: torch.Tensor, cfg: CompressConfig,
                          progress: bool = True) -> CompressedCache:  # fmt: skip
    """``method="learned"`` with ``chunk_tokens``: one prefill in parts, each part read over the compressed
    block of the parts before it. The scorer scores a part's entries as they are produced
    (:func:`~kvsculpt.learned.prefill_scores`: positions are the context's, the window feature the part's own
    last queries); under the global rule they are ranked with the block's entries (their scores from when they
    were read) by :func:`~kvsculpt.core.budget.allocate_running`, so the block keeps ``ratio`` of the tokens read
    so far; under another rule each part keeps ``ratio`` of its own. Values are copied, or fitted on the
    part's fit queries (self samples drawn after the part from the block and the part, or the part's last
    queries), their log-mass on the block carried outside it. Time: one prefill and, with the self fit, ``S·L``
    sampled tokens per part; memory: the block (≈ ratio · n entries) and one part, whatever n. ``chunk_tokens
    ≥ n``: the same cache as :func:`compress_learned`."""
    from transformers import DynamicCache

    from .learned import load_weights, prefill_scores

    solver, dims = cfg.solver, model_dims(model)
    weights, _ = load_weights(model, solver.weights, solver.snapshot)
    ids = check_ids(context_ids, model.device)
    n, step, L, Hkv = ids.shape[1], cfg.chunk_tokens, dims.layers, dims.kv_heads
    running = isinstance(cfg.rule, Global) and cfg.rule.scope == "all"
    tail_fit = solver.fit and solver.fit_queries == "tail"
    block, held, part_budgets, fit_rows = None, None, [], 0
    seconds = {"prefill": 0.0, "query": 0.0, "solve": 0.0}
    for a in tqdm(range(0, n, step), desc=f"read in parts of {step}", unit="part", disable=not progress):
        b = min(n, a + step)
        where = "" if block is None else f" after {block.kept_entries()} compressed entries"
        stage(progress, f"learned scores of tokens {a}-{b}{where}")
        cache = DynamicCache() if block is None else block.fork(hold_layout=False)
        sinks, last = solver.sinks if a == 0 else 0, solver.fit_window if tail_fit else None
        cache, scores, tail, last_logits, sec = prefill_scores(
            model, ids[:, a:b], weights, sinks, last, cache, a
        )
        seconds["prefill"] += sec
        t0 = time.perf_counter()
        keys = [layer.keys[0, :, a - b :] for layer in cache.layers]
        values = [layer.values[0, :, a - b :] for layer in cache.layers]
        del cache
        queries, lse = None, None
        if solver.fit:
            if solver.fit_queries == "self":
                joined = block_and_part(model, block, keys, values, b)
                queries, _, _ = sample_self_queries(model, joined, b, last_logits, cfg, progress)
                del joined
            else:
                queries = tail
            lse = prefix_lse(block, queries, dims.scale)
            fit_rows += int(queries[0].shape[1])
        seconds["query"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if running:
            floor = head_floor(b - a, kept(b - a, cfg.ratio), cfg.rule.floor)
            keep, budgets = allocate_running(held, scores, block_total(cfg, b, n, dims), floor)
        else:
            planned, _ = cfg.rule.plan(b - a, cfg.ratio, L, Hkv, entry_scores=lambda s=scores: s)
            keep, budgets = None, torch.tensor(planned)
        part_keys, part_values, new = [], [], []
        for li in range(L):
            K, V = keys[li], values[li]
            Q = K.new_zeros(Hkv, 0, K.shape[-1]) if queries is None else queries[li]
            heads = solver(K, V, Q, [int(m) for m in budgets[li]], dims.scale,
                           local_lse=None if lse is None else lse[li], scores=scores[li].to(K.device))  # fmt: skip
            part_keys.append([k.to(model.dtype) for k, _, _ in heads])
            part_values.append([v.to(model.dtype) for _, v, _ in heads])
            kept_idx = [top_indices(scores[li, h : h + 1], int(m))[0] for h, m in enumerate(budgets[li])]
            new.append([scores[li, h][j] for h, j in enumerate(kept_idx)])  # what the block holds, in order
        part = CompressedCache.from_heads(model, part_keys, part_values, b)
        block = join_blocks(model, block, part, b, keep, in_place=True)
        held = _carry(held, keep, new) if running else None
        part_budgets.append(budgets.tolist())
        seconds["solve"] += time.perf_counter() - t0
        del keys, values, queries, lse, part
    info = _info(
        cfg,
        solver.fit_queries if solver.fit else "none",
        block.budgets,
        n,
        seconds["prefill"],
        seconds["query"],
        seconds["solve"],
        fit_rows,
        read_in_parts=len(part_budgets),
        part_budgets=part_budgets,
    )
    block.method, block.info, block.context_ids = repr(solver), info, ids.cpu()
    return block


def _info(cfg: CompressConfig, queries: str, budgets, n: int, prefill_s: float, query_s: float, solve_s: float,
          fit_queries: int, **extra) -> dict:  # fmt: skip
    """The info a cache made without a capture records (learned, keep-everything), in the capture path's keys."""
    return {"config": repr(cfg), "method": repr(cfg.solver), "ratio": cfg.ratio, "allocation": cfg.allocation,
            "queries": queries, "budgets": budgets, "n": n, "fit_queries": fit_queries, "heldout_queries": 0,
            "prefill_seconds": prefill_s, "query_seconds": query_s, "query_seconds_by_source": {},
            "solve_seconds": solve_s, "on_policy": 0, "replay_seconds": 0.0,
            "stats": {"heldout_rel_mse": [], "heldout_mass_err": []}, **extra}  # fmt: skip


def keep_everything(model, context_ids: torch.Tensor, cfg: CompressConfig, t_start: float) -> CompressedCache:
    """The ``identity`` method without a capture: the full cache after one prefill (what the full context
    would say), with the info every compressed cache records."""
    cache = full_cache(model, context_ids)
    dims, seconds = model_dims(model), time.perf_counter() - t_start
    cache.method = repr(cfg.solver)
    budgets = [[cache.n] * dims.kv_heads for _ in range(dims.layers)]
    cache.info = _info(cfg, cfg.queries, budgets, cache.n, seconds, 0.0, 0.0, 0, compress_seconds=seconds)
    return cache


def compress_captured(model, cap: Capture, cfg: CompressConfig, progress: bool = True, tokenizer=None,
                      on_eval=None, budgets=None, scores=None) -> CompressedCache:  # fmt: skip
    """Solve every layer of an existing :class:`~kvsculpt.hf.capture.Capture` under ``cfg`` (experiments
    reuse one capture for several configs with the same :meth:`~kvsculpt.config.CompressConfig.capture_key`),
    then refine it end to end if ``cfg.refine`` says so (the refine data are kept on the capture and reused by
    configs with the same :meth:`~kvsculpt.config.CompressConfig.refine_data_key`; ``on_eval``: see
    :func:`kvsculpt.refine.refine_from`).

    ``cfg.on_policy > 0``: the layers are solved in that many stages; before each stage after the first,
    the self samples are replayed through the model with the layers solved so far compressed, and their
    queries replace the captured ones for the layers still to solve (``on_policy ≥ L``: layer by layer).

    ``budgets [L, Hkv]`` and ``scores [L, Hkv, n]`` (:func:`captured_entry_scores` under ``cfg``), when given,
    replace ``cfg``'s rule and the entry scores it would compute (compress while reading plans them over the
    block and the part together).
    """
    t_start = time.perf_counter()
    dims = model_dims(model)
    L, Hkv, n, solver = dims.layers, dims.kv_heads, cap.n, cfg.solver
    held = split_heldout(cap.groups, cfg.heldout, cfg.seed).to(cap.queries[0].device)
    if held.any():
        fit_q = [q[:, ~held] for q in cap.queries]
        check_q = [q[:, held] for q in cap.queries]
        local = None if cap.local_lse is None else [x[:, ~held] for x in cap.local_lse]
    else:  # nothing held out (the default): the captured queries themselves, not a copy of every layer's
        fit_q, check_q, local = list(cap.queries), None, cap.local_lse
    pilot_q = check_q if check_q is not None else fit_q
    cq = cap.context_queries or [None] * L

    refs: dict = {}  # per layer: the fit queries' attention over the whole block, computed once (see ref_of)

    def ref_of(li: int):
        """The :func:`~kvsculpt.core.attention.reference` of layer ``li``'s fit queries (None if the method
        does not read it): computed once, shared by the global ranking, the selection and the value fit."""
        if not solver.uses_reference:
            return None
        if li not in refs:
            values = cap.values[li].float() if getattr(solver, "fit", False) else None  # outputs: fits only
            refs[li] = reference(fit_q[li].float(), cap.keys[li].float(), values, cap.scale,
                                 None if local is None else local[li].float())  # fmt: skip
        return refs[li]

    scored = {} if scores is None else {"all": scores}  # the entry scores of global budgets, reused by the
    # selection (same queries) unless on-policy

    stages = min(cfg.on_policy, L)
    chunks = solved_in_chunks(cap, cfg, stages)
    fit_spans = None if cap.spans is None else cap.spans[~held.cpu()]  # the part each fit query reads
    prescored = None if cap.prescored is None else cap.prescored[~held.cpu()]  # counted in cap.repeat_scores

    def scores_once():
        refs_all = None if chunks or cap.repeat_scores is not None else [ref_of(li) for li in range(L)]
        scored["all"] = captured_entry_scores(cap, cfg, fit_q, local, chunks, fit_spans, refs_all, prescored)
        return scored["all"]

    if budgets is not None:
        budgets, pilot_record = torch.as_tensor(budgets).tolist(), {}
    elif isinstance(solver, Identity):
        budgets, pilot_record = [[n] * Hkv for _ in range(L)], {}
    else:
        stage(progress, f"{cfg.allocation} budgets for {L} layers × {Hkv} KV heads")
        budgets, pilot_record = cfg.rule.plan(
            n, cfg.ratio, L, Hkv,
            pilot=lambda m: pilot_errors(cap, fit_q, pilot_q, m),
            entry_scores=scores_once,
        )  # fmt: skip
    pilot_seconds = time.perf_counter() - t_start
    if cfg.on_policy and cap.samples is None:
        raise ValueError("on_policy needs self queries (queries='self' or a mix with it)")
    stage_starts = {round(i * L / stages) for i in range(1, stages)} if stages else set()
    keys, values, biases, rel_mse, mass_err, replay_s = [], [], [], [], [], 0.0
    has_bias = False
    solver_stats = getattr(solver, "stats", None)  # Sculpt: one record per head solved
    if solver_stats is not None:
        solver_stats.clear()
    for li in tqdm(range(L), desc=f"solve ({type(solver).__name__})", unit="layer", disable=not progress):
        if li in stage_starts:
            t_replay = time.perf_counter()
            rest_k = [[k.to(model.dtype) for k in K] for K in cap.keys[li:]]
            rest_v = [[v.to(model.dtype) for v in V] for V in cap.values[li:]]
            partial = CompressedCache.from_heads(
                model, keys + rest_k, values + rest_v, n, (biases + [None] * (L - li)) if has_bias else None
            )
            fresh = replay_self_queries(model, cap, partial)
            fit_q[li:] = [q[:, ~held] for q in fresh[li:]]
            refs.clear()
            if check_q is not None:
                check_q[li:] = [q[:, held] for q in fresh[li:]]
            replay_s += time.perf_counter() - t_replay
        K, V = cap.keys[li].float(), cap.values[li].float()  # one layer upcast at a time
        if chunks:
            # budgets that did not rank entries (uniform, adaptive): the selection's scores, chunk by chunk
            if "all" not in scored:
                scores_once()
            heads = solve_chunks(cap, cfg, li, fit_q[li], None if local is None else local[li], budgets[li],
                                 scored["all"][li], chunks, model.dtype, fit_spans)  # fmt: skip
        else:
            if cap.repeat_scores is not None and not stages and "all" not in scored:
                scores_once()  # the fit queries alone would score from the held repeat queries only
            sc = scored["all"][li] if "all" in scored and not stages else None
            heads = solver(K, V, fit_q[li], budgets[li], cap.scale, cq[li], None if local is None else local[li],
                           sc, ref_of(li))  # fmt: skip
        if cfg.kv_bits != 16 and cfg.kv_refit and getattr(solver, "fit", False) and not chunks:
            r, loc = ref_of(li), None if local is None else local[li].float()
            heads = refit_for_quantized_keys(heads, fit_q[li].float(), r.O, r.z, cap.scale, solver.lam,
                                             cfg.key_bits or cfg.kv_bits, cfg.kv_group, model.dtype, loc,
                                             solver.fit_rows)  # fmt: skip
        refs.pop(li, None)
        keys.append([k.to(model.dtype) for k, _, _ in heads])
        values.append([v.to(model.dtype) for _, v, _ in heads])
        biases.append(
            [torch.zeros(k.shape[0], device=k.device) if b is None else b.float() for k, _, b in heads]
        )
        has_bias = has_bias or any(b is not None for _, _, b in heads)
        if check_q is not None:
            errs = [fidelity(check_q[li][h], K[h], V[h], *heads[h], cap.scale) for h in range(Hkv)]
            rel_mse.append([float(e) for e, _ in errs])
            mass_err.append([float(z) for _, z in errs])
    info = {
        "config": repr(cfg),
        "method": repr(solver),
        "ratio": cfg.ratio,
        "allocation": cfg.allocation,
        "queries": cfg.queries,
        "budgets": budgets,
        "n": n,
        "fit_queries": int(fit_q[0].shape[1]),
        "heldout_queries": int(0 if check_q is None else check_q[0].shape[1]),
        "prefill_seconds": cap.prefill_seconds,
        "query_seconds": cap.query_seconds,
        "query_seconds_by_source": {
            src: cap.info[f"{src}_seconds"]
            for src in cap.info.get("sources", [])
            if f"{src}_seconds" in cap.info
        },  # fmt: skip
        "solve_seconds": time.perf_counter() - t_start,
        "solved_in_chunks": len(chunks or [None]),
        "on_policy": cfg.on_policy,
        "replay_seconds": replay_s,
        "compress_seconds": cap.prefill_seconds + cap.query_seconds + time.perf_counter() - t_start,
        "stats": {"heldout_rel_mse": rel_mse, "heldout_mass_err": mass_err},
    }
    if solver_stats:
        info["optimiser"] = {
            "heads": len(solver_stats),
            "evaluations": sum(st["evaluations"] for st in solver_stats),
            "objective_start": sum(st["start"] for st in solver_stats) / len(solver_stats),
            "objective_end": sum(st["end"] for st in solver_stats) / len(solver_stats),
        }
        if solver_stats[0]["val_start"] is not None:  # the criterion, on queries kept out of the key fit
            info["optimiser"]["val_start"] = sum(st["val_start"] for st in solver_stats) / len(solver_stats)
            info["optimiser"]["val_end"] = sum(st["val_end"] for st in solver_stats) / len(solver_stats)
    if pilot_record:
        info["pilot"] = {**pilot_record, "seconds": pilot_seconds}
    cache = CompressedCache.from_heads(
        model, keys, values, n, biases if has_bias else None, repr(solver), info, cap.context_ids
    )
    if cfg.refine != "none":  # refined through the codes, and returned quantised (kvsculpt.refine)
        return refine_captured(model, cache, cap, cfg, tokenizer, progress, on_eval)
    return quantize_cache(cache, cfg.kv_bits, cfg.kv_group, cfg.key_bits)


def refine_captured(model, cache: CompressedCache, cap: Capture, cfg: CompressConfig, tokenizer=None,
                    progress: bool = True, on_eval=None) -> CompressedCache:  # fmt: skip
    """Refine ``cache`` (made from ``cap``) end to end against the captured full cache; the refine data are
    made once per capture and :meth:`~kvsculpt.config.CompressConfig.refine_data_key` and kept on it."""
    from .refine import make_data, refine_from

    memo = cap.info.setdefault("refine_data", {})
    key = cfg.refine_data_key()
    if key not in memo:
        memo[key] = make_data(model, tokenizer, cap.keys, cap.values, cap.last_logits, cap.context_ids, cfg,
                              progress)  # fmt: skip
    return refine_from(model, cache, cap.keys, cap.values, cap.last_logits, cap.context_ids, cfg, tokenizer,
                       progress, data=memo[key], on_eval=on_eval)  # fmt: skip


def solved_in_chunks(cap: Capture, cfg: CompressConfig, stages: int = 0) -> list[tuple[int, int]] | None:
    """The parts ``[a, b)`` of the context that are scored and solved one at a time, in order, or None for one
    solve over the whole context.

    Where the repeat pass ran in several requests (``cfg.repeat_chunk`` below n), each part is the chunk one
    request reconstructed, and a method that reads the reference queries' attention (KVzip's scores, fitted
    values, Sculpt) is solved part by part (:func:`solve_chunks`): linear cost in n. Not for methods that
    score from the context's own queries (SnapKV, TOVA), keep recent positions, or solve on-policy."""
    if cap.spans is None or stages or not cfg.solver.uses_reference or cfg.solver.needs_context_queries:
        return None
    if getattr(cfg.solver, "recent", 0):
        return None
    whole = (cap.spans[:, 0] == 0) & (cap.spans[:, 1] == cap.n)
    return sorted({(int(a), int(b)) for a, b in cap.spans[~whole].tolist()})


def chunk_rows(K, Q, spans, local_lse, chunks, scale):
    """Per part ``(a, b)`` of ``chunks``: ``(a, b, rows [N] bool, local_lse [H, rows])``, the queries that read
    that part (its repeat request's and every query that reads the whole context: the self samples) and each
    one's log-mass outside the part: a whole-context query's on the other parts (and its own keys), a repeat
    query's on its request and copy only (its attention on the other parts is left out, as KVzip scores it).
    K ``[H, n, d]``, Q ``[H, N, d]``, spans ``[N, 2]``, local_lse ``[H, N]`` or None. O(N_whole · n · d)."""
    n = K.shape[1]
    spans = spans.to(Q.device)
    whole = (spans[:, 0] == 0) & (spans[:, 1] == n)
    own = Q.new_full(Q.shape[:2], float("-inf")) if local_lse is None else local_lse.float()
    Qw = Q[:, whole].float()
    per_part = torch.stack(
        [torch.logsumexp(logits(Qw, K[:, a:b].float(), scale), -1) for a, b in chunks], -1
    )  # [H, N_whole, parts]
    for c, (a, b) in enumerate(chunks):
        rows = whole | ((spans[:, 0] == a) & (spans[:, 1] == b))
        loc = own[:, rows].clone()
        others = per_part.clone()
        others[..., c] = float("-inf")
        w = whole[rows]
        loc[:, w] = torch.logaddexp(loc[:, w], torch.logsumexp(others, -1))
        yield a, b, rows, loc


def _part_solver(solver, a: int):
    """The solver for the part starting at ``a``: sinks are the context's first tokens, so only the first part
    keeps them (its scorer's ``sinks`` set to 0 for the others)."""
    scorer = getattr(solver, "scorer", None)
    if a > 0 and getattr(scorer, "sinks", 0):
        return dataclasses.replace(solver, scorer=dataclasses.replace(scorer, sinks=0))
    return solver


def chunked_entry_scores(
    cap: Capture, solver, queries, local_lse, chunks, spans, prescored=None
) -> torch.Tensor:
    """Every entry's score ``[L, Hkv, n]``, part by part (:func:`chunk_rows`; ``spans [N, 2]``: the part each of
    ``queries`` reads): each entry is scored by the
    queries that read its part, their attention normalised over the part and their keys outside the context.
    O(N · chunk · d) per layer and head instead of O(N · n · d). ``prescored [N]``: the queries whose attention
    ``cap.repeat_scores`` already counts (:func:`with_repeat_scores`), when it is not None (default:
    ``cap.prescored``, for ``queries`` the captured ones)."""
    L, (Hkv, n, _) = len(cap.keys), cap.keys[0].shape
    prescored = cap.prescored if prescored is None else prescored
    out = torch.empty(L, Hkv, n)
    for li in range(L):
        K, V = cap.keys[li].float(), cap.values[li].float()
        loc_all = None if local_lse is None else local_lse[li]
        for a, b, rows, loc in chunk_rows(K, queries[li], spans, loc_all, chunks, cap.scale):
            Q, ref = queries[li][:, rows].float(), None
            if cap.repeat_scores is not None:
                rest = ~prescored.to(rows.device)[rows]
                ref = with_repeat_scores(cap, li, Q[:, rest], K[:, a:b], loc[:, rest], a, b)
            out[li, :, a:b] = (
                _part_solver(solver, a).scorer(K[:, a:b], V[:, a:b], Q, cap.scale, None, loc, ref).cpu()
            )
    return out


def with_repeat_scores(cap: Capture, li: int, Q, K, local_lse, a: int, b: int) -> Reference:
    """What the entries ``[a, b)`` of layer ``li`` receive from every reference query: the running scores of
    the repeat pass (``cap.repeat_scores``, counted over every repeat query, held or not) joined with those of
    the queries ``Q [Hkv, N', d]`` they do not count (the self samples; ``local_lse [Hkv, N']``) on ``K
    [Hkv, b − a, d]``: the largest weight and the sum (a :class:`~kvsculpt.core.attention.Reference` with
    ``peak`` and ``total``; a scorer reads it as if it had seen every query). O(N' · (b − a) · d)."""
    seen = cap.repeat_scores[li]
    peak, total = seen.peak[:, a:b].to(K.device), seen.total[:, a:b].to(K.device)
    if Q.shape[1]:
        rest = reference(Q, K, None, cap.scale, local_lse)
        peak, total = torch.maximum(peak, rest.peak), total + rest.total
    return Reference(None, None, peak, total)


def solve_chunks(cap: Capture, cfg: CompressConfig, li: int, Q, local_lse, budgets, scores, chunks,
                 dtype, spans) -> list:  # fmt: skip
    """Layer ``li`` solved part by part: each head keeps its ``budgets[h]`` best entries by ``scores [Hkv, n]``
    (so the parts share a head's budget as the scores say); each part's kept entries are solved by the
    method on the queries that read it (:func:`chunk_rows`), and a head's parts are joined in order. With
    quantised storage the fitted values are then re-solved against the stored keys, part by part.

    Cost: O(N_c · chunk · d) for each part's reference and O(N_c · m_c²) for its value fit (N_c queries and m_c
    kept entries of the part), so linear in n for a fixed chunk, where one solve costs O(N · n · d + N · m²).
    What it leaves out: a repeat query's attention on parts other than its own, and the mixing weights between
    parts (each part's values are fitted to its own normalised output)."""
    solver, K, V = cfg.solver, cap.keys[li].float(), cap.values[li].float()
    H = K.shape[0]
    starts = torch.tensor([a for a, _ in chunks])
    counts = torch.zeros(len(chunks), H, dtype=torch.long)  # kept entries per part and head
    for h in range(H):
        kept = top_indices(scores[h : h + 1].to(K.device), int(budgets[h]))[0].cpu()
        counts[:, h] = torch.bincount(torch.bucketize(kept, starts, right=True) - 1, minlength=len(chunks))
    parts: list[list] = [[] for _ in range(H)]
    problems = list(chunk_rows(K, Q, spans, local_lse, chunks, cap.scale))
    for c, (a, b, rows, loc) in enumerate(problems):
        heads = [h for h in range(H) if counts[c, h] > 0]
        if not heads:
            continue
        idx = torch.tensor(heads, device=K.device)
        solved = solver(K[idx, a:b], V[idx, a:b], Q[idx][:, rows].float(), counts[c, heads].tolist(), cap.scale,
                        None, loc[idx], scores[heads, a:b].to(K.device), None)  # fmt: skip
        for h, (k, v, bias) in zip(heads, solved, strict=True):
            parts[h].append((c, k, v, bias))
    out = []
    for h in range(H):
        ks, vs, bs = zip(*[(k, v, bias) for _, k, v, bias in parts[h]], strict=True)
        out.append((torch.cat(ks), torch.cat(vs), None if bs[0] is None else torch.cat(bs)))
    if cfg.kv_bits != 16 and cfg.kv_refit and getattr(solver, "fit", False):
        out = _refit_chunks(out, parts, problems, K, V, Q, cfg, cap.scale, dtype)
    return out


def _refit_chunks(heads, parts, problems, K, V, Q, cfg: CompressConfig, scale, dtype) -> list:
    """:func:`~kvsculpt.core.fit.refit_for_quantized_keys` part by part: the layer's keys quantised as storage
    will hold them, then each part's values re-solved against its stored keys on that part's queries."""
    stored = stored_keys(heads, cfg.key_bits or cfg.kv_bits, cfg.kv_group, dtype)
    out = []
    start = 0
    for h, (k, _, bias) in enumerate(heads):
        kq, vs, at = stored[start : start + k.shape[0]], [], 0
        start += k.shape[0]
        for c, kc, vc, bc in parts[h]:
            a, b, rows, loc = problems[c]
            one = slice(h, h + 1)
            ref = reference(Q[one][:, rows].float(), K[one, a:b], V[one, a:b], scale, loc[one])
            kqc = kq[at : at + kc.shape[0]]
            at += kc.shape[0]
            vs.append(fit_values(Q[one][:, rows].float(), kqc[None], ref.O, ref.z, scale, cfg.solver.lam, vc[None].float(),
                                 None if bc is None else bc[None].float(), loc[one], cfg.solver.fit_rows)[0])  # fmt: skip
        out.append((k, torch.cat(vs), bias))
    return out


def captured_entry_scores(cap: Capture, cfg: CompressConfig, queries=None, local_lse=None, chunks=None, spans=None,
                          refs=None, prescored=None, solver=None) -> torch.Tensor:  # fmt: skip
    """Every entry's score ``[L, Hkv, n]`` as ``cfg``'s method ranks it for global budgets: part by part where
    the repeat pass ran in parts (:func:`chunked_entry_scores`), else at once (:func:`entry_scores`). Without
    ``queries``: every captured query, and the parts :func:`solved_in_chunks` gives (what ``train-scorer``
    learns from). ``solver``: rank as this one does instead of ``cfg.solver``."""
    solver = cfg.solver if solver is None else solver
    if queries is None:
        queries, local_lse, chunks, spans = cap.queries, cap.local_lse, solved_in_chunks(cap, cfg), cap.spans
    if chunks:
        return chunked_entry_scores(cap, solver, queries, local_lse, chunks, spans, prescored)
    return entry_scores(cap, solver, queries, local_lse, refs, prescored)


def entry_scores(cap: Capture, solver, queries, local_lse=None, refs=None, prescored=None) -> torch.Tensor:
    """Every entry's score ``[L, Hkv, n]`` as ``solver`` ranks it for selection (entries it always keeps, such
    as KVzip's sinks, score +inf), from ``queries`` (per layer ``[Hkv, N, d]``), for ``global`` budgets: the
    allocation and the selection then rank entries the same way. ``refs``: per layer, the queries'
    :func:`~kvsculpt.core.attention.reference` if already computed (or None)."""
    L = len(cap.keys)
    cq, refs = cap.context_queries or [None] * L, refs or [None] * L
    prescored = cap.prescored if prescored is None else prescored  # for queries the captured ones
    if cap.repeat_scores is not None:  # the pass counted the repeat queries: only the others are read here
        rest = ~prescored.to(queries[0].device)
        refs = [with_repeat_scores(cap, li, q[:, rest].float(), K.float(),
                                   None if local_lse is None else local_lse[li][:, rest].float(), 0, cap.n)
                for li, (q, K) in enumerate(zip(queries, cap.keys, strict=True))]  # fmt: skip
    return torch.stack([
        solver.entry_scores(K.float(), V.float(), q, cap.scale, cq[li], None if local_lse is None else local_lse[li],
                            refs[li])
        for li, (q, K, V) in enumerate(zip(queries, cap.keys, cap.values, strict=True))
    ])  # fmt: skip


def pilot_errors(cap: Capture, fit_q, check_q, m: int) -> torch.Tensor:
    """Select+Fit's relative output error ``[L, Hkv]`` on ``check_q`` when every head keeps ``m`` entries."""
    L, Hkv = len(cap.keys), cap.keys[0].shape[0]
    errs = torch.zeros(L, Hkv)
    for li in range(L):
        K, V = cap.keys[li].float(), cap.values[li].float()
        heads = PILOT(K, V, fit_q[li], [m] * Hkv, cap.scale)
        for h in range(Hkv):
            errs[li, h] = fidelity(check_q[li][h], K[h], V[h], *heads[h], cap.scale)[0]
    return errs
