import json

import pytest
import torch

from kvsculpt import CompressedCache, compress
from kvsculpt.cli import main
from kvsculpt.evaluate import continuation_logits

from .conftest import tiny_model


def test_compress_uniform_on_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 40))
    cache = compress(
        model, ids, ratio=0.25, method="select-fit", queries="context", allocation="uniform", heldout=0.2,
        progress=False,
    )  # fmt: skip
    assert cache.budgets == [[10, 10], [10, 10]]
    assert "SelectFit" in cache.method and cache.info["ratio"] == 0.25
    stats = cache.info["stats"]["heldout_rel_mse"]
    assert len(stats) == 2 and all(0 <= x < 10 for layer in stats for x in layer)
    out = continuation_logits(model, cache, torch.randint(0, 97, (1, 4)), 40)
    assert torch.isfinite(out).all()


def test_adaptive_allocation_keeps_the_total():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 64))
    cache = compress(
        model, ids, ratio=0.25, method="select-fit", queries="context", allocation="adaptive", progress=False
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
    out = tmp_path / "c.kvs"
    main(
        [
            "compress",
            "--text",
            "openai_agents_tar_utils",
            "--context-tokens",
            "200",
            "--ratio",
            "0.5",
            "--method",
            "h2o",
            "--queries",
            "context",
            "--out",
            str(out),
        ]
    )
    model, _ = smollm
    cache = CompressedCache.load(out, model)
    assert cache.kept_entries() == 100 * 30 * 3
    capsys.readouterr()
    main(["generate", "--cache", str(out), "--prompt", "\nThe function above", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.strip()


def test_cli_errors_are_clear(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "no-such-model", "--ratio", "0.5"])
    assert "smollm2-135m" in capsys.readouterr().err


def test_cli_analyze_writes_json_figures_and_summary(smollm, tmp_path):
    out = tmp_path / "an"
    main(
        [
            "analyze",
            "--text",
            "openai_agents_tar_utils",
            "--context-tokens",
            "256",
            "--ratio",
            "0.3",
            "--queries",
            "context",
            "--out",
            str(out),
        ]
    )
    data = json.loads((out / "difficulty.json").read_text())
    assert len(data["difficulty"]) == 30 and len(data["difficulty"][0]) == 3
    assert sum(map(sum, data["budgets"])) == round(0.3 * 256) * 30 * 3
    assert data["layer_spread"] >= 1 and data["max_head_ratio_within_layer"] >= 1
    for png in ("difficulty.png", "budgets.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "paper: up to 467" in (out / "summary.md").read_text()


def test_on_policy_layer_by_layer_keeps_budgets_and_changes_the_fit():
    from kvsculpt.capture import capture
    from kvsculpt.compress import compress_captured
    from kvsculpt.solvers import SelectFit

    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 64))
    cap = capture(model, ids, "self+context", self_samples=3, self_length=8)
    plain = compress_captured(model, cap, 0.25, SelectFit(), progress=False)
    staged = compress_captured(model, cap, 0.25, SelectFit(), progress=False, on_policy=2)
    assert staged.budgets == plain.budgets and staged.info["on_policy"] == 2
    # layer 0 is solved before any replay, so it is identical; layer 1 was fitted to replayed queries
    torch.testing.assert_close(staged.layers[0].block_values, plain.layers[0].block_values)
    assert not torch.allclose(staged.layers[1].block_values, plain.layers[1].block_values)
    with pytest.raises(ValueError, match="self queries"):
        compress_captured(
            model, capture(model, ids, "context"), 0.25, SelectFit(), progress=False, on_policy=2
        )
