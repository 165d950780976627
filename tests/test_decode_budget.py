"""A decode budget (CompressedCache.fork(decode_budget=…, every=…)): the appended tokens stay within it while
generating, what it keeps is what the generation's queries read most, and a budget larger than the generation
changes nothing."""

import pytest
import torch

from kvsculpt import CompressConfig, compress
from kvsculpt.cache import CompressedLayer
from kvsculpt.hf.attention import capture_queries
from kvsculpt.hf.decode import decode, forward

from .conftest import tiny_model

N = 40


@pytest.fixture(scope="module")
def compressed():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, N), generator=torch.Generator().manual_seed(0))
    return model, compress(
        model, ids, CompressConfig(ratio=0.25, queries="self", self_samples=4), progress=False
    )


@pytest.mark.parametrize("scope", ["all", "appended"])
def test_a_budget_larger_than_the_generation_changes_nothing(compressed, scope):
    model, cache = compressed
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = decode(model, cache.fork(), prompt, N, 40)
    budgeted = decode(model, cache.fork(decode_budget=200, every=16, scope=scope), prompt, N, 40)
    assert torch.equal(plain, budgeted)
    full_ids = torch.cat([torch.zeros(1, N, dtype=torch.long), prompt], 1)  # generate skips the n cached ids
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    a = model.generate(full_ids, attention_mask=torch.ones_like(full_ids), past_key_values=cache.fork(), **kw)
    b = model.generate(full_ids, attention_mask=torch.ones_like(full_ids),
                       past_key_values=cache.fork(decode_budget=200, every=16, scope=scope), **kw)  # fmt: skip
    assert torch.equal(a, b)


def test_the_appended_tokens_never_exceed_the_budget_and_positions_stay_true(compressed):
    """One token per forward (as generation runs): after every step every layer holds at most the budget, the
    logical length counts every token, and the run differs from the unbudgeted one once tokens are cut."""
    model, cache = compressed
    budget, every = 12, 4
    small, free = cache.fork(decode_budget=budget, every=every, scope="appended"), cache.fork()
    x = torch.randint(0, 97, (1, 1), generator=torch.Generator().manual_seed(2))
    differ = 0.0
    for step in range(60):
        with torch.inference_mode():
            a, b = forward(model, x, small, N + step), forward(model, x, free, N + step)
        assert all(layer.appended() <= budget for layer in small.layers)
        assert small.get_seq_length() == free.get_seq_length() == N + step + 1
        differ = max(differ, float((a - b).abs().max()))
        x = b[:, -1:].argmax(-1)  # teacher-forced on the unbudgeted run's tokens
    assert all(layer.evicted + layer.appended() == 60 for layer in small.layers)
    assert differ > 1e-3


def test_the_scores_are_the_attention_the_appended_tokens_received(compressed):
    """After one forward of 6 tokens, each appended token's score = its softmax probability (over the block,
    with its bias, and the appended tokens, causally) summed over the 6 queries and the query heads sharing its
    KV head, recomputed here from the captured queries."""
    model, cache = compressed
    c = cache.fork(decode_budget=50, every=8, scope="appended")
    q = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with capture_queries(model) as found:
        forward(model, q, c, N)
    for li, layer in enumerate(c.layers):
        Q = found[li][0][0].float()  # [H, 6, d]
        bk, _, bias = layer.padded_block()
        K = layer.keys[0].float()  # [Hkv, 6, d]
        H, Hkv, d = Q.shape[0], K.shape[0], Q.shape[-1]
        G = H // Hkv
        keys = torch.cat([bk.float(), K], 1).repeat_interleave(G, 0)  # [H, P + 6, d]
        s = Q @ keys.transpose(1, 2) * d**-0.5
        P = bk.shape[1]
        if bias is not None:
            s[..., :P] += bias.float().repeat_interleave(G, 0)[:, None]
        s[..., P:] += torch.full((6, 6), float("-inf")).triu(1)
        want = s.softmax(-1)[..., P:].sum(1).view(Hkv, G, 6).sum(1)
        torch.testing.assert_close(layer.scores[0], want, rtol=1e-5, atol=1e-5)


