import math

import pytest
import torch

from kvsculpt import CompressedCache, capture
from kvsculpt.eval.metrics import kl_per_position, score, teacher
from kvsculpt.eval.texts import TextTooShortError, load_text, make_window, text_index, windows
from kvsculpt.hf.decode import prefill


def test_kl_is_the_teachers_expectation_in_nats():
    """KL(P ‖ Q) with P the first argument: P = (1/2, 1/2), Q = (1/4, 3/4) gives ½ln2 + ½ln(2/3) = 0.1438,
    the reverse direction 0.1308; identical rows give 0."""
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])
    assert kl_per_position(p, q).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert kl_per_position(q, p).item() == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6
    )
    logits = torch.randn(5, 11)
    assert kl_per_position(logits, logits).abs().max() < 1e-6


def test_full_cache_has_zero_kl_and_a_damaged_cache_does_not(smollm):
    model, tok = smollm
    w = make_window(tok, load_text("openai_agents_tar_utils"), 256, 32)
    ref = teacher(model, w)
    assert score(model, prefill(model, w.context)[0], w, ref)["kl"] < 1e-6
    # drop the last half of the context from every head
    cap = capture(model, w.context, queries="context")
    half = [[k[:128] for k in layer] for layer in cap.keys]
    halfv = [[v[:128] for v in layer] for layer in cap.values]
    damaged = CompressedCache.from_heads(model, half, halfv, 256)
    assert score(model, damaged, w, ref)["kl"] > 0.05
    assert 1.0 < ref.nll < 6.0


def test_short_text_error_names_the_lengths(smollm):
    _, tok = smollm
    with pytest.raises(TextTooShortError, match=r"1000 context \+ 50 continuation"):
        make_window(tok, "too short", 1000, 50)


def test_shipped_texts_have_provenance_and_licences():
    from importlib import resources

    index = text_index(long=True)
    assert sum(not v["memorised"] for v in index.values()) >= 4
    assert set(index) - set(text_index()) == {
        "fastmcp_changelog",
        "openai_agents_sandbox_guide",
        "openai_agents_run_loop",
    }
    total = 0
    for name, meta in index.items():
        assert meta["licence"] and meta["source"]
        total += len(load_text(name).encode())
        if meta["licence_file"]:
            assert resources.files("kvsculpt").joinpath("texts", meta["licence_file"]).is_file()
    assert total < 1_000_000


def test_windows_do_not_overlap(smollm):
    _, tok = smollm
    ws = windows(tok, ["markitdown_core"], 512, 64, per_text=2)
    assert len(ws) == 2 and ws[1].start == 576


def test_ngram_overlap():
    from kvsculpt.eval.metrics import ngram_overlap

    samples = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]])
    assert ngram_overlap(samples, torch.tensor([[1, 2, 3, 4, 5, 6]])) == 1.0
    assert ngram_overlap(samples, torch.tensor([[7, 8, 7, 8, 7, 8]])) == 0.0
