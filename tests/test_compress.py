import json
from pathlib import Path

import pytest
import torch

from kvsculpt import CompressConfig, ask, capture, compress, load_cache
from kvsculpt.cli import main
from kvsculpt.eval.metrics import continuation_logits, kl_per_position
from kvsculpt.hf.decode import prefill

from .conftest import tiny_model


def test_compress_uniform_on_tiny_model(device):
    """Select+Fit at a quarter of the entries: budgets exact, held-out fit far better than a cache that
    outputs zeros (relative MSE 1), and the continuation closer to the full cache's than plain eviction."""
    model = tiny_model("llama").to(device)
    ids, cont = torch.randint(0, 97, (1, 40)).to(device), torch.randint(0, 97, (1, 8)).to(device)
    cfg = CompressConfig(ratio=0.25, method="h2o", queries="context", allocation="uniform", heldout=0.2)
    cache = compress(model, ids, cfg, progress=False)
    assert cache.budgets == [[10, 10], [10, 10]]
    assert "H2O" in cache.method and "fit=True" in cache.method and cache.info["config"] == repr(cfg)
    stats = cache.info["stats"]["heldout_rel_mse"]
    assert len(stats) == 2 and all(0 <= x < 0.05 for layer in stats for x in layer)  # measured ~0.001
    full, _, _ = prefill(model, ids)
    ref = continuation_logits(model, full, cont, 40)
    evicted = compress(model, ids, cfg.replace(fit=False), progress=False)
    kl_fit = kl_per_position(ref, continuation_logits(model, cache, cont, 40)).mean()
    kl_evict = kl_per_position(ref, continuation_logits(model, evicted, cont, 40)).mean()
    assert kl_fit < 0.5 * kl_evict


