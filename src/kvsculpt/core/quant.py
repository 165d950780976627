"""Low-bit storage of a compressed block: asymmetric uniform quantisation in groups, codes packed for real.

The layout is KIVI's: keys are quantised **per channel** (each channel's scale and zero-point shared by a group
of ``group`` consecutive entries of one head: a head's entries are padded to a whole number of groups, since
heads mixed in one group quantise far worse — SmolLM2, r = 0.3, 4-bit keys: KL 0.0099 against 0.0178), values
**per token** (each entry's scale and zero-point shared by a group of ``group`` consecutive channels). A code of ``bits`` bits is ``round((x − min) / scale)``, ``scale = (max −
min) / (2^bits − 1)`` over its group; ``8 / bits`` codes share a byte; scales and minima are stored in fp16.
A head shorter than a group gets one short group: only real elements' codes are stored, so the codes take
exactly ``R·C·bits / 8`` bytes (rounded up to a byte), plus 4 bytes a group for the scale and minimum.
Reconstruction error per element is at most ``scale / 2`` (plus fp16 rounding of the scale and minimum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4, 2)  # packed widths; 16 means "not quantised" everywhere else (the model's dtype)
AXES = ("channel", "token")  # keys: per channel (groups of entries); values: per token (groups of channels)


@dataclass
class Quantized:
    """A ``[R, C]`` tensor in ``bits``-bit codes: ``codes`` (uint8, ``8 / bits`` codes a byte), ``scale`` and
    ``low`` (fp16, one per group), the original ``shape`` and ``dtype``. ``axis="channel"``: groups of ``group``
    rows share a channel's scale (``scale [C, ⌈R/group⌉]``); ``axis="token"``: groups of ``group`` columns share a
    row's (``scale [R, ⌈C/group⌉]``). ``segments``: for ``axis="channel"``, the lengths of the runs of rows
    (heads) that never share a group, each padded to whole groups (None: one run)."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    group: int
    axis: str
    shape: tuple[int, int]
    dtype: torch.dtype
    segments: tuple[int, ...] | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> list[torch.Tensor]:
        """What is stored: the packed codes, the scales and the minima."""
        return [self.codes, self.scale, self.low]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device) -> Quantized:
        return Quantized(*(t.to(device) for t in self.tensors()), self.bits, self.group, self.axis, self.shape,
                         self.dtype, self.segments)  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[R, C]`` tensor the codes stand for, in ``dtype`` (default: the original dtype)."""
        rows, groups = self.scale.shape
        real = self._real().to(self.codes.device)
        codes = torch.zeros(rows, groups * self.group, device=self.codes.device)
        codes[:, real] = unpack(self.codes, self.bits)[: rows * real.numel()].view(rows, -1).float()
        x = codes.view(rows, groups, self.group) * self.scale.float()[..., None] + self.low.float()[..., None]
        x = x.view(rows, -1)[:, real]
        return (x.t() if self.axis == "channel" else x).to(dtype or self.dtype).contiguous()

    def _real(self) -> torch.Tensor:
        """Where the real elements of a row sit among the padded groups (padding's codes are not stored)."""
        R, C = self.shape
        return _real_rows(R, self.group, self.segments) if self.axis == "channel" else torch.arange(C)


def _real_rows(R: int, group: int, segments) -> torch.Tensor:
    """Where the ``R`` real rows sit among the padded ones (each segment padded to whole groups)."""
    starts, out = 0, []
    for m in segments or (R,):
        out.append(torch.arange(starts, starts + m))
        starts += -(-m // group) * group
    return torch.cat(out)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[..., k]`` (uint8 below ``2^bits``; ``k·bits`` a multiple of 8) → bytes ``[k·bits/8]`` (flat),
    the first code in the lowest bits."""
    per = 8 // bits
    c = codes.reshape(-1, per).to(torch.uint8)
    out = torch.zeros(c.shape[0], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[:, i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: bytes ``[b]`` → codes ``[b · 8 / bits]`` (uint8)."""
    per, mask = 8 // bits, (1 << bits) - 1
    return torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=-1).reshape(-1)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, segments=None) -> Quantized:
    """``x [R, C]`` → :class:`Quantized` (see the module's docstring for the layout; ``segments``: the lengths
    of the runs of rows that never share a group, for ``axis="channel"``)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (16: not quantised); got {bits}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}; got {axis!r}")
    if group < 1 or (group * bits) % 8:
        raise ValueError(
            f"group must be a positive multiple of {8 // bits} for {bits}-bit codes; got {group}"
        )
    R, C = x.shape
    if segments is not None:
        segments = tuple(int(m) for m in segments)
        if axis != "channel" or sum(segments) != R or min(segments) < 1:
            raise ValueError(
                f"segments {segments} must be positive lengths summing to {R}, for axis='channel'"
            )
    y = (x.t() if axis == "channel" else x).float()  # groups run along the last dim
    parts, start = [], 0
    for m in segments or (
        y.shape[1],
    ):  # each run padded by repeating its last element: min and max unchanged
        run = y[:, start : start + m]
        parts += [run, run[:, -1:].expand(-1, -m % group)]
        start += m
    y = torch.cat(parts, dim=1)
    g = y.view(y.shape[0], -1, group)
    low = g.amin(-1).half()
    scale = ((g.amax(-1) - low.float()) / (2**bits - 1)).half()
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
    codes = ((g - low.float()[..., None]) / safe).round_().clamp_(0, 2**bits - 1).view(g.shape[0], -1)
    q = Quantized(codes, scale, low, bits, group, axis, (R, C), x.dtype, segments)
    stream = codes[:, q._real().to(codes.device)].reshape(-1)  # the padding's codes are dropped
    q.codes = pack(torch.nn.functional.pad(stream, (0, -stream.numel() % (8 // bits))), bits)
    return q


def quantize_keys(keys: torch.Tensor, lengths, bits: int, group: int = 64) -> Quantized:
    """A layer's flat keys ``[Σ m_h, d]`` (heads of ``lengths`` entries) per channel, in groups of ``group``
    entries of one head. Deterministic: the same keys give the same codes (compression's quantisation-aware
    value fit relies on it)."""
    return quantize(keys, bits, group, "channel", segments=lengths)


def quantize_values(values: torch.Tensor, bits: int, group: int = 64) -> Quantized:
    """A layer's flat values ``[Σ m_h, d]`` per token, in groups of ``group`` channels."""
    return quantize(values, bits, group, "token")


def max_error(q: Quantized) -> float:
    """The largest reconstruction error :func:`quantize` allows for ``q``: half a step, plus what the fp16
    rounding of the minimum (relative error ``u = 2^-11``) and of the step (``u`` over ``2^bits − 1`` steps)
    can add, with 1 % to spare for fp32 arithmetic."""
    s, lo, u = q.scale.float(), q.low.float(), torch.finfo(torch.float16).eps / 2
    return float((1.01 * (s * (0.5 + u * (2**q.bits - 1)) + u * lo.abs())).max())
