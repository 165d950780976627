"""The compressed cache: variable-length heads with a per-entry bias, used as a ``transformers`` Cache.

Per layer, the compressed block is stored flat: keys ``[Σ m_h, d]``, values ``[Σ m_h, d]``, bias ``[Σ m_h]``
(optional) and the head lengths ``m_h``. Nothing is padded in storage. During a forward pass the block is
viewed (uniform heads, no copy) or padded (variable heads) to ``[Hkv, max m_h, d]``, with ``-inf`` bias on
padding, once per generation, and **shared by every row of a batch** (never copied per row: the attention
reads it once for all rows); tokens appended after it are concatenated per row as in a ``DynamicCache``.
The attention finds the block on the appended keys it is handed (:data:`~kvsculpt.hf.attention.BLOCK_ATTR`).

The logical length stays ``n``: new tokens get positions ``n, n+1, …`` whatever the ``m_h``. The cache holds
state only: the model's attention is switched by whoever hands it a cache (:func:`kvsculpt.compress`,
:func:`kvsculpt.load_cache`, :func:`~kvsculpt.hf.decode.full_cache`; ``kvsculpt.load_model`` loads models with
it), and saving and loading are :mod:`kvsculpt.cache_io`'s.

A decode budget (:meth:`CompressedCache.fork` with ``decode_budget``) bounds the cache while generating. With
``scope="all"`` (the default) it bounds the whole cache: each head holds at most ``max m_h + decode_budget``
entries, and the fork takes the block over as its own leading entries at its first token (a copy per row; the
shared block is untouched), so a cut may drop the context's entries as well as generated ones. With
``scope="appended"`` the block is kept whole and each head keeps at most ``decode_budget`` appended tokens.
``context_floor=f`` (scope ``"all"``) sits between the two: a cut keeps at least ``⌈f · m_h⌉`` of each head's
context entries (the best-scored), so an answer that reaches a part of the context late still finds it.
When the next tokens would pass the bound, the entries that may be cut are cut to leave room for ``every`` more
before the next cut: the most recent ``min(every, half)`` stay, and the rest are those with the most attention
from the queries that have read them so far (the generation's own queries; the attention adds each forward's
probabilities to the layer's scores).
Then, unless ``refit=False``, the kept tokens' values are refitted by ridge least squares (toward their copies)
so that the latest ``every`` queries read from the kept entries what they read before the cut: the cut entries'
contribution moves into the kept ones (distillation, not eviction).
Cut tokens keep counting in the logical length, so new tokens keep their true positions.

A block may be stored quantised (:func:`quantize_cache`, ``compress(..., kv_bits=4)``): keys and values are
then :class:`~kvsculpt.core.quant.Quantized` (packed codes, fp16 scales and minima), and the attention
dequantises one layer's block at a time, inside each forward; tokens appended after the block stay in the
model's dtype.
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .config import DECODE_SCOPES as SCOPES
from .core.fit import ridge_values
from .core.quant import Quantized, quantize_keys, quantize_values
from .hf.attention import ATTENTION_NAME, BLOCK_ATTR, KEY_BIAS_ATTR, QUERIES_ATTR, SCORES_ATTR
from .hf.dims import model_dims

KEEP_RULES = ("attention", "recent")
REFIT_LAM = 1.0  # ridge strength of the refit at a cut (relative to mean diag AᵀA; chosen on tuning texts, docs/decode.md)


def check_decode_budget(
    decode_budget: int | None,
    every: int,
    keep: str = "attention",
    scope: str = "all",
    context_floor: float | str = 0.0,
) -> None:
    """One-line errors for a decode budget that cannot work: ``every`` tokens must fit under it."""
    if context_floor != "auto" and (
        not isinstance(context_floor, (int, float)) or not 0 <= context_floor <= 1
    ):
        raise ValueError(
            f"context_floor must be a share of the context's entries in [0, 1], or 'auto'; got {context_floor!r}"
        )
    if context_floor and scope != "all":
        raise ValueError(
            "context_floor bounds what a whole-cache cut may drop of the context: it needs scope 'all'"
        )
    if keep not in KEEP_RULES:
        raise ValueError(f"unknown keep rule {keep!r}; choose from {', '.join(KEEP_RULES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown decode scope {scope!r}; choose from {', '.join(SCOPES)}")
    if decode_budget is None:
        return
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a whole number of tokens >= 1; got {every!r}")
    if not isinstance(decode_budget, int) or decode_budget <= every:
        raise ValueError(
            f"decode_budget must be a whole number of tokens above every ({every}); got {decode_budget!r}"
        )


def padded_layout(block_keys, block_values, block_bias, lengths: list[int], dtype=None):
    """A flat block (``[Σ m_h, d]`` keys and values, plain or :class:`~kvsculpt.core.quant.Quantized`, dequantised to
    ``dtype``; bias ``[Σ m_h]`` or None; ``lengths`` per head) laid out for the attention: ``(keys [Hkv, P, d],
    values [Hkv, P, d], bias [Hkv, P] or None)``, ``P = max m_h``, a view when the heads are uniform and the block
    is not quantised, else a copy with ``-inf`` bias on the padding."""
    if isinstance(block_keys, Quantized):
        block_keys, block_values = block_keys.dequantize(dtype), block_values.dequantize(dtype)
    Hkv, d, P, device = len(lengths), block_keys.shape[1], max(lengths), block_keys.device
    if len(set(lengths)) == 1:
        bias = None if block_bias is None else block_bias.view(Hkv, P)
        return block_keys.view(Hkv, P, d), block_values.view(Hkv, P, d), bias
    starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
    slot = torch.arange(P, device=device)
    real = slot[None] < torch.tensor(lengths, device=device)[:, None]  # [Hkv, P]
    where = torch.where(real, starts[:, None] + slot[None], 0)
    flat_bias = (
        block_bias.float() if block_bias is not None else torch.zeros(block_keys.shape[0], device=device)
    )
    return block_keys[where], block_values[where], flat_bias[where].masked_fill(~real, float("-inf"))


def joined_layout(block_keys, block_values, block_bias, lengths: list[int], part, dtype=None):
    """:func:`padded_layout` of a flat block, then a part's keys and values ``part = (keys, values)``
    ``[Hkv, c, d]`` after each head's slots (bias 0 on them): ``(keys [Hkv, P + c, d], values, bias [Hkv, P + c]
    or None)``. A copy made per call (the part's own tensors, a view, when the block is empty)."""
    pk, pv = part
    bk, bv, bias = padded_layout(block_keys, block_values, block_bias, lengths, dtype)
    if bk.shape[1] == 0 and bias is None:
        return pk.to(dtype or pk.dtype), pv.to(dtype or pv.dtype), None
    dtype = dtype or pk.dtype
    if bias is None:
        bias = torch.zeros(bk.shape[:2], device=pk.device)
    zeros = torch.zeros(pk.shape[:2], device=pk.device)
    return (torch.cat([bk.to(dtype), pk.to(dtype)], 1), torch.cat([bv.to(dtype), pv.to(dtype)], 1),
            torch.cat([bias.float(), zeros], 1))  # fmt: skip


def append_into_room(
    old: torch.Tensor | None, buf: torch.Tensor | None, new: torch.Tensor, dim: int, room: int
):
    """``old`` followed by ``new`` along ``dim``, written into ``buf`` (the buffer behind ``old``) when it has the
    room, so an append costs a write of ``new`` alone; otherwise into a new buffer with ``room`` slots to spare
    after them (``old`` copied once). Returns ``(view of the first slots, buffer)``. A view taken earlier of
    ``old`` stays valid either way (slots are only written past it), but keeps a replaced buffer alive."""
    used, extra = (0 if old is None else old.shape[dim]), new.shape[dim]
    fits = (
        old is not None and buf is not None and old.data_ptr() == buf.data_ptr()
        and old.stride() == buf.stride() and buf.shape[dim] >= used + extra
        and (torch.is_inference_mode_enabled() or not buf.is_inference())  # written only where it was made
    )  # fmt: skip
    if not fits:
        size = list(new.shape)
        size[dim] = used + extra + room
        buf = new.new_empty(size)
        if old is not None:
            buf.narrow(dim, 0, used).copy_(old)
    buf.narrow(dim, used, extra).copy_(new)
    return buf.narrow(dim, 0, used + extra), buf


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose tokens live in a buffer with room (:func:`append_into_room`): its first buffer
    holds ``capacity`` tokens at least (later ones a quarter more than they need), so a cache that is filled,
    extended by a request and cropped back (the capture's repeat pass) copies nothing, and views of its
    tokens taken before an append stay the cache's own memory, not a second copy. :func:`roomy_cache`."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity, self._room = int(capacity), {}

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self.keys = self.values = None
        if key_states.requires_grad:  # under autograd: no writes into saved tensors (concatenated, as before)
            self.keys = key_states if self.keys is None else torch.cat([self.keys, key_states], -2)
            self.values = value_states if self.values is None else torch.cat([self.values, value_states], -2)
            return self.keys, self.values
        total = (0 if self.keys is None else self.keys.shape[-2]) + key_states.shape[-2]
        room = max(total // 4, 16, self.capacity - total)
        self.keys, self._room["keys"] = append_into_room(
            self.keys, self._room.get("keys"), key_states, -2, room
        )
        self.values, self._room["values"] = append_into_room(self.values, self._room.get("values"), value_states,
                                                             -2, room)  # fmt: skip
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        self._room = {}
        super().reset()


def roomy_cache(capacity: int) -> Cache:
    """A cache of :class:`RoomyLayer` layers, each holding ``capacity`` tokens before it reallocates."""
    return Cache(layer_class_to_replicate=functools.partial(RoomyLayer, capacity))


class CompressedLayer(CacheLayerMixin):
    """One layer: an immutable compressed block (shared between forks) plus appended tokens."""

    is_sliding = False

    def __init__(self, keys, values, lengths: list[int], bias=None, n: int = 0, decode_budget: int | None = None,
                 every: int = 64, keep: str = "attention", refit: bool = True, scope: str = "all",
                 hold_layout: bool = True, reserve: int = 0, part=None, context_floor: float | str = 0.0):  # fmt: skip
        """``keys``, ``values``: ``[Σ m_h, d]`` tensors, or :class:`~kvsculpt.core.quant.Quantized` ones;
        ``decode_budget``, ``every``, ``keep``, ``refit``, ``scope``, ``context_floor``: see the module's
        docstring (None: every appended token is kept); ``hold_layout``, ``reserve``: see
        :meth:`CompressedCache.fork`. ``part``:
        ``(keys, values)`` ``[Hkv, c, d]`` read after the block (:func:`block_and_part`): the attention reads
        each head's entries then the part's, laid out at every forward (:func:`joined_layout`), one layer at a
        time, so block and part are never held joined; the block may then be empty (lengths 0)."""
        super().__init__()
        if tuple(keys.shape) != tuple(values.shape) or len(keys.shape) != 2:
            raise ValueError(f"flat keys/values must both be [sum m, d]; got {keys.shape} and {values.shape}")
        if sum(lengths) != keys.shape[0] or min(lengths) < (0 if part is not None else 1):
            raise ValueError(f"head lengths {lengths} must be ≥ 1 and sum to {keys.shape[0]}")
        if bias is not None and bias.shape != keys.shape[:1]:
            raise ValueError(f"bias must be [{keys.shape[0]}]; got {tuple(bias.shape)}")
        self.block_keys, self.block_values, self.block_bias = keys, values, bias
        self.lengths = [int(x) for x in lengths]
        self.n = int(n)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys = self.values = None  # appended tokens [B, Hkv, a, d], once used (views: see _append)
        self._room = {}  # the buffers behind keys, values, key_bias, scores and born (_append)
        check_decode_budget(decode_budget, every, keep, scope, context_floor)
        self.decode_budget, self.every, self.keep, self.refit = decode_budget, int(every), keep, bool(refit)
        self.scope, self.hold_layout, self.reserve = scope, bool(hold_layout), int(reserve)
        self.part = part
        self.context_floor = context_floor if context_floor == "auto" else float(context_floor)
        self.context_read = (
            None  # [B, Hkv, 2] ("auto"): attention on the context, and on all, at the last cut
        )
        self.context_held = None  # [B, Hkv] (scope "all"): the context's real entries still held; they lead
        self.added = 0  # tokens appended so far, cut or not (the logical length is n + added)
        self.adopted = 0  # block entries this fork took over (scope "all"): they lead keys and values
        self.key_bias = None  # [B, Hkv, a] fp32: the adopted entries' bias (β, -inf on padding), 0 after them
        self.born = None  # [B, Hkv, a] logical positions of the appended tokens (with a refitting budget)
        self.read_by = []  # (queries [B, H, q, d], scale): the generation's latest queries (with refit)
        self.scores = None  # [B, Hkv, a] fp32: attention each appended token has had (with a decode budget)
        self.evicted = 0  # entries cut by the decode budget (cut tokens still count in the logical length)
        self._block = (
            None  # (keys, values [Hkv, P, d], bias [Hkv, P] or None) in the model's dtype, once used
        )

    @property
    def quantized(self) -> bool:
        return isinstance(self.block_keys, Quantized)

    def dense(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat block ``(keys, values)`` ``[Σ m_h, d]`` as tensors (dequantised if stored quantised)."""
        if self.quantized:
            return self.block_keys.dequantize(dtype), self.block_values.dequantize(dtype)
        return self.block_keys, self.block_values

    def padded_block(self, dtype=None):
        """``(keys [Hkv, P, d], values [Hkv, P, d], bias [Hkv, P] or None)``, ``P = max m_h``: a view when
        the heads are uniform and the block is not quantised, else a copy with ``-inf`` bias on the padding
        (with a ``part``, its ``c`` keys after each head's slots: ``[Hkv, P + c, d]``)."""
        if self.part is not None:
            return joined_layout(
                self.block_keys, self.block_values, self.block_bias, self.lengths, self.part, dtype
            )
        return padded_layout(self.block_keys, self.block_values, self.block_bias, self.lengths, dtype)

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, cache_kwargs=None):
        if self._block is None and self.scope == "all" and self.decode_budget is not None:
            self._adopt(key_states)
        if self._block is None:  # first tokens after the block: lay it out once, in the model's dtype
            if self.part is not None:  # block then part, laid out at every forward (never held joined)
                self._block = functools.partial(joined_layout, self.block_keys, self.block_values, self.block_bias,
                                                self.lengths, self.part, key_states.dtype)  # fmt: skip
            elif self.quantized or not self.hold_layout:  # laid out at every forward, one layer at a time
                # the block's tensors, not the layer: a closure over the layer would be a reference cycle,
                # and a dropped fork (its appended tokens) would wait for the cyclic garbage collector
                self._block = functools.partial(padded_layout, self.block_keys, self.block_values, self.block_bias,
                                                self.lengths, key_states.dtype)  # fmt: skip
            else:
                bk, bv, bias = self.padded_block()
                self._block = (bk.to(key_states.dtype), bv.to(value_states.dtype), bias)
        incoming = key_states.shape[-2]
        limit = None if self.decode_budget is None else self.adopted + self.decode_budget
        if limit is not None and self.appended() + incoming > limit:
            self._cut(max(0, limit - max(self.every, incoming)))
        self._append("keys", key_states)
        self._append("values", value_states)
        self.added += incoming
        keys = self.keys.view_as(self.keys)  # a fresh tensor object to carry the block
        setattr(keys, BLOCK_ATTR, self._block)
        if self.key_bias is not None:
            self._append("key_bias", key_states.new_zeros(key_states.shape[:-1], dtype=torch.float32))
            setattr(keys, KEY_BIAS_ATTR, self.key_bias)
        if self.decode_budget is not None:
            self._append("scores", key_states.new_zeros(key_states.shape[:-1], dtype=torch.float32))
            setattr(keys, SCORES_ATTR, self.scores)  # the attention adds this forward's probabilities
            if self.refit:  # the fit needs each token's position (causality) and the latest queries
                end = self.get_seq_length()
                born = torch.arange(end - incoming, end, device=key_states.device)
                self._append("born", born.expand(*key_states.shape[:2], -1))
                setattr(keys, QUERIES_ATTR, self.read_by)  # the attention appends (queries, scale)
        return keys, self.values

    def _append(self, name: str, new: torch.Tensor) -> None:
        """Set ``self.<name>`` (keys, values ``[B, Hkv, a, d]``; key_bias, scores, born ``[B, Hkv, a]``) to itself
        followed by ``new`` along the tokens (:func:`append_into_room`), with room to spare when it reallocates:
        a quarter more, and at least ``every`` slots, or 16 without a decode budget (a batch of 32 rows sampling
        8 tokens then holds 17 slots a row, not 65), and at least ``reserve`` slots in all (:meth:`fork`). Under
        autograd (refine) it concatenates, as before."""
        dim = -2 if name in ("keys", "values") else -1
        old = getattr(self, name)
        if new.requires_grad or (old is not None and old.requires_grad):  # no writes into saved tensors
            setattr(self, name, new if old is None else torch.cat([old, new], dim))
            return
        total = (0 if old is None else old.shape[dim]) + new.shape[dim]
        room = max(total // 4, self.every if self.decode_budget else 16, self.reserve - total)
        view, self._room[name] = append_into_room(old, self._room.get(name), new, dim, room)
        setattr(self, name, view)

    def _adopt(self, key_states) -> None:
        """Scope ``"all"``: take the block over as this fork's own leading entries ``[B, Hkv, P, d]`` (in the
        model's dtype, with their bias, ``-inf`` on a short head's padding), so that a cut can drop them as it
        drops generated tokens; the shared block itself is not touched (other forks still read all of it). The
        attention then sees an empty block. Memory: one copy of the block per row of the batch."""
        bk, bv, bias = self.padded_block(key_states.dtype)
        B, (Hkv, P, d) = key_states.shape[0], bk.shape
        self.keys = bk.to(key_states.dtype)[None].expand(B, -1, -1, -1)
        self.values = bv.to(key_states.dtype)[None].expand(B, -1, -1, -1)
        if bias is not None:
            self.key_bias = bias.float()[None].expand(B, -1, -1)
        self.scores = key_states.new_zeros(B, Hkv, P, dtype=torch.float32)
        if self.refit:
            self.born = torch.full((B, Hkv, P), -1, dtype=torch.long, device=key_states.device)
        self.adopted = P
        lengths = torch.tensor(self.lengths, device=key_states.device)
        self.context_held = lengths[None].expand(B, -1).clone()  # a head's real entries lead, padding after
        empty = bk.new_zeros(Hkv, 0, d).to(key_states.dtype)
        self._block = (empty, empty, None)

    def _cut(self, keep: int) -> None:
        """Keep ``keep`` appended tokens per (row, head): the ``min(every, keep // 2)`` most recent and, of the
        others, those with the highest scores, in their original order; with ``refit``, the kept values are
        refitted (:meth:`_refit`). O(B · Hkv · a · d) for the cut itself."""
        a = self.appended()
        if keep >= a:
            return
        recent = keep if self.keep == "recent" else min(self.every, keep // 2)
        older = self.scores[..., : a - recent]
        if self.context_floor and self.context_held is not None:  # the best of the context's entries stay
            older = self._protect_context(older, keep - recent)
        top = (
            older.topk(keep - recent, dim=-1).indices.sort(-1).values
            if keep > recent
            else older[..., :0].long()
        )
        tail = torch.arange(a - recent, a, device=top.device).expand(*top.shape[:-1], recent)
        index = torch.cat([top, tail], -1)  # [B, Hkv, keep]
        rows = index[..., None].expand(*index.shape, self.keys.shape[-1])
        kept_values = self.values.gather(-2, rows)
        if self.refit and self.read_by:
            kept_values = self._refit(index, kept_values)
        self.keys, self.values = self.keys.gather(-2, rows), kept_values
        self.scores = self.scores.gather(-1, index)
        if self.context_held is not None:  # the kept indices are in order: the context's entries still lead
            self.context_held = (index < self.context_held[..., None]).sum(-1)
            if self.context_floor == "auto":  # what the next cut's share is counted from
                self.context_read = self._attention_on_context()
        if self.born is not None:
            self.born = self.born.gather(-1, index)
        if self.key_bias is not None:
            self.key_bias = self.key_bias.gather(-1, index)
        self.evicted += a - keep

    def _protect_context(self, older: torch.Tensor, room: int) -> torch.Tensor:
        """``older`` (scores ``[B, Hkv, s]`` of the entries a cut may drop) with ``+inf`` on the best-scored
        ``⌈context_floor · m_h⌉`` of the context's real entries still held in each head (at most ``room``), so
        the cut keeps them: a floor under the context's share of the cache, which the generation's scores
        cannot cut through (an entry the answer has not read yet has no score). ``"auto"``: each head's floor
        is ``⌈s_h · room⌉``, with ``s_h`` the share of its attention that went to the context's entries since the
        last cut (:meth:`_context_share`): the room is split as the head's latest queries read."""
        s = older.shape[-1]
        is_context = torch.arange(s, device=older.device) < self.context_held[..., None]
        if self.context_floor == "auto":
            floor = torch.ceil(self._context_share() * room).long()  # [B, Hkv]
        else:
            lengths = torch.tensor(self.lengths, device=older.device)
            floor = torch.ceil(self.context_floor * lengths).long()[None]  # [1, Hkv]
        floor = torch.minimum(torch.minimum(floor, self.context_held), torch.full_like(floor, room))
        rank = older.masked_fill(~is_context, float("-inf")).argsort(-1, descending=True).argsort(-1)
        return older.masked_fill(is_context & (rank < floor[..., None]), float("inf"))

    def _attention_on_context(self) -> torch.Tensor:
        """``[B, Hkv, 2]``: the attention the context's entries still held have had, and all held entries'."""
        a = self.scores.shape[-1]
        is_context = torch.arange(a, device=self.scores.device) < self.context_held[..., None]
        return torch.stack([(self.scores * is_context).sum(-1), self.scores.sum(-1)], -1)

    def _context_share(self) -> torch.Tensor:
        """``[B, Hkv]`` in [0, 1]: of the attention each head's queries gave since the last cut (since the fork
        began, at the first), the share on the context's entries (the attention's scores, which each forward
        adds to, less what they held after the last cut)."""
        now = self._attention_on_context()
        new = now if self.context_read is None else now - self.context_read
        return (new[..., 0] / new[..., 1].clamp_min(1e-30)).clamp(0, 1)

    def _refit(self, index, kept_values, lam: float = REFIT_LAM):
        """Refit the kept values so that, for the generation's latest queries (up to ``every`` of them, each
        query head), the layer's attention output over the block and the kept tokens equals its output over the
        block and every appended token, in least squares (:func:`~kvsculpt.core.fit.ridge_values`, shrunk toward
        the copied values). Each query sees the appended tokens up to its own position. O(B · H · every ·
        (P + a) · d) for the outputs plus a ridge solve of size ``keep`` per head. Returns ``[B, Hkv, keep, d]``."""
        queries = torch.cat([q for q, _ in self.read_by], -2)[:, :, -self.every :]  # [B, H, W, d]
        scale = self.read_by[-1][1]
        self.read_by.clear()
        B, H, W, d = queries.shape
        Hkv = self.keys.shape[1]
        G, f32 = H // Hkv, torch.float32
        end = self.get_seq_length()
        q_pos = torch.arange(end - W, end, device=queries.device)  # the queries' own positions
        bk, bv, bias = self._block() if callable(self._block) else self._block
        out = []
        for b in range(B):
            q = queries[b].to(f32).reshape(Hkv, G * W, d) * scale  # [Hkv, N, d]
            s_blk = q @ bk.to(f32).transpose(-1, -2)
            if bias is not None:
                s_blk = s_blk + bias.to(f32)[:, None]
            s_app = q @ self.keys[b].to(f32).transpose(-1, -2)
            if self.key_bias is not None:
                s_app += self.key_bias[b][:, None, :]
            # positions increase along the appended tokens, so only the last W can be unseen by a query
            tail = s_app[..., -W:]
            tail.masked_fill_(self.born[b][:, None, -W:] > q_pos.repeat(G)[None, :, None], float("-inf"))
            # one exponential per logit, against each query's largest: e ∝ its attention over everything held
            top = s_app.amax(-1, keepdim=True)  # [Hkv, N, 1]; a query sees its own token at least
            if s_blk.shape[-1]:  # the block is empty once a fork has taken it over
                top = torch.maximum(top, s_blk.amax(-1, keepdim=True))
            e_blk, e_app = (s_blk - top).exp(), (s_app - top).exp()
            o_blk, z_blk = e_blk @ bv.to(f32), e_blk.sum(-1, keepdim=True)  # unnormalised
            # the output over the block and every appended token, and the share of it the kept ones can carry
            o_full = (o_blk + e_app @ self.values[b].to(f32)) / (z_blk + e_app.sum(-1, keepdim=True))
            e_kept = e_app.gather(-1, index[b][:, None, :].expand(-1, G * W, -1))  # [Hkv, N, keep]
            z_kept = (z_blk + e_kept.sum(-1, keepdim=True)).clamp_min(1e-30)
            A = e_kept / z_kept  # 0 where a query sees nothing at all
            target = o_full - o_blk / z_kept
            solver = "dual" if A.shape[1] < A.shape[2] else "cholesky"  # one solution, the smaller system
            fitted = ridge_values(A, target, lam, prior=kept_values[b].to(f32), solver=solver)
            out.append(fitted.to(kept_values.dtype))
        return torch.stack(out)

    def appended(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.n + self.added

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for ``query``: its length (transformers ≥ 5.16) or its cache positions."""
        q = query if isinstance(query, int) else query.shape[0]
        block = max(self.lengths) + (0 if self.part is None else self.part[0].shape[1])
        return (0 if self.adopted else block) + self.appended() + q, 0

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # transformers < 5.16

    def crop(self, length: int) -> None:
        """Drop appended tokens: ``length < 0`` removes that many (transformers ≥ 5.16), ``length ≥ 0`` keeps the
        logical length ``length`` (the older convention). The compressed block itself cannot be cropped."""
        if self.evicted:
            raise ValueError("cannot crop a cache whose decode budget has cut tokens")
        keep = self.added + length if length < 0 else length - self.n
        if keep < 0:
            raise ValueError(f"cannot crop into the compressed block (n={self.n}, asked {length})")
        if self.keys is not None:
            end = self.adopted + min(keep, self.added)
            self.keys, self.values = self.keys[..., :end, :], self.values[..., :end, :]
            for name in ("scores", "born", "key_bias"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name)[..., :end])
        self.added = min(keep, self.added)

    def reset(self) -> None:
        self.keys = self.values = self._block = self.scores = self.born = self.key_bias = None
        self.context_held = self.context_read = None
        self._room = {}
        self.read_by = []
        self.evicted = self.added = self.adopted = 0

    def fork(self, decode_budget: int | None = None, every: int = 64, keep: str = "attention", refit: bool = True,
             scope: str = "all", hold_layout: bool = True, reserve: int = 0,
             context_floor: float | str = 0.0) -> CompressedLayer:  # fmt: skip
        return CompressedLayer(self.block_keys, self.block_values, self.lengths, self.block_bias, self.n,
                               decode_budget, every, keep, refit, scope, hold_layout, reserve, self.part,
                               context_floor)  # fmt: skip

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, 0)
            self.values = self.values.repeat_interleave(repeats, 0)
            if self.key_bias is not None:
                self.key_bias = self.key_bias.repeat_interleave(repeats, 0)
            if self.context_held is not None:
                self.context_held = self.context_held.repeat_interleave(repeats, 0)
            if self.context_read is not None:
                self.context_read = self.context_read.repeat_interleave(repeats, 0)
            if self.scores is not None:
                self.scores = self.scores.repeat_interleave(repeats, 0)
                if self.born is not None:
                    self.born = self.born.repeat_interleave(repeats, 0)
                self.read_by[:] = [(q.repeat_interleave(repeats, 0), s) for q, s in self.read_by]

    def batch_select_indices(self, indices) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]
            if self.key_bias is not None:
                self.key_bias = self.key_bias[indices]
            if self.context_held is not None:
                self.context_held = self.context_held[indices]
            if self.context_read is not None:
                self.context_read = self.context_read[indices]
            if self.scores is not None:
                self.scores = self.scores[indices]
                self.born = None if self.born is None else self.born[indices]
                self.read_by[:] = [(q[indices], s) for q, s in self.read_by]

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def tensors(self):
        """The stored tensors of the block (a quantised block's codes, scales and minima)."""
        out = []
        for t in (self.block_keys, self.block_values, self.block_bias):
            out += t.tensors() if isinstance(t, Quantized) else [] if t is None else [t]
        return out


class CompressedCache(Cache):
    """A ``transformers`` Cache holding a compressed context of logical length ``n``.

    Build it with :func:`kvsculpt.compress`, :meth:`from_heads` or :func:`kvsculpt.load_cache`. Use it like
    any cache::

        cache = kvsculpt.compress(model, context_ids, ratio=0.3, tokenizer=tok)
        kvsculpt.ask(model, tok, cache, "Question: …")                       # greedy, stops at EOS
        model.generate(torch.cat([context_ids, question_ids], 1), past_key_values=cache.fork(), ...)

    ``generate`` is given the *full* ids (context + question); it skips the ``n`` cached positions. The model
    must use kvsculpt's attention (:func:`kvsculpt.use_kvsculpt_attention`; ``compress``, ``load_cache`` and
    ``load_model`` set it); a forward without it is refused with that advice.
    """

    def __init__(self, model, layers: list[CompressedLayer], method: str = "", info: dict | None = None,
                 context_ids=None):  # fmt: skip
        super().__init__(layers=layers)
        self.context_ids = None if context_ids is None else context_ids.reshape(1, -1).cpu()  # [1, n] or None
        self._config = model.config
        self.n = layers[0].n
        self.method = method
        self.info = dict(info or {})
        dims = model_dims(model)
        if len(layers) != dims.layers or any(len(layer.lengths) != dims.kv_heads for layer in layers):
            raise ValueError(
                f"the model has {dims.layers} layers × {dims.kv_heads} KV heads; the cache does not match"
            )
        if any(layer.block_keys.shape[1] != dims.head_dim for layer in layers):
            raise ValueError(f"head_dim mismatch: model {dims.head_dim}")

    @classmethod
    def from_heads(
        cls, model, keys, values, n: int, bias=None, method: str = "", info=None, context_ids=None
    ):
        """Build from per-layer lists of per-head tensors: ``keys[l][h]`` ``[m_h, d]``, ``bias[l][h]`` ``[m_h]``."""
        layers = []
        for li in range(len(keys)):
            b = None if bias is None or bias[li] is None else torch.cat(list(bias[li]))
            lengths = [k.shape[0] for k in keys[li]]
            layers.append(
                CompressedLayer(torch.cat(list(keys[li])), torch.cat(list(values[li])), lengths, b, n)
            )
        return cls(model, layers, method, info, context_ids)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if self._config._attn_implementation != ATTENTION_NAME:
            raise RuntimeError(
                f"a CompressedCache needs the model's attention set to {ATTENTION_NAME!r} "
                f"(it is {self._config._attn_implementation!r}); call kvsculpt.use_kvsculpt_attention(model)"
            )
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def fork(self, decode_budget: int | None = None, every: int = 64, keep: str = "attention", refit: bool = True,
             scope: str = "all", hold_layout: bool = True, reserve: int = 0,
             context_floor: float | str = 0.0) -> CompressedCache:  # fmt: skip
        """A cache sharing this one's compressed block (no copy) with no appended tokens. ``decode_budget``:
        bound the cache while generating, cut every ``every`` tokens (the module's docstring). ``scope``: ``"all"``
        (the default: each head holds at most ``max m_h + decode_budget`` entries, and a cut may drop the block's
        entries too, by the same scores; the fork then holds its own copy of the block, per row) or
        ``"appended"`` (the block is kept whole; at most ``decode_budget`` appended tokens per head).
        ``context_floor`` (scope ``"all"``, in [0, 1], default 0): a cut never takes a head below that share of
        its context entries; it keeps the best-scored of them (1 keeps the context whole, as ``"appended"`` does,
        but within the whole-cache bound); ``"auto"``: at each cut a head keeps at least the share of its room
        that its attention gave the context since the last cut. Each cut
        costs a top-k over the scores and a gather, per layer, and with ``refit`` (the default) the outputs of the
        latest ``every`` queries over everything held and a ridge solve per head in its smaller form
        (``G · every`` rows or the kept entries, whichever is fewer). ``keep``: ``"attention"`` (the default rule)
        or ``"recent"`` (the last tokens only: StreamingLLM's rule; with ``scope="appended"`` the block stands
        for its sink tokens). Without ``decode_budget``, the other options change nothing. ``hold_layout``
        (the default): the block is laid out for the attention (``[Hkv, max m_h, d]``, a padded copy when the
        heads' lengths differ) at the first forward and held, for fast decoding; False: laid out at every
        forward, one layer at a time, so a few long forwards over a block of skewed lengths hold no copy.
        ``reserve``: the appended tokens' first buffer holds at least this many, so a reader that will append
        that many (a part, then a request after it) never reallocates, and views it took of the tokens appended
        so far do not keep a second copy alive."""
        new = CompressedCache.__new__(CompressedCache)
        Cache.__init__(
            new,
            layers=[
                layer.fork(decode_budget, every, keep, refit, scope, hold_layout, reserve, context_floor)
                for layer in self.layers
            ],
        )
        new._config, new.n, new.method, new.info = self._config, self.n, self.method, dict(self.info)
        new.context_ids = self.context_ids
        return new

    @property
    def budgets(self) -> list[list[int]]:
        """Entries kept per (layer, KV head)."""
        return [list(layer.lengths) for layer in self.layers]

    def kept_entries(self) -> int:
        return sum(sum(b) for b in self.budgets)

    def full_entries(self) -> int:
        """Entries of the uncompressed cache: n · layers · KV heads."""
        return self.n * len(self.layers) * len(self.layers[0].lengths)

    def nbytes(self) -> int:
        """Bytes of the compressed block as actually stored (keys, values and bias)."""
        return sum(t.untyped_storage().nbytes() for layer in self.layers for t in layer.tensors())

    def logical_nbytes(self) -> int:
        """Σ m_h · 2 · d · itemsize: what the kept entries need, with nothing padded (a quantised block: its
        packed codes, scales and minima, as stored)."""
        if self.layers[0].quantized:
            return self.nbytes()
        return self.kept_entries() * self.bytes_per_entry()

    def full_nbytes(self) -> int:
        """Bytes of the uncompressed cache's keys and values, in this cache's dtype."""
        return self.full_entries() * self.bytes_per_entry()

    def bytes_per_entry(self) -> int:
        """Bytes of one entry's key and value in the block's (unquantised) dtype."""
        layer = self.layers[0]
        return 2 * layer.block_keys.shape[1] * layer.dtype.itemsize

    @property
    def kv_bits(self) -> int:
        """Bits per stored value element (the values' codes' width), 16 when not quantised."""
        return self.layers[0].block_values.bits if self.layers[0].quantized else 16

    @property
    def key_bits(self) -> int:
        """Bits per stored key element, 16 when not quantised."""
        return self.layers[0].block_keys.bits if self.layers[0].quantized else 16

    def __repr__(self):
        bits = "" if self.kv_bits == 16 else f", key_bits={self.key_bits}, kv_bits={self.kv_bits}"
        return f"CompressedCache(n={self.n}, kept={self.kept_entries()}, method={self.method}{bits})"


def shared_cache(model, keys, values) -> CompressedCache:
    """A context's full cache (keys and values per layer ``[Hkv, n, d]``) as a :class:`CompressedCache` that
    keeps every entry: any number of sequences can continue it at once, the context shared by all rows (read
    once per step, never copied per row)."""
    n, Hkv = keys[0].shape[1], keys[0].shape[0]
    layers = [CompressedLayer(k.reshape(Hkv * n, -1), v.reshape(Hkv * n, -1), [n] * Hkv, None, n)
              for k, v in zip(keys, values, strict=True)]  # fmt: skip
    return CompressedCache(model, layers)


def block_and_part(model, block: CompressedCache | None, keys, values, n: int) -> CompressedCache:
    """``block``'s entries then a part's full keys and values (per layer ``[Hkv, c, d]``, views are fine) as one
    cache of logical length ``n``: every head reads its ``m_h`` entries, padded to ``P = max m_h`` (the padding's
    bias ``-inf``), then the ``c`` keys of the part (:class:`CompressedLayer`'s ``part``). Nothing is copied:
    each forward lays block and part out one layer at a time (:func:`joined_layout`), so sampling over a
    compressed prefix and the part just read holds no joined copy (it held one, built for every layer, ≈ the
    block plus the part: 267 MB at n = 8192 on SmolLM2 reading ahead). ``block`` None: the part alone."""
    if block is not None and block.layers[0].quantized:
        raise ValueError("block_and_part takes an unquantised block")
    layers = []
    for li, (k, v) in enumerate(zip(keys, values, strict=True)):
        if block is None:
            Hkv, _, d = k.shape
            empty = k.new_zeros(0, d)
            layers.append(CompressedLayer(empty, empty, [0] * Hkv, None, n, part=(k, v)))
        else:
            b = block.layers[li]
            layers.append(
                CompressedLayer(b.block_keys, b.block_values, b.lengths, b.block_bias, n, part=(k, v))
            )
    return CompressedCache(model, layers)


def join_blocks(model, first: CompressedCache | None, second: CompressedCache, n: int,
                keep_first: list[list[torch.Tensor]] | None = None, in_place: bool = False) -> CompressedCache:  # fmt: skip
    """One cache of logical length ``n`` whose block is ``first``'s entries then ``second``'s, head by head (a
    block of ``first``'s context followed by one of the next part's; keys keep their rotary positions). A bias
    is kept if either has one (zeros for the other's entries); ``first`` None: ``second`` with length ``n``.
    ``keep_first[l][h]`` (bool ``[m_lh]``): only those of ``first``'s entries are kept. Neither may be
    quantised. ``in_place``: ``first``'s layers are replaced by the joined ones one layer at a time, and
    ``first`` is returned, so the old block and the new one are never held whole side by side (memory: the
    larger block plus one layer, not both blocks; compress-while-reading joins this way)."""
    if any(c is not None and c.layers[0].quantized for c in (first, second)):
        raise ValueError("join_blocks takes unquantised blocks")
    caches = [c for c in (first, second) if c is not None]
    has_bias = any(c.layers[0].block_bias is not None for c in caches)
    layers = []
    for li in range(len(second.layers)):
        parts = [c.layers[li] for c in caches]
        split = [(layer.block_keys.split(layer.lengths), layer.block_values.split(layer.lengths),
                  (layer.block_bias if layer.block_bias is not None
                   else layer.block_keys.new_zeros(layer.block_keys.shape[0], dtype=torch.float32)
                   ).split(layer.lengths)) for layer in parts]  # fmt: skip
        heads = range(len(parts[0].lengths))
        if keep_first is not None and first is not None:
            split[0] = [[x[h][keep_first[li][h].to(x[h].device)] for h in heads] for x in split[0]]
        keys, values, bias = ([torch.cat([p[i][h] for p in split]) for h in heads] for i in range(3))
        del parts, split
        layer = CompressedLayer(torch.cat(keys), torch.cat(values), [k.shape[0] for k in keys],
                                torch.cat([b.float() for b in bias]) if has_bias else None, n)  # fmt: skip
        del keys, values, bias
        if in_place and first is not None:
            first.layers[li] = layer  # the old layer's block goes now, before the next layer is joined
        else:
            layers.append(layer)
    if in_place and first is not None:
        first.n = n
        return first
    return CompressedCache(model, layers)


def quantize_cache(
    cache: CompressedCache, bits: int, group: int = 64, key_bits: int | None = None
) -> CompressedCache:
    """A copy of ``cache`` whose blocks are stored as codes: keys in ``key_bits`` (default ``bits``) per channel
    (:func:`~kvsculpt.core.quant.quantize_keys`), values in ``bits`` per token, ``group`` elements a group (KIVI's layout). 16 bits for
    both: ``cache`` itself. Quantising an already quantised cache is refused."""
    key_bits = bits if key_bits is None else key_bits
    if bits == key_bits == 16:
        return cache
    if cache.layers[0].quantized:
        raise ValueError(f"the cache is already quantised to {cache.kv_bits} bits")
    if 16 in (bits, key_bits):
        raise ValueError("keys and values are quantised together: 16 bits for one of them is not supported")
    new = cache.fork()
    for layer in new.layers:
        layer.block_keys = quantize_keys(layer.block_keys, layer.lengths, key_bits, group)
        layer.block_values = quantize_values(layer.block_values, bits, group)
    new.info.update(kv_bits=bits, key_bits=key_bits, kv_group=group)
    return new
