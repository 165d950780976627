"""Ablation grid: (method × options × query source × ratio) over texts, scored by held-out KL.

    python benchmarks/ablate.py --model smollm2-135m --grid core --ratios 0.3 0.5 --out benchmarks/results/ablation_smollm2

Writes ``OUT.jsonl`` (one line per run; an interrupted run resumes from it), ``OUT.json`` and ``OUT.md``.
Each row carries the ``repr`` of the method that made it. The table gives geo-mean KL over windows, and the
ratio to Select+Fit (same query source) and to the best eviction baseline.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from kvsculpt import CompressConfig, load_model
from kvsculpt.bench.peers import run_peers
from kvsculpt.bench.runner import (
    EVICTION,
    RowFile,
    copy_peers,
    geomean,
    grid_parser,
    legacy_config,
    memorised_note,
    paired_ratio,
    run_grid,  # fmt: skip
    split_memorised,
    windows_by_id,
)
from kvsculpt.eval.texts import text_index, windows

# name: a CompressConfig with the settings the committed rows were made with (kvsculpt.bench.runner.LEGACY)
C = legacy_config


def S(iters: int, **options) -> CompressConfig:  # noqa: N802 (a grid row, beside C)
    """Sculpt from the default's cache (``kvzip-v``, its queries and budgets) with ``iters`` L-BFGS iterations."""
    return CompressConfig(method="sculpt", options={"score": "kvzip-v", "iters": iters, **options})


EVICT = {"fit": False}  # plain eviction: values copied
MAX = {"sinks": 0}  # kvzip scores without sinks = the former Select+Fit `select="max"`
KVZIP_FIT = C("kvzip", "repeat", allocation="global", heldout=0.0)  # the default since session 4
# kvpress's KVzip: KVzip's chat-wrapped request, its queries scored too, every query, no per-head floor, copied values
# the model's own 32 continuations of 8 tokens beside the repeat pass, KVzip's peak times √(relative ‖v‖)
SELF_REPEAT = CompressConfig(method="kvzip-v", queries="self+repeat", self_samples=32, self_length=8)
KVZIP_KVPRESS = KVZIP_FIT.replace(fit=False, repeat_prompt="kvzip", floor=1, max_queries=None)

