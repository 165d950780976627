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

``fit --mlp M`` instead fits, on top of the chosen linear set, a two-layer correction of width M by Adam (the
last ``--stop-windows`` training windows pick its step) and reports it beside the linear row (KVzap's larger
variant; ``benchmarks/results/learned_mlp_smollm2``).
"""

from __future__ import annotations

import argparse
import json
import math
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


# --- A two-layer correction (KVzap's larger variant) on top of the linear model -----------------------------------
#
#     log score = x · w[l, h] + Σ_m a[l, h, m] · relu(ĥ_t · U[l, :, m] + e_t · V[l, h, :, m])
#
# ``ĥ_t`` the unit-scaled attention input (D), ``e_t`` the extra features of entry t in head h. ``U`` is shared by
# the layer's heads, so a prefill hook keeps ``[n, M]`` per layer (``ĥ U``), as the linear part keeps ``[H, n]``.
# ``a`` starts at zero: training starts from the ridge solution and can only learn a correction to it.


def mlp_init(layers: int, heads: int, dim: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameters of the correction: ``U [L, D, M]``, ``V [L, H, lin.EXTRA, M]``, ``a [L, H, M]`` (zero)."""
    g = torch.Generator().manual_seed(seed)
    return {"U": torch.randn(layers, dim, hidden, generator=g) / math.sqrt(dim),
            "V": torch.randn(layers, heads, lin.EXTRA, hidden, generator=g) / math.sqrt(lin.EXTRA),
            "a": torch.zeros(layers, heads, hidden)}  # fmt: skip


def mlp_hidden_part(U: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``ĥ U [n, M]`` of one layer from its attention input ``hidden [n, D]`` and ``U [D, M]`` (a prefill hook's
    share). O(n · D · M)."""
    return lin.unit_rows(hidden) @ U.float().to(hidden.device)


def mlp_correction(
    V: torch.Tensor, a: torch.Tensor, hidden_z: torch.Tensor, extra: torch.Tensor
) -> torch.Tensor:
    """The correction ``[H, n]`` of one layer: ``V [H, lin.EXTRA, M]``, ``a [H, M]``, ``hidden_z [n, M]``
    (:func:`mlp_hidden_part`, or ``[H, n, M]``), ``extra [H, n, lin.EXTRA]``. O(H · n · M · lin.EXTRA)."""
    z = torch.relu(hidden_z.to(extra.device) + extra @ V.float().to(extra.device))  # [H, n, M]
    return (z * a.float().to(extra.device)[:, None]).sum(-1)


def fit_mlp(
    examples,
    linear: torch.Tensor,
    hidden: int = 64,
    steps: int = 1500,
    batch: int = 2048,
    lr: float = 3e-3,
    decay: float = 1e-4,
    seed: int = 0,
    check=None,
    progress=None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit the correction by Adam on the squared error of the log scores, every layer at once.

    ``examples``: a list of windows, each ``(hidden [L, n, D] (any float dtype), extra [L, H, n, lin.EXTRA],
    y [L, H, n], use [L, H, n] bool)``; ``linear [L, H, F]``: the ridge weights the correction is added to. Each
    step draws ``batch`` tokens of one random window. ``check(params) -> float`` (a loss on windows held out of
    the fit), called every 100 steps: the parameters with the lowest value are returned (early stopping), with
    the history. Cost per step O(L · batch · D · M)."""
    L, H, F = linear.shape
    D = F - lin.EXTRA
    params = mlp_init(L, H, D, hidden, seed)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=decay)
    g = torch.Generator().manual_seed(seed + 1)
    best, best_params, history = float("inf"), {k: v.detach().clone() for k, v in params.items()}, []
    for step in range(1, steps + 1):
        hid, extra, y, use = examples[int(torch.randint(len(examples), (1,), generator=g))]
        n = hid.shape[1]
        idx = torch.randint(n, (min(batch, n),), generator=g)
        h = lin.unit_rows(hid[:, idx].float())  # [L, B, D]
        e = extra[:, :, idx].float()  # [L, H, B, E]
        base = torch.einsum("lbd,lhd->lhb", h, linear[..., :D]) + (e @ linear[..., D:, None])[..., 0]
        z = torch.relu((h @ params["U"])[:, None] + e @ params["V"])  # [L, H, B, M]
        pred = base + (z * params["a"][:, :, None]).sum(-1)
        m = use[:, :, idx].float()
        loss = (((pred - y[:, :, idx]) ** 2) * m).sum() / m.sum().clamp_min(1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss))
        if check is not None and (step % 100 == 0 or step == steps):
            with torch.no_grad():
                value = check({k: v.detach() for k, v in params.items()})
            history.append(value)
            if value < best:
                best, best_params = value, {k: v.detach().clone() for k, v in params.items()}
    if check is None:
        best_params = {k: v.detach().clone() for k, v in params.items()}
    return best_params, history


