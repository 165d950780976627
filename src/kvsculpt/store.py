"""A cache store: compress a whole corpus once, one ``.kvs`` file per document plus an SQLite index.

Layout of a store folder: ``index.sqlite`` (table ``docs``: one row per document id) and ``caches/`` (one
file per document, named by a hash of its id). A row records the document's sha256, the model and its
fingerprint, the settings (the config ``repr``, ``max_tokens``, ``truncate``), the ratio, bytes, tokens, seconds,
status (``done`` / ``failed``) and the error. Cache files are written atomically before their row, and the
index is written by one process only (the driver), so a crash loses at most the documents in flight.

:func:`compress_corpus` is resumable and idempotent: a document whose text hash and settings match a finished
row is skipped, a changed one is recompressed, a failed one retried; one document's failure is recorded and
never stops the run. It runs in this process, or on Ray (``pip install kvsculpt[distributed]``): a pool of
actors, each holding one model (one GPU each where there are GPUs), documents streamed to whichever is free,
results written here. Chunking one document across several caches is out of scope: a document longer than
``max_tokens`` fails, or keeps its first ``max_tokens`` tokens with ``truncate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .config import CompressConfig

INDEX = "index.sqlite"
COLUMNS = ("id", "sha256", "model", "fingerprint", "settings", "ratio", "bytes", "tokens", "seconds", "status",
           "error", "truncated", "file", "updated")  # fmt: skip
SCHEMA = f"CREATE TABLE IF NOT EXISTS docs ({', '.join(c + (' TEXT PRIMARY KEY' if c == 'id' else '') for c in COLUMNS)})"


@dataclass
class Document:
    """One document of a corpus: its id (its path relative to the folder given, or its JSONL id) and raw bytes."""

    id: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_documents(sources: Iterable[str | os.PathLike], glob: str = "**/*") -> list[Document]:
    """The documents of ``sources``: files (id: the path as given), folders (every file matching ``glob`` below
    it, recursively; id: the path relative to the folder) and ``.jsonl`` files of ``{"id", "text"}`` objects.
    Duplicate ids are an error (which one would the store keep?)."""
    docs: list[Document] = []
    for src in map(Path, sources):
        if src.is_dir():
            docs += [Document(p.relative_to(src).as_posix(), p.read_bytes())
                     for p in sorted(src.glob(glob)) if p.is_file()]  # fmt: skip
        elif src.suffix == ".jsonl":
            for no, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                        docs.append(Document(str(obj["id"]), str(obj["text"]).encode("utf-8")))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ValueError(
                            f'{src}:{no}: expected a JSON object with "id" and "text" ({exc})'
                        ) from None
        elif src.is_file():
            docs.append(Document(str(src), src.read_bytes()))
        else:
            raise FileNotFoundError(f"no such file or folder: {src}")
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            raise ValueError(f"document id {d.id!r} appears twice")
        seen.add(d.id)
    return docs


class StoreBusyError(ValueError):
    """Another run is writing the store."""


@contextlib.contextmanager
def writer_lock(store_path: Path):
    """Hold the store's writer lock (``writer.lock``, an OS lock released when the process ends, even if it is
    killed) for one compress-corpus run; a second run is refused at once with one line, before any work."""
    import fcntl

    store_path.mkdir(parents=True, exist_ok=True)
    with open(store_path / "writer.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StoreBusyError(f"{store_path} is being written by another compress-corpus run ({holder}); "
                                 "wait for it to finish, or write to another store") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def settings_key(cfg: CompressConfig, max_tokens: int | None, truncate: bool) -> str:
    """What a finished document must have been compressed with to be skipped."""
    return f"{cfg!r}; max_tokens={max_tokens}; truncate={truncate}"


class CacheStore:
    """A store folder (created if missing): its index and cache files. ``CacheStore(path).load(doc_id, model)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        (self.path / "caches").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path / INDEX)
        self.db.execute(SCHEMA)
        self.db.commit()

    def rows(self) -> list[dict]:
        """Every document's row, by id."""
        cur = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM docs ORDER BY id")
        return [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def row(self, doc_id: str) -> dict | None:
        cur = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM docs WHERE id = ?", (doc_id,))
        r = cur.fetchone()
        return None if r is None else dict(zip(COLUMNS, r, strict=True))

    def file_of(self, doc_id: str) -> Path:
        return self.path / "caches" / (hashlib.sha256(doc_id.encode()).hexdigest()[:24] + ".kvs")

    def record(self, doc: Document, model_name: str, settings: str, ratio: float, result: dict) -> None:
        """Write one document's result: its cache file (atomically) first, then its row."""
        file = None
        if result["status"] == "done":
            path = self.file_of(doc.id)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(result["blob"])
            os.replace(tmp, path)
            file = path.name
        values = {"id": doc.id, "sha256": doc.sha256, "model": model_name, "fingerprint": result.get("fingerprint"),
                  "settings": settings, "ratio": ratio, "bytes": result.get("bytes"), "tokens": result.get("tokens"),
                  "seconds": result.get("seconds"), "status": result["status"], "error": result.get("error"),
                  "truncated": int(bool(result.get("truncated"))), "file": file, "updated": time.time()}  # fmt: skip
        with self.db:
            self.db.execute(f"INSERT OR REPLACE INTO docs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            [values[c] for c in COLUMNS])  # fmt: skip

    def load(self, doc_id: str, model, config: CompressConfig | None = None):
        """The compressed cache of ``doc_id`` for ``model`` (a cache made for another model is refused by its
        fingerprint; with ``config``, one made with other settings is refused too)."""
        from .cache_io import load

        row = self.row(doc_id)
        if row is None:
            raise KeyError(f"no document {doc_id!r} in the store {self.path}")
        if row["status"] != "done":
            raise ValueError(f"document {doc_id!r} failed to compress: {row['error']}")
        if config is not None and not row["settings"].startswith(repr(config) + ";"):
            raise ValueError(f"document {doc_id!r} was compressed with other settings: {row['settings']}")
        return load(self.path / "caches" / row["file"], model)


def compress_document(model, tokenizer, doc_id: str, data: bytes, cfg: CompressConfig, max_tokens: int | None,
                      truncate: bool) -> dict:  # fmt: skip
    """Compress one document; never raises for the document's own faults. Returns ``status`` ``done`` with the
    ``.kvs`` file's bytes (``blob``), ``bytes``, ``tokens``, ``seconds``, ``fingerprint``, ``truncated``, or
    ``failed`` with ``error``."""
    from .cache_io import _fingerprint, save
    from .compress import compress
    from .hf.models import encode

    t0 = time.perf_counter()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"status": "failed", "error": f"not UTF-8 text ({exc.reason} at byte {exc.start})"}
    if not text.strip():
        return {"status": "failed", "error": "empty document"}
    try:
        ids = encode(tokenizer, text)
        n, truncated = ids.shape[1], False
        if max_tokens is not None and n > max_tokens:
            if not truncate:
                return {"status": "failed", "tokens": n, "error": f"{n} tokens, more than max_tokens={max_tokens} "
                        "(--truncate keeps the first max_tokens; splitting a document is not supported)"}  # fmt: skip
            ids, truncated = ids[:, :max_tokens], True
        cache = compress(model, ids, cfg, tokenizer=tokenizer, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = save(cache, Path(tmp) / "doc.kvs", model_name=getattr(model.config, "_name_or_path", ""))
            blob = path.read_bytes()
    except Exception as exc:  # noqa: BLE001 — one document's failure is recorded, never stops the corpus
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "done", "blob": blob, "bytes": cache.nbytes(), "tokens": int(ids.shape[1]),
            "seconds": time.perf_counter() - t0, "truncated": truncated,
            "fingerprint": json.dumps(_fingerprint(model.config), sort_keys=True)}  # fmt: skip


def context_length(model_name: str) -> int | None:
    """The model's context length, if its config states one (read without loading the weights)."""
    from transformers import AutoConfig

    from .hf.models import resolve

    where, gguf = resolve(model_name)
    config = AutoConfig.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    return getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)


