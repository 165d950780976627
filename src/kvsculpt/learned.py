"""The learned scorer (``method="learned"``): trained once per model on the default's choices, then a context
is scored during its one prefill.

* :func:`train_scorer` (CLI ``kvsculpt train-scorer``): on training texts, window by window, the default's
  global entry scores (its repeat and self queries, as ``compress`` computes them) are the targets, and each
  layer's attention inputs from a plain prefill the features; a linear model per layer and KV head is fitted
  by ridge regression (:mod:`kvsculpt.core.learned`). Resumable: the statistics are saved after every window.
* :func:`prefill_scores`: one prefill of the context with a hook per attention layer that turns its input into
  the prediction as the layer runs; nothing else runs the model.
* The weights are a small safetensors file with the model's fingerprint and a digest of its weights;
  :func:`load_weights` refuses a file made for another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cache_io import _fingerprint, _umask
from .core import learned as lin
from .hf.attention import attention_inputs, capture_queries, use_kvsculpt_attention
from .hf.capture import pool_gqa
from .hf.decode import check_ids, prefill
from .hf.dims import model_dims
from .hf.models import cache_dir

FORMAT = "kvsculpt-learned-scorer"
SNAPSHOTS = (1, 2, 4, 8, 16, 32, 64, 128)  # window counts whose weights are kept for a learning curve


def model_digest(model) -> str:
    """A digest of the model's architecture (its fingerprint) and of a sample of its weights (the first 4096
    numbers of the input embedding and of the last layer's key projection, rounded to bf16 so that an fp32 and a
    bf16 load of the same checkpoint agree): a scorer trained on one model is refused by another."""
    h = hashlib.sha256(json.dumps(_fingerprint(model.config), sort_keys=True).encode())
    last_k = next(m for m in reversed(list(model.modules())) if hasattr(m, "k_proj")).k_proj.weight
    for w in (model.get_input_embeddings().weight, last_k):
        sample = w.detach().flatten()[:4096].to(torch.bfloat16).float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def default_path(model) -> Path:
    """Where ``train-scorer`` writes the model's weights unless told otherwise, and where ``learned`` looks."""
    return cache_dir() / "scorers" / f"{model_digest(model)[:16]}.safetensors"


def packaged_path(model) -> Path:
    """Where weights shipped with the package for this model would be."""
    return Path(str(resources.files("kvsculpt").joinpath(f"scorers/{model_digest(model)[:16]}.safetensors")))


def find_weights(model, path: str | os.PathLike | None = None) -> Path:
    """The weights file ``method="learned"`` uses: ``path`` if given, else the one ``train-scorer`` wrote for
    this model, else the package's; a one-line error naming ``train-scorer`` if there is none."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no learned-scorer weights at {path}")
        return Path(path)
    for where in (default_path(model), packaged_path(model)):
        if where.is_file():
            return where
    raise ValueError("method 'learned' needs a scorer trained for this model: run `kvsculpt train-scorer --model "
                     "M` (or give option weights=PATH)")  # fmt: skip


def save_weights(weights: torch.Tensor, path: str | os.PathLike, model, info: dict, snapshots=None) -> Path:
    """Write ``weights [L, H, F]`` (and ``snapshots``: window count → weights, for learning curves) with the
    model's digest and ``info`` (how they were trained). Atomic: written beside, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weights": weights.float().contiguous()}
    for k, w in (snapshots or {}).items():
        tensors[f"snapshot.{k}"] = w.float().contiguous()
    meta = {
        "format": FORMAT,
        "digest": model_digest(model),
        "fingerprint": _fingerprint(model.config),
        **info,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"kvsculpt": json.dumps(meta)})
    os.chmod(tmp, 0o666 & ~_umask())  # as any file the user writes (safetensors writes 0600)
    tmp.replace(path)
    return path


