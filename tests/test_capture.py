import pytest
import torch
from transformers import DynamicCache

from kvsculpt.core.attention import attend
from kvsculpt.core.fit import split_heldout, subsample_index
from kvsculpt.hf.attention import capture_queries
from kvsculpt.hf.capture import capture, pool_gqa
from kvsculpt.hf.decode import prefill
from kvsculpt.hf.dims import check_supported

from .conftest import tiny_model


def _attention_outputs(model, ids):
    """Each layer's attention output before o_proj, [n, H*d], via forward pre-hooks."""
    outs, hooks = [], []
    for layer in model.model.layers:
        hooks.append(
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: outs.append(a[0][0].clone()))
        )
    try:
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_recomputed_attention_matches_each_layer(tiny):
    ids = torch.randint(0, 97, (1, 40))
    reference = _attention_outputs(tiny, ids)
    with capture_queries(tiny) as sinks:
        cache, _, _ = prefill(tiny, ids)
    queries = [torch.cat(s, dim=2) for s in sinks]
    H = tiny.config.num_attention_heads
    G = H // tiny.config.num_key_value_heads
    for li, layer in enumerate(cache.layers):
        q = queries[li][0]  # [H, n, d]
        k = layer.keys[0].repeat_interleave(G, 0)
        v = layer.values[0].repeat_interleave(G, 0)
        n, d = q.shape[1], q.shape[2]
        scores = q @ k.transpose(1, 2) / d**0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, -1) @ v  # [H, n, d]
        got = out.transpose(0, 1).reshape(n, H * d)
        assert (got - reference[li]).abs().max() < 1e-4


def test_chunked_prefill_gives_the_one_forward_cache(tiny):
    """Reading the context 16 tokens a forward (the last chunk short) gives one forward's keys, values and
    last logits, also for a part read after ``start`` tokens; 1e-5, as SDPA's kernels may round differently."""
    ids = torch.randint(0, 97, (1, 45))
    whole, last, _ = prefill(tiny, ids)
    chunked, last_c, _ = prefill(tiny, ids, chunk=16)
    assert (last - last_c).abs().max() < 1e-5
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        assert (a.keys - b.keys).abs().max() < 1e-5 and (a.values - b.values).abs().max() < 1e-5
    part, last_p, _ = prefill(tiny, ids[:, 20:], prefill(tiny, ids[:, :20])[0], start=20, chunk=16)
    assert (last - last_p).abs().max() < 1e-5
    assert (whole.layers[-1].keys - part.layers[-1].keys).abs().max() < 1e-5


def test_capture_prefills_in_chunks(tiny, monkeypatch):
    """With ``PREFILL_CHUNK`` set, the compressor's prefill reads that many tokens a forward (its transients are
    one chunk's, whatever n is), and the capture (keys, values, the context's own queries) is the one-forward
    capture."""
    from kvsculpt.hf import decode as decode_module

    ids = torch.randint(0, 97, (1, 40))
    whole = capture(tiny, ids, queries="context", keep_context_queries=True)
    monkeypatch.setattr(decode_module, "PREFILL_CHUNK", 16)
    lengths = []
    hook = tiny.model.embed_tokens.register_forward_hook(lambda m, a, out: lengths.append(a[0].shape[1]))
    try:
        chunked = capture(tiny, ids, queries="context", keep_context_queries=True)
    finally:
        hook.remove()
    assert lengths == [16, 16, 8]
    for li in range(len(whole.keys)):
        assert (whole.keys[li] - chunked.keys[li]).abs().max() < 1e-5
        assert (whole.values[li] - chunked.values[li]).abs().max() < 1e-5
        assert (whole.context_queries[li] - chunked.context_queries[li]).abs().max() < 1e-5
    assert (whole.queries[0] - chunked.queries[0]).abs().max() < 1e-5


def test_captured_keys_equal_a_plain_sdpa_cache(tiny):
    ids = torch.randint(0, 97, (1, 30))
    cap = capture(tiny, ids, queries="context")
    tiny.set_attn_implementation("sdpa")
    plain = DynamicCache()
    with torch.no_grad():
        tiny(ids, past_key_values=plain, use_cache=True)
    for li, layer in enumerate(plain.layers):
        assert torch.equal(cap.keys[li], layer.keys[0])
        assert torch.equal(cap.values[li], layer.values[0])


