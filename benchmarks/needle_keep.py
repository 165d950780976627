"""Does the default keep the planted facts? Per task sample, the share of the needle's tokens the default's
selection keeps against the share of all tokens, per layer.

    python benchmarks/needle_keep.py --tasks vt niah_multikey --samples 10 --ratio 0.25 \
        --out benchmarks/results/needle_keep_qwen0.5b

The samples are the task benchmark's (``kvsculpt bench tasks``: the same seed, n and model). A needle token is one
of the planted lines (``VAR … = …`` or ``One of the special magic numbers …``). The selection is the default's
global rule over its entry scores (``compress.captured_entry_scores``), before the value fit. Reported per
sample: the kept share of all entries and of the needle's (over every layer and KV head), their ratio, and the
needles' mean score percentile within their head (0.5: no better than the haystack). Per layer: the share of its
entries the budget gives it. Appends to OUT.jsonl (a rerun skips what is there), writes OUT.md.
"""

import argparse
import re
import sys

import torch
from learned_features import kept_mask  # benchmarks/, on the path when run as a script

from kvsculpt.bench.runner import RowFile, results_file
from kvsculpt.bench.tasks import reply
from kvsculpt.compress import captured_entry_scores, compress_captured
from kvsculpt.config import CompressConfig
from kvsculpt.eval.tasks import task_samples
from kvsculpt.hf.capture import capture
from kvsculpt.hf.decode import prefill
from kvsculpt.hf.dims import model_dims
from kvsculpt.hf.models import load_model

NEEDLE = re.compile(r"VAR [A-Z]{5} = [^\n]*|One of the special magic numbers[^\n]*")


def needle_mask(tokenizer, ids: list[int]) -> torch.Tensor:
    """``[n]`` bool: the tokens that start inside a planted line."""
    pieces = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids)]
    starts, at = [], 0
    for p in pieces:
        starts.append(at)
        at += len(p)
    text, mask = "".join(pieces), torch.zeros(len(ids), dtype=torch.bool)
    for m in NEEDLE.finditer(text):
        for j, s in enumerate(starts):
            if m.start() <= s < m.end():
                mask[j] = True
    return mask


def selection(model, cfg: CompressConfig, scores: torch.Tensor):
    """The global rule's budgets over ``scores [L, Hkv, n]`` and the entries it keeps ``[L, Hkv, n]`` bool."""
    dims = model_dims(model)
    plan = cfg.rule.plan(scores.shape[-1], cfg.ratio, dims.layers, dims.kv_heads, entry_scores=lambda: scores)
    return plan[0], kept_mask(scores, [[int(m) for m in row] for row in plan[0]])


VARIANTS = (
    "full",
    "default",
    "needles kept",
    "uniform budgets",
    "copied values",
    "needles kept, copied values",
)


