"""Evaluation: held-out KL (SPEC §4), perplexity, shipped real texts.

The text is ``context (n tokens) + continuation (T tokens)``. Teacher: the full cache, then the continuation.
Student: a compressed cache, then the same continuation at positions ``n … n+T−1``.
``KL = mean over the T positions of KL(P ‖ P')`` in nats.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from .capture import prefill
from .models import encode


class TextTooShortError(ValueError):
    """A text has fewer tokens than a window needs."""


# ---------------------------------------------------------------------------- texts
def text_index() -> dict:
    """Provenance and licence of each shipped text, by name."""
    return json.loads(resources.files("kvsculpt").joinpath("texts/index.json").read_text())


def load_text(name_or_path: str) -> str:
    """A shipped text by name (see :func:`text_index`) or any text file by path."""
    index = text_index()
    if name_or_path in index:
        return resources.files("kvsculpt").joinpath(f"texts/{name_or_path}.txt").read_text(encoding="utf-8")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no text {name_or_path!r}: not a file and not a shipped text ({', '.join(index)})"
        ) from None


@dataclass
class Window:
    """One evaluation window: ``context [1, n]`` then ``continuation [1, T]``."""

    context: torch.Tensor
    continuation: torch.Tensor
    name: str = ""
    start: int = 0


def make_window(
    tokenizer, text: str, context_tokens: int, continuation_tokens: int, start=0, name="", bos=False
):
    """Cut ``text`` into a context and its continuation, beginning at token ``start``."""
    if context_tokens <= 0 or continuation_tokens <= 0:
        raise ValueError("context and continuation lengths must be positive")
    ids = encode(tokenizer, text, bos=bos)
    need = start + context_tokens + continuation_tokens
    if ids.shape[1] < need:
        raise TextTooShortError(
            f"text {name or ''} has {ids.shape[1]} tokens; {start} offset + {context_tokens} context + "
            f"{continuation_tokens} continuation = {need} needed"
        )
    ctx = ids[:, start : start + context_tokens]
    cont = ids[:, start + context_tokens : need]
    return Window(ctx, cont, name, start)


def windows(tokenizer, names, context_tokens, continuation_tokens, per_text=1, bos=False) -> list[Window]:
    """Up to ``per_text`` non-overlapping windows from each named text (texts too short are skipped)."""
    out = []
    span = context_tokens + continuation_tokens
    for name in names:
        ids_len = encode(tokenizer, load_text(name), bos=bos).shape[1]
        if ids_len < span:
            continue
        for k in range(min(per_text, ids_len // span)):
            out.append(
                make_window(
                    tokenizer, load_text(name), context_tokens, continuation_tokens, k * span, name, bos
                )
            )
    if not out:
        raise TextTooShortError(f"no text among {list(names)} has {span} tokens")
    return out


# ---------------------------------------------------------------------------- KL
def kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P ‖ P')`` per position, in nats: logits ``[T, V]`` → ``[T]``."""
    lp = F.log_softmax(teacher_logits.float(), dim=-1)
    lq = F.log_softmax(student_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def nll_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood ``[T]`` of ``targets [T]`` under next-token logits ``[T, V]``.

    ``logits[t]`` predicts ``targets[t]``.
    """
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


@torch.inference_mode()
def continuation_logits(model, cache, continuation: torch.Tensor, start: int) -> torch.Tensor:
    """Logits ``[T, V]`` of the continuation ``[1, T]`` run after ``cache``, at positions ``start …``.

    ``cache`` is extended in place; pass a fork or a copy if it must stay as it is.
    """
    continuation = continuation.to(model.device)
    T = continuation.shape[1]
    pos = torch.arange(start, start + T, device=model.device)[None]
    out = model(continuation, past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[0].float()


@dataclass
class Teacher:
    """The full-cache reference for one window."""

    logits: torch.Tensor  # [T, V]: predictions after context + continuation[:t]
    last_logits: torch.Tensor  # [V]: prediction after the context alone
    nll: float  # teacher's mean NLL per continuation token (memorisation shows as a very low value)
    prefill_seconds: float


def teacher(model, window: Window) -> Teacher:
    cache, last, _, seconds = prefill(model, window.context)
    logits = continuation_logits(model, cache, window.continuation, window.context.shape[1])
    return Teacher(logits, last, _window_nll(last, logits, window.continuation), seconds)


def _window_nll(last_logits, logits, continuation) -> float:
    """Mean NLL of the continuation: its first token from ``last_logits``, the rest from ``logits[:-1]``."""
    preds = torch.cat([last_logits[None].to(logits.device), logits[:-1]], dim=0)
    return float(nll_per_position(preds, continuation[0]).mean())


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


def full_cache_result(model, window: Window, ref: Teacher) -> dict:
    """The same measurements for the uncompressed cache (KL 0 by construction, a check of the harness)."""
    cache, _, _, _ = prefill(model, window.context)
    return score(model, cache, window, ref)


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


@torch.inference_mode()
def greedy(model, cache, prompt: torch.Tensor, start: int, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens ``[max_new_tokens]`` after ``prompt [1, q]`` run on ``cache`` at positions ``start …``.

    Positions are explicit, so this works for any cache, including ones whose physical length is not ``start``.
    """
    x, pos, out = prompt.to(model.device), start, []
    for _ in range(max_new_tokens):
        ids = torch.arange(pos, pos + x.shape[1], device=model.device)[None]
        logits = model(x, past_key_values=cache, position_ids=ids, use_cache=True).logits[:, -1]
        pos += x.shape[1]
        x = logits.argmax(-1, keepdim=True)
        out.append(int(x))
    return torch.tensor(out)


PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_context(tokenizer, text: str, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A context of exactly ``n`` tokens of ``text`` with a random 5-digit pass key planted at a random depth."""
    gen = torch.Generator().manual_seed(seed)
    key = str(int(torch.randint(10000, 99999, (1,), generator=gen)))
    needle = encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
    body = encode(tokenizer, text)[:, : n - needle.shape[1]]
    if body.shape[1] + needle.shape[1] < n:
        raise TextTooShortError(f"text too short for a {n}-token pass-key context")
    depth = int(torch.randint(0, body.shape[1], (1,), generator=gen))
    return torch.cat([body[:, :depth], needle, body[:, depth:]], dim=1), key


def passkey_found(model, tokenizer, cache, n: int, key: str) -> bool:
    """Ask for the pass key after ``cache`` (the context's cache, logical length ``n``); True if answered."""
    question = encode(tokenizer, PASSKEY_QUESTION)
    answer = tokenizer.decode(greedy(model, cache, question, n, 8))
    return key in answer
