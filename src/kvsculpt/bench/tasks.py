"""``kvsculpt bench tasks``: RULER-style tasks and document QA (:mod:`kvsculpt.eval.tasks`), accuracy against the
kept fraction, for our methods, the full cache and kvpress presses in the same run.

Each sample's context is compressed before its question is seen; the question is then answered greedily (up to
the sample's token limit, stopping at a blank line) and scored by :func:`~kvsculpt.eval.tasks.score_reply`.
Two references: ``full`` (the uncompressed cache) and ``no context`` (the question alone: what the model
guesses without the text). Rows are cached in ``tasks_<model>_n<N>.jsonl`` keyed by (task, sample, method,
ratio), so a run continues where it stopped; ``--report-only`` rewrites ``.json``, ``.md`` and ``.png`` from them.

Intervals: an accuracy over K samples is given with its 95 % Wilson score interval (exact for 0/1 scores, an
approximation for the fractional scores of the multi-item tasks; unlike ± 1.96 standard errors it does not
shrink to nothing at 0 % or 100 %); a difference to the full cache is the paired mean difference over the same
samples, ± 1.96 of its standard error (0 when every sample agrees: read it with K).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..compress import compress_captured
from ..config import CompressConfig
from ..eval.tasks import TASKS, score_reply, task_samples
from ..hf.capture import capture
from ..hf.decode import answer_text, decode, eos_ids, prefill, text_ids, text_stop
from .paper import PAPER_GRID, check_cached_setting
from .runner import RowFile

METHODS = {
    "default": CompressConfig(),
    "learned": CompressConfig(method="learned"),  # the shipped scorer's choice, values fitted on self samples
    "learned, one prefill": CompressConfig(method="learned", fit=False),
    "Select+Fit": PAPER_GRID["Select+Fit"],
    "Sculpt": CompressConfig(method="sculpt"),  # from the default's cache (the paper's form: PAPER_GRID)
    "default + refine (20 steps)": CompressConfig(refine="kl", refine_steps=20),
}
# run only when named in --methods: Sculpt and refine cost 20-40x the prefill on a CPU, Select+Fit is the paper's
OPT_IN = ("Select+Fit", "Sculpt", "default + refine (20 steps)")
PRESSES = ("KVzipPress", "SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress")
FULL, NO_CONTEXT = "full", "no context"
STOP = "\n\n"
PARTS = ("all", "ours", "presses")
TARGET_POINTS = 3  # the bar at r = 0.25: within this many points of the full cache on every task


@torch.inference_mode()
def reply(model, tokenizer, cache, start: int, sample) -> tuple[str, float, float]:
    """The greedy reply to ``sample.question`` after ``cache`` (logical length ``start``, extended in place; None:
    no context), its score and the seconds it took."""
    t0 = time.perf_counter()
    cache = DynamicCache() if cache is None else cache
    tokens = decode(model, cache, text_ids(tokenizer, sample.question), start, sample.max_new_tokens,
                    stop=text_stop(eos_ids(model, tokenizer), tokenizer, STOP))  # fmt: skip
    text = answer_text(tokenizer, tokens[0].tolist())
    return text, score_reply(text, sample.answers), time.perf_counter() - t0


def stem(args) -> str:
    return f"tasks_{Path(args.model).name}_n{args.context_tokens}"


@dataclass
class TasksBench:
    """What ``kvsculpt bench tasks`` runs (the CLI builds it from its options; defaults are the CLI's)."""

    model: str = "qwen2.5-coder-0.5b"
    context_tokens: int = 2048
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.25])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    samples: int = 30
    seed: int = 0
    methods: list[str] | None = None  # from METHODS (None: all but OPT_IN)
    presses: list[str] = field(default_factory=lambda: list(PRESSES))
    peers: bool = True
    dtype: str | None = None  # the model's dtype (None: fp32 on a CPU, bf16 on CUDA); presses run in it too
    part: str = (
        "all"  # "ours" (references and our methods), "presses", or both: two processes can share a run
    )
    out: str = "benchmarks/results"
    report_only: bool = False
    command_line: str = "kvsculpt bench tasks"


