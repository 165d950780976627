"""Compress while reading (``chunk_tokens``): each part read over the compressed cache of the parts before it."""

import pytest
import torch

from kvsculpt import CompressConfig, compress
from kvsculpt.eval.metrics import continuation_logits
from kvsculpt.hf.capture import capture_part
from kvsculpt.hf.decode import prefill

from .conftest import tiny_model
from .test_compress import _head, _Tok

CFG = CompressConfig(queries="self+repeat", self_samples=3, self_length=4)


def test_reading_in_one_part_gives_the_one_shot_cache(tiny):
    """A part as long as the context: capture_part and the one-shot capture read the same queries, so the two
    paths keep the same entries with the same fitted values (default method, global budgets)."""
    ids = torch.randint(0, 97, (1, 40))
    once = compress(tiny, ids, CFG.replace(ratio=0.25), tokenizer=_Tok(), progress=False)
    read = compress(tiny, ids, CFG.replace(ratio=0.25, chunk_tokens=64), tokenizer=_Tok(), progress=False)
    assert read.info["read_in_parts"] == 1 and read.budgets == once.budgets
    assert len({m for layer in once.budgets for m in layer}) > 1  # the global rule moved budget between heads
    for li in range(2):
        for h in range(2):
            torch.testing.assert_close(_head(read, li, h), _head(once, li, h), rtol=0, atol=1e-5)


def test_reading_in_parts_keeps_each_part_to_the_ratio_and_everything_when_asked():
    """In parts of 16 tokens at r = 0.25 each part keeps a quarter of its own entries (16 of 64 per part over 2
    layers × 2 heads) and its keys are the part's keys read over the compressed prefix, at the part's positions.
    At r = 1 the parts are read over exact prefixes: the block is the full cache and continues as it does."""
    model = tiny_model("llama")
    ids, cont = torch.randint(0, 97, (1, 48)), torch.randint(0, 97, (1, 6))
    cache = compress(model, ids, CFG.replace(ratio=0.25, chunk_tokens=16), tokenizer=_Tok(), progress=False)
    parts = cache.info["part_budgets"]  # [part][layer][head]
    assert cache.info["read_in_parts"] == 3 and [sum(map(sum, p)) for p in parts] == [16, 16, 16]
    assert cache.kept_entries() == 48 and cache.n == 48
    full, _, _ = prefill(model, ids)
    for li, exact in ((0, True), (1, False)):  # layer 0's keys do not depend on the prefix; layer 1's do
        for h in range(2):
            keys, start = _head(cache, li, h)[0], 0
            for p, (a, b) in zip(parts, [(0, 16), (16, 32), (32, 48)], strict=True):
                mine = keys[start : start + p[li][h]]
                start += p[li][h]
                dist = torch.cdist(mine, full.layers[li].keys[0, h, a:b].float()).min(-1).values
                assert (dist < 1e-5).all() if exact or a == 0 else (dist > 1e-4).all()
    whole = compress(model, ids, CFG.replace(ratio=1.0, chunk_tokens=16), tokenizer=_Tok(), progress=False)
    for li in range(2):
        for h in range(2):
            keys, values = _head(whole, li, h)
            torch.testing.assert_close(keys, full.layers[li].keys[0, h].float(), rtol=0, atol=1e-5)
            torch.testing.assert_close(values, full.layers[li].values[0, h].float(), rtol=0, atol=1e-4)
    ref = continuation_logits(model, full, cont, 48)
    torch.testing.assert_close(continuation_logits(model, whole, cont, 48), ref, rtol=0, atol=1e-3)


def test_a_parts_queries_carry_their_mass_on_the_compressed_prefix():
    """A self query's log-mass on the part ⊕ its carried log-mass is its log-mass over the compressed prefix's
    entries and the part's keys (what it attended to); without a prefix nothing is carried."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 32))
    prefix = compress(model, ids[:, :16], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    cap = capture_part(model, prefix, ids, 16, 32, CFG, _Tok())
    start, end = cap.info["self_span"]
    for li in range(2):
        q, k = cap.queries[li][:, start:end], cap.keys[li]
        for h in range(2):  # the prefix's heads keep different numbers of entries (global budgets)
            seen_k = torch.cat([_head(prefix, li, h)[0], k[h]])
            on_part = torch.logsumexp(q[h] @ k[h].T * cap.scale, -1)
            seen = torch.logsumexp(q[h] @ seen_k.T * cap.scale, -1)
            carried = cap.local_lse[li][h, start:end]
            torch.testing.assert_close(torch.logaddexp(on_part, carried), seen, atol=1e-5, rtol=0)
            assert (carried > on_part - 10).all()  # the prefix holds real mass: the check is not vacuous
    first = capture_part(model, None, ids, 0, 16, CFG, _Tok())
    s, e = first.info["self_span"]
    assert torch.isinf(first.local_lse[0][:, s:e]).all()


@pytest.mark.parametrize(
    "changes, match",
    [({"chunk_tokens": -1}, "chunk_tokens must be"), ({"chunk_tokens": 16, "kv_bits": 4}, "with kv_bits"),
     ({"chunk_tokens": 16, "refine": "kl"}, "with refine")],
)  # fmt: skip
def test_compress_while_reading_refuses_what_it_cannot_do(changes, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**changes)


def test_block_attention_in_slices_of_queries_is_exact():
    """block_attention a few queries at a time (bounded logits) equals one softmax over the block (with its bias)
    and each row's causally seen appended keys, computed directly."""
    from kvsculpt.hf.attention import block_attention

    torch.manual_seed(0)
    B, H, Hkv, q, a, P, d = 2, 4, 2, 7, 10, 5, 8
    query, key, value = torch.randn(B, H, q, d), torch.randn(B, Hkv, a, d), torch.randn(B, Hkv, a, d)
    block = (torch.randn(Hkv, P, d), torch.randn(Hkv, P, d), torch.randn(Hkv, P))
    want = torch.empty(B, H, q, d)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(q):
                seen = a - q + i + 1
                keys = torch.cat([block[0][g], key[b, g, :seen]])
                lg = keys @ query[b, h, i] * 0.5 + torch.cat([block[2][g], torch.zeros(seen)])
                want[b, h, i] = torch.softmax(lg, -1) @ torch.cat([block[1][g], value[b, g, :seen]])
    for rows in (3, 512):
        got = block_attention(query, key, value, block, 0.5, rows_at_once=rows)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
