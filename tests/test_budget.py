import pytest
import torch

from kvsculpt.budget import allocate, kept, uniform


def test_sums_exactly_and_respects_floor_and_cap():
    torch.manual_seed(0)
    e = torch.rand(7, 3) ** 4
    b = allocate(e, total=7 * 3 * 40, floor=4, cap=100, alpha=1.0)
    assert int(b.sum()) == 7 * 3 * 40
    assert int(b.min()) >= 4 and int(b.max()) <= 100


def test_harder_head_gets_more_equal_gets_uniform_zero_gets_floor():
    b = allocate(torch.tensor([[1.0, 3.0]]), total=40, floor=2, cap=100)
    assert b[0, 1] > b[0, 0]
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
