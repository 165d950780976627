import json

import pytest
import torch

from kvsculpt.cli import main

from .conftest import tiny_model_dir


def test_bench_paper_quick_schema_and_resume(tmp_path, smollm):
    model_dir = tiny_model_dir(tmp_path, smollm[1])
    out = tmp_path / "results"
    argv = ["bench", "paper", "--model", str(model_dir), "--context-tokens", "96", "--continuation-tokens", "16",
            "--ratios", "0.5", "--docs", "1", "--no-peers", "--out", str(out),
            "--methods", "Select+Fit", "Sculpt", "Sculpt adaptive (curves)", "SnapKV",
            "KVzip-fit (repeat, global)", "KVzip-fit (KVzip prompt, global)", "Sculpt from the default"]  # fmt: skip
    main(argv)
    for ext in ("json", "md", "png"):
        assert (out / f"paper_tiny-llama.{ext}").stat().st_size > 0
    data = json.loads((out / "paper_tiny-llama.json").read_text())
    assert set(data["kl_geomean"]) == {"Select+Fit", "Sculpt", "Sculpt adaptive (curves)", "SnapKV",
                                       "KVzip-fit (repeat, global)", "KVzip-fit (KVzip prompt, global)",
                                       "Sculpt from the default"}  # fmt: skip
    row = data["rows"][0]
    for key in ("kl", "ppl", "passkey", "compress_over_prefill", "peak_rss_gb", "cache_over_full", "method",
                "teacher_nll", "window", "ratio"):  # fmt: skip
        assert key in row
    assert all(r["cache_over_full"] <= 0.52 for r in data["rows"])
    comp = data["comparisons"][0]
    kl = {r["config"]: r["kl"] for r in data["rows"]}
    assert comp["select_fit_over_sculpt"] == pytest.approx(kl["Select+Fit"] / kl["Sculpt"], rel=1e-9)
    spread = [r["pilot_layer_spread"] for r in data["rows"] if "pilot_layer_spread" in r]
    assert spread and comp["pilot_layer_spread_max"] == max(spread)
    md = (out / "paper_tiny-llama.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {comp['ratio']} | "))
    assert row.split(" | ")[1] == f"{comp['select_fit_over_sculpt']:.2f}"  # the ratio the JSON gives, shown
    # pass-key is tried at the ratio nearest 0.3 (here the only one), with the full cache as reference
    assert all(r["passkey"] is not None and r["passkey_full"] is not None for r in data["rows"])
    assert "Pass-key with the full cache (reference)" in md
    lines = (out / "paper_tiny-llama.jsonl").read_text().splitlines()
    main(argv)  # resumes: nothing recomputed
    assert (out / "paper_tiny-llama.jsonl").read_text().splitlines() == lines
    # --rerun: a row made by an earlier version of a method is run again and replaced; current rows stay
    jsonl = out / "paper_tiny-llama.jsonl"
    sculpt = next(json.loads(line) for line in lines if json.loads(line)["config"] == "Sculpt")
    old = {**sculpt, "method": "Sculpt(iters=20, inner=5)", "kl": 99.0}
    jsonl.write_text("\n".join([*lines, json.dumps(old)]) + "\n")
    main([*argv, "--rerun", "Sculpt", "Select+Fit"])
    added = jsonl.read_text().splitlines()[len(lines) + 1 :]
    assert [json.loads(line)["config"] for line in added] == ["Sculpt"]
    assert json.loads(added[0])["method"] == sculpt["method"] and json.loads(added[0])["kl"] < 99.0
    assert (
        max(json.loads((out / "paper_tiny-llama.json").read_text())["kl_geomean"]["Sculpt"].values()) < 99.0
    )
    main([*argv, "--rerun", "Sculpt"])  # now current: nothing more
    assert len(jsonl.read_text().splitlines()) == len(lines) + 2
    with pytest.raises(SystemExit):
        main([*argv, "--rerun", "Scuplt"])
    jsonl.write_text("\n".join(lines) + "\n")
    (out / "paper_tiny-llama.md").unlink()
    main([*argv, "--report-only"])  # rewrites the report from the cache alone
    assert (out / "paper_tiny-llama.jsonl").read_text().splitlines() == lines
    assert "--report-only" not in (out / "paper_tiny-llama.md").read_text()
    # running one method again keeps the others' cached rows in the report
    main([*argv[: argv.index("--methods")], "--methods", "SnapKV"])
    assert set(json.loads((out / "paper_tiny-llama.json").read_text())["kl_geomean"]) == set(
        data["kl_geomean"]
    )
    assert (out / "paper_tiny-llama.jsonl").read_text().splitlines() == lines
    # cached rows are keyed by window name: another context length must not silently reuse them
    other = [a if a != "96" else "80" for a in argv]
    with pytest.raises(SystemExit):
        main(other)
    assert (out / "paper_tiny-llama.jsonl").read_text().splitlines() == lines


