"""The GPU check: one prepared command that measures what the library costs on whatever device it finds.

    python benchmarks/gpu_check.py --out gpu_check            # on a GPU machine: stops itself inside 7 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu     # here: tiny shapes, n = 64 and 128 (a test runs it)

It needs only PyTorch, transformers, safetensors, numpy and tqdm beside the package (``PYTHONPATH=src`` is
enough: nothing is installed, nothing is downloaded). In order:

1. **The device-sensitive tests** (those taking the ``device`` fixture: the compressed cache's exactness against
   the full cache, subsets against masks, bf16, Select+Fit, the engine layout) on this device: ``pytest -k cuda``
   on a GPU, ``-k cpu`` elsewhere.
2. **Cost on models of real shapes with random weights** (:data:`SHAPES`: Llama-3.1-8B and Qwen2.5-7B, their
   first ``--layers`` layers; bf16 on a GPU), for each n of ``--lengths``: the prefill; decode tokens/s from the
   full cache; the default (``compress(ratio=0.1)``) with its stages; decode tokens/s from its cache;
   ``learned`` (a scorer of the right shape with random weights: its cost does not depend on them), with and
   without its fit; our KVzip replica (kvpress is not there); and at the first n only, Sculpt (seconds per
   head) and 20 refine steps. Each with its peak memory above what was allocated before it (CUDA: max allocated;
   CPU: resident set). Random weights make the seconds and bytes real and any KL meaningless: none is reported.

Every stage is checked against ``--budget-s`` first: one whose estimate (the same stage at the last n, scaled by
(n/n')²) would overrun it is skipped and said so; a watchdog writes what is done and exits if a stage overruns.
OUT/gpu_check.json and OUT/gpu_check.md are rewritten after every stage, so a killed run keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

# The real architectures' configs (their model cards' config.json), built with random weights.
SHAPES = {
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                       max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}  # fmt: skip
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    num_hidden_layers=2,
)
RATIO, DECODE_TOKENS, SMOKE_LENGTHS = 0.1, 32, [64, 128]


class ByteTokenizer:
    """A stand-in tokenizer (no hub here): UTF-8 bytes as ids. The repeat pass and the self samples need one;
    for cost, only the request's length matters, and it is about a real tokenizer's (bytes ≈ 4 × tokens)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = list(text.encode())[: max(1, len(text) // 4)]
        return {"input_ids": torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i % 256 for i in (ids.tolist() if hasattr(ids, "tolist") else ids)).decode(
            errors="replace"
        )


def random_model(shape: str, layers: int | None, device, dtype, smoke: bool):
    """A model of ``shape``'s architecture with random weights (its first ``layers`` layers) on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvsculpt.hf.attention import register

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    if smoke:
        spec.update(SMOKE)
    if layers:
        spec["num_hidden_layers"] = min(layers, spec["num_hidden_layers"])
    cfg = AutoConfig.for_model(kind, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=register())
    return model.eval(), spec["num_hidden_layers"]


def random_scorer(model, path: Path) -> Path:
    """A learned-scorer file of the model's shape with random weights (the cost of ``learned`` does not depend
    on them; its choices do, and are not reported)."""
    from kvsculpt.core import learned as lin
    from kvsculpt.hf.dims import model_dims
    from kvsculpt.learned import save_weights

    dims = model_dims(model)
    weights = torch.randn(dims.layers, dims.kv_heads, model.config.hidden_size + lin.EXTRA) * 1e-3
    return save_weights(weights, path, model, {"note": "random weights: for cost only"})


class Clock:
    """The time budget: stages ask :meth:`allows` first; a watchdog thread calls ``on_overrun`` if a stage in
    flight runs past the budget plus ``grace``."""

    def __init__(self, budget_s: float, on_overrun, grace: float = 45.0):
        self.start, self.budget, self.seen = time.monotonic(), budget_s, {}
        self.watchdog = threading.Timer(budget_s + grace, on_overrun)
        self.watchdog.daemon = True
        self.watchdog.start()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def allows(self, key: tuple, n: int) -> tuple[bool, str]:
        """Whether the stage ``key`` (without n) at length ``n`` fits: its time at the last n, scaled by
        (n/n')², must fit in what is left; a stage not seen yet needs a tenth of the budget left."""
        if key in self.seen:
            n0, s0 = self.seen[key]
            guess = s0 * (n / n0) ** 2
            return guess < self.left(), f"estimated {guess:.0f} s, {self.left():.0f} s left"
        return self.left() > 0.1 * self.budget, f"{self.left():.0f} s left"

    def record(self, key: tuple, n: int, seconds: float) -> None:
        self.seen[key] = (n, seconds)


def peak_memory(device):
    from kvsculpt.compress import PeakMemory

    return PeakMemory(torch.device(device))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_rate(model, cache, n: int, device) -> float:
    """Greedy tokens per second over :data:`DECODE_TOKENS` steps after ``cache`` (logical length ``n``)."""
    from kvsculpt.hf.decode import decode

    prompt = torch.randint(0, min(1000, model.config.vocab_size), (1, 8), device=device)
    sync(device)
    t0 = time.perf_counter()
    decode(model, cache, prompt, n, DECODE_TOKENS)
    sync(device)
    return DECODE_TOKENS / (time.perf_counter() - t0)


def run_tests(device: str, out: dict) -> None:
    """Stage 1: the device-sensitive tests on ``device`` (``pytest -k <device>``)."""
    files = ["tests/test_cache.py", "tests/test_compress.py", "tests/test_engine.py"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", device, *files],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    out["tests"] = {"device": device, "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
                    "summary": tail[-1] if tail else "", "tail": tail}  # fmt: skip
    print(f"tests on {device}: {out['tests']['summary']}", flush=True)


def stages(model, n: int, device, first: bool, scorer: Path):
    """``(name, function)`` pairs for one length; each function returns a row's fields. The full cache is made
    by the first and read by the second; the default's cache by the third and read by the fourth."""
    from kvsculpt import CompressConfig, compress
    from kvsculpt.hf.decode import full_cache

    ids = torch.randint(256, model.config.vocab_size, (1, n), device=device)
    tok, held = ByteTokenizer(), {}

    def prefill_stage():
        sync(device)
        t0 = time.perf_counter()
        held["full"] = full_cache(model, ids)
        sync(device)
        return {"seconds": time.perf_counter() - t0}

    def decode_full():
        if "full" not in held:
            return {"skipped": "no full cache (its stage did not run)"}
        return {"tokens_per_s": decode_rate(model, held.pop("full"), n, device)}

    def method(cfg):
        def run():
            cache = compress(model, ids, cfg, tokenizer=tok, progress=False)
            sync(device)
            info = cache.info
            held["compressed"] = cache
            return {"seconds": info["compress_seconds"], "prefill_s": info.get("prefill_seconds"),
                    "query_s": info.get("query_seconds"), "solve_s": info.get("solve_seconds"),
                    "refine_s": info.get("refine_seconds"), "kept_bytes": cache.nbytes(),
                    "full_cache_bytes": info.get("full_cache_bytes")}  # fmt: skip

        return run

    def decode_compressed():
        if "compressed" not in held:
            return {"skipped": "no compressed cache (its stage did not run)"}
        return {"tokens_per_s": decode_rate(model, held.pop("compressed"), n, device)}

    def per_head(fn):
        def run():
            row = fn()
            heads = model.config.num_hidden_layers * model.config.num_key_value_heads
            held.pop("compressed", None)
            return {**row, "seconds_per_head": row["seconds"] / heads}

        return run

    def dropped(fn):
        def run():
            row = fn()
            held.pop("compressed", None)
            return row

        return run

    out = [("prefill", prefill_stage), ("decode, full cache", decode_full),
           ("default", method(CompressConfig(ratio=RATIO))), ("decode, default's cache", decode_compressed),
           ("learned", dropped(method(CompressConfig(ratio=RATIO, method="learned",
                                                     options={"weights": str(scorer)})))),
           ("learned, one prefill", dropped(method(CompressConfig(ratio=RATIO, method="learned", fit=False,
                                                                  options={"weights": str(scorer)})))),
           ("KVzip replica", dropped(method(CompressConfig(ratio=RATIO, method="kvzip", fit=False,
                                                           queries="repeat", floor=1, heldout=0.0))))]  # fmt: skip
    if first:
        out += [("Sculpt", per_head(method(CompressConfig(ratio=RATIO, method="sculpt")))),
                ("default + 20 refine steps", dropped(method(CompressConfig(ratio=RATIO, refine="kl",
                                                                            refine_steps=20))))]  # fmt: skip
    return out


def report(result: dict, out: Path) -> None:
    """Write OUT/gpu_check.json and OUT/gpu_check.md (called after every stage)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    env = result["environment"]
    lines = [f"# GPU check: {env['device_name']}", "", f"Command: `{result['command']}`", "",
             f"torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, random weights (no KL: "
             f"the seconds and bytes are real, the choices meaningless). Kept fraction {RATIO}. Memory: peak above "
             "what was allocated before the stage.", ""]  # fmt: skip
    if "tests" in result:
        t = result["tests"]
        lines += [f"Device tests (`pytest -k {t['device']}`): {t['summary']} (exit {t['returncode']}).", ""]
    lines += [
        "| shape (layers) | n | stage | seconds | ÷ prefill | tokens/s | peak extra GB | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    prefill = {(r["shape"], r["n"]): r.get("seconds") for r in result["rows"] if r["stage"] == "prefill"}
    for r in result["rows"]:
        base = prefill.get((r["shape"], r["n"]))
        sec = r.get("seconds")
        ratio = f"{sec / base:.1f}" if sec and base and r["stage"] != "prefill" else ""
        parts = [f"prefill {r['prefill_s']:.1f} + queries {r['query_s']:.1f} + solve {r['solve_s']:.1f} s"
                 if r.get("solve_s") is not None else "",
                 f"{r['seconds_per_head']:.2f} s per head" if "seconds_per_head" in r else "",
                 f"refine {r['refine_s']:.1f} s" if r.get("refine_s") is not None else "", r.get("skipped", "")]  # fmt: skip
        rate, peak = r.get("tokens_per_s"), r.get("peak_extra_bytes")
        cells = [f"{r['shape']} ({r['layers']})", str(r["n"]), r["stage"], "" if sec is None else f"{sec:.2f}",
                 ratio, "" if rate is None else f"{rate:.1f}", "" if peak is None else f"{peak / 1e9:.2f}",
                 "; ".join(p for p in parts if p)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Finished: {result.get('finished', 'no (stopped early: see the last row)')}."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu_check", help="folder for gpu_check.{json,md}")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes and n = 64, 128: the CPU test of the check"
    )
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="architectures")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="context lengths")
    ap.add_argument("--layers", type=int, default=8, help="the first LAYERS layers of each shape (cost per "
                    "layer is the same for every layer; 0: all) (default: %(default)s)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting stages after this many seconds "
                    "(default: %(default)s)")  # fmt: skip
    ap.add_argument("--no-tests", dest="tests", action="store_false", help="skip stage 1 (the device tests)")
    args = ap.parse_args(argv)
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = SMOKE_LENGTHS if args.smoke else sorted(args.lengths)
    out = Path(args.out)
    result = {"command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "environment": {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda"
                              else platform.processor() or "CPU", "torch": torch.__version__,
                              "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."),
                              "smoke": args.smoke}, "rows": []}  # fmt: skip

    def overrun():
        result["finished"] = "no: the watchdog stopped a stage that ran past the budget"
        report(result, out)
        os._exit(3)

    clock = Clock(args.budget_s, overrun)
    try:
        if args.tests:
            run_tests(device, result)
            report(result, out)
        scratch = Path(tempfile.mkdtemp(prefix="kvsculpt-gpu-check-"))
        for shape in args.shapes:
            model, layers = random_model(shape, args.layers or None, device, dtype, args.smoke)
            scorer = random_scorer(model, scratch / f"{shape}.safetensors")
            with torch.inference_mode():  # kernels chosen and libraries loaded before anything is timed
                model(torch.randint(0, 100, (1, 128), device=device), use_cache=False)
            sync(device)
            for i, n in enumerate(lengths):
                for name, fn in stages(model, n, device, i == 0, scorer):
                    row = {"shape": shape, "layers": layers, "n": n, "stage": name}
                    ok, why = clock.allows((shape, name), n)
                    if not ok:
                        row["skipped"] = f"skipped: {why}"
                        result["rows"].append(row)
                        continue
                    try:
                        with peak_memory(device) as peak:
                            t0 = time.perf_counter()
                            row.update(fn())
                        clock.record((shape, name), n, time.perf_counter() - t0)
                        row["peak_extra_bytes"] = peak.extra
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        clock.record((shape, name), n, float("inf"))  # no longer n for this stage
                        torch.cuda.empty_cache()
                    result["rows"].append(row)
                    report(result, out)
                    print(json.dumps(row), flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        result["finished"] = f"yes, in {time.monotonic() - clock.start:.0f} s"
        report(result, out)
        return 0 if result.get("tests", {}).get("returncode", 0) == 0 else 1
    finally:
        clock.watchdog.cancel()  # a caller (the test) goes on living


if __name__ == "__main__":
    sys.exit(main())
