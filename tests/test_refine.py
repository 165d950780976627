"""End-to-end refine (kvsculpt.refine): exact gradients, never worse than its init, and a real gain."""

import pytest
import torch

from kvsculpt import CompressConfig, compress
from kvsculpt.cache import shared_cache
from kvsculpt.core.kl import coarse, coarse_kl
from kvsculpt.hf.decode import forward, prefill
from kvsculpt.refine import (
    RefineData,
    Student,
    _sample_with_teacher,
    batch_kl,
    frozen,
    make_data,
    mean_kl,
    refine_from,
    split_validation,
)

from .conftest import tiny_model


def _full_kv(model, ids):
    """The full cache's keys and values per layer ``[Hkv, n, d]`` and the logits after the context."""
    full, last, _ = prefill(model, ids)
    return [x.keys[0] for x in full.layers], [x.values[0] for x in full.layers], last


def _setup(kind="llama", dtype=torch.float64, ratio=0.4, n=24, **refine):
    model = tiny_model(kind).to(dtype)
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(1))
    cfg = CompressConfig(ratio=ratio, method="h2o", fit=False, queries="context", allocation="uniform",
                         refine="kl", refine_data="self", refine_samples=6, refine_length=8, refine_batch=3,
                         refine_topk=97, **refine)  # fmt: skip
    init = compress(model, ids, cfg.replace(refine="none"), progress=False)
    keys, values, last = _full_kv(model, ids)
    data = make_data(model, None, keys, values, last, ids, cfg)
    return model, ids, cfg, init, keys, values, last, data


