"""How many repeat queries the value fit needs at long n (``CompressConfig.repeat_fit_rows``), from one capture.

    python benchmarks/long_fit_rows.py --model smollm2-135m --text openai_agents_sandbox_guide --n 8192 \
        --rows 256 512 1024 2048 none --ratios 0.1 0.3 --out benchmarks/results/long_fit_rows_smollm2

One capture of the window (the first n tokens; KL over the next 128) that holds every repeat query and counts
the running scores (``repeat_fit_rows`` above every request's count); each R is then the capture ``R`` would have
held (the same rows: each request's fixed subset, :func:`thin`), solved by the default at each r. Every R keeps
the same entries (the scores count every query); only the fitted values change. Rows: KL, solve seconds, the
queries held per KV head and layer, and the bytes they take. Resumable per (R, r); the capture is made again
on a resumed run. Writes OUT.jsonl and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

import torch

from kvsculpt.bench.runner import RowFile, results_file
from kvsculpt.compress import compress_captured
from kvsculpt.config import CompressConfig
from kvsculpt.core.fit import subsample_index
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window
from kvsculpt.hf.capture import capture
from kvsculpt.hf.models import load_model

EVERYTHING = 10**9  # repeat_fit_rows that holds every query but still counts the running scores


def thin(cap, rows: int | None, seed: int = 0):
    """The capture ``cap`` (made with ``repeat_fit_rows`` above every request's count) as ``repeat_fit_rows=rows``
    would have made it: each repeat request's fixed subset of its pooled queries, the other sources whole."""
    if rows is None:
        return cap
    keep = torch.ones(cap.groups.shape[0], dtype=torch.bool)
    where = cap.prescored.nonzero().squeeze(1)  # the repeat queries, request after request
    spans = cap.spans[where] if cap.spans is not None else torch.zeros(where.shape[0], 2, dtype=torch.long)
    _, counts = torch.unique_consecutive(spans[:, 0], return_counts=True)
    starts = counts.cumsum(0) - counts
    for r, (s, c) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        idx = subsample_index(c, rows, seed + r)
        if idx is not None:
            drop = torch.ones(c, dtype=torch.bool)
            drop[idx] = False
            keep[where[s : s + c][drop]] = False
    d = keep.to(cap.queries[0].device)
    return dataclasses.replace(
        cap,
        queries=[q[:, d] for q in cap.queries],
        groups=cap.groups[keep],
        local_lse=None if cap.local_lse is None else [x[:, d] for x in cap.local_lse],
        spans=None if cap.spans is None else cap.spans[keep],
        prescored=cap.prescored[keep],
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="openai_agents_sandbox_guide")
    ap.add_argument("--n", type=int, default=8192, help="context tokens (default: 8192)")
    ap.add_argument("--rows", nargs="+", default=["256", "512", "1024", "2048", "none"],
                    help="repeat_fit_rows values; none: every query (default: 256 512 1024 2048 none)")  # fmt: skip
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default="benchmarks/results/long_fit_rows_smollm2")
    args = ap.parse_args(argv)
    settings = [None if r == "none" else int(r) for r in args.rows]
    rows = RowFile(results_file(args.out, ".jsonl"))
    wid = f"{args.text}@0:n={args.n}"
    with rows:
        todo = [(R, r) for R in settings for r in args.ratios if (wid, str(R), r) not in rows]
        if todo:
            model, tok = load_model(args.model, dtype=args.dtype)
            w = make_window(tok, load_text(args.text), args.n, 128, name=args.text)
            ref = teacher(model, w)
            base = CompressConfig(repeat_fit_rows=EVERYTHING)
            t0 = time.perf_counter()
            cap = capture(model, w.context, base, tokenizer=tok, progress=True)
            capture_s = time.perf_counter() - t0
            for R, r in todo:
                one = thin(cap, R, base.seed)
                t0 = time.perf_counter()
                cache = compress_captured(model, one, base.replace(ratio=r), progress=False)
                held = one.queries[0].shape[1]
                rows.add({"window": wid, "config": str(R), "ratio": r, "model": args.model, "n": args.n,
                          "kl": score(model, cache, w, ref)["kl"], "solve_seconds": time.perf_counter() - t0,
                          "capture_seconds": capture_s, "prefill_seconds": ref.prefill_seconds,
                          "queries_per_head": held,
                          "query_bytes": sum(q.numel() * q.element_size() for q in one.queries)})  # fmt: skip
                print(rows[(wid, str(R), r)], flush=True)
    report(list(rows.values()), args)


def report(rows, args):
    lines = [f"# repeat_fit_rows at n = {args.n}: {args.model}, {args.text}", "",
             f"Command: `python {shlex.join(sys.argv)}`", "",
             "One capture; each R solved by the default (every R keeps the same entries). KL over the next 128 "
             "tokens; solve s on one core; the queries held per KV head per layer (repeat and self).", "",
             "| repeat_fit_rows | r | KL | solve s | queries per KV head | query MB (all layers) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in sorted(
        rows,
        key=lambda x: (x["ratio"], x["config"] == "None", int(x["config"]) if x["config"] != "None" else 0),
    ):
        lines.append(f"| {row['config']} | {row['ratio']} | {row['kl']:.5f} | {row['solve_seconds']:.1f} | "
                     f"{row['queries_per_head']} | {row['query_bytes'] / 2**20:.0f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    results_file(args.out, ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
