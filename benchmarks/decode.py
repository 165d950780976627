"""Compress while generating: a decode budget against the full cache over the model's own long generation.

    python benchmarks/decode.py --models smollm2-135m --generate 1024 --out benchmarks/results/decode_smollm2
    python benchmarks/decode.py --smoke --out /tmp/decode      # a tiny random model: the script's own check

For each model: the first ``--context-tokens`` tokens of a shipped text, then a prompt that makes the model
write at length (a step-by-step explanation). The context's full cache is the block: a rule with ``@all`` may cut
its entries too (the library's default scope), the others compress only the generated part. The model first
generates ``--generate`` greedy tokens from the full cache (the teacher).
Each budgeted run then reads those same tokens one at a time (teacher-forced), on a fork with
``decode_budget = budget · generated`` and ``every = K``. It records the KL of its next-token distributions
against the teacher's at every position, greedy agreement (its argmax equals the teacher's token), tokens per
second (beside the full cache's, read in the same process) and peak memory. The peers are StreamingLLM's rule
on the same budget (``keep="recent"``: the last tokens, the context standing for its sinks) and kvpress's
DecodingPress (``--peers``) at the same largest cache. Rows go to OUT.jsonl, one per run, so a rerun skips what
is there; OUT.md has the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPT = ("\n\nQuestion: Explain, step by step and in detail, what the text above does, part by part, and why."
          "\nAnswer: Let us go through it step by step.\n\nStep 1:")  # fmt: skip
TEXTS = {"smollm2-135m": "openai_agents_sandbox_guide", "qwen2.5-coder-0.5b": "openai_agents_run_loop"}


def read(model, cache, start: int, prompt: torch.Tensor, tokens: list[int]):
    """:func:`kvsculpt.hf.decode.read_tokens` with the peak memory of its token-by-token part."""
    from kvsculpt.compress import PeakMemory
    from kvsculpt.hf.decode import read_tokens

    with PeakMemory(model.device) as peak:
        logprobs, seconds = read_tokens(model, cache, start, prompt, tokens)
    return logprobs, seconds, peak.extra


@torch.inference_mode()
def teacher(model, cache, start: int, prompt: torch.Tensor, steps: int) -> list[int]:
    """The full cache's greedy continuation of ``prompt``: ``steps`` token ids."""
    from kvsculpt.hf.decode import decode

    return decode(model, cache, prompt, start, steps)[0].tolist()


def run_model(name: str, args, done: dict, jsonl: Path) -> None:
    from kvsculpt.cli import context_floor_arg
    from kvsculpt.eval.metrics import read_agreement
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.decode import full_cache, text_ids
    from kvsculpt.hf.models import encode, load_model

    if args.smoke:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import tiny_model

        model, ids, prompt = (
            tiny_model("llama"),
            torch.randint(0, 97, (1, args.context_tokens)),
            torch.tensor([[5, 6]]),
        )
    else:
        model, tok = load_model(name, dtype=args.dtype)
        ids = encode(tok, load_text(args.text or TEXTS[name]))[:, : args.context_tokens]
        prompt = text_ids(tok, PROMPT)
    n, T = ids.shape[1], args.generate
    context = full_cache(model, ids)
    tokens = teacher(model, context.fork(), n, prompt, T)
    cells = [(rule, frac, every) for rule in args.rules for frac in args.budgets for every in args.every
             if every < max(2, round(frac * T)) and (name, rule, frac, every) not in done]  # fmt: skip
    if cells or (name, "full", 1.0, 0) not in done:  # the full cache's own read: the reference
        ref, ref_s, ref_peak = read(model, context.fork(), n, prompt, tokens)
    grams = {tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)}
    base = {"model": name, "n": n, "generated": T, "prompt_tokens": prompt.shape[1], "dtype": args.dtype,
            "distinct_4grams": len(grams) / max(1, len(tokens) - 3)}  # low: the generation repeats itself  # fmt: skip
    if cells:  # the full cache's speed in this process, beside each row measured here
        base["full_tokens_per_s"] = (T - 1) / ref_s

    def add(row):
        done[(row["model"], row["rule"], row["budget"], row["every"])] = row
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("model", "rule", "budget", "every", "kl", "agree", "tokens_per_s")}),
              flush=True)  # fmt: skip

    if (name, "full", 1.0, 0) not in done:
        text = "" if args.smoke else tok.decode(tokens[:200])
        add({**base, "teacher_head": text, "rule": "full", "budget": 1.0, "every": 0, "kl": 0.0, "kl_worst_block": 0.0, "agree": 1.0,
             "tokens_per_s": (T - 1) / ref_s, "peak_extra_bytes": ref_peak, "kept_end": prompt.shape[1] + T})  # fmt: skip
    for rule, frac, every in cells:
        budget = max(2, round(frac * T))
        base_rule, _, scope = rule.partition("@")
        keep, _, refit = base_rule.partition("+")
        scope, _, floor = scope.partition(":")
        cache = context.fork(decode_budget=budget, every=every, keep=keep, refit=refit == "refit",
                             scope=scope or "appended", context_floor=context_floor_arg(floor or "0"))  # fmt: skip
        got, seconds, peak = read(model, cache, n, prompt, tokens)
        add({**base, "rule": rule, "budget": frac, "every": every, "budget_tokens": budget,
             **read_agreement(ref, got, tokens), "tokens_per_s": (T - 1) / seconds, "peak_extra_bytes": peak,
             "kept_end": max(layer.appended() - layer.adopted for layer in cache.layers)})  # fmt: skip
    if not args.smoke:
        run_peers(name, args, done, add, ids, prompt, tokens, base)


