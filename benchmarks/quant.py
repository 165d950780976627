"""Quality per byte: KL against the bytes of the stored context, for fewer entries × fewer bits, with peers.

    python benchmarks/quant.py --model smollm2-135m --out benchmarks/results/quant_smollm2

Per window: the default (``kvzip-v`` on ``self+repeat``) at each kept ratio and ``kv_bits`` (4 and 2 bits also
without the quantisation-aware value refit), and, in a kvpress subprocess, transformers' ``QuantizedCache``
(HQQ backend; quanto too for the full cache) under the full cache and under kvpress's presses. Bytes are
counted the same way for everyone, relative to the full cache stored at 16 bits (2 bytes an element): a
quantised point costs its codes plus an fp16 scale and minimum per group of 64 (ours: exactly what
``CompressedCache.nbytes()`` stores, padding included; the peers': the formula, as their backends' own layouts
differ); a 16-bit point costs 2 bytes an element (the models run in fp32 here; bf16 storage is what a GPU user
keeps). KVzipPress masks entries instead of freeing them: it is counted at its nominal kept fraction.

Writes ``OUT.jsonl`` (resumable), ``OUT.json``, ``OUT.md`` and ``OUT.png`` (log-log, the frontier marked).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from kvsculpt import CompressConfig, load_model
from kvsculpt.bench import peers
from kvsculpt.bench.runner import RowFile, geomean, grid_parser, results_jsonl, windows_by_id
from kvsculpt.cache import quantize_cache
from kvsculpt.compress import compress_captured
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.hf.capture import capture

# report windows of the fast-default issue (offsets 1152 and 2304) that were not flagged as memorised there
WINDOWS = ["fastmcp_background_tasks@1152", "fastmcp_feature_program@1152", "openai_agents_human_in_the_loop@1152",
           "openai_agents_tar_utils@1152", "fastmcp_background_tasks@2304", "openai_agents_tar_utils@2304"]  # fmt: skip
PRESSES = ("KVzipPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress")
OVERHEAD_BITS = 32 / 64  # an fp16 scale and an fp16 minimum per group of 64 elements


# our settings: label → CompressConfig changes (keys lose more than values at the same width: "k8v4" keeps
# 8-bit keys beside 4-bit values); "quantise_after": the cache made at 16 bits, then quantised to that width
# (the refine's baseline: refined at 16 bits, quantised after, against refined through the codes)
REFINE = {"refine": "kl", "refine_steps": 60}
SETTINGS = {"b16": {}, "b8": {"kv_bits": 8}, "b4": {"kv_bits": 4}, "b4 no-refit": {"kv_bits": 4, "kv_refit": False},
            "k8v4": {"kv_bits": 4, "key_bits": 8}, "b2": {"kv_bits": 2},
            "b4 g32": {"kv_bits": 4, "kv_group": 32}, "b4 g16": {"kv_bits": 4, "kv_group": 16},
            "b16 refine": REFINE, "b4 refine": {"kv_bits": 4, **REFINE},
            "b4 refine-after": {"quantise_after": 4, **REFINE}}  # fmt: skip
FAST = [
    label for label, c in SETTINGS.items() if "refine" not in c and "kv_group" not in c
]  # no refine, groups of 64


def point_name(row) -> str:
    if row["method"].startswith("kvsculpt"):
        label = row["config"].split(" ", 1)[1]
        return "kvsculpt default" + {
            "b4 no-refit": " no-refit",
            "k8v4": " 8-bit keys",
            "b4 g32": " groups of 32",
            "b4 g16": " groups of 16",
            "b16 refine": " refined",
            "b4 refine": " refined",
            "b4 refine-after": " refined, quantised after",
        }.get(label, "")
    return row["method"] + ("" if row.get("quant") is None else f" + {row['quant'][:-1]}")


def run(args):
    out, jsonl = Path(args.out), Path(args.rows) if args.rows else results_jsonl(args.out)
    if args.report_only:
        return report(rows_of(jsonl, args.windows), args, out)
    done = RowFile(jsonl)
    model, tok = load_model(args.model)
    wins = windows_by_id(tok, args.windows, args.context_tokens, args.continuation_tokens)
    base = CompressConfig()
    todo_all = [(r, label) for r in args.ratios for label in args.settings]
    with done:
        for w in tqdm(wins, desc="windows", unit="window"):
            todo = [(r, label) for r, label in todo_all if (w.id, f"kvsculpt.default {label}", r) not in done]
            if todo:
                ref = teacher(model, w)
                cap = capture(model, w.context, base, tokenizer=tok)
                made = {}  # config repr → its cache, for this window
                for r, label in tqdm(todo, desc=w.id, leave=False):
                    changes = dict(SETTINGS[label])
                    after = changes.pop("quantise_after", None)
                    cfg = base.replace(ratio=r, **changes)
                    if repr(cfg) not in made:  # "b4 refine-after" quantises the cache of "b16 refine"
                        made[repr(cfg)] = compress_captured(model, cap, cfg, progress=False, tokenizer=tok)
                    cache = made[repr(cfg)]
                    if after:
                        cache = quantize_cache(cache, after, cfg.kv_group)
                    entry16 = (
                        2 * cache.layers[0].block_keys.shape[1] * 2
                    )  # a key and a value at 2 bytes an element
                    stored = cache.nbytes() if cache.layers[0].quantized else cache.kept_entries() * entry16
                    row = {"window": w.id, "config": f"kvsculpt.default {label}", "ratio": r, "method": "kvsculpt.default",
                           "kv_bits": cache.kv_bits, "key_bits": cache.key_bits, "kv_refit": cfg.kv_refit,
                           "compress_config": repr(cfg) + (f" then quantised to {after} bits" if after else ""),
                           "kl": score(model, cache, w, ref)["kl"], "refine_seconds": cache.info.get("refine_seconds"),
                           "bytes_over_full16": stored / (cache.full_entries() * entry16), "model": args.model,
                           "command": command()}  # fmt: skip
                    done.add(row)
            if args.no_peers or not peers.available():
                continue
            jobs = [([("hqq", 8), ("hqq", 4)], PRESSES),  # presses on the HQQ cache
                    ([("hqq", 2)] + [("quanto", b) for b in (4, 2)], ())]  # full caches only  # fmt: skip
            for quant, presses in jobs:
                # the ratios some press lacks (a grid widened later gets its peers too); the full caches once
                ratios = [r for r in args.ratios
                          if any((w.id, f"kvpress.{p} {q}{b}", r) not in done for p in presses for q, b in quant)]  # fmt: skip
                if not ratios and all((w.id, f"full {q}{b}", 1.0) in done for q, b in quant):
                    continue
                for row in peers.run_presses(
                    args.model, w.context, w.continuation, ratios, presses, quant=quant
                ):
                    if (w.id, f"{row['method']} {row['quant']}", row["ratio"]) in done:
                        continue  # a full cache measured before
                    row.update(window=w.id, config=f"{row['method']} {row['quant']}", model=args.model, command=command(),
                               bytes_over_full16=row["ratio"] * (row["kv_bits"] + OVERHEAD_BITS) / 16)  # fmt: skip
                    done.add(row)
    return report(rows_of(jsonl, args.windows), args, out)


def rows_of(jsonl, windows) -> list[dict]:
    """The rows of ``jsonl`` on ``windows`` (the report covers the windows asked for)."""
    return [r for r in RowFile(jsonl).values() if r["window"] in set(windows)]


def command() -> str:
    return "python " + shlex.join(a for a in sys.argv if a != "--report-only")


def frontier(points):
    """The points no other point beats on both bytes and KL (lower is better on both), by bytes."""
    best, out = math.inf, []
    for p in sorted(points, key=lambda p: (p["bytes"], p["kl"])):
        if p["kl"] < best:
            out.append(p)
            best = p["kl"]
    return out


def report(rows, args, out: Path):
    if not rows:
        raise SystemExit(
            f"quant.py: error: no rows on the windows asked for in {args.rows or results_jsonl(args.out)}"
        )
    wins = sorted({r["window"] for r in rows})
    by = defaultdict(dict)
    for r in rows:
        by[(point_name(r), r["ratio"], r["kv_bits"])][r["window"]] = r
    points = []
    for (name, ratio, bits), per in sorted(by.items()):
        if set(per) != set(wins):
            continue  # only points measured on every window
        kls = [per[w]["kl"] for w in wins]
        points.append({"name": name, "ratio": ratio, "bits": bits, "kl": geomean(kls), "worst_kl": max(kls),
                       "bytes": sum(per[w]["bytes_over_full16"] for w in wins) / len(wins)})  # fmt: skip
    front = frontier(points)
    on_front = {(p["name"], p["ratio"], p["bits"]) for p in front}
    ours = [p for p in points if p["name"].startswith("kvsculpt")]
    lines = [f"# Quality per byte: {args.model}, n = {args.context_tokens}, T = {args.continuation_tokens}", "",
             "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", command()) for r in rows)), "",
             f"Windows ({len(wins)}): {', '.join(wins)}. KL = geo-mean over the windows of the KL on each window's real "
             "continuation (nats/token); `worst` = the largest. `bytes` = the stored context over the full cache at 16 bits "
             "(see the script's docstring for how each is counted). `*` = on the frontier (no point has both fewer bytes "
             "and a lower KL).", "",
             "| point | r | bits | bytes | KL | worst | frontier |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in sorted(points, key=lambda p: p["bytes"]):
        star = "*" if (p["name"], p["ratio"], p["bits"]) in on_front else ""
        lines.append(
            f"| {p['name']} | {p['ratio']} | {p['bits']} | {p['bytes']:.4f} | {p['kl']:.4f} | {p['worst_kl']:.4f} | {star} |"
        )
    # at each byte budget: our best point against each peer's best point within it
    lines += ["", "At each byte budget (the bytes of each of our frontier points): our best KL within it, and each peer "
              "family's best KL within it (– where the peer has no point that small).", ""]  # fmt: skip
    families = sorted({p["name"] for p in points if not p["name"].startswith("kvsculpt")})
    lines += ["| budget | ours |" + "".join(f" {f} |" for f in families), "|---" * (len(families) + 2) + "|"]
    for p in frontier(ours):
        cells = []
        for fam in families:
            within = [q["kl"] for q in points if q["name"] == fam and q["bytes"] <= p["bytes"] * 1.0001]
            cells.append("–" if not within else f"{min(within):.4f}")
        lines.append(f"| {p['bytes']:.4f} | {p['kl']:.4f} |" + "".join(f" {c} |" for c in cells))
    # 4 bits against 16 at the same r
    lines += [
        "",
        "4 bits against 16 at the same r (ours): KL ratio and bytes ratio (groups of 64 unless named).",
        "",
    ]
    for r in sorted({p["ratio"] for p in ours}):
        a = next(
            (p for p in ours if p["ratio"] == r and p["bits"] == 16 and p["name"] == "kvsculpt default"), None
        )
        for group in ("", " groups of 32", " groups of 16"):
            name = "kvsculpt default" + group
            b = next((p for p in ours if p["ratio"] == r and p["bits"] == 4 and p["name"] == name), None)
            if a and b:
                lines.append(f"- r = {r}{group and ',' + group}: KL {b['kl'] / a['kl']:.2f}× the 16-bit point's, at "
                             f"{b['bytes'] / a['bytes']:.3f} of its bytes ({b['bytes'] / a['bytes'] / 2:.3f} of the fp32 "
                             "cache it replaces here)")  # fmt: skip
    # the refine at 4 bits: through the codes, against quantised after a 16-bit refine and the fast 4-bit cache,
    # on the windows where all four ran (the refine is run on fewer windows than the rest)
    four = [("kvsculpt default", 4), ("kvsculpt default refined, quantised after", 4), ("kvsculpt default refined", 4),
            ("kvsculpt default refined", 16)]  # fmt: skip
    refined = sorted({r for (name, r, bits) in by if (name, bits) == four[2]})
    if refined:
        lines += ["", "The refine (60 steps) at 4 bits, on the windows where it ran: KL of the fast 4-bit cache, of the "
                  "16-bit refine quantised after, of the refine through the codes (straight-through), and of the 16-bit "
                  "refine (geo-means over those windows; `worst` = the smallest per-window gain of going through the "
                  "codes over quantising after).", "",
                  "| r | windows | 4-bit fast | refined, quantised after | refined through the codes | 16-bit refined | "
                  "through the codes: gain over quantised after (worst) | gain over 4-bit fast |", "|---" * 8 + "|"]  # fmt: skip
        for r in refined:
            per = [by.get((name, r, bits), {}) for name, bits in four]
            common = sorted(set.intersection(*(set(p) for p in per)))
            if not common:
                continue
            kl = [geomean(p[w]["kl"] for w in common) for p in per]
            worst = min(per[1][w]["kl"] / per[2][w]["kl"] for w in common)
            lines.append(f"| {r} | {len(common)} | " + " | ".join(f"{x:.4f}" for x in kl)
                         + f" | {kl[1] / kl[2]:.2f}× ({worst:.2f}×) | {kl[0] / kl[2]:.2f}× |")  # fmt: skip
    (out.parent / f"{out.name}.json").write_text(
        json.dumps({"points": points, "frontier": front, "windows": wins}, indent=1)
    )
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in sorted({p["name"] for p in points}):
        ps = sorted((p for p in points if p["name"] == name), key=lambda p: p["bytes"])
        ax.scatter([p["bytes"] for p in ps], [p["kl"] for p in ps], label=name, s=18,
                   marker="o" if name.startswith("kvsculpt") else "x")  # fmt: skip
    ax.plot([p["bytes"] for p in front], [p["kl"] for p in front], "k--", lw=1, label="frontier")
    ax.set(xscale="log", yscale="log", xlabel="bytes / full cache at 16 bits", ylabel="KL (nats/token, geo-mean)",
           title=f"{args.model}: quality per byte ({len(wins)} windows)")  # fmt: skip
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}.png", dpi=120)
    print("\n".join(lines))


def main():
    ap = grid_parser(__doc__.split("\n")[0], ratios=[0.1, 0.2, 0.3, 0.5], out="benchmarks/results/quant_smollm2",
                     windows=WINDOWS)  # fmt: skip
    ap.add_argument("--settings", nargs="+", default=FAST, choices=list(SETTINGS),
                    help="our settings (b16: not quantised; k8v4: 8-bit keys, 4-bit values; '... refine': refined "
                         f"end to end, {REFINE['refine_steps']} steps, through the codes or quantised after; "
                         "default: %(default)s)")  # fmt: skip
    ap.add_argument("--no-peers", action="store_true", help="only our settings (the peers' rows are not run)")
    ap.add_argument("--rows", help="the results JSONL to read and extend (default: OUT.jsonl); e.g. a report on "
                    "fewer windows, written apart")  # fmt: skip
    run(ap.parse_args())


if __name__ == "__main__":
    main()