def tasks_bench(args: TasksBench) -> dict:
    """Run what is missing of (samples × tasks) × (references, methods × ratios, presses × ratios), sample by
    sample across the tasks (an interrupted run has every task at about the same count), then write the report.

    Cost per sample: our methods sharing a capture share it across their ratios (one capture, a solve per ratio);
    ``learned`` scores once for all ratios; the presses of the whole run go to one kvpress subprocess (one model
    load), sample-major too. ``part="ours"`` and ``part="presses"`` split a run between two processes (a core
    each) writing the same row file."""
    from ..hf.models import load_model
    from . import peers

    out = Path(args.out)
    jsonl = out / f"{stem(args)}.jsonl"
    if args.report_only:
        if not jsonl.exists():
            raise FileNotFoundError(f"no cached rows at {jsonl}: run without --report-only first")
        return report(_rows(jsonl), args, out)
    if args.part not in PARTS:
        raise ValueError(f"unknown part {args.part!r}; choose from {', '.join(PARTS)}")
    unknown = set(args.methods or ()) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    setting = {"model": args.model, "context_tokens": args.context_tokens, "seed": args.seed}
    check_cached_setting(jsonl, setting | ({"dtype": args.dtype} if args.dtype else {}))
    methods = {k: v for k, v in METHODS.items() if (k in args.methods if args.methods else k not in OPT_IN)}
    presses = list(args.presses) if args.peers and args.part != "ours" and peers.available() else []
    if args.peers and args.part != "ours" and not presses and args.presses:
        print("kvpress is not installed (`make peers` makes its environment): the presses are skipped")
    model, tok = load_model(args.model, dtype=args.dtype)
    methods = _with_scorer(model, methods, explicit=bool(args.methods))
    samples = {t: task_samples(tok, t, args.context_tokens, args.samples, args.seed) for t in args.tasks}
    order = [(t, samples[t][i]) for i in range(args.samples) for t in args.tasks]  # sample-major
    done = RowFile(jsonl, key=_key)
    with done:
        ours = [(FULL, 1.0), (NO_CONTEXT, 0.0)] + [(m, r) for m in methods for r in args.ratios]
        if args.part != "presses":
            todo = [(t, s) for t, s in order if any((t, s.index, m, r) not in done for m, r in ours)]
            for t, s in tqdm(todo, desc="our methods", unit="sample"):
                _run_ours(model, tok, t, s, methods, args, done)
        wanted = [(f"kvpress.{p}", r) for p in presses for r in args.ratios]
        todo = [(t, s) for t, s in order if any((t, s.index, m, r) not in done for m, r in wanted)]
        if todo:
            bar = tqdm(total=len(todo) * len(wanted), desc="kvpress (one subprocess)", unit="answer")
            prompts = [(s.context, text_ids(tok, s.question), s.max_new_tokens) for _, s in todo]

            def record(row):
                t, s = todo[row["prompt"]]
                if (t, s.index, row["method"], row["ratio"]) not in done:
                    text = answer_text(tok, row["tokens"])
                    _write(done, args, t, s, row["method"], row["ratio"], text, score_reply(text, s.answers),
                           capture_seconds=0.0, solve_seconds=row["compress_seconds"],
                           answer_seconds=row["answer_seconds"])  # fmt: skip
                bar.update()

            peers.generate_with_presses(args.model, prompts, args.ratios, presses, on_row=record, dtype=args.dtype,
                                        stop=STOP)  # fmt: skip
            bar.close()
    return report(_rows(jsonl), args, out)


def _with_scorer(model, methods: dict, explicit: bool) -> dict:
    """``methods`` without the ``learned`` ones when the model has no trained scorer (said once; an error if
    they were asked for by name)."""
    from ..core.methods import Learned
    from ..learned import find_weights

    learned = [k for k, cfg in methods.items() if isinstance(cfg.solver, Learned)]
    if not learned:
        return methods
    try:
        find_weights(model)
    except ValueError as e:
        if explicit:
            raise
        print(f"{e}; the learned rows are skipped")
        return {k: v for k, v in methods.items() if k not in learned}
    return methods


def _write(done, args, task, s, method, ratio, text, score, **extra) -> None:
    done.add({"task": task, "sample": s.index, "method": method, "ratio": ratio, "reply": text, "score": score,
              "answers": s.answers, "source": s.source, "context_tokens": s.context.shape[1], "model": args.model,
              "dtype": args.dtype, **extra})  # fmt: skip