def test_a_cut_keeps_the_recent_tokens_and_the_best_scored_in_order():
    layer = CompressedLayer(
        torch.randn(4, 2), torch.randn(4, 2), [2, 2], n=8, decode_budget=10, every=4, scope="appended"
    )
    keys = torch.arange(10.0)[None, None, :, None].expand(1, 2, 10, 2).clone()  # token i's key is (i, i)
    layer.update(keys, keys.clone())
    layer.scores = torch.tensor([[[5.0, 0, 0, 9, 0, 7, 0, 1, 1, 1], [2, 8, 0, 0, 0, 0, 6, 1, 1, 1]]])
    new = torch.full((1, 2, 1, 2), 10.0)
    out, _ = layer.update(new, new.clone())
    # cut to 10 - 4 = 6 before the new token: the 3 most recent (7, 8, 9) and the 3 best of 0..6, in order
    assert out[0, 0, :, 0].tolist() == [0, 3, 5, 7, 8, 9, 10]
    assert out[0, 1, :, 0].tolist() == [0, 1, 6, 7, 8, 9, 10]
    assert layer.evicted == 4 and layer.get_seq_length() == 8 + 11


@pytest.mark.parametrize("budget, every", [(8, 8), (4, 8), (16, 0), (16.5, 4)])
def test_a_budget_that_cannot_work_is_refused_in_one_line(compressed, budget, every):
    _, cache = compressed
    with pytest.raises(ValueError, match="every|decode_budget"):
        cache.fork(decode_budget=budget, every=every)


def test_the_recent_rule_keeps_the_last_tokens_only():
    layer = CompressedLayer(
        torch.randn(4, 2),
        torch.randn(4, 2),
        [2, 2],
        n=8,
        decode_budget=10,
        every=4,
        keep="recent",
        scope="appended",
    )
    keys = torch.arange(10.0)[None, None, :, None].expand(1, 2, 10, 2).clone()
    layer.update(keys, keys.clone())
    layer.scores = torch.rand(1, 2, 10)
    new = torch.full((1, 2, 1, 2), 10.0)
    out, _ = layer.update(new, new.clone())
    assert out[0, 0, :, 0].tolist() == out[0, 1, :, 0].tolist() == [4, 5, 6, 7, 8, 9, 10]


