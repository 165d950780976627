"""Why compressing while reading loses to one-shot: the same parts, read over the exact prefix instead.

    python benchmarks/reading_ablate.py openai_agents_sandbox_guide 4096 2048 0.3 benchmarks/results/reading_ablate_smollm2

Arguments: a shipped text, n, the part size, r, OUT. Each part of the window is read over the *full* cache of
the tokens before it (one prefill; ``hf.capture.capture_part`` with the exact prefix) and solved alone to r
of its own entries, as ``compress(..., chunk_tokens=PART)`` does over the compressed prefix. So its KL against
``kvsculpt reading PART`` (``benchmarks/long.py --reading``) isolates what reading over a compressed prefix
costs, and against the one-shot default what solving each part alone to r costs. SmolLM2, fp32, one thread,
KL over the 128 tokens after the window. Appends to OUT.jsonl.
"""

import json
import sys
import time

import torch

from kvsculpt.bench.runner import results_file
from kvsculpt.cache import join_blocks, shared_cache
from kvsculpt.compress import compress_captured
from kvsculpt.config import CompressConfig
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window
from kvsculpt.hf.attention import use_kvsculpt_attention
from kvsculpt.hf.capture import capture_part
from kvsculpt.hf.decode import prefill
from kvsculpt.hf.models import load_model


def main(text: str, n: int, part: int, ratio: float, out: str):
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    use_kvsculpt_attention(model)
    w = make_window(tok, load_text(text), n, 128, name=text)
    ref = teacher(model, w)
    full, _, _ = prefill(model, w.context)
    cfg, block, t = CompressConfig(ratio=ratio), None, time.perf_counter()
    for a in range(0, n, part):
        b = min(n, a + part)
        exact = None if a == 0 else shared_cache(model, [x.keys[0, :, :a] for x in full.layers],
                                                   [x.values[0, :, :a] for x in full.layers])  # fmt: skip
        cap = capture_part(model, exact, w.context, a, b, cfg, tok, progress=True)
        block = join_blocks(model, block, compress_captured(model, cap, cfg, progress=False), b)
    row = {"text": text, "n": n, "part": part, "ratio": ratio, "config": "parts read over the exact prefix",
           "kl": score(model, block, w, ref)["kl"], "seconds": time.perf_counter() - t}  # fmt: skip
    print(json.dumps(row), flush=True)
    with results_file(out, ".jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
