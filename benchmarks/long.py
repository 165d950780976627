"""Long contexts: time, peak memory and KL of the default against kvpress's presses as n grows.

    python benchmarks/long.py --model smollm2-135m --lengths 8192 4096 2048 --ratios 0.1 0.3 \
        --out benchmarks/results/long_smollm2_chunked    # resumable; ~50 minutes on one core

For each long shipped text (``text_index(long=True)``; ``--texts``) and each n, the window is the text's first n
tokens and the 128 that follow (the KL's continuation, never seen by the fit). Rows: the full cache's prefill
seconds; for the default at each r, its compress seconds (the user's path, ``kvsculpt.compress``), compress ÷
prefill, its stages, peak memory above its start (``peak_extra_bytes``) beside the full cache's bytes, and KL
(also compressed while reading, ``--reading 2048``: ``chunk_tokens``; and ``method="learned"`` with each scorer of
``--learned``);
for each kvpress press (in its own environment, ``make peers``) the same figures. A fitted exponent of time
against n per method closes the report. Writes OUT.jsonl (rows), OUT.json and OUT.md.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

from kvsculpt.bench import peers
from kvsculpt.bench.runner import RowFile, grid_parser, results_file
from kvsculpt.compress import compress
from kvsculpt.config import CompressConfig
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window, text_index
from kvsculpt.hf.models import load_model

PRESSES = ("KVzipPress", "SnapKVPress", "ExpectedAttentionPress")
PRESS_NAMES = {f"kvpress.{p}" for p in ("KVzipPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress")}
ONE_PREFILL = PRESS_NAMES - {"kvpress.KVzipPress"}  # presses that score from the prefill alone
DEFAULT = "kvsculpt default"


def run(args) -> dict:
    rows = RowFile(results_file(args.out, ".jsonl"))
    if args.report_only:
        return report(list(rows.values()), args)
    texts = args.texts or sorted(text_index(long=True).keys() - text_index().keys())
    model, tok = load_model(args.model, dtype=args.dtype)
    presses = list(args.presses) if args.presses and peers.available() else []
    if args.presses and not presses:
        print(
            "kvpress is not installed (`make peers` makes its environment): the presses are skipped",
            flush=True,
        )
    with rows:
        for text in texts:
            for n in args.lengths:
                w = make_window(tok, load_text(text), n, args.continuation_tokens, name=text)
                wid = f"{text}@0:n={n}"
                configs = {
                    DEFAULT: {},
                    **({f"{DEFAULT} uniform": {"allocation": "uniform"}} if args.uniform else {}),
                    **{f"kvsculpt reading {c}": {"chunk_tokens": c, "read_ahead": 0} for c in args.reading},
                    **{f"kvsculpt reading {c} ahead {c}": {"chunk_tokens": c} for c in args.reading},
                    **{learned_name(p): learned_config(p) for p in args.learned},
                    **{
                        f"kvsculpt {name}": json.loads(opts)
                        for name, _, opts in (c.partition("=") for c in args.config)
                    },
                }
                todo = [(name, r) for name in configs for r in args.ratios if (wid, name, r) not in rows]
                todo_presses = [
                    p for p in presses if any((wid, f"kvpress.{p}", r) not in rows for r in args.ratios)
                ]
                if not todo and not todo_presses:
                    continue
                print(f"{wid}: full-cache teacher", flush=True)
                ref = teacher(model, w)
                for name, r in todo:
                    print(f"{wid}: {name} r={r}", flush=True)
                    cfg = CompressConfig(ratio=r, **configs[name])
                    cache = compress(model, w.context, cfg, tokenizer=tok, progress=True)
                    info = cache.info
                    rows.add({"window": wid, "text": text, "n": n, "config": name, "ratio": r, "model": args.model,
                              "dtype": str(model.dtype), **score(model, cache, w, ref),
                              "prefill_seconds": ref.prefill_seconds, "compress_seconds": info["compress_seconds"],
                              "compress_over_prefill": info["compress_seconds"] / ref.prefill_seconds,
                              "query_seconds": info["query_seconds"], "solve_seconds": info["solve_seconds"],
                              "query_seconds_by_source": info["query_seconds_by_source"],
                              "peak_extra_bytes": info["peak_extra_bytes"], "full_cache_bytes": info["full_cache_bytes"],
                              "max_head_budget": max(map(max, info["budgets"])),
                              "solved_in_chunks": info.get("solved_in_chunks", 1),
                              "read_in_parts": info.get("read_in_parts", 1)})  # fmt: skip
                    print(json.dumps({k: v for k, v in rows[(wid, name, r)].items()
                                      if k in ("kl", "compress_over_prefill", "peak_extra_bytes")}), flush=True)  # fmt: skip
                if todo_presses:
                    print(f"{wid}: kvpress {', '.join(todo_presses)}", flush=True)
                    for row in peers.run_presses(
                        args.model, w.context, w.continuation, args.ratios, todo_presses
                    ):
                        rows.add({**row, "window": wid, "text": text, "n": n, "config": row["method"],
                                  "model": args.model, "full_cache_bytes": rows.get((wid, DEFAULT, row["ratio"]), {}).get(
                                      "full_cache_bytes")})  # fmt: skip
    return report(list(rows.values()), args)


def learned_name(spec: str) -> str:
    """The row name of ``--learned PATH[#K][:nofit]``: the weights file's stem and what follows it."""
    path, _, rest = spec.partition("#")
    return f"kvsculpt learned {Path(path).stem}" + (f"#{rest}" if rest else "")


def learned_config(spec: str) -> dict:
    """``--learned PATH``: method="learned" with that scorer; ``PATH#K``: its weights after K training windows;
    ``PATH#nofit``: values copied instead of fitted; ``PATH#wN``: fitted on the prefill's last N queries (else on self samples); ``PATH#sN``: N self samples; ``PATH#lN``: each N tokens long; ``PATH#uniform``: allocation="uniform"; ``PATH#rN``: compressed while reading, in parts of N tokens; flags
    joined by commas (``PATH#8,nofit``)."""
    path, _, rest = spec.partition("#")
    flags = [f for f in rest.split(",") if f]
    options, config = {"weights": path}, {}
    for f in flags:
        if f.isdigit():
            options["snapshot"] = int(f)
        elif f.startswith("w"):
            options["fit_window"], options["fit_queries"] = int(f[1:]), "tail"
        elif f.startswith("s"):
            config["self_samples"] = int(f[1:])
        elif f.startswith("l"):
            config["self_length"] = int(f[1:])
        elif f.startswith("r"):
            config["chunk_tokens"] = int(f[1:])
        elif f == "uniform":
            config["allocation"] = "uniform"
    return {**config, "method": "learned", "options": options, "fit": "nofit" not in flags}


def slope(points) -> float | None:
    """Least-squares slope of log(seconds) against log(n)."""
    pts = [(math.log(n), math.log(s)) for n, s in points if s and s > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def pivot(rows: list[dict]) -> list[str]:
    """The KL of every method side by side, one line per window and ratio, and each method's mean compress ÷
    prefill and its worst KL ÷ the best press's on the same line (where there are presses)."""
    methods = sorted({r["config"] for r in rows}, key=lambda m: (m.startswith("kvpress"), m))
    cells = {(r["text"], r["n"], r["ratio"], r["config"]): r for r in rows}
    lines = ["", "KL side by side (— where not run):", "",
             "| text | n | r | " + " | ".join(m.replace("kvsculpt ", "").replace("kvpress.", "") for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]  # fmt: skip
    keys = sorted({(r["text"], r["n"], r["ratio"]) for r in rows})
    worst: dict = {}  # (method, which presses) -> the largest KL ÷ the best of those presses on a line
    for key in keys:
        row = [cells.get((*key, m)) for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join("—" if c is None else f"{c['kl']:.4g}" for c in row) + " |")  # fmt: skip
        for which, names in (("all", PRESS_NAMES), ("one-prefill", ONE_PREFILL)):
            best = [c["kl"] for m, c in zip(methods, row, strict=True) if c is not None and m in names]
            for m, c in zip(methods, row, strict=True):
                if c is not None and best:
                    worst[m, which] = max(worst.get((m, which), 0.0), c["kl"] / min(best))
    lines += ["", "Per method: its mean compress ÷ prefill, and the largest ratio of its KL to the best press's on the "
              "same line (below 1: it beats every press on every line; one-prefill presses: SnapKV, "
              "ExpectedAttention, TOVA).", "",
              "| method | mean compress ÷ prefill | worst KL ÷ best press | worst KL ÷ best one-prefill press |",
              "|---|---|---|---|"]  # fmt: skip
    for m in methods:
        ratios = [r["compress_over_prefill"] for r in rows if r["config"] == m]
        cols = [f"{worst[m, w]:.2f}" if (m, w) in worst else "—" for w in ("all", "one-prefill")]
        lines.append(f"| {m} | {sum(ratios) / len(ratios):.2f} | {cols[0]} | {cols[1]} |")
    return lines


def report(rows: list[dict], args) -> dict:
    out = Path(args.out)
    command = "python " + shlex.join(sys.argv)
    if results_file(out, ".json").exists():  # the runs' commands, not the report's; a run adds its own
        before = json.loads(results_file(out, ".json").read_text())["command"]
        command = before if args.report_only or command in before else f"{before}; then {command}"
    rows = sorted(rows, key=lambda r: (r["text"], r["n"], r["ratio"], r["config"]))
    mb = lambda b: "–" if b is None else f"{b / 1e6:.0f}"  # noqa: E731
    lines = [f"# Long contexts: {args.model}", "", f"Command: `{command}`", "",
             "First n tokens of each long text, KL over the next 128 (nats/token); seconds on the project's CPU (one "
             "core unless said); peak MB = peak memory above the start of the compression (CPU: resident set); "
             "full MB = the full cache's keys and values at the model's dtype.", "",
             "| text | n | r | method | KL | prefill s | compress s | ÷ prefill | peak MB | full MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['text']} | {r['n']} | {r['ratio']} | {r['config']} | {r['kl']:.4g} | "
                     f"{r['prefill_seconds']:.1f} | {r['compress_seconds']:.1f} | {r['compress_over_prefill']:.1f} | "
                     f"{mb(r.get('peak_extra_bytes'))} | {mb(r.get('full_cache_bytes'))} |")  # fmt: skip
    lines += pivot(rows)
    slopes = {}
    for method in sorted({r["config"] for r in rows}):
        for key in ("prefill_seconds", "compress_seconds"):
            pts = {}
            for r in rows:
                if r["config"] == method:
                    pts.setdefault(r["n"], []).append(r[key])
            slopes[(method, key)] = slope([(n, sum(v) / len(v)) for n, v in pts.items()])
    lines += ["", "Time against n, least-squares exponent (seconds ∝ n^k, means over texts and ratios):", ""]
    lines += [f"- {m}, {k.replace('_', ' ')}: k = {v:.2f}" for (m, k), v in slopes.items() if v is not None]
    data = {"command": command, "rows": rows,
            "exponents": {f"{m} {k}": v for (m, k), v in slopes.items()}}  # fmt: skip
    results_file(out, ".json").write_text(json.dumps(data, indent=1))
    results_file(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return data


def main(argv=None):
    ap = grid_parser(
        __doc__, ratios=[0.1, 0.3], out="benchmarks/results/long_smollm2_chunked", by_window=False
    )
    ap.add_argument("--texts", nargs="+", help="shipped texts or paths (default: the long shipped texts)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="context lengths n")
    ap.add_argument(
        "--presses", nargs="*", default=list(PRESSES), help="kvpress presses (the flag alone: none)"
    )
    ap.add_argument(
        "--reading",
        type=int,
        nargs="*",
        default=[],
        help="also compress while reading, in parts of these many tokens (CompressConfig.chunk_tokens): each "
        "part alone (read_ahead=0), and each read one part ahead (the library's default when reading)",
    )
    ap.add_argument("--learned", nargs="*", default=[], metavar="WEIGHTS",
                    help="also method='learned' with each of these scorer files (`kvsculpt train-scorer`); PATH#K: its "
                         "weights after K training windows; PATH#nofit: values copied; PATH#uniform: every head the same m; PATH#wN: fitted on the last N queries; PATH#sN: N self samples; PATH#lN: each N tokens long; PATH#rN: read in parts of N tokens")  # fmt: skip
    ap.add_argument(
        "--uniform",
        action="store_true",
        help="also the default with allocation='uniform': every head keeps the same m, the layout an "
        "inference engine can serve (`kvsculpt export-engine`)",
    )
    ap.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help='also these CompressConfig settings, e.g. \'sculpt uniform={"method": "sculpt", "allocation": "uniform"}\'',
    )
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    run(args)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
