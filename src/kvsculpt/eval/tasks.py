"""Retrieval tasks asked after compression (question-agnostic): the pass key, RULER-style synthetic tasks and
document QA, generated from a seed with the shipped 2025–2026 texts as the haystack.

Every task is a context of ``n`` tokens (at most ``n`` for ``cwe``) compressed **before** the question is seen,
then a question asked on the compressed cache and answered greedily. A sample's answer is a list of items; its
score is the fraction of them found in the reply (:func:`score_reply`), so single-answer tasks score 0 or 1.

* ``niah_single``: one "special magic number" for a made-up key, hidden in prose; ask for it.
* ``niah_multikey``: four numbers for four different keys; ask for one (the others are distractors).
* ``niah_multivalue``: four numbers for the same key; ask for all four.
* ``vt`` (variable tracking): ``VAR A = 12345.``, then ``VAR B = VAR A.``, … (four hops) spread through the
  prose; ask which variables hold the value.
* ``cwe`` (common-words extraction): a numbered list of words (no prose) where five words take about 40 % of the
  lines (up to 30 times each, as RULER's) and the others appear 3 times each; ask for the five most common.
* ``doc_qa``: a window of a shipped code text (not flagged as memorised) holding the definition of a function with at
  least two parameters (``self``/``cls`` not counted); ask for its parameters in order; the answer is the first
  three parameter names, spans of the document.

The haystack for the needle tasks is the shipped prose texts not flagged as memorised, joined in a seeded order
from a seeded offset. The phrasing of the needles and questions follows RULER's task descriptions, in our own words.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass

import torch

from ..hf.decode import decode, prefill
from ..hf.models import encode
from .texts import TextTooShortError, load_text, text_index

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
    answer = decode(model, cache, encode(tokenizer, PASSKEY_QUESTION), n, 8)
    return key in tokenizer.decode(answer[0])


def passkey_full_cache(model, tokenizer, ids: torch.Tensor, key: str) -> bool:
    """Whether the model finds the pass key with its full, uncompressed cache (the reference)."""
    cache, _, _ = prefill(model, ids)
    return passkey_found(model, tokenizer, cache, ids.shape[1], key)


# ------------------------------------------------------------------------------------------ RULER-style tasks
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "doc_qa")
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucid", "mellow", "nimble", "opal", "proud", "quiet", "rustic", "silent", "tidy")  # fmt: skip
NOUNS = ("anchor", "beacon", "canyon", "dagger", "ember", "falcon", "glacier", "harbor", "island", "jungle",
         "kettle", "lantern", "meadow", "nebula", "orchard", "pebble", "quarry", "river", "summit", "tunnel")  # fmt: skip
CWE_TOP, CWE_TOP_MOST, CWE_OTHER_COUNT = 5, 30, 3


@dataclass
class TaskSample:
    """One question: ``context [1, ≤ n]`` is compressed first; ``question`` is asked after it; the reply should
    contain every item of ``answers``; ``max_new_tokens`` bounds the reply."""

    task: str
    index: int
    context: torch.Tensor
    question: str
    answers: list[str]
    max_new_tokens: int
    source: str


def task_samples(tokenizer, task: str, n: int, count: int, seed: int = 0) -> list[TaskSample]:
    """``count`` samples of ``task`` with ``n``-token contexts; sample ``i`` depends only on (task, n, seed, i)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    make = {"niah_single": _niah, "niah_multikey": _niah, "niah_multivalue": _niah, "vt": _vt, "cwe": _cwe,
            "doc_qa": _doc_qa}[task]  # fmt: skip
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(hash_seed(task, n, seed, i))
        out.append(make(tokenizer, task, n, i, gen, seed))
    return out


