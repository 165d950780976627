"""Budgets: how many entries each (layer, KV head) keeps. A rule is a small object with one ``plan()``.

``ratio`` is the fraction of entries **kept** (``m = round(ratio · n)``). kvpress's ``compression_ratio`` is
the fraction removed: ``ratio = 1 − compression_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _water_fill(size_at, total: int, floor: int, cap: int) -> torch.Tensor:
    """Continuous budgets ``size_at(level)`` clipped to ``[floor, cap]``, with the level set by bisection so
    they sum to ``total``; ``size_at`` must grow with the level."""
    lo, hi = 0.0, 1.0
    while size_at(hi).clamp(floor, cap).sum() < total and hi < 1e300:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if size_at(mid).clamp(floor, cap).sum() < total:
            lo = mid
        else:
            hi = mid
    return size_at(hi).clamp(floor, cap)


def _round_to_total(x: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """Largest-remainder rounding of continuous budgets ``x`` to integers in ``[floor, cap]`` summing to ``total``."""
    flat_x = x.flatten()
    flat = flat_x.floor().clamp(floor, cap)
    short = int(total - flat.sum())
    frac = torch.where(flat < cap, flat_x - flat, torch.full_like(flat_x, -1.0))
    order = torch.argsort(frac, descending=True)
    i = 0
    while short > 0:  # largest remainders first, then any head with room left
        j = order[i % flat.numel()]
        if flat[j] < cap:
            flat[j] += 1
            short -= 1
        i += 1
    while short < 0:  # (only when clipping pushed the floors above the total's share)
        j = torch.argmax(torch.where(flat > floor, flat - flat_x, torch.full_like(flat, -1e9)))
        flat[j] -= 1
        short += 1
    return flat.reshape(x.shape).long()


def _check_total(count: int, total: int, floor: int, cap: int) -> None:
    if floor < 1 or cap < floor or not (floor * count <= total <= cap * count):
        raise ValueError(
            f"a total of {total} cannot be met by {count} heads with budgets in [{floor}, {cap}]"
        )


def allocate(difficulty: torch.Tensor, total: int, floor: int, cap: int, alpha: float = 1.0) -> torch.Tensor:
    """Integer budgets ``[L, H]`` ∝ ``difficulty^alpha``, clipped to ``[floor, cap]``, summing to ``total`` exactly.

    Water-filling finds the continuous budgets (clipping what binds and sharing the rest), then
    largest-remainder rounding makes them integers without breaking the caps. Zero difficulty gets the floor.
    """
    e = torch.as_tensor(difficulty, dtype=torch.float64)
    if alpha < 0:
        raise ValueError(f"alpha must be ≥ 0; got {alpha}")
    if (e < 0).any() or not torch.isfinite(e).all():
        raise ValueError("difficulties must be finite and ≥ 0")
    _check_total(e.numel(), total, floor, cap)
    w = torch.where(e > 0, e**alpha, torch.zeros_like(e))
    if w.sum() == 0:
        w = torch.ones_like(e)
    return _round_to_total(_water_fill(lambda level: w * level, total, floor, cap), total, floor, cap)


def fit_curves(budgets: list[int], errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head ``e(m) ≈ a · m^(−b)`` by least squares in log-log: errors ``[K, L, H]`` at ``K`` budgets → a, b."""
    x = torch.log(torch.tensor(budgets, dtype=torch.float64))
    y = torch.log(torch.as_tensor(errors, dtype=torch.float64).clamp_min(1e-12))
    xc = x - x.mean()
    slope = (xc[:, None, None] * (y - y.mean(0))).sum(0) / (xc**2).sum()
    b = (-slope).clamp(0.05, 8.0)
    log_a = y.mean(0) + b * x.mean()
    return log_a.exp(), b


