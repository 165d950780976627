"""Compress while reading (``chunk_tokens``): each part read over the compressed cache of the parts before it."""

import dataclasses
import gc
import importlib
import weakref

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


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_reading_in_parts_keeps_the_ratio_and_everything_when_asked(allocation):
    """In parts of 16 tokens at r = 0.5 the block holds half the entries (96 of 192 over 2 layers × 2 heads).
    Uniform budgets: each part keeps half its own (32 of 64). The global rule ranks the block
    and each new part together, so a part's share moves and entries kept earlier are dropped later. Either
    way each kept key is its part's key read over the compressed prefix, at the part's position. At r = 1 the
    parts are read over exact prefixes: the block is the full cache and continues as it does."""
    model = tiny_model("llama")
    ids, cont = torch.randint(0, 97, (1, 48)), torch.randint(0, 97, (1, 6))
    cfg = CFG.replace(ratio=0.5, chunk_tokens=16, read_ahead=0, allocation=allocation)  # each part read alone
    cache = compress(model, ids, cfg, tokenizer=_Tok(), progress=False)
    parts = cache.info["part_entries"]  # [part][layer][head]: what each part holds at the end
    assert cache.info["read_in_parts"] == 3 and cache.kept_entries() == 96 and cache.n == 48
    assert torch.tensor(parts).sum(0).tolist() == cache.budgets
    if allocation == "uniform":
        assert [sum(map(sum, p)) for p in parts] == [32, 32, 32] and parts == cache.info["part_budgets"]
    else:  # the second part kept entries when it was read that the third part's ranking dropped
        when_read = [sum(map(sum, p)) for p in cache.info["part_budgets"]]
        assert when_read[:2] == [32, 32] and [sum(map(sum, p)) for p in parts][1] < 32
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


