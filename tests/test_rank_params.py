"""Learned ``C`` and ``ε`` of rank pooling: the three ways a tensor reaches the objective
(``nn.Parameter``, a tensor computed upstream, a buffer), exact gradients (gradcheck, finite
differences, the closed form against autograd, double backward, cvxpylayers with ``C`` and
``ε`` as ``cp.Parameter``s) and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from argminlayers import CG
from poolings.rank import RankPool, RankPoolObjective, rank_pool_solve
from test_rank import F64, _data, _margin, _mask, _one_thread  # noqa: F401 (autouse fixture)

LENGTHS = torch.tensor([6, 4, 2])


def _params(C=0.8, eps=0.15):
    return nn.Parameter(torch.tensor(C, dtype=F64)), nn.Parameter(torch.tensor(eps, dtype=F64))


def _pooled(pool):
    """``(V, C, eps) → pool(V, LENGTHS)`` with ``C`` and ``eps`` swapped in by ``functional_call``."""
    def fn(V, C, eps, lengths=LENGTHS):
        return functional_call(pool, {"layer.objective.C": C, "layer.objective.eps": eps}, (V, lengths))
    return fn


def _V(B=3, T=6, p=3, seed=0):
    return _data(B, T, p, seed=seed, scale=0.5).requires_grad_(True)


@pytest.mark.parametrize("method", ["tspace", "pspace", "cg"])
@pytest.mark.parametrize("backward", ["auto", "woodbury", "dense"])
def test_gradcheck_over_V_C_and_eps(method, backward):
    C, eps = _params()
    pool = RankPool(C=C, eps=eps, method=method, backward=backward)
    fn = _pooled(pool)
    V = _V()
    assert _margin(V.detach(), pool(V, LENGTHS).detach(), _mask(LENGTHS, 6), 0.15) > 1e-3  # away from kinks
    assert torch.autograd.gradcheck(fn, (V, C, eps))
    full = torch.tensor([6, 6, 6])
    assert torch.autograd.gradcheck(lambda V, C, eps: fn(V, C, eps, full), (V, C, eps))


@pytest.mark.parametrize("backward", ["sherman_morrison", "cg"])
def test_gradcheck_other_exact_strategies(backward):
    C, eps = _params()
    strategy = CG(tol=1e-13, max_iter=500) if backward == "cg" else backward
    fn = _pooled(RankPool(C=C, eps=eps, backward=strategy))
    assert torch.autograd.gradcheck(fn, (_V(), C, eps))


def test_finite_differences_of_C_and_eps():
    """Central differences at a larger batch; the solves are exact, so 1e-6 is far above their noise."""
    C, eps = _params(1.3, 0.05)
    V = _data(4, 30, 5, seed=1, scale=0.3)
    lengths = torch.tensor([30, 21, 12, 7])
    pool = RankPool(C=C, eps=eps)
    g = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    (pool(V, lengths) * g).sum().backward()
    h = 1e-6
    for P in (C, eps):
        with torch.no_grad():
            P += h
            up = (pool(V, lengths) * g).sum()
            P -= 2 * h
            down = (pool(V, lengths) * g).sum()
            P += h
        torch.testing.assert_close(P.grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


def test_closed_form_vjp_matches_autograd_of_the_gradient():
    """``vjp`` for ``C`` and ``ε`` against autograd through ``∇_u f`` (the closed forms are what the layer uses)."""
    C, eps = _params()
    obj = RankPoolObjective(C, eps)
    V = _data(3, 6, 3, seed=0, scale=0.5).detach()
    mask = _mask(LENGTHS, 6)
    V = V * mask[..., None]
    sol = obj.solve(V, mask)
    W = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    closed = obj.vjp(V, sol.u, mask, W, {"C": C, "eps": eps, "V": V}, sol.state)
    assert set(closed) == {"C", "eps"}  # V is vjp_v's
    auto = torch.autograd.grad((obj.grad(V, sol.u, mask) * W).sum(), (C, eps))
    torch.testing.assert_close(closed["C"], auto[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed["eps"], auto[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backward", ["woodbury", "dense"])
def test_gradgradcheck_over_V_C_and_eps(backward):
    C, eps = _params(0.7, 0.2)
    fn = _pooled(RankPool(C=C, eps=eps, backward=backward))
    V = _data(2, 5, 3, seed=0, scale=0.5).requires_grad_(True)
    lengths = torch.tensor([5, 3])
    assert torch.autograd.gradgradcheck(lambda V, C, eps: fn(V, C, eps, lengths), (V, C, eps))


def test_generic_solver_differentiates_C_through_f():
    """With a generic solver the objective's own ``f`` (which reads ``C``) is differentiated."""
    C, eps = _params(1.0, 0.1)
    fn = _pooled(RankPool(C=C, eps=eps, solver="newton"))
    lengths = torch.tensor([5, 3])
    assert torch.autograd.gradcheck(lambda V, C: fn(V, C, eps, lengths), (_V(B=2, T=5, p=2), C))


