"""Closed-form fits of a compressed block: values by ridge least squares, bias β by NNLS on the mass."""

from __future__ import annotations

import torch

from .attention import attend, logits
from .quant import quantize_keys


def ridge_values(
    A: torch.Tensor, O: torch.Tensor, lam: float, prior: torch.Tensor | None = None, row_weights=None,
    solver: str = "cholesky", cg_iters: int = 200, cg_tol: float = 1e-5,
) -> torch.Tensor:  # fmt: skip
    """``argmin_V Σ_i w_i²‖A_i V − O_i‖² + λ'‖V − prior‖²`` in fp32 (or fp64 if given), batched: A ``[H, N, m]``,
    O ``[H, N, d]`` → ``[H, m, d]``.

    ``λ' = lam · mean(diag AᵀA)`` per head, of the weighted A (scale-free); ``prior`` ``[H, m, d]`` defaults
    to zero; ``row_weights [H, N]`` (``w``) scale each query's residual.

    ``solver``: ``cholesky`` forms and factors the normal equations, O(N·m² + m³) per head, with a
    least-squares fallback for heads where it fails; ``dual`` solves the same problem through the N × N system
    ``V = prior + Aᵀ(AAᵀ + λ'I)⁻¹R`` (the identity ``(AᵀA + λ'I)⁻¹Aᵀ = Aᵀ(AAᵀ + λ'I)⁻¹``), O(N²·m + N³) per head:
    the cheap one when there are fewer rows than unknowns (a decode budget's refit: ``every`` queries, thousands
    of kept entries); ``cg`` runs Jacobi-preconditioned conjugate gradients on
    them without forming ``AᵀA``, warm-started at the prior (the copied values), O(N·m·d) per iteration and
    O(m·d) memory beyond A, until every column's residual is below ``cg_tol`` of its right-hand side or after
    ``cg_iters`` iterations.

    Measured on one core of this CPU (random heads, d = 64, ``lam=1e-2``; ``benchmarks/results/fit_solver.md``):
    Cholesky takes 0.8 s at N = 8000, m = 2048 and 27 s at N = 24000, m = 7000; CG to ``cg_tol=1e-5`` is 4–13×
    slower (forming ``AᵀA`` is one fast matrix product here); CG stopped at 20 iterations is slower below
    m = 4096, level at m = 4096 and 1.9× faster at m = 7000, for a 0.2–1.5 % larger output residual. Which to
    use at long n is for real heads to settle, so the default stays Cholesky.
    """
    dtype = torch.promote_types(A.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    A, O = A.to(dtype), O.to(dtype)
    if row_weights is not None:
        A, O = A * row_weights[..., None], O * row_weights[..., None]
    R = O if prior is None else O - A @ prior.to(dtype)
    if solver not in ("cholesky", "dual", "cg"):
        raise ValueError(f"unknown solver {solver!r}; choose cholesky, dual or cg")
    if solver == "cg":
        sol = _ridge_cg(A, R, lam, cg_iters, cg_tol)
        return sol if prior is None else sol + prior.to(dtype)
    if solver == "dual":  # trace(AAᵀ) = trace(AᵀA), so λ' is the primal's
        AAt = A @ A.transpose(-1, -2)
        reg = (lam * AAt.diagonal(dim1=-2, dim2=-1).sum(-1) / A.shape[-1]).clamp_min(1e-12)
        AAt = AAt + reg[:, None, None] * torch.eye(A.shape[-2], device=A.device, dtype=A.dtype)
        sol = A.transpose(-1, -2) @ torch.linalg.solve(AAt, R)
        return sol if prior is None else sol + prior.to(dtype)
    AtA = A.transpose(-1, -2) @ A
    reg = (lam * AtA.diagonal(dim1=-2, dim2=-1).mean(-1)).clamp_min(1e-12)
    AtA = AtA + reg[:, None, None] * torch.eye(A.shape[-1], device=A.device, dtype=A.dtype)
    rhs = A.transpose(-1, -2) @ R
    chol, info = torch.linalg.cholesky_ex(AtA)
    sol = torch.cholesky_solve(rhs, chol)
    bad = info != 0
    if bad.any():
        sol[bad] = torch.linalg.lstsq(AtA[bad], rhs[bad]).solution
    return sol if prior is None else sol + prior.to(dtype)


def _ridge_cg(A: torch.Tensor, R: torch.Tensor, lam: float, iters: int, tol: float) -> torch.Tensor:
    """``X [H, m, d]`` solving ``(AᵀA + λ'I) X = AᵀR`` by Jacobi-preconditioned CG from ``X = 0``, every head and
    column at once (each column its own CG), never forming ``AᵀA``."""
    diag = (A * A).sum(1)  # [H, m] = diag(AᵀA)
    reg = (lam * diag.mean(-1)).clamp_min(1e-12)[:, None]  # [H, 1]
    inv = 1.0 / (diag + reg)  # the preconditioner
    b = A.transpose(-1, -2) @ R  # [H, m, d]
    X = torch.zeros_like(b)
    r = b.clone()
    z = inv[..., None] * r
    p = z.clone()
    rz = (r * z).sum(1)  # [H, d]
    limit = tol * b.norm(dim=1)  # [H, d]
    for _ in range(iters):
        if bool((r.norm(dim=1) <= limit).all()):
            break
        Ap = A.transpose(-1, -2) @ (A @ p) + reg[..., None] * p
        alpha = rz / (p * Ap).sum(1).clamp_min(1e-30)
        X += alpha[:, None] * p
        r -= alpha[:, None] * Ap
        z = inv[..., None] * r
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-30))[:, None] * p
        rz = rz_new
    return X