def run_peers(name: str, args, done: dict, add, context_ids, prompt, tokens, base: dict) -> None:
    """kvpress's DecodingPress on each (budget, K) cell, at the same largest cache: the whole cache (context
    included) is compressed to ``n + budget − K`` every K steps, so it holds at most ``n + budget`` tokens, as a
    fork with ``decode_budget = budget`` does."""
    from kvsculpt.bench import peers

    n, T = context_ids.shape[1], len(tokens)
    configs = []
    for frac in args.budgets:
        for every in args.every:
            budget = max(2, round(frac * T))
            for press in args.peers:
                if every < budget and (name, f"kvpress.DecodingPress({press})", frac, every) not in done:
                    configs.append({"base": press, "every": every, "budget": frac, "budget_tokens": budget,
                                    "target_size": n + budget - every})  # fmt: skip
    if not configs:
        return
    if not peers.available():
        print("kvpress is not installed (`make peers`): the DecodingPress peers are skipped", flush=True)
        return

    def row(r):
        add({**base, **r, "rule": r["method"], "kept_end": r["kept_end"] - n, "peak_extra_bytes": None})

    peers.read_with_decoding_presses(name, context_ids, prompt, tokens, configs, on_row=row, dtype=args.dtype)


def report(rows: list[dict], args, out: Path) -> None:
    lines = [f"# Compress while generating ({', '.join(sorted({r['model'] for r in rows}))})", "",
             f"Command: `python benchmarks/decode.py {' '.join(args.argv)}`", "",
             "The context's full cache is the block; rules without `@all` keep it whole and compress the generated "
             "tokens only. KL: mean over the generated positions "
             "of KL(full-cache run ‖ budgeted run), teacher-forced on the full cache's greedy tokens; worst 128: the "
             "worst block of 128 positions; agree: greedy agreement with the full cache's tokens. Budget: the "
             "fraction of the generated length kept per head (the prompt's tokens count in it). `attention`: "
             "kvsculpt's rule (the most-read tokens and the `min(K, half)` most recent); `+refit`: the kept values "
             "refitted at each cut (the library's default); `@all`: the budget bounds the whole cache (n + budget "
             "entries per head), so a cut may drop the context's entries too; `recent`: StreamingLLM's (the last tokens); "
             "`kvpress.DecodingPress(X)`: kvpress's decoding press with scorer X, compressing the whole cache "
             "(context included) to n + budget − K every K steps (the same largest cache; kept: its tokens beyond n "
             "at the end). One core, this machine.", "",
             "| model | rule | budget | every K | KL | worst 128 | last quarter | agree | tokens/s | kept at the end |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(
        rows, key=lambda r: (r["model"], r["rule"] != "full", r["budget"], r["every"], r["rule"])
    ):
        lines.append(f"| {r['model']} | {r['rule']} | {r['budget']:.0%} | {r['every'] or '–'} | {r['kl']:.3g} | "
                     f"{r['kl_worst_block']:.3g} | {r.get('kl_last_quarter', 0.0):.3g} | {r['agree']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['kept_end']} |")  # fmt: skip
    (out.parent / (out.name + ".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(TEXTS), choices=list(TEXTS), help="packaged models")
    ap.add_argument("--context-tokens", type=int, default=1024, help="context length (default: %(default)s)")
    ap.add_argument("--generate", type=int, default=1024, help="generated tokens (default: %(default)s)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                    help="kept fractions of the generated length (default: %(default)s)")  # fmt: skip
    ap.add_argument("--every", type=int, nargs="+", default=[64, 256], help="K (default: %(default)s)")
    ap.add_argument("--rules", nargs="+", default=["attention+refit@all", "attention+refit", "recent"],
                    help="keep rules (attention, recent), each with +refit to refit the kept values at each cut "
                    "and @all to let the cuts drop the context's entries too (a whole-cache budget, as kvpress's "
                    "DecodingPress has; kept at the end then counts entries beyond n), @all:F with a context floor F (a cut "
                    "keeps at least that share of each head's context entries) (default: %(default)s)")  # fmt: skip
    ap.add_argument("--peers", nargs="*", default=["TOVAPress", "KnormPress"], metavar="PRESS",
                    help="kvpress scorer presses run inside kvpress's DecodingPress as peers, in kvpress's own "
                    "environment (default: %(default)s; none with a bare --peers)")  # fmt: skip
    ap.add_argument("--text", default=None, help="the shipped text (default: one per model)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: fp32 on a CPU)")
    ap.add_argument(
        "--smoke", action="store_true", help="a tiny random model, 40 context and 96 generated tokens"
    )
    ap.add_argument("--out", default="benchmarks/results/decode_cpu", help="OUT.jsonl and OUT.md")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite OUT.md from OUT.jsonl, running nothing"
    )
    args = ap.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    if args.smoke:
        args.models, args.context_tokens, args.generate, args.every = ["smoke"], 40, 96, [8, 32]
    out = Path(args.out)
    jsonl = out.parent / (out.name + ".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["rule"], r["budget"], r["every"])] = r
    for name in [] if args.report_only else args.models:
        run_model(name, args, done, jsonl)
    report(list(done.values()), args, out)


if __name__ == "__main__":
    main()