GRIDS = {
    "core": {
        "h2o/context": C("h2o", "context", **EVICT),
        "snapkv": C("snapkv", "context", **EVICT),
        "tova": C("tova", "context", **EVICT),
        "streaming-llm": C("streaming-llm", "context", **EVICT),
        "knorm": C("knorm", "context", **EVICT),
        "h2o/self": C("h2o", "self", **EVICT),
        "h2o/self+context": C("h2o", "self+context", **EVICT),
        "select-fit/context": C("h2o", "context"),
        "select-fit/self": C("h2o", "self"),
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self prior=zero": C("h2o", "self", prior="zero"),
        "snapkv-fit": C("snapkv", "self+context"),
        "sculpt/context": C("sculpt", "context"),
        "sculpt/self": C("sculpt", "self"),
        "sculpt/self+context": C("sculpt", "self+context"),
    },
    "focus": {
        "h2o/context": C("h2o", "context", **EVICT),
        "snapkv": C("snapkv", "context", **EVICT),
        "streaming-llm": C("streaming-llm", "context", **EVICT),
        "h2o/self+context": C("h2o", "self+context", **EVICT),
        "select-fit/context": C("h2o", "context"),
        "select-fit/self": C("h2o", "self"),
        "select-fit/self+context": C("h2o", "self+context"),
        "sculpt/self+context": C("sculpt", "self+context"),
    },
    "budget": {
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+context adaptive": C("h2o", "self+context", allocation="adaptive"),
        "select-fit/self+context curves": C("h2o", "self+context", allocation="curves"),
        "select-fit/self+context curves-heads": C("h2o", "self+context", allocation="curves", scope="heads"),
        "select-fit/self+context curves-layers": C(
            "h2o", "self+context", allocation="curves", scope="layers"
        ),
        "sculpt/self+context": C("sculpt", "self+context"),
        "sculpt/self+context curves": C("sculpt", "self+context", allocation="curves"),
        "h2o/context": C("h2o", "context", **EVICT),
    },
    "queries": {
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+context N<=1024": C("h2o", "self+context", max_queries=1024),
        "select-fit/self+context N<=2048": C("h2o", "self+context", max_queries=2048),
        "select-fit/self+context N=all": C("h2o", "self+context", max_queries=None),
        "select-fit/self+context S=5": C("h2o", "self+context", self_samples=5),
        "select-fit/self+context S=20 L=32": C("h2o", "self+context", self_samples=20, self_length=32),
        "select-fit/self+context T=0.7": C("h2o", "self+context", temperature=0.7),
        "select-fit/repeat": C("h2o", "repeat"),
        "select-fit/repeat+context": C("h2o", "repeat+context"),
        "select-fit/self+repeat+context": C("h2o", "self+repeat+context"),
        "h2o/context": C("h2o", "context", **EVICT),
    },
    "budget-small": {
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+context adaptive": C("h2o", "self+context", allocation="adaptive"),
        "select-fit/self+context curves": C("h2o", "self+context", allocation="curves"),
        "sculpt/self+context": C("sculpt", "self+context"),
        "sculpt/self+context curves": C("sculpt", "self+context", allocation="curves"),
        "h2o/context": C("h2o", "context", **EVICT),
    },
    "sculpt": {
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+context beta=nnls": C("h2o", "self+context", beta="nnls"),
        "sculpt/self+context": C("sculpt", "self+context"),
        "sculpt/self+context iters=60": C("sculpt", "self+context", iters=60),
        "sculpt/self+context beta=joint": C("sculpt", "self+context", beta="joint"),
        "sculpt/self+context mass=0": C("sculpt", "self+context", mass_weight=0.0),
        "select-fit/context": C("h2o", "context"),
        "sculpt/context": C("sculpt", "context"),
    },
    # where might Sculpt pay: little room (r = 0.05, 0.1), on-policy layer-by-layer queries
    "regime": {
        "select-fit/self+context": C("h2o", "self+context"),
        "sculpt/self+context": C("sculpt", "self+context"),
        "sculpt/self+context on-policy": C("sculpt", "self+context", on_policy=64),
        "h2o/context": C("h2o", "context", **EVICT),
        "snapkv": C("snapkv", "context", **EVICT),
    },
    "regime-extra": {  # run on the first window only (cost)
        "select-fit/self+context on-policy": C("h2o", "self+context", on_policy=64),
        "sculpt/self+context iters=60 beta=joint": C("sculpt", "self+context", iters=60, beta="joint"),
    },
    "passkey": {  # does a query source that reconstructs the context keep a planted needle?
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+repeat+context": C("h2o", "self+repeat+context"),
        "select-fit/repeat+context": C("h2o", "repeat+context"),
        "snapkv": C("snapkv", "context", **EVICT),
    },
    "passkey-max": {  # KVzip's rule: rank keys by the largest attention any one reference query gives them
        "select-fit/self+context select=max": C("kvzip", "self+context", **MAX),
        "select-fit/repeat+context select=max": C("kvzip", "repeat+context", **MAX),
        "select-fit/self+repeat+context select=max": C("kvzip", "self+repeat+context", **MAX),
    },
    "recent": {  # always keep the most recent positions (SnapKV keeps its observation window)
        "select-fit/self+context recent=16": C("h2o", "self+context", recent=16),
        "select-fit/self+context recent=64": C("h2o", "self+context", recent=64),
    },
    "global": {  # KVzip's allocation: all entries of all heads ranked together
        "select-fit/self+context": C("h2o", "self+context"),
        "select-fit/self+context global": C("h2o", "self+context", allocation="global"),
        "select-fit max/self+context global": C("kvzip", "self+context", allocation="global", **MAX),
        "select-fit/repeat+context global": C("h2o", "repeat+context", allocation="global"),
        "select-fit max/repeat+context global": C("kvzip", "repeat+context", allocation="global", **MAX),
        "kvzip/repeat global (ours)": C("kvzip", "repeat", allocation="global", **EVICT),
    },
    "fit-or-not": {  # does the value fit help? the same selections without and with it
        "h2o/self+context": C("h2o", "self+context", **EVICT),
        "h2o-fit/self+context": C("h2o", "self+context"),
        "kvzip/repeat": C("kvzip", "repeat", **EVICT),
        "kvzip-fit/repeat global": C("kvzip", "repeat", allocation="global"),
    },
    "kvzip": {  # KVzip-like: peak attention of the repeat queries, global budgets; values fitted or not
        "kvzip/repeat global": C("kvzip", "repeat", allocation="global", **EVICT),
        "kvzip-fit/repeat global": C("kvzip", "repeat", allocation="global"),
        "kvzip-fit/repeat": C("kvzip", "repeat"),
        "kvzip/repeat global, no held-out": C("kvzip", "repeat", allocation="global", heldout=0.0, **EVICT),
        "kvzip-fit/repeat global, no held-out": KVZIP_FIT,
        "kvzip-fit/repeat global, no held-out, all queries": KVZIP_FIT.replace(max_queries=None),
    },
    "kvzip-fit": {  # the KVzip-style fit (the default since session 4) against the previous default
        "select-fit/self+context curves": C("h2o", "self+context", allocation="curves"),
        "kvzip-fit/repeat global, no held-out": KVZIP_FIT,
    },
    "default": {  # the default before and after the fast-default issue
        "kvzip-fit/repeat global, no held-out": KVZIP_FIT,
        "kvzip-fit/repeat-kvzip global": KVZIP_KVPRESS.replace(fit=True, floor=None),
    },
    # issue 13: which of kvpress KVzip's choices to keep, and whether the value fit should be guarded
    "fast-default": {
        "kvzip-fit/repeat global, no held-out": KVZIP_FIT,  # the default until now
        "kvzip/repeat global, no held-out": KVZIP_FIT.replace(fit=False),  # our former KVzip replica
        "kvzip/repeat-kvzip global floor=1": KVZIP_KVPRESS,  # = kvpress KVzip less its chat-prefix artifact
        "kvzip-fit/repeat-kvzip global floor=1": KVZIP_KVPRESS.replace(fit=True),
        "kvzip-fit guard/repeat-kvzip global floor=1": KVZIP_KVPRESS.replace(
            fit=True, options={"guard": True}
        ),
        "kvzip-fit/repeat-kvzip global": KVZIP_KVPRESS.replace(fit=True, floor=None),
        "select-fit/self+context curves": C("h2o", "self+context", allocation="curves"),  # the default before
    },
    "fast-default-lite": {  # the same question on a larger model, without the slow self-query row
        "kvzip-fit/repeat global, no held-out": KVZIP_FIT,
        "kvzip/repeat-kvzip global floor=1": KVZIP_KVPRESS,
        "kvzip-fit/repeat-kvzip global": KVZIP_KVPRESS.replace(fit=True, floor=None),
    },
    # issue 13, continued: the model's own short continuations as reference queries beside the repeat pass, and
    # KVzip's peak weighted by the value norm (kvzip-v); chosen on the offset-0 windows, reported on the others
    "self-repeat": {
        "kvzip-fit/repeat-kvzip global": KVZIP_KVPRESS.replace(fit=True, floor=None),  # the default until now
        "kvzip-v/self32x8+repeat global": SELF_REPEAT,
        "kvzip-v/self32x8+repeat global floor=64": SELF_REPEAT.replace(floor=64),
        "kvzip-v/self10x64+repeat global floor=64": SELF_REPEAT.replace(
            floor=64, self_samples=10, self_length=64
        ),
        "kvzip-fit/self32x8+repeat global": SELF_REPEAT.replace(method="kvzip"),
        "kvzip-v/repeat global": SELF_REPEAT.replace(queries="repeat"),
    },
    # issue 16: what the repeat pass is worth to the default (without it the compression is prefill + self samples
    # + solve: could that reach the cost target?)
    "no-repeat": {
        "kvzip-v/self32x8+repeat global": SELF_REPEAT,
        "kvzip-v/self32x8+context global": SELF_REPEAT.replace(queries="self+context"),
        "kvzip-v/self32x8 global": SELF_REPEAT.replace(queries="self"),
    },
    # issue 16: the value fit on a random subset of the queries (its normal equations cost N·m² per head)
    "fit-rows": {
        "kvzip-v/self32x8+repeat global": SELF_REPEAT,
        **{
            f"kvzip-v/self32x8+repeat global fit_rows={k}": SELF_REPEAT.replace(options={"fit_rows": k})
            for k in (1024, 2048, 4096)
        },
    },
    # the fixed Sculpt (one L-BFGS per head, evaluations counted) against its own start, Select+Fit on the same
    # queries: the paper's (context queries) and ours (the default's self+repeat queries, kvzip-v selection,
    # global budgets); iters=0 of each is its select-fit row exactly (tests/test_solvers.py)
    "sculpt-iters": {
        "select-fit/context": C("h2o", "context"),
        "sculpt/context iters=20": C("sculpt", "context", iters=20),
        "select-fit/default": CompressConfig(),
        "sculpt/default iters=20": S(20, mass_weight=0.0),
    },
    "sculpt-iters-100": {  # the longer runs, apart (about 5x the 20-iteration rows' time)
        "sculpt/context iters=100": C("sculpt", "context", iters=100),
        "sculpt/default iters=100": S(100, mass_weight=0.0),
    },
    # the block's log-mass is free when mass_weight = 0: held to the teacher's by the mass term or by β (NNLS)
    "sculpt-mass": {
        "sculpt/context iters=20 mass=1": C("sculpt", "context", iters=20, mass_weight=1.0),
        "sculpt/default iters=20 mass=1": S(20, mass_weight=1.0),
        "sculpt/default iters=60 mass=1": S(60, mass_weight=1.0),  # 2-4x the time of 20
        "sculpt/default iters=20 beta=nnls": S(20, beta="nnls", mass_weight=0.0),
    },
    "sculpt-iters-300": {  # the long runs (about 3x the 100-iteration rows' time)
        "sculpt/context iters=300": C("sculpt", "context", iters=300),
        "sculpt/default iters=300": S(300, mass_weight=0.0),
    },
    "smoke": {
        "h2o/context": C("h2o", "context", **EVICT),
        "select-fit/context": C("h2o", "context"),
        "sculpt/context": C("sculpt", "context", iters=5),
    },
}


