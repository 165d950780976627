"""Attention math shared by the solvers, the scorers and the registered attention function."""

from __future__ import annotations

import torch


def logits(Q: torch.Tensor, K: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention logits ``s·Q·Kᵀ + β``: Q ``[..., N, d]``, K ``[..., m, d]``, bias ``[..., m]`` → ``[..., N, m]``."""
    out = torch.matmul(Q, K.transpose(-1, -2)) * scale
    return out if bias is None else out + bias.unsqueeze(-2)


def attend(Q, K, V, scale: float, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of Q over (K, V): output ``[..., N, d]`` and log-mass ``z = logsumexp`` ``[..., N]``."""
    lg = logits(Q, K, scale, bias)
    z = torch.logsumexp(lg, dim=-1)
    return torch.matmul(torch.exp(lg - z.unsqueeze(-1)), V), z


def future_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """``[q_len, kv_len]`` bool, True where key j comes after query i, the queries being the last ``q_len``
    of the ``kv_len`` positions (causal attention masks exactly these)."""
    keys = torch.arange(kv_len, device=device)
    return keys[None, :] > torch.arange(kv_len - q_len, kv_len, device=device)[:, None]


def attention_weights(Q, K, scale: float, local_lse=None) -> torch.Tensor:
    """Softmax weights ``[H, N, n]`` of Q ``[H, N, d]`` over K ``[H, n, d]``. ``local_lse [H, N]``: each query's
    log-sum-exp over keys outside K that it also attends to; the softmax then includes them, so a query that
    mostly looks elsewhere gives K little weight."""
    lg = logits(Q, K, scale)
    z = torch.logsumexp(lg, -1, keepdim=True)
    if local_lse is not None:
        z = torch.logaddexp(z, local_lse[..., None])
    return torch.exp(lg - z)


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
