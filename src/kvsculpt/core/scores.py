"""Scorers: how much each original entry is worth keeping. A scorer only scores (as a kvpress press does);
budgets, selection and value fits live in :mod:`kvsculpt.core.methods` and :mod:`kvsculpt.core.budget`.

Every scorer is a small dataclass called as::

    scorer(K [H, n, d], V [H, n, d], Q [H, N, d], scale, context_queries [H, G, n, d] | None,
           local_lse [H, N] | None, ref: Reference | None) -> scores [H, n]   (higher is kept first; +inf is kept)

``K, V`` are the block's keys and values; ``Q`` the reference queries; ``context_queries`` the context's own causal prefill queries, per GQA head
(only SnapKV and TOVA need them); ``local_lse`` each reference query's log-mass on keys outside the block;
``ref`` the :class:`~kvsculpt.core.attention.Reference` of ``Q`` on ``K`` if already computed (the scorers that
read attention from the reference queries take their scores from it instead of computing them again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Reference, future_mask, logits, reference


class Scorer:
    needs_context_queries = False
    uses_reference = False  # whether it scores from the reference queries' attention (a Reference)

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None) -> torch.Tensor:
        raise NotImplementedError


def _reference(K, Q, scale, local_lse, ref: Reference | None) -> Reference:
    return reference(Q, K, None, scale, local_lse) if ref is None else ref


def value_weighted(scores: torch.Tensor, V: torch.Tensor, power: float) -> torch.Tensor:
    """Scores ``[H, n]`` times each entry's value norm relative to its head's mean, to the ``power`` (as
    ExpectedAttention weighs attention by ``‖v‖``): an entry that is attended but moves the output little (a
    near-zero value) ranks lower. Relative to the head, so heads and layers with larger values do not take
    budget from the others in a global ranking (absolute norms did, and cost 1.6–3.5× in KL on SmolLM2)."""
    if power == 0:
        return scores
    norm = V.norm(dim=-1)
    return scores * (norm / norm.mean(-1, keepdim=True).clamp_min(1e-30)).pow(power)


def keep_recent(scores: torch.Tensor, w: int) -> torch.Tensor:
    """Scores ``[H, n]`` with the last ``w`` positions raised to +inf (in place), so that top-m keeps them."""
    if w > 0:
        scores[:, -w:] = float("inf")
    return scores


def keep_sinks(scores: torch.Tensor, sinks: int) -> torch.Tensor:
    """Scores ``[H, n]`` with the first ``sinks`` positions raised to +inf (in place)."""
    if sinks > 0:
        scores[:, :sinks] = float("inf")
    return scores


@dataclass
class H2O(Scorer):
    """Attention each entry receives, summed over the reference queries (H2O with ``queries="context"``; the
    paper's Select+Fit selection with fitted values)."""

    uses_reference = True

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        return _reference(K, Q, scale, local_lse, ref).total.clone()


@dataclass
class KVzip(Scorer):
    """The largest attention weight any one reference query gives the entry (KVzip's rule, with
    ``queries="repeat"``: a key that any one position of the reconstruction needs is kept), times the entry's
    value norm to ``value_power`` (0: KVzip's rule as published); the first ``sinks`` entries are always kept."""

    sinks: int = 4
    value_power: float = 0.0
    uses_reference = True

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        peak = value_weighted(_reference(K, Q, scale, local_lse, ref).peak, V, self.value_power)
        return keep_sinks(peak.clone(), self.sinks)


@dataclass
class ValueKVzip(KVzip):
    """:class:`KVzip` weighted by the square root of each entry's relative value norm (``value_power=0.5``,
    :func:`value_weighted`): on Qwen2.5-Coder-0.5B at r = 0.1 the plain peak keeps attended entries whose values
    are near zero."""

    value_power: float = 0.5


def _window_scores(K, context_queries, scale, w: int) -> torch.Tensor:
    """Attention ``[H, n]`` from the context's last ``w`` causal queries, summed over them and the GQA group."""
    n = K.shape[1]
    cq = context_queries[:, :, -w:]  # [H, G, w, d]
    lg = logits(cq, K[:, None], scale).masked_fill(future_mask(w, n, K.device), float("-inf"))
    return torch.softmax(lg, -1).sum((1, 2))


@dataclass
class SnapKV(Scorer):
    """Attention from the context's last ``window`` positions, pooled over the GQA heads and smoothed by a 1-D
    average pool (kernel 5); the window itself is always kept."""

    window: int = 64
    needs_context_queries = True

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        w = min(K.shape[1], self.window)
        s = _window_scores(K, context_queries, scale, w)
        s = F.avg_pool1d(s[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
        return keep_recent(s, w)


@dataclass
class TOVA(Scorer):
    """Attention from the context's last position (pooled over the GQA heads); that position is kept."""

    needs_context_queries = True

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        return keep_recent(_window_scores(K, context_queries, scale, 1), 1)


@dataclass
class StreamingLLM(Scorer):
    """The first ``sinks`` entries and the most recent ones."""

    sinks: int = 4

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        H, n, _ = K.shape
        return keep_sinks(
            torch.arange(n, device=K.device, dtype=torch.float32).expand(H, n).clone(), self.sinks
        )


@dataclass
class Knorm(Scorer):
    """The lowest key norms."""

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        return -K.norm(dim=-1)


@dataclass
class Random(Scorer):
    """Uniformly random (a floor for the others)."""

    seed: int = 0

    def __call__(self, K, V, Q, scale, context_queries=None, local_lse=None, ref=None):
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(K.shape[0], K.shape[1], generator=gen).to(K.device)


SCORERS: dict[str, type[Scorer]] = {
    "kvzip": KVzip,
    "kvzip-v": ValueKVzip,
    "h2o": H2O,
    "snapkv": SnapKV,
    "tova": TOVA,
    "streaming-llm": StreamingLLM,
    "knorm": Knorm,
    "random": Random,
}


def top_indices(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Indices ``[H, m]`` of the ``m`` highest scores per head, in original order."""
    return scores.topk(m, dim=-1).indices.sort(dim=-1).values


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [H, m]`` of ``x [H, n, d]`` → ``[H, m, d]``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
