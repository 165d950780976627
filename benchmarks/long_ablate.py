"""What makes the default's lead at long n: its value fit and its scores, on one capture of one long window.

    python benchmarks/long_ablate.py openai_agents_sandbox_guide 8192 2048 benchmarks/results/long_ablate_smollm2

Arguments: a shipped text, n, the repeat chunk (``repeat_chunk``; 0: one request), OUT. One capture (the
default's: self samples and the repeat pass), then at r = 0.1 and 0.3 the default (kvzip-v scores, fitted
values), the default's scores with copied values (``fit=False``), and our KVzip replica (``kvzip``, copied
values), each solved part by part as the default is. KL over the 128 tokens after the window (SmolLM2, fp32,
one thread). Appends to OUT.jsonl; writes OUT.md.
"""

import json
import sys
import time

import torch

from kvsculpt.bench.runner import results_file
from kvsculpt.compress import compress_captured
from kvsculpt.config import CompressConfig
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window
from kvsculpt.hf.attention import use_kvsculpt_attention
from kvsculpt.hf.capture import capture
from kvsculpt.hf.models import load_model

CONFIGS = {"default": {}, "kvzip, copied values": {"method": "kvzip", "fit": False},
           "default scores, copied values": {"fit": False}}  # fmt: skip


def main(text: str, n: int, chunk: int, out: str):
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    use_kvsculpt_attention(model)
    w = make_window(tok, load_text(text), n, 128, name=text)
    ref = teacher(model, w)
    base = CompressConfig(
        repeat_chunk=chunk, repeat_fit_rows=None
    )  # every repeat query held, as when it was run
    cap = capture(model, w.context, base, tokenizer=tok, progress=True)
    path = results_file(out, ".jsonl")
    for name, change in CONFIGS.items():
        for r in (0.1, 0.3):
            t = time.perf_counter()
            cache = compress_captured(model, cap, base.replace(ratio=r, **change), progress=False)
            row = {"text": text, "n": n, "repeat_chunk": chunk, "config": name, "ratio": r,
                   "kl": score(model, cache, w, ref)["kl"], "solve_seconds": time.perf_counter() - t,
                   "prefill_seconds": ref.prefill_seconds, "query_seconds": cap.query_seconds,
                   "solved_in_chunks": cache.info["solved_in_chunks"]}  # fmt: skip
            print(json.dumps(row), flush=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [f"# The default's parts at long n ({text})", "", f"Command: `python benchmarks/long_ablate.py {text} "
             f"{n} {chunk} {out}`", "", "| n | r | method | KL | solve s | capture s (prefill + queries) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['n']} | {r['ratio']} | {r['config']} | {r['kl']:.4g} | {r['solve_seconds']:.0f} | "
              f"{r['prefill_seconds'] + r['query_seconds']:.0f} |" for r in rows]  # fmt: skip
    results_file(out, ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
