"""The rough edges a new user met, each refused in one line before any long work, and `generate`'s labels and
full-context answers."""

import pytest
import torch

import kvsculpt
from kvsculpt.cli import main
from kvsculpt.hf.decode import ask, full_cache

from .conftest import tiny_model, tiny_model_dir


def _refused(capsys, argv) -> str:
    """Run the CLI, expect exit 2, return the one error line (and check there is no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--prompt", " "], "--prompt 2 is empty"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--max-new-tokens", "0"], "must be at least 1; got 0"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--max-new-tokens", "-1"], "must be at least 1; got -1"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--decode-budget", "64", "--every", "64"],
         "decode_budget must be a whole number of tokens above every (64)"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--decode-budget", "64", "--context-floor", "0.5",
          "--decode-scope", "appended"], "it needs scope 'all'"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--decode-budget", "64", "--context-floor", "most"],
         "expected a share in [0, 1] or 'auto', got 'most'"),
        (["generate", "--cache", "x.kvs", "--prompt", "Q", "--decode-budget", "64", "--context-floor", "auto",
          "--decode-scope", "appended"], "it needs scope 'all'"),
        (["eval", "--refine", "kl", "--refine-steps", "0"], "needs refine_steps >= 1"),
        (["bench", "paper", "--methods", "bogus", "--no-peers"], "unknown 'bogus'"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_in_one_line_before_loading_a_model(capsys, argv, message):
    line = _refused(capsys, argv)
    assert message in line, line


def test_compress_checks_its_output_path_before_any_work(tmp_path, capsys):
    (tmp_path / "folder.kvs").mkdir()
    (tmp_path / "a_file").write_text("x")
    for out, message in (
        (tmp_path / "folder.kvs", "is a directory"),
        (tmp_path / "a_file" / "c.kvs", "cannot write"),
    ):
        line = _refused(capsys, ["compress", "--text", "openai_agents_tar_utils", "--out", str(out)])
        assert message in line and "loading" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "folder.kvs"]  # nothing left behind
    assert list((tmp_path / "folder.kvs").iterdir()) == []


def test_save_leaves_no_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    from kvsculpt import cache_io

    model = tiny_model("llama")
    cache = kvsculpt.compress(
        model, torch.randint(0, 97, (1, 24)), method="identity", ratio=1.0, progress=False
    )

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_io, "save_file", broken)
    with pytest.raises(kvsculpt.CacheFileError, match="No space left"):
        kvsculpt.save_cache(cache, tmp_path / "c.kvs")
    assert list(tmp_path.iterdir()) == []


def test_ask_refuses_an_empty_question_and_no_tokens():
    model = tiny_model("llama")
    cache = full_cache(model, torch.randint(0, 97, (1, 16)))
    for questions, steps in (("", 4), (["x", "  "], 4), ([], 4), ("x", 0)):
        with pytest.raises(ValueError, match="empty|at least 1"):
            ask(model, None, cache, questions, max_new_tokens=steps)


def test_identity_keeps_the_full_cache_without_capturing_queries(monkeypatch):
    import importlib

    compress_module = importlib.import_module(
        "kvsculpt.compress"
    )  # the module (kvsculpt.compress is the function)
    monkeypatch.setattr(compress_module, "capture", lambda *a, **k: pytest.fail("identity must not capture"))
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (1, 20))
    cache = kvsculpt.compress(model, ids, method="identity", ratio=1.0, progress=False)
    assert cache.kept_entries() == cache.full_entries() and cache.info["query_seconds"] == 0.0
    cont = torch.randint(0, 97, (1, 5))
    full, _, _ = kvsculpt.hf.decode.prefill(model, ids)
    pos = torch.arange(20, 25)[None]
    with torch.no_grad():
        want = model(cont, past_key_values=full, position_ids=pos).logits
        got = model(cont, past_key_values=cache.fork(), position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refine_takes_the_ratio_and_so_the_step_from_the_cache():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 40))
    cache = kvsculpt.compress(model, ids, ratio=0.1, queries="self+context", progress=False)
    out = kvsculpt.refine(model, cache, ids, refine_steps=1, refine_samples=2, refine_length=4, refine_batch=1,
                          refine_data="self", progress=False)  # fmt: skip
    assert out.info["refine_lr_used"] == 3e-3  # the step of r < 0.2 (was r = 0.5's 3e-4)


def test_generate_uses_the_caches_model_labels_answers_and_answers_from_the_full_context(
    smollm, tmp_path, capsys
):
    """A cache of a model given by path answers without --model; with two prompts and --full every answer is
    labelled, and with nothing dropped (identity) the compressed answer equals the full context's."""
    model_dir = tiny_model_dir(tmp_path, smollm[1])
    out = tmp_path / "c.kvs"
    main(["compress", "--model", str(model_dir), "--text", "openai_agents_tar_utils", "--context-tokens", "48",
          "--method", "identity", "--ratio", "1.0", "--out", str(out)])  # fmt: skip
    capsys.readouterr()
    prompts = ["\nQuestion: what is this?\nAnswer:", "\nSummary:"]
    main(["generate", "--cache", str(out), "--full", "--max-new-tokens", "5"]
         + [a for p in prompts for a in ("--prompt", p)])  # fmt: skip
    captured = capsys.readouterr()
    assert f"loading {model_dir}" in captured.err
    model, tok = kvsculpt.load_model(str(model_dir))
    cache = kvsculpt.load_cache(out, model)
    want = ask(model, tok, full_cache(model, cache.context_ids), prompts, max_new_tokens=5)
    lines = captured.out.splitlines()
    assert lines == [
        "[1] Question: what is this? Answer:", f"  compressed: {want[0].strip()}", f"  full context: {want[0].strip()}",
        "[2] Summary:", f"  compressed: {want[1].strip()}", f"  full context: {want[1].strip()}",
    ]  # fmt: skip


def test_a_second_corpus_run_on_a_busy_store_is_refused_at_once(tmp_path, capsys):
    from kvsculpt.store import StoreBusyError, compress_corpus, writer_lock

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    with writer_lock(tmp_path / "store"):
        with pytest.raises(StoreBusyError, match="being written by another compress-corpus run"):
            compress_corpus([tmp_path / "docs"], tmp_path / "store", "no-model-needed")
        line = _refused(capsys, ["compress-corpus", str(tmp_path / "docs"), "--out", str(tmp_path / "store")])
        assert "being written by another" in line and "pid" in line


def test_an_unreachable_hub_fails_in_one_request_and_a_cached_model_loads_offline(monkeypatch):
    import huggingface_hub as hub

    from kvsculpt.hf.models import ModelError, hub_check

    calls = []

    def unreachable(repo_id, timeout=None):
        calls.append(repo_id)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "model_info", unreachable)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo_id, name: None)
    with pytest.raises(ModelError, match="hub cannot be reached .* not in the local cache"):
        hub_check("someone/some-model")
    assert calls == ["someone/some-model"]  # one request, no retries
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo_id, name: "/cache/config.json")
    assert hub_check("someone/some-model") == {"local_files_only": True}
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_check("someone/some-model") == {} and len(calls) == 2  # offline: no request at all