@pytest.mark.parametrize("method", ["default", "learned"])
def test_reading_with_slack_holds_more_until_the_last_part(monkeypatch, method, tmp_path):
    """``read_slack``: in parts of 16 of 48 tokens at r = 0.25 (2 layers × 2 heads), the block holds
    ``kept(b, r · slack)`` of the b tokens read per head after each part but the last, and r of all of them at
    the end: 1.5 → 24, 48, then 48 entries; 4 (r · slack = 1) → everything read (64, 128), then 48."""
    compress_module = importlib.import_module("kvsculpt.compress")

    sizes = []
    join = compress_module.join_blocks

    def counted(*args, **kwargs):
        out = join(*args, **kwargs)
        sizes.append(out.kept_entries())
        return out

    monkeypatch.setattr(compress_module, "join_blocks", counted)
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(5))
    cfg = CFG.replace(ratio=0.25, chunk_tokens=16)
    if method == "learned":
        from kvsculpt import learned

        wins = [("w0", torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0)))]
        path = learned.train_scorer(
            model,
            _Tok(),
            wins,
            tmp_path / "s.safetensors",
            CompressConfig(self_samples=3, self_length=4),
            progress=False,
        )
        cfg = cfg.replace(method="learned", queries="repeat", options={"weights": str(path)})
    for slack, expected in ((1.5, [24, 48, 48]), (4, [64, 128, 48])):
        sizes.clear()
        cache = compress(model, ids, cfg.replace(read_slack=slack), tokenizer=_Tok(), progress=False)
        assert sizes == expected and cache.kept_entries() == 48


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
     ({"chunk_tokens": 16, "refine": "kl"}, "with refine"), ({"read_ahead": 16}, "set chunk_tokens"),
     ({"chunk_tokens": 16, "read_ahead": -1}, "read_ahead must be"),
     ({"chunk_tokens": 16, "read_ahead": 8, "method": "learned"}, "learned"),
     ({"chunk_tokens": 16, "read_ahead": 8, "method": "snapkv"}, "context's own queries"),
     ({"chunk_tokens": 16, "read_slack": 0.5}, "read_slack must be"), ({"read_slack": 2}, "set chunk_tokens")],
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
    for rows in (3, 512, None):
        got = block_attention(query, key, value, block, 0.5, rows_at_once=rows)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_reader_rescores_the_block_as_one_shot_scores_an_entry():
    """Compress while reading rescores the block's entries with each new part's self samples. That rests on two
    facts checked here: a part's entry score is exactly max(its repeat queries' score, the self samples' peak
    weight × the entry's value factor), and block_peaks gives each prefix entry the self samples' peak weight
    normalised over the prefix's entries and the part's keys (one softmax over both, computed directly)."""
    from kvsculpt.compress import _part_solver, block_peaks, captured_entry_scores, entry_scores
    from kvsculpt.core.attention import logits
    from kvsculpt.core.scores import value_weighted
    from kvsculpt.hf.capture import source_rows

    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 32))
    cfg = CFG.replace(ratio=0.5, repeat_fit_rows=8, self_samples=3)
    prefix = compress(model, ids[:, :16], cfg, tokenizer=_Tok(), progress=False)
    cap = capture_part(model, prefix, ids, 16, 32, cfg, _Tok())
    solver = _part_solver(cfg.solver, 16)
    assert solver.scorer.sinks == 0 and cfg.solver.scorer.sinks == 4  # a later part has no sinks of its own
    both = captured_entry_scores(cap, cfg, solver=solver)
    rep_rows = source_rows(cap.info, cap.groups.shape[0], "repeat")
    rows = source_rows(cap.info, cap.groups.shape[0], "self")
    start, end = cap.info["self_span"]
    assert rows.sum() == end - start and rows[start:end].all() and not (rows & rep_rows).any()
    assert cap.repeat_scores is not None and int(rep_rows.sum()) == 8  # scored in the pass; 8 rows held
    only = torch.ones(int(rep_rows.sum()), dtype=torch.bool)  # (repeat_scores counts every repeat query)
    rep = entry_scores(cap, solver, [q[:, rep_rows] for q in cap.queries], [x[:, rep_rows] for x in cap.local_lse],
                       prescored=only)  # fmt: skip
    alone = dataclasses.replace(
        cap,
        queries=[q[:, rows] for q in cap.queries],
        groups=cap.groups[rows],
        local_lse=[x[:, rows] for x in cap.local_lse],
        repeat_scores=None,
        prescored=None,
    )
    by_self = entry_scores(
        alone, solver, alone.queries, alone.local_lse
    )  # the library's score from self alone
    peaks = block_peaks(prefix, cap, rows, chunk=5)
    for li in range(2):
        Q, K = cap.queries[li][:, rows], cap.keys[li]
        total = torch.logaddexp(cap.local_lse[li][:, rows], torch.logsumexp(logits(Q, K, cap.scale), -1))
        own = value_weighted((logits(Q, K, cap.scale) - total[..., None]).amax(1).exp(), cap.values[li], 0.5)
        torch.testing.assert_close(torch.maximum(rep[li], own), both[li], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(own, by_self[li], rtol=1e-5, atol=1e-7)  # (here the repeat part dominates)
        for h in range(2):  # the prefix's heads keep different numbers of entries (padding is exercised)
            seen_k = torch.cat([_head(prefix, li, h)[0], K[h]])
            w = torch.softmax(cap.queries[li][h, rows] @ seen_k.T * cap.scale, -1)
            assert len(peaks[li][h]) == prefix.budgets[li][h]
            torch.testing.assert_close(peaks[li][h], w.amax(0)[: prefix.budgets[li][h]], rtol=1e-5, atol=1e-7)
    assert len({m for row in prefix.budgets for m in row}) > 1


def test_the_block_and_the_part_read_together_continue_as_joined_and_copy_nothing():
    """The cache a part's self samples are drawn from (block_and_part): each head's entries padded to one length
    with ``-inf`` bias, then the part's keys, gives the same logits as the block and the part joined entry by
    entry. It copies neither (it holds the prefix's block and the part's own tensors) and lays them out at each
    forward, one layer at a time. Without a block it reads as the part's full cache."""
    from kvsculpt.cache import block_and_part, join_blocks, shared_cache
    from kvsculpt.hf.decode import forward

    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(3))
    prefix = compress(model, ids[:, :16], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    li = next(
        i for i, layer in enumerate(prefix.budgets) if len(set(layer)) > 1
    )  # heads of different lengths
    part, _, _ = prefill(model, ids[:, 16:32])
    keys = [layer.keys[0] for layer in part.layers]
    values = [layer.values[0] for layer in part.layers]
    padded = block_and_part(model, prefix, keys, values, 32)
    joined = join_blocks(model, prefix, shared_cache(model, keys, values), 32)
    x = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(4))  # three rows share the block
    with torch.inference_mode():
        a, b = padded.fork(), joined.fork()
        torch.testing.assert_close(forward(model, x, a, 32), forward(model, x, b, 32), rtol=0, atol=1e-5)
    assert (
        padded.layers[li].block_keys is prefix.layers[li].block_keys and padded.layers[li].part[0] is keys[li]
    )
    assert callable(a.layers[li]._block)  # laid out per forward, not held
    alone = block_and_part(model, None, keys, values, 16)
    with torch.inference_mode():
        got = forward(model, x, alone.fork(), 16)
        torch.testing.assert_close(
            got, forward(model, x, shared_cache(model, keys, values).fork(), 16), rtol=0, atol=1e-5
        )
    assert alone.layers[li].part[0] is keys[li]