def _run_ours(model, tok, task, s, methods: dict, args, done) -> None:
    """The references and our methods at every ratio on one sample, the rows not yet in ``done``. Stages per
    row: ``capture_seconds`` (shared by the ratios and by the methods of one capture group: the same number on
    each of their rows), ``solve_seconds`` (this ratio's), ``answer_seconds``."""
    from ..compress import compress_learned, learned_scores
    from ..core.methods import Learned

    n = s.context.shape[1]
    if (task, s.index, FULL, 1.0) not in done:
        cache, _, seconds = prefill(model, s.context)
        text, score, answer_s = reply(model, tok, cache, n, s)
        _write(done, args, task, s, FULL, 1.0, text, score, capture_seconds=seconds, solve_seconds=0.0,
               answer_seconds=answer_s)  # fmt: skip
    if (task, s.index, NO_CONTEXT, 0.0) not in done:
        text, score, answer_s = reply(model, tok, None, 0, s)
        _write(done, args, task, s, NO_CONTEXT, 0.0, text, score, capture_seconds=0.0, solve_seconds=0.0,
               answer_seconds=answer_s)  # fmt: skip
    groups = defaultdict(list)  # methods sharing what the ratios reuse: a capture, or learned scores
    for name, cfg in methods.items():
        groups[repr(cfg.solver) if isinstance(cfg.solver, Learned) else cfg.capture_key()].append(name)
    for names in groups.values():
        missing = [(m, r) for m in names for r in args.ratios if (task, s.index, m, r) not in done]
        if not missing:
            continue
        first = methods[names[0]]
        t0 = time.perf_counter()
        if isinstance(first.solver, Learned):
            shared = learned_scores(model, s.context, first, progress=False)
        else:
            shared = capture(model, s.context, first, tokenizer=tok, progress=False,
                             keep_context_queries=any(methods[m].solver.needs_context_queries for m in names))  # fmt: skip
        capture_s = time.perf_counter() - t0
        for m, r in missing:
            cfg = methods[m].replace(ratio=r)
            t0 = time.perf_counter()
            if isinstance(cfg.solver, Learned):
                cache = compress_learned(model, s.context, cfg, progress=False, scored=shared)
            else:
                cache = compress_captured(model, shared, cfg, progress=False, tokenizer=tok)
            solve_s = time.perf_counter() - t0
            text, score, answer_s = reply(model, tok, cache.fork(), n, s)
            _write(done, args, task, s, m, r, text, score, capture_seconds=capture_s, solve_seconds=solve_s,
                   answer_seconds=answer_s, compress_config=repr(cfg))  # fmt: skip


def _key(row) -> tuple:
    return row["task"], row["sample"], row["method"], row["ratio"]


def _rows(jsonl: Path) -> list[dict]:
    return list(RowFile(jsonl, key=_key).values())


def mean_interval(xs) -> tuple[float, float]:
    """Mean of ``xs`` and the half-width of its 95 % interval (1.96 standard errors; 0 for one value)."""
    xs = list(xs)
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, 1.96 * math.sqrt(var / len(xs))


