"""NVIDIA kvpress presses as external peers, run in a subprocess of their own environment.

Importing kvpress patches transformers' attention functions globally, so it never runs in the caller's
process: :func:`run_presses` starts ``python -m kvsculpt.bench.peers`` on a job file and reads back one JSON row
per (press, ratio). kvpress 0.5.5 needs transformers < 5.3 while the library runs on the current one, so the
subprocess runs in its own virtual environment, ``.venv-peers`` (``make peers``, or
``python -m kvsculpt.bench.peers --setup DIR``; pins in ``constraints-peers.txt``), found through
``$KVSCULPT_PEERS_PYTHON``, else ``./.venv-peers``, else this interpreter if it has kvpress.

kvpress's ``compression_ratio`` is the fraction **removed**: a kept fraction ``r`` runs the press at
``compression_ratio = 1 − r``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESSES = (
    "SnapKVPress",
    "ExpectedAttentionPress",
    "KVzipPress",
    "TOVAPress",
    "KnormPress",
    "StreamingLLMPress",
)


PEERS_VENV = Path(".venv-peers")
PEER_PACKAGES = ("kvpress", "optimum-quanto>=0.2.7", "hqq>=0.2.8")  # quanto/hqq: transformers' QuantizedCache


def peers_python() -> str | None:
    """The interpreter that runs kvpress (see the module's docstring), or None if there is none."""
    import importlib.util

    explicit = os.environ.get("KVSCULPT_PEERS_PYTHON")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    local = PEERS_VENV / "bin" / "python"
    if local.is_file():
        return str(local.absolute())
    return sys.executable if importlib.util.find_spec("kvpress") is not None else None


def available() -> bool:
    return peers_python() is not None


def setup(venv: Path, constraints: Path, project: Path) -> None:
    """Make the peers' environment: a venv at ``venv`` with kvpress and this project, under ``constraints``."""
    import venv as venv_module

    venv_module.create(venv, with_pip=True, clear=False)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run(pip + ["torch"], check=True)  # first, alone: the pinned CPU wheel (see constraints.txt)
    subprocess.run(pip + [*PEER_PACKAGES, "-e", str(project)], check=True)


def context_prefill(model, ids, cache) -> None:
    """Read a context ``ids [1, n]`` into ``cache`` as kvpress's pipeline does: through the base model, so no
    ``[n, vocab]`` logits are made (they are not part of any press's cost, and at n = 16k on a 150k-token
    vocabulary they alone are 10 GB)."""
    model.model(input_ids=ids, past_key_values=cache, use_cache=True)


def run_presses(
    model_name: str,
    context,
    continuation,
    ratios,
    presses=PRESSES,
    passkey=None,
    passkey_ratios=None,
    quant=(),
) -> list[dict]:
    """Score each press at each kept ratio on one window; ``passkey``: optional (context ids, question ids, key),
    tried at ``passkey_ratios`` (default: all) and with the full cache (``passkey_full``). ``quant``: pairs
    ``(backend, bits)`` of transformers' ``QuantizedCache`` ("hqq", "quanto"): then every press and the full
    cache (``method="full"``, ratio 1) run on that cache instead, and rows carry ``quant="<backend><bits>"``."""
    return _run_job({"model": model_name, "context": context.cpu(), "continuation": continuation.cpu(),
                     "ratios": list(ratios), "presses": list(presses), "passkey": passkey,
                     "passkey_ratios": list(ratios if passkey_ratios is None else passkey_ratios),
                     "quant": [list(q) for q in quant]})  # fmt: skip


def generate_with_presses(model_name: str, prompts, ratios, presses, on_row=None, dtype: str | None = None,
                          stop: str | None = None) -> list[dict]:  # fmt: skip
    """Greedy replies after each press at each kept ratio: ``prompts`` is a list of
    ``(context ids [1, n], question ids [1, q], max new tokens)``; the context is compressed before the
    question is read (question-agnostic). Prompt by prompt (every press and ratio of one before the next), in
    one subprocess. Rows: ``method`` (``"kvpress.<Press>"``), ``ratio``, ``prompt`` (index into ``prompts``),
    ``tokens`` (the reply's ids, ending at EOS or once ``stop`` is in the text), ``compress_seconds``,
    ``answer_seconds``. ``dtype``: the model's (None: fp32). ``on_row(row)`` is called as each row arrives."""
    prompts = [(c.cpu(), q.cpu(), int(m)) for c, q, m in prompts]
    job = {"model": model_name, "generate": prompts, "ratios": list(ratios), "presses": list(presses),
           "dtype": dtype, "stop": stop}  # fmt: skip
    return _run_job(job, on_row)


def read_with_decoding_presses(model_name: str, context, prompt, tokens, configs, on_row=None,
                               dtype: str | None = None) -> list[dict]:  # fmt: skip
    """kvpress's ``DecodingPress`` as a decode-budget peer: the full cache of ``context [1, n]``, then
    ``prompt [1, q]`` and ``tokens`` read one at a time (teacher-forced) with the press compressing the whole
    cache (context included) to ``target_size`` every ``every`` steps. ``configs``: dicts with ``base`` (a
    kvpress scorer press's name), ``target_size``, ``every`` and any fields to echo. The full cache reads the
    same tokens first, in the same process, as the reference. Rows: the config's fields, ``method``
    (``"kvpress.DecodingPress(<base>)"``), :func:`~kvsculpt.eval.metrics.read_agreement`'s fields,
    ``tokens_per_s``, ``full_tokens_per_s`` and ``kept_end`` (the largest layer's cache length at the end)."""
    job = {"model": model_name, "dtype": dtype, "configs": [dict(c) for c in configs],
           "read": {"context": context.cpu(), "prompt": prompt.cpu(), "tokens": [int(t) for t in tokens]}}  # fmt: skip
    return _run_job(job, on_row)


def _run_job(job: dict, on_row=None) -> list[dict]:
    """Run ``job`` in ``python -m kvsculpt.bench.peers`` and read back its JSON rows as they come."""
    with tempfile.TemporaryDirectory() as tmp:
        path, err = Path(tmp) / "job.pt", Path(tmp) / "stderr.txt"
        torch.save(job, path)
        rows = []
        with err.open("w") as stderr:
            python = peers_python()
            if python is None:
                raise RuntimeError(
                    "kvpress is not installed: `make peers` makes its environment (.venv-peers)"
                )
            proc = subprocess.Popen([python, "-m", "kvsculpt.bench.peers", str(path)],
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
            for line in proc.stdout:
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    if on_row is not None:
                        on_row(rows[-1])
            proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"kvpress peers failed:\n{err.read_text()[-3000:]}")
        return rows


def run_peers(
    model_name, wins, ratios, jsonl, tok, passkey=False, passkey_ratios=None, presses=PRESSES
) -> list[dict]:
    """kvpress presses on the same windows as :func:`~kvsculpt.bench.runner.run_grid`, rows appended to the same
    ``jsonl`` (config ``kvpress.<Press>``); resumable: only the (press, ratio) pairs not yet there run."""
    from tqdm.auto import tqdm

    from ..eval.tasks import PASSKEY_QUESTION, passkey_context
    from ..eval.texts import load_text
    from ..hf.models import encode
    from .runner import RowFile

    done = RowFile(Path(jsonl))
    with done:
        for w in tqdm(wins, desc="kvpress peers", unit="window"):
            missing = [(p, r) for p in presses for r in ratios if (w.id, f"kvpress.{p}", r) not in done]
            if not missing:
                continue
            pk = None
            if passkey:
                pk_ids, key = passkey_context(tok, load_text(w.name), w.context.shape[1], seed=w.start)
                pk = (pk_ids, encode(tok, PASSKEY_QUESTION), key)
            todo_presses = list(dict.fromkeys(p for p, _ in missing))
            todo_ratios = list(dict.fromkeys(r for _, r in missing))
            for row in run_presses(model_name, w.context, w.continuation, todo_ratios, presses=todo_presses,
                                   passkey=pk, passkey_ratios=passkey_ratios):  # fmt: skip
                row.update(window=w.id, config=row["method"], model=model_name, queries="(kvpress)")
                if (w.id, row["config"], row["ratio"]) in done:
                    continue
                done.add(row)
    ids, names = {w.id for w in wins}, {f"kvpress.{p}" for p in presses}
    return [r for k, r in done.items() if k[0] in ids and k[1] in names and k[2] in ratios]


QUANT_GROUP = 64  # elements per scale and zero-point in QuantizedCache, as kvsculpt's kv_group default


def load_plain_model(name: str, dtype: str | None = None):
    """``(model, tokenizer)`` as kvpress needs them: transformers' own SDPA attention (kvpress patches it, so
    never in a process that uses kvsculpt's attention), ``dtype`` (None: fp32), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf.models import parse_dtype, resolve

    where, gguf = resolve(name)
    extra = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=parse_dtype(dtype or "fp32", "cpu"), attn_implementation="sdpa", **extra
    )
    return model.eval(), AutoTokenizer.from_pretrained(where, **extra)


def _main(job_path: str) -> None:
    import resource

    import kvpress
    from transformers import DynamicCache

    from ..eval.metrics import kl_per_position, nll_per_position
    from ..hf.decode import decode

    job = torch.load(job_path)
    model, tok = load_plain_model(job["model"], job.get("dtype"))
    if "generate" in job:
        return _generate(model, tok, job)
    if "read" in job:
        return _read_decoding(model, job)
    ctx, cont = job["context"], job["continuation"]
    n, T = ctx.shape[1], cont.shape[1]
    pos = torch.arange(n, n + T)[None]

    def new_cache(quant):
        if quant is None:
            return DynamicCache()
        from transformers import QuantizedCache

        # the whole context quantised at prefill (no full-precision residual window); the continuation, read
        # in one forward, attends to it dequantised and to its own tokens unquantised, as kvsculpt's block does
        return QuantizedCache(backend=quant[0], config=model.config, nbits=quant[1], q_group_size=QUANT_GROUP,
                              residual_length=0)  # fmt: skip

    from ..compress import PeakMemory

    peaks = {}  # press repr -> peak memory above the start of its prefill

    @torch.inference_mode()
    def run(press, quant=None):
        cache = new_cache(quant)
        t0 = time.perf_counter()
        with PeakMemory(model.device) as peak:
            if press is None:
                context_prefill(model, ctx, cache)
            else:
                with press(model):
                    context_prefill(model, ctx, cache)
        seconds = time.perf_counter() - t0
        peaks[repr(press)] = peak.extra
        kept = None if quant else sum(layer.keys.shape[-2] * layer.keys.shape[-3] for layer in cache.layers)
        logits = model(cont, past_key_values=cache, position_ids=pos, use_cache=True).logits[0].float()
        return logits, seconds, kept, cache

    @torch.inference_mode()
    def passkey_ok(press) -> bool | None:
        if job["passkey"] is None:
            return None
        pctx, question, key = job["passkey"]
        cache = DynamicCache()
        if press is None:
            context_prefill(model, pctx, cache)
        else:
            with press(model):
                context_prefill(model, pctx, cache)
        return key in tok.decode(decode(model, cache, question, pctx.shape[1], 8)[0])

    with torch.inference_mode():  # page the weights in before anything is timed
        model(input_ids=ctx[:, :8], use_cache=False)
    teacher, prefill_s, full_entries, _ = run(None)
    passkey_full = passkey_ok(None)
    if job.get("quant"):
        for backend, bits in job["quant"]:
            quant = (backend, bits)
            for name in [None, *job["presses"]]:
                for r in [1.0] if name is None else job["ratios"]:
                    press = None if name is None else getattr(kvpress, name)(compression_ratio=1.0 - r)
                    logits, seconds, kept, _ = run(press, quant)
                    print(json.dumps({
                        "method": "full" if name is None else f"kvpress.{name}", "quant": f"{backend}{bits}",
                        "kv_bits": bits, "quant_group": QUANT_GROUP, "ratio": r, "kl": float(kl_per_position(teacher, logits).mean()),
                        # a press keeps int(n·(1 − compression_ratio)) entries per head (KVzip masks, not frees)
                        "kept_fraction": r, "entries_masked_not_freed": name == "KVzipPress",
                        "compress_seconds": seconds, "prefill_seconds": prefill_s,
                    }), flush=True)  # fmt: skip
        return
    for name in job["presses"]:
        for r in job["ratios"]:
            press = getattr(kvpress, name)(compression_ratio=1.0 - r)
            logits, seconds, kept, _ = run(press)
            kl = kl_per_position(teacher, logits)
            nll = nll_per_position(logits[:-1], cont[0, 1:])
            masked = name == "KVzipPress"  # KVzip masks entries instead of removing them
            row = {
                "method": f"kvpress.{name}", "press": repr(press), "ratio": r, "kvpress_compression_ratio": 1.0 - r,
                "kl": float(kl.mean()), "ppl": float(torch.exp(nll.mean())),
                "top1_agree": float((logits.argmax(-1) == teacher.argmax(-1)).float().mean()),
                "compress_seconds": seconds, "prefill_seconds": prefill_s, "compress_over_prefill": seconds / prefill_s,
                "peak_extra_bytes": peaks[repr(press)],
                "cache_over_full": kept / full_entries if not masked else 1.0,
                "entries_masked_not_freed": masked, "passkey": passkey_ok(press) if r in job["passkey_ratios"] else None,
                "passkey_full": passkey_full if r in job["passkey_ratios"] else None,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            }  # fmt: skip
            print(json.dumps(row), flush=True)


@torch.inference_mode()
def _generate(model, tok, job) -> None:
    """The ``generate`` job of :func:`generate_with_presses`: one JSON row a line on stdout."""
    import kvpress
    from transformers import DynamicCache

    from ..hf.decode import decode, eos_ids, text_stop

    stop = text_stop(eos_ids(model, tok), tok, job.get("stop"))
    for i, (ctx, question, max_new) in enumerate(job["generate"]):
        for name in job["presses"]:
            for r in job["ratios"]:
                press = getattr(kvpress, name)(compression_ratio=1.0 - r)
                cache, t0 = DynamicCache(), time.perf_counter()
                with press(model):
                    context_prefill(model, ctx, cache)
                seconds, t0 = time.perf_counter() - t0, time.perf_counter()
                tokens = decode(model, cache, question, ctx.shape[1], max_new, stop=stop)[0].tolist()
                print(json.dumps({"method": f"kvpress.{name}", "ratio": r, "prompt": i, "tokens": tokens,
                                  "compress_seconds": seconds, "answer_seconds": time.perf_counter() - t0}),
                      flush=True)  # fmt: skip


@torch.inference_mode()
def _read_decoding(model, job) -> None:
    """The job of :func:`read_with_decoding_presses`: one JSON row a line on stdout."""
    import kvpress
    from transformers import DynamicCache

    from ..eval.metrics import read_agreement
    from ..hf.decode import read_tokens

    ctx, prompt, tokens = job["read"]["context"], job["read"]["prompt"], job["read"]["tokens"]

    def run(press):
        cache = DynamicCache()
        with press(model) if press is not None else contextlib.nullcontext():
            context_prefill(model, ctx, cache)
            logprobs, seconds = read_tokens(model, cache, ctx.shape[1], prompt, tokens)
        return logprobs, seconds, max(layer.keys.shape[-2] for layer in cache.layers)

    ref, ref_s, _ = run(None)
    for c in job["configs"]:
        base = getattr(kvpress, c["base"])()
        press = kvpress.DecodingPress(
            base_press=base, compression_interval=c["every"], target_size=c["target_size"]
        )
        got, seconds, kept = run(press)
        print(json.dumps({**c, "method": f"kvpress.DecodingPress({c['base']})", **read_agreement(ref, got, tokens),
                          "tokens_per_s": (len(tokens) - 1) / seconds, "full_tokens_per_s": (len(tokens) - 1) / ref_s,
                          "kept_end": kept}), flush=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "--setup":  # python -m kvsculpt.bench.peers --setup VENV CONSTRAINTS PROJECT
        setup(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        _main(sys.argv[1])
