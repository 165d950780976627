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
    args = ap.parse_args()
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
    base = rows[0]
    lines = [f"# Corpus throughput: {args.model}, {args.docs} documents of {args.tokens} tokens, r = {args.ratio}", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "One 2-core machine (no GPU). `doc s` = mean seconds of one document's compression (its own clock, inside "
             "whichever process ran it).", "",
             "| mode | documents | done | seconds | documents / minute | doc s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['mode']} | {r['documents']} | {r['done']} | {r['seconds']:.1f} | {r['docs_per_minute']:.2f} | "
                     f"{r['mean_doc_seconds']:.1f} |")  # fmt: skip
    lines += ["", f"The driver spends {driver_s * 1000:.1f} ms per document writing its cache file "
              f"({len(blob) / 1e6:.1f} MB) and index row, so one driver keeps up with about "
              f"{60 / driver_s:.0f} documents a minute.", "",
              f"Estimate for N workers (one model each, one GPU each): throughput ≈ N × 60 / t documents a minute, "
              f"t = one document's compression time on that worker, until the driver's limit above. Here t = "
              f"{base['mean_doc_seconds']:.1f} s on one CPU core; on a GPU t is the CPU time divided by the GPU's "
              "speed-up on the prefill, the repeat pass and the solve (not measured here: no GPU)."]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "driver_seconds_per_doc": driver_s}, indent=1)
    )
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
