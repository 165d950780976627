import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from kvsculpt import CacheFileError, CompressConfig, load_model
from kvsculpt.cli import main
from kvsculpt.store import CacheStore, compress_corpus

from .conftest import tiny_model, tiny_model_dir

CFG = CompressConfig(ratio=0.5, method="h2o", queries="context")  # fast: no sampling, no repeat pass


@pytest.fixture
def corpus(tmp_path, smollm):
    """A tiny model on disk and a folder of 4 good documents, an empty one, an undecodable one, a long one."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    words = "the store keeps one compressed cache per document and an index beside them".split()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(words[i:] + words[:i]) * (3 + i))
    (docs / "sub" / "empty.txt").write_text("  \n")
    (docs / "sub" / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (docs / "long.txt").write_text(" ".join(words) * 40)
    return tiny_model_dir(tmp_path, smollm[1]), docs


def _rows(store):
    return {r["id"]: r for r in CacheStore(store).rows()}


def test_corpus_store_resume_changes_failures_and_wrong_model(tmp_path, corpus, capsys):
    model_dir, docs = corpus
    store = tmp_path / "store"
    counts = compress_corpus([docs], store, str(model_dir), CFG, max_tokens=200, progress=False)
    rows = _rows(store)
    assert counts == {**counts, "documents": 7, "done": 4, "failed": 3, "skipped": 0}
    assert {i for i, r in rows.items() if r["status"] == "done"} == {f"d{i}.txt" for i in range(4)}
    assert "empty document" in rows["sub/empty.txt"]["error"] and "UTF-8" in rows["sub/bad.txt"]["error"]
    assert "max_tokens=200" in rows["long.txt"]["error"] and rows["long.txt"]["tokens"] > 200
    # the contract of `store ls --json`: its last stdout line is one JSON list with these keys
    main(["store", "ls", str(store), "--json"])
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {d["id"] for d in listed} == set(rows) and all({"id", "status", "tokens", "bytes", "seconds"} <= set(d)
                                                          for d in listed)  # fmt: skip
    # a rerun skips the finished documents; a changed one is recompressed, an unchanged one is not
    (docs / "d1.txt").write_text("a different text " * 9)
    counts = compress_corpus([docs], store, str(model_dir), CFG, max_tokens=200, progress=False)
    again = _rows(store)
    assert counts["skipped"] == 3 and counts["done"] == 1
    assert again["d0.txt"]["updated"] == rows["d0.txt"]["updated"]
    assert again["d1.txt"]["sha256"] != rows["d1.txt"]["sha256"] and again["d1.txt"]["status"] == "done"
    # truncate keeps the first max_tokens tokens (recorded); other settings recompress everything
    compress_corpus([docs], store, str(model_dir), CFG, max_tokens=200, truncate=True, progress=False)
    final = _rows(store)
    assert final["long.txt"]["status"] == "done" and final["long.txt"]["truncated"] == 1
    assert final["long.txt"]["tokens"] == 200
    # reading back: the right model loads it and answers; another model or another config is refused
    model, tok = load_model(str(model_dir))
    cache = CacheStore(store).load("d0.txt", model)
    assert cache.n == final["d0.txt"]["tokens"]
    with pytest.raises(CacheFileError, match="another model"):
        CacheStore(store).load("d0.txt", tiny_model("qwen2"))
    with pytest.raises(ValueError, match="other settings"):
        CacheStore(store).load("d0.txt", model, CFG.replace(ratio=0.3))
    with pytest.raises(ValueError, match="failed"):
        CacheStore(store).load("sub/empty.txt", model)


def test_interrupted_corpus_run_resumes_with_nothing_lost_or_duplicated(tmp_path, corpus):
    model_dir, docs = corpus
    store = tmp_path / "store"
    for i in range(4, 10):
        (docs / f"d{i}.txt").write_text(f"document number {i} " * 20)
    argv = ["compress-corpus", str(docs), "--out", str(store), "--model", str(model_dir), "--method", "h2o",
            "--queries", "context", "--max-tokens", "200"]  # fmt: skip
    # the driver dies (as at SIGKILL: no clean-up) right after the 2nd document is recorded, mid-run
    code = ("import os, sys, kvsculpt.store as s; from kvsculpt.cli import main\n"
            "record = s.CacheStore.record\n"
            "def dying(self, *a, **k):\n"
            "    record(self, *a, **k)\n"
            "    if sum(r['status'] == 'done' for r in self.rows()) >= 2: os._exit(9)\n"
            f"s.CacheStore.record = dying\nmain({argv!r})\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    with sqlite3.connect(store / "index.sqlite") as db:
        done = db.execute("SELECT COUNT(*) FROM docs WHERE status = 'done'").fetchone()[0]
    assert done == 2
    before = _rows(store)
    counts = compress_corpus([docs], store, str(model_dir), CompressConfig(method="h2o", queries="context"),
                             max_tokens=200, progress=False)  # fmt: skip
    after = _rows(store)
    assert counts["skipped"] >= 2 and len(after) == 13  # every document once (ids are the primary key)
    assert sum(r["status"] == "done" for r in after.values()) == 10
    assert all(after[i]["updated"] == r["updated"] for i, r in before.items() if r["status"] == "done")
    files = sorted(p.name for p in (store / "caches").iterdir())
    assert len(files) == 10 and not any(f.endswith(".tmp") for f in files)


def test_local_ray_gives_the_same_store(tmp_path, corpus):
    pytest.importorskip("ray")
    import ray

    model_dir, docs = corpus
    a, b = tmp_path / "a", tmp_path / "b"
    compress_corpus([docs], a, str(model_dir), CFG, max_tokens=200, progress=False)
    try:
        compress_corpus([docs], b, str(model_dir), CFG, max_tokens=200, progress=False, ray=True, workers=2)
    finally:
        ray.shutdown()
    ra, rb = _rows(a), _rows(b)
    keys = ("status", "sha256", "tokens", "bytes", "error", "settings")
    assert {i: [r[k] for k in keys] for i, r in ra.items()} == {
        i: [r[k] for k in keys] for i, r in rb.items()
    }
    model, _ = load_model(str(model_dir))
    for doc in (i for i, r in ra.items() if r["status"] == "done"):
        x, y = CacheStore(a).load(doc, model), CacheStore(b).load(doc, model)
        assert all(torch.equal(s, t) for la, lb in zip(x.layers, y.layers, strict=True)
                   for s, t in zip(la.tensors(), lb.tensors(), strict=True))  # fmt: skip