def test_pool_gqa_groups_query_heads_by_kv_head():
    q = torch.arange(2 * 4 * 3).float().reshape(1, 4, 3, 2).repeat(1, 1, 1, 1)  # [B=1, H=4, T=3, d=2]
    pooled = pool_gqa(q, kv_heads=2)
    assert pooled.shape == (2, 2 * 3, 2)
    assert torch.equal(pooled[0], torch.cat([q[0, 0], q[0, 1]]))
    assert torch.equal(pooled[1], torch.cat([q[0, 2], q[0, 3]]))


def test_query_sources_shapes_and_subsampling(tiny):
    ids = torch.randint(0, 97, (1, 24))
    L, Hkv, G = 2, 2, 2
    ctx = capture(tiny, ids, queries="context")
    assert len(ctx.queries) == L and ctx.queries[0].shape == (Hkv, G * 24, 16)
    assert ctx.groups.shape == (G * 24,)
    slf = capture(tiny, ids, queries="self", self_samples=3, self_length=5)
    assert slf.queries[0].shape == (Hkv, 3 * G * 5, 16) and slf.samples.shape == (3, 5)
    mixed = capture(tiny, ids, queries="self+context", self_samples=2, self_length=4, max_queries=50)
    assert mixed.queries[0].shape == (Hkv, 50, 16) and mixed.groups.shape == (50,)
    by_source = [mixed.info["self_seconds"], mixed.info["context_seconds"]]  # the stages of the cost profile
    assert min(by_source) >= 0 and sum(by_source) <= mixed.query_seconds
    with pytest.raises(ValueError, match="tokenizer"):
        capture(tiny, ids, queries="repeat")


def test_self_queries_replay_matches_sampling(tiny):
    """Queries captured while sampling equal those of a batch-1 replay of the same tokens."""
    ids = torch.randint(0, 97, (1, 20))
    cap = capture(tiny, ids, queries="self", self_samples=2, self_length=6, seed=3)
    cache, _, _ = prefill(tiny, ids)
    with capture_queries(tiny) as sinks, torch.no_grad():
        tiny(cap.samples[1:2], past_key_values=cache, position_ids=torch.arange(20, 26)[None], use_cache=True)
    replay = pool_gqa(torch.cat(sinks[1], 2), 2)  # [Hkv, G*6, d] for sample 1, layer 1
    sampled = cap.queries[1][:, cap.groups == 1]
    assert (replay - sampled).abs().max() < 1e-4


def test_subsample_and_heldout_split():
    groups = torch.arange(100) // 10
    keep = subsample_index(100, 30, seed=1)
    assert keep.shape == (30,) and torch.equal(keep, keep.sort().values) and keep.unique().numel() == 30
    assert torch.equal(keep, subsample_index(100, 30, seed=1)) and subsample_index(100, 100) is None
    held = split_heldout(groups, 0.3)
    held_groups = torch.unique(groups[held])
    assert len(held_groups) == 3
    assert not torch.isin(groups[~held], held_groups).any()


def test_attend_matches_softmax():
    Q, K, V = torch.randn(5, 8), torch.randn(7, 8), torch.randn(7, 8)
    out, z = attend(Q, K, V, 0.3)
    lg = Q @ K.T * 0.3
    assert torch.allclose(out, torch.softmax(lg, -1) @ V, atol=1e-6)
    assert torch.allclose(z, torch.logsumexp(lg, -1), atol=1e-6)


def test_local_lse_in_chunks_equals_the_masked_square():
    """Each of the last t queries' log-sum-exp over the local keys it sees causally, computed a chunk of queries
    at a time against only the keys the chunk can see, equals the masked full square."""
    from kvsculpt.core.attention import local_lse

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 6, 23, 8, generator=g), torch.randn(2, 30, 8, generator=g)  # GQA 3, s=30 > t=23
    lg = q[0] @ k.repeat_interleave(3, 0).transpose(1, 2) * 0.4  # [6, 23, 30]
    future = torch.arange(30)[None] > torch.arange(7, 30)[:, None]
    want = torch.logsumexp(lg.masked_fill(future, float("-inf")), -1)[None]
    for chunk in (1, 5, 23, 256):
        torch.testing.assert_close(local_lse(q, k, 0.4, chunk=chunk), want)


