"""Parity: our copies of kvpress's presses against kvpress itself, on the same windows (needs kvpress: `make peers`).

    python benchmarks/kvpress_parity.py --texts fastmcp_background_tasks openai_agents_tar_utils --ratios 0.1 0.3 0.5 0.7

For each window and kept ratio, kvpress runs its presses in a subprocess (it patches transformers globally) and
we run the matching CompressConfig in this process; both are scored by KL on the real continuation against
the same full-cache teacher. Writes results/kvpress_parity.{jsonl,md} (resumable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from kvsculpt import CompressConfig, CompressedCache, compress, load_model
from kvsculpt.bench.peers import run_presses
from kvsculpt.bench.runner import RowFile, grid_parser
from kvsculpt.core.attention import future_mask, logits
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import windows
from kvsculpt.hf.attention import capture_queries
from kvsculpt.hf.capture import chat_template_parts, repeat_prompt_ids
from kvsculpt.hf.decode import forward
from kvsculpt.hf.dims import model_dims

EVICT = dict(fit=False, allocation="uniform", queries="context", heldout=0.0)
# kvpress press -> our configuration of the same rule
PAIRS = {
    "SnapKVPress": CompressConfig(method="snapkv", **EVICT),
    "StreamingLLMPress": CompressConfig(method="streaming-llm", **EVICT),
    "KnormPress": CompressConfig(method="knorm", **EVICT),
    # KVzip: the peak attention of every query of the repeat pass (request and copy), KVzip's request wrapped by
    # the chat template, every entry ranked globally with sinks first, no per-head floor, copied values
    "KVzipPress": CompressConfig(
        method="kvzip",
        fit=False,
        allocation="global",
        queries="repeat",
        floor=1,
        repeat_prompt="kvzip",
        max_queries=None,
        heldout=0.0,
    ),  # fmt: skip
}
RESULTS = Path(__file__).parent / "results"


def chat_prefix_length(tok) -> int:
    """Tokens the chat template puts before a user's message (kvpress assumes the context starts with them)."""
    return len(tok(chat_template_parts(tok)[0], add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def kvzip_as_kvpress(model, tok, context, ratio: float, sinks: int = 4) -> CompressedCache:
    """kvpress 0.5.5's KVzipPress rebuilt from its description on our primitives, to locate the difference to
    our ``kvzip``: kvpress takes the context to begin with the chat template's user prefix (``P`` tokens, 24 on
    SmolLM2), so it reconstructs only ``context[P:]``, leaves the scores of ``context[sinks:P]`` at 0 and out
    of the softmax, and prunes the lowest ``int((1 − ratio)·entries)`` scores with no floor (a head may keep
    nothing: here one entry masked by β = −inf). Values copied. Diagnostic only (one chunk: n ≤ 2048)."""
    dims = model_dims(model)
    n, P = context.shape[1], chat_prefix_length(tok)
    prompt = repeat_prompt_ids(tok, "kvzip")
    ids = torch.cat([context, prompt, context[:, P:]], dim=1)
    t = ids.shape[1] - n
    cache = DynamicCache()
    with capture_queries(model) as qs:
        forward(model, ids, cache, 0, last_only=True)
    sink = min(sinks, P)
    scores = torch.zeros(dims.layers, dims.kv_heads, n)
    for li, layer in enumerate(cache.layers):
        K = layer.keys[0].float()  # [Hkv, n + t, d]
        keys = torch.cat([K[:, :sink], K[:, P:n], K[:, n:]], dim=1)
        q = torch.cat(qs[li], dim=2)[0, :, -t:].float().reshape(dims.kv_heads, dims.groups, t, -1)
        lg = logits(q, keys[:, None], dims.scale)  # [Hkv, G, t, keys]
        lg[..., -t:] = lg[..., -t:].masked_fill(future_mask(t, t), float("-inf"))
        scores[li, :, P:n] = torch.softmax(lg, -1)[..., sink : sink + n - P].amax(dim=(1, 2))
    scores[..., :sinks] = scores.max() + 1.0
    pruned = int(scores.numel() * (1.0 - ratio))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[(-scores.flatten()).topk(pruned).indices] = False
    keep = keep.reshape(scores.shape)
    keys, values, bias = [], [], []
    for li, layer in enumerate(cache.layers):
        K, V = layer.keys[0, :, :n], layer.values[0, :, :n]
        idx = [keep[li, h].nonzero().squeeze(1) for h in range(dims.kv_heads)]
        none = [i.numel() == 0 for i in idx]
        idx = [torch.zeros(1, dtype=torch.long) if e else i for i, e in zip(idx, none, strict=True)]
        keys.append([K[h, i] for h, i in enumerate(idx)])
        values.append([V[h, i] for h, i in enumerate(idx)])
        bias.append(
            [
                torch.full((1,), float("-inf")) if e else torch.zeros(i.numel())
                for i, e in zip(idx, none, strict=True)
            ]
        )
    return CompressedCache.from_heads(model, keys, values, n, bias)


def main():
    ap = grid_parser(
        __doc__, ratios=[0.3], out=str(RESULTS / "kvpress_parity"), by_window=False, report=False
    )
    ap.add_argument(
        "--texts", nargs="+", default=["fastmcp_background_tasks"], help="the first window of each"
    )
    ap.add_argument("--presses", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = ap.parse_args()
    jsonl = Path(args.out + ".jsonl")
    done = RowFile(jsonl)
    model, tok = load_model(args.model)
    wins = windows(tok, args.texts, args.context_tokens, args.continuation_tokens)
    with done:
        for w in wins:
            todo = [p for p in args.presses if any((w.id, p, r) not in done for r in args.ratios)]
            if not todo:
                continue
            ref = teacher(model, w)
            for row in run_presses(args.model, w.context, w.continuation, args.ratios, presses=todo):
                press = row["method"].split(".")[1]
                cfg = PAIRS[press].replace(ratio=row["ratio"])
                ours = compress(model, w.context, cfg, tokenizer=tok, progress=False)
                out = {"window": w.id, "config": press, "ratio": row["ratio"], "model": args.model,
                       "kvpress_kl": row["kl"], "kvsculpt_kl": score(model, ours, w, ref)["kl"],
                       "kvpress": row["press"], "kvsculpt": repr(cfg)}  # fmt: skip
                if press == "KVzipPress":
                    replica = kvzip_as_kvpress(model, tok, w.context, row["ratio"])
                    out["replica_kl"] = score(model, replica, w, ref)["kl"]
                done.add(out)
                print(json.dumps(out), flush=True)
    rows = [r for r in RowFile(jsonl).values() if r.get("model", "smollm2-135m") == args.model]
    lines = [f"# Parity with kvpress: {args.model}, n={args.context_tokens}, T={args.continuation_tokens}", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "KL (nats/token) on the real continuation; `ratio` = fraction kept (kvpress ran at 1 − ratio).", "",
             "`replica`: kvpress's KVzip rebuilt with its chat-prefix artifact (`kvzip_as_kvpress`), a diagnostic.",
             "", "| press | window | ratio | kvpress KL | kvsculpt KL | ours / kvpress | replica KL | replica / kvpress |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["config"], r["window"], r["ratio"])):
        rep = r.get("replica_kl")
        lines.append(f"| {r['config']} | {r['window']} | {r['ratio']} | {r['kvpress_kl']:.4g} | "
                     f"{r['kvsculpt_kl']:.4g} | {r['kvsculpt_kl'] / r['kvpress_kl']:.3f} | "
                     + ("– | – |" if rep is None else f"{rep:.4g} | {rep / r['kvpress_kl']:.3f} |"))  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