CHOSEN = "h+rho+knorm+window+pos"  # the linear scorer's features (core.learned)


def extra_of(d: dict) -> torch.Tensor:
    """The chosen set's features beyond the hidden state, ``[L, H, n, EXTRA]``, in ``core.learned``'s order."""
    L, H, n = d["scores"].shape
    pos = torch.arange(n, dtype=torch.float32)
    return torch.stack([lin.rel_log(d["vnorm"]), lin.rel_log(d["knorm"]), d["window"].clamp_min(1e-8).log(),
                        torch.log1p(pos).expand(L, H, n), torch.log1p(n - 1 - pos).expand(L, H, n),
                        torch.ones(L, H, n)], -1)  # fmt: skip


def mlp_rows(args, train, val, W, lam) -> dict:
    """The chosen features with a two-layer correction (``core.learned.fit_mlp``) of each width in ``--mlp`` on
    top of the ridge weights ``W``: fitted on the training windows but the last ``--stop-windows``, which pick
    the step (early stopping); judged on the validation windows as the linear rows are."""

    def example(p):
        d = torch.load(p)
        y, use = lin.target(d["scores"])
        return d["hidden"], extra_of(d), y, use

    fit_on = [example(p) for p in train[: -args.stop_windows]]
    stop_on = [example(p) for p in train[-args.stop_windows :]]
    linear = torch.stack(W)

    def predict(params, hidden, extra):
        out = []
        for li in range(linear.shape[0]):
            h = hidden[li].float()
            base = lin.hidden_part(linear[li], h) + (extra[li] @ linear[li, :, -lin.EXTRA :, None])[..., 0]
            if params is not None:
                base = base + mlp_correction(params["V"][li], params["a"][li],
                                                 mlp_hidden_part(params["U"][li], h), extra[li])  # fmt: skip
            out.append(base)
        return torch.stack(out)

    def mse(params, data):
        num = den = 0.0
        for hidden, extra, y, use in data:
            num += float((((predict(params, hidden, extra) - y) ** 2) * use).sum())
            den += float(use.sum())
        return num / den

    rows = {}
    print(f"linear: stop-window MSE {mse(None, stop_on):.4f}", flush=True)
    for M in args.mlp:
        t0 = time.perf_counter()
        params, history = fit_mlp(fit_on, linear, hidden=M, steps=args.steps, lr=args.lr,
                                      check=lambda p: mse(p, stop_on))  # fmt: skip
        r2s, recalls = [], {0.1: [], 0.3: []}
        for p in val:
            d = torch.load(p)
            pred = predict(params, d["hidden"], extra_of(d))
            y, use = lin.target(d["scores"])
            r2s.append(float(1 - ((pred - y)[use] ** 2).sum() / ((y[use] - y[use].mean()) ** 2).sum()))
            pred[~use] = float("inf")
            for r in recalls:
                recalls[r].append(recall(d["scores"], pred, r))
        rows[(f"{CHOSEN} + MLP({M})", lam)] = {
            "r2": sum(r2s) / len(r2s), **{f"recall@{r}": sum(v) / len(v) for r, v in recalls.items()},
            "worst_recall@0.1": min(recalls[0.1]), "features": linear.shape[-1], "hidden": M,
            "stop_mse": history, "fit_seconds": time.perf_counter() - t0}  # fmt: skip
        print(M, {k: v for k, v in rows[(f"{CHOSEN} + MLP({M})", lam)].items() if k != "stop_mse"},
              "stop MSE by 100 steps:", [round(x, 4) for x in history], flush=True)  # fmt: skip
    return rows


def fit(args):
    train = sorted(Path(args.train).glob("*.pt"))
    val = sorted(Path(args.val).glob("*.pt"))
    stats: dict = {}
    for p in train:
        d = torch.load(p)
        for name, Xs in feature_sets(d).items():
            if args.mlp and name != CHOSEN:
                continue
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
    if args.mlp:  # only the chosen set, at the first lam
        args.lams = args.lams[:1]
    for lam in args.lams:
        for name, st in stats.items():
            W = [lin.solve(a, b, lam) for a, b in st]
            if args.mlp:
                results.update(mlp_rows(args, train, val, W, lam))
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
    p.add_argument(
        "--mlp",
        type=int,
        nargs="*",
        default=[],
        help="widths M of a two-layer correction to fit on top of the chosen linear set (default: none)",
    )
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of the correction (default 1500)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="Adam learning rate of the correction (default 3e-3)"
    )
    p.add_argument(
        "--stop-windows",
        type=int,
        default=3,
        help="training windows held out of the correction's fit to pick its step (default 3)",
    )
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    dump(args) if args.cmd == "dump" else fit(args)


if __name__ == "__main__":
    main()
