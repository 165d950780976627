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


# a non-default value for every CompressConfig field, as the command line spells it (with what it needs)
CLI_VALUES = {
    "ratio": (["--ratio", "0.2"], 0.2), "method": (["--method", "h2o"], "h2o"), "fit": (["--no-fit"], False),
    "options": (["--method", "kvzip", "--option", "sinks=2"], {"sinks": 2}),
    "allocation": (["--allocation", "uniform"], "uniform"), "alpha": (["--alpha", "0.5"], 0.5),
    "scope": (["--scope", "heads"], "heads"), "floor": (["--floor", "7"], 7),
    "queries": (["--queries", "self+context"], "self+context"),
    "repeat_prompt": (["--repeat-prompt", "plain"], "plain"), "max_queries": (["--max-queries", "99"], 99),
    "repeat_chunk": (["--repeat-chunk", "512"], 512), "repeat_fit_rows": (["--repeat-fit-rows", "none"], None),
    "chunk_tokens": (["--chunk-tokens", "4096"], 4096),
    "read_ahead": (["--chunk-tokens", "4096", "--read-ahead", "1024"], 1024),
    "read_slack": (["--chunk-tokens", "4096", "--read-slack", "1.5"], 1.5),
    "self_samples": (["--self-samples", "3"], 3), "self_length": (["--self-length", "5"], 5),
    "temperature": (["--temperature", "0.7"], 0.7), "top_p": (["--top-p", "0.5"], 0.5),
    "heldout": (["--heldout", "0.1"], 0.1), "on_policy": (["--on-policy", "2"], 2), "seed": (["--seed", "4"], 4),
    "refine": (["--refine", "kl"], "kl"), "refine_steps": (["--refine-steps", "7"], 7),
    "refine_lr": (["--refine-lr", "1e-4"], 1e-4), "refine_schedule": (["--refine-schedule", "cosine"], "cosine"),
    "refine_params": (["--refine-params", "v"], "v"), "refine_data": (["--refine-data", "self"], "self"),
    "refine_samples": (["--refine-samples", "5"], 5), "refine_length": (["--refine-length", "9"], 9),
    "refine_batch": (["--refine-batch", "2"], 2), "refine_val": (["--refine-val", "0.5"], 0.5),
    "refine_eval_every": (["--refine-eval-every", "3"], 3), "refine_patience": (["--refine-patience", "6"], 6),
    "refine_topk": (["--refine-topk", "64"], 64), "refine_time": (["--refine-time", "12.5"], 12.5),
    "kv_bits": (["--kv-bits", "4"], 4), "key_bits": (["--kv-bits", "4", "--key-bits", "8"], 8),
    "kv_group": (["--kv-group", "32"], 32), "kv_refit": (["--no-kv-refit"], False),
}  # fmt: skip
LIBRARY_ONLY: set[str] = set()  # config fields with no command-line option (none today)


@pytest.mark.parametrize(
    "command", [["eval"], ["compress", "--out", "x.kvs"], ["compress-corpus", "d", "--out", "s"]]
)
def test_every_config_field_is_reachable_from_the_command_line(command):
    from kvsculpt.config import compress_fields

    names = {f.name for f in compress_fields()}
    assert set(CLI_VALUES) == names - LIBRARY_ONLY, "give a new field its option and a value here"
    for name, (argv, value) in CLI_VALUES.items():
        cfg = config_from_args(build_parser().parse_args(command + argv))
        assert getattr(cfg, name) == value != getattr(CompressConfig(), name), name


def test_config_constants_match_the_tensor_code():
    from kvsculpt import config
    from kvsculpt.core import budget, quant

    assert config.QUANT_BITS == quant.BITS and config.SCOPES == budget.SCOPES


def test_the_command_line_imports_no_tensor_library():
    """`kvsculpt --help` answers without importing torch or transformers (seconds otherwise)."""
    import subprocess
    import sys

    code = "import sys, kvsculpt.cli as c; c.build_parser(benchmarks=False); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _top_level_imports(path: Path, package: Path) -> set[str]:
    """Modules of the package that ``path`` imports at module level (function-level imports are lazy)."""
    rel = path.relative_to(package.parent).with_suffix("").parts
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(rel[: len(rel) - node.level])  # the package the dots name
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_the_package_has_no_import_cycle_and_the_cache_knows_no_file_format():
    package = Path(kvsculpt.__file__).parent
    graph = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        graph[name] = _top_level_imports(path, package)
    graph = {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}
    assert "kvsculpt.cache_io" not in graph["kvsculpt.cache"]

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        for nxt in graph[node]:
            visit(nxt, [*stack, node])

    for node in graph:
        visit(node, [])


def test_a_cache_does_not_switch_the_models_attention():
    import torch

    from kvsculpt.cache import CompressedCache

    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    keys = [[torch.randn(4, 16) for _ in range(2)] for _ in range(2)]
    cache = CompressedCache.from_heads(model, keys, keys, 4)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="use_kvsculpt_attention"):
        model(torch.tensor([[1, 2]]), past_key_values=cache, position_ids=torch.tensor([[4, 5]]))
