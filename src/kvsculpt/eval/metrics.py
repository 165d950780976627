"""Held-out KL (SPEC §4), perplexity and top-1 agreement of a compressed cache against the full cache.

The text is ``context (n tokens) + continuation (T tokens)``. Teacher: the full cache, then the continuation.
Student: a compressed cache, then the same continuation at positions ``n … n+T−1``.
``KL = mean over the T positions of KL(P ‖ P')`` in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..hf.decode import forward, prefill
from .texts import Window


def kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ P')`` per position, in nats: logits ``[T, V]`` → ``[T]``."""
    lp = F.log_softmax(teacher_logits.float(), dim=-1)
    lq = F.log_softmax(student_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def read_agreement(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, tokens, block: int = 128
) -> dict:
    """How closely a run read the same tokens as a teacher: log-probabilities ``[T, V]`` before each of
    ``tokens`` (``[T]`` ids) → ``kl`` (mean over positions), ``kl_worst_block`` (the worst mean over blocks of
    ``block`` positions), ``kl_last_quarter`` and ``agree`` (the run's argmax is the teacher's token)."""
    kl = kl_per_position(teacher_logprobs, student_logprobs)
    blocks = (
        kl[: len(kl) // block * block].view(-1, block).mean(-1) if len(kl) >= block else kl[None].mean(-1)
    )
    got = student_logprobs.argmax(-1).cpu()
    return {"kl": float(kl.mean()), "kl_worst_block": float(blocks.max()),
            "kl_last_quarter": float(kl[-max(1, len(kl) // 4) :].mean()),
            "agree": float((got == torch.as_tensor(tokens)).float().mean())}  # fmt: skip


def nll_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood ``[T]`` of ``targets [T]`` under next-token logits ``[T, V]`` (``logits[t]``
    predicts ``targets[t]``)."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


@torch.inference_mode()
def continuation_logits(model, cache, continuation: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``[T, V]`` (fp32) of the continuation ``[1, T]`` run after ``cache`` at positions ``start …``.
    ``cache`` is extended in place; pass a fork if it must stay as it is."""
    return forward(model, continuation, cache, start)[0].float()


@dataclass
class Teacher:
    """The full-cache reference for one window."""

    logits: torch.Tensor  # [T, V]: predictions after context + continuation[:t]
    last_logits: torch.Tensor  # [V]: prediction after the context alone
    nll: float  # teacher's mean NLL per continuation token (memorisation shows as a very low value)
    prefill_seconds: float


def teacher(model, window: Window) -> Teacher:
    cache, last, seconds = prefill(model, window.context)
    logits = continuation_logits(model, cache, window.continuation, window.context.shape[1])
    preds = torch.cat([last[None].to(logits.device), logits[:-1]], dim=0)  # first token from the context
    nll = float(nll_per_position(preds, window.continuation[0]).mean())
    return Teacher(logits, last, nll, seconds)


def score(model, cache, window: Window, ref: Teacher) -> dict:
    """KL, perplexity and top-1 agreement of a student cache against the teacher on this window.

    The first continuation token is predicted by the teacher's context logits; it is the same for both
    only if the cache reproduces them, so KL covers the T positions the cache influences after the context.
    """
    n = window.context.shape[1]
    student = continuation_logits(model, cache, window.continuation, n)
    kl = kl_per_position(ref.logits, student)
    nll = nll_per_position(student[:-1], window.continuation[0, 1:])
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "ppl": float(math.exp(float(nll.mean()))),
        "top1_agree": float((student.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
    }


def cache_stats(cache) -> dict:
    """Entries and bytes of a compressed cache against the full cache it replaces."""
    return {
        "kept_entries": cache.kept_entries(),
        "full_entries": cache.full_entries(),
        "cache_bytes": cache.nbytes(),
        "logical_bytes": cache.logical_nbytes(),
        "full_bytes": cache.full_nbytes(),
        "cache_over_full": cache.nbytes() / cache.full_nbytes(),
        "kv_bits": cache.kv_bits,
    }


def ngram_overlap(samples: torch.Tensor, continuation: torch.Tensor, order: int = 4) -> float:
    """Fraction of the continuation's ``order``-grams that occur in any self sample ``[S, L]``.

    High overlap means the model can recite what comes next (memorised text): self-query gains there
    do not measure compression.
    """
    seen = {tuple(row[i : i + order]) for row in samples.tolist() for i in range(len(row) - order + 1)}
    cont = continuation.reshape(-1).tolist()[: samples.shape[1]]
    grams = [tuple(cont[i : i + order]) for i in range(len(cont) - order + 1)]
    return sum(g in seen for g in grams) / max(1, len(grams))


MEMORISED_OVERLAP = 0.3  # self samples reproducing ≥ 30 % of the continuation's 4-grams
MEMORISED_NLL = 0.5  # or a teacher NLL below 0.5 nats/token


def looks_memorised(teacher_nll: float, self_overlap: float | None) -> bool:
    """The rule by which a window is flagged as (probably) memorised and reported apart."""
    return teacher_nll < MEMORISED_NLL or (self_overlap is not None and self_overlap >= MEMORISED_OVERLAP)


REFINE_INFO = ("refine_seconds", "refine_steps_run", "refine_val_kl", "refine_val_kl_init", "refine_lr_used")


def compress_and_score(model, tok, model_name: str, window: Window, ref: Teacher, cfg, progress: bool = True):
    """Compress ``window``'s context under ``cfg`` (a :class:`~kvsculpt.config.CompressConfig`) and score it
    against the full cache ``ref``. Returns ``(cache, row)``: the row of ``kvsculpt eval`` and the demo."""
    from ..compress import compress

    cache = compress(model, window.context, cfg, tokenizer=tok, progress=progress)
    return cache, {
        **score(model, cache, window, ref), "config": repr(cfg), "method": cache.method,
        "queries": cache.info.get("queries", cfg.queries),  # what the method read ("self"/"none" for learned)
        "ratio": cfg.ratio, "allocation": cfg.allocation, **cache_stats(cache),
        "compress_seconds": cache.info["compress_seconds"], "prefill_seconds": ref.prefill_seconds,
        "peak_extra_bytes": cache.info.get("peak_extra_bytes"), "full_cache_bytes": cache.info.get("full_cache_bytes"),
        "query_seconds": cache.info["query_seconds"], "teacher_nll": ref.nll, "model": model_name,
        "context_tokens": window.context.shape[1], "continuation_tokens": window.continuation.shape[1],
        **{k: cache.info.get(k) for k in REFINE_INFO},
    }  # fmt: skip