def test_adaptive_allocation_keeps_the_total():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 64))
    cache = compress(
        model, ids, ratio=0.25, method="h2o", queries="context", allocation="adaptive", progress=False
    )
    assert cache.kept_entries() == 16 * 2 * 2
    assert cache.nbytes() <= 1.02 * cache.logical_nbytes() + sum(4 * sum(b) for b in cache.budgets)
    assert "pilot" in cache.info


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"method": "magic"}, "unknown method"),
        ({"queries": "tomorrow"}, "unknown queries"),
        ({"allocation": "lottery"}, "unknown allocation"),
        ({"scope": "nowhere"}, "unknown scope"),
        ({"heldout": 1.0}, "heldout"),
        ({"max_queries": 0}, "max_queries"),
        ({"options": {"colour": 1}}, "unknown option colour"),
        ({"method": "sculpt", "options": {"iters": "x"}}, "option iters of method 'sculpt' takes a number"),
        ({"on_policy": 2, "queries": "repeat"}, "self queries"),
        ({"colour": 1}, "unknown compress option colour"),
    ],
)
def test_bad_input_errors(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        compress(model, torch.randint(0, 97, (1, 20)), progress=False, **kwargs)


def test_empty_context_error():
    with pytest.raises(ValueError, match="empty"):
        compress(tiny_model("llama"), torch.zeros(1, 0, dtype=torch.long), progress=False)


def test_identity_through_cli_has_zero_kl(smollm, capsys):
    main(
        [
            "eval",
            "--text",
            "openai_agents_tar_utils",
            "--context-tokens",
            "256",
            "--continuation-tokens",
            "32",
            "--ratio",
            "1.0",
            "--method",
            "identity",
            "--queries",
            "context",
            "--allocation",
            "uniform",
            "--json",
        ]
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "kl",
        "ppl",
        "method",
        "ratio",
        "allocation",
        "kept_entries",
        "full_entries",
        "cache_bytes",
        "logical_bytes",
        "compress_seconds",
        "prefill_seconds",
        "model",
        "context_tokens",
        "continuation_tokens",
    ):
        assert key in row
    assert row["kl"] < 1e-6
    assert row["kept_entries"] == row["full_entries"] == 256 * 30 * 3


def test_cli_compress_then_generate(smollm, tmp_path, capsys):
    """The CLI's saved cache loads with the kept entries it says, with the user's umask, and `generate` prints
    what the library's `ask` answers from that cache (stopping at --stop)."""
    import os

    out = tmp_path / "c.kvs"
    old = os.umask(0o022)
    try:
        main(["compress", "--text", "openai_agents_tar_utils", "--context-tokens", "200", "--ratio", "0.5",
              "--method", "h2o", "--no-fit", "--queries", "context", "--allocation", "uniform", "--out", str(out)])  # fmt: skip
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert f"saved {out}: {100 * 30 * 3} of {200 * 30 * 3} entries kept" in capsys.readouterr().out
    model, tok = smollm
    cache = load_cache(out, model)
    assert cache.kept_entries() == 100 * 30 * 3 and "fit=False" in cache.method
    prompt = "\nThe function above"
    main(["generate", "--cache", str(out), "--prompt", prompt, "--max-new-tokens", "12"])
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == ask(model, tok, cache, prompt, max_new_tokens=12) and printed.strip()
    stop = printed.strip().split()[1]  # a word in the middle of the answer
    main(["generate", "--cache", str(out), "--prompt", prompt, "--max-new-tokens", "12", "--stop", stop])
    assert capsys.readouterr().out.rstrip("\n") == printed.split(stop)[0]
    budget = ["--decode-budget", "8", "--every", "2"]  # the prompt and answer: 16 tokens, 8 kept
    main(["generate", "--cache", str(out), "--prompt", prompt, "--max-new-tokens", "12", *budget])
    assert capsys.readouterr().out.rstrip("\n") == ask(
        model, tok, cache, prompt, 12, decode_budget=8, every=2
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "no-such-model"], "smollm2-135m"),
        (["eval", "--model", "nobody/no-such-model-anywhere"], "cannot load 'nobody/no-such-model-anywhere'"),
        (["eval", "--text", "openai_agents_tar_utils", "--context-tokens", "100000"], "100000"),
        (["compress", "--text", "openai_agents_tar_utils", "--context-tokens", "100000", "--out", "x.kvs"],
         "fewer than the 100000"),
        (["eval", "--ratio", "1.5"], "ratio"),
        (["eval", "--queries", "tomorrow"], "unknown queries"),
        (["eval", "--option", "colour=red"], "unknown option colour"),
        (["eval", "--method", "sculpt", "--option", "iters=x"], "option iters of method 'sculpt' takes a number"),
        (["generate", "--cache", "/nonexistent.kvs", "--prompt", "x"], "no cache file"),
    ],
)  # fmt: skip
def test_cli_user_errors_exit_2_with_one_line(smollm, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err[-1].startswith("kvsculpt: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("(default: 0.3)", "(default: kvzip-v)", "(default: global)", "(default: self+repeat)", "kvzip:",
                  "curves:", "self:", "(default: kvzip)", "0 or none keeps all"):  # fmt: skip
        assert piece in text


def test_cli_analyze_writes_json_figures_and_summary(smollm, tmp_path):
    out = tmp_path / "an"
    main(["analyze", "--text", "openai_agents_tar_utils", "--context-tokens", "256", "--ratio", "0.3", "--queries",
          "context", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "difficulty.json").read_text())
    difficulty = torch.tensor(data["difficulty"])
    assert difficulty.shape == (30, 3) and (difficulty > 0).all()
    assert sum(map(sum, data["budgets"])) == round(0.3 * 256) * 30 * 3
    per_layer = difficulty.mean(1)
    assert data["layer_spread"] == pytest.approx(float(per_layer.max() / per_layer.min()), rel=1e-5)
    head_ratio = difficulty.max(1).values / difficulty.min(1).values
    assert data["max_head_ratio_within_layer"] == pytest.approx(float(head_ratio.max()), rel=1e-5)
    assert data["max_head_ratio_layer"] == int(head_ratio.argmax())
    for png in ("difficulty.png", "budgets.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert (
        f"**{data['layer_spread']:.1f}×**" in summary and f"layer {data['max_head_ratio_layer']}" in summary
    )


def test_on_policy_layer_by_layer_keeps_budgets_and_changes_the_fit():
    from kvsculpt.compress import compress_captured

    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 64))
    cfg = CompressConfig(ratio=0.25, method="h2o", queries="self+context", allocation="uniform", self_samples=3,
                         self_length=8, heldout=0.2)  # fmt: skip
    cap = capture(model, ids, cfg)
    plain = compress_captured(model, cap, cfg, progress=False)
    staged = compress_captured(model, cap, cfg.replace(on_policy=2), progress=False)
    assert staged.budgets == plain.budgets and staged.info["on_policy"] == 2
    # layer 0 is solved before any replay, so it is identical; layer 1 was fitted to replayed queries
    torch.testing.assert_close(staged.layers[0].block_values, plain.layers[0].block_values)
    assert not torch.allclose(staged.layers[1].block_values, plain.layers[1].block_values)


