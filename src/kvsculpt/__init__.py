"""kvsculpt: compress a language model's KV cache by distillation.

model, tok = kvsculpt.load_model("smollm2-135m")         # or any HF id / local dir / .gguf file
cache = kvsculpt.compress(model, ids, ratio=0.3, tokenizer=tok)
kvsculpt.ask(model, tok, cache, "Question: …")
cache = kvsculpt.compress(model, ids, ratio=0.1, tokenizer=tok, refine="kl")   # + end-to-end KL refine
"""

from .cache import CompressedCache
from .cache_io import CacheFileError
from .cache_io import load as load_cache
from .compress import compress
from .config import CompressConfig
from .hf.attention import use_kvsculpt_attention
from .hf.capture import Capture, capture
from .hf.decode import ask
from .hf.models import encode, load_model
from .refine import refine

__all__ = [
    "CacheFileError",
    "Capture",
    "CompressConfig",
    "CompressedCache",
    "ask",
    "capture",
    "compress",
    "encode",
    "load_cache",
    "load_model",
    "refine",
    "use_kvsculpt_attention",
]
