"""Where the default's memory goes: the resident set sampled every 20 ms through one ``compress``, by stage.

    python benchmarks/memory.py --lengths 4096 8192 --prefill-chunk 0 2048 --allocator default mmap64k \
        --out benchmarks/results/memory_smollm2

Each setting runs in a fresh process (``--one``), so no run inherits another's heap. Stages: the prefill, the self
samples, the repeat pass, joining the queries, scoring, the solve; the peak of each is the largest anonymous
resident set (``RssAnon``: the model's weights are file-backed and not counted) above what the process held
after loading the model, in MB. ``--prefill-chunk`` sets ``hf.decode.PREFILL_CHUNK`` (0: one forward), ``--repeat-forward``
``hf.capture.REPEAT_FORWARD`` (the tokens of a repeat request per forward).
``--allocator mmap64k`` runs the process under ``MALLOC_MMAP_THRESHOLD_=65536`` (``mmap1m``: 1 MiB): glibc then
serves every allocation of that size or more by its own ``mmap`` and returns it when freed, instead of from its
heap, whose dynamic threshold rises after the first large frees and keeps freed tensors resident. Linux and
glibc only.
The stage labels come from wrapping the capture's and the solve's functions in this process, so a stage is
where the time was spent, not a tensor's owner. Appends to OUT.jsonl (a rerun skips what is there) and writes
OUT.md.
"""

import argparse
import contextlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from kvsculpt.bench.live_tensors import LiveTensors
from kvsculpt.bench.runner import RowFile, results_file

STAGES = {  # module attribute → label, in the order a compression reaches them
    "capture.prefill": "prefill",
    "learned.prefill": "prefill",  # --method learned: its one prefill; its scoring after it is "other"
    "capture.sample_self_queries": "self samples",
    "capture._repeat_queries": "repeat pass",
    "compress.capture_part": "read a part",  # compress while reading: a part's forward (its stages inside it)
    "capture.request_queries": "repeat pass",
    "capture.join_sources": "join queries",
    "compress.chunked_entry_scores": "scores",
    "compress.solve_chunks": "solve",
}
METHODS = {
    "default": {},
    "learned": {"method": "learned", "fit": False},
    "reading": {"chunk_tokens": 2048, "read_ahead": 0},
    "reading-ahead": {"chunk_tokens": 2048},
    "reading-ahead-1024": {"chunk_tokens": 1024},
    "reading-ahead-4096": {"chunk_tokens": 2048, "read_ahead": 4096},
}  # learned: one prefill, copied values; reading: compress while reading in parts of 2048 (read ahead by 2048)
ALLOCATORS = {
    "default": {},
    "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "mmap1m": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
}


def anon_mb() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("RssAnon:")[1].split()[0]) // 1024


def trace(model_name: str, text: str, n: int, ratio: float, chunk: int, method: str = "default",
          repeat_forward: int = 2048, tensors: bool = False) -> dict:  # fmt: skip
    """One compression of the first ``n`` tokens of ``text`` in this process: peak MB above the loaded model
    per stage, the meter's ``peak_extra_bytes``, seconds; with ``tensors``, also the most that live tensors
    held at once and what held it (:class:`~kvsculpt.bench.live_tensors.LiveTensors`)."""
    from kvsculpt import compress, learned
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf import capture, decode
    from kvsculpt.hf.models import load_model

    modules = {"capture": capture, "compress": sys.modules["kvsculpt.compress"], "learned": learned}
    decode.PREFILL_CHUNK = chunk or None  # 0: one forward
    capture.REPEAT_FORWARD = repeat_forward
    current, peaks = ["other"], {}

    def labelled(label, fn):
        def run(*args, **kwargs):
            outer, current[0] = current[0], label
            try:
                return fn(*args, **kwargs)
            finally:
                current[0] = outer

        return run

    for path, label in STAGES.items():
        mod, name = path.split(".")
        setattr(modules[mod], name, labelled(label, getattr(modules[mod], name)))
    model, tok = load_model(model_name)
    ids = tok(load_text(text), return_tensors="pt")["input_ids"][:, :n]
    base, done = anon_mb(), threading.Event()

    def watch():
        while not done.is_set():
            peaks[current[0]] = max(peaks.get(current[0], 0), anon_mb() - base)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    kw = METHODS[method]
    with LiveTensors(label=lambda: current[0]) if tensors else contextlib.nullcontext() as live:
        cache = compress(model, ids, ratio=ratio, tokenizer=tok, progress=False, **kw)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    held = {} if live is None else {"tensor_peak_mb": live.peak_bytes / 2**20,
                                    "holders": [{**g, "mb": g.pop("bytes") / 2**20} for g in live.at_peak[:20]]}  # fmt: skip
    return {**held, "stage_peak_mb": peaks, "peak_mb": max(peaks.values()), "meter_peak_mb": cache.info["peak_extra_bytes"] / 2**20,
            "full_cache_mb": cache.info["full_cache_bytes"] / 2**20, "seconds": seconds,
            "prefill_seconds": cache.info.get("prefill_seconds")}  # fmt: skip


def key(row: dict) -> tuple:
    return (row["model"], row["text"], row["n"], row["ratio"], row["prefill_chunk"], row["allocator"],
            row.get("method", "default"), row.get("repeat_forward", 2048), row.get("tensors", False),
            row.get("tag", ""))  # fmt: skip


def method_label(row: dict) -> str:
    return row.get("method", "default") + (f" ({row['tag']})" if row.get("tag") else "")


