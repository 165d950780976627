"""A learned scorer: each entry's score predicted from what one plain prefill gives, by a linear model per layer
and KV head, fitted by ridge regression to the default's scores (``method="learned"``, ``kvsculpt
train-scorer``).

Features of entry ``t`` of KV head ``h`` in layer ``l`` (``F = D + 6``)::

    x = [ h_t / ‖h_t‖·√D  (D: the layer's attention input, after its norm),
          log ρ_t, log κ_t, log a_t, log(1 + t), log(n − t), 1 ]

``ρ_t = ‖v_t‖ / mean ‖v‖`` and ``κ_t = ‖k_t‖ / mean ‖k‖`` are the entry's value and key norms relative to its
head's; ``a_t`` the attention the context's last :data:`WINDOW` queries give it (summed, SnapKV's window). The
prediction is ``log score = x · w[l, h]``. The target is the log of the default's global entry score (KVzip's
peak attention from its repeat and self queries, times ``ρ^0.5``), floored at :data:`LOG_FLOOR`; the sinks it
always keeps are left out of the fit and kept by the learned method too. Chosen by
``benchmarks/learned_features.py`` (the recall of the default's selection on held-out windows: 0.76 with the
hidden states and ρ alone, 0.79 with the window and the norms, 0.80 with the position).

Training is a sum of sufficient statistics (``XᵀX [L, H, F, F]``, ``Xᵀy [L, H, F]`` in fp64), so windows can be
added one at a time (resumable, and a learning curve is free) and the solve is one ``F × F`` system per head.
Cost at inference: O(n · D · H) per layer for the hidden part, O(W · n · d) for the window, on top of the
prefill's O(n · D²).
"""

from __future__ import annotations

import math

import torch

from .attention import future_mask, logits

LOG_FLOOR = math.log(1e-6)  # targets below this are clipped: entries that low are never kept
WINDOW = 64  # the context's last queries whose attention is a feature
EXTRA = 6  # features beyond the hidden state: ρ, κ, a, two positions, the intercept


def unit_rows(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [n, D]`` in fp32, each row scaled to norm √D."""
    h = hidden.float()
    return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(h.shape[-1])


def rel_log(x: torch.Tensor) -> torch.Tensor:
    """``log(x / mean x)`` along the last axis, ``x [..., n] > 0``."""
    return (x / x.mean(-1, keepdim=True).clamp_min(1e-30)).clamp_min(1e-30).log()


def window_attention(tail: torch.Tensor, keys: torch.Tensor, scale: float, groups: int) -> torch.Tensor:
    """The attention ``[H, n]`` the context's last :data:`WINDOW` queries give each entry, summed over them and
    the GQA group: ``tail [H, groups·t, d]`` (the last t ≥ WINDOW positions' queries, GQA heads pooled, as
    ``hf.capture.pool_gqa`` orders them), ``keys [H, n, d]``. O(groups · WINDOW · n · d) per head."""
    H, n, d = keys.shape
    w = min(WINDOW, n)
    q = tail.float().reshape(H, groups, -1, d)[:, :, -w:]
    lg = logits(q, keys.float()[:, None], scale).masked_fill(future_mask(w, n, keys.device), float("-inf"))
    return torch.softmax(lg, -1).sum((1, 2))


def extra_features(
    keys: torch.Tensor, values: torch.Tensor, window: torch.Tensor, start: int = 0
) -> torch.Tensor:
    """The features beyond the hidden state, ``[H, n, EXTRA]``, from ``keys, values [H, n, d]`` and the window
    attention ``[H, n]`` (:func:`window_attention`). ``start``: the context's position of the first entry (a
    part read after ``start`` tokens: positions count from the context's start, distances from the part's end)."""
    H, n, _ = keys.shape
    pos = torch.arange(start, start + n, dtype=torch.float32, device=keys.device)
    cols = [rel_log(values.float().norm(dim=-1)), rel_log(keys.float().norm(dim=-1)),
            window.float().clamp_min(1e-8).log(), torch.log1p(pos).expand(H, n),
            torch.log1p(start + n - 1 - pos).expand(H, n),
            torch.ones(H, n, device=keys.device)]  # fmt: skip
    return torch.stack(cols, -1)


def features(
    hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """``hidden [n, D]`` (a layer's attention input), ``keys, values [H, n, d]``, ``window [H, n]`` → features
    ``[H, n, D + EXTRA]`` (fp32)."""
    extra = extra_features(keys, values, window)
    H, n, _ = extra.shape
    return torch.cat([unit_rows(hidden).to(extra.device).expand(H, n, -1), extra], -1)


def hidden_part(weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The part of the prediction read from the hidden states alone, ``[H, n]``: what a prefill hook computes
    as each layer runs, so the hidden states are never kept. ``weights [H, F]``, ``hidden [n, D]``."""
    return (unit_rows(hidden) @ weights[:, :-EXTRA].float().to(hidden.device).T).T


def predict(
    weights: torch.Tensor, hidden_scores: torch.Tensor, keys, values, window, start: int = 0
) -> torch.Tensor:
    """Predicted log scores ``[H, n]`` of one layer from :func:`hidden_part`'s ``[H, n]`` and the rest
    (:func:`extra_features`, ``start`` its first position); equal to ``features(hidden, keys, values, window) @
    weights``."""
    w = weights.float().to(keys.device)
    extra = extra_features(keys, values, window, start)
    return hidden_scores.to(keys.device) + (extra @ w[:, -EXTRA:, None])[..., 0]


def target(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression target of the default's entry scores ``[H, n]``: ``(log scores floored [H, n], which
    entries count [H, n] bool)``; entries always kept (+inf: the sinks) do not count."""
    finite = torch.isfinite(scores)
    y = scores.float().clamp_min(1e-30).log().clamp_min(LOG_FLOOR)
    return torch.where(finite, y, torch.zeros_like(y)), finite


def add_stats(
    XtX: torch.Tensor, Xty: torch.Tensor, X: torch.Tensor, y: torch.Tensor, use: torch.Tensor
) -> None:
    """Add one layer's examples to its statistics in place: ``XtX [H, F, F]``, ``Xty [H, F]`` (fp64) from
    ``X [H, n, F]``, ``y [H, n]`` and the mask ``use [H, n]``. O(H · n · F²)."""
    Xm = (X * use[..., None]).double()
    XtX += Xm.transpose(-1, -2) @ Xm
    Xty += (Xm * y.double()[..., None]).sum(1)


def solve(XtX: torch.Tensor, Xty: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """Ridge weights ``[..., F]`` from the statistics ``XtX [..., F, F]``, ``Xty [..., F]``: the penalty is
    ``lam`` times the mean diagonal of each head's ``XtX`` on every weight but the intercept (the last)."""
    F = XtX.shape[-1]
    reg = lam * XtX.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(F, dtype=XtX.dtype, device=XtX.device)
    eye[-1, -1] = 0.0
    A = XtX + reg[..., None, None] * eye
    return torch.linalg.solve(A, Xty[..., None])[..., 0].float()
