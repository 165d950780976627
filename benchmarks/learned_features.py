"""Which prefill features predict the default's entry scores: a feature study for the learned scorer.

    python benchmarks/learned_features.py dump --model smollm2-135m --texts fastmcp_changelog --per-text 24 \
        --out /tmp/lf/train                                    # resumable, one file per window
    python benchmarks/learned_features.py dump --model smollm2-135m --texts fastmcp_background_tasks \
        fastmcp_feature_program markitdown_core stdlib_textwrap --per-text 1 --out /tmp/lf/val
    python benchmarks/learned_features.py fit --train /tmp/lf/train --val /tmp/lf/val \
        --out benchmarks/results/learned_features_smollm2

Per window (never an evaluation window): the default's global entry scores (the targets, as ``train-scorer``
takes them) and what one prefill gives: each layer's attention input, the key and value norms, the attention of
the context's last 64 queries (SnapKV's window), the position. ``fit`` fits one ridge model per feature set on
the training windows and reports, on the validation windows, R² of the log scores and the recall of the
default's global selection at r = 0.1 and 0.3 (the share of the entries the default keeps that the prediction
keeps too): the figure the learned method's KL follows. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from kvsculpt.bench.runner import results_file
from kvsculpt.compress import captured_entry_scores
from kvsculpt.config import CompressConfig
from kvsculpt.core import learned as lin
from kvsculpt.core.budget import Global
from kvsculpt.eval.texts import windows
from kvsculpt.hf.attention import attention_inputs, capture_queries
from kvsculpt.hf.capture import capture, pool_gqa
from kvsculpt.hf.decode import prefill
from kvsculpt.hf.dims import model_dims
from kvsculpt.hf.models import load_model


@torch.inference_mode()
def dump(args):
    model, tok = load_model(args.model)
    dims, cfg = model_dims(model), CompressConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for w in windows(tok, args.texts, args.context_tokens, 1, per_text=args.per_text):
        path = out / f"{w.id.replace('/', '_')}.pt"
        if path.exists():
            continue
        t0 = time.perf_counter()
        cap = capture(model, w.context, cfg, tokenizer=tok, progress=False)
        scores = captured_entry_scores(cap, cfg)
        del cap
        hidden: dict = {}
        with capture_queries(model, lin.WINDOW) as qs, attention_inputs(model, partial(keep_half, hidden)):
            cache, _, _ = prefill(model, w.context)
        win = [lin.window_attention(pool_gqa(qs[li][0].float(), dims.kv_heads), cache.layers[li].keys[0], dims.scale,
                                    dims.groups) for li in range(dims.layers)]  # fmt: skip
        torch.save({"scores": scores, "hidden": torch.stack([hidden[i] for i in range(dims.layers)]),
                    "knorm": torch.stack([c.keys[0].float().norm(dim=-1) for c in cache.layers]),
                    "vnorm": torch.stack([c.values[0].float().norm(dim=-1) for c in cache.layers]),
                    "window": torch.stack(win)}, path)  # fmt: skip
        print(f"{w.id}: {time.perf_counter() - t0:.1f} s", flush=True)


def keep_half(held: dict, li: int, hidden: torch.Tensor) -> None:
    held[li] = hidden[0].half()


def feature_sets(d: dict) -> dict[str, list[torch.Tensor]]:
    """Per feature set, per layer ``X [H, n, F]``."""
    L, H, n = d["scores"].shape
    pos = torch.arange(n, dtype=torch.float32)
    pos_f = torch.stack([torch.log1p(pos), torch.log1p(n - 1 - pos)], -1).expand(H, n, 2)
    out = {k: [] for k in ("h+rho", "h+rho+knorm+window", "h+rho+knorm+window+pos", "rho+knorm+window+pos",
                           "h+hnext+rho+knorm+window+pos")}  # fmt: skip
    for li in range(L):
        base = lin.unit_rows(d["hidden"][li].float()).expand(H, n, -1)  # h only
        rho, kn = lin.rel_log(d["vnorm"][li])[..., None], lin.rel_log(d["knorm"][li])[..., None]
        win = d["window"][li].clamp_min(1e-8).log()[..., None]
        one = torch.ones(H, n, 1)
        out["h+rho"].append(torch.cat([base, rho, one], -1))
        nxt = torch.cat([base[:, 1:], base[:, -1:]], 1)  # the next position's input (the last repeats itself)
        out["h+rho+knorm+window"].append(torch.cat([base, rho, kn, win, one], -1))
        out["h+rho+knorm+window+pos"].append(torch.cat([base, rho, kn, win, pos_f, one], -1))
        out["rho+knorm+window+pos"].append(torch.cat([rho, kn, win, pos_f, one], -1))
        out["h+hnext+rho+knorm+window+pos"].append(torch.cat([base, nxt, rho, kn, win, pos_f, one], -1))
    return out


def fit(args):
    train = sorted(Path(args.train).glob("*.pt"))
    val = sorted(Path(args.val).glob("*.pt"))
    stats: dict = {}
    for p in train:
        d = torch.load(p)
        for name, Xs in feature_sets(d).items():
            for li, X in enumerate(Xs):
                y, use = lin.target(d["scores"][li])
                F = X.shape[-1]
                st = stats.setdefault(name, [None] * len(Xs))
                if st[li] is None:
                    st[li] = (
                        torch.zeros(X.shape[0], F, F, dtype=torch.float64),
                        torch.zeros(X.shape[0], F, dtype=torch.float64),
                    )
                lin.add_stats(st[li][0], st[li][1], X, y, use)
    results = {}
    for lam in args.lams:
        for name, st in stats.items():
            W = [lin.solve(a, b, lam) for a, b in st]
            r2s, recalls = [], {0.1: [], 0.3: []}
            for p in val:
                d = torch.load(p)
                Xs = feature_sets(d)[name]
                pred = torch.stack([(X @ w[..., None])[..., 0] for X, w in zip(Xs, W, strict=True)])
                y, use = lin.target(d["scores"])
                r2s.append(float(1 - ((pred - y)[use] ** 2).sum() / ((y[use] - y[use].mean()) ** 2).sum()))
                pred[~use] = float("inf")
                L, H, n = y.shape
                for r in recalls:
                    recalls[r].append(recall(d["scores"], pred, r))
            results[(name, lam)] = {"r2": sum(r2s) / len(r2s), **{f"recall@{r}": sum(v) / len(v) for r, v in recalls.items()},
                                    "worst_recall@0.1": min(recalls[0.1]), "features": W[0].shape[-1]}  # fmt: skip
            print(name, lam, results[(name, lam)], flush=True)
    lines = [f"# Learned-scorer features ({len(train)} training windows, {len(val)} validation windows)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| features | lam | F | R² (log score) | recall r = 0.1 | recall r = 0.3 | worst recall r = 0.1 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (name, lam), v in results.items():
        lines.append(f"| {name} | {lam:g} | {v['features']} | {v['r2']:.3f} | {v['recall@0.1']:.3f} | "
                     f"{v['recall@0.3']:.3f} | {v['worst_recall@0.1']:.3f} |")  # fmt: skip
    results_file(args.out, ".md").write_text("\n".join(lines) + "\n")
    results_file(args.out, ".json").write_text(json.dumps(
        {"command": "python " + " ".join(sys.argv), "train": [p.name for p in train], "val": [p.name for p in val],
         "rows": [{"features": k[0], "lam": k[1], **v} for k, v in results.items()]}, indent=1))  # fmt: skip
    print("\n".join(lines))


def recall(target: torch.Tensor, pred: torch.Tensor, r: float) -> float:
    """The share of the entries the default's global selection keeps at ``r`` that the prediction's keeps."""
    L, H, n = target.shape
    mask = lambda s: kept_mask(s, Global().plan(n, r, L, H, entry_scores=lambda: s)[0])  # noqa: E731
    a, b = mask(target), mask(pred)
    return float((a & b).sum() / a.sum())


def kept_mask(scores: torch.Tensor, budgets) -> torch.Tensor:
    out = torch.zeros_like(scores, dtype=torch.bool)
    for li, row in enumerate(budgets):
        for h, m in enumerate(row):
            out[li, h, scores[li, h].topk(m).indices] = True
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dump")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", nargs="+", required=True)
    p.add_argument("--per-text", type=int, default=1)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--out", required=True)
    p = sub.add_parser("fit")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--lams", type=float, nargs="+", default=[1e-3])
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dump(args) if args.cmd == "dump" else fit(args)


if __name__ == "__main__":
    main()