def test_global_budgets_count_the_sinks_the_selection_keeps():
    """KVzip with global budgets: every head keeps exactly its entries among the global top set (sinks scored
    +inf, as kvpress scores them), so no head gives up a higher-ranked entry for a sink ranked outside it."""
    from kvsculpt.core.attention import reference

    model = tiny_model("qwen2")
    n, ratio = 64, 0.25
    ids = torch.randint(0, 97, (1, n))
    cfg = CompressConfig(ratio=ratio, method="kvzip", fit=False, queries="context", allocation="global")
    cap = capture(model, ids, cfg)
    cache = compress(model, ids, cfg, progress=False)
    peak = torch.stack(
        [reference(q, K, None, cap.scale).peak for q, K in zip(cap.queries, cap.keys, strict=True)]
    )
    plain_top = peak.flatten().topk(round(ratio * n) * 4).indices
    sinks = torch.zeros_like(peak, dtype=torch.bool)
    sinks[..., :4] = True
    in_plain_top = torch.zeros(peak.numel(), dtype=torch.bool)
    in_plain_top[plain_top] = True
    assert not in_plain_top[sinks.flatten()].all()  # unscored, some sinks would rank outside the top set
    scored = peak.masked_fill(sinks, float("inf"))
    top = torch.zeros(peak.numel(), dtype=torch.bool)
    top[scored.flatten().topk(round(ratio * n) * 4).indices] = True
    top = top.reshape(peak.shape)
    assert cache.budgets == top.sum(-1).tolist()  # (n/64 = 1 per head: the floor never binds here)
    for li, layer in enumerate(cache.layers):
        for h, kept in enumerate(layer.padded_block()[0]):
            kept = kept[: layer.lengths[h]]
            idx = (
                (kept[:, None] == cap.keys[li][h][None]).all(-1).float().argmax(-1)
            )  # where each kept key came from
            assert top[li, h, idx].all() and set(range(4)) <= set(idx.tolist())


def test_global_budgets_score_each_layer_once(monkeypatch):
    """The entry scores that rank entries for global budgets are the ones the selection uses: the scorer runs
    once per layer, not once for the budgets and again for the selection."""
    from kvsculpt.core.scores import KVzip

    model = tiny_model("llama")
    calls = []
    scorer_call = KVzip.__call__
    monkeypatch.setattr(
        KVzip, "__call__", lambda self, *a, **k: calls.append(1) or scorer_call(self, *a, **k)
    )
    cfg = CompressConfig(ratio=0.25, method="kvzip", queries="context", allocation="global")
    compress(model, torch.randint(0, 97, (1, 48)), cfg, progress=False)
    assert len(calls) == 2  # one per layer (it was 2 per layer)


def test_compress_reports_its_peak_extra_memory_and_the_full_caches_bytes():
    from kvsculpt.compress import PeakMemory

    with PeakMemory("cpu") as peak:
        block = torch.ones(50_000_000)  # 200 MB, touched
        del block
    assert 190e6 <= peak.extra <= 260e6
    model = tiny_model("llama")
    cache = compress(model, torch.randint(0, 97, (1, 40)), ratio=0.25, queries="context", progress=False)
    assert cache.info["full_cache_bytes"] == 2 * 40 * 2 * 2 * 16 * 4  # K and V, n, layers, KV heads, d, fp32
    assert 0 <= cache.info["peak_extra_bytes"] < 200e6