def test_against_cvxpylayers_with_C_and_eps_as_parameters():
    """SCS reaches u and its gradients to about 1e-9 here (measured); 1e-7 leaves room."""
    pytest.importorskip("cvxpylayers")
    from poolings.reference import CvxpyRankPool

    V0 = _data(2, 6, 3, seed=4, scale=0.5)
    lengths = torch.tensor([6, 4])
    g = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    out = {}
    for name, make in (("ours", RankPool), ("cvxpy", CvxpyRankPool)):
        C, eps = _params(0.7, 0.2)
        V = V0.clone().requires_grad_(True)
        U = make(C=C, eps=eps)(V, lengths)
        (U * g).sum().backward()
        out[name] = (U.detach(), C.grad, eps.grad, V.grad)
    for ours, ref in zip(out["ours"], out["cvxpy"]):
        assert ours.abs().max() > 1e-3  # the comparison is not of zeros
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()))


def test_parameter_buffer_and_captured_routes():
    C, eps = _params()
    pool = RankPool(C=C, eps=eps)
    assert [n for n, _ in pool.named_parameters()] == ["layer.objective.C", "layer.objective.eps"]
    assert set(pool.state_dict()) == {"layer.objective.C", "layer.objective.eps"}
    assert pool.to(torch.float32).C.dtype == torch.float32

    buffered = RankPool(C=torch.tensor(0.8, dtype=F64), eps=torch.tensor(0.15, dtype=F64))
    assert list(buffered.parameters()) == [] and set(buffered.state_dict()) == {"layer.objective.C", "layer.objective.eps"}
    V = _V().detach()
    torch.testing.assert_close(buffered(V, LENGTHS), RankPool(C=0.8, eps=0.15)(V, LENGTHS), rtol=0, atol=0)

    log_C = torch.tensor(0.8, dtype=F64).log().requires_grad_(True)  # computed upstream: read as an attribute
    g = torch.randn(3, 3, dtype=F64)
    (RankPool(C=log_C.exp(), eps=0.15)(V, LENGTHS) * g).sum().backward()
    C = nn.Parameter(torch.tensor(0.8, dtype=F64))
    (RankPool(C=C, eps=0.15)(V, LENGTHS) * g).sum().backward()
    torch.testing.assert_close(log_C.grad, C.grad * 0.8, rtol=1e-12, atol=1e-14)


class _Exp(nn.Module):
    """The parametrisation ``C = exp(θ)``: ``C > 0`` whatever an optimiser does to ``θ``."""

    def forward(self, x):
        return x.exp()

    def right_inverse(self, C):
        return C.log()


def test_a_parametrised_C_is_registered_once_and_differentiated_through_its_parametrisation():
    """``torch.nn.utils.parametrize`` on ``objective.C``: the original ``θ = log C`` is the layer's
    parameter (``state_dict``, optimisers), its gradient is ``C dL/dC`` for every method, and a
    second training step works (a tensor computed upstream must instead be recomputed each step)."""
    from torch.nn.utils import parametrize

    V, g = _V().detach(), torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    for method in ("tspace", "pspace", "cg"):
        pool = RankPool(C=nn.Parameter(torch.tensor(0.8, dtype=F64)), eps=0.15, method=method)
        parametrize.register_parametrization(pool.objective, "C", _Exp())
        assert [n for n, _ in pool.named_parameters()] == ["layer.objective.parametrizations.C.original"]
        theta = pool.objective.parametrizations.C.original
        torch.testing.assert_close(theta.detach(), torch.tensor(0.8, dtype=F64).log())
        (pool(V, LENGTHS) * g).sum().backward()
        C = nn.Parameter(torch.tensor(0.8, dtype=F64))
        (RankPool(C=C, eps=0.15, method=method)(V, LENGTHS) * g).sum().backward()
        torch.testing.assert_close(theta.grad, C.grad * 0.8, rtol=1e-9, atol=1e-12)
        theta.grad = None
        (pool(V, LENGTHS) * g).sum().backward()  # the second step: the parametrisation is evaluated afresh
        torch.testing.assert_close(theta.grad, C.grad * 0.8, rtol=1e-9, atol=1e-12)


