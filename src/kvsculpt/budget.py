"""Budgets: how many entries each (layer, KV head) keeps.

``ratio`` is the fraction of entries **kept** (``m = round(ratio · n)``). kvpress's ``compression_ratio`` is
the fraction removed: ``ratio = 1 − compression_ratio``.
"""

from __future__ import annotations

import torch


def kept(n: int, ratio: float) -> int:
    """Entries kept per head under a uniform budget: ``round(ratio · n)``, at least 1."""
    check_ratio(ratio)
    return max(1, min(n, round(ratio * n)))


def check_ratio(ratio: float) -> None:
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio is the fraction of entries kept and must be in (0, 1]; got {ratio}")


def uniform(n: int, ratio: float, layers: int, kv_heads: int) -> list[list[int]]:
    m = kept(n, ratio)
    return [[m] * kv_heads for _ in range(layers)]


def allocate(difficulty: torch.Tensor, total: int, floor: int, cap: int, alpha: float = 1.0) -> torch.Tensor:
    """Integer budgets ``[L, H]`` ∝ ``difficulty^alpha``, clipped to ``[floor, cap]``, summing to ``total`` exactly.

    Water-filling finds the continuous budgets (clipping what binds and sharing the rest), then
    largest-remainder rounding makes them integers without breaking the caps.
    """
    e = torch.as_tensor(difficulty, dtype=torch.float64)
    count = e.numel()
    if alpha < 0:
        raise ValueError(f"alpha must be ≥ 0; got {alpha}")
    if (e < 0).any() or not torch.isfinite(e).all():
        raise ValueError("difficulties must be finite and ≥ 0")
    if not (floor * count <= total <= cap * count) or floor < 1 or cap < floor:
        raise ValueError(
            f"a total of {total} cannot be met by {count} heads with budgets in [{floor}, {cap}]"
        )
    w = e**alpha if alpha > 0 else torch.ones_like(e)
    w = torch.where(e > 0, w, torch.zeros_like(w))
    if w.sum() == 0:
        w = torch.ones_like(e)
    lo, hi = 0.0, 1.0
    while (w * hi).clamp(floor, cap).sum() < total:
        hi *= 2
    for _ in range(200):  # bisection on the water level
        mid = (lo + hi) / 2
        if (w * mid).clamp(floor, cap).sum() < total:
            lo = mid
        else:
            hi = mid
    x = (w * hi).clamp(floor, cap)
    base = x.floor().clamp(floor, cap)
    short = int(total - base.sum())
    frac = (x - base).flatten()
    room = base.flatten() < cap
    order = torch.argsort(torch.where(room, frac, torch.full_like(frac, -1.0)), descending=True)
    flat = base.flatten().clone()
    i = 0
    while short > 0:  # largest remainders first, then any head with room left
        j = order[i % count]
        if flat[j] < cap:
            flat[j] += 1
            short -= 1
        i += 1
    while short < 0:
        j = torch.argmax(torch.where(flat > floor, flat - x.flatten(), torch.full_like(flat, -1e9)))
        flat[j] -= 1
        short += 1
    return flat.reshape(e.shape).long()
