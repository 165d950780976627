"""kvsculpt: compress a language model's KV cache by distillation.

model, tok = kvsculpt.load_model("smollm2-135m")         # or any HF id / local dir / .gguf file
cache = kvsculpt.compress(model, ids, ratio=0.3, tokenizer=tok)
kvsculpt.ask(model, tok, cache, "Question: …")                    # and from kvsculpt.full_cache(model, ids)
kvsculpt.save_cache(cache, "doc.kvs"); cache = kvsculpt.load_cache("doc.kvs", model)
cache = kvsculpt.compress(model, ids, ratio=0.1, tokenizer=tok, refine="kl")   # + end-to-end KL refine

The names below are imported on first use, so that ``import kvsculpt`` (and ``kvsculpt --help``) stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types

_WHERE = {  # public name -> (module, attribute)
    "CacheFileError": ("cache_io", "CacheFileError"),
    "Capture": ("hf.capture", "Capture"),
    "CompressConfig": ("config", "CompressConfig"),
    "CompressedCache": ("cache", "CompressedCache"),
    "ask": ("hf.decode", "ask"),
    "capture": ("hf.capture", "capture"),
    "compress": ("compress", "compress"),
    "encode": ("hf.models", "encode"),
    "full_cache": ("hf.decode", "full_cache"),
    "load_cache": ("cache_io", "load"),
    "load_model": ("hf.models", "load_model"),
    "refine": ("refine", "refine"),
    "save_cache": ("cache_io", "save"),
    "use_kvsculpt_attention": ("hf.attention", "use_kvsculpt_attention"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kvsculpt' has no attribute {name!r}")
    module, attr = _WHERE[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


def _function_over_module(name: str) -> property:
    """``kvsculpt.compress`` and ``kvsculpt.refine`` are functions although modules of the same names exist:
    importing the module (which sets the package's attribute) must not hide the function."""

    def get(package):
        module, attr = _WHERE[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)

    return property(get, lambda package, value: None)


class _Package(types.ModuleType):
    compress = _function_over_module("compress")
    refine = _function_over_module("refine")


sys.modules[__name__].__class__ = _Package
