"""Methods: ``(K, V, Q, budgets) → per head (K', V', β)``, pure tensor math batched over the KV heads of a layer.

Every method is a small dataclass called as::

    method(K [H, n, d], V [H, n, d], Q [H, N, d], budgets [H], scale, context_queries=None, local_lse=None)
        -> list over heads of (K' [m_h, d], V' [m_h, d], β [m_h] or None)

* :class:`Select` keeps the entries a scorer (:mod:`kvsculpt.core.scores`) ranks highest and, with ``fit``,
  re-solves their values by ridge least squares (``fit=False`` copies them: plain eviction).
* :class:`Sculpt` (KVSculpt) starts from Select with fitted values, then moves each head's keys by L-BFGS,
  the values re-solved in closed form at every evaluation.
* :class:`Identity` keeps everything (exactness checks).

The ``repr`` of a method is recorded in results and saved caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .attention import logits, reference
from .fit import block_weight, fit_generalises, fit_values, nnls_bias, ridge_values
from .scores import KVzip, Scorer, ValueKVzip, gather, keep_recent, top_indices


def _by_budget(budgets: list[int]) -> dict[int, list[int]]:
    """Heads grouped by budget, so each group is solved as one batch."""
    groups: dict[int, list[int]] = {}
    for h, m in enumerate(budgets):
        groups.setdefault(int(m), []).append(h)
    return groups


class Method:
    """Base: validates inputs and batches heads of equal budget through ``solve``."""

    needs_context_queries = False
    uses_reference = False  # whether it reads the reference queries' attention over the block (a Reference)

    def __call__(self, K, V, Q, budgets, scale, context_queries=None, local_lse=None, scores=None, ref=None):
        """K, V ``[H, n, d]``, Q ``[H, N, d]``, one budget per head → per head ``(K' [m, d], V' [m, d], β [m] | None)``.

        ``local_lse [H, N]`` (optional): each query's log-mass on keys outside the block; selection and fits
        then weigh a query by the share of its attention on the block. ``scores [H, n]`` (optional): what
        :meth:`entry_scores` returned for these inputs, so that selection does not score twice. ``ref``
        (optional): :func:`~kvsculpt.core.attention.reference` of ``Q`` on ``(K, V)`` with ``local_lse``, so
        that nothing computes it twice.
        """
        H, n, _ = K.shape
        if len(budgets) != H or min(budgets) < 1 or max(budgets) > n:
            raise ValueError(f"budgets {list(budgets)} must be {H} integers in [1, {n}]")
        if self.needs_context_queries and context_queries is None:
            raise ValueError(f"{self!r} needs the context's own queries")
        out: list = [None] * H
        for m, heads in _by_budget(list(budgets)).items():
            idx = torch.tensor(heads, device=K.device)
            cq = None if context_queries is None else context_queries[idx]
            loc = None if local_lse is None else local_lse[idx].float()
            sc = None if scores is None else scores[idx]
            r = None if ref is None else ref.take(idx)
            Kc, Vc, bias = self.solve(
                K[idx].float(), V[idx].float(), Q[idx].float(), m, scale, cq, loc, sc, r
            )
            for j, h in enumerate(heads):
                out[h] = (Kc[j], Vc[j], None if bias is None else bias[j])
        return out

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None, scores=None, ref=None):
        """Heads of one budget ``m``: → ``(K' [H, m, d], V' [H, m, d], β [H, m] | None)``."""
        raise NotImplementedError

    def entry_scores(
        self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None
    ) -> torch.Tensor | None:
        """Each entry's score ``[H, n]`` as this method ranks it, for budgets that rank entries globally."""
        return None


@dataclass
class Identity(Method):
    """Keep every entry unchanged."""

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None, scores=None, ref=None):
        if m != K.shape[1]:
            raise ValueError("identity keeps every entry: use ratio 1.0")
        return K, V, None