def hash_seed(*parts) -> int:
    """A stable 63-bit seed from ``parts`` (Python's ``hash`` of a string changes between runs)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def score_reply(reply: str, answers: list[str]) -> float:
    """The fraction of ``answers`` found in ``reply``, cut at its first blank line after some text (the model
    going on to other matters). An item counts when it appears as a whole word, case-insensitively: ``1234567``
    is not found in ``12345678``, nor ``wrap`` in ``wrapper``; punctuation or backticks around it do not matter,
    and neither does the order."""
    body = reply.lstrip()
    cut = body.find("\n\n")
    body = body if cut < 0 else body[:cut]
    found = [re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", body, flags=re.IGNORECASE) for a in answers]
    return sum(f is not None for f in found) / len(answers)


def _pick(gen, seq):
    return seq[int(torch.randint(0, len(seq), (1,), generator=gen))]


def _number(gen) -> str:
    return str(int(torch.randint(1_000_000, 9_999_999, (1,), generator=gen)))


def _haystack(tokenizer, n: int, gen) -> torch.Tensor:
    """``n`` tokens of the shipped prose (not memorised), joined in a seeded order from a seeded offset."""
    names = sorted(k for k, v in text_index().items() if v["kind"] == "prose" and not v["memorised"])
    order = torch.randperm(len(names), generator=gen).tolist()
    ids = encode(tokenizer, "\n\n".join(load_text(names[i]) for i in order))
    if ids.shape[1] < n:
        raise TextTooShortError(f"the shipped prose has {ids.shape[1]} tokens, fewer than {n}")
    start = int(torch.randint(0, ids.shape[1] - n + 1, (1,), generator=gen))
    return ids[:, start : start + n]


def _plant(tokenizer, body: torch.Tensor, needles: list[str], gen) -> torch.Tensor:
    """``needles`` (in order) put into ``body [1, n]`` at seeded depths just after line breaks where the body has
    them, the body trimmed so that the result has exactly ``n`` tokens."""
    pieces = [encode(tokenizer, f"\n{s}\n") for s in needles]
    n = body.shape[1]
    body = body[:, : n - sum(p.shape[1] for p in pieces)]
    tokens = tokenizer.convert_ids_to_tokens(body[0].tolist())
    breaks = [i + 1 for i, t in enumerate(tokens) if "\n" in tokenizer.convert_tokens_to_string([t])]
    spots = breaks if len(breaks) >= 2 * len(needles) else list(range(body.shape[1] + 1))
    at = sorted(spots[int(j)] for j in torch.randperm(len(spots), generator=gen)[: len(needles)])
    parts, prev = [], 0
    for a, p in zip(at, pieces, strict=True):
        parts += [body[:, prev:a], p]
        prev = a
    return torch.cat([*parts, body[:, prev:]], dim=1)


def _niah(tokenizer, task, n, i, gen, seed) -> TaskSample:
    keys = []
    while len(keys) < 4:
        k = f"{_pick(gen, ADJECTIVES)}-{_pick(gen, NOUNS)}"
        if k not in keys:
            keys.append(k)
    if task == "niah_single":
        pairs = [(keys[0], _number(gen))]
    elif task == "niah_multikey":
        pairs = [(k, _number(gen)) for k in keys]
    else:
        pairs = [(keys[0], _number(gen)) for _ in range(4)]
    asked = pairs[int(torch.randint(0, len(pairs), (1,), generator=gen))][0]
    order = torch.randperm(len(pairs), generator=gen).tolist()
    needles = [f"One of the special magic numbers for {pairs[j][0]} is: {pairs[j][1]}." for j in order]
    body = _haystack(tokenizer, n, gen)
    answers = [v for k, v in pairs if k == asked]
    if task == "niah_multivalue":
        question = (f"\n\nQuestion: What are all the special magic numbers for {asked} mentioned in the text "
                    f"above?\nAnswer: The special magic numbers for {asked} mentioned in the text above are")  # fmt: skip
    else:
        question = (f"\n\nQuestion: What is the special magic number for {asked} mentioned in the text above?"
                    f"\nAnswer: The special magic number for {asked} mentioned in the text above is")  # fmt: skip
    return TaskSample(task, i, _plant(tokenizer, body, needles, gen), question, answers,
                      12 * len(answers), "prose")  # fmt: skip


def _vt(tokenizer, task, n, i, gen, seed) -> TaskSample:
    names = []
    while len(names) < 5:
        s = "".join(chr(65 + int(c)) for c in torch.randint(0, 26, (5,), generator=gen))
        if s not in names:
            names.append(s)
    value = str(int(torch.randint(10000, 99999, (1,), generator=gen)))
    needles = [f"VAR {names[0]} = {value}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)
    ]
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above.\n"
                f"Answer: Following the chain of variable assignments in the text above, {len(names)} variables "
                f"are assigned the value {value}; they are:")  # fmt: skip
    body = _haystack(tokenizer, n, gen)
    return TaskSample(task, i, _plant(tokenizer, body, needles, gen), question, names, 40, "prose")


@functools.cache
def _cwe_words() -> list[str]:
    """Lower-case words of 4–10 letters from every shipped text, sorted (the pool the list is drawn from)."""
    words = set()
    for name in text_index():
        words.update(w for w in re.findall(r"\b[a-z]{4,10}\b", load_text(name)))
    return sorted(words)


def _cwe(tokenizer, task, n, i, gen, seed) -> TaskSample:
    pool = _cwe_words()
    picked = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
    top, others = picked[:CWE_TOP], picked[CWE_TOP:]
    question = (f"\n\nQuestion: What are the {CWE_TOP} most common words in the numbered list above?\n"
                f"Answer: The {CWE_TOP} words that appear most often in the list are:")  # fmt: skip
    per_line = encode(tokenizer, f"100. {top[0]}\n").shape[1]
    top_count = max(CWE_OTHER_COUNT + 2, min(CWE_TOP_MOST, int(0.4 * n / per_line / CWE_TOP)))

    def listing(m: int) -> torch.Tensor:  # the top words and m others, in one seeded order
        words = [w for w in top for _ in range(top_count)]
        words += [w for w in others[:m] for _ in range(CWE_OTHER_COUNT)]
        order = torch.randperm(len(words), generator=torch.Generator().manual_seed(list_seed)).tolist()
        return encode(tokenizer, "".join(f"{k + 1}. {words[j]}\n" for k, j in enumerate(order)))

    list_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lo, hi = 0, len(others)  # the most other words whose list still fits in n tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if listing(mid).shape[1] <= n else (lo, mid - 1)
    ids = listing(lo)
    if ids.shape[1] > n:
        raise TextTooShortError(f"a {n}-token context is too short for a list of the {CWE_TOP} common words")
    return TaskSample(task, i, ids, question, top, 40, "words of the shipped texts")


def function_parameters(source: str) -> list[tuple[str, list[str], int]]:
    """``(name, parameter names in order, character offset of its ``def`` line)`` of every function in the Python
    ``source`` (``self``/``cls`` dropped; ``*args`` and ``**kwargs`` by name)."""
    import ast

    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in [*a.posonlyargs, *a.args]] + ([a.vararg.arg] if a.vararg else [])
            names += [x.arg for x in a.kwonlyargs] + ([a.kwarg.arg] if a.kwarg else [])
            out.append((node.name, [x for x in names if x not in ("self", "cls")], starts[node.lineno - 1]))
    return sorted(out, key=lambda f: f[2])


@functools.cache
def _doc_functions() -> list[tuple[str, str, list[str], int]]:
    """``(text, function, parameters, offset)`` of every function of the shipped code (not memorised) with at
    least two parameters, not a dunder, and defined once in its text (so the question names one definition)."""
    out = []
    for name in sorted(k for k, v in text_index().items() if v["kind"] == "code" and not v["memorised"]):
        found = function_parameters(load_text(name))
        defined = Counter(fn for fn, _, _ in found)
        out += [(name, fn, params, at) for fn, params, at in found
                if len(params) >= 2 and not fn.startswith("__") and defined[fn] == 1]  # fmt: skip
    return out


def _doc_qa(tokenizer, task, n, i, gen, seed) -> TaskSample:
    candidates = _doc_functions()
    # sample i asks about the i-th function of one seeded order (no repeats before every function is asked);
    # if its definition does not lie whole in its window (a text's end), the next one
    order = torch.randperm(
        len(candidates), generator=torch.Generator().manual_seed(hash_seed(task, seed))
    ).tolist()
    for j in range(20):
        name, fn, params, at = candidates[order[(i + j) % len(candidates)]]
        text = load_text(name)
        all_ids = encode(tokenizer, text)
        if all_ids.shape[1] < n:
            continue
        before = encode(tokenizer, text[:at]).shape[1]  # the definition's token offset (near enough)
        depth = int(torch.randint(int(0.05 * n), int(0.9 * n), (1,), generator=gen))
        start = min(max(0, before - depth), all_ids.shape[1] - n)
        ids = all_ids[:, start : start + n]
        shown = tokenizer.decode(ids[0])
        if re.search(rf"def\s+{fn}\s*\(", shown) and all(p in shown for p in params[:3]):
            break
    else:
        raise TextTooShortError(f"no function definition fits a {n}-token window of the shipped code")
    question = (f"\n\nQuestion: In the code above, what are the parameters of the function `{fn}`, in order?\n"
                f"Answer: The function `{fn}` takes the parameters")  # fmt: skip
    return TaskSample(task, i, ids, question, params[:3], 30, name)
