"""Which tensors hold the memory: a count of the bytes that live tensors' storages hold, and what held them at
the peak, for any torch code run inside :class:`LiveTensors` (CPU or GPU).

The resident set (``benchmarks/memory.py``) says how much a process holds, not what: it also counts the C
heap's free pages and kernels' scratch buffers. This counts only storages made by torch operators while the
block runs (each once, however many views share it; freed when the last view goes), so the gap between the two
is the allocator's and the kernels' share. Tensors that existed before the block (the model's weights) are not
counted. The peak's holders are grouped by where they were made: the innermost frame outside torch, and the
innermost frame in kvsculpt (its caller) when that is another frame.

Cost: a Python call per operator (a ``TorchDispatchMode``), so a run takes longer; the count is exact."""

from __future__ import annotations

import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)


def _site() -> str:
    """Where the running operator was called from: ``file:line function`` of the innermost frame outside torch
    (and this file), then ``< file:function`` of the innermost kvsculpt frame when that is another one."""
    frame, inner, ours = sys._getframe(2), None, None
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and os.path.abspath(name) != _HERE:
            where = f"{os.path.basename(name)}:{frame.f_lineno} {frame.f_code.co_name}"
            inner = inner or where
            if "kvsculpt" in name:
                ours = where
                break
        frame = frame.f_back
    if inner is None:
        return "?"
    return inner if ours in (None, inner) else f"{inner} < {ours}"


class LiveTensors(TorchDispatchMode):
    """``with LiveTensors(label=...) as live:`` counts the bytes of live storages made inside the block.

    After it: ``live.peak_bytes`` (the most held at once), and ``live.at_peak``: the holders at that moment,
    grouped by (site, label), as dicts ``{"site", "label", "bytes", "tensors", "shape"}`` (the largest tensor's
    shape), largest first. ``label()`` names the stage a tensor was made in (e.g. the function running);
    storages under ``min_bytes`` are counted in the total but grouped as one "small" holder. The snapshot of
    holders is retaken whenever the peak grows by ``resnap`` bytes or more,
    so it is within ``resnap`` of the exact peak's holders (a later, smaller rise is not retaken)."""

    def __init__(self, label=lambda: "", min_bytes: int = 1 << 20, resnap: int = 1 << 20):
        super().__init__()
        self.label, self.min_bytes, self.resnap = label, min_bytes, resnap
        self.live: dict[int, tuple] = {}  # storage id → (bytes, site, label, shape)
        self.bytes = self.peak_bytes = self._snapped = 0
        self.at_peak: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:  # a view of (or in place on) a storage already counted
            return
        size = storage.nbytes()
        small = size < self.min_bytes
        self.live[key] = (size, "small" if small else _site(), "" if small else self.label(), tuple(t.shape))
        weakref.finalize(storage, self._drop, key)
        self.bytes += size
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes
            if self.peak_bytes >= self._snapped + self.resnap:
                self._snap()

    def _drop(self, key: int) -> None:
        held = self.live.pop(key, None)
        if held is not None:
            self.bytes -= held[0]

    def _snap(self) -> None:
        groups: dict[tuple, dict] = {}
        for size, site, label, shape in self.live.values():
            g = groups.setdefault((site, label), {"site": site, "label": label, "bytes": 0, "tensors": 0,
                                                  "shape": shape, "largest": 0})  # fmt: skip
            g["bytes"] += size
            g["tensors"] += 1
            if size > g["largest"]:
                g["largest"], g["shape"] = size, shape
        self.at_peak = sorted(groups.values(), key=lambda g: -g["bytes"])
        for g in self.at_peak:
            g.pop("largest")
        self._snapped = self.peak_bytes