def answers(model, tok, s, cap, cfg, scores, needle, have: dict) -> dict:
    """The scores of the replies after each of :data:`VARIANTS` not in ``have`` (a row's earlier answers): the
    full cache; the default's cache; the oracle's (the default with every needle entry kept in every head, the
    budget otherwise as the global rule gives it); the default with every head the same budget
    (``allocation="uniform"``); the default's and the oracle's selections with the values copied (``fit=False``)."""
    n, out = s.context.shape[1], dict(have)
    for variant in (v for v in VARIANTS if v not in have):
        if variant == "full":
            cache = prefill(model, s.context)[0]
        elif variant == "default":
            cache = compress_captured(model, cap, cfg, progress=False, tokenizer=tok).fork()
        elif variant == "uniform budgets":
            cache = compress_captured(model, cap, cfg.replace(allocation="uniform"), progress=False,
                                      tokenizer=tok).fork()  # fmt: skip
        else:  # the default's selection, or the oracle's (needles kept whole); values fitted or copied
            chosen = scores.clone()
            if variant.startswith("needles kept"):
                chosen[..., needle] = float("inf")
            budgets, _ = selection(model, cfg, chosen)
            solve = cfg.replace(fit=False) if variant.endswith("copied values") else cfg
            cache = compress_captured(model, cap, solve, progress=False, tokenizer=tok, budgets=budgets,
                                      scores=chosen).fork()  # fmt: skip
        out[variant] = reply(model, tok, cache, n, s)[1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--tasks", nargs="+", default=["vt", "niah_multikey"])
    p.add_argument("--samples", type=int, default=10, help="samples 0 … N-1 of each task")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--answer", action="store_true",
                   help="also answer each question after the full cache, the default's, the oracle's (the "
                   "default with the needle's entries kept whole) and the default's with uniform budgets")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/needle_keep_qwen0.5b")
    a = p.parse_args()
    command = "python benchmarks/needle_keep.py " + " ".join(sys.argv[1:])
    model, tok = load_model(a.model, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    key = lambda r: (r["model"], r["task"], r["sample"], r["ratio"], "answer_scores" in r)  # noqa: E731
    rows = RowFile(results_file(a.out, ".jsonl"), key=key)
    for task in a.tasks:
        for s in task_samples(tok, task, a.context_tokens, a.samples):
            row = {"model": a.model, "task": task, "sample": s.index, "ratio": a.ratio}
            have = rows.get(key({**row, "answer_scores": 1}), {}).get("answer_scores", {})
            if (a.answer and len(have) == len(VARIANTS)) or (not a.answer and key(row) in rows):
                continue
            needle = needle_mask(tok, s.context[0].tolist())
            cfg = CompressConfig(ratio=a.ratio)
            cap = capture(model, s.context, cfg, tokenizer=tok, progress=False)
            scores = captured_entry_scores(cap, cfg)
            _, kept = selection(model, cfg, scores)
            rank = scores.float().argsort(-1).argsort(-1).float() / (scores.shape[-1] - 1)  # 0 worst, 1 best
            row.update(command=command, dtype=a.dtype, needle_tokens=int(needle.sum()),
                       kept_all=float(kept.float().mean()), kept_needle=float(kept[..., needle].float().mean()),
                       needle_percentile=float(rank[..., needle].mean()),
                       layer_share=[round(float(x), 4) for x in kept.float().mean((1, 2))],
                       layer_needle=[round(float(x), 4) for x in kept[..., needle].float().mean((1, 2))])  # fmt: skip
            if a.answer:
                row["answer_scores"] = answers(model, tok, s, cap, cfg, scores, needle, have)
            rows.add(row)
            print(
                f"{task} {s.index}: needle kept {row['kept_needle']:.3f} of all {row['kept_all']:.3f}",
                flush=True,
            )
    write_report(list(rows.values()), a.out, command)


def write_report(rows: list[dict], out, command: str) -> None:
    one = {}  # a sample's row with answers replaces the one without
    for r in sorted(rows, key=lambda r: "answer_scores" in r):
        one[r["model"], r["task"], r["sample"], r["ratio"]] = r
    rows = list(one.values())
    lines = ["# Does the default keep the planted facts?", "", f"Command: `{command}`", "",
             "Per sample: the share of entries the default's selection keeps, of all and of the needle's tokens, "
             "over every layer and KV head; the needles' mean score percentile in their head (0.5: no better than "
             "the haystack).", "",
             "| task | sample | needle tokens | kept, all | kept, needle | needle ÷ all | needle percentile |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["task"], r["sample"])):
        lines.append(f"| {r['task']} | {r['sample']} | {r['needle_tokens']} | {r['kept_all']:.3f} | "
                     f"{r['kept_needle']:.3f} | {r['kept_needle'] / r['kept_all']:.2f} | {r['needle_percentile']:.2f} |")  # fmt: skip
    answered = [r for r in rows if "answer_scores" in r]
    if answered:
        lines += ["", "Reply scores (`--answer`; the share of the answer's items in the reply), mean over the samples:", "",
                  "| task | samples | full cache | default | default, needle entries kept whole | default, uniform budgets "
                  "| default, values copied | needle entries kept whole, values copied |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for task in sorted({r["task"] for r in answered}):
            rs = [r["answer_scores"] for r in answered if r["task"] == task]
            cells = [f"{100 * sum(x[k] for x in rs if k in x) / sum(k in x for x in rs):.0f}"
                     if any(k in x for x in rs) else "–" for k in VARIANTS]  # fmt: skip
            lines.append(f"| {task} | {len(rs)} | " + " | ".join(cells) + " |")
    if rows:
        share = torch.tensor([r["layer_share"] for r in rows]).mean(0)
        lines += ["", "The budget's share of each layer's entries (mean over the samples): "
                  + ", ".join(f"{li}: {float(x):.2f}" for li, x in enumerate(share)), ""]  # fmt: skip
    results_file(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
