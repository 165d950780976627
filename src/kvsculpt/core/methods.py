"""Methods: ``(K, V, Q, budgets) → per head (K', V', β)``, pure tensor math batched over the KV heads of a layer.

Every method is a small dataclass called as::

    method(K [H, n, d], V [H, n, d], Q [H, N, d], budgets [H], scale, context_queries=None, local_lse=None)
        -> list over heads of (K' [m_h, d], V' [m_h, d], β [m_h] or None)

* :class:`Select` keeps the entries a scorer (:mod:`kvsculpt.core.scores`) ranks highest and, with ``fit``,
  re-solves their values by ridge least squares (``fit=False`` copies them: plain eviction).
* :class:`Sculpt` (KVSculpt) starts from Select with fitted values, then moves the keys by L-BFGS,
  alternating with closed-form value solves.
* :class:`Identity` keeps everything (exactness checks).

The ``repr`` of a method is recorded in results and saved caches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .attention import attend, logits, relative_error
from .fit import fit_generalises, fit_values, nnls_bias, ridge_values
from .scores import H2O, KVzip, Scorer, gather, keep_recent, top_indices


def _by_budget(budgets: list[int]) -> dict[int, list[int]]:
    """Heads grouped by budget, so each group is solved as one batch."""
    groups: dict[int, list[int]] = {}
    for h, m in enumerate(budgets):
        groups.setdefault(int(m), []).append(h)
    return groups


class Method:
    """Base: validates inputs and batches heads of equal budget through ``solve``."""

    needs_context_queries = False

    def __call__(self, K, V, Q, budgets, scale, context_queries=None, local_lse=None):
        """K, V ``[H, n, d]``, Q ``[H, N, d]``, one budget per head → per head ``(K' [m, d], V' [m, d], β [m] | None)``.

        ``local_lse [H, N]`` (optional): each query's log-mass on keys outside the block; selection and fits
        then weigh a query by the share of its attention on the block.
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
            Kc, Vc, bias = self.solve(K[idx].float(), V[idx].float(), Q[idx].float(), m, scale, cq, loc)
            for j, h in enumerate(heads):
                out[h] = (Kc[j], Vc[j], None if bias is None else bias[j])
        return out

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None):
        """Heads of one budget ``m``: → ``(K' [H, m, d], V' [H, m, d], β [H, m] | None)``."""
        raise NotImplementedError

    def entry_scores(self, K, Q, scale, context_queries=None, local_lse=None) -> torch.Tensor | None:
        """Each entry's score ``[H, n]`` as this method ranks it, for budgets that rank entries globally."""
        return None