def run(args):
    out = Path(args.out)
    jsonl = out.parent / f"{out.name}.jsonl"
    if args.report_only:
        write_report(list(RowFile(jsonl).values()), args, out)
        return
    grid = GRIDS[args.grid]
    if args.rows:
        unknown = [n for n in args.rows if n not in grid]
        if unknown:
            raise SystemExit(f"--rows: {', '.join(unknown)} not in grid {args.grid} ({', '.join(grid)})")
        grid = {n: grid[n] for n in args.rows}
    model, tok = load_model(args.model)
    texts = args.texts or [k for k, v in text_index().items() if not v["memorised"]]
    if args.windows:
        wins = windows_by_id(tok, args.windows, args.context_tokens, args.continuation_tokens)
    else:
        wins = windows(tok, texts, args.context_tokens, args.continuation_tokens, per_text=args.per_text)
    if args.peers_from:
        copy_peers(Path(args.peers_from), RowFile(jsonl), {w.id for w in wins}, args.ratios)
    for w in wins:  # window by window (with the peers), so that an interrupted run has whole windows
        run_grid(model, tok, args.model, [w], grid, args.ratios, jsonl, passkey=args.passkey)
        if args.peers:
            run_peers(args.model, [w], args.ratios, jsonl, tok)
    write_report(list(RowFile(jsonl).values()), args, out)  # everything measured so far, all grids


