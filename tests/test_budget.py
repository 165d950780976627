import pytest
import torch

from kvsculpt.core.budget import allocate, kept, uniform


def test_sums_exactly_and_respects_floor_and_cap():
    torch.manual_seed(0)
    e = torch.rand(7, 3) ** 4
    b = allocate(e, total=7 * 3 * 40, floor=4, cap=100, alpha=1.0)
    assert int(b.sum()) == 7 * 3 * 40
    assert int(b.min()) >= 4 and int(b.max()) <= 100


def test_budgets_are_proportional_to_difficulty_to_the_alpha_equal_gets_uniform_zero_gets_floor():
    assert allocate(torch.tensor([[1.0, 3.0]]), total=40, floor=2, cap=100).tolist() == [[10, 30]]  # m ∝ e
    assert allocate(torch.tensor([[1.0, 2.0, 5.0]]), total=80, floor=1, cap=100).tolist() == [[10, 20, 50]]
    # alpha = 0.5: m ∝ √e, 40·1/(1+√3) = 14.6 and 25.4, rounded to keep the total
    assert allocate(torch.tensor([[1.0, 3.0]]), total=40, floor=2, cap=100, alpha=0.5).tolist() == [[15, 25]]
    assert allocate(torch.full((4, 2), 0.7), total=80, floor=1, cap=50).eq(10).all()
    z = allocate(torch.tensor([[0.0, 1.0, 1.0]]), total=30, floor=3, cap=100)
    assert z[0, 0] == 3 and int(z.sum()) == 30


def test_caps_water_fill():
    b = allocate(torch.tensor([[100.0, 1.0, 1.0]]), total=60, floor=1, cap=30)
    assert b.tolist() == [[30, 15, 15]]


def test_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        allocate(torch.ones(2, 2), 8, 1, 4, alpha=-1)
    with pytest.raises(ValueError, match="cannot be met"):
        allocate(torch.ones(2, 2), 100, 1, 10)
    with pytest.raises(ValueError, match="ratio"):
        kept(100, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        uniform(100, 1.5, 2, 2)
    assert kept(1000, 0.3) == 300


def test_curves_equalise_marginal_gains():
    from kvsculpt.core.budget import allocate_curves, fit_curves

    # head 0: error falls fast with budget, head 1 slowly -> head 0 gets more at the same total
    sizes = [10, 20, 40]
    errs = torch.tensor([[[1.0, 0.1]], [[0.25, 0.07]], [[0.0625, 0.05]]])  # [K, L=1, H=2]
    a, b = fit_curves(sizes, errs)
    assert abs(float(b[0, 0]) - 2.0) < 1e-6 and float(b[0, 1]) < 1.0
    out = allocate_curves(a, b, total=60, floor=2, cap=100)
    assert int(out.sum()) == 60 and out[0, 0] > out[0, 1]


def test_plan_scopes_keep_their_totals():
    from kvsculpt.core.budget import Adaptive, Curves

    torch.manual_seed(0)
    base = torch.rand(4, 3) + 0.01

    def pilot(m):
        return base * (20 / m) ** 1.5

    for rule in (Adaptive, Curves):
        for scope in ("all", "heads", "layers"):
            b, rec = rule(scope=scope).plan(100, 0.3, 4, 3, pilot=pilot)
            t = torch.tensor(b)
            assert int(t.sum()) == 30 * 12 and t.min() >= 1 and t.max() <= 100
            if scope == "heads":
                assert t.sum(1).eq(90).all()
            if scope == "layers":
                assert (t == t[:, :1]).all()
    with pytest.raises(ValueError, match="unknown scope"):
        Curves(scope="lottery")


def test_global_ranks_all_entries_together_with_a_floor():
    from kvsculpt.core.budget import Global, allocate_global

    scores = torch.full((2, 2, 50), 0.01)
    scores[0, 1, :30] = 0.9  # one head whose entries all outrank the others
    b = allocate_global(scores, total=40, floor=2)
    assert int(b.sum()) == 40 and int(b.min()) == 2
    assert b[0, 1] == 30  # all of its strong entries, and the rest shared by the weak heads
    # an entry's rank is global: equal scores everywhere → near-equal shares
    even = allocate_global(torch.rand(3, 2, 100) * 1e-6 + 1.0, total=120, floor=1)
    assert int(even.sum()) == 120 and int(even.min()) >= 1
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_global(scores, total=201, floor=1)
    b, rec = Global(scope="heads").plan(50, 0.2, 2, 2, entry_scores=lambda: scores)
    assert torch.tensor(b).sum(1).eq(20).all() and rec["rule"] == "global"
    with pytest.raises(ValueError, match="scope"):
        Global(scope="layers")


def test_a_reader_ranks_the_block_it_holds_and_the_next_part_together():
    """allocate_running: the held entries and the part's are one ranking, so a strong part takes budget from a
    weak block (and the reverse); each head keeps at least ``floor`` of the part; the first part alone is
    KVzip's global rule (allocate_global) with the same total and floor."""
    from kvsculpt.core.budget import allocate_global, allocate_running

    torch.manual_seed(0)
    first = torch.rand(2, 2, 20)
    keep, b = allocate_running(None, first, total=24, floor=2)
    assert keep is None and torch.equal(b, allocate_global(first, total=24, floor=2))
    held = [[first[li, h].sort(descending=True).values[: int(b[li, h])] for h in range(2)] for li in range(2)]
    strong = torch.full((2, 2, 20), -1.0)  # below every held entry …
    strong[0, 1] = 5.0  # … but one head's part outranks every held one
    keep, b2 = allocate_running(held, strong, total=40, floor=3)
    assert b2.tolist() == [[3, 20], [3, 3]]  # the weak heads keep their floor, the strong one everything
    assert sum(int(k.sum()) for row in keep for k in row) == 40 - 29  # the block gave way: 11 of its 24 kept
    assert (
        sorted(torch.cat([x[k] for x, k in zip(sum(held, []), sum(keep, []), strict=True)]).tolist())
        == sorted(torch.cat(sum(held, [])).tolist())[-11:]
    )  # the block's 11 best, whatever their head
    for li in range(2):  # and what it keeps of a head is that head's best, in the block's order
        for h in range(2):
            n_kept = int(keep[li][h].sum())
            assert torch.equal(keep[li][h], torch.arange(held[li][h].numel()) < n_kept)
    weak = torch.full((2, 2, 20), -1.0)  # scores below every held one: the part keeps its floor only
    keep, b3 = allocate_running(held, weak, total=32, floor=2)
    assert b3.eq(2).all() and all(k.all() for row in keep for k in row)  # and the block keeps all 24
    with pytest.raises(ValueError, match="cannot be kept"):
        allocate_running(held, weak, total=24 + 81, floor=2)
