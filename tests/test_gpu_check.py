"""benchmarks/gpu_check.py in its CPU mode (--smoke): the check a GPU machine runs, end to end, on tiny shapes."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """Stage 1 runs the device tests on this device and passes; stage 2 gives every stage of both lengths, Sculpt
    and refine at the first length only, a default block near a tenth of the full cache, decode rates for both
    caches, Sculpt's seconds per head = its seconds over layers × KV heads, and no KL anywhere."""
    check = _check()
    assert check.main(["--smoke", "--shapes", "llama3.1-8b", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tests"]["returncode"] == 0 and "passed" in result["tests"]["summary"]
    assert "-k cpu" in (tmp_path / "gpu_check.md").read_text()
    rows = {(r["n"], r["stage"]): r for r in result["rows"]}
    every = ["prefill", "decode, full cache", "default", "decode, default's cache", "learned",
             "learned, one prefill", "KVzip replica"]  # fmt: skip
    assert set(rows) == {(n, s) for n in (64, 128) for s in every} | {
        (64, "Sculpt"),
        (64, "default + 20 refine steps"),
    }
    assert not any("skipped" in r for r in result["rows"])
    default = rows[(128, "default")]
    assert 0.05 < default["kept_bytes"] / default["full_cache_bytes"] < 0.2
    assert (
        rows[(128, "decode, default's cache")]["tokens_per_s"]
        > 1
        < rows[(128, "decode, full cache")]["tokens_per_s"]
    )
    sculpt = rows[(64, "Sculpt")]
    assert abs(sculpt["seconds_per_head"] * 2 * 2 - sculpt["seconds"]) < 1e-9
    assert rows[(64, "default + 20 refine steps")]["refine_s"] > rows[(64, "default")]["solve_s"]
    assert not any("kl" in key.lower() for r in result["rows"] for key in r)
    assert result["finished"].startswith("yes")


def test_the_gpu_check_skips_what_its_budget_cannot_hold(tmp_path):
    """With no time left every stage is skipped and said so; the report is still written and the run ends."""
    check = _check()
    check.main(["--smoke", "--no-tests", "--shapes", "qwen2.5-7b", "--budget-s", "0", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert len(rows) == 7 + 2 + 7 and all(r["skipped"].startswith("skipped:") for r in rows)
    assert "skipped:" in (tmp_path / "gpu_check.md").read_text()
