"""Corpus throughput: documents per minute into a cache store, in this process against a local Ray pool.

    python benchmarks/corpus.py --model smollm2-135m --docs 20 --workers 2 --out benchmarks/results/corpus_smollm2

The documents are windows of the shipped 2025–2026 texts (``--tokens`` tokens each, decoded back to text) in a
JSONL file; each mode compresses all of them into a fresh store with the default config at ``--ratio``.
Writes ``OUT.json`` and ``OUT.md``: seconds, documents per minute, the mean per-document compression time,
what the driver spends per document (writing the file and the index row), and an estimate for N workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvsculpt import CompressConfig, load_model
from kvsculpt.eval.texts import text_index, windows
from kvsculpt.store import CacheStore, compress_corpus


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=20, help="documents (windows of the shipped texts)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per document")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2, help="Ray actors")
    ap.add_argument("--out", default="benchmarks/results/corpus_smollm2")
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.report_only:
        out = Path(args.out)
        return write_report(json.loads((out.parent / f"{out.name}.json").read_text()), out)
    _, tok = load_model(args.model)
    wins = windows(tok, sorted(text_index()), args.tokens, 1, per_text=8)[: args.docs]
    if len(wins) < args.docs:
        raise SystemExit(f"the shipped texts give only {len(wins)} windows of {args.tokens} tokens")
    work = Path(tempfile.mkdtemp(prefix="kvsculpt-corpus-"))
    corpus = work / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": w.id, "text": tok.decode(w.context[0])}) + "\n" for w in wins)
    )
    cfg = CompressConfig(ratio=args.ratio)
    rows = []
    for mode, ray in (("in-process", None), (f"local Ray, {args.workers} workers", True)):
        store = work / mode.split(",")[0].replace(" ", "-")
        t0 = time.perf_counter()
        counts = compress_corpus([corpus], store, args.model, cfg, ray=ray, workers=args.workers)
        seconds = time.perf_counter() - t0
        done = [r for r in CacheStore(store).rows() if r["status"] == "done"]
        per_doc = sum(r["seconds"] for r in done) / max(1, len(done))
        rows.append({"mode": mode, "documents": counts["documents"], "done": counts["done"], "failed": counts["failed"],
                     "seconds": seconds, "docs_per_minute": 60 * counts["done"] / seconds,
                     "mean_doc_seconds": per_doc})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        if ray:
            import ray as ray_module

            ray_module.shutdown()
    # what the driver spends per document: writing a cache file of this size and its index row
    probe = CacheStore(work / "probe")
    blob = (work / "in-process" / "caches").iterdir().__next__().read_bytes()
    from kvsculpt.store import Document

    t0 = time.perf_counter()
    for i in range(20):
        probe.record(Document(f"p{i}", b"x"), args.model, "s", args.ratio, {"status": "done", "blob": blob})
    driver_s = (time.perf_counter() - t0) / 20
    shutil.rmtree(work)
    saved = {"args": vars(args), "rows": rows, "driver_seconds_per_doc": driver_s, "blob_bytes": len(blob),
             "threads_in_process": torch.get_num_threads()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(saved, indent=1))
    write_report(saved, out)


def write_report(saved: dict, out: Path):
    args, rows, driver_s = saved["args"], saved["rows"], saved["driver_seconds_per_doc"]
    base, ray_row = rows[0], rows[-1]
    lines = [f"# Corpus throughput: {args['model']}, {args['docs']} documents of {args['tokens']} tokens, "
             f"r = {args['ratio']}", "",
             f"Command: `python {' '.join(a for a in sys.argv if a != '--report-only')}`", "",
             "One 2-core machine (no GPU), nothing else running. In process, torch uses both cores (2 threads); each "
             "Ray worker has one core (1 thread). `doc s` = mean seconds of one document's compression (its own "
             "clock, inside whichever process ran it).", "",
             "| mode | documents | done | seconds | documents / minute | doc s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['mode']} | {r['documents']} | {r['done']} | {r['seconds']:.1f} | "
                     f"{r['docs_per_minute']:.2f} | {r['mean_doc_seconds']:.1f} |")  # fmt: skip
    lines += ["", f"The driver spends {driver_s * 1000:.1f} ms per document writing its cache file "
              f"({saved['blob_bytes'] / 1e6:.1f} MB) and index row, so one driver keeps up with about "
              f"{60 / driver_s:.0f} documents a minute.", "",
              f"Two 1-core Ray workers gave {ray_row['docs_per_minute'] / base['docs_per_minute']:.2f}× the in-process "
              f"rate. Estimate for N workers (one model each, one GPU each): N × 60 / t documents a minute, t = one "
              f"document's compression time on one worker ({ray_row['mean_doc_seconds']:.1f} s on one CPU core here, "
              f"{base['mean_doc_seconds']:.1f} s on two), until the driver's limit above. On GPUs t is this time "
              "divided by the GPU's speed-up on the prefill, the repeat pass and the solve, which was not measured "
              "(no GPU here)."]  # fmt: skip
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
