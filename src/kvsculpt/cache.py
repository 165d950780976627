"""The compressed cache: variable-length heads, per-entry bias, generation, save/load.

Per layer, the compressed block is stored flat: keys ``[Σ m_h, d]``, values ``[Σ m_h, d]``, bias ``[Σ m_h]``
(optional) and the head lengths ``m_h``. Nothing is padded in storage. During a forward pass the block is
viewed (uniform heads, no copy) or padded transiently (variable heads) to ``[B, Hkv, max m_h, d]``, with
``-inf`` bias on padding, and tokens appended after it are stored normally.

The logical length stays ``n``: new tokens get positions ``n, n+1, …`` whatever the ``m_h``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import ATTENTION_NAME, BIAS_ATTR, model_dims, use_kvsculpt_attention

FORMAT_VERSION = 1


class CacheFileError(ValueError):
    """A saved cache is unreadable, corrupted, or made for another model."""


class CompressedLayer(CacheLayerMixin):
    """One layer: an immutable compressed block (shared between forks) plus appended tokens."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: list[int], bias=None, n: int = 0):
        super().__init__()
        if keys.shape != values.shape or keys.ndim != 2:
            raise ValueError(f"flat keys/values must both be [sum m, d]; got {keys.shape} and {values.shape}")
        if sum(lengths) != keys.shape[0] or min(lengths) < 1:
            raise ValueError(f"head lengths {lengths} must be ≥ 1 and sum to {keys.shape[0]}")
        if bias is not None and bias.shape != keys.shape[:1]:
            raise ValueError(f"bias must be [{keys.shape[0]}]; got {tuple(bias.shape)}")
        self.block_keys, self.block_values, self.block_bias = keys, values, bias
        self.lengths = [int(x) for x in lengths]
        self.n = int(n)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys = self.values = None  # appended tokens [B, Hkv, a, d]
        self._gather = self._pad_bias = None  # padding index/bias for variable head lengths (built lazily)

    def _padded_block(self, batch: int):
        """``([B, Hkv, P, d], [B, Hkv, P, d], bias [Hkv, P] or None)``: a view when heads are uniform."""
        Hkv, d, P = len(self.lengths), self.block_keys.shape[1], max(self.lengths)
        if len(set(self.lengths)) == 1:
            k = self.block_keys.view(Hkv, P, d)
            v = self.block_values.view(Hkv, P, d)
            bias = None if self.block_bias is None else self.block_bias.view(Hkv, P)
        else:
            if self._gather is None:  # built once: where each padded slot reads from, and its bias
                starts = torch.tensor([0] + self.lengths[:-1], device=self.device).cumsum(0)
                slot = torch.arange(P, device=self.device)
                real = slot[None] < torch.tensor(self.lengths, device=self.device)[:, None]  # [Hkv, P]
                self._gather = torch.where(real, starts[:, None] + slot[None], 0)
                flat_bias = torch.zeros(self.block_keys.shape[0], device=self.device)
                if self.block_bias is not None:
                    flat_bias = self.block_bias.float()
                self._pad_bias = flat_bias[self._gather].masked_fill(~real, float("-inf"))
            k = self.block_keys[self._gather]  # [Hkv, P, d], transient
            v = self.block_values[self._gather]
            bias = self._pad_bias
        return k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1), bias

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, cache_kwargs=None):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        bk, bv, bias = self._padded_block(key_states.shape[0])
        keys = torch.cat([bk.to(key_states.dtype), self.keys], dim=-2)
        values = torch.cat([bv.to(value_states.dtype), self.values], dim=-2)
        if bias is not None:
            setattr(keys, BIAS_ATTR, bias)
        return keys, values

    def appended(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.n + self.appended()

    def get_mask_sizes(self, cache_position):
        return max(self.lengths) + self.appended() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        keep = max_length - self.n
        if keep < 0:
            raise ValueError(f"cannot crop into the compressed block (n={self.n}, asked {max_length})")
        if self.keys is not None:
            self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]

    def reset(self) -> None:
        self.keys = self.values = None

    def fork(self) -> CompressedLayer:
        return CompressedLayer(self.block_keys, self.block_values, self.lengths, self.block_bias, self.n)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, 0)
            self.values = self.values.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)

    def tensors(self):
        return [t for t in (self.block_keys, self.block_values, self.block_bias) if t is not None]


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


