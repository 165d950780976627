"""The engine layout of a compressed cache: the form a paged-attention engine (vLLM) can hold and serve.

An engine stores keys after RoPE and gives a new token the position after its last cached slot. A compressed
block keeps ``m`` entries per head whose keys were rotated at their original positions ``p < n``; a question
token then belongs at position ``n + j``. Rotating every kept key once more by ``−(n − m)`` positions makes
the block read correctly at engine position ``m + j``: RoPE is a rotation, so each key sits at the same
relative distance ``n + j − p`` from the question as before. To the engine the block is then an ordinary
prefix of ``m`` tokens, which :mod:`kvsculpt.vllm_connector` writes into the slots of ``m`` placeholder tokens.

What an engine cannot hold, and this module refuses with a one-line error:

- a different length per head or layer: the engine's slots are shared by every layer and head, so the cache
  must be compressed with ``allocation="uniform"`` (every head keeps the same ``m``);
- a per-entry bias (``beta="nnls"``, Sculpt's ``joint_beta``): the engine's attention adds none;
- a rotary embedding whose rotation depends on the sequence length (``dynamic``, ``longrope``).

An engine file ``NAME.engine.safetensors`` holds ``keys`` and ``values`` ``[L, Hkv, m, d]`` in the cache's dtype
and JSON metadata (``n``, ``m``, the model's fingerprint, the placeholder ids a prompt must begin with); the
sidecar ``NAME.engine.json`` repeats what a client needs. Cost: one elementwise rotation of the block,
``O(L · Hkv · m · d)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .cache import CompressedCache
from .cache_io import CacheFileError, _content_hash, _fingerprint, check_writable, write_atomically

FORMAT = "kvsculpt-engine-block"
SUFFIX = ".engine.safetensors"
SHIFT_SAFE_ROPE = ("default", "linear", "llama3", "yarn")  # rotations that depend on the position only


def engine_path(kvs_path: str | os.PathLike) -> Path:
    """Where the engine layout of ``doc.kvs`` lives: ``doc.engine.safetensors`` beside it."""
    path = Path(kvs_path)
    return path.with_name(path.name.removesuffix(".kvs") + SUFFIX)


def _rope_type(config) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return str(rope.get("rope_type", rope.get("type", "default")))


def check_budgets(budgets: list[list[int]]) -> None:
    """A one-line ``ValueError`` unless every head of every layer keeps the same number of entries (readable
    from a saved cache's metadata, before any model is loaded)."""
    lengths = {m for layer in budgets for m in layer}
    if len(lengths) != 1:
        raise ValueError(
            f"an engine needs every head to keep the same number of entries; this cache's heads keep "
            f"{min(lengths)}–{max(lengths)}: compress with allocation='uniform' (CLI --allocation uniform)"
        )


def check_servable(cache: CompressedCache, model) -> int:
    """The block's length ``m`` per head; a one-line ``ValueError`` if an engine cannot hold ``cache``."""
    check_budgets(cache.budgets)
    bias = [layer.block_bias for layer in cache.layers if layer.block_bias is not None]
    if any(b.float().abs().max().item() > 0 for b in bias):
        raise ValueError(
            "an engine's attention has no per-entry bias; compress without beta (Select+Fit, default)"
        )
    rope = _rope_type(model.config)
    if rope not in SHIFT_SAFE_ROPE:
        raise ValueError(
            f"rope_type {rope!r} rotates by sequence length; a shifted block would not read right"
        )
    m = cache.budgets[0][0]
    if m > cache.n:
        raise ValueError(
            f"the block keeps {m} entries of a {cache.n}-token context; nothing to serve compactly"
        )
    return m


def rotary_module(model):
    """The model's rotary embedding module (``model.model.rotary_emb`` in transformers' decoders)."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise ValueError(f"{type(model).__name__} has no rotary_emb module; only RoPE models can be served")


def shift_keys(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """``keys [..., d]`` (after RoPE, transformers' half-split layout) rotated by ``−shift`` positions.

    Exact for any RoPE whose angle is position × a fixed frequency (default, linear, llama3, yarn); yarn's
    attention scaling, which the module folds into cos and sin, is divided out so only the rotation remains."""
    rotary = rotary_module(model)
    probe = torch.zeros(1, 1, keys.shape[-1], device=keys.device, dtype=torch.float32)
    pos = torch.tensor([[shift]], device=keys.device)
    cos, sin = (
        t[0, 0].float() / float(getattr(rotary, "attention_scaling", 1.0)) for t in rotary(probe, pos)
    )
    k = keys.float()
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos - rotated_half * sin).to(keys.dtype)


def placeholder_ids(digest: str, m: int, vocab_size: int) -> list[int]:
    """``m`` token ids a prompt begins with to name the block: drawn from ``digest`` (the block's content
    hash), so two documents never share an engine's prefix-cache entries and one document always does."""
    gen = torch.Generator().manual_seed(int(digest[:15], 16))
    edge = vocab_size // 16  # clear of the special tokens vocabularies keep at either end
    return torch.randint(edge, vocab_size - edge, (m,), generator=gen).tolist()


def engine_block(cache: CompressedCache, model) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` ``[L, Hkv, m, d]``: the block in the engine's positions (keys shifted by n − m)."""
    m = check_servable(cache, model)
    keys, values = [], []
    for layer in cache.layers:
        k, v, _ = layer.padded_block()
        keys.append(shift_keys(model, k, cache.n - m))
        values.append(v)
    return torch.stack(keys), torch.stack(values)


def export(cache: CompressedCache, model, path: str | os.PathLike, model_name: str | None = None) -> Path:
    """Write the engine layout of ``cache`` to ``path`` (``….engine.safetensors``); atomic. Returns the path."""
    path = check_writable(path)
    keys, values = engine_block(cache, model)
    tensors = {"keys": keys.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()}
    digest = _content_hash(tensors)
    L, H, m, d = keys.shape
    meta = {
        "format": FORMAT,
        "model": model_name or getattr(model.config, "_name_or_path", ""),
        "fingerprint": _fingerprint(model.config),
        "n": cache.n,
        "m": m,
        "layers": L,
        "kv_heads": H,
        "head_dim": d,
        "dtype": str(keys.dtype).removeprefix("torch."),
        "method": cache.method,
        "content_sha256": digest,
        "placeholder_ids": placeholder_ids(digest, m, model.config.get_text_config().vocab_size),
    }
    recipe = {
        "kvsculpt_doc": path.name.removesuffix(SUFFIX),
        **{k: meta[k] for k in ("model", "n", "m", "placeholder_ids")},
    }
    write_atomically(tensors, path, {"kvsculpt": json.dumps(meta, sort_keys=True)})
    try:
        sidecar(path).write_text(json.dumps(recipe) + "\n")
    except OSError as exc:
        raise CacheFileError(f"cannot write {sidecar(path)}: {exc}") from None
    return path


def sidecar(path: str | os.PathLike) -> Path:
    """``NAME.engine.json`` beside ``NAME.engine.safetensors``: what a client needs to ask about the document
    (``kvsculpt_doc``, ``m``, ``n``, the ``placeholder_ids`` its prompt begins with), readable without torch."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(SUFFIX) + ".engine.json")


def read_engine_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an engine file (no tensors read); a one-line error for anything else."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("kvsculpt", "{}"))
    except (OSError, ValueError) as exc:
        raise CacheFileError(f"{path}: not a kvsculpt engine file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a kvsculpt engine file (format {meta.get('format')!r})")
    return meta


def load_engine_block(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(keys, values [L, Hkv, m, d], metadata)`` of an engine file, its content hash checked."""
    meta = read_engine_metadata(path)
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in ("keys", "values")}
    if _content_hash(tensors) != meta["content_sha256"]:
        raise CacheFileError(f"{path}: content does not match its checksum (damaged file)")
    return tensors["keys"], tensors["values"], meta


def prompt_ids(meta: dict, question_ids: list[int]) -> list[int]:
    """The token ids to send an engine: the block's placeholders, then the question's ids."""
    if not question_ids:
        raise ValueError("the question is empty: an engine must compute at least one token after the block")
    return list(meta["placeholder_ids"]) + list(question_ids)