@dataclass
class Identity(Method):
    """Keep every entry unchanged."""

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None):
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
    (:func:`~kvsculpt.core.fit.fit_generalises`)."""

    scorer: Scorer = field(default_factory=KVzip)
    fit: bool = True
    lam: float = 1e-2
    prior: str = "original"
    beta: str = "none"
    recent: int = 0
    guard: bool = False

    BETAS = ("none", "nnls")

    def __post_init__(self):
        if self.prior not in ("original", "zero"):
            raise ValueError(f"prior must be 'original' or 'zero', not {self.prior!r}")
        if self.beta not in self.BETAS:
            raise ValueError(f"beta must be one of {', '.join(self.BETAS)}, not {self.beta!r}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, not {self.recent}")
        self.needs_context_queries = self.scorer.needs_context_queries

    def entry_scores(self, K, Q, scale, context_queries=None, local_lse=None):
        return keep_recent(self.scorer(K, Q, scale, context_queries, local_lse), self.recent)

    def select(self, K, Q, m, scale, context_queries=None, local_lse=None) -> torch.Tensor:
        """Indices ``[H, m]`` of the kept entries, in original order."""
        scores = self.scorer(K, Q, scale, context_queries, local_lse)
        return top_indices(keep_recent(scores, min(self.recent, m)), m)

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None):
        idx = self.select(K, Q, m, scale, context_queries, local_lse)
        Kc = gather(K, idx)
        bias = nnls_bias(Q, Kc, attend(Q, K, V, scale)[1], scale) if self.beta == "nnls" else None
        if not self.fit:
            return Kc, gather(V, idx), bias
        copied = gather(V, idx)
        prior = copied if self.prior == "original" else None
        Vc = fit_values(Q, K, V, Kc, scale, self.lam, prior, bias, local_lse)
        if self.guard:
            better = fit_generalises(Q, K, V, Kc, copied, scale, self.lam, prior, bias, local_lse)
            Vc = torch.where(better[:, None, None], Vc, copied)
        return Kc, Vc, bias


@dataclass
class Sculpt(Select):
    """KVSculpt: keys optimised by L-BFGS, values re-solved in closed form every ``inner`` steps.

    Initialised from Select with fitted values (same scorer, default :class:`H2O`: the paper's Select+Fit).
    Objective per head: relative output MSE + ``mass_weight`` · mean((z' − z)²). ``beta``: ``none``,
    ``nnls`` (fitted once at the start), or ``joint`` (optimised with the keys). The best iterate is kept, so
    the objective never ends above the initialisation.
    """

    scorer: Scorer = field(default_factory=H2O)
    iters: int = 20
    inner: int = 5
    mass_weight: float = 1.0

    BETAS = ("none", "nnls", "joint")

    def __post_init__(self):
        super().__post_init__()
        if not self.fit:
            raise ValueError("sculpt always fits the values (fit=False is plain eviction)")

    def objective(self, Q, O, z, Kc, Vc, bias, scale) -> torch.Tensor:
        """Per-head objective ``[H]``."""
        Oc, zc = attend(Q, Kc, Vc, scale, bias)
        return relative_error(Oc, O) + self.mass_weight * ((zc - z) ** 2).mean(-1)

    def solve(self, K, V, Q, m, scale, context_queries=None, local_lse=None):
        O, z = attend(Q, K, V, scale)
        idx = self.select(K, Q, m, scale, context_queries, local_lse)
        prior = gather(V, idx) if self.prior == "original" else None
        Kc = gather(K, idx).clone()
        bias = nnls_bias(Q, Kc, z, scale) if self.beta == "nnls" else None
        if self.beta == "joint":
            bias = torch.zeros(Kc.shape[:2], device=K.device)

        def values(Kc, bias):
            return ridge_values(torch.softmax(logits(Q, Kc, scale, bias), -1), O, self.lam, prior)

        Vc = values(Kc, bias)
        best = self.objective(Q, O, z, Kc, Vc, bias, scale)
        best_state = [Kc.clone(), Vc.clone(), None if bias is None else bias.clone()]
        for _ in range(math.ceil(self.iters / max(1, self.inner))):
            Kc, bias = self._key_steps(Q, O, z, Kc, Vc, bias, scale)
            with torch.no_grad():
                Vc = values(Kc, bias)
                obj = self.objective(Q, O, z, Kc, Vc, bias, scale)
            if not torch.isfinite(obj).all():
                warnings.warn(
                    "sculpt diverged (non-finite objective); keeping the best iterate", stacklevel=2
                )
                break
            better = obj < best
            best = torch.where(better, obj, best)
            best_state[0][better], best_state[1][better] = Kc[better], Vc[better]
            if bias is not None:
                best_state[2][better] = bias[better]
        return tuple(best_state)

    def _key_steps(self, Q, O, z, Kc, Vc, bias, scale):
        Kp = Kc.detach().clone().requires_grad_(True)
        params = [Kp]
        bp = None if bias is None else bias.detach().clone().requires_grad_(self.beta == "joint")
        if self.beta == "joint":
            params.append(bp)
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=self.inner,
            history_size=10,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-12,
            tolerance_change=1e-14,
        )

        def closure():
            opt.zero_grad()
            loss = self.objective(Q, O, z, Kp, Vc, bp, scale).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return Kp.detach(), None if bp is None else bp.detach()
