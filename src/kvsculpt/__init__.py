"""kvsculpt: compress a language model's KV cache by distillation."""

from .attention import use_kvsculpt_attention
from .cache import CacheFileError, CompressedCache
from .capture import Capture, capture
from .compress import compress
from .models import encode, load_model

__all__ = [
    "CacheFileError",
    "Capture",
    "CompressedCache",
    "capture",
    "compress",
    "encode",
    "load_model",
    "use_kvsculpt_attention",
]
