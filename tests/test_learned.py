"""The learned one-prefill scorer: training on the default's scores, the weights file, ``method="learned"``."""

import pytest
import torch

from kvsculpt import CompressConfig, compress
from kvsculpt import learned as L
from kvsculpt.compress import captured_entry_scores
from kvsculpt.core import learned as lin
from kvsculpt.core.budget import Global
from kvsculpt.hf.capture import capture
from kvsculpt.hf.decode import prefill

from .conftest import tiny_model
from .test_compress import _Tok

CFG = CompressConfig(self_samples=3, self_length=4)


def _windows(count, n=40):
    return [
        (f"w{i}", torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(i)))
        for i in range(count)
    ]


def test_the_scorer_reproduces_the_scores_it_was_trained_on(tmp_path):
    """One window of 40 tokens gives 36 examples per head for 70 features: ridge with a tiny penalty must fit
    them (R² ≥ 0.99 on the default's log scores, where a hook on the wrong layer or a misaligned feature
    does not), and the prediction the prefill hook computes (the hidden part as each layer runs, the value
    part after) is the training features' function to 1e-5. The learned cache keeps what its scores' global
    ranking says."""
    model = tiny_model("llama")
    wins = _windows(1)
    path = L.train_scorer(model, _Tok(), wins, tmp_path / "s.safetensors", CFG, lam=1e-9, progress=False)
    weights, meta = L.load_weights(model, path)
    assert weights.shape == (2, 2, 70) and meta["windows"] == ["w0"] and meta["entries"] == 2 * 2 * 36
    ids = wins[0][1]
    want = captured_entry_scores(capture(model, ids, CFG, tokenizer=_Tok(), progress=False), CFG)
    y, use = lin.target(want)
    full, got, _, _, _ = L.prefill_scores(model, ids, weights)
    assert (
        bool(use[..., :4].any()) is False and torch.isinf(got[..., :4]).all()
    )  # the sinks: kept, not fitted
    for li in range(2):
        yl, gl = y[li][use[li]], got[li][use[li]]
        assert float(((gl - yl) ** 2).sum() / ((yl - yl.mean()) ** 2).sum()) < 0.01
    for li, X in enumerate(L.layer_features(model, ids)):
        torch.testing.assert_close(got[li, :, 4:], (X @ weights[li][..., None])[:, 4:, 0], rtol=0, atol=1e-5)
    cache = compress(model, ids, CFG.replace(method="learned", ratio=0.25, options={"weights": str(path)}),
                     progress=False)  # fmt: skip
    assert cache.budgets == Global().plan(40, 0.25, 2, 2, entry_scores=lambda: got)[0]


def test_learned_is_one_prefill_and_copies_the_prefill_entries(tmp_path):
    """``method="learned"`` runs the model once (a forward hook counts the calls) with copied values or values
    fitted on the prefill's last queries, and once plus the self samples' decode steps with the fit on self
    samples (the default). With ``fit=False`` every kept key and value is the full prefill's at some position
    (values copied, keys untouched); with either fit the same keys are kept and the values move."""
    model = tiny_model("qwen2")
    path = L.train_scorer(model, _Tok(), _windows(2), tmp_path / "s.safetensors", CFG, progress=False)
    ids = torch.randint(0, 97, (1, 48))
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    runs = {}
    for name, fit, options in (
        ("copied", False, {}),
        ("tail", True, {"fit_queries": "tail"}),
        ("self", True, {}),
    ):
        calls.clear()
        cfg = CFG.replace(method="learned", ratio=0.25, fit=fit, options={"weights": str(path), **options})
        runs[name] = compress(model, ids, cfg, progress=False)
        assert len(calls) == (
            1 if name != "self" else 1 + CFG.self_length
        )  # the prefill (+ the self samples)
    handle.remove()
    cache = runs["copied"]
    assert (
        cache.kept_entries() == 48 // 4 * 2 * 2
        and runs["self"].budgets == runs["tail"].budgets == cache.budgets
    )
    full, _, _ = prefill(model, ids)
    for li in range(2):
        K, V = full.layers[li].keys[0], full.layers[li].values[0]
        k, v = cache.layers[li].dense()
        match = (k[None, :, :] - K.reshape(-1, K.shape[-1])[:, None, :]).abs().amax(-1).min(0).values
        assert float(match.max()) == 0.0
        assert (
            float((v[None] - V.reshape(-1, V.shape[-1])[:, None]).abs().amax(-1).min(0).values.max()) == 0.0
        )
        for fitted in (runs["self"], runs["tail"]):
            kf, vf = fitted.layers[li].dense()
            assert torch.equal(kf, k) and float((vf - v).abs().max()) > 1e-3


