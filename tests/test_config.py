import ast
from pathlib import Path

import pytest

import kvsculpt
from kvsculpt.cli import build_parser, config_from_args
from kvsculpt.config import CompressConfig, build_method
from kvsculpt.core.methods import Sculpt, Select
from kvsculpt.core.scores import H2O, KVzip, SnapKV, ValueKVzip

from .conftest import tiny_model


def test_the_command_line_defaults_are_the_library_defaults():
    for command in (["eval"], ["compress", "--out", "x.kvs"]):
        assert config_from_args(build_parser().parse_args(command)) == CompressConfig()


def test_command_line_options_reach_the_config():
    args = build_parser().parse_args(["eval", "--method", "sculpt", "--option", "iters=60", "--option", "score=kvzip",
                                      "--no-fit", "--max-queries", "0", "--queries", "self+context"])  # fmt: skip
    with pytest.raises(ValueError, match="always fits"):
        config_from_args(args)
    args.fit = True
    cfg = config_from_args(args)
    assert cfg.max_queries is None and cfg.sources == ("self", "context")
    assert cfg.solver == Sculpt(scorer=KVzip(), iters=60)


def test_repr_round_trips_and_is_what_a_cache_records():
    cfg = CompressConfig(ratio=0.3, method="snapkv", fit=False, options={"window": 16}, queries=["context"],
                         allocation="uniform")  # fmt: skip
    assert cfg.queries == "context" and cfg.solver == Select(scorer=SnapKV(window=16), fit=False)
    assert eval(repr(cfg), {"CompressConfig": CompressConfig}) == cfg
    model = tiny_model("llama")
    import torch

    cache = kvsculpt.compress(model, torch.randint(0, 97, (1, 32)), cfg, progress=False)
    assert cache.info["config"] == repr(cfg) and cache.method == repr(cfg.solver)


def test_names_map_to_one_method_each():
    assert build_method("h2o") == Select(scorer=H2O(), fit=True)
    assert build_method("kvzip", False, {"sinks": 0}) == Select(scorer=KVzip(sinks=0), fit=False)
    assert build_method("sculpt") == Sculpt(
        scorer=ValueKVzip(), iters=20, mass_weight=1.0
    )  # from the default
    assert build_method("sculpt", True, {"score": "h2o"}).scorer == H2O()
    with pytest.raises(ValueError, match="unknown option window for method 'kvzip'"):
        build_method("kvzip", True, {"window": 3})


def test_core_imports_neither_transformers_nor_the_rest_of_the_package():
    """core/ is tensor math: its only imports are the standard library, torch, scipy and core itself."""
    core = Path(kvsculpt.__file__).parent / "core"
    allowed = {"__future__", "math", "warnings", "dataclasses", "torch", "scipy"}
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import ...: inside core
                    continue
                assert node.level == 0, f"{path.name} imports from outside core/"
                names = [node.module.split(".")[0]]
            else:
                continue
            assert set(names) <= allowed, f"{path.name} imports {names}"