def test_learning_C_moves_it_and_lowers_the_loss():
    """Bilevel learning: fit ``C`` so that the pooled vectors match those pooled at ``C = 3``."""
    V = _data(4, 12, 3, seed=6, scale=0.3)
    target = RankPool(C=3.0, eps=0.1)(V, None)
    log_C = nn.Parameter(torch.tensor(0.0, dtype=F64))
    pool = RankPool(C=1.0, eps=0.1)
    opt = torch.optim.Adam([log_C], lr=0.1)
    losses = []
    for _ in range(30):
        pool.objective.C = log_C.exp()  # a tensor computed upstream, recomputed every step
        loss = (pool(V, None) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.05 * losses[0]
    assert abs(log_C.detach().exp().item() - 3.0) < 0.5


def test_exact_methods_reach_float64_stationarity():
    """Every exact method returns a point whose relative gradient is at float64 rounding, for a
    ``C`` that float32 does not represent (a float32 product in the right-hand side shows here)."""
    V = _data(3, 7, 4, seed=0, scale=0.4)
    mask = _mask([7, 5, 3], 7)
    V = V * mask[..., None]
    obj = RankPoolObjective(0.8, 0.15)
    for method in ("tspace", "pspace", "cg"):
        sol = rank_pool_solve(V, mask, 0.8, 0.15, method=method)
        assert float(obj.grad(V, sol.u, mask).norm(dim=1).max()) < 1e-12, method


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"C": torch.ones(2)}, TypeError, r"C must be a real number or a 0-d floating tensor.*got a tensor of shape \(2,\)"),
        ({"C": torch.ones(1)}, TypeError, r"C must be a real number or a 0-d floating tensor.*shape \(1,\)"),
        ({"eps": torch.tensor(1)}, TypeError, r"eps must be a real number or a 0-d floating tensor.*torch.int64"),
        ({"C": torch.tensor(-1.0)}, ValueError, r"C must be > 0, got -1.0"),
        ({"eps": torch.tensor(float("nan"))}, ValueError, r"eps must be finite and >= 0, got nan"),
    ],
)
def test_tensor_parameter_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        RankPool(**kwargs)


def test_learned_C_out_of_range_is_refused_at_the_call():
    C, eps = _params()
    pool = RankPool(C=C, eps=eps)
    with torch.no_grad():
        C.fill_(-0.5)
    with pytest.raises(ValueError, match=r"C must be > 0, got -0.5; keep a learned C in range by a parametrisation"):
        pool(_V(), LENGTHS)


def test_torch_compile_of_a_model_with_learned_C_matches_eager():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 3)
            self.pool = RankPool(C=nn.Parameter(torch.tensor(0.9)), eps=nn.Parameter(torch.tensor(0.1)))

        def forward(self, x, lengths):
            return self.pool(torch.tanh(self.embed(x)), lengths).sum(-1)

    torch.manual_seed(0)
    model = Model()
    x, lengths = torch.randn(3, 6, 4), torch.tensor([6, 4, 2])
    ref = model(x, lengths)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, backend="aot_eager")(x, lengths)  # the layer runs eagerly inside
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), grads):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
        torch.testing.assert_close(p.grad, g)


def test_a_frozen_parameter_stays_a_parameter_and_learns_once_unfrozen():
    C = nn.Parameter(torch.tensor(0.8, dtype=F64), requires_grad=False)
    pool = RankPool(C=C, eps=0.15)
    assert [n for n, _ in pool.named_parameters()] == ["layer.objective.C"]
    C.requires_grad_(True)
    V = _V().detach()
    pool(V, LENGTHS).sum().backward()
    ref = nn.Parameter(torch.tensor(0.8, dtype=F64))
    RankPool(C=ref, eps=0.15)(V, LENGTHS).sum().backward()
    torch.testing.assert_close(C.grad, ref.grad, rtol=0, atol=0)


def test_an_upstream_tensor_assigned_over_a_buffer_is_differentiated():
    pool = RankPool(C=torch.tensor(1.0, dtype=F64), eps=0.15)  # C is a buffer
    log_C = nn.Parameter(torch.tensor(0.8, dtype=F64).log())
    pool.objective.C = log_C.exp()  # nn.Module keeps it among the buffers
    V = _V().detach()
    pool(V, LENGTHS).sum().backward()
    C = nn.Parameter(torch.tensor(0.8, dtype=F64))
    RankPool(C=C, eps=0.15)(V, LENGTHS).sum().backward()
    torch.testing.assert_close(log_C.grad, C.grad * 0.8, rtol=1e-12, atol=1e-14)


def test_printing_a_learned_C_does_not_touch_its_graph(recwarn):
    text = repr(RankPool(C=nn.Parameter(torch.tensor(1.5)), eps=0.1))
    assert "C=1.5, eps=0.1" in text
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
