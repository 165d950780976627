"""``compress()``: capture a context, solve every layer, return a :class:`CompressedCache`."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from . import budget
from .attention import model_dims
from .cache import CompressedCache
from .capture import QUERY_SOURCES, capture, replay_self_queries, split_heldout
from .solvers import Identity, Method, SelectFit, attention_scores, fidelity, make_method

# KVzip's selection (peak attention while the model repeats the context, all heads ranked together) with
# ridge-fitted values. Measured against the previous default (select-fit, self+context, curves): 1.0x / 1.8x /
# 8.2x lower KL at r = 0.1 / 0.3 / 0.5 on SmolLM2 (benchmarks/results/kvzip_fit_smollm2.md), the pass-key kept.
DEFAULT_METHOD = "kvzip-fit"
DEFAULT_QUERIES = "repeat"
DEFAULT_ALLOCATION = "global"
DEFAULT_HELDOUT = (
    0.0  # peak-attention selection needs every repeat position (a held-out block's keys are lost)
)
ALLOCATIONS = budget.RULES


def _check_queries(queries: str) -> None:
    parts = queries.split("+") if isinstance(queries, str) else list(queries)
    if not parts or any(p not in QUERY_SOURCES for p in parts):
        raise ValueError(
            f"unknown queries {queries!r}; choose from {', '.join(QUERY_SOURCES)} (or join with '+')"
        )


def compress(
    model,
    context_ids: torch.Tensor,
    ratio: float = 0.5,
    method: str | Method = DEFAULT_METHOD,
    allocation: str = DEFAULT_ALLOCATION,
    queries: str = DEFAULT_QUERIES,
    tokenizer=None,
    max_queries: int | None = 4096,
    heldout: float = DEFAULT_HELDOUT,
    self_samples: int = 10,
    self_length: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    alpha: float = 1.0,
    scope: str = "all",
    on_policy: int = 0,
    progress: bool = True,
    **options,
) -> CompressedCache:
    """Compress the cache of ``context_ids [1, n]`` to a fraction ``ratio`` of its entries (kept, not removed).

    ``method``: a registered name (``kvsculpt.solvers.METHODS``) or a method object; ``options`` go to its
    dataclass. ``queries``: the reference-query source(s): ``self``, ``context``, ``repeat`` or a mix joined by
    ``+``. A fraction ``heldout`` of the query groups is kept out of fitting and used for the fidelity stats
    in ``cache.info["stats"]``. ``on_policy``: see :func:`compress_captured`.
    """
    t_start = time.perf_counter()
    budget.check_ratio(ratio)
    _check_queries(queries)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    solver = method if isinstance(method, Method) else make_method(method, **options)
    if isinstance(context_ids, torch.Tensor) and context_ids.numel() == 0:
        raise ValueError("the context is empty")
    cap = capture(
        model,
        context_ids,
        queries,
        max_queries=max_queries,
        tokenizer=tokenizer,
        self_samples=self_samples,
        self_length=self_length,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        keep_context_queries=solver.needs_context_queries,
        progress=progress,
    )
    cache = compress_captured(
        model, cap, ratio, solver, allocation, heldout, seed, alpha, progress, scope, on_policy
    )
    cache.info.update(queries=queries, compress_seconds=time.perf_counter() - t_start)
    return cache


def compress_captured(
    model,
    cap,
    ratio: float,
    solver: Method,
    allocation="uniform",
    heldout=0.2,
    seed=0,
    alpha=1.0,
    progress=True,
    scope="all",
    on_policy: int = 0,
) -> CompressedCache:
    """Solve every layer of an existing :class:`~kvsculpt.capture.Capture` (lets experiments reuse one capture).

    ``on_policy``: if > 0, solve the layers in that many stages; before each stage after the first, the self
    samples are replayed through the model with the layers solved so far compressed, and their queries
    replace the captured ones for the layers still to solve (``on_policy ≥ L``: layer by layer).
    """
    t_start = time.perf_counter()
    L, _, Hkv, _, scale = model_dims(model)
    n = cap.n
    held = split_heldout(cap.groups, heldout, seed).to(cap.queries[0].device)
    fit_q = [q[:, ~held] for q in cap.queries]
    check_q = [q[:, held] for q in cap.queries] if held.any() else None
    t_solve = time.perf_counter()
    pilot_q = check_q if check_q is not None else fit_q

    def pilot(m: int) -> torch.Tensor:
        return pilot_errors(cap, fit_q, pilot_q, m)

    local = None if cap.local_lse is None else [x[:, ~held] for x in cap.local_lse]

    if isinstance(solver, Identity):
        budgets, pilot_record = [[n] * Hkv for _ in range(L)], {}
    else:
        budgets, pilot_record = budget.plan(
            allocation, pilot, n, ratio, L, Hkv, alpha, scope, lambda: peak_attention(cap, fit_q, local)
        )
    pilot_seconds = time.perf_counter() - t_solve
    keys, values, biases, rel_mse, mass_err = [], [], [], [], []
    has_bias = False
    if not isinstance(on_policy, int) or on_policy < 0:
        raise ValueError(f"on_policy must be a non-negative number of stages; got {on_policy!r}")
    if on_policy and cap.samples is None:
        raise ValueError("on_policy needs self queries (queries='self' or a mix with it)")
    stages = min(on_policy, L)
    stage_starts = {round(i * L / stages) for i in range(1, stages)} if stages else set()
    replay_s = 0.0
    for li in tqdm(range(L), desc=f"compress {type(solver).__name__}", unit="layer", disable=not progress):
        if li in stage_starts:
            t_replay = time.perf_counter()
            full_k = [list(K) for K in cap.keys[li:]]
            full_v = [list(V) for V in cap.values[li:]]
            no_bias = [None] * (L - li)
            partial = CompressedCache.from_heads(
                model, keys + [[k.to(model.dtype) for k in x] for x in full_k],
                values + [[v.to(model.dtype) for v in x] for x in full_v], n,
                (biases + no_bias) if has_bias else None,
            )  # fmt: skip
            fresh = replay_self_queries(model, cap, partial)
            fit_q[li:] = [q[:, ~held] for q in fresh[li:]]
            if check_q is not None:
                check_q[li:] = [q[:, held] for q in fresh[li:]]
            replay_s += time.perf_counter() - t_replay
        K, V = cap.keys[li], cap.values[li]
        cq = None if cap.context_queries is None else cap.context_queries[li]
        heads = solver(K, V, fit_q[li], budgets[li], scale, cq, None if local is None else local[li])
        dtype = model.dtype
        keys.append([k.to(dtype) for k, _, _ in heads])
        values.append([v.to(dtype) for _, v, _ in heads])
        biases.append(
            [torch.zeros(k.shape[0], device=k.device) if b is None else b.float() for k, _, b in heads]
        )
        has_bias = has_bias or any(b is not None for _, _, b in heads)
        if check_q is not None:
            errs = [fidelity(check_q[li][h], K[h], V[h], *heads[h], scale) for h in range(Hkv)]
            rel_mse.append([float(e) for e, _ in errs])
            mass_err.append([float(z) for _, z in errs])
    solve_s = time.perf_counter() - t_solve
    info = {
        "method": repr(solver),
        "ratio": ratio,
        "allocation": allocation,
        "budgets": budgets,
        "n": n,
        "fit_queries": int(fit_q[0].shape[1]),
        "heldout_queries": int(0 if check_q is None else check_q[0].shape[1]),
        "prefill_seconds": cap.prefill_seconds,
        "query_seconds": cap.query_seconds,
        "solve_seconds": solve_s,
        "on_policy": on_policy,
        "replay_seconds": replay_s,
        "compress_seconds": cap.prefill_seconds + cap.query_seconds + time.perf_counter() - t_start,
        "stats": {"heldout_rel_mse": rel_mse, "heldout_mass_err": mass_err},
    }
    if pilot_record:
        info["pilot"] = {**pilot_record, "seconds": pilot_seconds}
    return CompressedCache.from_heads(
        model, keys, values, n, biases if has_bias else None, repr(solver), info, cap.context_ids
    )


def peak_attention(cap, queries, local_lse=None) -> torch.Tensor:
    """Each entry's largest attention weight from ``queries`` (per layer ``[Hkv, N, d]``; ``local_lse``: their
    log-mass outside the context, see :class:`~kvsculpt.capture.Capture`) → ``[L, Hkv, n]``, for ``global``
    budgets."""
    return torch.stack([
        attention_scores(q, K.float(), cap.scale, "max", None if local_lse is None else local_lse[li])
        for li, (q, K) in enumerate(zip(queries, cap.keys, strict=True))
    ])  # fmt: skip


def pilot_errors(cap, fit_q, check_q, m: int) -> torch.Tensor:
    """Select+Fit's relative output error ``[L, Hkv]`` on ``check_q`` when every head keeps ``m`` entries."""
    L, Hkv = len(cap.keys), cap.keys[0].shape[0]
    errs = torch.zeros(L, Hkv)
    for li in range(L):
        K, V = cap.keys[li], cap.values[li]
        heads = SelectFit()(K, V, fit_q[li], [m] * Hkv, cap.scale)
        for h in range(Hkv):
            errs[li, h] = fidelity(check_q[li][h], K[h], V[h], *heads[h], cap.scale)[0]
    return errs
