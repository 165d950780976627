"""Parity check: our eviction baselines against kvpress's presses on the same window (needs `.[peers]`).

python benchmarks/kvpress_parity.py
"""

import json

from kvsculpt import compress, load_model
from kvsculpt.bench.peers import run_presses
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window

PAIRS = {"SnapKVPress": "snapkv", "StreamingLLMPress": "streaming-llm", "KnormPress": "knorm"}

if __name__ == "__main__":
    model, tok = load_model("smollm2-135m")
    w = make_window(tok, load_text("fastmcp_background_tasks"), 1024, 128)
    ref = teacher(model, w)
    for row in run_presses("smollm2-135m", w.context, w.continuation, [0.3], presses=list(PAIRS)):
        method = PAIRS[row["method"].split(".")[1]]
        ours = compress(model, w.context, ratio=0.3, method=method, fit=False, allocation="uniform",
                        queries="context", progress=False)  # fmt: skip
        kl = score(model, ours, w, ref)["kl"]
        print(json.dumps({"press": row["method"], "kvpress_kl": row["kl"], "kvsculpt_kl": kl, "ratio": 0.3}))
