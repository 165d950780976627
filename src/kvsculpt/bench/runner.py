"""The benchmark runner: configurations × windows × ratios, resumable.

A grid maps a display name to a :class:`~kvsculpt.config.CompressConfig` (its ``ratio`` is replaced by each
ratio run). Configurations with the same capture key share one capture per window. Every finished run is
appended to a JSONL file as one row, with the config's ``repr``, so an interrupted benchmark continues where it
stopped (rows are keyed by window, display name and ratio).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compress import compress_captured
from ..config import CompressConfig
from ..core.fit import split_heldout
from ..eval.metrics import (
    cache_stats,
    continuation_logits,
    kl_per_position,
    looks_memorised,
    ngram_overlap,
    score,  # fmt: skip
    teacher,
)
from ..eval.tasks import passkey_context, passkey_found, passkey_full_cache
from ..eval.texts import load_text, windows
from ..hf.capture import capture
from ..hf.decode import prefill

# The settings under which the committed benchmark rows were made (the runner's defaults until the config
# was unified): 8 self samples of 64 tokens, 20 % of the query groups held out, uniform budgets, at most 4096 queries per
# KV head, the plain repeat prompt. Grids that reproduce those rows build their configs with legacy_config.
LEGACY = {
    "self_samples": 8,
    "self_length": 64,
    "heldout": 0.2,
    "allocation": "uniform",
    "max_queries": 4096,
    "repeat_prompt": "plain",
}
EVICTION = ("h2o", "snapkv", "tova", "streaming-llm", "knorm")  # display-name prefixes of eviction rows


def legacy_config(method: str, queries: str, **opts) -> CompressConfig:
    """A config with :data:`LEGACY` settings unless ``opts`` say otherwise; Sculpt as the paper states it
    (Select+Fit's ``h2o`` selection, no mass term) and with its former 100 iterations."""
    if method == "sculpt":
        opts = {"score": "h2o", "iters": 100, "mass_weight": 0.0, **opts}
    return CompressConfig.of(method, queries, **{**LEGACY, **opts})


def copy_peers(src: Path, rows: RowFile, wins: set, ratios) -> None:
    """Append to ``rows`` the kvpress rows of ``src`` (an earlier results file made with the same model and
    window lengths) for the windows ``wins`` and ``ratios`` that ``rows`` lacks, each marked with its source."""
    for k, r in RowFile(src).items():
        if k[0] in wins and k[1].startswith("kvpress.") and k[2] in ratios and k not in rows:
            rows.add({**r, "source": str(src)})


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))


def paired_ratio(kl: dict, a: str, b: str, ratio: float):
    """Geo-mean of KL(a) / KL(b) over the windows both ran on (``kl[(config, ratio, window)]``); None if none."""
    common = [w for (c, r, w) in kl if c == a and r == ratio and (b, ratio, w) in kl]
    return geomean(kl[(a, ratio, w)] / kl[(b, ratio, w)] for w in common) if common else None


def results_jsonl(out) -> Path:
    """The resumable rows file of a results name ``out`` (``…/name`` → ``…/name.jsonl``), its folder made."""
    return results_file(out, ".jsonl")


