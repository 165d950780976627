"""End-to-end refinement: fit a compressed cache to the full cache's next-token distributions.

Every per-layer method fits each layer's attention output; the user sees the next-token distribution. Refine
optimises the compressed block of **every layer jointly** (keys and values, optionally the bias β) by
backpropagation through the frozen model, to minimise ``KL(P_full ‖ P_compressed)`` on text the model makes
itself from the full cache, never on the text the cache is evaluated on.

Data (``refine_data``, sources joined by ``+``; ``refine_samples`` sequences each, ``refine_length`` tokens):

* ``self``: continuations of the context sampled from the full cache (seeded);
* ``repeat``: KVzip's repeat request, then a chunk of the context (teacher-forced: the model copying);
* ``study``: a self-study request in the chat template ("Summarise the text above", "Ask a question about
  the text above and answer it", …), then the model's own sampled reply (as Cartridges and Attention Matching
  generate their training data).

Every sequence sits at positions ``n, n+1, …`` after the block, exactly as a user's tokens will. The teacher's
distribution at every position is stored as its ``refine_topk`` most likely tokens' log-probabilities plus one
bucket for the rest (``[N, T, k]`` + ``[N, T]``; the full vocabulary would be ``V/k`` times larger). The loss is
the KL between these coarse distributions, a lower bound of the full KL that is tight when the tail is small.

Quantised storage (``kv_bits`` below 16): the forward sees the block as its codes will give it back (keys and
values quantised and dequantised exactly as :func:`~kvsculpt.cache.quantize_cache` stores them), the gradient
passes the rounding unchanged (the straight-through estimator), and the result is the quantised cache; the KL
that chooses the best iterate is that of the stored codes.

Optimisation: Adam on offsets measured in units of each layer tensor's RMS (so ``refine_lr`` is a relative
step, by default set by the ratio: :attr:`~kvsculpt.config.CompressConfig.refine_step`; constant, or falling to zero along a
half cosine with ``refine_schedule="cosine"``), fp32 master copies, the model's dtype
in the forward; a validation split of the generated sequences is scored every ``refine_eval_every`` steps, the
best iterate is returned (never worse than the start on it), and training stops early after
``refine_patience`` evaluations without improvement or after ``refine_time`` seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cache import CompressedCache, CompressedLayer, quantize_cache, shared_cache
from .config import CompressConfig
from .core.kl import at_least_fp32, coarse, coarse_kl
from .core.quant import quantize_keys, quantize_values
from .hf.capture import chat_template_parts, repeat_prompt_ids, stage
from .hf.decode import forward, prefill, text_ids, top_p_pick

STUDY_REQUESTS = (
    "Summarise the text above.",
    "Ask a question about the text above, then answer it.",
    "Explain the most important part of the text above to a newcomer.",
    "List the names, terms and facts that matter in the text above.",
)


@dataclass
class RefineData:
    """Training sequences and the full cache's coarse next-token distributions on them."""

    tokens: torch.Tensor  # [N, T] token ids, fed at positions n … n+T−1
    top_ids: torch.Tensor  # [N, T, k] the teacher's k most likely next tokens at each position
    top_logp: torch.Tensor  # [N, T, k] their log-probabilities (fp32)
    tail_logp: torch.Tensor  # [N, T] log of the probability left to the other tokens (fp32)
    source: list[str]  # [N] which source each sequence came from
    seconds: float


