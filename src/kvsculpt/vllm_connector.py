"""Serve kvsculpt caches from vLLM: a KV connector (vLLM's public ``KVConnectorBase_V1`` interface).

A request names a document (``kv_transfer_params={"kvsculpt_doc": NAME}``) whose engine file
``NAME.engine.safetensors`` (:func:`kvsculpt.engine.export`) lies in the connector's ``cache_dir``; its prompt
begins with that file's ``m`` placeholder ids (:func:`kvsculpt.engine.prompt_ids`), then the question. The
connector tells the scheduler those ``m`` tokens are already computed, and before the model runs it writes
the stored block into their slots through the attention backend's own ``do_kv_cache_update`` (so the engine's
layout, CPU or GPU, is the backend's business). The engine then holds ``m`` slots for the document, not ``n``,
and never runs its prefill. Start it::

    vllm serve MODEL_DIR --kv-transfer-config '{"kv_connector": "KVSculptConnector",
        "kv_connector_module_path": "kvsculpt.vllm_connector", "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"cache_dir": "/path/to/store"}}'

A finished request's ``kv_transfer_params`` report the engine's own block accounting (``kvsculpt_blocks``,
``kvsculpt_block_size``) and how many of the ``m`` slots the connector filled (``kvsculpt_loaded``; vLLM's prefix
cache supplied the rest). Only this module imports vLLM; nothing else in kvsculpt needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from .cache_io import _fingerprint
from .engine import SUFFIX, load_engine_block, read_engine_metadata

logger = init_logger(__name__)
PARAM = "kvsculpt_doc"
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class Load:
    """One request's load: positions ``start … m−1`` of document ``path`` go to ``slots [m − start]``."""

    path: str
    start: int
    slots: torch.Tensor


@dataclass
class KVSculptMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


@lru_cache(maxsize=8)
def _block(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values, _ = load_engine_block(path)
    return keys, values


class KVSculptConnector(KVConnectorBase_V1):
    """Fills the slots of a request's placeholder prefix from a stored kvsculpt block; stores nothing."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if "cache_dir" not in extra:
            raise ValueError('KVSculptConnector needs kv_connector_extra_config {"cache_dir": DIR}')
        # Under tensor parallelism each worker holds a shard of the heads; the block holds them all.
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError(
                "KVSculptConnector writes every KV head itself: run vLLM with tensor_parallel_size=1"
            )
        self.cache_dir = Path(extra["cache_dir"])
        self.block_size = vllm_config.cache_config.block_size
        self.fingerprint = _fingerprint(vllm_config.model_config.hf_config)
        self.pending: dict[str, Load] = {}  # scheduler side: request id -> load to send with the next step
        self.loaded: dict[str, int] = {}  # request id -> slots the connector filled (the rest: prefix cache)

    # -- scheduler side -------------------------------------------------------------------------------------

    def _document(self, request) -> tuple[str, dict] | None:
        """``(path, metadata)`` of the document a request names, or None; a bad name is logged and ignored."""
        name = (request.kv_transfer_params or {}).get(PARAM)
        if not name:
            return None
        path = self.cache_dir / f"{name}{SUFFIX}"
        if "/" in name or name.startswith(".") or not path.is_file():
            logger.error("kvsculpt: no engine file %s for request %s", path, request.request_id)
            return None
        meta = _metadata(str(path))
        m, prompt = meta["m"], list(request.prompt_token_ids or [])
        if meta["fingerprint"] != self.fingerprint:
            logger.error(
                "kvsculpt: %s was made for another model; request %s runs in full", path, request.request_id
            )
            return None
        if len(prompt) <= m or prompt[:m] != meta["placeholder_ids"]:
            logger.error("kvsculpt: request %s does not begin with %s's %d placeholder ids and a question",
                         request.request_id, name, m)  # fmt: skip
            return None
        return str(path), meta

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        doc = self._document(request)
        if doc is None:
            return 0, False
        return max(0, doc[1]["m"] - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.loaded[request.request_id] = self.loaded.get(request.request_id, 0) + num_external_tokens
        if num_external_tokens > 0:
            path, meta = self._document(request)
            self.pending[request.request_id] = Load(path, meta["m"] - num_external_tokens, torch.empty(0))

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = KVSculptMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            load = self.pending.pop(new.req_id, None)
            if load is None:
                continue
            m = _metadata(load.path)["m"]
            blocks = torch.tensor(new.block_ids[0], dtype=torch.long)
            pos = torch.arange(load.start, m)
            load.slots = blocks[pos // self.block_size] * self.block_size + pos % self.block_size
            meta.loads.append(load)
        self.pending.clear()  # a request not scheduled this step is asked again by the scheduler
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if not (request.kv_transfer_params or {}).get(PARAM):
            return False, None
        return False, {"kvsculpt_blocks": len(block_ids), "kvsculpt_block_size": self.block_size,
                       "kvsculpt_loaded": self.loaded.pop(request.request_id, 0)}  # fmt: skip

    # -- worker side ----------------------------------------------------------------------------------------

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVSculptMetadata) or not meta.loads:
            return
        for name, layer in forward_context.no_compile_layers.items():
            kv_cache = getattr(layer, "kv_cache", None)
            match = _LAYER.search(name)
            if kv_cache is None or not isinstance(kv_cache, torch.Tensor) or match is None:
                continue
            li = int(match.group(1))
            for load in meta.loads:
                keys, values = _block(load.path)
                # [Hkv, m, d] -> the new tokens' [T, Hkv, d], as the backend writes a forward's own keys
                k = keys[li, :, load.start :].transpose(0, 1).to(kv_cache.device, kv_cache.dtype)
                v = values[li, :, load.start :].transpose(0, 1).to(kv_cache.device, kv_cache.dtype)
                layer.impl.do_kv_cache_update(layer, k.contiguous(), v.contiguous(), kv_cache,
                                              load.slots.to(kv_cache.device))  # fmt: skip

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None


@lru_cache(maxsize=64)
def _metadata(path: str) -> dict:
    return read_engine_metadata(path)