class CompressedCache(Cache):
    """A ``transformers`` Cache holding a compressed context of logical length ``n``.

    Build it with :func:`kvsculpt.compress`, :meth:`from_heads` or :meth:`load`. Use it like any cache::

        cache = kvsculpt.compress(model, context_ids, ratio=0.3)
        out = model.generate(torch.cat([context_ids, question_ids], 1), past_key_values=cache.fork(), ...)

    ``generate`` is given the *full* ids (context + question); it skips the ``n`` cached positions. The model
    must use kvsculpt's attention (the constructor switches it; only this model is affected).
    """

    def __init__(
        self,
        model,
        layers: list[CompressedLayer],
        method: str = "",
        info: dict | None = None,
        context_ids=None,
    ):
        super().__init__(layers=layers)
        self.context_ids = None if context_ids is None else context_ids.reshape(1, -1).cpu()  # [1, n] or None
        use_kvsculpt_attention(model)
        self._config = model.config
        self.n = layers[0].n
        self.method = method
        self.info = dict(info or {})
        L, _, Hkv, d, _ = model_dims(model)
        if len(layers) != L or any(len(layer.lengths) != Hkv for layer in layers):
            raise ValueError(f"the model has {L} layers × {Hkv} KV heads; the cache does not match")
        if any(layer.block_keys.shape[1] != d for layer in layers):
            raise ValueError(f"head_dim mismatch: model {d}")

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

    def fork(self) -> CompressedCache:
        """A cache sharing this one's compressed block (no copy) with no appended tokens."""
        new = CompressedCache.__new__(CompressedCache)
        Cache.__init__(new, layers=[layer.fork() for layer in self.layers])
        new._config, new.n, new.method, new.info = self._config, self.n, self.method, dict(self.info)
        new.context_ids = self.context_ids
        return new

    @property
    def budgets(self) -> list[list[int]]:
        """Entries kept per (layer, KV head)."""
        return [list(layer.lengths) for layer in self.layers]

    def kept_entries(self) -> int:
        return sum(sum(b) for b in self.budgets)

    def nbytes(self) -> int:
        """Bytes of the compressed block as actually stored (keys, values and bias)."""
        return sum(t.untyped_storage().nbytes() for layer in self.layers for t in layer.tensors())

    def logical_nbytes(self) -> int:
        """Σ m_h · 2 · d · itemsize: what the kept entries need, with nothing padded."""
        layer = self.layers[0]
        return self.kept_entries() * 2 * layer.block_keys.shape[1] * layer.block_keys.element_size()

    def __repr__(self):
        return f"CompressedCache(n={self.n}, kept={self.kept_entries()}, method={self.method})"

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, model_name: str | None = None) -> Path:
        """Write a safetensors file with JSON metadata; atomic (temporary file, then rename)."""
        path = Path(path)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = layer.block_keys.contiguous()
            tensors[f"layers.{i}.values"] = layer.block_values.contiguous()
            if layer.block_bias is not None:
                tensors[f"layers.{i}.bias"] = layer.block_bias.contiguous()
        if self.context_ids is not None:
            tensors["context_ids"] = self.context_ids.to(torch.int64).contiguous()
        meta = {
            "format": "kvsculpt-compressed-cache",
            "format_version": FORMAT_VERSION,
            "model": model_name or getattr(self._config, "_name_or_path", ""),
            "fingerprint": _fingerprint(self._config),
            "n": self.n,
            "method": self.method,
            "budgets": self.budgets,
            "dtype": str(self.layers[0].block_keys.dtype).removeprefix("torch."),
            "info": json.loads(json.dumps(self.info, default=str)),
            "content_sha256": _content_hash(tensors),
        }
        meta_json = json.dumps(meta, sort_keys=True)
        header = {"kvsculpt": meta_json, "kvsculpt_sha256": hashlib.sha256(meta_json.encode()).hexdigest()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model, device=None) -> CompressedCache:
        """Load a saved cache for ``model``; any mismatch or damage raises :class:`CacheFileError`."""
        path = Path(path)
        if not path.is_file():
            raise CacheFileError(f"no cache file at {path}")
        meta = read_metadata(path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheFileError(
                f"{path}: format version {meta.get('format_version')}, this kvsculpt reads {FORMAT_VERSION}"
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
        layers = []
        for i, lengths in enumerate(meta["budgets"]):
            bias = tensors.get(f"layers.{i}.bias")
            layers.append(
                CompressedLayer(
                    tensors[f"layers.{i}.keys"].to(device),
                    tensors[f"layers.{i}.values"].to(device),
                    lengths,
                    None if bias is None else bias.to(device),
                    meta["n"],
                )
            )
        return cls(model, layers, meta["method"], meta.get("info"), tensors.get("context_ids"))


def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a saved cache, checked against its own checksum."""
    path = Path(path)
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


@torch.inference_mode()
def ask(model, tokenizer, cache: CompressedCache, questions, max_new_tokens: int = 64, **generate_kwargs):
    """Answer each question from the same compressed context; returns the answers' texts.

    Each question runs on a fork of ``cache`` (the compressed block is shared, nothing is recomputed), so no
    question's tokens leak into the next. Greedy unless ``generate_kwargs`` say otherwise.
    """
    single = isinstance(questions, str)
    if cache.context_ids is None:
        raise ValueError(
            "this cache has no context ids (build it with compress() or from_heads(context_ids=...))"
        )
    answers = []
    for question in [questions] if single else questions:
        q = tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([cache.context_ids, q], dim=1).to(model.device)
        kwargs = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id, **generate_kwargs}
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache.fork(),
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers[0] if single else answers
