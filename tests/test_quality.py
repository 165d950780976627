"""Quality claims on a real model (SmolLM2-135M) and a shipped text written after its training."""

from kvsculpt import CompressConfig, capture, compress
from kvsculpt.compress import compress_captured
from kvsculpt.core.attention import fidelity
from kvsculpt.core.fit import split_heldout
from kvsculpt.core.methods import Sculpt, Select
from kvsculpt.core.scores import H2O
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window


def test_default_compression_beats_plain_eviction(smollm):
    """The default (kvzip with fitted values, KVzip's repeat prompt, global budgets) against H2O (copied values,
    uniform budgets, context queries) at r = 0.3, n = 1024 (the benchmarks' length). Measured 0.0048 vs 0.1422
    when written (the earlier default: 0.0161 vs 0.1095 against a global-budget H2O, asserted < 0.5x). At
    n = 512 (6 windows, r = 0.3, benchmarks/results/default_smollm2_n512.md) this default gives 0.0091 where
    the earlier one gave 0.0403 (0.0150 vs 0.1456 on this window)."""
    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_human_in_the_loop"), 1024, 64)
    ref = teacher(model, w)
    default = compress(model, w.context, ratio=0.3, tokenizer=tok, progress=False)
    evict = compress(model, w.context, ratio=0.3, method="h2o", fit=False, queries="context", allocation="uniform",
                     heldout=0.2, progress=False)  # fmt: skip
    kl_default, kl_evict = score(model, default, w, ref)["kl"], score(model, evict, w, ref)["kl"]
    print(f"default {kl_default:.4f} vs h2o/context {kl_evict:.4f}")
    assert kl_default < 0.1 * kl_evict


def test_curves_allocation_beats_uniform_for_sculpt(smollm):
    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_human_in_the_loop"), 512, 64)
    ref = teacher(model, w)
    cfg = CompressConfig(ratio=0.3, method="sculpt", queries="self+context", self_samples=6, self_length=32,
                         heldout=0.2, allocation="uniform",
                         options={"iters": 5, "score": "h2o", "mass_weight": 0.0})  # fmt: skip
    cap = capture(model, w.context, cfg)
    uniform = compress_captured(model, cap, cfg, progress=False)
    curves = compress_captured(model, cap, cfg.replace(allocation="curves"), progress=False)
    assert curves.kept_entries() == uniform.kept_entries()
    assert curves.nbytes() <= 1.02 * curves.logical_nbytes()
    kl_uniform, kl_curves = score(model, uniform, w, ref)["kl"], score(model, curves, w, ref)["kl"]
    print(f"curves {kl_curves:.4f} vs uniform {kl_uniform:.4f}")
    assert kl_curves < 0.75 * kl_uniform  # measured 0.033 vs 0.061 (1.8x) when this test was written


def test_sculpt_fits_heldout_queries_at_least_as_well_as_select_fit(smollm):
    """Sculpt's output error on held-out self-sample queries is lower than Select+Fit's (fit, not KL: see
    benchmarks/results/sculpt_iters_smollm2.md for the KL)."""
    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_human_in_the_loop"), 512, 64)
    cap = capture(model, w.context, queries="self+context", self_samples=6, self_length=32)
    held = split_heldout(cap.groups, 0.2, 0)
    budgets = [int(0.3 * cap.n)] * cap.keys[0].shape[0]
    sculpt_err, sf_err = [], []
    for li in (2, 15, 28):
        K, V, Q = cap.keys[li], cap.values[li], cap.queries[li]
        for solver, errs in (
            (Sculpt(scorer=H2O(), iters=30, mass_weight=0.0), sculpt_err),
            (Select(scorer=H2O()), sf_err),
        ):
            heads = solver(K, V, Q[:, ~held], budgets, cap.scale)
            errs += [
                float(fidelity(Q[h, held], K[h], V[h], *heads[h], cap.scale)[0]) for h in range(len(heads))
            ]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    better = sum(s < f for s, f in zip(sculpt_err, sf_err, strict=True))
    print(
        f"held-out rel. MSE: sculpt {mean(sculpt_err):.4g} vs select-fit {mean(sf_err):.4g}, {better}/9 heads"
    )
    # measured 0.0775 vs 0.0984, lower on 8 of the 9 heads, with one L-BFGS run per head (30 iterations); the
    # earlier optimiser (one shared line search, about 24 evaluations per layer) gave 0.0895, lower on 4 of 9
    assert mean(sculpt_err) < 0.9 * mean(sf_err)
    assert better >= 6


def test_default_does_not_get_worse_with_more_room(smollm):
    """The default on a shipped code window (n = 1024, one capture): KL at r = 0.5 is below half its KL at
    r = 0.3, and both are below the previous default's on this window (kvzip on repeat queries: 0.0084 and
    0.0011; kvpress's KVzip 0.0336 and 0.0060). Measured 0.0036 and 0.00051
    (benchmarks/results/default_v2_smollm2.jsonl)."""
    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_tar_utils"), 1024, 128, start=1152)
    ref = teacher(model, w)
    cfg = CompressConfig()
    cap = capture(model, w.context, cfg, tokenizer=tok)
    kl = {r: score(model, compress_captured(model, cap, cfg.replace(ratio=r), progress=False), w, ref)["kl"]
          for r in (0.3, 0.5)}  # fmt: skip
    print(kl)
    assert kl[0.5] < 0.5 * kl[0.3] and kl[0.3] < 0.0084 and kl[0.5] < 0.0011


def test_the_packaged_learned_scorer_beats_snapkv_at_one_prefill(smollm):
    """The scorer shipped for SmolLM2 (trained on fastmcp_changelog) is found without being named; at r = 0.3 on
    a 1024-token window of another text, its one-prefill cache (copied values) is far below SnapKV's (our
    replica, the context's last 64 queries, the same global budgets), and its value fit on self samples lowers
    it further. Measured when written: 0.0125 (learned, copied) vs 0.0785 (SnapKV), 0.0039 with the fit. (At
    512 tokens, shorter than it was trained on, it loses to SnapKV on this text: 0.0366 vs 0.0162.)"""
    from kvsculpt.learned import find_weights, packaged_path

    model, tok = smollm
    assert find_weights(model) == packaged_path(model) or find_weights(model).parent.name == "scorers"
    w = make_window(tok, load_text("openai_agents_human_in_the_loop"), 1024, 64)
    ref = teacher(model, w)
    kl = {name: score(model, compress(model, w.context, ratio=0.3, progress=False, **kw), w, ref)["kl"]
          for name, kw in (("learned", {"method": "learned", "fit": False}), ("fitted", {"method": "learned"}),
                           ("snapkv", {"method": "snapkv", "fit": False, "queries": "context"}))}  # fmt: skip
    print(kl)
    assert kl["learned"] < 0.3 * kl["snapkv"] and kl["fitted"] < 0.6 * kl["learned"]