def test_nucleus_sampling_over_candidates_draws_what_a_full_sort_draws():
    """Sorting only the most likely tokens (when the nucleus lies within them) changes no sample: the same
    generator gives the same tokens as a full sort, for peaked rows (candidates suffice) and flat ones (the
    nucleus is wider than the candidates, so the whole vocabulary is sorted)."""
    from kvsculpt.hf.decode import top_p_pick

    def full_sort_pick(gen):
        def pick(logits):
            sorted_p, order = torch.softmax(logits, -1).sort(dim=-1, descending=True)
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) > 0.9] = 0.0
            return order.gather(-1, torch.multinomial(sorted_p, 1, generator=gen))

        return pick

    g = torch.Generator().manual_seed(1)
    for spread in (0.1, 6.0):  # flat, peaked
        want, got = (
            full_sort_pick(torch.Generator().manual_seed(0)),
            top_p_pick(1.0, 0.9, torch.Generator().manual_seed(0), 32),
        )
        rows = [torch.randn(5, 500, generator=g) * spread for _ in range(50)]
        picks = [got(x) for x in rows]
        assert all(torch.equal(want(x), p) for x, p in zip(rows, picks, strict=True))
        assert len({int(p[0]) for p in picks}) > 5  # it really samples


def test_unsupported_models_get_clear_errors():
    model = tiny_model("qwen2")
    model.config.use_sliding_window = True
    model.config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding-window"):
        check_supported(model)
    model.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="not supported"):
        check_supported(model)


def test_bad_context_ids(tiny):
    with pytest.raises(ValueError, match="empty"):
        capture(tiny, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown queries"):
        capture(tiny, torch.zeros(1, 4, dtype=torch.long), queries="future")


def test_replay_over_the_full_cache_gives_the_captured_queries(tiny):
    """Replaying the self samples over an uncompressed block reproduces the sampled queries (subsampled,
    mixed with context queries); over a compressed block the self queries change and the others do not."""
    from kvsculpt.cache import CompressedCache
    from kvsculpt.hf.capture import replay_self_queries

    ids = torch.randint(0, 97, (1, 48))
    cap = capture(tiny, ids, queries="context+self", max_queries=100, self_samples=3, self_length=8)
    assert cap.info["subsample_index"] is not None
    full = CompressedCache.from_heads(tiny, [list(K) for K in cap.keys], [list(V) for V in cap.values], cap.n)
    replayed = replay_self_queries(tiny, cap, full)
    for q_old, q_new in zip(cap.queries, replayed, strict=True):
        torch.testing.assert_close(q_new, q_old, atol=1e-4, rtol=1e-4)
    half = CompressedCache.from_heads(
        tiny, [[k[:10] for k in K] for K in cap.keys], [[v[:10] for v in V] for V in cap.values], cap.n
    )
    moved = replay_self_queries(tiny, cap, half)
    keep = cap.info["subsample_index"]
    start, end = cap.info["self_span"]
    is_self = ((keep >= start) & (keep < end)).to(cap.queries[1].device)
    assert is_self.any() and (~is_self).any()
    torch.testing.assert_close(moved[1][:, ~is_self], cap.queries[1][:, ~is_self])
    assert (
        moved[1][:, is_self] - cap.queries[1][:, is_self]
    ).abs().max() > 1e-3  # layer 1 sees layer 0's change


class _StubTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[5, 6, 7]])}


