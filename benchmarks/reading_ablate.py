"""Why compressing while reading loses to one-shot: the same parts, read over the exact prefix, or given the
one-shot ranking's share of the budget.

    python benchmarks/reading_ablate.py openai_agents_sandbox_guide 4096 2048 0.3 benchmarks/results/reading_ablate_smollm2
    python benchmarks/reading_ablate.py openai_agents_sandbox_guide 4096 2048 0.3 benchmarks/results/reading_ablate_smollm2 \
        --prefix compressed --budgets one-shot

Arguments: a shipped text, n, the part size, r, OUT. Each part of the window is read over the *full* cache of
the tokens before it (``--prefix exact``, one prefill; ``hf.capture.capture_part`` with the exact prefix) or
over the compressed block of the parts before it (``--prefix compressed``, what ``compress(...,
chunk_tokens=PART)`` does), and solved alone to r of its own entries (``--budgets own``) or to the share of the
budget the one-shot default's global ranking gives that part (``--budgets one-shot``: the whole window captured
and ranked first, so an oracle no reader has). So its KL against ``kvsculpt reading PART`` isolates what
reading over a compressed prefix costs, and the oracle budgets what a fixed share per part costs. SmolLM2, fp32,
one thread, KL over the 128 tokens after the window. Appends to OUT.jsonl.
"""

import argparse
import json
import sys
import time

import torch

from kvsculpt.bench.runner import results_file
from kvsculpt.cache import join_blocks, shared_cache
from kvsculpt.compress import captured_entry_scores, compress, compress_captured
from kvsculpt.config import CompressConfig
from kvsculpt.core.budget import kept
from kvsculpt.eval.metrics import score, teacher
from kvsculpt.eval.texts import load_text, make_window
from kvsculpt.hf.attention import use_kvsculpt_attention
from kvsculpt.hf.capture import capture, capture_part
from kvsculpt.hf.decode import prefill
from kvsculpt.hf.models import load_model

compress_module = sys.modules["kvsculpt.compress"]  # (the package's name `compress` is the function)


def one_shot_shares(model, tok, ids, cfg: CompressConfig, part: int) -> list[float]:
    """Per part: the share of its entries that the one-shot default's global ranking keeps (the same entries
    ``Global.plan`` ranks, floors left out)."""
    cap = capture(model, ids, cfg, tokenizer=tok, progress=True)
    scores = captured_entry_scores(cap, cfg)  # [L, Hkv, n]
    L, H, n = scores.shape
    best = scores.flatten().topk(kept(n, cfg.ratio) * L * H).indices % n
    counts = torch.bincount(best // part, minlength=-(-n // part)).tolist()
    return [c / (L * H * (min(n, (i + 1) * part) - i * part)) for i, c in enumerate(counts)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text")
    p.add_argument("n", type=int)
    p.add_argument("part", type=int)
    p.add_argument("ratio", type=float)
    p.add_argument("out")
    p.add_argument("--prefix", choices=["exact", "compressed"], default="exact")
    p.add_argument("--budgets", choices=["own", "one-shot", "running", "running-no-rescore"], default="own")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    use_kvsculpt_attention(model)
    w = make_window(tok, load_text(args.text), args.n, 128, name=args.text)
    ref = teacher(model, w)
    full, _, _ = prefill(model, w.context)
    cfg, block, t = CompressConfig(ratio=args.ratio), None, time.perf_counter()
    shares = None
    if args.budgets.startswith("running"):  # compress(..., chunk_tokens=PART)
        if args.budgets == "running-no-rescore":  # the block keeps the scores its entries had when read
            records = compress_module.kept_records
            keys = ("score", "part")
            compress_module.kept_records = lambda *a: {k: v for k, v in records(*a).items() if k in keys}
        if args.prefix != "compressed":
            raise SystemExit("--budgets running reads over the compressed prefix (--prefix compressed)")
        block = compress(model, w.context, cfg.replace(chunk_tokens=args.part), tokenizer=tok)
        L, H = len(block.layers), len(block.layers[0].lengths)
        shares = [sum(map(sum, p)) / (L * H * (min(args.n, a + args.part) - a))
                  for p, a in zip(block.info["part_entries"], range(0, args.n, args.part), strict=True)]  # fmt: skip
    elif args.budgets == "one-shot":
        shares = one_shot_shares(model, tok, w.context, cfg, args.part)
        print("one-shot shares per part:", [round(s, 3) for s in shares], flush=True)
    for i, a in enumerate(range(0, args.n, args.part) if not args.budgets.startswith("running") else []):
        b = min(args.n, a + args.part)
        if args.prefix == "exact":
            prior = None if a == 0 else shared_cache(model, [x.keys[0, :, :a] for x in full.layers],
                                                     [x.values[0, :, :a] for x in full.layers])  # fmt: skip
        else:
            prior = block
        part_cfg = cfg if shares is None else cfg.replace(ratio=min(1.0, shares[i]))
        cap = capture_part(model, prior, w.context, a, b, part_cfg, tok, progress=True)
        block = join_blocks(model, block, compress_captured(model, cap, part_cfg, progress=False), b)
    config = f"parts read over the {args.prefix} prefix, {args.budgets} budgets"
    row = {"text": args.text, "n": args.n, "part": args.part, "ratio": args.ratio, "config": config,
           "shares": shares, "kl": score(model, block, w, ref)["kl"], "seconds": time.perf_counter() - t}  # fmt: skip
    print(json.dumps(row), flush=True)
    with results_file(args.out, ".jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