def block_weight(z: torch.Tensor, local_lse=None) -> torch.Tensor | None:
    """The share of each query's attention that falls on the block, ``σ(z − local_lse)`` ``[H, N]``, from its
    log-mass on the block ``z`` and elsewhere; None when nothing is elsewhere (all weights 1)."""
    return None if local_lse is None else torch.sigmoid(z - local_lse)


def subsample_index(N: int, at_most: int | None, seed: int = 0, device=None) -> torch.Tensor | None:
    """Sorted indices ``[at_most]`` of a random subset of ``N`` rows, the same for the same seed (None when
    ``at_most`` is None or not below N: keep all)."""
    if at_most is None or N <= at_most:
        return None
    keep = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:at_most].sort().values
    return keep if device is None else keep.to(device)


def fit_subset(
    local_lse: torch.Tensor | None, N: int, max_rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """At most ``max_rows`` of ``N`` queries for a fit, and a weight for each ``[rows]`` (None: all fit).

    Queries that attend only to the block (``local_lse [H, N]`` all ``-inf``: the self samples) are all kept
    while they fit; a fixed random subset of the others fills the rest, each weighted by √(others / kept
    others), so the fit's objective keeps its expectation."""
    if N <= max_rows:
        return None
    whole = torch.zeros(N, dtype=torch.bool) if local_lse is None else torch.isinf(local_lse).all(0).cpu()
    if int(whole.sum()) >= max_rows:  # too many of them: sample among all alike
        whole[:] = False
    sure, rest = whole.nonzero().squeeze(1), (~whole).nonzero().squeeze(1)
    k = max_rows - sure.numel()
    picked = rest[subsample_index(rest.numel(), k)]
    rows = torch.cat([sure, picked])
    weight = torch.cat([torch.ones(sure.numel()), torch.full((k,), (rest.numel() / k) ** 0.5)])
    order = rows.argsort()
    return rows[order], weight[order]


def fit_values(Q, Kc, O, z, scale, lam, prior=None, bias=None, local_lse=None, max_rows=None) -> torch.Tensor:
    """Ridge values ``[H, m, d]`` for kept keys ``Kc [H, m, d]`` so that the block reproduces, for queries
    ``Q [H, N, d]``, the full block's attention output ``O [H, N, d]`` (log-mass ``z [H, N]``: see
    :func:`~kvsculpt.core.attention.reference`); each query's error is weighted by the share of its attention
    on the block (:func:`block_weight`). ``prior [H, m, d]``: what the values shrink toward. ``max_rows``: fit
    on at most that many queries (:func:`fit_subset`). Solved through the smaller of the two systems
    (:func:`ridge_values`: ``cholesky`` on ``m × m``, O(N·m² + m³) per head, or ``dual`` on ``N × N`` when there
    are fewer queries than kept entries, O(N²·m + N³); the same solution)."""
    w = block_weight(z, local_lse)
    subset = None if max_rows is None else fit_subset(local_lse, Q.shape[1], max_rows)
    if subset is not None:
        rows, up = (t.to(Q.device) for t in subset)
        Q, O = Q[:, rows], O[:, rows]
        w = up.expand(Q.shape[0], -1) if w is None else w[:, rows] * up
    A = torch.softmax(logits(Q, Kc, scale, bias), dim=-1)
    return ridge_values(A, O, lam, prior, w, solver="dual" if A.shape[1] < A.shape[2] else "cholesky")


def stored_keys(heads, bits: int, group: int, dtype) -> torch.Tensor:
    """A layer's keys ``[Σ m_h, d]`` (fp32) as ``bits``-bit storage gives them back: the solved ``heads``' keys
    (per head ``(K' [m_h, d], V', β)``) flattened in ``dtype`` and quantised per channel in groups of ``group``
    entries of one head (:func:`~kvsculpt.core.quant.quantize_keys`: the same codes storage makes)."""
    flat = torch.cat([k.to(dtype) for k, _, _ in heads])
    return quantize_keys(flat, [k.shape[0] for k, _, _ in heads], bits, group).dequantize(torch.float32)


def refit_for_quantized_keys(heads, Q, O, z, scale, lam, bits, group, dtype, local_lse=None, max_rows=None):
    """Quantisation-aware values: one layer's solved ``heads`` (per head ``(K' [m_h, d], V' [m_h, d], β)``)
    with each head's values re-solved (:func:`fit_values`, shrunk toward the values it had) against its keys as
    ``bits``-bit storage will give them back: the flat keys in ``dtype``, quantised per channel in groups of
    ``group`` entries of one head (:func:`~kvsculpt.core.quant.quantize_keys`, as storage does: the same codes). Q, O ``[H, N, d]``, z and
    ``local_lse`` ``[H, N]``: the fit's queries and the full block's answers. Keys and β are returned as given."""
    stored = stored_keys(heads, bits, group, dtype)
    out, start = [], 0
    for h, (k, v, b) in enumerate(heads):
        kq = stored[start : start + k.shape[0]]
        start += k.shape[0]
        one = slice(h, h + 1)
        vq = fit_values(Q[one], kq[None], O[one], z[one], scale, lam, v[None].float(),
                        None if b is None else b[None].float(), None if local_lse is None else local_lse[one],
                        max_rows)[0]  # fmt: skip
        out.append((k, vq, b))
    return out


def weighted_error(Q, O, z, Kc, Vc, scale, bias=None, local_lse=None) -> torch.Tensor:
    """Relative output error ``[H]`` of the block ``(Kc, Vc, bias)`` against the full block's output ``O`` and
    log-mass ``z``, each query weighted as in :func:`fit_values` (by the share of its attention on the block)."""
    Oc = attend(Q, Kc, Vc, scale, bias)[0]
    w = block_weight(z, local_lse)
    w2 = torch.ones_like(z) if w is None else w**2
    return (w2[..., None] * (Oc - O) ** 2).sum((-2, -1)) / (w2[..., None] * O**2).sum((-2, -1)).clamp_min(
        1e-30
    )


def fit_generalises(
    Q, O, z, Kc, copied, scale, lam, prior=None, bias=None, local_lse=None, block=32
) -> torch.Tensor:
    """``[H]`` bool: whether fitted values beat ``copied`` ones on queries the fit did not see — two folds of
    alternating blocks of ``block`` queries, each fitted on one and judged on the other, errors summed
    (``O``, ``z``: the full block's output and log-mass for ``Q``)."""
    block = max(1, min(block, Q.shape[1] // 2))  # both folds non-empty
    fold = (torch.arange(Q.shape[1], device=Q.device) // block) % 2 == 0
    fitted_err = copied_err = 0.0
    for a, b in ((fold, ~fold), (~fold, fold)):
        loc_a, loc_b = (None, None) if local_lse is None else (local_lse[:, a], local_lse[:, b])
        Va = fit_values(Q[:, a], Kc, O[:, a], z[:, a], scale, lam, prior, bias, loc_a)
        fitted_err = fitted_err + weighted_error(Q[:, b], O[:, b], z[:, b], Kc, Va, scale, bias, loc_b)
        copied_err = copied_err + weighted_error(Q[:, b], O[:, b], z[:, b], Kc, copied, scale, bias, loc_b)
    return fitted_err < copied_err


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


def split_heldout(groups: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Boolean mask ``[N]``: True for queries of a random ``fraction`` of groups (held out from fitting)."""
    ids = torch.unique(groups)
    if ids.numel() < 2 or fraction <= 0:
        return torch.zeros_like(groups, dtype=torch.bool)
    k = max(1, int(round(fraction * ids.numel())))
    chosen = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))[:k]]
    return torch.isin(groups, chosen)