@pytest.mark.parametrize("style, prompt", [("plain", [5, 6, 7]), ("kvzip", [5, 6, 7, 5, 6, 7])])
def test_repeat_queries_carry_their_mass_outside_the_context(tiny, style, prompt):
    """Context log-mass ⊕ local log-mass = the log-mass over everything the repeat query really sees; the
    queries are the copy's (plain) or the request's and the copy's (kvzip: the request, then the chat template's
    reply start, here "\n" as the stub has no template)."""
    n = 24
    ids = torch.randint(0, 97, (1, n))
    cap = capture(tiny, ids, queries="repeat", repeat_prompt=style, tokenizer=_StubTokenizer())
    full_ids = torch.cat([ids, torch.tensor([prompt]), ids], dim=1)
    t = n if style == "plain" else n + len(prompt)  # the queries taken
    cache = DynamicCache()
    with torch.no_grad(), capture_queries(tiny) as sinks:
        tiny(full_ids, past_key_values=cache, use_cache=True)
    Hkv = tiny.config.num_key_value_heads
    assert cap.queries[0].shape[1] == t * tiny.config.num_attention_heads // Hkv
    for li, layer in enumerate(cache.layers):
        q = torch.cat(sinks[li], dim=2)[:, :, -t:].float()  # [1, H, t, d]
        k = layer.keys[0].float().repeat_interleave(q.shape[1] // Hkv, 0)  # [H, 2n+p, d]
        lg = q[0] @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # [H, t, 2n+p]
        future = torch.arange(k.shape[1])[None] > torch.arange(k.shape[1] - t, k.shape[1])[:, None]
        true_lse = pool_gqa(torch.logsumexp(lg.masked_fill(future, float("-inf")), -1)[None, ..., None], Hkv)[
            ..., 0
        ]
        torch.testing.assert_close(pool_gqa(q, Hkv), cap.queries[li])
        ctx_lse = torch.logsumexp(cap.queries[li] @ cap.keys[li].transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        assert torch.allclose(torch.logaddexp(ctx_lse, cap.local_lse[li]), true_lse, atol=1e-4)
    assert capture(tiny, ids, queries="context").local_lse is None  # no source with keys outside the context


def test_kvzip_repeat_prompt_ends_as_the_assistants_reply(smollm):
    from kvsculpt.hf.capture import repeat_prompt_ids

    _, tok = smollm
    text = tok.decode(repeat_prompt_ids(tok, "kvzip")[0])
    assert text.startswith("\n\nRepeat the previous context exactly.")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(repeat_prompt_ids(tok, "plain")[0]) == "\n\nRepeat the text above.\n\n"


@pytest.mark.parametrize("style", ["plain", "kvzip"])
def test_the_repeat_pass_in_chunks_gives_the_same_queries_and_masses(tiny, style, monkeypatch):
    """The repeat pass run 5 tokens per forward (so chunks straddle the prompt and the copy) gives the queries
    and local log-masses of one full-width forward, to 1e-6."""
    from kvsculpt.hf import capture as capture_module

    ids = torch.randint(0, 97, (1, 24))
    whole = capture(tiny, ids, queries="repeat", repeat_prompt=style, tokenizer=_StubTokenizer())
    monkeypatch.setattr(capture_module, "REPEAT_FORWARD", 5)
    widths, forward = [], capture_module.forward
    monkeypatch.setattr(
        capture_module, "forward", lambda m, x, *a, **k: widths.append(x.shape[1]) or forward(m, x, *a, **k)
    )
    chunked = capture(tiny, ids, queries="repeat", repeat_prompt=style, tokenizer=_StubTokenizer())
    assert max(widths) == 5 and len(widths) > 5  # the repeat pass really ran in forwards of at most 5 tokens
    for a, b, la, lb in zip(whole.queries, chunked.queries, whole.local_lse, chunked.local_lse, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(lb, la, rtol=0, atol=1e-6)


@pytest.mark.parametrize("style", ["plain", "kvzip"])
def test_the_repeat_pass_reads_each_chunk_on_its_own_over_the_context(tiny, style):
    """With ``repeat_chunk=8`` a 24-token context is repeated in three requests, each read over the context's
    cache alone (not the requests before it): every request's queries and local log-masses equal a fresh
    forward of ``context + request`` to 1e-5, and a later request quotes the 8 tokens before its chunk."""
    from kvsculpt.core.attention import local_lse
    from kvsculpt.hf.capture import repeat_requests

    n, Hkv = 24, tiny.config.num_key_value_heads
    ids = torch.randint(0, 97, (1, n))
    tok = _StubTokenizer()
    requests = repeat_requests(tok, ids, style, 8)
    assert [(a, b) for a, b, _ in requests] == [(0, 8), (8, 16), (16, 24)]
    assert (
        requests[1][2][0, 3:11].tolist() == ids[0, :8].tolist()
    )  # the quote: the first chunk's last 8 tokens
    assert requests[2][2][0, -8:].tolist() == ids[0, 16:].tolist()  # then the chunk itself
    cap = capture(tiny, ids, queries="repeat", repeat_prompt=style, repeat_chunk=8, tokenizer=tok)
    want_q = [[] for _ in tiny.model.layers]
    want_lse = [[] for _ in tiny.model.layers]
    for a, b, req in requests:
        t = b - a if style == "plain" else req.shape[1]
        cache = DynamicCache()
        with torch.no_grad(), capture_queries(tiny) as sinks:
            tiny(torch.cat([ids, req], 1), past_key_values=cache, use_cache=True)
        for li, (s, layer) in enumerate(zip(sinks, cache.layers, strict=True)):
            q = torch.cat(s, dim=2)[:, :, -t:].float()
            want_q[li].append(q)
            want_lse[li].append(local_lse(q, layer.keys[0, :, n:].float(), q.shape[-1] ** -0.5))
    for li in range(len(want_q)):  # pooled request by request: request, GQA head, token
        q = torch.cat([pool_gqa(x, Hkv) for x in want_q[li]], 1)
        torch.testing.assert_close(cap.queries[li], q, rtol=0, atol=1e-5)
        lse = torch.cat([pool_gqa(x[..., None], Hkv)[..., 0] for x in want_lse[li]], 1)
        torch.testing.assert_close(cap.local_lse[li], lse, rtol=0, atol=1e-5)
    assert cap.info["repeat_chunks"] == 3
    whole = capture(tiny, ids, queries="repeat", repeat_prompt=style, repeat_chunk=0, tokenizer=tok)
    G = tiny.config.num_attention_heads // Hkv
    t_last = requests[-1][2].shape[1] if style == "kvzip" else 8
    last = [c.queries[-1][:, -G * t_last :].reshape(Hkv, G, t_last, -1)[:, :, -8:] for c in (whole, cap)]
    assert (
        whole.info["repeat_chunks"] == 1
    )  # one request: the last chunk's copy also saw the 16 tokens before
    assert (last[0] - last[1]).abs().max() > 1e-3


def test_one_mask_per_forward_gives_the_same_logits_as_one_per_layer(tiny):
    """A forward of q tokens over a cache builds its causal mask once and shares it across the layers
    (reuse_masks); the logits are those of a mask built per layer, bit for bit, and nothing is held after it."""
    from kvsculpt.hf import attention as attn
    from kvsculpt.hf.decode import forward

    model = tiny_model(tiny)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    built = []
    real = attn.future_mask

    def counting(q_len, kv_len, device=None):
        built.append((q_len, kv_len))
        return real(q_len, kv_len, device)

    outs = []
    for shared in (False, True):
        cache = DynamicCache()
        forward(model, ids[:, :24], cache, 0)
        built.clear()
        attn.future_mask = counting
        try:
            if shared:
                outs.append(forward(model, ids[:, 24:], cache, 24))  # decode.forward: inside reuse_masks
            else:
                pos = torch.arange(24, 40)[None]
                outs.append(
                    model(ids[:, 24:], past_key_values=cache, position_ids=pos, use_cache=True).logits
                )
        finally:
            attn.future_mask = real
        assert built == ([(16, 40)] if shared else [(16, 40)] * model.config.num_hidden_layers)
    assert torch.equal(outs[0], outs[1])
    assert attn._shared_masks is None


@pytest.mark.parametrize("style", ["plain", "kvzip"])
def test_a_requests_held_rows_and_scores_do_not_depend_on_how_its_forwards_are_cut(tiny, style, monkeypatch):
    """request_queries scores and thins each layer's queries inside the forward. Asked for a subset of rows, it
    returns exactly those rows of the whole set; the span's peak and total count every query, the same whether
    the request runs in one forward or in forwards of 5 tokens (straddling the prompt and the copy)."""
    from kvsculpt.hf import capture as capture_module
    from kvsculpt.hf.capture import repeat_requests, request_queries

    n = 24
    ids = torch.randint(0, 97, (1, n))
    a, b, req = repeat_requests(_StubTokenizer(), ids, style, 12)[1]
    t = b - a if style == "plain" else req.shape[1]
    G = tiny.config.num_attention_heads // tiny.config.num_key_value_heads
    rows = subsample_index(G * t, 7, seed=3)
    out = {}
    for chunk in (64, 5):
        monkeypatch.setattr(capture_module, "REPEAT_FORWARD", chunk)
        cache, _, _ = prefill(tiny, ids)
        with torch.inference_mode():
            out[chunk, "all"] = request_queries(tiny, cache, req, n, t, (a, b))
            out[chunk, "some"] = request_queries(tiny, cache, req, n, t, (a, b), rows)
        assert cache.get_seq_length() == n
    for li in range(tiny.config.num_hidden_layers):
        q_all, lse_all, ref_all = (x[li] for x in out[64, "all"])
        for key in ((64, "some"), (5, "some"), (5, "all")):
            q, lse, ref = (x[li] for x in out[key])
            pick = slice(None) if key[1] == "all" else rows
            assert q.shape[1] == (G * t if key[1] == "all" else 7)
            torch.testing.assert_close(q, q_all[:, pick], rtol=0, atol=1e-6)
            torch.testing.assert_close(lse, lse_all[:, pick], rtol=0, atol=1e-5)
            torch.testing.assert_close(ref.peak, ref_all.peak, rtol=0, atol=1e-6)
            torch.testing.assert_close(ref.total, ref_all.total, rtol=1e-5, atol=1e-6)
        assert ref_all.peak.shape == (tiny.config.num_key_value_heads, b - a)
