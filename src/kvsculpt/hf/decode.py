"""The one decode path: prefill, a forward at explicit positions, and a token loop (greedy or sampled).

Evaluation, self-query sampling, :func:`ask` and the speed benchmark all run through these functions.
Positions are always explicit (``start …``), so a compressed cache whose physical length is not its
logical length ``n`` gets the right rotary positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .attention import reuse_masks


def check_ids(ids: torch.Tensor, device=None) -> torch.Tensor:
    """Context ids as ``[1, n]`` on ``device``; a clear error for anything else."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        raise TypeError("context ids must be a LongTensor of token ids")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"context ids must have shape [1, n]; got {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("the context is empty")
    return ids.to(device) if device is not None else ids


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """``text`` as token ids ``[1, t]``, with no special tokens added (it continues a context)."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def forward(model, ids: torch.Tensor, cache, start: int, last_only: bool = False) -> torch.Tensor:
    """Run ``ids [B, q]`` on ``cache`` (extended in place) at positions ``start … start+q−1``.
    Returns logits ``[B, q, V]`` (``[B, 1, V]`` with ``last_only``)."""
    ids = ids.to(model.device)
    pos = torch.arange(start, start + ids.shape[1], device=model.device)[None].expand(ids.shape[0], -1)
    kw = {"logits_to_keep": 1} if last_only else {}
    with reuse_masks():
        return model(ids, past_key_values=cache, position_ids=pos, use_cache=True, **kw).logits


@torch.inference_mode()
def read_tokens(model, cache, start: int, prompt: torch.Tensor, tokens: list[int]):
    """Read ``prompt [1, q]`` then ``tokens`` one at a time on ``cache`` (logical length ``start``), as a
    generation would (teacher-forced). Returns the log-probabilities ``[T, V]`` (fp32, on the CPU) before each
    of the ``T`` tokens and the seconds of the token-by-token part. O(T) forwards of one token."""
    import time

    out = [forward(model, prompt, cache, start, last_only=True)[0, -1].float().log_softmax(-1).cpu()]
    pos, t0 = start + prompt.shape[1], time.perf_counter()
    for t in tokens[:-1]:
        ids = torch.tensor([[t]], device=model.device)
        out.append(forward(model, ids, cache, pos, last_only=True)[0, -1].float().log_softmax(-1).cpu())
        pos += 1
    return torch.stack(out), time.perf_counter() - t0


def full_cache(model, context_ids: torch.Tensor):
    """The full, uncompressed cache of ``context_ids [1, n]`` (one prefill) as a cache :func:`ask` and
    ``generate`` take like a compressed one: what the full context would have said. O(n) memory."""
    from ..cache import shared_cache
    from .attention import use_kvsculpt_attention

    use_kvsculpt_attention(model)
    full, _, _ = prefill(model, context_ids)
    out = shared_cache(
        model, [layer.keys[0] for layer in full.layers], [layer.values[0] for layer in full.layers]
    )
    out.context_ids = check_ids(context_ids).cpu()
    return out


# Tokens a forward for every prefill that does not say (capture, full_cache, the learned scorer, evaluation);
# None: one forward.
# Reading in chunks gives the same cache and bounds the prefill's transients, but on SmolLM2 at n ≤ 8192 on a CPU
# it did not lower the compression's peak (the repeat pass sets it) and, under glibc's default heap, raised it:
# docs/long-context.md, "Reading the context in chunks". On CUDA a chunk over a cache takes SDPA's masked path.
PREFILL_CHUNK: int | None = None


@torch.inference_mode()
def prefill(model, context_ids: torch.Tensor, cache=None, start: int = 0, chunk: int | None = None,
            reserve: int = 0):  # fmt: skip
    """Run the context once into ``cache`` (by default a new cache with room for the ``n`` tokens and
    ``reserve`` more: :func:`~kvsculpt.cache.roomy_cache`), its first token at position ``start`` (a part read
    after ``start`` tokens the cache holds). Returns ``(cache, last_logits [vocab] fp32, seconds)``.

    ``chunk``: read the context ``chunk`` tokens a forward, each over the cache of the ones before (None:
    :data:`PREFILL_CHUNK`; 0, or both None: one forward). The same cache up to rounding; the forward's transients (the MLP's ``[chunk, 3·D_ff]``
    activations, the attention's working set) are then those of ``chunk`` tokens whatever n is; each chunk is
    written into the cache's room, not concatenated. ``reserve``: tokens that will be appended and cropped
    again (a repeat request), so the cache never reallocates: without it the first append copies every layer,
    and a view of the context's keys taken before it keeps the old copy alive."""
    from ..cache import roomy_cache

    context_ids = check_ids(context_ids, model.device)
    n = context_ids.shape[1]
    cache = roomy_cache(n + reserve) if cache is None else cache
    step = (PREFILL_CHUNK if chunk is None else chunk) or n
    t0 = time.perf_counter()
    for a in range(0, n, step):
        logits = forward(model, context_ids[:, a : a + step], cache, start + a, last_only=True)
    return cache, logits[0, -1].float(), time.perf_counter() - t0


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of ``logits [B, V]`` → ``[B, 1]``."""
    return logits.argmax(-1, keepdim=True)


def top_p_pick(temperature: float, top_p: float, gen: torch.Generator, candidates: int = 1024) -> Callable:
    """A picker that samples one token per row of ``logits [B, V]`` (nucleus sampling) → ``[B, 1]``;
    temperature 0 is greedy. Only the ``candidates`` most likely tokens are sorted when the nucleus lies
    within them (else the whole vocabulary is); the draw is made from the same full-length weights as a full
    sort would give, so the samples are the same."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature <= 0:
            return greedy_pick(logits)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        vocab = probs.shape[-1]
        top_p_, top_i = probs.topk(min(candidates, vocab), dim=-1)  # descending
        sorted_p = torch.nn.functional.pad(top_p_, (0, vocab - top_p_.shape[-1]))
        order = torch.nn.functional.pad(top_i, (0, vocab - top_i.shape[-1]))
        mass_before = top_p_.cumsum(-1) - top_p_
        wide = mass_before[:, -1] <= top_p  # rows whose nucleus may reach past the candidates
        if top_p_.shape[-1] < vocab and bool(wide.any()):  # sort those rows only (a full sort is slow)
            sorted_p[wide], order[wide] = probs[wide].sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0.0
        weights = sorted_p.cpu()
        choice = torch.multinomial(weights, 1, generator=gen).to(order.device)
        return order.gather(-1, choice)

    return pick


@torch.inference_mode()
def decode(model, cache, prompt: torch.Tensor, start: int, steps: int, pick: Callable = greedy_pick,
           stop: Callable[[list[int]], bool] | None = None, progress=None) -> torch.Tensor:  # fmt: skip
    """Run ``prompt [B, q]`` on ``cache`` at positions ``start …``, then pick ``steps`` tokens one at a time,
    each fed back in. Returns the picked tokens ``[B, steps]`` (fewer if ``stop(tokens of row 0)`` says so
    first; batch 1 only then). ``progress``: an optional tqdm bar advanced once per step."""
    x, pos, out = prompt, start, []
    for _ in range(steps):
        logits = forward(model, x, cache, pos, last_only=True)[:, -1]
        pos += x.shape[1]
        x = pick(logits)
        out.append(x)
        if progress is not None:
            progress.update()
        if stop is not None and stop(torch.cat(out, 1)[0].tolist()):
            break
    return torch.cat(out, 1)


def eos_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the model's generation config's and the tokenizer's (they can differ)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list | tuple) else [ids])
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def text_stop(eos: set[int], tokenizer=None, stop: str | None = None) -> Callable[[list[int]], bool]:
    """A stop rule for :func:`decode`: an id in ``eos``, or ``stop`` appearing in the decoded text after its
    leading white space."""

    def done(tokens: list[int]) -> bool:
        if tokens[-1] in eos:
            return True
        return bool(stop) and stop in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    return done


def answer_text(tokenizer, tokens: list[int], stop: str | None = None) -> str:
    """Decoded answer, cut before ``stop`` (leading white space kept out of the search) and EOS."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if not stop:
        return text
    body = text.lstrip()
    return text[: len(text) - len(body)] + body.split(stop)[0]


def ask(model, tokenizer, cache, questions, max_new_tokens: int = 64, stop: str | None = None,
        decode_budget: int | None = None, every: int = 64, refit: bool = True, scope: str = "all",
        context_floor: float | str = 0.0):  # fmt: skip
    """Answer each question (a string, or a list of them) from the same compressed context, greedily; stops
    at EOS or where ``stop`` appears (after the answer's leading white space). Returns the answers' texts.

    Each question runs on a fork of ``cache`` (the compressed block is shared, nothing is recomputed), so no
    question's tokens leak into the next. ``decode_budget``: at most that many of the question's and answer's
    tokens are kept per head, cut every ``every`` tokens, the kept values refitted at each cut unless ``refit=False``;
    ``scope="all"``: the budget bounds the whole cache, the context's entries included, though never below
    ``context_floor`` of each head's (:meth:`~kvsculpt.cache.CompressedCache.fork`).
    """
    from ..cache import check_decode_budget

    check_decode_budget(decode_budget, every, scope=scope, context_floor=context_floor)
    single = isinstance(questions, str)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
    if any(not q.strip() for q in ([questions] if single else questions)) or not questions:
        raise ValueError("a question is empty: give the text to continue the context with")
    eos, answers = eos_ids(model, tokenizer), []
    for question in [questions] if single else questions:
        q = text_ids(tokenizer, question)
        fork = cache.fork(decode_budget, every, refit=refit, scope=scope, context_floor=context_floor)
        tokens = decode(model, fork, q, cache.n, max_new_tokens,
                        stop=text_stop(eos, tokenizer, stop))  # fmt: skip
        answers.append(answer_text(tokenizer, tokens[0].tolist(), stop))
    return answers[0] if single else answers