def test_the_decode_benchmark_runs_and_resumes(tmp_path):
    """benchmarks/decode.py --smoke: the full run's KL is 0, every budgeted run ends within its budget with a
    positive KL, K ≥ budget is skipped, and a rerun adds no row."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path / "d")])
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    full = [r for r in rows if r["rule"] == "full"]
    assert len(full) == 1 and full[0]["kl"] == 0.0
    budgeted = [r for r in rows if r["rule"] != "full"]
    assert len(budgeted) == 3 * 3  # three rules × three budgets at K = 8; K = 32 is above every budget
    assert all(r["kept_end"] <= r["budget_tokens"] and r["kl"] > 0 for r in budgeted)
    bench.main(["--smoke", "--out", str(tmp_path / "d")])
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == len(rows)


@pytest.mark.parametrize("scope", ["all", "appended"])
def test_refit_reproduces_the_window_queries_outputs_better_than_copied_values(compressed, scope):
    """At the first cut, refitted values must bring the latest queries' attention outputs (over the block and
    the kept tokens) closer to their outputs over the block and every appended token than the copied values do,
    in every layer; refit changes values, not the selection. Outputs are recomputed here by the layer's own
    block attention (causal over the appended tokens). With ``scope="all"`` the cut entries include the block's,
    which the fork holds as its own leading entries (their bias carried)."""
    from kvsculpt.hf.attention import block_attention

    model, cache = compressed
    c = cache.fork(decode_budget=12, every=4, scope=scope)  # refit is the default
    seen = {}
    for li, layer in enumerate(c.layers):
        fit = layer._refit

        def spy(index, kept, li=li, layer=layer, fit=fit):
            queries = torch.cat([q for q, _ in layer.read_by], -2)[:, :, -layer.every :]
            bias = None if layer.key_bias is None else layer.key_bias.clone()
            before = (layer.keys.clone(), layer.values.clone(), layer.read_by[-1][1], layer._block, bias)
            out = fit(index, kept)
            seen.setdefault(li, (queries, before, index, kept, out))
            return out

        layer._refit = spy
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(4))
    plain = cache.fork(decode_budget=12, every=4, refit=False, scope=scope)
    with torch.inference_mode():
        for step in range(14):  # the 13th token passes the budget: one cut
            forward(model, tokens[:, step : step + 1], c, N + step)
            forward(model, tokens[:, step : step + 1], plain, N + step)
    assert sorted(seen) == list(range(len(c.layers)))
    for li, (queries, (keys, values, scale, block, bias), index, copied, fitted) in seen.items():
        assert (block[0].shape[1] == 0) == (scope == "all")  # the fork took the block over
        want = block_attention(queries, keys, values, block, scale, key_bias=bias)
        rows = index[..., None].expand(*index.shape, keys.shape[-1])
        kept_keys, kept_bias = keys.gather(-2, rows), None if bias is None else bias.gather(-1, index)
        err_copied = (
            block_attention(queries, kept_keys, copied, block, scale, key_bias=kept_bias) - want
        ).norm()
        err_fitted = (
            block_attention(queries, kept_keys, fitted, block, scale, key_bias=kept_bias) - want
        ).norm()
        assert err_fitted < 0.8 * err_copied, (li, float(err_fitted), float(err_copied))
    # layer 0's queries do not depend on any value, so it keeps the same tokens with or without refit
    assert torch.equal(plain.layers[0].keys, c.layers[0].keys)
    assert not torch.equal(plain.layers[0].values, c.layers[0].values)


@pytest.mark.skipif(
    not __import__("kvsculpt.bench.peers", fromlist=["available"]).available(),
    reason="kvpress's environment is not built (make peers)",
)
def test_kvpress_decoding_press_peer_reads_as_the_full_cache_when_its_target_holds_everything():
    """The peer job reads the same tokens twice in kvpress's process: with a target above the sequence the
    press never cuts, so its log-probabilities equal the full cache's exactly (KL 0, every block); with a small
    target the cache ends within target + K and the KL is no longer 0."""
    from kvsculpt.bench import peers

    g = torch.Generator().manual_seed(0)
    ctx, prompt = (
        torch.randint(100, 5000, (1, 64), generator=g),
        torch.randint(100, 5000, (1, 4), generator=g),
    )
    tokens = torch.randint(100, 5000, (24,), generator=g).tolist()
    rows = peers.read_with_decoding_presses("smollm2-135m", ctx, prompt, tokens, [
        {"base": "KnormPress", "every": 8, "target_size": 64 + 100}, {"base": "KnormPress", "every": 8, "target_size": 48},
    ])  # fmt: skip
    whole, small = rows
    assert whole["kl"] == 0.0 and whole["kl_worst_block"] == 0.0 and whole["kept_end"] == 64 + 4 + 24 - 1
    assert small["kept_end"] <= 48 + 8 and small["kl"] > 1e-4


def test_a_refitting_budget_treats_each_row_of_a_batch_as_alone(compressed):
    """Two equal rows generated together under a refitting budget give the same tokens as one row alone (the
    batch path of the cuts and fits computes what the single-row path does), and beam search, which reorders
    the rows and their stored queries, runs."""
    model, cache = compressed
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.zeros(1, N, dtype=torch.long), prompt], 1)
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    pair = model.generate(ids.repeat(2, 1), attention_mask=torch.ones(2, ids.shape[1], dtype=torch.long),
                          past_key_values=cache.fork(decode_budget=12, every=4), **kw)  # fmt: skip
    one = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache.fork(decode_budget=12, every=4), **kw
    )
    assert torch.equal(pair[0], one[0]) and torch.equal(pair[1], one[0])
    beams = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=2,
                           past_key_values=cache.fork(decode_budget=12, every=4), **kw)  # fmt: skip
    assert beams.shape == (1, ids.shape[1] + 30)


def test_a_whole_cache_budget_larger_than_the_generation_changes_nothing(compressed):
    """scope="all" with room for everything: the fork takes the block over as its own entries (with their bias
    and a short head's padding) and reads exactly as the plain fork: same greedy tokens, logits within 1e-5."""
    model, cache = compressed
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    plain, whole = cache.fork(), cache.fork(decode_budget=200, every=16, scope="all")
    assert (
        len(set(cache.layers[0].lengths)) > 1 or cache.layers[0].block_bias is not None
    )  # bias/padding path
    with torch.inference_mode():
        a, b = forward(model, prompt, plain, N), forward(model, prompt, whole, N)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert whole.layers[0].adopted == max(cache.layers[0].lengths) and whole.get_seq_length() == N + 5
    assert torch.equal(decode(model, cache.fork(), prompt, N, 30),
                       decode(model, cache.fork(decode_budget=200, every=16, scope="all"), prompt, N, 30))  # fmt: skip


def _each_token(model, fork, cache, budget: int, steps: int = 30):
    """Feed ``fork`` (a whole-cache budget over ``cache``) one token at a time; after each, check every layer
    holds at most its block plus ``budget`` entries, and yield the step."""
    x = torch.randint(0, 97, (1, 1), generator=torch.Generator().manual_seed(2))
    for step in range(steps):
        with torch.inference_mode():
            forward(model, x, fork, N + step)
        for layer, block in zip(fork.layers, cache.layers, strict=True):
            assert layer.appended() <= max(block.lengths) + budget
        yield step


def _context_entries(layer) -> torch.Tensor:
    """``[Hkv, a]`` bool: which entries a whole-cache fork (row 0) holds are the block's real ones (born -1; the
    padding has a -inf bias)."""
    real = layer.born[0] < 0
    if layer.key_bias is not None:
        real &= layer.key_bias[0].isfinite()
    return real


def test_a_whole_cache_budget_cuts_block_entries_and_never_exceeds_block_plus_budget(compressed):
    """scope="all": after every single-token forward each layer holds at most max m_h + budget entries; the
    cuts drop entries of the block too (the default scope never does), the shared block is untouched (a plain
    fork still reads every entry), and the logical length counts every token."""
    model, cache = compressed
    budget = 6
    small = cache.fork(decode_budget=budget, every=3, scope="all")
    for step in _each_token(model, small, cache, budget):
        assert small.get_seq_length() == N + step + 1
    # some real entries of the block are gone from some head
    cut = 0
    for layer, block in zip(small.layers, cache.layers, strict=True):
        held = _context_entries(layer).sum(-1).tolist()
        cut += sum(m - int(k) for m, k in zip(block.lengths, held, strict=True))
    assert cut > 0
    assert all(layer.evicted + layer.appended() == layer.adopted + 30 for layer in small.layers)
    plain = cache.fork()
    with torch.inference_mode():
        forward(model, torch.randint(0, 97, (1, 1)), plain, N)
    assert all(layer.appended() == 1 for layer in plain.layers)


def test_an_unknown_decode_scope_is_refused_in_one_line(compressed):
    _, cache = compressed
    with pytest.raises(ValueError, match="unknown decode scope 'block'"):
        cache.fork(decode_budget=16, every=4, scope="block")


def test_appending_writes_into_room_to_spare_instead_of_copying_what_is_held(compressed):
    """A token appended to a fork is written after the held ones in a buffer with room to spare: between cuts the
    keys stay in the same storage, and what the fork holds equals the tokens in order (a cut then compacts)."""
    model, cache = compressed
    c = cache.fork(decode_budget=40, every=8, scope="appended")
    x = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        forward(model, x[:, :4], c, N)
        layer = c.layers[1]
        where, held = layer.keys.data_ptr(), layer.keys.clone()
        for step in range(4, 12):
            forward(model, x[:, step : step + 1], c, N + step)
            assert layer.keys.data_ptr() == where  # no reallocation, no copy of the held tokens
        assert torch.equal(layer.keys[..., :4, :], held) and layer.appended() == 12
        plain = cache.fork()
        forward(model, x, plain, N)
    torch.testing.assert_close(layer.keys, plain.layers[1].keys, rtol=1e-5, atol=1e-5)
    assert layer.scores.shape[-1] == layer.born.shape[-1] == 12


@pytest.mark.parametrize("floor", [0.5, 1.0])
def test_a_context_floor_keeps_that_share_of_each_heads_context_through_every_cut(compressed, floor):
    """``context_floor=f`` under scope "all": after every single-token forward each head still holds at least
    ⌈f · m_h⌉ of the context's real entries (f = 1: all of them, where the same run without a floor cuts some,
    as the test above shows), they lead the head (``context_held`` counts them), and the cache never holds more
    than the block plus the budget."""
    import math

    model, cache = compressed
    budget = 6
    small = cache.fork(decode_budget=budget, every=3, scope="all", context_floor=floor)
    for _ in _each_token(model, small, cache, budget):
        for layer, block in zip(small.layers, cache.layers, strict=True):
            real = _context_entries(layer)
            held = real.sum(-1).tolist()
            assert held == layer.context_held[0].tolist()
            for h, m in enumerate(block.lengths):
                assert held[h] >= math.ceil(floor * m)
                assert bool(real[h, : held[h]].all())  # they lead the head
    assert sum(layer.evicted for layer in small.layers) > 0  # the budget did cut (generated tokens at least)


@pytest.mark.parametrize(("changes", "match"), [
    ({"context_floor": 1.5}, "context_floor must be a share"),
    ({"context_floor": 0.5, "scope": "appended"}, "it needs scope 'all'"),
])  # fmt: skip
def test_a_context_floor_that_cannot_work_is_refused_in_one_line(compressed, changes, match):
    _, cache = compressed
    with pytest.raises(ValueError, match=match):
        cache.fork(decode_budget=16, every=4, **changes)


def _cut_twice(floor):
    """A whole-cache layer (2 heads, 8 context entries each, budget 8, every 4) fed one token at a time, its
    attention set by hand: up to the first cut head 0 reads context entry 0 (and its newest token a little),
    head 1 its newest token; after it, both read only their newest token. The heads' context entries held after
    each cut."""
    d, m = 4, 8
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2 * m, d, generator=g), torch.randn(2 * m, d, generator=g)
    layer = CompressedLayer(keys, values, [m, m], None, m, decode_budget=8, every=4, refit=False,
                            context_floor=floor)  # fmt: skip
    held, cuts = [], 0
    for _ in range(20):
        layer.update(torch.randn(1, 2, 1, d, generator=g), torch.randn(1, 2, 1, d, generator=g))
        if layer.evicted and layer.evicted != cuts:  # a cut came before this token
            cuts = layer.evicted
            held.append(layer.context_held[0].tolist())
        if not held:
            layer.scores[0, 0, 0] += 1.0
            layer.scores[0, 0, -1] += 0.01
        else:
            layer.scores[0, 0, -1] += 1.0
        layer.scores[0, 1, -1] += 1.0
    return held


def test_an_auto_context_floor_splits_each_heads_room_as_its_latest_attention_went():
    """``context_floor="auto"``: at a cut each head keeps at least ⌈s · room⌉ of its context entries, ``s`` the
    share of its attention that went to the context since the last cut. Head 0 read the context (s ≈ 0.99):
    its whole context stays, where without a floor the entries it has not read yet are cut for generated
    tokens. Head 1 read only generated tokens (s = 0): no floor, the same cut as without one. At the next cut
    head 0 has read only generated tokens since the first: its share counts from that cut (0), so the context
    it has not read goes then (counted from the fork's start, s = 8 / 12.08 would keep ⌈0.66 · 8⌉ = 6)."""
    auto, none = _cut_twice("auto"), _cut_twice(0.0)
    assert auto[0] == [8, none[0][1]] and none[0][0] < 8
    assert auto[1][0] < 6 and auto[1][1] == 0
