"""Downstream tasks (kvsculpt.eval.tasks, kvsculpt bench tasks): seeded generation, the scorer, resume."""

import json

import pytest

from kvsculpt.cli import main
from kvsculpt.eval.tasks import TASKS, function_parameters, score_reply, task_samples

from .conftest import tiny_model_dir


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_by_seed_and_hold_their_answers(smollm, task):
    _, tok = smollm
    a, b = task_samples(tok, task, 384, 3, seed=0), task_samples(tok, task, 384, 3, seed=0)
    other = task_samples(tok, task, 384, 3, seed=1)
    for x, y in zip(a, b, strict=True):
        assert x.context.equal(y.context) and x.question == y.question and x.answers == y.answers
    assert [x.answers for x in a] != [x.answers for x in other]
    for s in a:
        assert s.context.shape[1] == 384 or (task == "cwe" and 300 < s.context.shape[1] <= 384)
        shown = tok.decode(s.context[0])
        assert all(ans in shown for ans in s.answers)  # every answer item is in the context
    if task == "cwe":  # the asked words are the most frequent lines of the list
        lines = [w.split(". ", 1)[1] for w in tok.decode(a[0].context[0]).splitlines() if ". " in w]
        counts = sorted({w: lines.count(w) for w in lines}.items(), key=lambda kv: -kv[1])
        assert {w for w, _ in counts[:5]} == set(a[0].answers) and counts[5][1] < counts[4][1]
    if task == "niah_multivalue":
        assert len(set(a[0].answers)) == 4


def test_the_scorer_counts_whole_words_until_the_first_blank_line():
    assert score_reply(" 1234567.", ["1234567"]) == 1.0
    assert score_reply("12345678", ["1234567"]) == 0.0  # a longer number is a miss
    assert score_reply("`wrap` and `Wrapper`", ["wrap", "wrapper"]) == 1.0  # case and backticks do not matter
    assert score_reply("wrapper", ["wrap"]) == 0.0  # inside a longer word is a miss
    assert score_reply("\n\n 111, 222\n\n333", ["111", "222", "333"]) == pytest.approx(
        2 / 3
    )  # cut at the blank line
    assert score_reply("ZXRCB, TULOD", ["TULOD", "ZXRCB", "GOPOH", "AAAAA"]) == 0.5  # order free, fraction


def test_function_parameters_are_read_by_the_python_parser():
    src = "class A:\n    def f(self, a: dict[str, int] = g(1, 2), *rest, b, **kw):\n        pass\n\nasync def h(x, /, y):\n    pass\n"
    assert function_parameters(src) == [("f", ["a", "rest", "b", "kw"], src.index("    def f")),
                                        ("h", ["x", "y"], src.index("async def h"))]  # fmt: skip


def test_bench_tasks_resumes_and_refuses_other_settings(tmp_path, smollm, capsys):
    """A tiny model, two tasks: a second run with more samples computes only the new sample's rows; a rerun adds
    nothing; the report names every method; another seed into the same file is refused."""
    model_dir = tiny_model_dir(tmp_path, smollm[1])
    out = tmp_path / "res"
    args = ["bench", "tasks", "--model", str(model_dir), "--context-tokens", "160", "--ratios", "0.5",
            "--tasks", "niah_single", "vt", "--methods", "default", "--no-peers", "--out", str(out)]  # fmt: skip
    main([*args, "--samples", "1"])
    jsonl = out / f"tasks_{model_dir.name}_n160.jsonl"
    first = jsonl.read_text().splitlines()
    assert len(first) == 2 * 3  # per task: full, no context, default at r = 0.5
    main([*args, "--samples", "2"])
    second = jsonl.read_text().splitlines()
    assert second[: len(first)] == first and len(second) == 2 * len(first)
    assert {json.loads(x)["sample"] for x in second[len(first) :]} == {1}
    main([*args, "--samples", "2"])
    assert jsonl.read_text().splitlines() == second
    md = (out / f"tasks_{model_dir.name}_n160.md").read_text()
    assert "| default |" in md and "| full |" in md and "| no context |" in md
    rows = [json.loads(x) for x in second]
    assert all(r["score"] == score_reply(r["reply"], r["answers"]) for r in rows)  # stored as scored
    with pytest.raises(SystemExit):
        main([*args, "--samples", "1", "--seed", "1"])
    assert "holds results for" in capsys.readouterr().err