def summarise(rows, ratios) -> list[dict]:
    """Per (config, ratio): geo-mean KL over the windows, and against the kvpress presses in the rows: the
    paired geo-mean ratio to the best press (by geo-mean), the worst window's ratio to the best press on that
    window, and the windows on which the config's KL rises with more room (by more than 5 %)."""
    kl = {(r["config"], r["ratio"], r["window"]): r["kl"] for r in rows}
    cp, methods, pk = defaultdict(list), {}, defaultdict(list)
    for r in rows:
        cp[(r["config"], r["ratio"])].append(r["compress_over_prefill"])
        if r.get("passkey") is not None:
            pk[(r["config"], r["ratio"])].append((r["passkey"], r.get("passkey_full")))
        methods[(r["config"], r["ratio"])] = r.get("compress_config") or r.get("method") or r.get("press")
    configs = list(dict.fromkeys(r["config"] for r in rows))
    wins = sorted({r["window"] for r in rows})
    rising = {}
    for c in configs:
        rising[c] = sorted(
            w for w in wins
            if any((c, a, w) in kl and (c, b, w) in kl and kl[(c, b, w)] > 1.05 * kl[(c, a, w)]
                   for a in ratios for b in ratios if b > a)
        )  # fmt: skip
    summary = []
    for ratio in ratios:
        present = [c for c in configs if (c, ratio) in methods]
        gm = {c: geomean([v for (cc, r, _), v in kl.items() if cc == c and r == ratio]) for c in present}
        evict = [c for c in present if c.split("/")[0] in EVICTION]
        best_evict = min(evict, key=gm.get) if evict else None
        presses = [c for c in present if c.startswith("kvpress.")]
        best_press = min(presses, key=gm.get) if presses else None
        for c in present:
            src = c.split("/")[1].split(" ")[0] if "/" in c else None
            sf = f"select-fit/{src}" if src else None
            worst = [min(kl[(p, ratio, w)] for p in presses if (p, ratio, w) in kl) / kl[(c, ratio, w)]
                     for w in wins if (c, ratio, w) in kl and any((p, ratio, w) in kl for p in presses)]  # fmt: skip
            worst_sf = [kl[(sf, ratio, w)] / kl[(c, ratio, w)] for w in wins
                        if (c, ratio, w) in kl and (sf, ratio, w) in kl]  # fmt: skip
            summary.append({
                "config": c, "ratio": ratio, "method": methods[(c, ratio)], "kl_geomean": gm[c],
                "vs_select_fit": paired_ratio(kl, sf, c, ratio) if sf in gm else None,
                "worst_window_vs_select_fit": min(worst_sf) if worst_sf else None,
                "vs_best_eviction": paired_ratio(kl, best_evict, c, ratio) if best_evict else None,
                "best_eviction": best_evict, "best_press": best_press,
                "vs_best_press": paired_ratio(kl, best_press, c, ratio) if best_press else None,
                "worst_window_vs_best_press": min(worst) if worst else None,
                "rises_with_room": rising[c],
                "compress_over_prefill": sum(cp[(c, ratio)]) / len(cp[(c, ratio)]),
                "windows": sum(1 for (cc, r, _) in kl if cc == c and r == ratio),
                "passkey": [sum(a for a, _ in pk[(c, ratio)]), sum(bool(b) for _, b in pk[(c, ratio)]),
                            len(pk[(c, ratio)])] if pk[(c, ratio)] else None,
            })  # fmt: skip
    return summary