# ------------------------------------------------------------------------------------------ data
@torch.inference_mode()
def make_data(model, tokenizer, keys, values, last_logits, context_ids, cfg: CompressConfig,
              progress: bool = False) -> RefineData:  # fmt: skip
    """Generate the refine sequences from the full cache (keys/values per layer ``[Hkv, n, d]``,
    ``last_logits [V]`` after the context, ``context_ids [1, n]``) and the teacher's distributions on them.

    The sampled sources (``self``, ``study``) run as one batch, token by token: a study row is fed its request's
    tokens first (forced), then its own samples, so requests of different lengths need no padding; the teacher's
    distribution at each position is kept from the same forward that sampled the next token. ``repeat`` rows
    are known in advance and get one teacher pass."""
    t0 = time.perf_counter()
    n, T, S = keys[0].shape[1], cfg.refine_length, cfg.refine_samples
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # not the self queries' seed: other samples
    sources = cfg.refine_sources
    sampled = [s for s in sources if s != "repeat"]
    forwards = T * bool(sampled) + -(-S // cfg.refine_batch) * ("repeat" in sources)
    bar = tqdm(
        total=forwards, desc=f"refine data ({'+'.join(sources)})", unit="forward", disable=not progress
    )
    prefixes: dict[str, list[torch.Tensor]] = {}  # sampled source → forced tokens per row (self: none)
    for src in sampled:
        if src == "self":
            prefixes[src] = [torch.zeros(0, dtype=torch.long)] * S
        else:
            reply_start = chat_template_parts(_need(tokenizer, src))[1]
            prefixes[src] = [text_ids(tokenizer, f"\n\n{STUDY_REQUESTS[i % len(STUDY_REQUESTS)]}{reply_start}")[0]
                             for i in range(S)]  # fmt: skip
            if max(len(p) for p in prefixes[src]) >= T:
                raise ValueError(f"refine_length {T} leaves no room for a reply to a study request")
    by_source = {}  # source → (tokens [S, T], top ids, top log-probs, tail)
    if sampled:
        out = _sample_with_teacher(
            model, keys, values, last_logits, sum(prefixes.values(), []), T, cfg, gen, bar
        )
        for i, src in enumerate(sampled):
            by_source[src] = tuple(x[i * S : (i + 1) * S] for x in out)
    if "repeat" in sources:
        prompt = repeat_prompt_ids(_need(tokenizer, "repeat"), "kvzip")[0]
        chunk = T - prompt.shape[0]
        if chunk < 1 or n < chunk:
            raise ValueError(
                f"refine_length {T} leaves no room for a repeat chunk (prompt {prompt.shape[0]})"
            )
        starts = torch.randint(0, n - chunk + 1, (S,), generator=gen).tolist()
        tokens = torch.stack([torch.cat([prompt, context_ids[0, a : a + chunk].cpu()]) for a in starts])
        teach = []
        for i in range(0, S, cfg.refine_batch):
            x = tokens[i : i + cfg.refine_batch]
            logits = forward(model, x, shared_cache(model, keys, values), n)
            teach.append([t.cpu() for t in coarse(logits, cfg.refine_topk)])
            bar.update()
        by_source["repeat"] = (tokens, *(torch.cat(p) for p in zip(*teach, strict=True)))
    bar.close()
    tokens, top_ids, top_logp, tail = (
        torch.cat(t) for t in zip(*(by_source[s] for s in sources), strict=True)
    )
    return RefineData(tokens, top_ids, top_logp, tail, [s for s in sources for _ in range(S)],
                      time.perf_counter() - t0)  # fmt: skip


def _sample_with_teacher(model, keys, values, last_logits, prefixes, T, cfg, gen, bar):
    """``len(prefixes)`` sequences of ``T`` tokens continuing the full cache: row ``i`` starts with the forced
    tokens ``prefixes[i]``, then samples. Returns ``(tokens [B, T], top ids, top log-probs, tail)``, the
    teacher's coarse distribution at every position taken from the forward that fed that position."""
    B, dev, n = len(prefixes), model.device, keys[0].shape[1]
    pick = top_p_pick(cfg.temperature, cfg.top_p, gen)
    forced = torch.full((B, T), -1, dtype=torch.long)
    for i, p in enumerate(prefixes):
        forced[i, : len(p)] = p
    forced = forced.to(dev)
    x = torch.where(forced[:, 0] >= 0, forced[:, 0], pick(last_logits[None].expand(B, -1))[:, 0])[:, None]
    cache, tokens, teach = shared_cache(model, keys, values), [x], []
    for t in range(T):
        logits = forward(model, x, cache, n + t, last_only=True)[:, -1]
        teach.append([a.cpu() for a in coarse(logits, cfg.refine_topk)])
        if bar is not None:
            bar.update()
        if t + 1 < T:
            x = torch.where(forced[:, t + 1] >= 0, forced[:, t + 1], pick(logits)[:, 0])[:, None]
            tokens.append(x)
    top_ids, top_logp, tail = (torch.stack(p, 1) for p in zip(*teach, strict=True))
    return torch.cat(tokens, 1).cpu(), top_ids, top_logp, tail


def _need(tokenizer, src):
    if tokenizer is None:
        raise ValueError(f"refine data source {src!r} needs the tokenizer (pass tokenizer=...)")
    return tokenizer


def split_validation(data: RefineData, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, validation): ``fraction`` of each source's sequences held out (at least one, when the
    source has two or more)."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for src in dict.fromkeys(data.source):
        idx = torch.tensor([i for i, s in enumerate(data.source) if s == src])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = 0 if len(idx) < 2 or fraction <= 0 else max(1, round(fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train), torch.cat(val)


# ------------------------------------------------------------------------------------------ the student
class Student(torch.nn.Module):
    """The compressed block as trainable offsets (fp32 masters, or the cache's dtype if wider): per layer
    ``K = K0 + rms(K0)·u_K``, ``V = V0 + rms(V0)·u_V`` and ``β = β0 + u_β`` (flat ``[Σ m_h, d]`` and ``[Σ m_h]``,
    as :class:`CompressedLayer` stores them). ``params``: which offsets train (:data:`~kvsculpt.config.REFINE_PARAMS`).
    The offsets start at zero, so the student starts as the cache it refines (a quantised cache: as its
    dequantised block). ``storage``: ``(value bits, key bits, group)`` when the block is stored quantised: the
    forward then goes through the codes, straight through for the gradient, and :meth:`cache` with
    ``detach`` returns the quantised cache."""

    def __init__(self, cache: CompressedCache, params: str, storage: tuple[int, int, int] | None = None):
        super().__init__()
        self.lengths = [layer.lengths for layer in cache.layers]
        self.n, self.dtype, self.storage = cache.n, cache.layers[0].dtype, storage
        self.k0, self.v0, self.b0, self.sk, self.sv = [], [], [], [], []
        for layer in cache.layers:  # clones: the init's tensors may be inference tensors
            keys, values = layer.dense()
            k0 = at_least_fp32(keys.detach()).clone()
            v0 = at_least_fp32(values.detach()).clone()
            self.k0.append(k0)
            self.v0.append(v0)
            self.sk.append(k0.pow(2).mean().sqrt().clamp_min(1e-6))
            self.sv.append(v0.pow(2).mean().sqrt().clamp_min(1e-6))
            b = layer.block_bias
            self.b0.append(None if b is None else at_least_fp32(b.detach()).clone())
        self.uk = torch.nn.ParameterList([torch.zeros_like(k) for k in self.k0])
        self.uv = torch.nn.ParameterList([torch.zeros_like(v) for v in self.v0])
        self.ub = (
            torch.nn.ParameterList([torch.zeros_like(k[:, 0]) for k in self.k0]) if "b" in params else None
        )
        self.uk.requires_grad_("k" in params)

    def masters(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Layer ``i``'s block as trained: keys, values, β (or None)."""
        k = self.k0[i] + self.sk[i] * self.uk[i]
        v = self.v0[i] + self.sv[i] * self.uv[i]
        b = self.b0[i]
        if self.ub is not None:
            b = self.ub[i] if b is None else b + self.ub[i]
        return k, v, b

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Layer ``i``'s block as the forward sees it (through the codes, when stored quantised)."""
        k, v, b = self.masters(i)
        if self.storage is not None:  # straight through: the codes' values forward, the identity backward
            bits, key_bits, group = self.storage
            k_stored = quantize_keys(k.detach().to(self.dtype), self.lengths[i], key_bits, group)
            v_stored = quantize_values(v.detach().to(self.dtype), bits, group)
            k = k + (k_stored.dequantize(k.dtype) - k).detach()
            v = v + (v_stored.dequantize(v.dtype) - v).detach()
        return k, v, b

    def cache(self, model, detach: bool = False) -> CompressedCache:
        """A fresh :class:`CompressedCache` of the current block: differentiable, or with ``detach`` the cache
        as it is stored (the masters, quantised when the block is: the very codes the forward went through)."""
        layers = []
        for i, lengths in enumerate(self.lengths):
            if detach:
                k, v, b = (None if x is None else x.detach() for x in self.masters(i))
            else:
                k, v, b = self.layer(i)
            layers.append(CompressedLayer(k.to(self.dtype), v.to(self.dtype), lengths, b, self.n))
        cache = CompressedCache(model, layers)
        if detach and self.storage is not None:
            bits, key_bits, group = self.storage
            cache = quantize_cache(cache, bits, group, key_bits)
        return cache

    def offsets(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def load_offsets(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), saved, strict=True):
                p.copy_(s)


def storage_of(cache: CompressedCache, cfg: CompressConfig) -> tuple[int, int, int] | None:
    """``(value bits, key bits, group)`` the refined block is stored in: the config's ``kv_bits`` (below 16), or
    else the init's own quantisation; None for the model's dtype. A quantised init and a config asking for
    other bits is refused."""
    layer = cache.layers[0]
    own = (
        (layer.block_values.bits, layer.block_keys.bits, layer.block_values.group)
        if layer.quantized
        else None
    )
    asked = None if cfg.kv_bits == 16 else (cfg.kv_bits, cfg.key_bits or cfg.kv_bits, cfg.kv_group)
    if own and asked and own != asked:
        raise ValueError(
            f"the cache is stored in (value bits, key bits, group) {own}, the config asks {asked}"
        )
    return asked or own


@contextlib.contextmanager
def frozen(model):
    """The model's own parameters take no gradient inside the block (their flags are restored after)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def batch_kl(model, student: Student, data: RefineData, idx: torch.Tensor) -> torch.Tensor:
    """Mean coarse KL per position of the sequences ``idx`` on the student's block (differentiable)."""
    dev = model.device
    logits = forward(model, data.tokens[idx].to(dev), student.cache(model), student.n)
    return coarse_kl(data.top_ids[idx].to(dev), data.top_logp[idx].to(dev), data.tail_logp[idx].to(dev),
                     logits).mean()  # fmt: skip


@torch.no_grad()
def mean_kl(model, student: Student, data: RefineData, idx: torch.Tensor, batch: int) -> float:
    """Mean coarse KL per position over the sequences ``idx``, ``batch`` at a time (no gradient)."""
    total = 0.0
    for i in range(0, len(idx), batch):
        part = idx[i : i + batch]
        total += float(batch_kl(model, student, data, part)) * len(part)
    return total / max(1, len(idx))


# ------------------------------------------------------------------------------------------ refine
def refine(model, cache: CompressedCache, context_ids: torch.Tensor, config: CompressConfig | None = None, *,
           tokenizer=None, progress: bool = True, **changes) -> CompressedCache:  # fmt: skip
    """Refine ``cache`` (any method's result for ``context_ids [1, n]``) end to end; the full cache is
    prefilled here. ``changes`` update the config, e.g. ``refine(model, cache, ids, tokenizer=tok,
    refine_steps=30)``. Without a config, the ratio (which sets the default step) is the cache's own.
    Returns a new cache; ``cache`` is not changed."""
    if config is None:
        ratio = cache.info.get("ratio") or cache.kept_entries() / cache.full_entries()
        config = CompressConfig(refine="kl", ratio=ratio)
    cfg = config.replace(**changes)
    stage(progress, f"refine: prefill of {context_ids.shape[-1]} tokens for the teacher")
    full, last, _ = prefill(model, context_ids)
    keys = [layer.keys[0] for layer in full.layers]
    values = [layer.values[0] for layer in full.layers]
    return refine_from(model, cache, keys, values, last, context_ids, cfg, tokenizer, progress)


def refine_from(model, cache: CompressedCache, keys, values, last_logits, context_ids, cfg: CompressConfig,
                tokenizer=None, progress: bool = True, data: RefineData | None = None,
                on_eval: Callable[[int, float, float, CompressedCache], None] | None = None) -> CompressedCache:  # fmt: skip
    """Refine ``cache`` against the full cache given by its keys and values (per layer ``[Hkv, n, d]``) and
    ``last_logits [V]``. ``data``: sequences made earlier by :func:`make_data` for the same context (else made
    here). ``on_eval(step, seconds, val_kl, best_cache)``: called at every validation (benchmarks use it)."""
    if data is None:
        data = make_data(model, tokenizer, keys, values, last_logits, context_ids, cfg, progress)
    t_start = time.perf_counter()
    train, val = split_validation(data, cfg.refine_val, cfg.seed)
    if len(train) == 0:
        raise ValueError("refine has no training sequences left after the validation split")
    check = val if len(val) else train  # with no validation split, the best iterate is chosen on train
    student = Student(cache, cfg.refine_params, storage_of(cache, cfg))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.refine_step)
    cosine = cfg.refine_schedule == "cosine"
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.refine_steps, 1)) if cosine else None
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    order, at = torch.randperm(len(train), generator=gen), 0
    t_train = time.perf_counter()
    with frozen(model):
        best_kl = init_kl = mean_kl(model, student, data, check, cfg.refine_batch)
        best, best_step, curve, stale, step = student.offsets(), 0, [(0, 0.0, init_kl)], 0, 0
        if on_eval:
            on_eval(0, 0.0, init_kl, student.cache(model, detach=True))
        bar = tqdm(
            total=cfg.refine_steps, desc="refine (KL to the full cache)", unit="step", disable=not progress
        )
        bar.set_postfix_str(f"val KL {init_kl:.4g}")
        for step in range(1, cfg.refine_steps + 1):
            if at + cfg.refine_batch > len(train):
                order, at = torch.randperm(len(train), generator=gen), 0
            idx = train[order[at : at + cfg.refine_batch]]
            at += cfg.refine_batch
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                batch_kl(model, student, data, idx).backward()
            opt.step()
            if decay:
                decay.step()
            bar.update()
            out_of_time = cfg.refine_time is not None and time.perf_counter() - t_train >= cfg.refine_time
            if step % cfg.refine_eval_every and step != cfg.refine_steps and not out_of_time:
                continue
            kl = mean_kl(model, student, data, check, cfg.refine_batch)
            curve.append((step, time.perf_counter() - t_train, kl))
            if kl < best_kl:
                best_kl, best, best_step, stale = kl, student.offsets(), step, 0
            else:
                stale += 1
            bar.set_postfix_str(f"val KL {kl:.4g} (best {best_kl:.4g} at step {best_step})")
            if on_eval:
                saved = student.offsets()
                student.load_offsets(best)
                on_eval(step, curve[-1][1], kl, student.cache(model, detach=True))
                student.load_offsets(saved)
            if out_of_time or stale >= cfg.refine_patience:
                break
        bar.close()
    train_seconds = time.perf_counter() - t_start
    student.load_offsets(best)
    out = student.cache(model, detach=True)
    out.method, out.context_ids = cache.method, cache.context_ids
    out.info = {
        **cache.info,
        **out.info,  # the quantisation, if any
        "refine_seconds": data.seconds + train_seconds,  # the data (made here or before) and the training
        "refine_data_seconds": data.seconds,
        "refine_lr_used": cfg.refine_step,  # the relative step that ran (refine_lr, or the rule by ratio)
        "refine_steps_run": step,
        "refine_best_step": best_step,
        "refine_val_kl": best_kl,
        "refine_val_kl_init": init_kl,
        "refine_val_sequences": len(val),
        "refine_tail_mass": float(data.tail_logp.exp().mean()),
        "refine_curve": curve,
    }
    if "compress_seconds" in cache.info:
        out.info["compress_seconds"] = cache.info["compress_seconds"] + out.info["refine_seconds"]
    return out