def test_memorised_windows_are_reported_apart():
    from kvsculpt.bench.runner import split_memorised

    rows = [
        {"window": "a@0", "teacher_nll": 2.0, "self_ngram_overlap": 0.05, "kl": 0.1},
        # an eviction row: no self samples, so no overlap
        {"window": "a@0", "teacher_nll": 2.0, "self_ngram_overlap": None, "kl": 0.2},
        {"window": "b@0", "teacher_nll": 1.5, "self_ngram_overlap": 0.45, "kl": 0.01},  # recites the text
        {"window": "c@0", "teacher_nll": 0.2, "self_ngram_overlap": 0.0, "kl": 0.01},  # predicts it too well
    ]
    kept, flagged = split_memorised(rows)
    assert [r["window"] for r in kept] == ["a@0", "a@0"]
    assert flagged == {"b@0": (1.5, 0.45), "c@0": (0.2, 0.0)}


def test_windows_by_id_finds_any_offset_and_refuses_an_unknown_one(smollm):
    """Windows are named text@offset: an offset past the third window is found, and an id naming no window is an
    error (a benchmark once ran on no window at all and wrote an empty report)."""
    from kvsculpt.bench.runner import windows_by_id

    _, tok = smollm
    found = windows_by_id(tok, ["openai_agents_tar_utils@1152", "markitdown_core@0"], 256, 32)
    assert [w.id for w in found] == ["markitdown_core@0", "openai_agents_tar_utils@1152"]
    assert found[1].context.shape == (1, 256) and found[1].continuation.shape[-1] == 32
    with pytest.raises(ValueError, match="no window openai_agents_tar_utils@1000"):
        windows_by_id(tok, ["openai_agents_tar_utils@1000"], 256, 32)


def test_paper_report_pairs_an_opt_in_method_on_its_windows_and_keeps_the_others(tmp_path):
    """The refine row runs on fewer windows and ratios than the table: it must neither drop those windows from the
    main table nor be averaged over windows it never ran on; it is paired with the default and the best other."""
    from kvsculpt.bench.paper import DEFAULT_ROW, PaperBench, write_paper_report

    kl = {("Select+Fit", "a@0"): 0.2, ("Select+Fit", "b@0"): 0.4, (DEFAULT_ROW, "a@0"): 0.1,
          (DEFAULT_ROW, "b@0"): 0.05, ("SnapKV", "a@0"): 0.3, ("SnapKV", "b@0"): 0.6,
          ("kvpress.TOVAPress", "a@0"): 0.25, ("kvpress.TOVAPress", "b@0"): 0.7}  # fmt: skip
    rows = [{"config": c, "window": w, "ratio": r, "kl": v * (1 if r == 0.3 else 0.5), "teacher_nll": 2.0}
            for (c, w), v in kl.items() for r in (0.3, 0.5)]  # fmt: skip
    rows.append({"config": "default + KL refine", "window": "a@0", "ratio": 0.3, "kl": 0.04, "teacher_nll": 2.0,
                 "compress_over_prefill": 90.0})  # fmt: skip
    args = PaperBench(model="m", context_tokens=96, continuation_tokens=16, ratios=[0.3, 0.5])
    data = write_paper_report(rows, args, tmp_path, "m")
    assert data["kl_geomean"]["Select+Fit"][0.3] == pytest.approx((0.2 * 0.4) ** 0.5)  # both windows kept
    assert "default + KL refine" not in data["kl_geomean"]
    (o,) = data["opt_in"]
    assert o["windows"] == ["a@0"] and o["ratio"] == 0.3
    assert o["gain_over_default"] == pytest.approx(0.1 / 0.04)
    assert o["per_window"]["a@0"]["best_other"] == "kvpress.TOVAPress"
    assert o["gain_over_best_other"] == pytest.approx(0.25 / 0.04)
    md = (tmp_path / "paper_m.md").read_text()
    assert "| default + KL refine | 0.3 | 1 | 0.0400 | 0.1000 | 2.50× (2.50×) | 6.25× (6.25×) | 90 |" in md
    assert "Left out" not in md


def test_live_tensors_counts_each_storage_once_until_freed():
    """The live-tensor count: a view is not counted again, a freed storage leaves the count, the peak is the
    most held at once, and the holders at the peak are the tensors alive then, by where they were made."""
    from kvsculpt.bench.live_tensors import LiveTensors

    with LiveTensors(min_bytes=1000, resnap=1) as live:
        a = torch.zeros(1000, 1000)  # 4 MB
        view = a[:10]
        c = torch.ones(500, 1000) * 2  # a 2 MB temporary, then 2 MB kept
        del a  # still held by its view
        d = torch.empty(3000, 1000)  # 12 MB: the peak, 18 MB
        del view, d
        e = torch.empty(1000, 1000)  # 4 MB, after the peak
    assert live.peak_bytes == 18_000_000
    assert live.bytes == 6_000_000  # c and e
    assert [(g["bytes"], g["shape"]) for g in live.at_peak] == [
        (12_000_000, (3000, 1000)),
        (4_000_000, (1000, 1000)),
        (2_000_000, (500, 1000)),
    ]
    assert all("test_bench.py" in g["site"] for g in live.at_peak)
    del c, e
