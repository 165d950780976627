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


def test_a_budget_larger_than_the_generation_changes_nothing(compressed):
    model, cache = compressed
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = decode(model, cache.fork(), prompt, N, 40)
    budgeted = decode(model, cache.fork(decode_budget=200, every=16), prompt, N, 40)
    assert torch.equal(plain, budgeted)
    full_ids = torch.cat([torch.zeros(1, N, dtype=torch.long), prompt], 1)  # generate skips the n cached ids
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    a = model.generate(full_ids, attention_mask=torch.ones_like(full_ids), past_key_values=cache.fork(), **kw)
    b = model.generate(full_ids, attention_mask=torch.ones_like(full_ids),
                       past_key_values=cache.fork(decode_budget=200, every=16), **kw)  # fmt: skip
    assert torch.equal(a, b)


def test_the_appended_tokens_never_exceed_the_budget_and_positions_stay_true(compressed):
    """One token per forward (as generation runs): after every step every layer holds at most the budget, the
    logical length counts every token, and the run differs from the unbudgeted one once tokens are cut."""
    model, cache = compressed
    budget, every = 12, 4
    small, free = cache.fork(decode_budget=budget, every=every), cache.fork()
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
    c = cache.fork(decode_budget=50, every=8)
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
    layer = CompressedLayer(torch.randn(4, 2), torch.randn(4, 2), [2, 2], n=8, decode_budget=10, every=4)
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
        torch.randn(4, 2), torch.randn(4, 2), [2, 2], n=8, decode_budget=10, every=4, keep="recent"
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


def test_refit_reproduces_the_window_queries_outputs_better_than_copied_values(compressed):
    """At the first cut, refitted values must bring the latest queries' attention outputs (over the block and
    the kept tokens) closer to their outputs over the block and every appended token than the copied values do,
    in every layer; refit changes values, not the selection. Outputs are recomputed here by the layer's own
    block attention (causal over the appended tokens)."""
    from kvsculpt.hf.attention import block_attention

    model, cache = compressed
    c = cache.fork(decode_budget=12, every=4)  # refit is the default
    seen = {}
    for li, layer in enumerate(c.layers):
        fit = layer._refit

        def spy(index, kept, li=li, layer=layer, fit=fit):
            queries = torch.cat([q for q, _ in layer.read_by], -2)[:, :, -layer.every :]
            before = (layer.keys.clone(), layer.values.clone(), layer.read_by[-1][1])
            out = fit(index, kept)
            seen.setdefault(li, (queries, before, index, kept, out))
            return out

        layer._refit = spy
    tokens = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(4))
    plain = cache.fork(decode_budget=12, every=4, refit=False)
    with torch.inference_mode():
        for step in range(14):  # the 13th token passes the budget: one cut
            forward(model, tokens[:, step : step + 1], c, N + step)
            forward(model, tokens[:, step : step + 1], plain, N + step)
    assert sorted(seen) == list(range(len(c.layers)))
    for li, (queries, (keys, values, scale), index, copied, fitted) in seen.items():
        block = c.layers[li].padded_block()
        want = block_attention(queries, keys, values, block, scale)
        rows = index[..., None].expand(*index.shape, keys.shape[-1])
        kept_keys = keys.gather(-2, rows)
        err_copied = (block_attention(queries, kept_keys, copied, block, scale) - want).norm()
        err_fitted = (block_attention(queries, kept_keys, fitted, block, scale) - want).norm()
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
