"""Average, max and approximate rank pooling; the shared call."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from argminlayers import check
from poolings import ApproxRankPool, AvgPool, MaxPool, approx_rank_weights, get_pooling

DT = torch.float64


def data(B=3, T=6, p=4, seed=0):
    return torch.randn(B, T, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


LENGTHS = torch.tensor([6, 3, 1])


def alpha_reference(T: int) -> list[Fraction]:
    """α_t = 2(T − t + 1) − (T + 1)(H_T − H_{t−1}), exactly, in rational arithmetic."""
    H = [Fraction(0)]
    for i in range(1, T + 1):
        H.append(H[-1] + Fraction(1, i))
    return [2 * (T - t + 1) - (T + 1) * (H[T] - H[t - 1]) for t in range(1, T + 1)]


@pytest.mark.parametrize("T", [1, 2, 3, 7, 20])
def test_approx_rank_weights_match_formula(T):
    alpha = approx_rank_weights(torch.ones(1, T, dtype=torch.bool), DT)[0]
    expected = torch.tensor([float(a) for a in alpha_reference(T)], dtype=DT)
    torch.testing.assert_close(alpha, expected, rtol=1e-13, atol=1e-13)


def test_approx_rank_weights_catch_the_off_by_one():
    """Using H_t instead of H_{t−1} (a known porting slip) changes every weight and
    breaks Σ_t α_t = 0; the formula's weights sum to zero."""
    T = 5
    alpha = approx_rank_weights(torch.ones(1, T, dtype=torch.bool), DT)[0]
    H = torch.cumsum(1.0 / torch.arange(1, T + 1, dtype=DT), 0)
    t = torch.arange(1, T + 1, dtype=DT)
    slipped = 2 * (T - t + 1) - (T + 1) * (H[-1] - H)
    assert float(alpha.sum().abs()) < 1e-12
    assert float(slipped.sum().abs()) > 1.0
    assert not torch.allclose(alpha, slipped)
    assert alpha[0] == pytest.approx(float(alpha_reference(T)[0]))


def test_approx_rank_uses_each_sequence_length():
    V = data()
    out = ApproxRankPool()(V, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        alpha = torch.tensor([float(a) for a in alpha_reference(n)], dtype=DT)
        torch.testing.assert_close(out[b], alpha @ V[b, :n])


def test_avg_pool_is_the_masked_mean():
    V = data()
    out = AvgPool()(V, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        torch.testing.assert_close(out[b], V[b, :n].mean(0))


def test_max_pool_over_valid_steps():
    V = data()
    V[1, 3:] = 100.0  # padded: must never win
    out = MaxPool()(V, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        torch.testing.assert_close(out[b], V[b, :n].amax(0))


@pytest.mark.parametrize("backward", ["woodbury", "dense", "diagonal", "cg", "sherman_morrison"])
def test_avg_pool_gradcheck(backward):
    assert check.gradcheck(AvgPool(backward=backward), data(), LENGTHS)


@pytest.mark.parametrize("pool", [MaxPool(), ApproxRankPool()], ids=["max", "approx_rank"])
def test_closed_form_gradcheck(pool):
    assert check.gradcheck(pool, data(), LENGTHS)


@pytest.mark.parametrize("name", ["avg", "max", "approx_rank"])
def test_padded_steps_no_influence(name):
    pool = get_pooling(name)
    V = data().requires_grad_(True)
    out = pool(V, LENGTHS)
    out.sum().backward()
    assert V.grad[1, 3:].abs().sum() == 0 and V.grad[2, 1:].abs().sum() == 0
    W = V.detach().clone()
    W[1, 3:] = float("nan")
    torch.testing.assert_close(pool(W, LENGTHS), out.detach(), rtol=0, atol=0)


def test_mask_accepted_in_place_of_lengths():
    V = data()
    mask = torch.arange(6).unsqueeze(0) < LENGTHS.unsqueeze(1)
    for name in ["avg", "max", "approx_rank"]:
        pool = get_pooling(name)
        torch.testing.assert_close(pool(V, mask), pool(V, LENGTHS))
        assert pool.output_dim(4) == 4


def test_unknown_pooling_name():
    with pytest.raises(ValueError, match=r"pooling='median' is not known; choose one of"):
        get_pooling("median")


@pytest.mark.parametrize("name", ["avg", "max", "approx_rank"])
def test_bad_input_named(name):
    pool = get_pooling(name)
    with pytest.raises(ValueError, match="V must have 3 dimensions"):
        pool(torch.zeros(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="lengths must lie in 1..T"):
        pool(data(), torch.tensor([7, 1, 1]))
    bad = data()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="V contains NaN or Inf"):
        pool(bad)


@pytest.mark.parametrize("cls", [AvgPool, MaxPool, ApproxRankPool])
def test_torch_compile_of_a_pooling_with_lengths_matches_eager_and_logs_no_graph_break(cls, capfd):
    torch._dynamo.reset()
    pool = cls()
    V, lengths = torch.randn(3, 6, 4, requires_grad=True), torch.tensor([6, 4, 2])
    ref = pool(V, lengths)
    (g_ref,) = torch.autograd.grad(ref.sum(), V)
    capfd.readouterr()
    out = torch.compile(pool, backend="aot_eager")(V, lengths)
    (g,) = torch.autograd.grad(out.sum(), V)
    err = capfd.readouterr().err
    assert "Graph break" not in err and "Tensor.item()" not in err, err  # dynamo logs these to stderr
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match=r"lengths must lie in 1..T"):  # the checks still run inside
        torch.compile(pool, backend="aot_eager")(V, torch.tensor([7, 4, 2]))
