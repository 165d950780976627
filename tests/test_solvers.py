import pytest
import torch

from kvsculpt.attention import attend
from kvsculpt.solvers import Evict, Sculpt, SelectFit, fidelity, make_method, ridge_values


def problem(H=2, n=48, N=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(H, n, d, generator=g)
    V = torch.randn(H, n, d, generator=g)
    Q = torch.randn(H, N, d, generator=g) * 1.5
    return K, V, Q, d**-0.5


def test_ridge_solution_has_zero_gradient():
    g = torch.Generator().manual_seed(1)
    A = torch.softmax(torch.randn(3, 50, 10, generator=g), -1)
    O = torch.randn(3, 50, 4, generator=g)
    prior = torch.randn(3, 10, 4, generator=g)
    lam = 1e-2
    Vs = ridge_values(A, O, lam, prior).requires_grad_(True)
    reg = lam * (A.transpose(1, 2) @ A).diagonal(dim1=1, dim2=2).mean(-1)
    loss = ((A @ Vs - O) ** 2).sum() + (reg[:, None, None] * (Vs - prior) ** 2).sum()
    loss.backward()
    assert Vs.grad.abs().max() < 1e-4
    # and it beats a perturbed solution
    worse = Vs.detach() + 1e-2 * torch.randn_like(Vs)
    assert ((A @ worse - O) ** 2).sum() + (reg[:, None, None] * (worse - prior) ** 2).sum() > loss


def test_sculpt_never_ends_above_its_init_and_improves_a_random_problem():
    K, V, Q, s = problem()
    sculpt = Sculpt(iters=10, inner=5)
    init = SelectFit(lam=sculpt.lam, prior=sculpt.prior)
    O, z = attend(Q, K, V, s)
    for m in (6, 12):
        start = [sculpt.objective(Q[h], O[h], z[h], *init(K, V, Q, [m, m], s)[h], s) for h in range(2)]
        end = [sculpt.objective(Q[h], O[h], z[h], *sculpt(K, V, Q, [m, m], s)[h], s) for h in range(2)]
        for a, b in zip(start, end, strict=True):
            assert b <= a + 1e-6
        assert sum(end) < 0.9 * sum(start)


def test_select_fit_beats_copied_values_in_sample():
    K, V, Q, s = problem()
    for h, (sf, ev) in enumerate(
        zip(SelectFit()(K, V, Q, [8, 8], s), Evict()(K, V, Q, [8, 8], s), strict=True)
    ):
        assert torch.equal(sf[0], ev[0])  # same keys
        assert fidelity(Q[h], K[h], V[h], *sf, s)[0] < fidelity(Q[h], K[h], V[h], *ev, s)[0]


def test_variable_budgets_and_shapes():
    K, V, Q, s = problem(H=3)
    out = SelectFit()(K, V, Q, [5, 20, 5], s)
    assert [o[0].shape[0] for o in out] == [5, 20, 5]
    assert all(o[1].shape == (o[0].shape[0], 16) for o in out)


@pytest.mark.parametrize("score", Evict.SCORES)
def test_eviction_baselines_keep_original_entries(score):
    K, V, Q, s = problem()
    ctx = torch.randn(2, 2, 48, 16)
    out = make_method(score)(K, V, Q, [10, 10], s, context_queries=ctx)
    for h, (k, v, b) in enumerate(out):
        match = (K[h][None] == k[:, None]).all(-1)  # [10, n]
        assert match.any(-1).all() and b is None
        assert torch.equal(v, V[h][match.float().argmax(-1)])  # values copied with their keys
        assert k.shape == (10, 16)
    if score == "streaming-llm":
        assert torch.equal(out[0][0], torch.cat([K[0, :4], K[0, -6:]]))
    if score == "kvzip":  # sinks kept, then the keys with the highest peak attention
        peak = torch.softmax(Q[0] @ K[0].T * s, -1).amax(0)
        peak[:4] = float("inf")
        assert torch.equal(out[0][0], K[0][peak.topk(10).indices.sort().values])


def test_beta_options_fix_the_mass():
    K, V, Q, s = problem(N=300)
    plain = SelectFit()(K, V, Q, [8, 8], s)
    with_beta = SelectFit(beta="nnls")(K, V, Q, [8, 8], s)
    joint = Sculpt(iters=5, beta="joint")(K, V, Q, [8, 8], s)
    for h in range(2):
        z_err = fidelity(Q[h], K[h], V[h], *plain[h], s)[1]
        assert fidelity(Q[h], K[h], V[h], *with_beta[h], s)[1] < z_err
        assert fidelity(Q[h], K[h], V[h], *joint[h], s)[1] < z_err


def test_bad_inputs():
    K, V, Q, s = problem()
    with pytest.raises(ValueError, match="unknown method"):
        make_method("magic")
    with pytest.raises(ValueError, match="budgets"):
        SelectFit()(K, V, Q, [0, 4], s)
    with pytest.raises(ValueError, match="context's own queries"):
        make_method("snapkv")(K, V, Q, [4, 4], s)
    with pytest.raises(ValueError, match="bad option"):
        make_method("sculpt", colour="red")
    with pytest.raises(ValueError, match="select must be"):
        make_method("select-fit", select="mean")
    with pytest.raises(ValueError, match="recent must be"):
        make_method("sculpt", recent=-4)


def test_select_max_keeps_a_key_that_one_query_needs():
    """A 'needle' key that only one query attends to is dropped by summed attention but kept by its maximum."""
    g = torch.Generator().manual_seed(0)
    d, n, N = 16, 32, 200
    eye = torch.eye(d) * 4
    K = torch.cat(
        [eye[:8], eye[8:9], torch.randn(n - 9, d, generator=g) * torch.tensor([0.0] * 9 + [1.0] * 7)]
    )
    Q = (eye[:8].sum(0) * 2.5).expand(N, d) + 0.1 * torch.randn(N, d, generator=g)  # spread over keys 0–7
    Q[0] = eye[8] * 12  # the one query that needs key 8
    K, V, Q = K[None], torch.randn(1, n, d, generator=g), Q[None]
    kept = lambda method: (method(K, V, Q, [4], 0.25)[0][0][:, None] == K[0][None]).all(-1).any(0)  # noqa: E731
    assert not kept(SelectFit())[8]
    assert kept(SelectFit(select="max"))[8]


def test_recent_positions_are_always_kept():
    K, V, Q, s = problem(H=2, n=48)
    heads = SelectFit(recent=6)(K, V, Q, [8, 4], s)
    assert torch.equal(heads[0][0][-6:], K[0, -6:])  # the last 6 of 8 kept entries are the last 6 positions
    assert torch.equal(heads[1][0], K[1, -4:])  # a budget below `recent` keeps only recent positions
    assert not torch.equal(SelectFit()(K, V, Q, [8, 4], s)[0][0][-6:], K[0, -6:])


def test_queries_that_look_elsewhere_count_less():
    """``local_lse``: a query whose attention mostly goes outside the block barely affects selection or fit."""
    K = torch.zeros(1, 3, 4)
    K[0, 0, 0], K[0, 1, 1] = 10.0, 8.0
    V = torch.randn(1, 3, 4)
    Q = torch.zeros(1, 2, 4)
    Q[0, 0, 0], Q[0, 1, 1] = 3.0, 3.0  # query 0 peaks on key 0, query 1 (less sharply) on key 1
    evict = make_method("kvzip", sinks=0)
    assert evict(K, V, Q, [1], 1.0)[0][0].equal(K[0, :1])
    z = torch.logsumexp(Q @ K.transpose(1, 2), -1)  # [1, 2]
    elsewhere = torch.stack([z[0, 0] + 6.0, torch.tensor(float("-inf"))])[None]
    assert evict(K, V, Q, [1], 1.0, local_lse=elsewhere)[0][0].equal(K[0, 1:2])
    # no mass elsewhere (-inf) changes nothing
    K, V, Q, s = problem()
    none = torch.full(Q.shape[:2], float("-inf"))
    for a, b in zip(
        SelectFit()(K, V, Q, [8, 8], s), SelectFit()(K, V, Q, [8, 8], s, local_lse=none), strict=True
    ):
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
