import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model(kind: str, seed: int = 0, hidden_size: int = 64):
    """A random-weight model of the given family, built from a config (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from kvsculpt.hf.attention import register

    torch.manual_seed(seed)
    common = dict(
        vocab_size=97,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=register())
    return model.eval()


def tiny_model_dir(tmp_path, tokenizer):
    """A random-weight Llama saved with ``tokenizer`` in ``tmp_path/tiny-llama`` (for code that loads by path)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=512)  # fmt: skip
    path = tmp_path / "tiny-llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request):
    """The device-sensitive tests run once per device: here on the CPU (the CUDA cases skip); on a GPU
    machine ``benchmarks/gpu_check.py`` runs their CUDA cases (``pytest -k cuda``)."""
    return torch.device(request.param)


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm():
    from kvsculpt import load_model

    return load_model("smollm2-135m")