def test_weights_for_another_model_are_refused_and_none_names_train_scorer(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSCULPT_CACHE", str(tmp_path / "cache"))
    one, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    path = L.train_scorer(one, _Tok(), _windows(1), tmp_path / "s.safetensors", CFG, progress=False)
    with pytest.raises(ValueError, match="trained for another model"):
        compress(other, torch.randint(0, 97, (1, 20)), method="learned", options={"weights": str(path)},
                 progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="kvsculpt train-scorer"):
        compress(one, torch.randint(0, 97, (1, 20)), method="learned", progress=False)
    default = L.train_scorer(one, _Tok(), _windows(1), None, CFG, progress=False)  # where learned looks
    assert default == L.default_path(one)
    cache = compress(one, torch.randint(0, 97, (1, 20)), method="learned", ratio=0.5, progress=False)
    assert cache.kept_entries() == 10 * 2 * 2


def test_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A run that dies on its third window leaves the first two in the partial file; the rerun scores only the
    third and ends with the same weights as one uninterrupted run (and a snapshot after each of 1 and 2)."""
    model, wins = tiny_model("llama"), _windows(3)
    whole = L.train_scorer(model, _Tok(), wins, tmp_path / "whole.safetensors", CFG, progress=False)
    import kvsculpt.hf.capture as hc

    real, seen = hc.capture, []

    def dying(model, ids, *a, **k):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(model, ids, *a, **k)

    monkeypatch.setattr(hc, "capture", dying)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        L.train_scorer(model, _Tok(), wins, out, CFG, progress=False)
    assert not out.exists() and (tmp_path / "resumed.safetensors.partial").exists()
    seen.clear()
    monkeypatch.setattr(hc, "capture", lambda *a, **k: (seen.append(1), real(*a, **k))[1])
    L.train_scorer(model, _Tok(), wins, out, CFG, progress=False)
    assert len(seen) == 1
    torch.testing.assert_close(
        L.load_weights(model, out)[0], L.load_weights(model, whole)[0], rtol=1e-5, atol=1e-6
    )
    assert L.load_weights(model, out, snapshot=2)[0].shape == (2, 2, 70)
    with pytest.raises(ValueError, match="no snapshot after 3"):
        L.load_weights(model, out, snapshot=3)


def test_learned_config_errors():
    for bad, match in (({"refine": "kl"}, "refine"), ({"on_policy": 1}, "on_policy"),
                       ({"allocation": "curves"}, "no pilot"), ({"options": {"window": 1}}, "unknown option window"),
                       ({"options": {"fit_window": 0}}, "fit_window must be")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CompressConfig(method="learned", **bad)


def test_window_attention_is_the_last_queries_causal_attention_summed():
    """``window_attention`` against a loop over the last queries, each a softmax over the keys up to its own
    position, summed over the GQA group and the window (n = 80 > WINDOW = 64, so the mask matters)."""
    torch.manual_seed(0)
    H, G, t, n, d = 2, 3, 70, 80, 8
    keys, q = torch.randn(H, n, d), torch.randn(1, H * G, t, d)
    from kvsculpt.hf.capture import pool_gqa

    got = lin.window_attention(pool_gqa(q, H), keys, 0.3, G)
    want = torch.zeros(H, n)
    for h in range(H):
        for g in range(G):
            for i in range(t - lin.WINDOW, t):
                pos = n - t + i  # query i of the last t sits at this position
                want[h, : pos + 1] += torch.softmax(0.3 * keys[h, : pos + 1] @ q[0, h * G + g, i], -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_learned_composes_with_quantised_storage(tmp_path):
    """``kv_bits=4`` stores the learned block as 4-bit codes: the same entries per head, fewer bytes, keys within
    the 4-bit rounding of the unquantised block's."""
    model = tiny_model("llama")
    path = L.train_scorer(model, _Tok(), _windows(1), tmp_path / "s.safetensors", CFG, progress=False)
    ids = torch.randint(0, 97, (1, 48))
    cfg = CFG.replace(method="learned", ratio=0.5, fit=False, options={"weights": str(path)})
    plain, packed = (
        compress(model, ids, cfg, progress=False),
        compress(model, ids, cfg.replace(kv_bits=4), progress=False),
    )
    assert packed.budgets == plain.budgets and packed.nbytes() < 0.45 * plain.nbytes()
    k4, _ = packed.layers[0].dense()
    k16, _ = plain.layers[0].dense()
    err = (k4 - k16).abs().max() / k16.abs().max()
    assert 0 < float(err) < 0.15


def test_learned_scores_made_once_serve_every_ratio_exactly(tmp_path):
    """The tasks benchmark scores a context once (:func:`learned_scores`) and solves it at each ratio: the same
    caches as separate ``compress`` calls (bit for bit), and the model runs for the prefill and self samples once,
    not once per ratio."""
    from kvsculpt.compress import compress_learned, learned_scores

    model = tiny_model("llama")
    path = L.train_scorer(model, _Tok(), _windows(1), tmp_path / "s.safetensors", CFG, progress=False)
    ids = torch.randint(0, 97, (1, 48))
    cfg = CFG.replace(method="learned", options={"weights": str(path)})
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    scored = learned_scores(model, ids, cfg, progress=False)
    shared = [
        compress_learned(model, ids, cfg.replace(ratio=r), progress=False, scored=scored) for r in (0.25, 0.5)
    ]
    assert len(calls) == 1 + CFG.self_length
    handle.remove()
    for r, got in zip((0.25, 0.5), shared, strict=True):
        alone = compress(model, ids, cfg.replace(ratio=r), progress=False)
        assert got.budgets == alone.budgets
        for a, b in zip(got.layers, alone.layers, strict=True):
            (ka, va), (kb, vb) = a.dense(), b.dense()
            assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert shared[0].kept_entries() < shared[1].kept_entries()


@pytest.mark.parametrize("fit", [False, True])
def test_learned_while_reading_in_one_part_is_learned_and_in_parts_holds_the_ratio(tmp_path, fit):
    """``method="learned"`` with ``chunk_tokens``: one part as long as the context gives compress_learned's cache
    bit for bit (the same prefill, scores, budgets and self samples). In parts of 16 at r = 0.5 the block holds
    half the entries, and the model runs once per part (+ the self samples' steps with the fit): one prefill
    in all. At r = 1 with copied values the block is the full cache read in parts."""
    model = tiny_model("qwen2")
    path = L.train_scorer(model, _Tok(), _windows(1), tmp_path / "s.safetensors", CFG, progress=False)
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(7))
    cfg = CFG.replace(method="learned", ratio=0.5, fit=fit, options={"weights": str(path)})
    once = compress(model, ids, cfg, progress=False)
    read = compress(model, ids, cfg.replace(chunk_tokens=64), progress=False)
    assert read.budgets == once.budgets and read.info["read_in_parts"] == 1
    for a, b in zip(read.layers, once.layers, strict=True):
        (ka, va), (kb, vb) = a.dense(), b.dense()
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    parts = compress(model, ids, cfg.replace(chunk_tokens=16), progress=False)
    handle.remove()
    assert len(calls) == 3 * (1 + (CFG.self_length if fit else 0)) and parts.info["read_in_parts"] == 3
    assert parts.kept_entries() == 24 * 2 * 2 and parts.n == 48
    # the running rule moved budget between heads
    assert len({m for layer in parts.budgets for m in layer}) > 1
    uniform = compress(model, ids, cfg.replace(chunk_tokens=16, allocation="uniform"), progress=False)
    assert uniform.budgets == [[24, 24], [24, 24]] and uniform.info["part_budgets"] == [[[8, 8], [8, 8]]] * 3
    whole = compress(model, ids, cfg.replace(ratio=1.0, fit=False, chunk_tokens=16), progress=False)
    full, _, _ = prefill(model, ids)
    for li in range(2):
        k, v = whole.layers[li].padded_block()[:2]
        torch.testing.assert_close(k, full.layers[li].keys[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(v, full.layers[li].values[0], rtol=0, atol=1e-5)


def test_a_parts_position_features_count_from_the_context():
    """A part's position features (``start``): log(1 + t) at the context's positions and log(b − 1 − t) from
    the end of what was read, as a prefill of the first b tokens computes them for the same entries."""
    torch.manual_seed(0)
    K, V, window = torch.randn(2, 30, 8), torch.randn(2, 30, 8), torch.rand(2, 30)
    part = lin.extra_features(K[:, 10:30], V[:, 10:30], window[:, 10:30], start=10)
    whole = lin.extra_features(K, V, window)
    torch.testing.assert_close(part[..., 3:5], whole[:, 10:30, 3:5], rtol=0, atol=1e-6)
    assert not torch.allclose(
        lin.extra_features(K[:, 10:30], V[:, 10:30], window[:, 10:30])[..., 3], part[..., 3]
    )


def test_learned_scores_read_in_chunks_are_the_one_forward_scores(tmp_path, monkeypatch):
    """With ``PREFILL_CHUNK`` set, the learned prefill reads that many tokens a forward: the hidden part of each chunk, the last
    queries across chunks (the last chunk shorter than the window) and the training features give the one-forward
    scores (1e-4), in three forwards for 45 tokens in chunks of 20."""
    model = tiny_model("qwen2")
    path = L.train_scorer(model, _Tok(), _windows(2), tmp_path / "s.safetensors", CFG, progress=False)
    weights, _ = L.load_weights(model, path)
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(7))
    _, whole, tail, last, _ = L.prefill_scores(model, ids, weights)
    features = L.layer_features(model, ids)
    from kvsculpt.hf import decode

    monkeypatch.setattr(decode, "PREFILL_CHUNK", 20)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, chunked, tail_c, last_c, _ = L.prefill_scores(model, ids, weights)
    finally:
        handle.remove()
    assert len(calls) == 3
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(last_c, last, rtol=0, atol=1e-5)
    for a, b in zip(tail, tail_c, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for a, b in zip(features, L.layer_features(model, ids), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