def write_report(rows: list[dict], out, command: str) -> None:
    labels = [*dict.fromkeys(STAGES.values()), "other"]
    commands = dict.fromkeys([*(r["command"] for r in rows if "command" in r), command])
    lines = [f"# Memory by stage: {rows[0]['model']}" if rows else "# Memory by stage", "",
             "Commands:", "", "```bash", *commands, "```", "",
             "Peak anonymous resident MB above the loaded model, by stage (`benchmarks/memory.py`); one fresh process per "
             "row; seconds on a shared core are not comparable between rows.", "",
             "| method | text | n | r | prefill chunk | repeat forward | allocator | " + " | ".join(labels)
             + " | peak | full cache | s |", "|---" * (10 + len(labels)) + "|"]  # fmt: skip
    for r in sorted(
        rows,
        key=lambda r: (
            method_label(r),
            r["text"],
            r["n"],
            r["ratio"],
            r["allocator"],
            r["prefill_chunk"],
            -r.get("repeat_forward", 2048),
        ),
    ):
        cells = [str(round(r["stage_peak_mb"].get(s, 0))) for s in labels]
        lines.append(f"| {method_label(r)} | {r['text']} | {r['n']} | {r['ratio']} | {r['prefill_chunk'] or 'one forward'} | {r.get('repeat_forward', 2048)} | {r['allocator']} | "
                     + " | ".join(cells) + f" | **{round(r['peak_mb'])}** | {round(r['full_cache_mb'])} | {r['seconds']:.0f} |")  # fmt: skip
    for r in rows:
        if "holders" not in r:
            continue
        lines += ["", f"## Live tensors: {method_label(r)}, {r['text']}, n = {r['n']}, r = {r['ratio']}, "
                  f"{r['allocator']} heap", "", f"At most **{r['tensor_peak_mb']:.0f} MB** in live tensors made during "
                  f"the compression (resident peak in the same run: {r['peak_mb']:.0f} MB; the run is slower under "
                  "the count). What held them at that moment, largest first (MB; storages under 1 MB together as "
                  "`small`):", "", "| MB | tensors | largest shape | stage | made at |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {g['mb']:.1f} | {g['tensors']} | {tuple(g['shape'])} | {g['label']} | `{g['site']}` |"
                  for g in r["holders"]]  # fmt: skip
    results_file(out, ".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default="openai_agents_sandbox_guide")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3])
    p.add_argument(
        "--prefill-chunk", type=int, nargs="+", default=[0], help="tokens a prefill forward (0: one)"
    )
    p.add_argument("--repeat-forward", type=int, nargs="+", default=[2048],
                   help="tokens per forward of a repeat request (hf.capture.REPEAT_FORWARD)")  # fmt: skip
    p.add_argument("--allocator", nargs="+", default=["default"], choices=list(ALLOCATORS))
    p.add_argument(
        "--method",
        default="default",
        choices=list(METHODS),
        help="learned: one prefill, copied values; reading: in parts of 2048 tokens; reading-ahead: each read 2048 "
        "ahead; reading-ahead-1024: in parts of 1024, each read 1024 ahead; reading-ahead-4096: in parts of 2048, "
        "each read 4096 ahead",
    )
    p.add_argument(
        "--tensors",
        action="store_true",
        help="also count the bytes of live tensors and list what held them at their peak (slower)",
    )
    p.add_argument(
        "--tag", default="", help="a label kept with the rows (e.g. the code's commit), shown by the method"
    )
    p.add_argument("--out", default="benchmarks/results/memory_smollm2")
    p.add_argument(
        "--one", action="store_true", help=argparse.SUPPRESS
    )  # a child: one trace, a JSON line out
    a = p.parse_args()
    if a.one:
        print(json.dumps(trace(a.model, a.text, a.lengths[0], a.ratios[0], a.prefill_chunk[0], a.method,
                               a.repeat_forward[0], a.tensors)))  # fmt: skip
        return
    command = "python benchmarks/memory.py " + shlex.join(sys.argv[1:])
    rows = RowFile(results_file(a.out, ".jsonl"), key=key)
    grid = itertools.product(a.lengths, a.ratios, a.prefill_chunk, a.repeat_forward, a.allocator)
    for n, ratio, chunk, width, alloc in grid:
        row = {"model": a.model, "text": a.text, "n": n, "ratio": ratio, "prefill_chunk": chunk, "allocator": alloc,
               "method": a.method, "repeat_forward": width, **({"tensors": True} if a.tensors else {}),
               **({"tag": a.tag} if a.tag else {})}  # fmt: skip
        if key(row) in rows:
            continue
        print(f"memory: n={n} r={ratio} prefill chunk {chunk or 'off'} repeat forward {width} allocator {alloc}",
              flush=True)  # fmt: skip
        child = [sys.executable, __file__, "--one", "--model", a.model, "--text", a.text, "--lengths", str(n),
                 "--ratios", str(ratio), "--prefill-chunk", str(chunk), "--method", a.method,
                 "--repeat-forward", str(width), *(["--tensors"] if a.tensors else [])]  # fmt: skip
        done = subprocess.run(child, env={**os.environ, **ALLOCATORS[alloc]}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"memory: the trace failed:\n{done.stderr[-2000:]}")
        rows.add({**row, "command": command, **json.loads(done.stdout.strip().splitlines()[-1])})
    write_report(list(rows.values()), a.out, command)
    print(f"memory: wrote {results_file(a.out, '.md')}")


if __name__ == "__main__":
    main()