def allocate_curves(a: torch.Tensor, b: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """Integer budgets minimising ``Σ a·m^(−b)`` at a fixed total: equal marginal gains ``a·b·m^(−b−1)``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    _check_total(a.numel(), total, floor, cap)
    # m(level) = (a·b·level)^(1/(b+1)) grows with level (level = 1/λ).
    return _round_to_total(
        _water_fill(lambda level: (a * b * level).clamp_min(0) ** (1 / (b + 1)), total, floor, cap),
        total,
        floor,
        cap,
    )


def allocate_global(scores: torch.Tensor, total: int, floor: int) -> torch.Tensor:
    """KVzip's allocation: every entry of every head ranked together by ``scores [L, H, n]``; a head keeps as
    many entries as it has among the ``total`` best, but at least ``floor`` (its own best). → ``[L, H]``."""
    L, H, n = scores.shape
    _check_total(L * H, total, floor, n)
    s = scores.detach().double().clone()
    s.scatter_(-1, s.topk(floor, dim=-1).indices, float("inf"))  # each head's floor is kept first
    chosen = s.flatten().topk(total).indices // n
    return torch.bincount(chosen, minlength=L * H).reshape(L, H)


def allocate_running(
    held: list[list[torch.Tensor]] | None, scores: torch.Tensor, total: int, floor: int
) -> tuple[list[list[torch.Tensor]] | None, torch.Tensor]:
    """KVzip's global rule for a reader (compress while reading): the entries a block already holds and those
    of the next part ranked together, so budget moves between parts as it moves between heads. ``held[l][h]``
    ``[m_lh]``: the scores of the entries the block holds, in its order (None before the first part); ``scores``
    ``[L, H, c]``: the part's. The best ``total`` of all are kept; each head keeps at least ``floor`` of the
    part's entries (its best). → (per layer and head a bool mask ``[m_lh]`` of the held entries still kept, or
    None; the part's budgets ``[L, H]``). O((m + c) · L · H)."""
    L, H, c = scores.shape
    part = scores.detach().double().clone()
    part.scatter_(-1, part.topk(min(floor, c), dim=-1).indices, float("inf"))
    width = 0 if held is None else max(x.numel() for row in held for x in row)
    pool = torch.full((L, H, width), float("-inf"), dtype=torch.float64)
    for li in range(L if held is not None else 0):
        for h in range(H):
            pool[li, h, : held[li][h].numel()] = held[li][h].double()
    everything = torch.cat([pool, part], -1)
    real = int(torch.isfinite(everything).sum() + torch.isposinf(everything).sum())
    if not (min(floor, c) * L * H <= total <= real):
        raise ValueError(f"a total of {total} cannot be kept from {real} entries with {floor} per head")
    chosen = torch.zeros(everything.numel(), dtype=torch.bool)
    chosen[everything.flatten().topk(total).indices] = True
    chosen = chosen.reshape(everything.shape)
    keep = (
        None
        if held is None
        else [[chosen[li, h, : held[li][h].numel()] for h in range(H)] for li in range(L)]
    )
    return keep, chosen[..., width:].sum(-1)


def head_floor(n: int, m: int, floor: int | None = None) -> int:
    """The smallest budget a non-uniform rule gives a head: ``floor`` (default n/64), at most the uniform budget."""
    return max(1, min(m, n // 64 if floor is None else floor))


@dataclass
class Uniform:
    """Every (layer, KV head) keeps ``round(ratio·n)`` entries."""

    def plan(self, n, ratio, layers, kv_heads, pilot=None, entry_scores=None):
        return uniform(n, ratio, layers, kv_heads), {}


@dataclass
class Global:
    """KVzip's rule: every entry of every head ranked together by the method's own entry scores
    (``entry_scores() -> [L, H, n]``, the same ranking its selection uses, so sinks and recent positions that
    the method always keeps are counted); each head keeps what it has among the best ``round(ratio·n)·L·H``,
    at least ``floor`` (default n/64). ``scope="heads"`` ranks within each layer. No pilot."""

    scope: str = "all"
    floor: int | None = None

    def __post_init__(self):
        if self.scope not in ("all", "heads"):
            raise ValueError(
                f"global allocation ranks entries within heads: scope 'all' or 'heads', not {self.scope!r}"
            )

    def plan(self, n, ratio, layers, kv_heads, pilot=None, entry_scores=None):
        m = kept(n, ratio)
        floor = head_floor(n, m, self.floor)
        scores = torch.as_tensor(entry_scores())
        if self.scope == "all":
            out = allocate_global(scores, m * layers * kv_heads, floor)
        else:
            out = torch.stack(
                [allocate_global(scores[li : li + 1], m * kv_heads, floor)[0] for li in range(layers)]
            )
        return out.tolist(), {"rule": "global", "scope": self.scope, "uniform_budget": m}


@dataclass
class _PilotRule:
    """Rules that run a pilot (``pilot(m) -> [L, H]``: each head's relative error when every head keeps ``m``)."""

    scope: str = "all"
    floor: int | None = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose from {', '.join(SCOPES)}")

    def sizes(self, n: int, m: int, floor: int) -> list[int]:
        raise NotImplementedError

    def solve(self, sizes, errors, total, floor, cap) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, n, ratio, layers, kv_heads, pilot=None, entry_scores=None):
        m = kept(n, ratio)
        floor = head_floor(n, m, self.floor)
        sizes = self.sizes(n, m, floor)
        errors = torch.stack([torch.as_tensor(pilot(s), dtype=torch.float64) for s in sizes])  # [K, L, H]
        record = {"rule": type(self).__name__.lower(), "scope": self.scope, "uniform_budget": m,
                  "pilot_budgets": sizes, "pilot_errors": errors.tolist(), **self.record()}  # fmt: skip
        if self.scope == "all":
            out = self.solve(sizes, errors, m * layers * kv_heads, floor, n)
        elif self.scope == "heads":
            out = torch.stack(
                [self.solve(sizes, errors[:, li : li + 1], m * kv_heads, floor, n)[0] for li in range(layers)]
            )
        else:
            out = self.solve(sizes, errors.mean(-1, keepdim=True), m * layers, floor, n).expand(
                layers, kv_heads
            )
        return out.tolist(), record

    def record(self) -> dict:
        return {}


@dataclass
class Adaptive(_PilotRule):
    """The paper's rule: ``m ∝ e^alpha`` from the pilot error ``e`` at the uniform budget."""

    alpha: float = 1.0

    def sizes(self, n, m, floor):
        return [m]

    def solve(self, sizes, errors, total, floor, cap):
        return allocate(errors[0], total, floor, cap, self.alpha)

    def record(self):
        return {"alpha": self.alpha}


@dataclass
class Curves(_PilotRule):
    """The pilot at ``m/2, m, 2m`` fits ``e(m) = a·m^(−b)`` per head; budgets equalise the marginal gains."""

    def sizes(self, n, m, floor):
        return sorted({max(floor, m // 2), m, min(n, 2 * m)})

    def solve(self, sizes, errors, total, floor, cap):
        a, b = fit_curves(sizes, errors)
        return allocate_curves(a, b, total, floor, cap)


RULES = {"global": Global, "curves": Curves, "uniform": Uniform, "adaptive": Adaptive}
SCOPES = ("all", "heads", "layers")
