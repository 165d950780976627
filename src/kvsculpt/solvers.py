"""Solvers: pure tensor math, independent of any model, batched over the KV heads of a layer.

Every method is a small dataclass called as::

    method(K [H, n, d], V [H, n, d], Q [H, N, d], budgets [H], scale, context_queries=None)
        -> list over heads of (K' [m_h, d], V' [m_h, d], β [m_h] or None)

``Q`` are the reference queries the block is fitted to; ``context_queries [H, G, n, d]`` (the context's own
prefill queries, per GQA head) are only needed by the eviction baselines that are defined by them
(``snapkv``, ``tova``). The ``repr`` of a method is recorded in results and saved caches.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .attention import attend, logits

# ----------------------------------------------------------------------------- shared primitives


def relative_error(O_student: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """Per-head relative output MSE ``‖O' − O‖² / ‖O‖²``: ``[H, N, d]`` → ``[H]``."""
    return ((O_student - O) ** 2).sum((-2, -1)) / (O**2).sum((-2, -1)).clamp_min(1e-30)


def fidelity(Q, K, V, Kc, Vc, bias, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """How well ``(Kc, Vc, bias)`` reproduces attention over ``(K, V)`` for queries ``Q`` (one head or batched).

    Returns relative output MSE and mean squared log-mass error, each ``[H]`` (or scalars for one head).
    """
    O, z = attend(Q, K, V, scale)
    Oc, zc = attend(Q, Kc, Vc, scale, bias)
    return relative_error(Oc, O), ((zc - z) ** 2).mean(-1)


def ridge_values(
    A: torch.Tensor, O: torch.Tensor, lam: float, prior: torch.Tensor | None = None, row_weights=None
) -> torch.Tensor:
    """``argmin_V ‖A V − O‖² + λ'‖V − prior‖²`` in fp32, batched: A ``[H, N, m]``, O ``[H, N, d]`` → ``[H, m, d]``.

    ``λ' = lam · mean(diag AᵀA)`` per head (scale-free); ``prior`` ``[H, m, d]`` defaults to zero.
    ``row_weights [H, N]`` scale each query's residual. Solved by Cholesky, with a least-squares fallback for
    heads where it fails.
    """
    A, O = A.float(), O.float()
    if row_weights is not None:
        A, O = A * row_weights[..., None], O * row_weights[..., None]
    R = O if prior is None else O - A @ prior.float()
    AtA = A.transpose(-1, -2) @ A
    reg = (lam * AtA.diagonal(dim1=-2, dim2=-1).mean(-1)).clamp_min(1e-12)
    AtA = AtA + reg[:, None, None] * torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    rhs = A.transpose(-1, -2) @ R
    chol, info = torch.linalg.cholesky_ex(AtA)
    sol = torch.cholesky_solve(rhs, chol)
    bad = info != 0
    if bad.any():
        sol[bad] = torch.linalg.lstsq(AtA[bad], rhs[bad]).solution
    return sol if prior is None else sol + prior.float()


def _check_selection(select: str, recent: int) -> None:
    if select not in ("sum", "max"):
        raise ValueError(f"select must be 'sum' or 'max', not {select!r}")
    if recent < 0:
        raise ValueError(f"recent must be >= 0, not {recent}")


def keep_recent(scores: torch.Tensor, w: int) -> torch.Tensor:
    """Scores ``[H, n]`` with the last ``w`` positions raised to +inf, so that top-m always keeps them."""
    if w > 0:
        scores[:, -w:] = float("inf")
    return scores


def attention_scores(
    Q: torch.Tensor, K: torch.Tensor, scale: float, reduce: str = "sum", local_lse=None
) -> torch.Tensor:
    """Attention each key receives from the queries, summed (``reduce="sum"``) or its maximum over them
    (``"max"``, KVzip's rule: a key that any one query needs is kept): Q ``[H, N, d]``, K ``[H, n, d]`` →
    ``[H, n]``. ``local_lse [H, N]``: each query's log-sum-exp over keys outside K that it also attends to;
    the softmax then includes them, so a query that mostly looks elsewhere gives K little weight."""
    _check_selection(reduce, 0)
    lg = logits(Q, K, scale)
    z = torch.logsumexp(lg, -1, keepdim=True)
    if local_lse is not None:
        z = torch.logaddexp(z, local_lse[..., None])
    a = torch.exp(lg - z)
    return a.sum(1) if reduce == "sum" else a.amax(1)


def top_indices(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Indices ``[H, m]`` of the ``m`` highest scores per head, in original order."""
    return scores.topk(m, dim=-1).indices.sort(dim=-1).values


def select_indices(
    Q, K, scale: float, m: int, select: str = "sum", recent: int = 0, local_lse=None
) -> torch.Tensor:
    """Select+Fit's key choice: indices ``[H, m]`` of the keys with the most attention from Q ``[H, N, d]``
    over K ``[H, n, d]`` (see :func:`attention_scores`); the last ``min(recent, m)`` positions are always kept."""
    return top_indices(keep_recent(attention_scores(Q, K, scale, select, local_lse), min(recent, m)), m)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [H, m]`` of ``x [H, n, d]`` → ``[H, m, d]``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def nnls_bias(Q, Kc, z, scale, max_rows: int = 2048) -> torch.Tensor:
    """β ``[H, m]`` with ``w = exp(β) ≥ 0`` fitted by NNLS so that ``Σ_j w_j exp(s q·k'_j) ≈ exp(z)`` (mass).

    Attention Matching's fit, solved with scipy per head on at most ``max_rows`` queries.
    """
    from scipy.optimize import nnls

    E = torch.exp(logits(Q[:, :max_rows], Kc, scale) - z[:, :max_rows, None]).double().cpu().numpy()
    out = []
    for h in range(E.shape[0]):
        w, _ = nnls(E[h], [1.0] * E.shape[1], maxiter=20 * E.shape[2])
        out.append(torch.log(torch.from_numpy(w).clamp_min(1e-6)).float())
    return torch.stack(out).to(Kc.device)


def _split(Kc, Vc, bias) -> list[tuple]:
    return [(Kc[h], Vc[h], None if bias is None else bias[h]) for h in range(Kc.shape[0])]


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

        ``local_lse [H, N]`` (optional): each query's log-mass on keys outside the block (see
        :func:`block_weight`); selection and fits then weigh a query by the share of its attention on the block.
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

    def solve(self, K, V, Q, m, scale, context_queries, local_lse=None):
        # -> (K' [H, m, d], V' [H, m, d], β [H, m] | None)
        raise NotImplementedError


# ----------------------------------------------------------------------------- methods


@dataclass
class Identity(Method):
    """Keep every entry unchanged (exactness checks of the compressed-cache path)."""

    def solve(self, K, V, Q, m, scale, context_queries, local_lse=None):
        if m != K.shape[1]:
            raise ValueError("identity keeps every entry: use ratio 1.0")
        return K, V, None


def block_weight(z: torch.Tensor, local_lse=None) -> torch.Tensor | None:
    """The share of each query's attention that falls on the block, ``σ(z − local_lse)`` ``[H, N]``, from its
    log-mass on the block ``z`` and elsewhere; None when nothing is elsewhere (all weights 1)."""
    return None if local_lse is None else torch.sigmoid(z - local_lse)


def _fit_values(Q, K, V, idx, Kc, scale, lam, prior, bias=None, local_lse=None):
    """Ridge values for the kept keys; each query's error weighted by the share of its attention on the block."""
    O, z = attend(Q, K, V, scale)
    A = torch.softmax(logits(Q, Kc, scale, bias), dim=-1)
    return ridge_values(
        A, O, lam, gather(V, idx) if prior == "original" else None, block_weight(z, local_lse)
    )


@dataclass
class Evict(Method):
    """Keep a subset of the original entries, chosen by ``score``; values copied, or refitted if ``fit``.

    Scores: ``h2o`` (attention accumulated over the reference queries), ``snapkv`` (attention from the
    context's last ``window`` positions, pooled over GQA heads), ``tova`` (attention from the context's last
    position), ``kvzip`` (the largest attention any one reference query gives, ``sinks`` first entries kept;
    KVzip with ``queries="repeat"``, ``allocation="global"``), ``streaming-llm`` (``sinks`` first entries + the
    most recent), ``knorm`` (lowest key norm), ``random``.
    """

    score: str = "h2o"
    fit: bool = False
    lam: float = 1e-2
    prior: str = "original"
    window: int = 64
    sinks: int = 4
    seed: int = 0

    SCORES = ("h2o", "snapkv", "tova", "kvzip", "streaming-llm", "knorm", "random")

    def __post_init__(self):
        if self.score not in self.SCORES:
            raise ValueError(f"unknown eviction score {self.score!r}; choose from {', '.join(self.SCORES)}")
        self.needs_context_queries = self.score in ("snapkv", "tova")

    def scores(self, K, Q, scale, context_queries, local_lse=None):
        H, n, _ = K.shape
        if self.score == "h2o":
            return attention_scores(Q, K, scale, "sum", local_lse)
        if self.score == "kvzip":
            s = attention_scores(Q, K, scale, "max", local_lse)
            s[:, : self.sinks] = float("inf")
            return s
        if self.score in ("snapkv", "tova"):
            w = min(n, self.window if self.score == "snapkv" else 1)
            cq = context_queries[:, :, -w:]  # [H, G, w, d]: causal queries of the context's last w positions
            lg = logits(cq, K[:, None], scale)  # [H, G, w, n]
            future = (
                torch.arange(n, device=K.device)[None, :] > torch.arange(n - w, n, device=K.device)[:, None]
            )
            s = torch.softmax(lg.masked_fill(future, float("-inf")), -1).sum((1, 2))  # [H, n]
            if self.score == "snapkv":  # SnapKV smooths the scores with a 1-D average pool (kernel 5)
                s = torch.nn.functional.avg_pool1d(
                    s[:, None], 5, stride=1, padding=2, count_include_pad=False
                )[:, 0]
            return keep_recent(s, w)  # the observation window itself is always kept
        if self.score == "streaming-llm":
            pos = torch.arange(n, device=K.device, dtype=torch.float32).expand(H, n).clone()
            pos[:, : self.sinks] = float("inf")
            return pos
        if self.score == "knorm":
            return -K.norm(dim=-1)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(H, n, generator=gen).to(K.device)

    def solve(self, K, V, Q, m, scale, context_queries, local_lse=None):
        idx = top_indices(self.scores(K, Q, scale, context_queries, local_lse), m)
        Kc = gather(K, idx)
        if not self.fit:
            return Kc, gather(V, idx), None
        Vc = _fit_values(Q, K, V, idx, Kc, scale, self.lam, self.prior, local_lse=local_lse)
        return Kc, Vc, None


@dataclass
class SelectFit(Method):
    """The paper's baseline: top-m keys by attention from the reference queries, values by ridge least squares.

    ``prior="original"`` regularises toward the selected original values (zero otherwise);
    ``beta="nnls"`` adds a per-entry bias fitted to the attention mass; ``select``: keys ranked by attention
    summed over the queries (``sum``) or by its maximum (``max``, see :func:`attention_scores`); the last
    ``recent`` positions are always kept.
    """

    lam: float = 1e-2
    prior: str = "original"
    beta: str = "none"
    select: str = "sum"
    recent: int = 0

    def __post_init__(self):
        _check_selection(self.select, self.recent)

    def solve(self, K, V, Q, m, scale, context_queries, local_lse=None):
        idx = select_indices(Q, K, scale, m, self.select, self.recent, local_lse)
        Kc = gather(K, idx)
        bias = None
        if self.beta == "nnls":
            bias = nnls_bias(Q, Kc, attend(Q, K, V, scale)[1], scale)
        return Kc, _fit_values(Q, K, V, idx, Kc, scale, self.lam, self.prior, bias, local_lse), bias


@dataclass
class Sculpt(Method):
    """KVSculpt: keys optimised by L-BFGS, values re-solved in closed form every ``inner`` steps.

    Initialised from Select+Fit (same ``select`` and ``recent``). Objective per head: relative output MSE
    + ``mass_weight`` · mean((z' − z)²). ``beta``: ``none``, ``nnls`` (fitted once at the start), or ``joint`` (optimised
    with the keys). The best iterate is kept, so the objective never ends above the initialisation.
    """

    iters: int = 20
    inner: int = 5
    lam: float = 1e-2
    prior: str = "original"
    mass_weight: float = 1.0
    beta: str = "none"
    select: str = "sum"
    recent: int = 0

    def __post_init__(self):
        _check_selection(self.select, self.recent)

    def objective(self, Q, O, z, Kc, Vc, bias, scale) -> torch.Tensor:
        """Per-head objective ``[H]``."""
        Oc, zc = attend(Q, Kc, Vc, scale, bias)
        return relative_error(Oc, O) + self.mass_weight * ((zc - z) ** 2).mean(-1)

    def solve(self, K, V, Q, m, scale, context_queries, local_lse=None):
        O, z = attend(Q, K, V, scale)
        idx = select_indices(Q, K, scale, m, self.select, self.recent, local_lse)
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


def _evict(score: str, fit: bool = False):
    return lambda **kw: Evict(score=score, fit=fit, **kw)


METHODS = {
    "sculpt": Sculpt,
    "select-fit": SelectFit,
    "identity": Identity,
    **{s: _evict(s) for s in Evict.SCORES},
    **{f"{s}-fit": _evict(s, fit=True) for s in Evict.SCORES},
}


def make_method(name: str, **options) -> Method:
    """A method by registered name, with options (its dataclass fields)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad option for method {name!r}: {exc}") from None
