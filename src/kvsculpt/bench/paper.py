"""``kvsculpt bench paper``: the KVSculpt paper's table on the paper's layout, with kvpress peers in the same run."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import CompressConfig
from ..eval.texts import text_index, windows
from .runner import RowFile, geomean, legacy_config, memorised_note, paired_ratio, run_grid, split_memorised

PAPER = {"sculpt_vs_select_fit": "3.5–4.1×", "adaptive_vs_uniform": "1.3×", "layer_spread": "100×",
         "head_ratio": "467×"}  # fmt: skip

PAPER_GRID = {
    "Select+Fit": legacy_config("h2o", "self+context"),
    # the paper's Sculpt: Select+Fit's selection, keys by L-BFGS, no mass term; 20 iterations (100 were no better
    # on SmolLM2's context queries and cost 5x: benchmarks/results/sculpt_iters_smollm2.md)
    "Sculpt": legacy_config("sculpt", "self+context", iters=20),
    "Sculpt adaptive (curves)": legacy_config("sculpt", "self+context", allocation="curves", iters=20),
    # ours: the default's cache, then its keys by L-BFGS with the block's log-mass held (mass_weight=1)
    "Sculpt from the default": CompressConfig(method="sculpt"),
    "Select+Fit adaptive (curves)": legacy_config("h2o", "self+context", allocation="curves"),
    # KVzip's selection (peak attention while the model repeats the context; all heads ranked together),
    # then our value fit; every repeat query is used (none held out: a held-out block's keys would be lost)
    "KVzip-fit (repeat, global)": legacy_config("kvzip", "repeat", allocation="global", heldout=0.0),
    # the default of the fast-default issue: KVzip's chat-wrapped request, every query, fitted values
    # (self sizes as its rows were made: unused by 'repeat', they keep its repr)
    "KVzip-fit (KVzip prompt, global)": CompressConfig(
        method="kvzip", queries="repeat", self_samples=10, self_length=64
    ),
    # the default since: the model's own short continuations beside the repeat pass, peaks weighted by √‖v‖
    "KVzip-v (self+repeat, global)": CompressConfig(
        method="kvzip-v", queries="self+repeat", self_samples=32, self_length=8
    ),
    # the default, then refined end to end on the KL (kvsculpt.refine; hours per window on a CPU at this size)
    "default + KL refine": CompressConfig(refine="kl"),
    "H2O": legacy_config("h2o", "context", fit=False),
    "SnapKV": legacy_config("snapkv", "context", fit=False),
    "TOVA": legacy_config("tova", "context", fit=False),
    "StreamingLLM": legacy_config("streaming-llm", "context", fit=False),
    "Knorm": legacy_config("knorm", "context", fit=False),
}


KVPRESS_DUPLICATES = ("SnapKV", "StreamingLLM", "Knorm")
OPT_IN = ("default + KL refine",)  # run only when named in --methods (slow on a CPU)
# CompressConfig()'s rows, which the opt-in rows are paired with
DEFAULT_ROW = "KVzip-v (self+repeat, global)"
BASELINES = ("H2O", "SnapKV", "TOVA", "StreamingLLM", "Knorm")


def is_peer_or_baseline(config: str) -> bool:
    """A kvpress press or one of our eviction baselines (not one of our fitted methods)."""
    return config.startswith("kvpress.") or config.split(" ")[0] in BASELINES


def check_cached_setting(jsonl: Path, setting: dict) -> None:
    """Refuse to mix cached results made with another window setting into ``jsonl`` (rows are keyed by
    window name, not length). The setting is kept beside it in ``<jsonl>.setting.json``."""
    meta = jsonl.with_suffix(".setting.json")
    if meta.exists():
        cached = json.loads(meta.read_text())
        if cached != setting:
            raise ValueError(
                f"{jsonl} holds results for {cached}, not {setting}: use another --out directory"
            )
    else:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(setting) + "\n")


@dataclass
class PaperBench:
    """What ``kvsculpt bench paper`` runs (the CLI builds it from its options; defaults are the CLI's)."""

    model: str = "qwen2.5-coder-1.5b"
    context_tokens: int = 2048
    continuation_tokens: int = 256
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    docs: int = 4  # documents, one window each
    texts: list[str] | None = None  # shipped names or paths (None: the non-memorised texts)
    methods: list[str] | None = None  # a subset of PAPER_GRID (None: all but the opt-in rows)
    rerun: list[str] = field(default_factory=list)  # methods whose rows by an earlier version run again
    quick: bool = False
    peers: bool = True
    passkey: bool = True
    passkey_ratios: list[float] | None = None
    out: str = "benchmarks/results"
    report_only: bool = False
    command_line: str = "kvsculpt bench paper"


def paper(args: PaperBench) -> dict:
    """``kvsculpt bench paper``: our methods and kvpress peers on the same windows and budgets; writes
    ``paper_<model>.{json,md,png}`` in ``args.out``."""
    from ..hf.models import load_model
    from . import peers

    tag = Path(args.model).name
    out = Path(args.out)
    jsonl = out / f"paper_{tag}.jsonl"
    use_peers = args.peers and peers.available()
    unknown = sorted(set(args.methods or ()) - set(PAPER_GRID))
    if unknown:
        raise ValueError(
            f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(PAPER_GRID)}"
        )
    grid = {k: v for k, v in PAPER_GRID.items() if (k in args.methods if args.methods else k not in OPT_IN)}
    if args.quick and use_peers:  # kvpress runs the same presses (equal KL: kvpress_parity.jsonl)
        grid = {k: v for k, v in grid.items() if k not in KVPRESS_DUPLICATES}
    rerun = args.rerun or ()
    unknown = set(rerun) - set(grid)
    if unknown:
        raise ValueError(f"--rerun names no method of this run: {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(grid)}")  # fmt: skip
    report_only = args.report_only  # rewrite the report from the cached rows; runs nothing
    if report_only and not jsonl.exists():
        raise FileNotFoundError(f"{jsonl}: no cached results to report (run without --report-only first)")
    check_cached_setting(jsonl, {"context_tokens": args.context_tokens,
                                 "continuation_tokens": args.continuation_tokens})  # fmt: skip
    # the report covers every cached row of the table's methods (those run now and those of earlier runs), so
    # that re-running one method does not drop the others from it; opt-in rows are compared apart
    shown = set(PAPER_GRID)

    def cached(ids=None):
        return [r for (window, config, ratio), r in RowFile(jsonl).items()
                if (config in shown or config.startswith("kvpress.")) and ratio in args.ratios
                and (ids is None or window in ids)]  # fmt: skip

    if report_only:
        rows = cached()  # the peers note: are kvpress rows in the cache (not: is kvpress installed now)
        ran = any(r["config"].startswith("kvpress.") for r in rows)
        return write_paper_report(rows, args, out, tag, peers_note=None if ran else _peer_note(args))
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    texts = args.texts or [k for k, v in text_index().items() if not v["memorised"]]
    wins = windows(tok, texts, args.context_tokens, args.continuation_tokens)[: args.docs]
    pk_ratios = args.passkey_ratios or [min(args.ratios, key=lambda r: abs(r - 0.3))]
    for w in wins:  # window by window, so that an interrupted run has complete windows to report
        run_grid(model, tok, args.model, [w], grid, args.ratios, jsonl, passkey=args.passkey,
                 passkey_ratios=pk_ratios, heldout_self_kl=False, rerun=rerun)  # fmt: skip
        if use_peers:
            peers.run_peers(args.model, [w], args.ratios, jsonl, tok, args.passkey, pk_ratios)
    rows = cached({w.id for w in wins})
    return write_paper_report(rows, args, out, tag, peers_note=None if use_peers else _peer_note(args))


