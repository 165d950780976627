"""``kvsculpt demo`` (``make demo``): one real 2026 text compressed by the default and seven other methods,
each scored by KL on the real continuation, then a question answered from the compressed and the full cache."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..config import SELF_10X64, CompressConfig
from ..eval.metrics import compress_and_score, teacher
from ..eval.texts import load_text, make_window
from ..hf.decode import ask, full_cache
from ..hf.models import load_model

QUESTION = "\n\nQuestion: What does a client do while a background task is running?\nAnswer:"
RUNS = (
    (CompressConfig(), "kvsculpt default"),
    (CompressConfig(method="h2o", queries="self+context", allocation="curves", **SELF_10X64),
     "Select+Fit, curves budget"),
    (CompressConfig(method="sculpt"), "Sculpt from the default"),  # + 20 L-BFGS iterations on the keys
    (CompressConfig(method="learned"), "learned scorer + fit"),  # the shipped scorer, values fitted on self samples
    (CompressConfig(method="learned", fit=False), "learned, one prefill"),
    (CompressConfig(method="snapkv", fit=False, queries="context", allocation="uniform"), "SnapKV eviction"),
    (CompressConfig(method="h2o", fit=False, queries="context", allocation="uniform"), "H2O eviction"),
    (CompressConfig(method="streaming-llm", fit=False, queries="context", allocation="uniform"), "StreamingLLM"),
)  # fmt: skip


def demo(model_name: str, text: str, context_tokens: int, continuation_tokens: int, ratio: float, dtype=None):
    """Print the quality table of :data:`RUNS` at ``ratio`` and one question's answers."""
    print(f"kvsculpt: loading {model_name}", flush=True)
    model, tok = load_model(model_name, dtype=dtype)
    window = make_window(tok, load_text(text), context_tokens, continuation_tokens, name=text)
    ref = teacher(model, window)
    print(f"\n{model_name}: {text}, {context_tokens} context tokens compressed to {ratio:.0%}, KL over the next "
          f"{continuation_tokens} real tokens (teacher NLL {ref.nll:.2f} nats/token)\n")  # fmt: skip
    rows, default_cache = [], None
    bar = tqdm(RUNS, desc="demo: compress and score", unit="method")
    for cfg, label in bar:
        bar.set_postfix_str(label)  # the Sculpt row takes minutes: say which row is running
        cache, row = compress_and_score(model, tok, model_name, window, ref, cfg.replace(ratio=ratio), False)
        rows.append((label, row))
        default_cache = default_cache or cache
    print(f"{'method':<26}{'queries':<14}{'KL (nats)':>10}{'top-1 agree':>13}{'cache MB':>10}{'of full':>9}"
          f"{'compress s':>12}")  # fmt: skip
    for label, r in rows:
        print(f"{label:<26}{r['queries']:<14}{r['kl']:>10.4f}{r['top1_agree']:>13.2f}{r['cache_bytes'] / 1e6:>10.2f}"
              f"{r['cache_over_full']:>9.0%}{r['compress_seconds']:>12.1f}")  # fmt: skip
    print(f"\nfull cache: {rows[0][1]['full_bytes'] / 1e6:.2f} MB, prefill {ref.prefill_seconds:.1f} s")
    print(f"\nQ: {QUESTION.strip()}")
    for label, cache in (
        ("compressed cache", default_cache),
        ("full context", full_cache(model, window.context)),
    ):
        answer = ask(model, tok, cache, QUESTION, max_new_tokens=40, stop="\n\n")
        print(f"A ({label}): {answer.strip()}")
