"""Attention math shared by the solvers, the scorers and the registered attention function."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def logits(Q: torch.Tensor, K: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention logits ``s·Q·Kᵀ + β``: Q ``[..., N, d]``, K ``[..., m, d]``, bias ``[..., m]`` → ``[..., N, m]``.
    The scale is applied to Q (N·d multiplies, not N·m: one pass less over the logits)."""
    out = torch.matmul(Q * scale, K.transpose(-1, -2))
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


@dataclass
class Reference:
    """What the full block gives each reference query, and what each entry receives, for one layer's heads.

    ``O [H, N, d]`` and ``z [H, N]``: each query's attention output over the block and its log-mass (None when
    no values were given); ``peak [H, n]`` and ``total [H, n]``: the largest and the summed attention weight
    an entry gets from any query, each weight scaled by the share of the query's attention that falls on the
    block (all of it unless ``local_lse`` was given) — KVzip's and H2O's scores."""

    O: torch.Tensor | None
    z: torch.Tensor
    peak: torch.Tensor
    total: torch.Tensor

    def take(self, idx: torch.Tensor) -> Reference:
        """The heads ``idx``."""
        return Reference(
            None if self.O is None else self.O[idx], self.z[idx], self.peak[idx], self.total[idx]
        )


def reference(Q, K, V=None, scale: float = 1.0, local_lse=None, chunk: int = 512) -> Reference:
    """:class:`Reference` of queries ``Q [H, N, d]`` on the block ``K, V [H, n, d]`` in one pass over the logits,
    ``chunk`` queries at a time (bounded memory; each chunk's ``[H, chunk, n]`` logits are reused in place for
    the output, the log-mass and both scores). ``local_lse [H, N]``: each query's log-sum-exp over keys outside
    the block that it also attends to (a repeat query's prompt and copy so far); a weight is then the share of
    all its attention, so a query that mostly looks elsewhere gives the block little weight."""
    H, N, _ = Q.shape
    n = K.shape[1]
    z = Q.new_empty(H, N)
    O = None if V is None else Q.new_empty(H, N, V.shape[-1])
    peak, total = Q.new_zeros(H, n), Q.new_zeros(H, n)
    for a in range(0, N, chunk):
        p = logits(Q[:, a : a + chunk], K, scale)  # [H, c, n], turned into the softmax in place
        top = p.amax(-1, keepdim=True)
        mass = p.sub_(top).exp_().sum(-1, keepdim=True)
        p.div_(mass)
        zc = (top + mass.log())[..., 0]
        z[:, a : a + chunk] = zc
        if O is not None:
            O[:, a : a + chunk] = torch.matmul(p, V)
        if local_lse is not None:  # the share of the query's attention on the block
            p.mul_(torch.sigmoid(zc - local_lse[:, a : a + chunk])[..., None])
        torch.maximum(peak, p.amax(1), out=peak)
        total += p.sum(1)
    return Reference(O, z, peak, total)


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


def local_lse(q: torch.Tensor, local_k: torch.Tensor, scale: float, chunk: int = 256) -> torch.Tensor:
    """Log-sum-exp of the last ``t`` queries ``q [1, H, t, d]`` over the local keys ``[Hkv, s, d]`` they see
    causally (``s ≥ t``; query i sees the first ``s − t + i + 1``) → ``[1, H, t]``. ``chunk`` queries at a time,
    each against only the keys it can see (bounded memory, half the work of the full square)."""
    _, H, t, d = q.shape
    Hkv, s_len, _ = local_k.shape
    G = H // Hkv
    qg = q[0].reshape(Hkv, G, t, d)
    out = q.new_empty(Hkv, G, t, dtype=torch.promote_types(q.dtype, torch.float32))
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        seen = s_len - t + b  # the keys the chunk's last query sees
        rows = qg[:, :, a:b].float().reshape(Hkv, G * (b - a), d)  # one batched matmul per KV head
        lg = logits(rows, local_k[:, :seen].float(), scale).view(Hkv, G, b - a, seen)
        lg.masked_fill_(future_mask(b - a, seen, q.device), float("-inf"))
        top = lg.amax(-1, keepdim=True)
        out[:, :, a:b] = (lg.sub_(top).exp_().sum(-1, keepdim=True).log_() + top)[..., 0]
    return out.reshape(1, H, t)