def wilson(p: float, k: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``p`` seen over ``k`` trials."""
    centre, denom = p + z * z / (2 * k), 1 + z * z / k
    half = z * math.sqrt(max(p * (1 - p), 0.0) / k + z * z / (4 * k * k))
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def summarise(rows) -> dict:
    """``{(task, method, ratio): {"acc", "low", "high", "k", "delta", "delta_pm"}}`` in percent (``low``–``high``:
    the Wilson interval); ``delta``: the paired difference to the full cache over the samples both answered."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["task"], r["method"], r["ratio"])][r["sample"]] = r["score"]
    full = {t: s for (t, m, _), s in by.items() if m == FULL}
    out = {}
    for (task, method, ratio), scores in by.items():
        acc = sum(scores.values()) / len(scores)
        low, high = wilson(acc, len(scores))
        ref = full.get(task, {})
        common = [i for i in scores if i in ref]
        d, dpm = mean_interval([scores[i] - ref[i] for i in common]) if common else (math.nan, math.nan)
        out[(task, method, ratio)] = {"acc": 100 * acc, "low": 100 * low, "high": 100 * high, "k": len(scores),
                                      "delta": 100 * d, "delta_pm": 100 * dpm}  # fmt: skip
    return out


def report(rows, args: TasksBench, out: Path) -> dict:
    """Tables (one per ratio: methods × tasks, with the average over tasks), the target check at r = 0.25, a
    figure (a panel per task: accuracy against the kept fraction, a line per method); returns the summary."""
    summ = summarise(rows)
    tasks = [t for t in TASKS if any(k[0] == t for k in summ)]
    ratios = sorted({k[2] for k in summ if k[1] not in (FULL, NO_CONTEXT)})
    methods = list(dict.fromkeys(k[1] for k in sorted(summ, key=lambda k: (k[1].startswith("kvpress."), k[1]))
                                 if k[1] not in (FULL, NO_CONTEXT)))  # fmt: skip
    ks = sorted({v["k"] for v in summ.values()})
    dtypes = sorted({str(r.get("dtype") or "fp32") for r in rows})
    lines = [f"# Downstream tasks: {args.model}, contexts of {args.context_tokens} tokens ({', '.join(dtypes)})", "",
             f"Command: `{args.command_line}`", "",
             f"Samples per (task, method, ratio): {', '.join(map(str, ks))}. Accuracy in % (the mean per-sample score: "
             "the fraction of the answer's items in the reply) and its 95 % Wilson interval. Each context is "
             "compressed before its question is seen. `no context`: the question alone, the model's guess.", ""]  # fmt: skip

    def cell(task, method, ratio):
        v = summ.get((task, method, ratio))
        return "–" if v is None else f"{v['acc']:.0f} ({v['low']:.0f}–{v['high']:.0f})"

    def average(method, ratio):
        vs = [summ.get((t, method, ratio)) for t in tasks]
        return None if any(v is None for v in vs) else sum(v["acc"] for v in vs) / len(vs)

    head = "| method | " + " | ".join(tasks) + " | average |"
    rule = "|---" * (len(tasks) + 2) + "|"
    lines += ["## References", "", head, rule]
    for m, r in [(FULL, 1.0), (NO_CONTEXT, 0.0)]:
        avg = average(m, r)
        lines.append(
            f"| {m} | "
            + " | ".join(cell(t, m, r) for t in tasks)
            + f" | {'–' if avg is None else f'{avg:.1f}'} |"
        )
    for r in ratios:
        lines += ["", f"## r = {r} (fraction of KV entries kept)", "", head, rule]
        for m in methods:
            avg = average(m, r)
            lines.append(
                f"| {m} | "
                + " | ".join(cell(t, m, r) for t in tasks)
                + f" | {'–' if avg is None else f'{avg:.1f}'} |"
            )
    for r in ratios:
        lines += same_samples_table(rows, tasks, r)
    lines += stage_table(rows)
    target = 0.25
    if target in ratios:
        ours = [m for m in methods if not m.startswith("kvpress.")]
        press = [m for m in methods if m.startswith("kvpress.")]
        lines += ["", f"## Target at r = {target}: within {TARGET_POINTS} points of the full cache on every task, ahead of every "
                  "press on the average", "", "Difference to the full cache in points (paired over the same samples, "
                  "± 95 % half-width):", "", head.replace(" average |", f" average | within {TARGET_POINTS} on every task |"),
                  rule + "---|"]  # fmt: skip
        for m in ours + press:
            ds = [summ.get((t, m, target)) for t in tasks]
            if any(d is None for d in ds):
                continue
            avg = average(m, target) - average(FULL, 1.0) if average(FULL, 1.0) is not None else math.nan
            ok = all(d["delta"] >= -TARGET_POINTS for d in ds)
            lines.append(f"| {m} | " + " | ".join(f"{d['delta']:+.0f} ± {d['delta_pm']:.0f}" for d in ds)
                         + f" | {avg:+.1f} | {'yes' if ok else 'no'} |")  # fmt: skip
        averages = {m: average(m, target) for m in ours + press}
        best = {side: max(((a, m) for m, a in averages.items() if m in names and a is not None), default=None)
                for side, names in (("ours", ours), ("press", press))}  # fmt: skip
        if best["ours"] and best["press"]:
            lines += ["", f"Average at r = {target}: our best, {best['ours'][1]}, {best['ours'][0]:.1f}; the best press, "
                      f"{best['press'][1]}, {best['press'][0]:.1f}."]  # fmt: skip
    summary = {f"{t}|{m}|{r}": v for (t, m, r), v in summ.items()}
    (out / f"{stem(args)}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"{stem(args)}.md").write_text("\n".join(lines) + "\n")
    _plot(summ, tasks, methods, ratios, out / f"{stem(args)}.png", f"{args.model}, n = {args.context_tokens}")
    print("\n".join(lines))
    return summary


def same_samples(rows, ratio: float) -> tuple[list[dict], list[str]]:
    """The rows at ``ratio`` (and the full cache's) of the (task, sample) pairs that every method run at
    ``ratio`` has answered, and those methods: a comparison on equal terms while a run is partial (the presses
    behind our methods, or the reverse)."""
    methods = sorted({r["method"] for r in rows if r["ratio"] == ratio})
    answered = defaultdict(set)
    for r in rows:
        if r["ratio"] == ratio or r["method"] == FULL:
            answered[r["task"], r["sample"]].add(r["method"])
    keep = {key for key, got in answered.items() if got >= {*methods, FULL}}
    return [
        r for r in rows if (r["task"], r["sample"]) in keep and (r["ratio"] == ratio or r["method"] == FULL)
    ], methods


def same_samples_table(rows, tasks: list[str], ratio: float) -> list[str]:
    """Accuracy in % at ``ratio`` on :func:`same_samples` (nothing when every method has the same samples)."""
    kept, methods = same_samples(rows, ratio)
    counts = Counter((r["task"], r["method"]) for r in rows if r["ratio"] == ratio)
    if len(set(counts.values())) <= 1 or not kept:
        return []
    summ = summarise(kept)
    per_task = {t: sum(1 for r in kept if r["task"] == t and r["method"] == FULL) for t in tasks}
    lines = ["", f"## r = {ratio} on the samples every method has reached", "",
             "Samples per task: " + ", ".join(f"{t} {k}" for t, k in per_task.items()) + ".", "",
             "| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]  # fmt: skip
    for m, r in [(FULL, 1.0)] + [(m, ratio) for m in methods]:
        vs = [summ.get((t, m, r)) for t in tasks]
        cells = ["–" if v is None else f"{v['acc']:.0f}" for v in vs]
        avg = "–" if any(v is None for v in vs) else f"{sum(v['acc'] for v in vs) / len(vs):.1f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return lines


def stage_table(rows) -> list[str]:
    """Markdown lines: mean seconds per sample by stage for each (method, ratio) whose rows record stages.
    ``capture`` is shared by the ratios of a method (and by the methods of one capture group): a sample's cost is
    one capture plus a solve and an answer per ratio."""
    by = defaultdict(list)
    for r in rows:
        if "capture_seconds" in r:
            by[(r["method"], r["ratio"])].append(r)
    if not by:
        return []
    lines = ["", "## Seconds per sample by stage", "", "Means over the samples run so far, one core. *capture*: the "
             "prefill and reference queries (ours; shared by a method's ratios), the full prefill (`full`); "
             "*solve*: this ratio's selection and fit (ours) or the press's prefill (kvpress); *answer*: the greedy "
             "reply.", "", "| method | r | samples | capture s | solve s | answer s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for (m, r), rs in sorted(
        by.items(), key=lambda kv: (kv[0][0].startswith("kvpress."), kv[0][0], kv[0][1])
    ):
        mean = lambda key, rs=rs: sum(x[key] for x in rs) / len(rs)  # noqa: E731
        lines.append(f"| {m} | {r} | {len(rs)} | {mean('capture_seconds'):.1f} | {mean('solve_seconds'):.1f} | "
                     f"{mean('answer_seconds'):.1f} |")  # fmt: skip
    return lines


def _plot(summ, tasks, methods, ratios, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(tasks)))
    rows_n = -(-len(tasks) // cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for m in methods:
            pts = [(r, summ[(task, m, r)]["acc"]) for r in ratios if (task, m, r) in summ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if not m.startswith("kvpress.") else "x",
                        ls="-" if not m.startswith("kvpress.") else "--", label=m)  # fmt: skip
        for ref, style in [(FULL, "k-"), (NO_CONTEXT, "k:")]:
            v = summ.get((task, ref, 1.0 if ref == FULL else 0.0))
            if v is not None:
                ax.axhline(v["acc"], color="k", ls=style[1:], lw=1, label=ref)
        ax.set(title=task, xlabel="fraction of KV entries kept", ylabel="accuracy (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
