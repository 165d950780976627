"""The engine layout (kvsculpt.engine): a uniform block with keys shifted by n − m reads, at positions m + j,
exactly as the compressed cache reads at n + j; what an engine cannot hold is refused before any work."""

import json

import pytest
import torch
from transformers import DynamicCache

from kvsculpt import CompressConfig, compress, save_cache
from kvsculpt.cache_io import CacheFileError
from kvsculpt.engine import (
    check_servable,
    engine_block,
    engine_path,
    export,
    load_engine_block,
    prompt_ids,
    read_engine_metadata,
    shift_keys,
    sidecar,
)
from kvsculpt.hf.decode import forward

from .conftest import tiny_model

CFG = CompressConfig(ratio=0.25, allocation="uniform", queries="self")


def _as_prefix(keys, values):
    """The engine's view: the block as an ordinary DynamicCache prefix of m tokens."""
    cache = DynamicCache()
    for li in range(keys.shape[0]):
        cache.update(keys[li][None], values[li][None], li)
    return cache


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_shifted_block_reads_at_m_as_the_compressed_cache_reads_at_n(kind, device):
    model = tiny_model(kind).to(device)
    gen = torch.Generator().manual_seed(1)
    ids, q = torch.randint(0, 97, (1, 128), generator=gen), torch.randint(0, 97, (1, 12), generator=gen)
    ids, q = ids.to(device), q.to(device)
    cache = compress(model, ids, CFG, progress=False)
    want = forward(model, q, cache.fork(), cache.n)
    keys, values = engine_block(cache, model)
    m = keys.shape[2]
    assert m == 32 and check_servable(cache, model) == 32
    got = forward(model, q, _as_prefix(keys, values), m)
    assert (got - want).abs().max() < 1e-5
    # without the shift the same block reads wrong: the test can tell
    unshifted = torch.stack([layer.padded_block()[0] for layer in cache.layers])
    assert (forward(model, q, _as_prefix(unshifted, values), m) - want).abs().max() > 1e-3


def test_shift_is_a_rotation_that_composes():
    model = tiny_model("llama")
    k = torch.randn(2, 5, 16)
    twice = shift_keys(model, shift_keys(model, k, 7), 5)
    assert torch.allclose(twice, shift_keys(model, k, 12), atol=1e-5)
    assert torch.allclose(shift_keys(model, k, 0), k)
    assert torch.allclose(shift_keys(model, k, 9).norm(dim=-1), k.norm(dim=-1), atol=1e-5)


def test_what_an_engine_cannot_hold_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(2))
    uneven = compress(model, ids, CompressConfig(ratio=0.25, queries="self"), progress=False)
    assert len({m for layer in uneven.budgets for m in layer}) > 1
    with pytest.raises(ValueError, match="allocation='uniform'"):
        engine_block(uneven, model)
    biased = compress(model, ids, CompressConfig(ratio=0.25, allocation="uniform", queries="self", method="kvzip-v",
                                                 options={"beta": "nnls"}), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="bias"):
        engine_block(biased, model)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="dynamic"):
        engine_block(compress(model, ids, CFG, progress=False), model)


def test_export_round_trip_sidecar_and_placeholders(tmp_path):
    model = tiny_model("qwen2")
    gen = torch.Generator().manual_seed(3)
    a, b = (
        compress(model, torch.randint(0, 97, (1, 64), generator=gen), CFG, progress=False) for _ in range(2)
    )
    pa = export(a, model, engine_path(tmp_path / "a.kvs"), "tiny")
    pb = export(b, model, tmp_path / "b.engine.safetensors", "tiny")
    assert pa.name == "a.engine.safetensors"
    keys, values, meta = load_engine_block(pa)
    want_k, want_v = engine_block(a, model)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    recipe = json.loads(sidecar(pa).read_text())
    assert recipe["kvsculpt_doc"] == "a" and recipe["m"] == meta["m"] == 16 and recipe["n"] == 64
    assert recipe["placeholder_ids"] == meta["placeholder_ids"] and len(meta["placeholder_ids"]) == 16
    other = read_engine_metadata(pb)["placeholder_ids"]
    assert other != meta["placeholder_ids"]  # two documents never share an engine's prefix-cache entries
    assert (
        export(a, model, tmp_path / "a2.engine.safetensors")
        and read_engine_metadata(tmp_path / "a2.engine.safetensors")["placeholder_ids"]
        == meta["placeholder_ids"]
    )  # one document always does
    assert prompt_ids(meta, [5, 6]) == meta["placeholder_ids"] + [5, 6]
    with pytest.raises(ValueError, match="empty"):
        prompt_ids(meta, [])
    data = bytearray(pa.read_bytes())
    data[-8] ^= 0xFF
    pa.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        load_engine_block(pa)
    save_cache(a, tmp_path / "x.kvs")
    with pytest.raises(CacheFileError, match="not a kvsculpt engine file"):
        read_engine_metadata(tmp_path / "x.kvs")


def test_export_engine_command_refuses_an_uneven_cache_before_loading_and_writes_an_even_one(
    smollm, tmp_path, capsys
):
    from kvsculpt.cli import main

    from .conftest import tiny_model_dir
    from .test_cli import _refused

    model_dir = tiny_model_dir(tmp_path, smollm[1])
    base = ["compress", "--model", str(model_dir), "--text", "openai_agents_tar_utils", "--context-tokens", "64",
            "--ratio", "0.25", "--queries", "self"]  # fmt: skip
    main([*base, "--out", str(tmp_path / "even.kvs"), "--allocation", "uniform"])
    main([*base, "--out", str(tmp_path / "uneven.kvs")])
    capsys.readouterr()
    line = _refused(capsys, ["export-engine", "--cache", str(tmp_path / "uneven.kvs")])
    assert "allocation='uniform'" in line and "loading" not in capsys.readouterr().err
    assert "give --cache" in _refused(capsys, ["export-engine"])
    main(["export-engine", "--cache", str(tmp_path / "even.kvs")])
    out = capsys.readouterr().out
    assert "kvsculpt_doc=even m=16 of n=64" in out and "KVSculptConnector" in out
    recipe = json.loads((tmp_path / "even.engine.json").read_text())
    assert recipe["kvsculpt_doc"] == "even" and len(recipe["placeholder_ids"]) == 16
    assert read_engine_metadata(tmp_path / "even.engine.safetensors")["n"] == 64