def table(summary) -> list[str]:
    f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| config | ratio | windows | KL | ×S+F | worst window ×S+F | ×evict | ×best press | worst window ×press "
             "| rises with room | passkey | compress/prefill |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(
            f"| {s['config']} | {s['ratio']} | {s['windows']} | {s['kl_geomean']:.4f} | {f(s['vs_select_fit'])} | "
            f"{f(s.get('worst_window_vs_select_fit'))} | {f(s['vs_best_eviction'])} | {f(s['vs_best_press'])} | {f(s['worst_window_vs_best_press'])} | "
            f"{len(s['rises_with_room'])} | {'/'.join(map(str, s['passkey'])) if s['passkey'] else '–'} | "
            f"{s['compress_over_prefill']:.1f} |"
        )
    return lines


def write_report(rows, args, out: Path):
    all_rows = rows
    rows, flagged = split_memorised(rows)
    summary = summarise(rows, args.ratios)
    sets = {"tune (windows at offset 0)": [r for r in rows if r["window"].endswith("@0")],
            "report (windows at later offsets)": [r for r in rows if not r["window"].endswith("@0")]}  # fmt: skip
    (out.parent / f"{out.name}.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary, "by_set": {k: summarise(v, args.ratios) for k, v in sets.items() if v},
         "looks_memorised": flagged, "rows": all_rows}, indent=1))  # fmt: skip
    lines = [
        f"# Ablation: {args.model}, n={args.context_tokens}, T={args.continuation_tokens}",
        "",
        f"Command: `python {' '.join(a for a in sys.argv if a != '--report-only')}`",
        "",
        f"Geo-mean held-out KL (nats) over up to {len({r['window'] for r in rows})} windows "
        f"({', '.join(sorted({r['window'] for r in rows}))}). "
        "`×S+F` = KL(Select+Fit, same queries) / KL(row), `worst window ×S+F` its smallest per-window value; `×evict` = KL(best eviction baseline) / KL(row); "
        "`×best press` = KL(the kvpress press with the lowest geo-mean) / KL(row): above 1 means the row is "
        "better. Ratios are paired: geo-mean over the windows both ran on. `worst window ×press`: the smallest, "
        "over windows, of KL(the best press on that window) / KL(row). `rises with room`: windows on which the "
        "row's KL at a larger ratio exceeds its KL at a smaller one by more than 5 %.",
        "",
        "`passkey`: windows where the planted key was retrieved after compression / by the full cache / tried.",
        "",
        *table(summary),
    ]
    for name, subset in sets.items():
        if subset and len(subset) < len(rows):
            lines += [
                "",
                f"## {name}: {len({r['window'] for r in subset})} windows",
                "",
                *table(summarise(subset, args.ratios)),
            ]
    methods = {s["config"]: s["method"] for s in summary}
    lines += ["", "Configurations (at the last ratio):", "", *[f"- {c}: `{m}`" for c, m in methods.items()]]
    nll = {r["window"]: r["teacher_nll"] for r in rows if "teacher_nll" in r}
    lines += ["", "Teacher NLL per window (nats/token): " + ", ".join(f"{k} {v:.2f}" for k, v in nll.items())]
    lines += memorised_note(flagged)
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = grid_parser(__doc__, ratios=[0.3, 0.5], out="benchmarks/results/ablation")  # --windows: not --texts
    ap.add_argument("--grid", default="core", choices=GRIDS)
    ap.add_argument("--rows", nargs="+", help="run only these rows of the grid (default: all)")
    ap.add_argument("--texts", nargs="*")
    ap.add_argument("--per-text", type=int, default=1)
    ap.add_argument("--passkey", action="store_true", help="also try pass-key retrieval at every ratio")
    ap.add_argument("--peers", action="store_true", help="also run kvpress's presses on the same windows")
    ap.add_argument(
        "--peers-from", help="a results JSONL (same model and window lengths) whose kvpress rows are copied"
    )
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()  # threads: torch's default (all cores), or OMP_NUM_THREADS