@dataclass
class Select(Method):
    """Keep the ``m`` entries ``scorer`` ranks highest (the last ``recent`` positions always); with ``fit``,
    re-solve their values by ridge least squares toward the original values (``prior="original"``) or zero,
    each query weighted by the share of its attention on the block; ``beta="nnls"`` adds a per-entry bias
    fitted to the attention mass (Attention Matching). With ``fit=False`` the values are copied (eviction).
    ``guard``: a head keeps its copied values unless fitting beats them on queries held out of the fit
    (:func:`~kvsculpt.core.fit.fit_generalises`). ``fit_rows``: the value fit uses a fixed random subset of at
    most that many queries per head (None: all; the selection always reads every query)."""

    scorer: Scorer = field(default_factory=KVzip)
    fit: bool = True
    lam: float = 1e-2
    prior: str = "original"
    beta: str = "none"
    recent: int = 0
    guard: bool = False
    fit_rows: int | None = None

    BETAS = ("none", "nnls")

    def __post_init__(self):
        if self.prior not in ("original", "zero"):
            raise ValueError(f"prior must be 'original' or 'zero', not {self.prior!r}")
        if self.beta not in self.BETAS:
            raise ValueError(f"beta must be one of {', '.join(self.BETAS)}, not {self.beta!r}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, not {self.recent}")
        if self.fit_rows is not None and self.fit_rows < 1:
            raise ValueError(f"fit_rows must be >= 1 (or None for every query), not {self.fit_rows}")
        self.needs_context_queries = self.scorer.needs_context_queries
        self.uses_reference = self.fit or self.scorer.uses_reference or self.beta != "none"

    def entry_scores(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        return keep_recent(self.scorer(K, V, Q, scale, context_queries, local_lse, ref), self.recent)

    def select(
        self, K, V, Q, m, scale, context_queries=None, local_lse=None, scores=None, ref=None
    ) -> torch.Tensor:
        """Indices ``[H, m]`` of the kept entries, in original order; ``scores``: :meth:`entry_scores`' result
        for the same inputs, if already computed."""
        if scores is None or self.recent > m:  # entry_scores always keeps all `recent`; here at most m
            scores = keep_recent(
                self.scorer(K, V, Q, scale, context_queries, local_lse, ref), min(self.recent, m)
            )
        return top_indices(scores, m)

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None, scores=None, ref=None):
        idx = self.select(K, V, Q, m, scale, context_queries, local_lse, scores, ref)
        return self.solve_selected(K, V, Q, idx, scale, local_lse, ref)

    def solve_selected(self, K, V, Q, idx, scale, local_lse=None, ref=None):
        """The kept entries ``idx [H, m]`` → ``(K' [H, m, d], V' [H, m, d], β [H, m] | None)``: keys copied,
        β and values fitted as the fields say (``ref``: the reference of ``Q`` on ``(K, V)``, if computed)."""
        Kc = gather(K, idx)
        if ref is None and (self.fit or self.beta != "none"):
            ref = reference(Q, K, V, scale, local_lse)
        bias = nnls_bias(Q, Kc, ref.z, scale) if self.beta == "nnls" else None
        if not self.fit:
            return Kc, gather(V, idx), bias
        copied = gather(V, idx)
        prior = copied if self.prior == "original" else None
        Vc = fit_values(Q, Kc, ref.O, ref.z, scale, self.lam, prior, bias, local_lse, self.fit_rows)
        if self.guard:
            better = fit_generalises(Q, ref.O, ref.z, Kc, copied, scale, self.lam, prior, bias, local_lse)
            Vc = torch.where(better[:, None, None], Vc, copied)
        return Kc, Vc, bias


@dataclass
class Learned(Select):
    """Keep each head's ``m`` best entries by scores a learned model predicted during the prefill
    (:mod:`kvsculpt.core.learned`; ``kvsculpt.compress`` computes them and passes ``scores``). With ``fit``, their
    values are re-solved toward the copied ones (Select's ridge fit) on the reference queries ``fit_queries``
    names: ``self``, the default's self samples (32 × 8 tokens decoded from the full cache), or ``tail``, the
    prefill's last ``fit_window`` queries (free, but worse: they are causal); without ``fit``, values copied and
    nothing runs but the prefill. ``weights``: the scorer's file
    (None: the one ``train-scorer`` wrote for the model, or the package's); ``sinks``: the first positions always
    kept; ``snapshot``: the file's weights after that many training windows instead of all (learning curves)."""

    scorer: Scorer = field(default_factory=lambda: Predicted())
    weights: str | None = None
    sinks: int = 4
    fit_queries: str = "self"
    fit_window: int = 128
    snapshot: int | None = None  # the weights after this many training windows (learning curves)

    FIT_QUERIES = ("self", "tail")

    def __post_init__(self):
        super().__post_init__()
        if self.fit_queries not in self.FIT_QUERIES:
            raise ValueError(
                f"fit_queries must be one of {', '.join(self.FIT_QUERIES)}, not {self.fit_queries!r}"
            )
        if self.fit_window < 1:
            raise ValueError(
                f"fit_window must be >= 1 (the prefill's last queries the values are fitted on); got {self.fit_window}"
            )


