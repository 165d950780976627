"""Shipped real texts (most written in 2025–2026, after the models' training) and evaluation windows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from ..hf.models import encode


class TextTooShortError(ValueError):
    """A text has fewer tokens than a window needs."""


def text_index(long: bool = False) -> dict:
    """Provenance and licence of each shipped text, by name. The long texts (≥ 18k tokens, ``"long": true``, for
    long-context work) are left out unless ``long``, so that every default selection of texts (benchmarks,
    task haystacks) stays as the committed results were made."""
    index = json.loads(resources.files("kvsculpt").joinpath("texts/index.json").read_text())
    return {k: v for k, v in index.items() if long or not v.get("long")}


def load_text(name_or_path: str) -> str:
    """A shipped text by name (see :func:`text_index`, long texts included) or any text file by path."""
    index = text_index(long=True)
    if name_or_path in index:
        return resources.files("kvsculpt").joinpath(f"texts/{name_or_path}.txt").read_text(encoding="utf-8")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no text {name_or_path!r}: not a file and not a shipped text ({', '.join(index)})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name_or_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@dataclass
class Window:
    """One evaluation window: ``context [1, n]`` then ``continuation [1, T]``."""

    context: torch.Tensor
    continuation: torch.Tensor
    name: str = ""
    start: int = 0

    @property
    def id(self) -> str:
        return f"{self.name}@{self.start}"


def context_ids(
    tokenizer, text: str, tokens: int | None = None, name: str = "the text", bos=False
) -> torch.Tensor:
    """The first ``tokens`` token ids ``[1, tokens]`` of ``text`` (all of it if None); a clear error if the
    text is shorter."""
    ids = encode(tokenizer, text, bos=bos)
    if tokens is not None:
        if tokens <= 0:
            raise ValueError(f"the number of context tokens must be positive; got {tokens}")
        if ids.shape[1] < tokens:
            raise TextTooShortError(f"{name} has {ids.shape[1]} tokens, fewer than the {tokens} asked for")
        ids = ids[:, :tokens]
    return ids


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
    return Window(ids[:, start : start + context_tokens], ids[:, start + context_tokens : need], name, start)


def windows(tokenizer, names, context_tokens, continuation_tokens, per_text=1, bos=False) -> list[Window]:
    """Up to ``per_text`` non-overlapping windows from each named text (texts too short are skipped)."""
    out = []
    span = context_tokens + continuation_tokens
    for name in names:
        text = load_text(name)
        ids_len = encode(tokenizer, text, bos=bos).shape[1]
        for k in range(min(per_text, ids_len // span)):
            out.append(make_window(tokenizer, text, context_tokens, continuation_tokens, k * span, name, bos))
    if not out:
        raise TextTooShortError(f"no text among {list(names)} has {span} tokens")
    return out