def test_a_fork_that_does_not_hold_its_layout_continues_the_same():
    """``fork(hold_layout=False)`` (a part's forwards over the compressed prefix): the block of skewed head lengths
    is laid out at every forward instead of held as a padded copy, with the same logits to the bit."""
    from kvsculpt.hf.decode import forward

    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(3))
    prefix = compress(model, ids[:, :16], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    li = next(i for i, layer in enumerate(prefix.budgets) if len(set(layer)) > 1)
    held, lazy = prefix.fork(), prefix.fork(hold_layout=False)
    with torch.inference_mode():
        for a, b in ((16, 28), (28, 32)):
            assert torch.equal(forward(model, ids[:, a:b], held, a), forward(model, ids[:, a:b], lazy, a))
    assert callable(lazy.layers[li]._block) and not callable(held.layers[li]._block)
    gone = weakref.ref(lazy.layers[li])  # no reference cycle: a dropped fork goes at once, not at the next gc
    gc.disable()
    try:
        del lazy
        assert gone() is None
    finally:
        gc.enable()


def test_a_part_read_ahead_is_scored_on_queries_drawn_after_the_tokens_ahead(monkeypatch):
    """``read_to``: the part [16, 24) read with [24, 32) after it. Its keys are those a reading of [16, 32) gives
    (the same forward), its self samples are drawn after token 32 (the same queries as that reading's), and a
    self query's mass on [24, 32) is carried outside the part. The repeat request is the part's alone, and its
    scores (counted in the pass) are normalised over the part and the request, as its carried mass says: the
    tokens read ahead are left out of both, as the one-shot pass leaves out the other chunks."""
    import kvsculpt.hf.capture as capture_mod
    from kvsculpt.core.attention import logits
    from kvsculpt.hf.capture import source_rows

    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 40))
    prefix = compress(model, ids[:, :16], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    whole = capture_part(model, prefix, ids, 16, 32, CFG, _Tok())
    # every repeat query held, and still scored in the pass (as when only repeat_fit_rows of them are held)
    monkeypatch.setattr(capture_mod, "subsample_index", lambda N, *args, **kw: torch.arange(N))
    ahead = capture_part(model, prefix, ids, 16, 24, CFG, _Tok(), read_to=32)
    assert ahead.info["part"] == (16, 24) and ahead.info["read_to"] == 32 and ahead.n == 8
    s_w = source_rows(whole.info, whole.groups.shape[0], "self")
    s_a = source_rows(ahead.info, ahead.groups.shape[0], "self")
    rep = source_rows(ahead.info, ahead.groups.shape[0], "repeat")
    assert int(rep.sum()) > 8  # the request (prompt and the part copied) scored the part
    for li in range(2):
        torch.testing.assert_close(ahead.keys[li], whole.keys[li][:, :8], rtol=0, atol=1e-6)
        q = whole.queries[li][:, s_w]
        torch.testing.assert_close(ahead.queries[li][:, s_a], q, rtol=0, atol=1e-5)
        tail = torch.logsumexp(logits(q, whole.keys[li][:, 8:].float(), whole.scale), -1)
        want = torch.logaddexp(whole.local_lse[li][:, s_w], tail)
        torch.testing.assert_close(ahead.local_lse[li][:, s_a], want, rtol=0, atol=1e-5)
        qr, kr = ahead.queries[li][:, rep], ahead.keys[li].float()  # every repeat query is held here
        lg = logits(qr, kr, ahead.scale)
        total = torch.logaddexp(ahead.local_lse[li][:, rep], torch.logsumexp(lg, -1))
        assert ahead.repeat_scores[li].peak.shape == (2, 8)
        torch.testing.assert_close(ahead.repeat_scores[li].peak, (lg - total[..., None]).amax(1).exp(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_reading_ahead_keeps_the_ratio_and_at_r_1_continues_as_the_full_cache():
    """Read ahead by 8 or 16 tokens in parts of 16: the block holds r of the entries (96 of 192 at r = 0.5),
    its parts' entries differ from a reading without read-ahead, and at r = 1 it is the full cache."""
    model = tiny_model("llama")
    ids, cont = torch.randint(0, 97, (1, 48)), torch.randint(0, 97, (1, 6))
    plain = compress(model, ids, CFG.replace(ratio=0.5, chunk_tokens=16, read_ahead=0), tokenizer=_Tok(),
                     progress=False)  # fmt: skip
    for ahead in (8, 16):
        cfg = CFG.replace(ratio=0.5, chunk_tokens=16, read_ahead=ahead)
        cache = compress(model, ids, cfg, tokenizer=_Tok(), progress=False)
        assert cache.info["read_in_parts"] == 3 and cache.kept_entries() == 96
        assert torch.tensor(cache.info["part_entries"]).sum(0).tolist() == cache.budgets
        assert any(not torch.equal(_head(cache, 1, h)[1], _head(plain, 1, h)[1]) for h in range(2))
    full, _, _ = prefill(model, ids)
    whole = compress(model, ids, CFG.replace(ratio=1.0, chunk_tokens=16, read_ahead=16), tokenizer=_Tok(),
                     progress=False)  # fmt: skip
    ref = continuation_logits(model, full, cont, 48)
    torch.testing.assert_close(continuation_logits(model, whole, cont, 48), ref, rtol=0, atol=1e-3)


def test_a_part_read_ahead_is_taken_over_by_the_next_part_so_each_token_is_read_once(monkeypatch):
    """By default a reader reads one part ahead where its method allows. In parts of 16 read 16 ahead, the second part's tokens were read by the first part's forward, over the
    exact first part: the second part takes their keys over (its kept keys are the full prefill's; read again over
    the compressed first part, layer 1's would differ), and the context's tokens go through the model once."""
    import kvsculpt.hf.capture as capture_mod

    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 48))
    read, plain_forward = [], capture_mod.forward
    for method, ahead in (
        ("kvzip-v", 16),
        ("sculpt", 16),
        ("learned", 0),
        ("snapkv", 0),
    ):  # by default: one part
        assert CFG.replace(method=method, chunk_tokens=16).ahead_tokens == ahead, method
    assert CFG.ahead_tokens == 0 and "read_ahead" not in repr(CFG)  # not reading in parts

    def counting(model_, x, cache, start, last_only=False):
        if x.shape[0] == 1 and torch.equal(x.cpu(), ids[:, start : start + x.shape[1]]):
            read.append((start, x.shape[1]))  # a forward of the context's own tokens at their positions
        return plain_forward(model_, x, cache, start, last_only)

    monkeypatch.setattr(capture_mod, "forward", counting)
    cache = compress(model, ids, CFG.replace(ratio=0.5, chunk_tokens=16), tokenizer=_Tok(), progress=False)
    assert sorted(read) == [(0, 32), (32, 16)]  # the first part and its 16 ahead, then the third part
    full, _, _ = prefill(model, ids)
    for h in range(2):
        keys = _head(cache, 1, h)[0]
        parts = cache.info["part_entries"]
        second = keys[parts[0][1][h] : parts[0][1][h] + parts[1][1][h]]
        assert len(second) > 0
        dist = torch.cdist(second, full.layers[1].keys[0, h, 16:32].float()).min(-1).values
        assert (dist < 1e-5).all()


def test_a_reader_and_the_repeat_pass_write_into_room_and_never_copy_the_cache(monkeypatch):
    """A part read ahead, then its repeat request appended and cropped away: each layer's keys and values are
    allocated once, with room for all of it, so the views the capture holds of the part's keys are the cache's
    own memory (a reallocation would keep the old copy alive beside the new one: +1 cache during the pass).
    The next part, which takes the tokens read ahead over, also allocates once, and lets the taken-over copy go.
    The same for the one-shot capture's prefill and its repeat requests, and the keys are those of a plain
    ``DynamicCache`` prefill."""
    from transformers import DynamicCache

    import kvsculpt.cache as cache_mod
    from kvsculpt.hf.capture import capture
    from kvsculpt.hf.decode import forward

    made, plain = [], cache_mod.append_into_room

    def counting(old, buf, new, dim, room):
        view, out = plain(old, buf, new, dim, room)
        if (
            out is not buf and out.shape[0] == 1
        ):  # the context's cache (the self samples are a batch of their own)
            made.append(tuple(out.shape))
        return view, out

    monkeypatch.setattr(cache_mod, "append_into_room", counting)
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 48))
    layers = 2
    first = capture_part(model, None, ids, 0, 8, CFG, _Tok(), read_to=16)
    assert len(made) == 2 * layers, made  # keys and values, once per layer
    read = first.ahead  # the tokens [8, 16): taken over by the next part, then let go
    prefix = compress(model, ids[:, :8], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    made.clear()
    second = capture_part(model, prefix, ids, 8, 16, CFG, _Tok(), read_to=24, read=read)
    assert len(made) == 2 * layers, made
    assert read[0] == [] and read[1] == [] and second.info["read_to"] == 24
    # what the capture keeps are copies of their own size, not views holding the cache's buffer (part, tokens
    # read ahead and the request's room) through the solve and the join
    for x in (*second.keys, *second.values, *second.ahead[0], *second.ahead[1]):
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    made.clear()
    cap = capture(model, ids, CFG.replace(repeat_chunk=16), _Tok())  # three requests after the prefill
    assert cap.info["repeat_chunks"] == 3
    assert len(made) == 2 * layers, made
    ref = DynamicCache()
    forward(model, ids, ref, 0)
    for li in range(layers):
        torch.testing.assert_close(cap.keys[li], ref.layers[li].keys[0], rtol=0, atol=0)


def test_the_context_keys_cut_from_a_cache_with_room_let_the_room_go():
    """After the repeat pass, the context's keys and values are copied to their length one layer at a time and
    the buffer behind them (with the request's room) is freed: held beside the copies it was one more cache."""
    from kvsculpt.hf.capture import _copy_out
    from kvsculpt.hf.decode import forward

    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 48))
    cache, _, _ = prefill(model, ids, reserve=16)
    with torch.inference_mode():
        forward(model, torch.randint(0, 97, (1, 16)), cache, 48)  # a request, then cropped away
    cache.crop(-16)
    buffers = [weakref.ref(x.untyped_storage()) for layer in cache.layers for x in (layer.keys, layer.values)]
    ((keys, values),) = _copy_out(cache, [(0, 48)])
    gc.collect()
    assert all(b() is None for b in buffers)
    ref, _, _ = prefill(model, ids)
    for li in range(2):
        assert keys[li].shape == (2, 48, 16) and keys[li].is_contiguous()
        torch.testing.assert_close(keys[li], ref.layers[li].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(values[li], ref.layers[li].values[0], rtol=0, atol=0)


def test_a_block_joined_in_place_lets_each_old_layer_go_before_the_next_is_joined(monkeypatch):
    """``join_blocks(in_place=True)`` (how a reader joins a part into its block): the block is the same as a
    join into a new cache, and each layer's old block is freed as soon as its joined layer is made, before the
    next layer is joined, so the old block and the new are never held whole side by side."""
    import kvsculpt.cache as cache_module

    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(6))
    first = compress(model, ids[:, :16], CFG.replace(ratio=0.5), tokenizer=_Tok(), progress=False)
    part, _, _ = prefill(model, ids[:, 16:32])
    second = cache_module.shared_cache(
        model, [x.keys[0] for x in part.layers], [x.values[0] for x in part.layers]
    )
    keep = [[torch.arange(m) % 2 == 0 for m in layer] for layer in first.budgets]
    joined = cache_module.join_blocks(model, first, second, 32, keep)
    old = [
        weakref.ref(x.untyped_storage())
        for layer in first.layers
        for x in (layer.block_keys, layer.block_values)
    ]
    alive_at_each_layer = []
    made = cache_module.CompressedLayer

    def layer_made(*args, **kwargs):
        alive_at_each_layer.append([o() is not None for o in old])
        return made(*args, **kwargs)

    monkeypatch.setattr(cache_module, "CompressedLayer", layer_made)
    same = cache_module.join_blocks(model, first, second, 32, keep, in_place=True)
    assert same is first and same.n == 32 and same.budgets == joined.budgets
    assert alive_at_each_layer == [
        [True] * 4,
        [False, False, True, True],
    ]  # layer 0's block gone before layer 1
    assert all(o() is None for o in old)
    for a, b in zip(same.layers, joined.layers, strict=True):
        assert torch.equal(a.block_keys, b.block_keys) and torch.equal(a.block_values, b.block_values)