def test_coarse_kl_with_the_whole_vocabulary_is_the_exact_kl():
    torch.manual_seed(0)
    t, s = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 11, dtype=torch.float64)
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    exact = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(coarse_kl(*coarse(t, 11), s), exact, atol=1e-9)
    partial = coarse_kl(*coarse(t, 4), s)  # a coarser partition: a lower bound, never above the exact KL
    assert (partial <= exact + 1e-12).all() and (partial < exact).any()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gradient_of_the_kl_matches_finite_differences(kind):
    """d KL / d (keys, values, β) of every layer, by backpropagation through the frozen model, against central
    differences along directions near the gradient's (fp64; the step is large enough that the forward's rounding noise,
    about 1e-12 here, stays out of the difference, and its O(eps²) error is under 0.1 %)."""
    model, _, cfg, init, *_, data = _setup(kind)
    student = Student(init, "kvb")
    idx = torch.arange(data.tokens.shape[0])
    gen = torch.Generator().manual_seed(3)
    with frozen(model):
        loss = batch_kl(model, student, data, idx)
        grads = torch.autograd.grad(loss, list(student.parameters()))
        assert all(p.grad is None for p in model.parameters())
        for group in ("uk", "uv", "ub"):  # each kind of tensor on its own: a detached one would show here
            params = list(getattr(student, group))
            pos = {id(p): i for i, p in enumerate(student.parameters())}
            g = [grads[pos[id(p)]] for p in params]  # a direction along the gradient, plus noise (the keys'
            scale = torch.cat([x.flatten() for x in g]).norm()  # gradient is small on a random model)
            dirs = [x / scale + 0.5 * torch.randn(x.shape, generator=gen, dtype=x.dtype) / x.numel() ** 0.5
                    for x in g]  # fmt: skip
            analytic = sum(float((grads[pos[id(p)]] * d).sum()) for p, d in zip(params, dirs, strict=True))
            eps, base = 3e-4, [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, b, d in zip(params, base, dirs, strict=True):
                    p.copy_(b + eps * d)
                up = float(batch_kl(model, student, data, idx))
                for p, b, d in zip(params, base, dirs, strict=True):
                    p.copy_(b - eps * d)
                down = float(batch_kl(model, student, data, idx))
                for p, b in zip(params, base, strict=True):
                    p.copy_(b)
            numeric = (up - down) / (2 * eps)
            assert analytic > 0, group
            assert abs(analytic - numeric) <= 0.02 * abs(numeric), (group, analytic, numeric)


def test_refine_never_returns_a_cache_worse_than_its_init_on_validation():
    """A step size that only makes things worse: the init comes back unchanged. A sensible one: validation KL
    falls, and the returned cache really has the reported validation KL."""
    model, ids, cfg, init, keys, values, last, data = _setup(dtype=torch.float32)
    bad = refine_from(model, init, keys, values, last, ids, cfg.replace(refine_lr=50.0, refine_steps=6,
                      refine_eval_every=2), progress=False, data=data)  # fmt: skip
    assert bad.info["refine_best_step"] == 0 and bad.info["refine_steps_run"] >= 2
    assert bad.info["refine_lr_used"] == 50.0  # the step that ran is recorded, not the rule's
    assert bad.info["refine_val_kl"] == bad.info["refine_val_kl_init"]
    for a, b in zip(bad.layers, init.layers, strict=True):
        assert torch.equal(a.block_keys, b.block_keys) and torch.equal(a.block_values, b.block_values)
    good = refine_from(model, init, keys, values, last, ids, cfg.replace(refine_lr=3e-2, refine_steps=20,
                       refine_eval_every=5), progress=False, data=data)  # fmt: skip
    assert good.info["refine_val_kl"] < 0.9 * good.info["refine_val_kl_init"]
    _, val = split_validation(data, cfg.refine_val, cfg.seed)
    again = mean_kl(model, Student(good, "kv"), data, val, 3)
    assert again == pytest.approx(good.info["refine_val_kl"], rel=1e-4)
    assert init.info["compress_seconds"] < good.info["compress_seconds"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_refine_step_follows_its_schedule(schedule, monkeypatch):
    """Every Adam step's learning rate: the configured step throughout (constant), or from the configured step
    down to near zero along a half cosine over ``refine_steps`` (cosine)."""
    model, ids, cfg, init, keys, values, last, data = _setup(dtype=torch.float32)
    seen, step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda opt, *a, **k: (seen.append(opt.param_groups[0]["lr"]),
                                                                       step(opt, *a, **k))[1])  # fmt: skip
    refine_from(model, init, keys, values, last, ids, cfg.replace(refine_lr=1e-2, refine_steps=8, refine_patience=9,
                refine_schedule=schedule), progress=False, data=data)  # fmt: skip
    assert len(seen) == 8 and seen[0] == pytest.approx(1e-2)
    if schedule == "constant":
        assert seen == pytest.approx([1e-2] * 8)
    else:
        assert all(a > b for a, b in zip(seen[:-1], seen[1:], strict=True)) and seen[-1] < 0.05 * 1e-2
    with pytest.raises(ValueError, match="refine_schedule"):
        CompressConfig(refine_schedule="linear")


def test_refine_data_sit_after_the_context_and_come_from_the_full_cache():
    """The teacher kept while sampling is the full cache's distribution at positions n, n+1, … of each row: the
    same as one teacher-forced pass over the finished rows (fp64), so no position is off by one."""
    model, ids, cfg, init, keys, values, last, data = _setup()
    assert isinstance(data, RefineData) and data.tokens.shape == (6, 8) and set(data.source) == {"self"}
    with torch.inference_mode():  # each row on its own prefill's DynamicCache (SDPA), not the shared block
        logits = torch.cat(
            [forward(model, row[None], prefill(model, ids)[0], ids.shape[1]) for row in data.tokens]
        )
    top_ids, top_logp, tail = coarse(logits, cfg.refine_topk)
    assert torch.equal(top_ids[..., :5], data.top_ids[..., :5])
    assert torch.allclose(top_logp, data.top_logp, atol=1e-10) and torch.allclose(tail, data.tail_logp)


def test_forced_prefixes_of_different_lengths_start_their_rows():
    """Study rows: each row is fed its own request first (lengths differ, nothing padded), then samples."""
    model, ids, cfg, *_ = _setup()
    keys, values, last = _full_kv(model, ids)
    prefixes = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.zeros(0, dtype=torch.long)]
    with torch.inference_mode():
        tokens, top_ids, _, _ = _sample_with_teacher(model, keys, values, last, prefixes, 8, cfg,
                                                     torch.Generator().manual_seed(0), None)  # fmt: skip
    assert tokens.shape == (3, 8) and top_ids.shape[:2] == (3, 8)
    assert tokens[0, :3].tolist() == [5, 6, 7] and tokens[1, 0] == 9
    with torch.inference_mode():
        alone = forward(model, tokens[1:2], shared_cache(model, keys, values), ids.shape[1])
    assert torch.equal(alone.argmax(-1).int()[0], top_ids[1, :, 0])  # batching rows changes nothing


def test_refine_options_are_checked():
    with pytest.raises(ValueError, match="refine_data"):
        CompressConfig(refine="kl", refine_data="self+web")
    with pytest.raises(ValueError, match="unknown refine"):
        CompressConfig(refine="mse")
    with pytest.raises(ValueError, match="refine_params"):
        CompressConfig(refine_params="k")
    with pytest.raises(ValueError, match="refine_batch"):
        CompressConfig(refine_batch=0)
    with pytest.raises(ValueError, match="refine_lr"):
        CompressConfig(refine_lr=0.0)
    # the step by ratio, unless given
    assert CompressConfig(ratio=0.1).refine_step == 3e-3 and CompressConfig(ratio=0.3).refine_step == 1e-3
    assert CompressConfig(ratio=0.5).refine_step == 3e-4 and CompressConfig(ratio=0.7).refine_step == 3e-4
    assert CompressConfig(ratio=0.3, refine_lr=5e-3).refine_step == 5e-3


