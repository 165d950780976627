"""The ``.kvs`` file format: one safetensors file, tensors per layer plus JSON metadata with checksums.

Tensors: ``layers.{i}.keys`` / ``.values`` ``[Σ m_h, d]``, optional ``layers.{i}.bias`` ``[Σ m_h]`` and
``context_ids [1, n]``; a quantised block stores ``layers.{i}.keys.codes`` / ``.scale`` / ``.low`` (and the
same for values) instead, as :class:`~kvsculpt.core.quant.Quantized` holds them. Metadata
(``__metadata__["kvsculpt"]``, JSON, with its own sha256): format version, model fingerprint, ``n``, head
lengths, method, info, the quantisation (``quant``: ``keys_bits``, ``values_bits``, group, the dtype they
stand for; absent when not quantised; keys are grouped within each head) and a sha256 of the tensor data.
Writes are atomic. Version 1 files (before quantisation) load.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cache import CompressedCache, CompressedLayer
from .core.quant import Quantized
from .hf.attention import use_kvsculpt_attention

FORMAT_VERSION = 2  # 2: quantised blocks (version 1 files have none, and still load)
READS = (1, 2)
_PARTS = ("codes", "scale", "low")


class CacheFileError(ValueError):
    """A saved cache is unreadable, corrupted, or made for another model."""


def _fingerprint(config) -> dict:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {"rope_theta": getattr(text, "rope_theta", None)}
    return {
        "model_type": text.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "rope": json.loads(json.dumps(rope, default=str)),
    }


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` if a cache file can be written there (its folder made if missing), else a one-line
    :class:`CacheFileError`: call it before long work, so that a bad path fails first."""
    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a directory; give the .kvs file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise CacheFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def save(cache: CompressedCache, path: str | os.PathLike, model_name: str | None = None) -> Path:
    """Write ``cache`` to ``path`` (safetensors with JSON metadata); atomic (a temporary file, then a
    rename), with the permissions the user's umask gives a new file; on failure nothing is left behind."""
    path = check_writable(path)
    tensors = {}
    quant = None
    for i, layer in enumerate(cache.layers):
        for name, t in (("keys", layer.block_keys), ("values", layer.block_values)):
            if isinstance(t, Quantized):
                quant = {**(quant or {}), f"{name}_bits": t.bits, "group": t.group,
                         "dtype": str(t.dtype).removeprefix("torch.")}  # fmt: skip
                tensors.update(
                    {
                        f"layers.{i}.{name}.{part}": x.contiguous()
                        for part, x in zip(_PARTS, t.tensors(), strict=True)
                    }
                )
            else:
                tensors[f"layers.{i}.{name}"] = t.contiguous()
        if layer.block_bias is not None:
            tensors[f"layers.{i}.bias"] = layer.block_bias.contiguous()
    if cache.context_ids is not None:
        tensors["context_ids"] = cache.context_ids.to(torch.int64).contiguous()
    meta = {
        "format": "kvsculpt-compressed-cache",
        "format_version": FORMAT_VERSION,
        "model": model_name or getattr(cache._config, "_name_or_path", ""),
        "fingerprint": _fingerprint(cache._config),
        "n": cache.n,
        "method": cache.method,
        "budgets": cache.budgets,
        "dtype": str(cache.layers[0].block_keys.dtype).removeprefix("torch."),
        "quant": quant,
        "info": json.loads(json.dumps(cache.info, default=str)),
        "content_sha256": _content_hash(tensors),
    }
    meta_json = json.dumps(meta, sort_keys=True)
    header = {"kvsculpt": meta_json, "kvsculpt_sha256": hashlib.sha256(meta_json.encode()).hexdigest()}
    return write_atomically(tensors, path, header)


def write_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temporary file and a rename, with the permissions the user's umask
    gives a new file; on failure nothing is left behind and a one-line :class:`CacheFileError` is raised."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise CacheFileError(f"cannot write {path}: {exc}") from None
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a saved cache, checked against its own checksum."""
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"no cache file at {path}")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000 or size + 8 > path.stat().st_size:
                raise CacheFileError(f"{path} is truncated or not a safetensors file")
            header = json.loads(f.read(size))
        meta_json = header["__metadata__"]["kvsculpt"]
        if hashlib.sha256(meta_json.encode()).hexdigest() != header["__metadata__"]["kvsculpt_sha256"]:
            raise CacheFileError(f"{path}: metadata does not match its checksum (corrupted file)")
        meta = json.loads(meta_json)
    except CacheFileError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CacheFileError(f"{path}: unreadable kvsculpt metadata ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != "kvsculpt-compressed-cache":
        raise CacheFileError(f"{path} is not a kvsculpt cache file")
    return meta


def load(path: str | os.PathLike, model, device=None) -> CompressedCache:
    """Load a saved cache for ``model``; any mismatch or damage raises :class:`CacheFileError`."""
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"no cache file at {path}")
    meta = read_metadata(path)
    if meta.get("format_version") not in READS:
        raise CacheFileError(
            f"{path}: format version {meta.get('format_version')}, this kvsculpt reads "
            f"{', '.join(map(str, READS))}"
        )
    want = _fingerprint(model.config)
    if meta["fingerprint"] != want:
        diff = {
            k: (meta["fingerprint"].get(k), v) for k, v in want.items() if meta["fingerprint"].get(k) != v
        }
        raise CacheFileError(f"{path} was made for another model (saved vs this model: {diff})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CacheFileError(f"{path} is truncated or corrupted: {exc}") from exc
    if _content_hash(tensors) != meta["content_sha256"]:
        raise CacheFileError(f"{path}: tensor data does not match its checksum (corrupted file)")
    device = device or model.device
    quant, d = meta.get("quant"), want["head_dim"]
    layers = []
    for i, lengths in enumerate(meta["budgets"]):
        bias = tensors.get(f"layers.{i}.bias")
        kv = []
        for name, axis in (("keys", "channel"), ("values", "token")):
            if quant is None:
                kv.append(tensors[f"layers.{i}.{name}"].to(device))
            else:
                parts = [tensors[f"layers.{i}.{name}.{part}"].to(device) for part in _PARTS]
                kv.append(Quantized(*parts, quant[f"{name}_bits"], quant["group"], axis, (sum(lengths), d),
                                    getattr(torch, quant["dtype"]), tuple(lengths) if name == "keys" else None))  # fmt: skip
        layers.append(CompressedLayer(*kv, lengths, None if bias is None else bias.to(device), meta["n"]))
    use_kvsculpt_attention(model)
    return CompressedCache(model, layers, meta["method"], meta.get("info"), tensors.get("context_ids"))