def _todo(store: CacheStore, docs: list[Document], settings: str, model_name: str) -> list[Document]:
    """Documents not finished with these settings, text and model: new, changed, failed or made otherwise."""
    out = []
    for d in docs:
        row = store.row(d.id)
        fresh = row is not None and row["status"] == "done" and row["sha256"] == d.sha256
        if not (fresh and row["settings"] == settings and row["model"] == model_name):
            out.append(d)
    return out


def compress_corpus(sources, store_path, model_name: str, cfg: CompressConfig | None = None, *,
                    max_tokens: int | None = None, truncate: bool = False, glob: str = "**/*", ray=None,
                    workers: int = 1, progress: bool = True, dtype=None) -> dict:  # fmt: skip
    """Compress every document of ``sources`` (see :func:`read_documents`) into the store at ``store_path``.

    ``max_tokens``: the longest document compressed (default: the model's context length); longer ones fail,
    or keep their first ``max_tokens`` tokens with ``truncate``. ``ray``: None runs in this process; ``True``
    starts a local Ray with ``workers`` actors; an address string joins that cluster (``workers`` actors, one
    GPU each if the cluster has GPUs). Returns counts: ``documents``, ``skipped``, ``done``, ``failed``,
    ``seconds``."""
    cfg = cfg or CompressConfig()
    docs = read_documents(sources, glob)
    with writer_lock(Path(store_path)):
        return _compress_corpus(docs, CacheStore(store_path), model_name, cfg, max_tokens, truncate, ray, workers,
                                progress, dtype)  # fmt: skip