def _head(cache, li, h):
    """Head ``h`` of layer ``li``'s block: ``(keys [m, d], values [m, d])`` in fp32."""
    layer = cache.layers[li]
    keys, values = layer.dense()
    start = sum(layer.lengths[:h])
    end = start + layer.lengths[h]
    return keys[start:end].float(), values[start:end].float()


class _Tok:  # three ids for any text: enough for the repeat requests of a tiny model
    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[5, 6, 7]])}


def _chunked_capture(kind="llama", n=48, chunk=16):
    model = tiny_model(kind)
    ids = torch.randint(0, 97, (1, n))
    cfg = CompressConfig(queries="self+repeat", repeat_chunk=chunk, self_samples=3, self_length=4)
    return model, ids, cfg, capture(model, ids, cfg, tokenizer=_Tok())


def test_a_whole_context_query_splits_exactly_into_its_part_and_the_rest():
    """For a query that reads the whole context (a self sample), its log-mass on a part ⊕ its log-mass outside
    the part (:func:`chunk_rows`) is its log-mass over all n keys, for every part; a repeat query of a part is a
    row of that part only, with its request's and copy's log-mass as captured."""
    from kvsculpt.compress import chunk_rows, solved_in_chunks
    from kvsculpt.hf.capture import repeat_requests

    _, ids, cfg, cap = _chunked_capture()
    chunks = solved_in_chunks(cap, cfg)
    request_tokens = [req.shape[1] for _, _, req in repeat_requests(_Tok(), ids, "kvzip", 16)]  # 22, 30, 30
    assert chunks == [(0, 16), (16, 32), (32, 48)]
    K, Q = cap.keys[1], cap.queries[1]
    whole = (cap.spans[:, 1] - cap.spans[:, 0]) == 48
    everything = torch.logsumexp(Q[:, whole] @ K.transpose(1, 2) * cap.scale, -1)
    parts = chunk_rows(K, Q, cap.spans, cap.local_lse[1], chunks, cap.scale)
    for (a, b, rows, loc), t in zip(parts, request_tokens, strict=True):
        assert int(rows.sum()) == int(whole.sum()) + 2 * t  # self rows + the part's request queries (G = 2)
        part = torch.logsumexp(Q[:, rows] @ K[:, a:b].transpose(1, 2) * cap.scale, -1)
        w = whole[rows]
        torch.testing.assert_close(torch.logaddexp(part[:, w], loc[:, w]), everything, rtol=0, atol=1e-5)
        mine = rows & ~whole
        assert (cap.spans[mine] == torch.tensor([a, b])).all()
        torch.testing.assert_close(loc[:, ~w], cap.local_lse[1][:, mine])


def test_solving_in_chunks_keeps_each_heads_best_entries_and_is_exact_when_everything_is_kept():
    """Solved part by part, every head keeps exactly its budget, and the kept keys are the original keys at
    the head's best positions by the scores that set the budgets (so the parts share a head's budget as the
    scores say). Keeping every entry gives the original cache back (fitted values to 1e-4)."""
    from kvsculpt.compress import compress_captured

    model, ids, cfg, cap = _chunked_capture()
    cache = compress_captured(model, cap, cfg.replace(ratio=0.25), progress=False)
    assert cache.info["solved_in_chunks"] == 3
    from kvsculpt.compress import chunked_entry_scores, solved_in_chunks

    chunks = solved_in_chunks(cap, cfg)
    scores = chunked_entry_scores(cap, cfg.solver, cap.queries, cap.local_lse, chunks, cap.spans)
    assert sum(map(sum, cache.budgets)) == 2 * 2 * 12  # round(0.25 · 48) per head on average
    for li, layer in enumerate(cache.budgets):
        for h, m in enumerate(layer):
            best = scores[li, h].topk(m).indices.sort().values
            torch.testing.assert_close(_head(cache, li, h)[0], cap.keys[li][h, best])
    eight = compress_captured(
        model, cap, cfg.replace(ratio=0.25, kv_bits=8), progress=False
    )  # refit by parts
    assert eight.budgets == cache.budgets and eight.layers[0].quantized
    _, v16 = _head(cache, 1, 1)
    assert 0 < (_head(eight, 1, 1)[1] - v16).abs().max() < 0.05 * v16.abs().max()
    held = compress_captured(
        model, cap, cfg.replace(ratio=0.25, heldout=0.3), progress=False
    )  # fewer fit rows
    assert (
        held.info["heldout_queries"] > 0 and held.info["solved_in_chunks"] == 3
    )  # the parts' rows were split too
    assert all(0 <= e < 0.5 for layer in held.info["stats"]["heldout_rel_mse"] for e in layer)
    full = compress_captured(model, cap, cfg.replace(ratio=1.0), progress=False)
    for li in range(2):
        for h in range(2):
            keys, values = _head(full, li, h)
            torch.testing.assert_close(keys, cap.keys[li][h])
            torch.testing.assert_close(values, cap.values[li][h], rtol=0, atol=1e-4)


