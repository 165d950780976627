"""Benchmark runner: configurations × windows × ratios, resumable, plus the paper-reproduction report.

A configuration is ``(method name, query source, options)``; options may hold method fields, capture options
(``max_queries``, ``self_samples``, …) and budget options (``allocation``, ``scope``). Configurations that
share a query source and capture options share one capture per window. Every finished run is appended to a
JSONL file, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .capture import capture, prefill, split_heldout
from .compress import compress_captured
from .evaluate import (
    continuation_logits,
    kl_per_position,
    looks_memorised,
    ngram_overlap,
    passkey_context,
    passkey_found,
    score,
    teacher,
    text_index,
    windows,
)
from .solvers import make_method

CAPTURE_OPTIONS = ("max_queries", "self_samples", "self_length", "temperature", "top_p")
COMPRESS_OPTIONS = ("allocation", "scope", "on_policy", "heldout")  # compress_captured options
EVICTION = ("h2o", "snapkv", "tova", "streaming-llm", "knorm")


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))


def load_rows(jsonl: Path) -> dict:
    done = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["window"], r["config"], r["ratio"])] = r
    return done


def split_memorised(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows of windows that do not look memorised, and ``{window: (teacher NLL, max self 4-gram overlap)}``
    of those that do (:func:`~kvsculpt.evaluate.looks_memorised`), to be reported apart."""
    stats = {}
    for r in rows:
        if "teacher_nll" in r:
            nll, ov = stats.get(r["window"], (r["teacher_nll"], None))
            o = r.get("self_ngram_overlap")
            stats[r["window"]] = (nll, ov if o is None else max(o, ov or 0.0))
    flagged = {w: v for w, v in stats.items() if looks_memorised(*v)}
    return [r for r in rows if r["window"] not in flagged], flagged


def memorised_note(flagged: dict) -> list[str]:
    if not flagged:
        return []
    return ["", "Reported apart, as they look memorised (teacher NLL < 0.5 or self-sample 4-gram overlap ≥ 0.3): "
            + ", ".join(f"{w} (NLL {a:.2f}, overlap {b or 0:.2f})" for w, (a, b) in flagged.items())
            + ". Their rows are in the JSON."]  # fmt: skip


def _split_options(opts: dict):
    cap = {k: v for k, v in opts.items() if k in CAPTURE_OPTIONS}
    alloc = {k: v for k, v in opts.items() if k in COMPRESS_OPTIONS}
    method = {k: v for k, v in opts.items() if k not in CAPTURE_OPTIONS + COMPRESS_OPTIONS}
    return cap, alloc, method


def _pilot_spread(info: dict) -> dict:
    """Pilot relative MSE spread (at the uniform budget): max/min across layers, max head ratio in a layer."""
    pilot = info.get("pilot")
    if not pilot or "pilot_errors" not in pilot:
        return {}
    errs = torch.tensor(pilot["pilot_errors"][pilot["pilot_budgets"].index(pilot["uniform_budget"])])
    per_layer = errs.mean(1)
    heads = errs.max(1).values / errs.min(1).values.clamp_min(1e-12)
    return {
        "pilot_layer_spread": float(per_layer.max() / per_layer.min().clamp_min(1e-12)),
        "pilot_head_ratio": float(heads.max()),
        "pilot_seconds": pilot["seconds"],
    }


def heldout_self_sample(cap, heldout: float = 0.2, seed: int = 0):
    """Tokens ``[1, L]`` of one self sample that :func:`~kvsculpt.compress.compress_captured` holds out from
    fitting (same split), or None: KL on it measures fidelity on the model's own distribution."""
    if cap.samples is None or "self_groups" not in cap.info:
        return None
    start, end = cap.info["self_groups"]
    held = torch.unique(cap.groups[split_heldout(cap.groups, heldout, seed)])
    held = [int(g) - start for g in held if start <= int(g) < end]
    return cap.samples[held[0]][None] if held else None