@dataclass
class Predicted(Scorer):
    """The learned method's scores, which only the prefill gives (a placeholder that refuses to score)."""

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        raise ValueError(
            "learned scores come from the prefill: compress with kvsculpt.compress(method='learned')"
        )


@dataclass
class Sculpt(Select):
    """KVSculpt: Select+Fit, then each head's keys moved by its own L-BFGS run (:func:`sculpt_head`).

    The values are solved in closed form at every evaluation (variable projection: the objective is a
    function of the keys alone, so the L-BFGS history stays valid for the whole run). Objective per head:
    relative output error + ``mass_weight`` · mean squared log-mass error, each query weighted by the share
    of its attention on the block when ``local_lse`` is given (as in Select's value fit). ``iters``: L-BFGS
    iterations per head (at most ``5/4 · iters`` evaluations); ``iters=0`` is exactly Select+Fit. ``beta``:
    ``none``, ``nnls`` (fitted once, before the keys move) or ``joint`` (optimised with the keys, from 0).
    ``val``: the share of queries (one block of 32 in every ``round(1/val)``) kept out of the key fit to pick
    the evaluated point with the lowest objective on them (0: the lowest fitted objective); the values are
    then re-solved on every query. So no head ends above its start on the criterion. After a call, ``stats``
    holds one record per head solved (:func:`sculpt_head`'s).

    Defaults: it starts from the library default's selection (``kvzip-v``), 20 iterations, and holds the
    block's log-mass with ``mass_weight=1``: on SmolLM2 and Qwen2.5-Coder-0.5B, from the default's cache,
    ``mass_weight=0`` made KL worse and more iterations worse still, while the mass term lowered it. With
    the mass term, ``iters=60`` lowered KL again on every window tried, at about 2–4× the time
    (``benchmarks/results/sculpt_iters_*.md``); 20 stays the default for its cost. The paper's form is
    ``scorer=H2O(), mass_weight=0``.
    """

    scorer: Scorer = field(default_factory=ValueKVzip)
    iters: int = 20
    mass_weight: float = 1.0
    val: float = 0.2
    history: int = 20
    stats: list = field(default_factory=list, init=False, repr=False, compare=False)

    BETAS = ("none", "nnls", "joint")

    def __post_init__(self):
        super().__post_init__()
        if not self.fit:
            raise ValueError("sculpt always fits the values (fit=False is plain eviction)")
        if self.iters < 0 or self.mass_weight < 0 or self.history < 1 or not 0 <= self.val < 0.5:
            raise ValueError("sculpt needs iters >= 0, mass_weight >= 0, history >= 1 and 0 <= val < 0.5")

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None, scores=None, ref=None):
        if ref is None:
            ref = reference(Q, K, V, scale, local_lse)
        idx = self.select(K, V, Q, m, scale, context_queries, local_lse, scores, ref)
        Kc, Vc, bias = self.solve_selected(K, V, Q, idx, scale, local_lse, ref)
        if self.beta == "joint":
            bias = torch.zeros(Kc.shape[:2], device=K.device)
        if self.iters == 0:
            return Kc, Vc, bias
        O, z = ref.O, ref.z
        w = block_weight(z, local_lse)
        w = torch.ones_like(z) if w is None else w
        prior = gather(V, idx) if self.prior == "original" else None
        N = Q.shape[1]
        every = round(1 / self.val) if self.val > 0 and N >= 64 else 0
        held = (torch.arange(N, device=Q.device) // 32) % every == every - 1 if every else None
        out = []
        for h in range(K.shape[0]):  # one L-BFGS per head: its own line searches and convergence
            fit = slice(None) if held is None else ~held
            val = None if held is None else (Q[h, held], O[h, held], z[h, held], w[h, held])
            ph, bh = None if prior is None else prior[h], None if bias is None else bias[h]
            Kh, Vh, bh, st = sculpt_head(Q[h, fit], O[h, fit], z[h, fit], Kc[h], ph, bh, scale, self.lam,
                                         self.iters, self.mass_weight, w[h, fit], joint_beta=self.beta == "joint",
                                         history=self.history, val=val)  # fmt: skip
            if held is not None:  # the chosen keys' values from every query
                with torch.no_grad():
                    Vh = sculpt_objective(Q[h], O[h], z[h], Kh, ph, bh, scale, self.lam, 0.0, w[h])[1]
            out.append((Kh, Vh, bh))
            self.stats.append(st)
        Kc, Vc = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
        return Kc, Vc, None if bias is None else torch.stack([o[2] for o in out])


def block_error(A, zc, Vc, O, z, mass_weight, weights=None) -> torch.Tensor:
    """Weighted relative output error + ``mass_weight`` · weighted mean of ``(z' − z)²`` (a scalar) of a block
    whose attention is ``A [N, m]`` with log-mass ``zc [N]`` and values ``Vc [m, d]``, against the teacher's
    output ``O [N, d]`` and log-mass ``z [N]``; ``weights [N]``: each query's weight (None: all 1)."""
    w2 = torch.ones_like(z) if weights is None else weights**2
    out_err = (w2[:, None] * (A @ Vc - O) ** 2).sum() / (w2[:, None] * O**2).sum().clamp_min(1e-30)
    return out_err + mass_weight * (w2 * (zc - z) ** 2).sum() / w2.sum().clamp_min(1e-30)


def _block_attention(Q, Kc, scale, bias):
    lg = logits(Q, Kc, scale, bias)
    zc = torch.logsumexp(lg, -1)
    return torch.exp(lg - zc[:, None]), zc


def sculpt_objective(Q, O, z, Kc, prior, bias, scale, lam, mass_weight, weights=None):
    """Sculpt's objective for one head and the values it implies: ``(objective (scalar), V' [m, d])``.

    Q ``[N, d]``, teacher output O ``[N, d]`` and log-mass z ``[N]``, keys Kc ``[m, d]``, ``prior [m, d]``
    (what the ridge values shrink toward; None: zero), ``bias [m]`` or None, ``weights [N]`` (each query's
    weight; None: all 1). The values are the ridge solution for these keys (differentiable, so the gradient
    includes their dependence on the keys); the objective is :func:`block_error`."""
    A, zc = _block_attention(Q, Kc, scale, bias)
    wt = None if weights is None else weights[None]
    Vc = ridge_values(A[None], O[None], lam, None if prior is None else prior[None], wt)[0]
    return block_error(A, zc, Vc, O, z, mass_weight, weights), Vc


def sculpt_head(Q, O, z, Kc, prior, bias, scale, lam, iters, mass_weight=0.0, weights=None, joint_beta=False,
                history=20, val=None, on_eval=None):  # fmt: skip
    """Move one head's keys ``Kc [m, d]`` (and ``bias [m]`` if ``joint_beta``) by L-BFGS with a strong-Wolfe
    line search on :func:`sculpt_objective` (same arguments), at most ``iters`` iterations and
    ``5/4 · iters`` evaluations. ``val``: ``(Q, O, z, weights)`` of queries kept out of the fit; the point
    returned is the evaluated one with the lowest objective on them (without: the lowest fitted objective).
    ``on_eval(evaluation, objective, K', β)`` is called after each evaluation.

    Returns ``(K' [m, d], V' [m, d], β [m] | None, stats)``, V' fitted on the fit queries; ``stats``: the fitted
    objective at the start and at the point returned (``start``, ``end``), the same on ``val``
    (``val_start``, ``val_end``; None without), ``evaluations``."""
    Kp = Kc.detach().float().clone().requires_grad_(True)
    bp = None if bias is None else bias.detach().float().clone().requires_grad_(joint_beta)
    params = [Kp] + ([bp] if joint_beta else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, max_eval=iters * 5 // 4, history_size=history,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)  # fmt: skip
    trace = {
        "evaluations": 0,
        "best": math.inf,
        "K": Kp.detach().clone(),
        "b": bias,
        "start": None,
        "end": None,
    }

    def closure():
        opt.zero_grad()
        loss, Vc = sculpt_objective(Q, O, z, Kp, prior, bp, scale, lam, mass_weight, weights)
        loss.backward()
        value, keys, b = float(loss.detach()), Kp.detach(), None if bp is None else bp.detach()
        held = value
        if val is not None:
            with torch.no_grad():
                held = float(block_error(*_block_attention(val[0], keys, scale, b), Vc.detach(), val[1], val[2],
                                         mass_weight, val[3]))  # fmt: skip
        trace["evaluations"] += 1
        if trace["evaluations"] == 1:
            trace["start"], trace["val_start"] = value, held
        if held < trace["best"]:
            trace.update(best=held, end=value, K=keys.clone(), b=None if b is None else b.clone())
        if on_eval is not None:
            on_eval(trace["evaluations"], value, keys, b)
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        Vc = sculpt_objective(Q, O, z, trace["K"], prior, trace["b"], scale, lam, mass_weight, weights)[1]
    stats = {"start": trace["start"], "end": trace["end"], "evaluations": trace["evaluations"],
             "val_start": None if val is None else trace["val_start"], "val_end": None if val is None else trace["best"]}  # fmt: skip
    return trace["K"], Vc, trace["b"], stats