def opt_in_comparisons(extra: list[dict], rows: list[dict]) -> list[dict]:
    """Each opt-in (config, ratio) against the default and the best peer or eviction baseline, paired on the
    windows of ``rows`` (the main table's complete windows) where it ran."""
    kl = {(r["config"], r["ratio"], r["window"]): r["kl"] for r in rows}
    others = {r["config"] for r in rows if is_peer_or_baseline(r["config"])}
    out = []
    for c, ratio in dict.fromkeys((r["config"], r["ratio"]) for r in extra):
        mine = {r["window"]: r for r in extra if r["config"] == c and r["ratio"] == ratio
                and (DEFAULT_ROW, ratio, r["window"]) in kl}  # fmt: skip
        if not mine:
            continue
        per = {}
        for w, r in sorted(mine.items()):
            best = min(
                (o for o in others if (o, ratio, w) in kl), key=lambda o: kl[(o, ratio, w)], default=None
            )
            per[w] = {"kl": r["kl"], "default": kl[(DEFAULT_ROW, ratio, w)], "best_other": best,
                      "best_other_kl": kl[(best, ratio, w)] if best else None}  # fmt: skip
        over_default = [p["default"] / p["kl"] for p in per.values()]
        over_other = [p["best_other_kl"] / p["kl"] for p in per.values() if p["best_other_kl"] is not None]
        cp = [float(r["compress_over_prefill"]) for r in mine.values() if r.get("compress_over_prefill")]
        out.append({"config": c, "ratio": ratio, "windows": list(per), "per_window": per,
                    "kl": geomean(p["kl"] for p in per.values()), "kl_default": geomean(p["default"] for p in per.values()),
                    "gain_over_default": geomean(over_default), "worst_over_default": min(over_default),
                    "gain_over_best_other": geomean(over_other) if over_other else None,
                    "worst_over_best_other": min(over_other) if over_other else None,
                    "compress_over_prefill": sum(cp) / len(cp) if cp else None})  # fmt: skip
    return out