def test_the_refine_benchmark_finds_rows_made_with_another_step():
    """benchmarks/refine.py resumes only rows made with the same config: the same repr is not enough when the
    step rule by ratio changed under ``refine_lr=None``, which is why the step that ran is recorded."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "refine.py"
    spec = importlib.util.spec_from_file_location("refine_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = CompressConfig(ratio=0.5, refine="kl")  # the rule gives 3e-4 at r = 0.5 (1e-3 before 2026-12-02)
    assert not bench.is_stale({"compress_config": repr(cfg), "refine_lr_used": 3e-4}, cfg)
    assert not bench.is_stale({"compress_config": repr(cfg)}, cfg)  # an old row: its step was not recorded
    assert bench.is_stale({"compress_config": repr(cfg), "refine_lr_used": 1e-3}, cfg)
    assert bench.is_stale({"compress_config": repr(cfg.replace(refine_steps=7)), "refine_lr_used": 3e-4}, cfg)


def test_refine_lowers_heldout_kl_on_a_real_text(smollm):
    """SmolLM2, a shipped code window (n = 256, T = 64), the default at r = 0.1: a short refine (self and repeat
    data, 20 steps) lowers KL on the real continuation, which it never sees (measured: 0.0943 → 0.0798; the
    validation KL on generated text fell 4×). The full runs are in benchmarks/results/refine_smollm2.md."""
    from kvsculpt.eval.metrics import score, teacher
    from kvsculpt.eval.texts import load_text, make_window

    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_tar_utils"), 256, 64, name="tar")
    ref = teacher(model, w)
    cfg = CompressConfig(ratio=0.1)
    init = compress(model, w.context, cfg, tokenizer=tok, progress=False)
    done = compress(model, w.context, cfg.replace(refine="kl", refine_steps=20, refine_data="self+repeat",
                    refine_lr=1e-2, refine_samples=8), tokenizer=tok, progress=False)  # fmt: skip
    before, after = score(model, init, w, ref)["kl"], score(model, done, w, ref)["kl"]
    assert after < 0.9 * before, (before, after)


def test_self_queries_and_refine_run_on_a_bf16_model():
    """bf16 (the CUDA default): self-query sampling feeds the full cache in the model's dtype (it failed with fp32
    keys before), and refine returns a cache in the model's dtype while its fp32 masters get non-zero fp32
    gradients through the bf16 forward."""
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    cfg = CompressConfig(ratio=0.5, method="h2o", queries="self", allocation="uniform", self_samples=2,
                         self_length=4, refine="kl", refine_data="self", refine_samples=4, refine_length=6,
                         refine_batch=2, refine_steps=2, refine_eval_every=1)  # fmt: skip
    cache = compress(model, ids, cfg, progress=False)
    assert cache.layers[0].block_keys.dtype == torch.bfloat16
    student = Student(cache, "kv")
    assert student.k0[0].dtype == torch.float32 and student.uk[0].dtype == torch.float32
    keys, values, last = _full_kv(model, ids)
    data = make_data(model, None, keys, values, last, ids, cfg)
    with frozen(model):
        loss = batch_kl(model, student, data, torch.arange(2))
        grads = torch.autograd.grad(loss, [student.uk[0], student.uv[-1]])
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)  # through the bf16 forward


def test_refine_of_a_quantised_block_goes_through_its_codes():
    """``kv_bits=4``: the forward sees the block as stored (straight through), the result is the quantised cache,
    and its reported validation KL (and its init's) is that of the stored codes (fp32, 4-bit codes of a tiny
    random model; whether going through the codes beats quantising after a 16-bit refine is measured on real
    models: benchmarks/quant.py's 'b4 refine' and 'b4 refine-after' settings)."""
    model, ids, cfg, init, keys, values, last, data = _setup(dtype=torch.float32)
    cfg4 = cfg.replace(kv_bits=4, kv_group=8, refine_lr=3e-2, refine_steps=20, refine_eval_every=5)
    from kvsculpt.cache import quantize_cache

    init4 = quantize_cache(init, 4, 8)
    done = refine_from(model, init, keys, values, last, ids, cfg4, progress=False, data=data)
    assert done.layers[0].quantized and done.kv_bits == 4 and done.info["kv_bits"] == 4
    _, val = split_validation(data, cfg.refine_val, cfg.seed)
    stored = mean_kl(model, Student(done, "kv"), data, val, 3)  # the dequantised codes, no straight-through
    assert stored == pytest.approx(done.info["refine_val_kl"], rel=1e-4)
    assert done.info["refine_val_kl_init"] == pytest.approx(mean_kl(model, Student(init4, "kv"), data, val, 3),
                                                            rel=1e-4)  # fmt: skip
    assert done.info["refine_val_kl"] < 0.9 * done.info["refine_val_kl_init"]
    # a 4-bit init keeps its storage; asking for other bits is refused
    again = refine_from(model, init4, keys, values, last, ids, cfg4.replace(kv_bits=16, kv_group=64, refine_steps=5),
                        progress=False, data=data)  # fmt: skip
    assert again.kv_bits == 4
    with pytest.raises(ValueError, match="stored in"):
        refine_from(model, init4, keys, values, last, ids, cfg4.replace(kv_bits=8), progress=False, data=data)