def _compress_corpus(
    docs, store, model_name, cfg, max_tokens, truncate, ray, workers, progress, dtype
) -> dict:
    t0 = time.perf_counter()
    max_tokens = max_tokens or context_length(model_name)
    settings = settings_key(cfg, max_tokens, truncate)
    todo = _todo(store, docs, settings, model_name)
    run = _local_results if ray is None else _ray_results
    results = run(todo, model_name, cfg, max_tokens, truncate, ray, workers, dtype)
    counts = {"documents": len(docs), "skipped": len(docs) - len(todo), "done": 0, "failed": 0}
    bar = tqdm(total=len(todo), desc=f"compress {len(todo)} of {len(docs)} documents", unit="doc",
               disable=not progress)  # fmt: skip
    by_id = {d.id: d for d in todo}
    for doc_id, result in results:
        store.record(by_id[doc_id], model_name, settings, cfg.ratio, result)
        counts[result["status"]] += 1
        bar.update()
        bar.set_postfix(done=counts["done"], failed=counts["failed"])
    bar.close()
    counts["seconds"] = time.perf_counter() - t0
    return counts


def _local_results(todo: list[Document], model_name, cfg, max_tokens, truncate, _ray, _workers, dtype
                   ) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """``(doc id, result)`` in this process, in order; the model is loaded only if there is work."""
    if not todo:
        return
    from .hf.models import load_model

    model, tok = load_model(model_name, dtype=dtype)
    for d in todo:
        yield d.id, compress_document(model, tok, d.id, d.data, cfg, max_tokens, truncate)


def _ray_results(todo: list[Document], model_name, cfg, max_tokens, truncate, address, workers, dtype
                 ) -> Iterator[tuple[str, dict]]:  # fmt: skip
    """``(doc id, result)`` as Ray actors finish them, in any order."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'kvsculpt[distributed]'") from None
    if not todo:
        return
    if not ray.is_initialized():
        if address is True:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor = ray.remote(num_cpus=1, num_gpus=gpus)(_Worker)
    pool = ActorPool(
        [actor.remote(model_name, dtype, cfg, max_tokens, truncate) for _ in range(min(workers, len(todo)))]
    )
    yield from pool.map_unordered(lambda a, doc: a.run.remote(doc), todo)


class _Worker:
    """A Ray actor's state: one model, loaded once, compressing the documents it is handed."""

    def __init__(self, model_name, dtype, cfg, max_tokens, truncate):
        from kvsculpt.hf.models import load_model

        self.model, self.tok = load_model(model_name, dtype=dtype)
        self.args = (cfg, max_tokens, truncate)

    def run(self, doc: Document) -> tuple[str, dict]:
        return doc.id, compress_document(self.model, self.tok, doc.id, doc.data, *self.args)