def _peer_note(args) -> str:
    return (
        "kvpress peers not run ("
        + ("--no-peers" if not args.peers else "kvpress not installed: `make peers`")
        + ")"
    )


def write_paper_report(rows, args: PaperBench, out: Path, tag: str, peers_note=None) -> dict:
    from .plots import kl_vs_ratio

    out.mkdir(parents=True, exist_ok=True)
    all_rows = rows
    rows, flagged = split_memorised(rows)
    # opt-in methods (hours per window) run on fewer windows and ratios: compared apart, paired with the default
    extra = [r for r in rows if r["config"] in OPT_IN]
    rows = [r for r in rows if r["config"] not in OPT_IN]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    # Only windows on which every configuration ran at every ratio, so that all columns compare like with like.
    have = defaultdict(set)
    for r in rows:
        have[r["window"]].add((r["config"], r["ratio"]))
    need = {(c, r) for c in configs for r in args.ratios}
    incomplete = sorted(w for w, got in have.items() if not need <= got)
    rows = [r for r in rows if r["window"] not in incomplete]
    kl = {(r["config"], r["ratio"], r["window"]): r["kl"] for r in rows}

    def gm(c, ratio, key="kl"):
        xs = [r[key] for r in rows if r["config"] == c and r["ratio"] == ratio and r.get(key) is not None]
        return geomean(xs) if xs else None

    def mean(c, ratio, key):
        xs = [r[key] for r in rows if r["config"] == c and r["ratio"] == ratio and r.get(key) is not None]
        return sum(map(float, xs)) / len(xs) if xs else None

    table = {c: {r: gm(c, r) for r in args.ratios} for c in configs}
    comparisons = []
    for r in args.ratios:
        ours = [c for c in configs if not is_peer_or_baseline(c)]
        others = [c for c in configs if c not in ours and table[c][r] is not None]
        best_other = min(others, key=lambda c: table[c][r]) if others else None
        best_ours = min(ours, key=lambda c: table[c][r]) if ours else None
        spread = [x for x in rows if x["ratio"] == r and "pilot_layer_spread" in x]
        comparisons.append({
            "ratio": r,
            "select_fit_over_sculpt": paired_ratio(kl, "Select+Fit", "Sculpt", r),
            "sculpt_over_sculpt_adaptive": paired_ratio(kl, "Sculpt", "Sculpt adaptive (curves)", r),
            "select_fit_over_adaptive": paired_ratio(kl, "Select+Fit", "Select+Fit adaptive (curves)", r),
            "best_other": best_other, "best_ours": best_ours,
            "best_other_over_best_ours": paired_ratio(kl, best_other, best_ours, r) if best_other and best_ours else None,
            "pilot_layer_spread_max": max((x["pilot_layer_spread"] for x in spread), default=None),
            "pilot_head_ratio_max": max((x["pilot_head_ratio"] for x in spread), default=None),
        })  # fmt: skip
    wins = sorted({r["window"] for r in rows})
    nll = {w: next(r["teacher_nll"] for r in rows if r["window"] == w and "teacher_nll" in r) for w in wins
           if any("teacher_nll" in r for r in rows if r["window"] == w)}  # fmt: skip
    opt_in = opt_in_comparisons(extra, rows)
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("func",)}, "kl_geomean": table,
               "comparisons": comparisons, "opt_in": opt_in, "teacher_nll": nll, "paper": PAPER,
               "looks_memorised": flagged, "rows": all_rows}  # fmt: skip
    (out / f"paper_{tag}.json").write_text(json.dumps(summary, indent=1))
    f = lambda x, p=4: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [
        f"# KVSculpt paper table on {args.model}: n={args.context_tokens}, T={args.continuation_tokens}",
        "",
        f"Command: `{args.command_line}`",
        "",
        f"Windows ({len(wins)}): {', '.join(wins)}. Teacher NLL (nats/token): "
        + ", ".join(f"{w} {v:.2f}" for w, v in nll.items()),
        "",
        "Geo-mean held-out KL (nats/token) over the windows; `ratio` = fraction of KV entries kept "
        "(kvpress presses ran at `compression_ratio = 1 − ratio`).",
        "",
        "| method | "
        + " | ".join(f"KL r={r}" for r in args.ratios)
        + " | passkey (r in "
        + ", ".join(sorted({str(x["ratio"]) for x in rows if x.get("passkey") is not None}))
        + ") | compress/prefill | cache/full |",
        "|---|" + "---|" * len(args.ratios) + "---|---|---|",
    ]
    for c in configs:
        pk = [x["passkey"] for x in rows if x["config"] == c and x.get("passkey") is not None]
        pk_s = f"{sum(pk)}/{len(pk)}" if pk else "–"
        cp = [mean(c, r, "compress_over_prefill") for r in args.ratios]
        cp = [x for x in cp if x is not None]
        cf = [mean(c, r, "cache_over_full") for r in args.ratios]
        lines.append(f"| {c} | " + " | ".join(f(table[c][r]) for r in args.ratios)
                     + f" | {pk_s} | {f(sum(cp) / len(cp) if cp else None, 1)} | "
                     + ", ".join(f(x, 2) for x in cf) + " |")  # fmt: skip
    lines += ["", "| r | KL(S+F)/KL(Sculpt) (paper 3.5–4.1×) | KL(Sculpt)/KL(Sculpt adaptive) (paper 1.3×) | "
              "KL(S+F)/KL(S+F adaptive) | best peer or baseline / our best | pilot MSE spread: layers (paper 100×), "
              "heads in a layer (paper 467×) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in comparisons:
        lines.append(
            f"| {c['ratio']} | {f(c['select_fit_over_sculpt'], 2)} | {f(c['sculpt_over_sculpt_adaptive'], 2)} | "
            f"{f(c['select_fit_over_adaptive'], 2)} | {f(c['best_other_over_best_ours'], 2)} "
            f"({c['best_other']} vs {c['best_ours']}) | {f(c['pilot_layer_spread_max'], 0)}×, "
            f"{f(c['pilot_head_ratio_max'], 0)}× |"
        )
    if opt_in:
        lines += ["", f"Opt-in methods, on the windows they ran on (`windows`, of the {len(wins)} above), paired with the default "
                  f"({DEFAULT_ROW}) and with the best peer or baseline on each window; `gain` = geo-mean of "
                  "KL(other) / KL(method), `worst` its smallest per-window value:", "",
                  "| method | r | windows | KL | KL default | gain over default (worst) | gain over best other (worst) "
                  "| compress/prefill |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for o in opt_in:
            lines.append(f"| {o['config']} | {o['ratio']} | {len(o['windows'])} | {f(o['kl'])} | "
                         f"{f(o['kl_default'])} | {f(o['gain_over_default'], 2)}× ({f(o['worst_over_default'], 2)}×) "
                         f"| {f(o['gain_over_best_other'], 2)}× ({f(o['worst_over_best_other'], 2)}×) | "
                         f"{f(o['compress_over_prefill'], 0)} |")  # fmt: skip
        lines += ["", "Per window: " + "; ".join(
            f"{o['config']} r={o['ratio']} {w}: {f(o['per_window'][w]['kl'])} (default {f(o['per_window'][w]['default'])}, "
            f"{o['per_window'][w]['best_other']} {f(o['per_window'][w]['best_other_kl'])})"
            for o in opt_in for w in o["windows"])]  # fmt: skip
    full = {x["window"]: x["passkey_full"] for x in rows if x.get("passkey_full") is not None}
    if full:
        lines += ["", f"Pass-key with the full cache (reference): {sum(full.values())}/{len(full)} windows."]
    masked = sorted({x["config"] for x in rows if x.get("entries_masked_not_freed")})
    if masked:
        lines += ["", f"`cache/full` = 1.00 for {', '.join(masked)}: the press masks the dropped entries instead "
                  "of removing them, so it keeps the same fraction of entries in attention but frees no memory."]  # fmt: skip
    lines += memorised_note(flagged)
    if peers_note:
        lines += ["", peers_note]
    if incomplete:
        lines += ["", f"Left out (not every method ran on them yet): {', '.join(incomplete)}."]
    (out / f"paper_{tag}.md").write_text("\n".join(lines) + "\n")
    series = {c: {r: v for r, v in table[c].items() if v is not None} for c in configs}
    kl_vs_ratio(series, f"{args.model}: held-out KL, n={args.context_tokens}", out / f"paper_{tag}.png")
    print("\n".join(lines))
    return summary
