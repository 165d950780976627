"""``kvsculpt analyze``: how hard each (layer, KV head) is to compress, and the budgets a rule gives it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..compress import pilot_errors
from ..config import CompressConfig
from ..core.budget import kept
from ..core.fit import split_heldout
from ..hf.capture import capture, stage
from ..hf.dims import model_dims
from . import plots


def analyze(model, tok, ids: torch.Tensor, cfg: CompressConfig, out: Path, title: str, command: str) -> dict:
    """Pilot difficulty ``[L, H]`` (Select+Fit's relative output MSE on held-out query groups at the uniform
    budget), the budgets ``cfg.rule`` gives, heatmaps and a summary; written to ``out``."""
    if cfg.heldout <= 0:
        raise ValueError("analyze measures difficulty on held-out queries: give a heldout fraction > 0")
    dims = model_dims(model)
    cap = capture(model, ids, cfg, tokenizer=tok, progress=True)
    held = split_heldout(cap.groups, cfg.heldout, cfg.seed)
    fit_q, check_q = [q[:, ~held] for q in cap.queries], [q[:, held] for q in cap.queries]
    n, m = cap.n, kept(cap.n, cfg.ratio)
    stage(True, f"pilot difficulty: Select+Fit at m={m} for {dims.layers} layers × {dims.kv_heads} KV heads")
    difficulty = pilot_errors(cap, fit_q, check_q, m)
    stage(True, f"{cfg.allocation} budgets (more pilots)")
    budgets, record = cfg.rule.plan(n, cfg.ratio, dims.layers, dims.kv_heads,
                                    pilot=lambda size: pilot_errors(cap, fit_q, check_q, size))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    per_layer = difficulty.mean(1)
    layer_spread = float(per_layer.max() / per_layer.min().clamp_min(1e-12))
    head_ratio = difficulty.max(1).values / difficulty.min(1).values.clamp_min(1e-12)
    worst_layer = int(head_ratio.argmax())
    summary = {
        "title": title, "config": repr(cfg), "context_tokens": n, "ratio": cfg.ratio, "queries": cfg.queries,
        "pilot": f"Select+Fit at m={m} per head, relative output MSE on held-out queries",
        "difficulty": difficulty.tolist(), "budgets": budgets, "allocation": record,
        "layer_spread": layer_spread, "max_head_ratio_within_layer": float(head_ratio.max()),
        "max_head_ratio_layer": worst_layer,
    }  # fmt: skip
    (out / "difficulty.json").write_text(json.dumps(summary, indent=1))
    plots.heatmap(difficulty.tolist(), f"{title}: pilot relative MSE (Select+Fit, kept {cfg.ratio:.0%})",
                  "relative output MSE (log)", out / "difficulty.png")  # fmt: skip
    plots.heatmap(budgets, f"{cfg.allocation} budgets (entries kept of {n})", "entries kept", out / "budgets.png",
                  log=False)  # fmt: skip
    md = [
        f"# Difficulty analysis: {title}, n={n}, kept {cfg.ratio}",
        "",
        f"Command: `{command}`",
        "",
        f"- Per-layer mean pilot MSE: max/min across layers = **{layer_spread:.1f}×** (paper: up to 100×).",
        f"- Largest ratio between two KV heads of one layer: **{float(head_ratio.max()):.1f}×** in layer "
        f"{worst_layer} (paper: up to 467×).",
        f"- Budgets ({cfg.allocation}): min {min(map(min, budgets))}, max {max(map(max, budgets))}, "
        f"total {sum(map(sum, budgets))} = {m}·{dims.layers}·{dims.kv_heads}.",
        "",
        "![difficulty](difficulty.png) ![budgets](budgets.png)",
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    summary["markdown"] = "\n".join(md)
    return summary