def results_file(out, ext: str) -> Path:
    """``out`` with ``ext`` appended (``…/long_qwen0.5b`` → ``…/long_qwen0.5b.md``, where ``with_suffix`` would
    cut at the name's dot), its folder made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f"{out.name}{ext}"


def grid_parser(
    description: str, *, ratios, out: str, windows=None, by_window: bool = True, report: bool = True
):
    """An argparse parser with the options every KL benchmark script shares: ``--model``, ``--windows``
    (``text@offset`` ids; default ``windows``; not offered when ``by_window`` is False, for scripts that take
    texts), ``--context-tokens`` 1024, ``--continuation-tokens`` 128, ``--ratios``, ``--out`` and (with
    ``report``) ``--report-only``. Each script adds its own options."""
    import argparse

    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="smollm2-135m", help="a packaged name, HF id or path (default: %(default)s)"
    )
    if by_window:
        ap.add_argument("--windows", nargs="+", default=windows, help="window ids (text@offset)")
    ap.add_argument("--context-tokens", type=int, default=1024, help="tokens compressed per window")
    ap.add_argument("--continuation-tokens", type=int, default=128, help="real tokens the KL is measured on")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(ratios), help="kept fractions")
    ap.add_argument("--out", default=out, help="results name: OUT.jsonl (resumable rows), OUT.json, OUT.md")
    if report:
        ap.add_argument(
            "--report-only", action="store_true", help="rewrite the report from the rows; run nothing"
        )
    return ap


def windows_by_id(tok, ids, context_tokens: int, continuation_tokens: int):
    """The windows named ``text@offset`` in ``ids``, in text order; an id that names no window (the offset is
    not a multiple of ``context_tokens + continuation_tokens``, or the text is too short) is refused."""
    texts = sorted({i.split("@")[0] for i in ids})
    span = context_tokens + continuation_tokens
    per_text = 1 + max(int(i.split("@")[1]) // span if "@" in i else 0 for i in ids)
    found = [
        w for w in windows(tok, texts, context_tokens, continuation_tokens, per_text) if w.id in set(ids)
    ]
    missing = sorted(set(ids) - {w.id for w in found})
    if missing:
        raise ValueError(f"no window {', '.join(missing)} at {context_tokens} + {continuation_tokens} tokens "
                         f"(ids are text@offset, the offset a multiple of {span} within the text)")  # fmt: skip
    return found


def window_key(row: dict) -> tuple:
    """The key of a KL results row: ``(window, config, ratio)``."""
    return row["window"], row["config"], row["ratio"]


class RowFile(dict):
    """A resumable results file: one JSON row a line, appended (and flushed) as each row is made, so a killed
    run loses at most the row in flight and a rerun skips what is there. As a dict: ``key(row) → row``, the last
    line of a key winning (a rerun's row replaces an older one). ``with rows:`` keeps the file open for a
    loop of :meth:`add`; outside it each :meth:`add` opens and closes the file."""

    def __init__(self, path, key=window_key):
        super().__init__()
        self.path, self.key, self._file = Path(path), key, None
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self[key(row)] = row

    def add(self, row: dict) -> dict:
        """Append ``row`` to the file and to the dict; returns it."""
        line = json.dumps(row) + "\n"
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._file.write(line)
            self._file.flush()
        self[self.key(row)] = row
        return row

    def __enter__(self) -> RowFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._file = None


def split_memorised(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows of windows that do not look memorised, and ``{window: (teacher NLL, max self 4-gram overlap)}``
    of those that do (:func:`~kvsculpt.eval.metrics.looks_memorised`), to be reported apart."""
    stats = {}
    for r in rows:
        if "teacher_nll" in r:
            nll, ov = stats.get(r["window"], (r["teacher_nll"], None))
            o = r.get("self_ngram_overlap")
            stats[r["window"]] = (nll, ov if o is None else max(o, ov or 0.0))
    flagged = {w: v for w, v in stats.items() if looks_memorised(*v)}
    return [r for r in rows if r["window"] not in flagged], flagged


def memorised_note(flagged: dict) -> list[str]:
    if not flagged:
        return []
    return ["", "Reported apart, as they look memorised (teacher NLL < 0.5 or self-sample 4-gram overlap ≥ 0.3): "
            + ", ".join(f"{w} (NLL {a:.2f}, overlap {b or 0:.2f})" for w, (a, b) in flagged.items())
            + ". Their rows are in the JSON."]  # fmt: skip


def _pilot_spread(info: dict) -> dict:
    """Pilot relative MSE spread (at the uniform budget): max/min across layers, max head ratio in a layer."""
    pilot = info.get("pilot")
    if not pilot or "pilot_errors" not in pilot:
        return {}
    errs = torch.tensor(pilot["pilot_errors"][pilot["pilot_budgets"].index(pilot["uniform_budget"])])
    per_layer = errs.mean(1)
    heads = errs.max(1).values / errs.min(1).values.clamp_min(1e-12)
    return {
        "pilot_layer_spread": float(per_layer.max() / per_layer.min().clamp_min(1e-12)),
        "pilot_head_ratio": float(heads.max()),
        "pilot_seconds": pilot["seconds"],
    }


def heldout_self_sample(cap, cfg: CompressConfig) -> torch.Tensor | None:
    """Tokens ``[1, L]`` of one self sample that :func:`~kvsculpt.compress.compress_captured` holds out from
    fitting under ``cfg`` (same split), or None: KL on it measures fidelity on the model's own distribution."""
    if cap.samples is None or "self_groups" not in cap.info or cfg.heldout <= 0:
        return None
    start, end = cap.info["self_groups"]
    held = torch.unique(cap.groups[split_heldout(cap.groups, cfg.heldout, cfg.seed)])
    held = [int(g) - start for g in held if start <= int(g) < end]
    return cap.samples[held[0]][None] if held else None


def run_grid(model, tok, model_name, wins, grid: dict[str, CompressConfig], ratios, jsonl, passkey=False,
             passkey_ratios=None, heldout_self_kl=True, rerun=()) -> list[dict]:  # fmt: skip
    """Run every (window, config, ratio) not yet in ``jsonl``; return all rows for these windows and configs.

    ``rerun``: config names whose rows count as done only if made by the method as it is now (the row's
    ``method`` equals the solver's ``repr``); the others are run again and the new rows replace them (the
    file keeps the old lines; :class:`RowFile` takes the last row of a key).

    ``passkey``: also compress a pass-key version of each window's text with the same config, at the ratios in
    ``passkey_ratios`` (default: all), and record whether the key is retrieved afterwards (question asked
    only after compression), with ``passkey_full``, the full cache's result.
    ``heldout_self_kl``: also score KL on a self sample the config held out (one more forward per run).
    """
    passkey_ratios = set(ratios if passkey_ratios is None else passkey_ratios)
    jsonl = Path(jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = RowFile(jsonl)
    for key in [k for k in done if k[1] in rerun and k[1] in grid]:
        if done[key].get("method") != repr(grid[key[1]].replace(ratio=key[2]).solver):
            del done[key]  # made by an earlier version of the method
    groups = defaultdict(list)
    for name, cfg in grid.items():
        groups[cfg.capture_key()].append(name)
    todo = sum((w.id, c, r) not in done for w in wins for c in grid for r in ratios)
    bar = tqdm(total=todo, desc=f"bench {model_name}", unit="run")
    if todo:  # the first forward pages in memory-mapped weights: keep it out of the timed prefills
        prefill(model, wins[0].context[:, :8])
    with done:
        for w in wins:
            if all((w.id, c, r) in done for c in grid for r in ratios):
                continue
            bar.set_postfix_str(f"{w.id}: full-cache teacher")  # each phase named: a window takes minutes
            ref = teacher(model, w)
            pk_full = None
            if passkey:
                pk_ids, pk_key = passkey_context(tok, load_text(w.name), w.context.shape[1], seed=w.start)
                pk_full = passkey_full_cache(model, tok, pk_ids, pk_key)
            for names in groups.values():
                if all((w.id, c, r) in done for c in names for r in ratios):
                    continue
                base = grid[names[0]]
                keep_ctx = any(grid[c].solver.needs_context_queries for c in names)
                bar.set_postfix_str(f"{w.id}: {base.queries} queries for {', '.join(names)}")
                cap = capture(model, w.context, base, tokenizer=tok, keep_context_queries=keep_ctx)
                pk_cap = None
                if passkey and passkey_ratios & set(ratios):
                    pk_cap = capture(model, pk_ids, base, tokenizer=tok, keep_context_queries=keep_ctx)
                sample_teacher = {}
                for name in names:
                    held_sample = heldout_self_sample(cap, grid[name]) if heldout_self_kl else None
                    for r in ratios:
                        if (w.id, name, r) in done:
                            continue
                        cfg = grid[name].replace(ratio=r)
                        bar.set_postfix_str(f"{w.id}: {name} r={r}")
                        t0 = time.perf_counter()
                        slow = cfg.refine != "none"  # minutes to hours: its bars (data, steps, val KL) show
                        cache = compress_captured(model, cap, cfg, progress=slow, tokenizer=tok)
                        solve_s = time.perf_counter() - t0
                        res = score(model, cache, w, ref)
                        if held_sample is not None:
                            key = tuple(held_sample[0].tolist())
                            if key not in sample_teacher:
                                full, _, _ = prefill(model, w.context)
                                sample_teacher[key] = continuation_logits(model, full, held_sample, cap.n)
                            student = continuation_logits(model, cache.fork(), held_sample, cap.n)
                            res["kl_heldout_self_sample"] = float(
                                kl_per_position(sample_teacher[key], student).mean()
                            )
                        pk = None
                        if pk_cap is not None and r in passkey_ratios:
                            pk_cache = compress_captured(model, pk_cap, cfg, progress=False, tokenizer=tok)
                            pk = passkey_found(model, tok, pk_cache, pk_ids.shape[1], pk_key)
                        stats = cache.info["stats"]["heldout_rel_mse"]
                        compress_s = cap.prefill_seconds + cap.query_seconds + solve_s
                        row = {
                            "window": w.id, "config": name, "ratio": r, "method": repr(cfg.solver),
                            "compress_config": repr(cfg), "queries": cfg.queries, "allocation": cfg.allocation,
                            "model": model_name, **res, "teacher_nll": ref.nll,
                            "self_ngram_overlap": None if cap.samples is None else ngram_overlap(
                                cap.samples, w.continuation),
                            "heldout_rel_mse": sum(map(sum, stats)) / sum(map(len, stats)) if any(stats) else None,
                            "prefill_seconds": ref.prefill_seconds, "query_seconds": cap.query_seconds,
                            "solve_seconds": solve_s, "compress_seconds": compress_s,
                            "compress_over_prefill": compress_s / ref.prefill_seconds,
                            **cache_stats(cache),
                            "cache_over_logical": cache.nbytes() / cache.logical_nbytes(),
                            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                            "passkey": pk, "passkey_full": pk_full if pk is not None else None,
                            **_pilot_spread(cache.info), "optimiser": cache.info.get("optimiser"),
                            **{k: v for k, v in cache.info.items() if k.startswith("refine_") and k != "refine_curve"},
                        }  # fmt: skip
                        done.add(row)
                        bar.update()
                        bar.set_postfix_str(f"{name} r={r} kl={res['kl']:.4f}")
    bar.close()
    ids = {w.id for w in wins}
    return [done[k] for k in done if k[0] in ids and k[1] in grid and k[2] in ratios]
