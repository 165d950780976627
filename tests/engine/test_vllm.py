"""vLLM serves a kvsculpt cache through :class:`kvsculpt.vllm_connector.KVSculptConnector`.

Runs in the engine environment only (``make engine-check``: vllm-cpu beside torch 2.13 and transformers 5.19);
the main suite skips it. One compressed SmolLM2 cache answers the same questions through vLLM and through
the library's transformers path: the same greedy tokens, and the generated tokens' log-probabilities within
fp32 tolerance over 32 positions each; the engine's own block accounting shows it held m slots, not n. The first
question's slots are all loaded by the connector; the second's partly come from vLLM's prefix cache.
"""

import os

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: one model load
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the machine

# m = 300: not a multiple of the block (128), so the second question finds 256 of the document's slots in
# vLLM's prefix cache and the connector loads only the other 44.
N, RATIO, STEPS = 1024, 0.293, 32
QUESTIONS = [
    "\n\nQuestion: What is this document about? Answer:",
    "\n\nIn one sentence, the main point of the text above is that",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, transformers model, tokenizer, compressed cache, engine metadata)."""
    from vllm import LLM

    from kvsculpt import CompressConfig, compress, load_model
    from kvsculpt.engine import export, read_engine_metadata
    from kvsculpt.eval.texts import load_text
    from kvsculpt.hf.models import encode, hf_copy_dir

    model, tok = load_model("smollm2-135m")
    ids = encode(tok, load_text("openai_agents_human_in_the_loop"))[:, :N]
    cache = compress(model, ids, CompressConfig(ratio=RATIO, allocation="uniform"), tokenizer=tok)
    store = tmp_path_factory.mktemp("store")
    path = export(cache, model, store / f"doc{'.engine.safetensors'}", "smollm2-135m")
    transfer = {"kv_connector": "KVSculptConnector", "kv_connector_module_path": "kvsculpt.vllm_connector",
                "kv_role": "kv_consumer", "kv_connector_extra_config": {"cache_dir": str(store)}}  # fmt: skip
    engine = LLM(model=str(hf_copy_dir("smollm2-135m")), dtype="float32", max_model_len=2048,
                 enforce_eager=True, kv_transfer_config=transfer, seed=0)  # fmt: skip
    return engine, model, tok, cache, read_engine_metadata(path)


def _engine_answer(engine, meta, question_ids, name="doc"):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvsculpt.engine import prompt_ids

    params = SamplingParams(max_tokens=STEPS, temperature=0.0, logprobs=1, ignore_eos=True,
                            extra_args={"kv_transfer_params": {"kvsculpt_doc": name}})  # fmt: skip
    out = engine.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids(meta, question_ids))], params, use_tqdm=False
    )[0]
    gen = out.outputs[0]
    logprobs = [step[t].logprob for step, t in zip(gen.logprobs, gen.token_ids, strict=True)]
    return list(gen.token_ids), torch.tensor(logprobs), out.kv_transfer_params or {}


def _library_answer(model, cache, question_ids, engine_tokens):
    """Greedy tokens through the CompressedCache (positions n + j), and the log-probabilities it gives the
    engine's tokens (teacher-forced, so positions align even where the two would part)."""
    from kvsculpt.hf.decode import decode, forward

    q = torch.tensor([question_ids])
    tokens = decode(model, cache.fork(), q, cache.n, STEPS)[0].tolist()
    with torch.inference_mode():
        logits = forward(model, torch.cat([q, torch.tensor([engine_tokens[:-1]])], 1), cache.fork(), cache.n)
    lp = torch.log_softmax(logits[0, q.shape[1] - 1 :].float(), -1)
    return tokens, lp.gather(-1, torch.tensor(engine_tokens)[:, None])[:, 0]


@pytest.mark.parametrize("question", QUESTIONS)
def test_engine_answers_as_the_library_does_from_m_slots(served, question):
    engine, model, tok, cache, meta = served
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    engine_tokens, engine_lp, accounting = _engine_answer(engine, meta, q_ids)
    lib_tokens, lib_lp = _library_answer(model, cache, q_ids, engine_tokens)
    assert engine_tokens == lib_tokens
    assert torch.allclose(engine_lp, lib_lp, atol=2e-3), (engine_lp - lib_lp).abs().max()
    m, blocks, size = meta["m"], accounting["kvsculpt_blocks"], accounting["kvsculpt_block_size"]
    assert m == round(RATIO * N) == 300
    slots_needed = m + len(q_ids) + STEPS
    assert (
        slots_needed - 1 <= blocks * size < slots_needed - 1 + size
    )  # the engine held m slots for the context
    assert blocks * size < N


def test_a_second_request_takes_the_full_blocks_from_the_prefix_cache_and_loads_the_rest(served):
    engine, model, tok, cache, meta = served
    q_ids = tok(QUESTIONS[1], add_special_tokens=False)["input_ids"]
    first = _engine_answer(engine, meta, q_ids, "doc")
    second = _engine_answer(engine, meta, q_ids, "doc")
    assert meta["m"] == 300 and second[2]["kvsculpt_loaded"] == 300 - 256
    assert first[2]["kvsculpt_loaded"] in (300, 44)  # 300 unless an earlier test already cached the document
    assert first[0] == second[0] and torch.allclose(first[1], second[1], atol=1e-5)


def test_a_prompt_without_the_placeholders_runs_in_full(served):
    """The connector loads nothing for a request whose prompt does not begin with the document's placeholders:
    the engine then computes the prompt as text (and the answer differs from the compressed cache's)."""
    engine, model, tok, cache, meta = served
    q_ids = tok(QUESTIONS[0], add_special_tokens=False)["input_ids"]
    wrong = dict(meta, placeholder_ids=[t + 1 for t in meta["placeholder_ids"]])
    tokens, lp, _ = _engine_answer(engine, wrong, q_ids)
    right, right_lp, _ = _engine_answer(engine, meta, q_ids)
    assert (lp - right_lp).abs().max() > 0.1


def test_tensor_parallelism_is_refused_at_start(tmp_path):
    from types import SimpleNamespace

    from transformers import LlamaConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsculpt.vllm_connector import KVSculptConnector

    def config(tp):
        return SimpleNamespace(
            kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"cache_dir": str(tmp_path)}),
            parallel_config=SimpleNamespace(tensor_parallel_size=tp),
            cache_config=SimpleNamespace(block_size=128),
            model_config=SimpleNamespace(hf_config=LlamaConfig()),
        )

    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        KVSculptConnector(config(2), KVConnectorRole.SCHEDULER)
    assert KVSculptConnector(config(1), KVConnectorRole.SCHEDULER).cache_dir == tmp_path
