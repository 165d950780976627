"""Load time, peak RSS and prefill time per packaged model; decode speed with a compressed cache.

    python benchmarks/speed.py models --models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    python benchmarks/speed.py decode --model smollm2-135m --context-tokens 2048 --ratio 0.3
    python benchmarks/speed.py decode --batch 8 --threads 1 --out speed_decode_batch8

Each model is measured in a fresh subprocess (so peak RSS is its own). Results: benchmarks/results/speed_*.json/md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def one_model(name: str) -> dict:
    from kvsculpt import encode, load_model
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.decode import prefill

    load_model(name)  # fetch and build the fp32 copy if needed; not timed
    t0 = time.perf_counter()
    model, tok = load_model(name)
    load_s = time.perf_counter() - t0
    text = " ".join(
        load_text(t) for t in ("markitdown_core", "google_adk_skills_utils", "openai_agents_tar_utils")
    )
    ids = encode(tok, text)
    prefill_s = {}
    for n in (512, 1024, 2048):
        prefill(model, ids[:, :64])  # warm-up
        prefill_s[n] = min(prefill(model, ids[:, :n])[2] for _ in range(2))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {
        "model": name,
        "load_seconds": load_s,
        "peak_rss_gb": rss,
        "prefill_seconds": prefill_s,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
    }


def decode(args) -> dict:
    from kvsculpt import compress, encode, load_model
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.decode import decode, prefill

    model, tok = load_model(args.model)
    text = " ".join(
        load_text(t) for t in ("markitdown_core", "google_adk_skills_utils", "openai_agents_tar_utils")
    )
    ids = encode(tok, text)[:, : args.context_tokens]
    n = ids.shape[1]
    full, _, _ = prefill(model, ids)
    if args.batch > 1:  # the full cache copied per row, as a DynamicCache holds a batch
        full.batch_repeat_interleave(args.batch)
    comp = compress(model, ids, ratio=args.ratio, tokenizer=tok, progress=False)

    def tokens_per_second(cache):  # tokens per second per row (decode steps per second)
        t0 = time.perf_counter()
        decode(model, cache, torch.full((args.batch, 1), tok.eos_token_id or 0), n, args.new_tokens)
        return args.new_tokens / (time.perf_counter() - t0)

    return {
        "model": args.model,
        "context_tokens": n,
        "ratio": args.ratio,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "full_tokens_per_second": tokens_per_second(full),
        "compressed_tokens_per_second": tokens_per_second(comp),
        "compressed_method": comp.method,
        "cache_bytes": comp.nbytes(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("models")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON")
    p = sub.add_parser("one")
    p.add_argument("name")
    p = sub.add_parser("decode")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="rows decoded at once (one context shared by all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="speed_decode", help="results name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(getattr(args, "threads", 2))
    RESULTS.mkdir(exist_ok=True)
    if args.what == "one":
        print(json.dumps(one_model(args.name)))
        return
    if args.what == "decode":
        row = decode(args)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row, indent=1))
        return
    rows = []
    if args.report_only:
        rows = json.loads((RESULTS / "speed_models.json").read_text())
    for name in [] if args.report_only else args.models:
        proc = subprocess.run([sys.executable, __file__, "one", name], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if not args.report_only:
        (RESULTS / "speed_models.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| model | load s (fp32 copy) | peak RSS GB | prefill 512 s | prefill 1024 s | prefill 2048 s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = {int(k): v for k, v in r["prefill_seconds"].items()}
        lines.append(
            f"| {r['model']} | {r['load_seconds']:.1f} | {r['peak_rss_gb']:.2f} | {p[512]:.2f} | "
            f"{p[1024]:.2f} | {p[2048]:.2f} |"
        )
    command = " ".join(a for a in sys.argv if a != "--report-only")
    (RESULTS / "speed_models.md").write_text(f"Command: `python {command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
