"""Load time, peak RSS and prefill time per packaged model; decode speed with a compressed cache.

    python benchmarks/speed.py models --models smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    python benchmarks/speed.py decode --model smollm2-135m --context-tokens 2048 --ratio 0.3
    python benchmarks/speed.py decode --batch 8 --threads 1 --out speed_decode_batch8
    python benchmarks/speed.py compress --model qwen2.5-coder-0.5b --lengths 1024 2048 4096 --threads 1 \
        --out speed_compress_qwen0.5b
    python benchmarks/speed.py compress-one qwen2.5-coder-0.5b 2048 0.3 default --profile
    python benchmarks/speed.py prefill --model smollm2-135m --lengths 1024 2048 4096 --threads 1 \
        --out speed_prefill_dtype_smollm2

`prefill` times the prefill of the first n tokens of a long shipped text in fp32 and bf16 (best of two, after a
warm-up), in one process. `compress` times, at each context length, the plain prefill, the default compression (by stage) and kvpress's
KVzipPress, each in its own fresh process after a warm-up forward, with the peak memory each adds above the
loaded model (Linux: the high-water mark is reset before the operation).

Each model is measured in a fresh subprocess (so peak RSS is its own). Results: benchmarks/results/speed_*.json/md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
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


def _memory_gb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in GB (Linux); the lifetime peak elsewhere."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _reset_peak() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux ``clear_refs``); return the current RSS in GB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _memory_gb("VmRSS")


def compress_one(model_name: str, n: int, ratio: float, what: str, profile: bool = False) -> dict:
    """One of ``prefill`` / ``default`` / ``kvzip`` (kvpress) at context length ``n``, in this process;
    ``profile``: the default under cProfile, its 15 costliest kvsculpt functions (cumulative s) in the row."""
    from kvsculpt import compress, encode, load_model
    from kvsculpt.eval.texts import load_text, text_index
    from kvsculpt.hf.decode import prefill

    if what == "kvzip":  # kvpress patches transformers' own attention: the plain model, as peers.py loads it
        from kvsculpt.bench.peers import load_plain_model

        model, tok = load_plain_model(model_name)
    else:
        model, tok = load_model(model_name)
    ids = encode(tok, "\n\n".join(load_text(t) for t in sorted(text_index())))[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"the shipped texts hold only {ids.shape[1]} tokens, fewer than {n}")
    prefill(model, ids[:, :8])  # warm-up: pages the weights in
    base = _reset_peak()
    row = {"model": model_name, "n": n, "ratio": ratio, "what": what, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if what == "prefill":
        prefill(model, ids)
    elif what == "default":
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        info = compress(model, ids, ratio=ratio, tokenizer=tok, progress=False).info
        if prof:  # the kvsculpt functions by cumulative time: where the compression's seconds go
            prof.disable()
            stats = pstats.Stats(prof).stats
            ours = [(f"{Path(f).name}:{fn}", v[3]) for (f, _, fn), v in stats.items() if "kvsculpt" in f]
            row["profile"] = sorted(ours, key=lambda x: -x[1])[:15]
        row.update(prefill_seconds=info["prefill_seconds"], solve_seconds=info["solve_seconds"],
                   **{f"{k}_seconds": v for k, v in info["query_seconds_by_source"].items()})  # fmt: skip
    else:
        import kvpress
        from transformers import DynamicCache

        with torch.inference_mode(), kvpress.KVzipPress(compression_ratio=1 - ratio)(model):
            model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    row["seconds"] = time.perf_counter() - t0
    row["peak_extra_gb"] = _memory_gb("VmHWM") - base
    return row


def compress_scaling(args):
    """``speed.py compress``: prefill, default and kvpress KVzip at each length; JSON, Markdown and a PNG."""
    rows = []
    for n in args.lengths:
        for what in ("prefill", "default", "kvzip"):
            cmd = [sys.executable, __file__, "compress-one", args.model, str(n), str(args.ratio), what,
                   "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{what} at n={n} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"n={n} {what}: {rows[-1]['seconds']:.1f} s, +{rows[-1]['peak_extra_gb']:.2f} GB", flush=True
            )
    by = {(r["n"], r["what"]): r for r in rows}
    lines = [f"# Compression cost: {args.model}, r = {args.ratio}, {args.threads} thread(s)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "Each cell ran in a fresh process after a warm-up forward. `+GB` = peak memory above the loaded "
             "model during the operation. The default's stages: prefill, self samples, repeat pass, solve "
             "(reference pass, ranking, selection, value fit).", "",
             "| n | prefill s | +GB | default s | ×prefill | +GB | ×prefill's GB | stages s (prefill / self / repeat / "
             "solve) | kvpress KVzip s | ×prefill | +GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    f = lambda r, k: "–" if r is None else f"{r[k]:.2f}"  # noqa: E731
    for n in args.lengths:
        p, d, k = by.get((n, "prefill")), by.get((n, "default")), by.get((n, "kvzip"))
        ratio = lambda r, p=p: "–" if r is None or p is None else f"{r['seconds'] / p['seconds']:.2f}"  # noqa: E731
        mem = (
            "–"
            if d is None or p is None or p["peak_extra_gb"] < 0.01
            else f"{d['peak_extra_gb'] / p['peak_extra_gb']:.2f}"
        )
        stages = (
            "–"
            if d is None
            else " / ".join(
                f"{d.get(key, 0.0):.1f}"
                for key in ("prefill_seconds", "self_seconds", "repeat_seconds", "solve_seconds")
            )
        )
        lines.append(f"| {n} | {f(p, 'seconds')} | {f(p, 'peak_extra_gb')} | {f(d, 'seconds')} | {ratio(d)} | "
                     f"{f(d, 'peak_extra_gb')} | {mem} | {stages} | {f(k, 'seconds')} | {ratio(k)} | "
                     f"{f(k, 'peak_extra_gb')} |")  # fmt: skip
    slopes = {}
    for what in ("prefill", "default", "kvzip"):
        pts = [(math.log(r["n"]), math.log(r["seconds"])) for r in rows if r["what"] == what]
        if len(pts) >= 2:
            mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
            slopes[what] = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    lines += ["", "Growth exponent (least-squares slope of log seconds on log n): "
              + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items())]  # fmt: skip
    out = RESULTS / args.out  # names like speed_compress_qwen0.5b: no with_suffix
    (out.parent / f"{out.name}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "slopes": slopes}, indent=1)
    )
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for what, label in (("prefill", "prefill"), ("default", "kvsculpt default"), ("kvzip", "kvpress KVzip")):
        pts = sorted((r["n"], r["seconds"]) for r in rows if r["what"] == what)
        if pts:
            ax.loglog([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set(xlabel="context tokens n", ylabel="seconds", title=f"{args.model}, r = {args.ratio}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}.png", dpi=120)
    print("\n".join(lines))


def prefill_by_dtype(args) -> list[dict]:
    """Prefill seconds of the first n tokens of ``args.text`` per dtype and n (best of two after a warm-up)."""
    from kvsculpt import encode, load_model
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.decode import prefill

    rows = []
    for dtype in args.dtypes:
        model, tok = load_model(args.model, dtype=dtype)
        ids = encode(tok, load_text(args.text))
        prefill(model, ids[:, :64])  # pages the weights in
        for n in args.lengths:
            best = min(prefill(model, ids[:, :n])[2] for _ in range(2))
            rows.append(
                {
                    "model": args.model,
                    "dtype": dtype,
                    "n": n,
                    "prefill_seconds": best,
                    "threads": args.threads,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"# Prefill by dtype: {args.model}, {args.threads} thread(s)", "",
             f"Command: `python {' '.join(sys.argv)}`", "", "| n | " + " | ".join(f"{d} s" for d in args.dtypes)
             + " | fp32 ÷ bf16 |", "|---|" + "---|" * (len(args.dtypes) + 1)]  # fmt: skip
    for n in args.lengths:
        by = {r["dtype"]: r["prefill_seconds"] for r in rows if r["n"] == n}
        ratio = f"{by['fp32'] / by['bf16']:.2f}" if {"fp32", "bf16"} <= set(by) else "–"
        lines.append(f"| {n} | " + " | ".join(f"{by[d]:.2f}" for d in args.dtypes) + f" | {ratio} |")
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("models")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON")
    p = sub.add_parser("one")
    p.add_argument("name")
    p = sub.add_parser("compress", help="compress time and memory against the prefill, by context length")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="speed_compress", help="results name under benchmarks/results/")
    p = sub.add_parser("compress-one")
    p.add_argument("model")
    p.add_argument("n", type=int)
    p.add_argument("ratio", type=float)
    p.add_argument("what_", metavar="what", choices=["prefill", "default", "kvzip"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="the default under cProfile (slower)")
    p = sub.add_parser("prefill", help="prefill seconds in fp32 and bf16, by context length")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--text", default="openai_agents_run_loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="speed_prefill_dtype", help="results name under benchmarks/results/")
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
    if args.what == "compress-one":
        print(json.dumps(compress_one(args.model, args.n, args.ratio, args.what_, args.profile)))
        return
    if args.what == "compress":
        return compress_scaling(args)
    if args.what == "prefill":
        return prefill_by_dtype(args)
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