def test_a_context_shorter_than_a_chunk_is_solved_as_before():
    """One repeat request (n ≤ repeat_chunk): no parts, and the same cache as with one request asked for."""
    from kvsculpt.compress import compress_captured

    model, ids, cfg, cap = _chunked_capture(n=24, chunk=32)
    assert cap.spans is None
    a = compress_captured(model, cap, cfg, progress=False)
    cap0 = capture(model, ids, cfg.replace(repeat_chunk=0), tokenizer=_Tok())
    b = compress_captured(model, cap0, cfg.replace(repeat_chunk=0), progress=False)
    assert a.info["solved_in_chunks"] == 1 and a.budgets == b.budgets
    torch.testing.assert_close(_head(a, 1, 0), _head(b, 1, 0))


def test_held_repeat_queries_score_as_all_of_them_and_only_the_held_ones_are_fitted():
    """``repeat_fit_rows=R`` with three repeat requests: each request holds R of its pooled queries per KV head
    (the same rows as a full capture's, a fixed subset), while every entry's score still counts every repeat
    query (equal to the full capture's scores to 1e-5: KVzip's peak is a maximum a subset would lower). With R
    small the cache keeps the same entries (same scores) and differs only in its fitted values; with R above
    every request's count it is the full capture's cache; a context of one request holds every query."""
    from kvsculpt.compress import captured_entry_scores, compress_captured

    model, ids, cfg, full = _chunked_capture(n=48, chunk=16)
    R = 10
    held = capture(model, ids, cfg.replace(repeat_fit_rows=R), tokenizer=_Tok())
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    assert (
        full.info["repeat_chunks"] == 3 and held.info["repeat_queries"] == 3 * R < full.info["repeat_queries"]
    )
    assert held.info["self_queries"] == full.info["self_queries"] == 3 * 4 * G
    assert int(held.prescored.sum()) == 3 * R and not held.prescored[: 3 * 4 * G].any()  # self first
    for li in range(2):  # the held rows are rows of the full capture
        dist = torch.cdist(
            held.queries[li][0], full.queries[li][0], compute_mode="donot_use_mm_for_euclid_dist"
        )
        assert float(dist.min(1).values.max()) < 1e-5
    want = captured_entry_scores(full, cfg)
    got = captured_entry_scores(held, cfg.replace(repeat_fit_rows=R))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    small = compress_captured(model, held, cfg.replace(ratio=0.25, repeat_fit_rows=R), progress=False)
    base = compress_captured(model, full, cfg.replace(ratio=0.25), progress=False)
    assert small.budgets == base.budgets
    keys_small, values_small = _head(small, 1, 1)
    keys_base, values_base = _head(base, 1, 1)
    torch.testing.assert_close(keys_small, keys_base)
    assert (values_small - values_base).abs().max() > 1e-4  # fitted on fewer rows
    everything = capture(model, ids, cfg.replace(repeat_fit_rows=10_000), tokenizer=_Tok())
    same = compress_captured(
        model, everything, cfg.replace(ratio=0.25, repeat_fit_rows=10_000), progress=False
    )
    for li in range(2):
        for h in range(2):
            for x, y in zip(_head(same, li, h), _head(base, li, h), strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    _, short_ids, short_cfg, short = _chunked_capture(n=24, chunk=32)
    one = capture(model, short_ids, short_cfg.replace(repeat_fit_rows=R), tokenizer=_Tok())
    assert one.prescored is None and one.info["repeat_queries"] == short.info["repeat_queries"] > R


def test_repeat_fit_rows_is_checked():
    with pytest.raises(ValueError, match="repeat_fit_rows must be a whole number >= 1"):
        CompressConfig(repeat_fit_rows=0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resident-set counters")
def test_peak_memory_counts_what_freed_heap_memory_would_hide():
    """Memory freed before the block but still resident (small allocations behind a live one, which the C heap
    keeps) is reused inside it without raising the resident set: the peak must still count it."""
    from kvsculpt.compress import PeakMemory

    def churn():
        return [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KiB each: the heap, not mmap; 125 MiB

    held = churn()
    pin = torch.ones(16 * 1024)  # allocated after them: the freed space is not at the heap's top
    del held
    with PeakMemory("cpu") as peak:
        again = churn()
    assert 100 * 2**20 < peak.extra < 400 * 2**20
    del again, pin


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's resident-set counters")
def test_peak_memory_leaves_out_file_pages_read_in(tmp_path):
    """Weights mapped from a file become resident when first read (a fresh process's first forward): that is
    not memory the block holds, so its peak leaves it out, while what it allocates is still counted."""
    from kvsculpt.compress import PeakMemory

    path = tmp_path / "weights.bin"
    torch.ones(32 * 2**20).numpy().tofile(path)  # 128 MiB
    mapped = torch.from_file(str(path), shared=True, size=32 * 2**20)  # mapped, not yet read
    with PeakMemory("cpu") as peak:
        total = float(mapped.sum())
    assert total == 32 * 2**20 and peak.extra < 40 * 2**20
    with PeakMemory("cpu") as peak:
        held = mapped.clone() + 1  # 128 MiB allocated (two tensors at once: the clone, then its sum)
    assert 100 * 2**20 < peak.extra < 300 * 2**20
    del held, mapped


@pytest.mark.parametrize("chunk_tokens, repeat_chunk", [(0, 16), (0, 0), (16, 16)])
def test_a_bf16_capture_keeps_the_caches_dtype_and_compresses_as_an_fp32_copy_would(chunk_tokens, repeat_chunk,
                                                                                     monkeypatch):  # fmt: skip
    """The capture holds a bf16 model's keys and values as its cache does (bf16, the very tensors: no fp32 copy
    of the whole cache); every consumer upcasts one layer at a time, so the compressed cache is bit for bit the
    one an fp32 copy gives (bf16 → fp32 is exact). Chunked repeat pass with held rows, one request and one
    solve, and reading in parts."""
    import sys

    compress_module = sys.modules["kvsculpt.compress"]  # the package's `compress` is the function
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 48))
    cfg = CompressConfig(queries="self+repeat", repeat_chunk=repeat_chunk, repeat_fit_rows=10, self_samples=3,
                         self_length=4, ratio=0.25, chunk_tokens=chunk_tokens)  # fmt: skip
    cap = capture(model, ids, cfg, tokenizer=_Tok())
    full, _, _ = prefill(model, ids)
    assert cap.keys[0].dtype == torch.bfloat16 and torch.equal(cap.keys[1], full.layers[1].keys[0])
    kept = compress(model, ids, cfg, tokenizer=_Tok(), progress=False)

    def upcast(fn):
        def wrapped(*args, **kw):
            c = fn(*args, **kw)
            c.keys, c.values = [k.float() for k in c.keys], [v.float() for v in c.values]
            return c

        return wrapped

    monkeypatch.setattr(compress_module, "capture", upcast(compress_module.capture))
    monkeypatch.setattr(compress_module, "capture_part", upcast(compress_module.capture_part))
    copied = compress(model, ids, cfg, tokenizer=_Tok(), progress=False)
    for li in range(2):
        for h in range(2):
            for a, b in zip(_head(kept, li, h), _head(copied, li, h), strict=True):
                assert torch.equal(a, b)
