"""Sculpt's optimiser on real heads: the fitted objective and the held-out output error against L-BFGS
evaluations, for a few (layer, KV head) pairs of one window, and the mass options side by side.

    python benchmarks/sculpt.py --model smollm2-135m --window fastmcp_background_tasks@0 --ratio 0.3 \
        --heads 2:0 15:1 28:2 --iters 300 --out benchmarks/results/sculpt_descent_smollm2

Per head: one capture of the window (``--queries``, the paper's ``context`` by default), 20 % of the query
groups held out; Select+Fit (H2O selection, ridge values) as the start; then :func:`kvsculpt.core.methods.
sculpt_head` for each mass option: ``mass_weight`` 0 and 1 with no β, and 0 with β by NNLS. At every
evaluation the current keys' implied values are scored on the held-out queries: relative output error and
mean squared log-mass error. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvsculpt import load_model
from kvsculpt.bench.runner import legacy_config
from kvsculpt.core.attention import attend, fidelity
from kvsculpt.core.fit import nnls_bias, split_heldout
from kvsculpt.core.methods import sculpt_head, sculpt_objective
from kvsculpt.eval.texts import load_text, make_window
from kvsculpt.hf.capture import capture

OPTIONS = {  # name: (mass_weight, β)
    "mass 0": (0.0, "none"),
    "mass 1": (1.0, "none"),
    "β nnls, mass 0": (0.0, "nnls"),
}


def run(args):
    model, tok = load_model(args.model)
    name, start = args.window.split("@")
    w = make_window(tok, load_text(name), args.context_tokens, 8, int(start), name)
    cfg = legacy_config("sculpt", args.queries, ratio=args.ratio, heldout=0.2)
    cap = capture(model, w.context, cfg, tokenizer=tok)
    held = split_heldout(cap.groups, cfg.heldout, cfg.seed)
    select = cfg.solver
    m = max(1, round(args.ratio * cap.n))
    rows = []
    for spec in args.heads:
        li, h = (int(x) for x in spec.split(":"))
        K, V, Q = (t[h : h + 1].float() for t in (cap.keys[li], cap.values[li], cap.queries[li]))
        Qf, Qh = Q[:, ~held], Q[:, held]
        idx = select.select(K, V, Qf, m, cap.scale)
        for opt, (mu, beta) in OPTIONS.items():
            row = trace_head(K[0], V[0], Qf[0], Qh[0], idx[0], cap.scale, select.lam, mu, beta, args.iters)
            rows.append({"layer": li, "head": h, "option": opt, "m": m, "fit_queries": int(Qf.shape[1]),
                         "heldout_queries": int(Qh.shape[1]), **row})  # fmt: skip
            print(f"layer {li} head {h} {opt}: objective {row['start']:.4g} → {row['end']:.4g} in "
                  f"{row['evaluations']} evaluations ({row['seconds']:.1f} s); held-out error "
                  f"{row['heldout_start']:.4g} → {row['heldout_at_best']:.4g}", flush=True)  # fmt: skip
    write(rows, args)


def trace_head(K, V, Qf, Qh, idx, scale, lam, mass_weight, beta, iters) -> dict:
    """One head (K, V ``[n, d]``, fit and held-out queries ``[N, d]``, kept entries ``idx [m]``): Sculpt from
    Select+Fit, with the held-out errors of every evaluated point."""
    O, z = attend(Qf, K, V, scale)
    Kc, prior = K[idx], V[idx]
    bias = nnls_bias(Qf[None], Kc[None], z[None], scale)[0] if beta == "nnls" else None
    curve = []

    def heldout(evaluation, objective, keys, b):
        with torch.no_grad():
            vals = sculpt_objective(Qf, O, z, keys, prior, b, scale, lam, mass_weight)[1]
            err, mass = fidelity(Qh, K, V, keys, vals, b, scale)
        curve.append({"evaluation": evaluation, "objective": objective, "heldout_rel_mse": float(err),
                      "heldout_mass_err": float(mass)})  # fmt: skip

    t0 = time.perf_counter()
    *_, stats = sculpt_head(Qf, O, z, Kc, prior, bias, scale, lam, iters, mass_weight, on_eval=heldout)
    best = min(curve, key=lambda c: c["objective"])
    return {"seconds": time.perf_counter() - t0, **stats, "heldout_start": curve[0]["heldout_rel_mse"],
            "heldout_at_best": best["heldout_rel_mse"], "heldout_min": min(c["heldout_rel_mse"] for c in curve),
            "mass_start": curve[0]["heldout_mass_err"], "mass_at_best": best["heldout_mass_err"],
            "curve": curve}  # fmt: skip


def write(rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = {k: v for k, v in vars(args).items() if k != "out"}
    out.with_suffix(".json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    cmd = "python benchmarks/sculpt.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
    )
    lines = [f"# Sculpt's L-BFGS on real heads: {args.model}, {args.window}, n={args.context_tokens}, r={args.ratio}",
             "", f"Command: `{cmd}`", "",
             "`objective`: the fitted (in-sample) objective; `held-out`: relative output error on the 20 % of "
             "query groups the fit never sees, at the start (Select+Fit) and at the best fitted point; "
             "`mass`: held-out mean squared log-mass error.", "",
             "| layer:head | option | evaluations | objective start → end | held-out start → end (min) | "
             "mass start → end | seconds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['layer']}:{r['head']} | {r['option']} | {r['evaluations']} | {r['start']:.4g} → {r['end']:.4g} "
            f"| {r['heldout_start']:.4g} → {r['heldout_at_best']:.4g} ({r['heldout_min']:.4g}) "
            f"| {r['mass_start']:.3g} → {r['mass_at_best']:.3g} | {r['seconds']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    heads = list(dict.fromkeys((r["layer"], r["head"]) for r in rows))
    fig, axes = plt.subplots(2, len(heads), figsize=(4 * len(heads), 6), squeeze=False)
    for j, (li, h) in enumerate(heads):
        for r in (r for r in rows if (r["layer"], r["head"]) == (li, h)):
            ev = [c["evaluation"] for c in r["curve"]]
            axes[0][j].plot(ev, [c["objective"] for c in r["curve"]], label=r["option"])
            axes[1][j].plot(ev, [c["heldout_rel_mse"] for c in r["curve"]], label=r["option"])
        axes[0][j].set_title(f"layer {li}, KV head {h}")
        axes[0][j].set_yscale("log")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("L-BFGS evaluations")
    axes[0][0].set_ylabel("fitted objective")
    axes[1][0].set_ylabel("held-out relative output error")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}.{{json,md,png}}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", default="fastmcp_background_tasks@0", help="text@token offset")
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--queries", default="context", help="reference-query sources (default: the paper's)")
    p.add_argument("--heads", nargs="+", default=["2:0", "15:1", "28:2"], help="layer:KV head")
    p.add_argument("--iters", type=int, default=300, help="L-BFGS iterations per head")
    p.add_argument("--out", default="benchmarks/results/sculpt_descent_smollm2")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
