"""Retrieval tasks asked after compression (question-agnostic): the pass key."""

from __future__ import annotations

import torch

from ..hf.decode import decode, prefill
from ..hf.models import encode
from .texts import TextTooShortError

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
