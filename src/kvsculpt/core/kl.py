"""The refine's loss: KL between a teacher kept as its top-k tokens plus one tail bucket and a student's full
distribution (a lower bound of the full KL, tight when the tail is small)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or in its own dtype if that is wider (fp64 for exactness checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def coarse(logits: torch.Tensor, k: int):
    """Teacher logits ``[..., V]`` → (top ids ``[..., k]``, their log-probs ``[..., k]``, tail log-prob ``[...]``)."""
    logp = F.log_softmax(at_least_fp32(logits), dim=-1)
    top_logp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top_ids.to(torch.int32), top_logp, log1mexp(torch.logsumexp(top_logp, dim=-1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, stable, clamped away from ``-inf`` (an empty tail)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))).clamp_min(-60.0)


def coarse_kl(top_ids, top_logp, tail_logp, student_logits) -> torch.Tensor:
    """KL between the teacher's and the student's coarse distributions (the teacher's top-k tokens and one tail
    bucket), per position: ``student_logits [B, T, V]`` → ``[B, T]``."""
    lq = F.log_softmax(at_least_fp32(student_logits), dim=-1)
    lq_top = lq.gather(-1, top_ids.long())
    lq_tail = log1mexp(torch.logsumexp(lq_top, dim=-1))
    top = (top_logp.exp() * (top_logp - lq_top)).sum(-1)
    return top + tail_logp.exp() * (tail_logp - lq_tail)