def load_weights(model, path: str | os.PathLike | None = None, snapshot: int | None = None):
    """``(weights [L, H, F], metadata)`` for ``model`` (:func:`find_weights`); a file made for another model is
    refused with a one-line error. ``snapshot``: the weights after that many training windows instead."""
    path = find_weights(model, path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("kvsculpt", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvsculpt learned-scorer file")
        if meta["digest"] != model_digest(model):
            raise ValueError(f"{path} was trained for another model ({meta.get('model', '?')}); train one for this "
                             "model with `kvsculpt train-scorer`")  # fmt: skip
        name = "weights" if snapshot is None else f"snapshot.{snapshot}"
        if name not in f.keys():
            raise ValueError(f"{path} has no snapshot after {snapshot} windows; it has "
                             f"{sorted(int(k.split('.')[1]) for k in f.keys() if k.startswith('snapshot.'))}")  # fmt: skip
        return f.get_tensor(name), meta


@torch.inference_mode()
def prefill_scores(model, context_ids: torch.Tensor, weights: torch.Tensor, sinks: int = 4, last: int | None = None,
                   cache=None, start: int = 0):  # fmt: skip
    """One prefill of ``context_ids [1, n]`` that scores every entry as it is produced: ``(cache, log scores
    [L, Hkv, n] fp32, queries, last logits [vocab], seconds)``, the first ``sinks`` positions +inf (always
    kept); ``queries``: per layer the last ``max(last, WINDOW)`` positions' queries, GQA heads pooled
    ``[Hkv, G·t, d]``. The hook reads each layer's attention input and keeps only ``[Hkv, n]`` per layer; beyond
    the prefill, O(n · D · Hkv + G · WINDOW · n · d) per layer (:mod:`kvsculpt.core.learned`). ``cache``,
    ``start``: a part read after ``start`` tokens (a compressed cache's fork): its own entries are scored, at the
    context's positions, with the part's last queries as the window."""
    use_kvsculpt_attention(model)
    dims = model_dims(model)
    if tuple(weights.shape[:2]) != (dims.layers, dims.kv_heads):
        raise ValueError(f"scorer weights for {tuple(weights.shape[:2])} (layers, KV heads); the model has "
                         f"{(dims.layers, dims.kv_heads)}")  # fmt: skip
    parts: dict[int, list[torch.Tensor]] = {li: [] for li in range(dims.layers)}

    def on_input(li, hidden):  # once per layer and forward (several with PREFILL_CHUNK)
        parts[li].append(lin.hidden_part(weights[li], hidden[0]))

    t0 = time.perf_counter()
    cache, tail, last_logits = _prefill(model, context_ids, on_input, last, cache, start)
    c = context_ids.shape[-1]
    scores = torch.empty(dims.layers, dims.kv_heads, c)
    for li in range(dims.layers):
        K, V = _kv(cache, li, c)
        window = lin.window_attention(tail[li], K, dims.scale, dims.groups)
        scores[li] = lin.predict(weights[li], torch.cat(parts.pop(li), -1), K, V, window, start).cpu()
    scores[..., :sinks] = float("inf")
    return cache, scores, tail, last_logits, time.perf_counter() - t0


def _kv(cache, li: int, c: int | None = None):
    """Layer ``li``'s keys and values ``[Hkv, c, d]``: the last ``c`` the cache holds (None: all)."""
    keys, values = cache.layers[li].keys[0], cache.layers[li].values[0]
    return (keys, values) if c is None else (keys[:, -c:], values[:, -c:])


def _prefill(model, context_ids: torch.Tensor, on_input, last: int | None = None, cache=None, start: int = 0):
    """A plain prefill (``hf.decode.PREFILL_CHUNK`` tokens a forward if set), with ``on_input`` hooked on every attention input
    (once per layer and forward): ``(cache, per layer the last ``t = max(last, WINDOW)`` queries pooled
    [Hkv, G·t, d], the last logits [vocab])``."""
    dims, t = model_dims(model), max(last or 0, lin.WINDOW)
    with attention_inputs(model, on_input), capture_queries(model, t) as found:
        cache, last_logits, _ = prefill(model, context_ids, cache, start)
    return cache, [pool_gqa(torch.cat(q, 2)[:, :, -t:].float(), dims.kv_heads) for q in found], last_logits


@torch.inference_mode()
def layer_features(model, context_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer the features ``[Hkv, n, F]`` of a plain prefill (training; :func:`kvsculpt.core.learned.features`)."""
    held: dict[int, list[torch.Tensor]] = {}
    cache, tail, _ = _prefill(model, context_ids, lambda li, h: held.setdefault(li, []).append(h[0]))
    dims = model_dims(model)
    out = []
    for li in range(dims.layers):
        K, V = _kv(cache, li)
        out.append(
            lin.features(
                torch.cat(held.pop(li)), K, V, lin.window_attention(tail[li], K, dims.scale, dims.groups)
            ).cpu()
        )
    return out


def train_scorer(model, tokenizer, windows, out: str | os.PathLike | None = None, cfg=None, lam: float = 1e-2,
                 progress: bool = True, model_name: str = "") -> Path:  # fmt: skip
    """Fit the learned scorer on ``windows`` (``[(name, ids [1, n])]``, never evaluation windows) and save it
    (default: :func:`default_path`). Per window: the default's entry scores under ``cfg`` (the library's
    default config if None) are the targets, a plain prefill's attention inputs the features. The statistics
    are saved to ``out + ".partial"`` after every window, so a rerun goes on where it stopped. Cost per window:
    the default's capture and scoring (no value fit), plus one prefill."""
    from .compress import captured_entry_scores
    from .config import CompressConfig
    from .hf.capture import capture

    cfg = cfg or CompressConfig()
    out = Path(out) if out is not None else default_path(model)
    partial = out.with_suffix(out.suffix + ".partial")
    dims = model_dims(model)
    F = model.config.hidden_size + lin.EXTRA
    state = {"done": [], "XtX": torch.zeros(dims.layers, dims.kv_heads, F, F, dtype=torch.float64),
             "Xty": torch.zeros(dims.layers, dims.kv_heads, F, dtype=torch.float64), "snapshots": {},
             "yy": 0.0, "count": 0, "seconds": 0.0, "config": repr(cfg), "lam": lam}  # fmt: skip
    if partial.is_file():
        saved = torch.load(partial, weights_only=False)
        if saved["config"] == repr(cfg) and saved["lam"] == lam and saved["XtX"].shape == state["XtX"].shape:
            state = saved
    todo = [(name, ids) for name, ids in windows if name not in state["done"]]
    if progress and state["done"]:
        print(f"train-scorer: {len(state['done'])} windows done before, {len(todo)} to go", flush=True)
    for name, ids in tqdm(todo, desc="train-scorer windows", unit="window", disable=not progress):
        t0 = time.perf_counter()
        ids = check_ids(ids, model.device)
        cap = capture(model, ids, cfg, tokenizer=tokenizer, progress=False)
        scores = captured_entry_scores(cap, cfg)  # [L, H, n]
        del cap
        for li, X in enumerate(layer_features(model, ids)):
            y, use = lin.target(scores[li])
            lin.add_stats(state["XtX"][li], state["Xty"][li], X, y, use)
            state["yy"] += float((y.double() ** 2 * use).sum())
            state["count"] += int(use.sum())
        state["done"].append(name)
        state["seconds"] += time.perf_counter() - t0
        if len(state["done"]) in SNAPSHOTS:
            state["snapshots"][len(state["done"])] = lin.solve(state["XtX"], state["Xty"], lam)
        partial.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, partial)
    if not state["done"]:
        raise ValueError("train-scorer: no training windows")
    weights = lin.solve(state["XtX"], state["Xty"], lam)
    info = {"model": model_name, "windows": state["done"], "entries": state["count"], "lam": lam,
            "config": state["config"], "train_seconds": state["seconds"],
            "window_tokens": int(windows[0][1].shape[-1]) if windows else None}  # fmt: skip
    path = save_weights(weights, out, model, info, state["snapshots"])
    partial.unlink(missing_ok=True)
    return path