def test_wilson_interval_matches_known_values():
    from kvsculpt.bench.tasks import wilson

    lo, hi = wilson(1.0, 5)  # 5/5 correct: not "100 ± 0"
    assert lo == pytest.approx(0.5655, abs=1e-3) and hi == 1.0
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_bench_tasks_records_stages_and_refuses_learned_without_a_scorer(tmp_path, smollm, capsys):
    """Two ratios share one capture: their rows carry the same capture seconds and their own solve seconds;
    the report has the stage table; ``--part ours`` runs no press; ``learned`` named for a model without a
    trained scorer is refused in one line before any sample runs."""
    model_dir = tiny_model_dir(tmp_path, smollm[1])
    out = tmp_path / "res"
    args = ["bench", "tasks", "--model", str(model_dir), "--context-tokens", "160", "--ratios", "0.25", "0.5",
            "--tasks", "niah_single", "--samples", "1", "--part", "ours", "--out", str(out)]  # fmt: skip
    main([*args, "--methods", "default"])
    rows = [json.loads(x) for x in (out / f"tasks_{model_dir.name}_n160.jsonl").read_text().splitlines()]
    ours = {r["ratio"]: r for r in rows if r["method"] == "default"}
    assert set(ours) == {0.25, 0.5} and ours[0.25]["capture_seconds"] == ours[0.5]["capture_seconds"]
    assert ours[0.25]["solve_seconds"] != ours[0.5]["solve_seconds"]
    assert not any(r["method"].startswith("kvpress.") for r in rows)
    assert "## Seconds per sample by stage" in (out / f"tasks_{model_dir.name}_n160.md").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--methods", "learned", "--samples", "2"])
    assert "train-scorer" in capsys.readouterr().err
    assert len((out / f"tasks_{model_dir.name}_n160.jsonl").read_text().splitlines()) == len(rows)


def test_a_partial_run_is_compared_on_the_samples_every_method_reached():
    """Methods at different sample counts (presses behind ours) are compared on the (task, sample) pairs all of
    them and the full cache answered: here sample 1 of `vt`, which the press has not reached, drops out, so
    the default's `vt` accuracy there is 0 (sample 0), not 50."""
    from kvsculpt.bench.tasks import same_samples, same_samples_table

    def row(task, sample, method, ratio, score):
        return {"task": task, "sample": sample, "method": method, "ratio": ratio, "score": score}

    rows = [row("vt", 0, "full", 1.0, 1.0), row("vt", 1, "full", 1.0, 1.0),
            row("vt", 0, "default", 0.25, 0.0), row("vt", 1, "default", 0.25, 1.0),
            row("vt", 0, "kvpress.SnapKVPress", 0.25, 1.0), row("vt", 0, "default", 0.1, 0.0)]  # fmt: skip
    kept, methods = same_samples(rows, 0.25)
    assert methods == ["default", "kvpress.SnapKVPress"]
    assert sorted((r["method"], r["sample"]) for r in kept) == [
        ("default", 0),
        ("full", 0),
        ("kvpress.SnapKVPress", 0),
    ]
    table = same_samples_table(rows, ["vt"], 0.25)
    assert "| default | 0 | 0.0 |" in table and "| kvpress.SnapKVPress | 100 | 100.0 |" in table
    assert (
        same_samples_table([r for r in rows if r["sample"] == 0], ["vt"], 0.25) == []
    )  # equal counts: no table