def passkey_full_cache(model, tok, pk_ids, key) -> bool:
    """Whether the model finds the pass key with its full, uncompressed cache (the reference for pass-key rows)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=pk_ids, past_key_values=cache, use_cache=True)
    return passkey_found(model, tok, cache, pk_ids.shape[1], key)


def run_grid(
    model,
    tok,
    model_name,
    wins,
    grid,
    ratios,
    jsonl,
    max_queries=4096,
    passkey=False,
    passkey_ratios=None,
    heldout_self_kl=True,
) -> list[dict]:
    """Run every (window, config, ratio) not yet in ``jsonl``; return all rows for these windows and configs.

    ``passkey``: also compress a pass-key version of each window's text with the same config, at the ratios in
    ``passkey_ratios`` (default: all), and record whether the key is retrieved afterwards (question asked
    only after compression). Each such row also carries ``passkey_full``, the full cache's result.
    ``heldout_self_kl``: also score KL on a held-out self sample (one more forward per run).
    """
    passkey_ratios = set(ratios if passkey_ratios is None else passkey_ratios)
    jsonl = Path(jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = load_rows(jsonl)
    groups = defaultdict(list)
    for name, (_, src, opts) in grid.items():
        groups[(src, tuple(sorted(_split_options(opts)[0].items())))].append(name)
    wid = {id(w): f"{w.name}@{w.start}" for w in wins}
    todo = sum((wid[id(w)], c, r) not in done for w in wins for c in grid for r in ratios)
    bar = tqdm(total=todo, desc=f"bench {model_name}", unit="run")
    with open(jsonl, "a") as f:
        for w in wins:
            if all((wid[id(w)], c, r) in done for c in grid for r in ratios):
                continue
            ref = teacher(model, w)
            pk_full = None
            if passkey:
                from .evaluate import load_text

                pk_ids, pk_key = passkey_context(tok, load_text(w.name), w.context.shape[1], seed=w.start)
                pk_full = passkey_full_cache(model, tok, pk_ids, pk_key)
            for (src, cap_opts), names in groups.items():
                if all((wid[id(w)], c, r) in done for c in names for r in ratios):
                    continue
                kw = {
                    "max_queries": max_queries,
                    "tokenizer": tok,
                    "keep_context_queries": True,
                    **dict(cap_opts),
                }
                cap = capture(model, w.context, src, **kw)
                held_sample = heldout_self_sample(cap) if heldout_self_kl else None
                if held_sample is not None:
                    full, *_ = prefill(model, w.context)
                    sample_teacher = continuation_logits(model, full, held_sample, cap.n)
                pk_cap = (
                    capture(model, pk_ids, src, **kw) if passkey and passkey_ratios & set(ratios) else None
                )
                for name in names:
                    method, _, opts = grid[name]
                    _, alloc, method_opts = _split_options(opts)
                    for r in ratios:
                        if (wid[id(w)], name, r) in done:
                            continue
                        solver = make_method(method, **method_opts)
                        t0 = time.perf_counter()
                        cache = compress_captured(model, cap, r, solver, progress=False, **alloc)
                        solve_s = time.perf_counter() - t0
                        res = score(model, cache, w, ref)
                        if held_sample is not None:
                            student = continuation_logits(model, cache.fork(), held_sample, cap.n)
                            res["kl_heldout_self_sample"] = float(
                                kl_per_position(sample_teacher, student).mean()
                            )
                        pk = None
                        if pk_cap is not None and r in passkey_ratios:
                            pk_cache = compress_captured(model, pk_cap, r, solver, progress=False, **alloc)
                            pk = passkey_found(model, tok, pk_cache, pk_ids.shape[1], pk_key)
                        stats = cache.info["stats"]["heldout_rel_mse"]
                        n_entries = cap.n * len(cache.layers) * len(cache.layers[0].lengths)
                        row = {
                            "window": wid[id(w)], "config": name, "ratio": r, "method": repr(solver),
                            "queries": src, "capture": dict(cap_opts), "allocation": alloc, "model": model_name,
                            **res, "teacher_nll": ref.nll,
                            "self_ngram_overlap": None if cap.samples is None else ngram_overlap(
                                cap.samples, w.continuation),
                            "heldout_rel_mse": sum(map(sum, stats)) / sum(map(len, stats)) if any(stats) else None,
                            "prefill_seconds": ref.prefill_seconds, "query_seconds": cap.query_seconds,
                            "solve_seconds": solve_s,
                            "compress_seconds": cap.prefill_seconds + cap.query_seconds + solve_s,
                            "compress_over_prefill": (cap.prefill_seconds + cap.query_seconds + solve_s)
                            / ref.prefill_seconds,
                            "cache_over_full": cache.nbytes()
                            / (n_entries * 2 * cache.layers[0].block_keys.shape[1]
                               * cache.layers[0].block_keys.element_size()),
                            "cache_over_logical": cache.nbytes() / cache.logical_nbytes(),
                            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                            "passkey": pk, "passkey_full": pk_full if pk is not None else None,
                            **_pilot_spread(cache.info),
                        }  # fmt: skip
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        done[(wid[id(w)], name, r)] = row
                        bar.update()
                        bar.set_postfix_str(f"{name} r={r} kl={res['kl']:.4f}")
    bar.close()
    return [done[k] for k in done if k[0] in wid.values() and k[1] in grid and k[2] in ratios]


def run_peers(model_name, wins, ratios, jsonl, tok, passkey=False, passkey_ratios=None) -> list[dict]:
    """kvpress presses on the same windows (in a subprocess, see :mod:`kvsculpt.peers`); resumable."""
    from . import peers
    from .evaluate import PASSKEY_QUESTION, load_text
    from .models import encode

    done = load_rows(Path(jsonl))
    rows = []
    with open(jsonl, "a") as f:
        for w in tqdm(wins, desc="kvpress peers", unit="window"):
            wid = f"{w.name}@{w.start}"
            have = [done[k] for k in done if k[0] == wid and k[1].startswith("kvpress.") and k[2] in ratios]
            if len(have) == len(ratios) * len(peers.PRESSES):
                rows += have
                continue
            pk = None
            if passkey:
                pk_ids, key = passkey_context(tok, load_text(w.name), w.context.shape[1], seed=w.start)
                pk = (pk_ids, encode(tok, PASSKEY_QUESTION), key)
            for row in peers.run_presses(
                model_name, w.context, w.continuation, ratios, passkey=pk, passkey_ratios=passkey_ratios
            ):
                row.update(window=wid, config=row["method"], model=model_name, queries="(kvpress)")
                f.write(json.dumps(row) + "\n")
                f.flush()
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ paper
PAPER = {"sculpt_vs_select_fit": "3.5–4.1×", "adaptive_vs_uniform": "1.3×", "layer_spread": "100×",
         "head_ratio": "467×"}  # fmt: skip

PAPER_GRID = {
    "Select+Fit": ("select-fit", "self+context", {}),
    "Sculpt": ("sculpt", "self+context", {}),
    "Sculpt adaptive (curves)": ("sculpt", "self+context", {"allocation": "curves"}),
    "Select+Fit adaptive (curves)": ("select-fit", "self+context", {"allocation": "curves"}),
    # KVzip's selection (peak attention while the model repeats the context; all heads ranked together),
    # then our value fit; every repeat query is used (none held out: a held-out block's keys would be lost)
    "KVzip-fit (repeat, global)": ("kvzip-fit", "repeat", {"allocation": "global", "heldout": 0.0}),
    "H2O": ("h2o", "context", {}),
    "SnapKV": ("snapkv", "context", {}),
    "TOVA": ("tova", "context", {}),
    "StreamingLLM": ("streaming-llm", "context", {}),
    "Knorm": ("knorm", "context", {}),
}


KVPRESS_DUPLICATES = ("SnapKV", "StreamingLLM", "Knorm")


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


def paper(args) -> dict:
    """``kvsculpt bench paper``: our methods and kvpress peers on the same windows and budgets; writes
    ``paper_<model>.{json,md,png}`` in ``args.out``."""
    from . import peers
    from .models import load_model

    tag = Path(args.model).name
    out = Path(args.out)
    jsonl = out / f"paper_{tag}.jsonl"
    use_peers = args.peers and peers.available()
    grid = {k: v for k, v in PAPER_GRID.items() if not args.methods or k in args.methods}
    if (
        getattr(args, "quick", False) and use_peers
    ):  # kvpress runs the same presses (equal KL: kvpress_parity.jsonl)
        grid = {k: v for k, v in grid.items() if k not in KVPRESS_DUPLICATES}
    report_only = getattr(args, "report_only", False)  # rewrite the report from the cached rows; runs nothing
    if report_only and not jsonl.exists():
        raise FileNotFoundError(f"{jsonl}: no cached results to report (run without --report-only first)")
    check_cached_setting(jsonl, {"context_tokens": args.context_tokens,
                                 "continuation_tokens": args.continuation_tokens})  # fmt: skip
    if report_only:
        rows = [r for (_, config, ratio), r in load_rows(jsonl).items()
                if (config in grid or config.startswith("kvpress.")) and ratio in args.ratios]  # fmt: skip
        return write_paper_report(rows, args, out, tag, peers_note=None if use_peers else _peer_note(args))
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    texts = args.texts or [k for k, v in text_index().items() if not v["memorised"]]
    wins = windows(tok, texts, args.context_tokens, args.continuation_tokens)[: args.docs]
    pk_ratios = args.passkey_ratios or [min(args.ratios, key=lambda r: abs(r - 0.3))]
    rows = []
    for w in wins:  # window by window, so that an interrupted run has complete windows to report
        rows += run_grid(model, tok, args.model, [w], grid, args.ratios, jsonl, passkey=args.passkey,
                         passkey_ratios=pk_ratios, heldout_self_kl=False)  # fmt: skip
        if use_peers:
            rows += run_peers(args.model, [w], args.ratios, jsonl, tok, args.passkey, pk_ratios)
    summary = write_paper_report(rows, args, out, tag, peers_note=None if use_peers else _peer_note(args))
    return summary


def _peer_note(args) -> str:
    return (
        "kvpress peers not run ("
        + ("--no-peers" if not args.peers else "kvpress not installed: pip install .[peers]")
        + ")"
    )


def write_paper_report(rows, args, out: Path, tag: str, peers_note=None) -> dict:
    from .plots import kl_vs_ratio

    out.mkdir(parents=True, exist_ok=True)
    all_rows = rows
    rows, flagged = split_memorised(rows)
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

    def paired(a, b, ratio):
        common = [w for (c, r, w) in kl if c == a and r == ratio and (b, ratio, w) in kl]
        return geomean(kl[(a, ratio, w)] / kl[(b, ratio, w)] for w in common) if common else None

    def mean(c, ratio, key):
        xs = [r[key] for r in rows if r["config"] == c and r["ratio"] == ratio and r.get(key) is not None]
        return sum(map(float, xs)) / len(xs) if xs else None

    table = {c: {r: gm(c, r) for r in args.ratios} for c in configs}
    comparisons = []
    for r in args.ratios:
        ours = [
            c
            for c in configs
            if not c.startswith("kvpress.")
            and c.split(" ")[0] not in ("H2O", "SnapKV", "TOVA", "StreamingLLM", "Knorm")
        ]
        others = [c for c in configs if c not in ours and table[c][r] is not None]
        best_other = min(others, key=lambda c: table[c][r]) if others else None
        best_ours = min(ours, key=lambda c: table[c][r]) if ours else None
        spread = [x for x in rows if x["ratio"] == r and "pilot_layer_spread" in x]
        comparisons.append({
            "ratio": r,
            "select_fit_over_sculpt": paired("Select+Fit", "Sculpt", r),
            "sculpt_over_sculpt_adaptive": paired("Sculpt", "Sculpt adaptive (curves)", r),
            "select_fit_over_adaptive": paired("Select+Fit", "Select+Fit adaptive (curves)", r),
            "best_other": best_other, "best_ours": best_ours,
            "best_other_over_best_ours": paired(best_other, best_ours, r) if best_other and best_ours else None,
            "pilot_layer_spread_max": max((x["pilot_layer_spread"] for x in spread), default=None),
            "pilot_head_ratio_max": max((x["pilot_head_ratio"] for x in spread), default=None),
        })  # fmt: skip
    wins = sorted({r["window"] for r in rows})
    nll = {w: next(r["teacher_nll"] for r in rows if r["window"] == w and "teacher_nll" in r) for w in wins
           if any("teacher_nll" in r for r in rows if r["window"] == w)}  # fmt: skip
    summary = {"args": {k: v for k, v in vars(args).items() if k not in ("func",)}, "kl_geomean": table,
               "comparisons": comparisons, "teacher_nll": nll, "paper": PAPER,
               "looks_memorised": flagged, "rows": all_rows}  # fmt: skip
    (out / f"paper_{tag}.json").write_text(json.dumps(summary, indent=1))
    f = lambda x, p=4: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [
        f"# KVSculpt paper table on {args.model}: n={args.context_tokens}, T={args.continuation_tokens}",
        "",
        f"Command: `{getattr(args, 'command_line', 'kvsculpt bench paper')}`",
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
