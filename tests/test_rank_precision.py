"""Rank pooling's precision: samples too ill-conditioned for float32 are solved in float64, and
their batch's backward runs in float64 from the forward's float64 state; p-space's backward
solves with the factor of ``H`` rather than by the Woodbury identity."""

from __future__ import annotations

import pytest
import torch

from argminlayers import LowRankHessian, Woodbury
from poolings.rank import METHODS, RankPool, RankPoolBackward, RankPoolObjective, rank_pool_solve
from poolings.rank.objective import ILL_CONDITIONED
from test_rank import F64, _mask, _one_thread  # noqa: F401 (autouse fixture)


def _walk(B, T, p, size, seed=0):
    """Random-walk frames of norm about ``size``, exactly representable in float32."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, p, generator=g, dtype=F64).cumsum(1)
    return (X * (size / X.norm(dim=-1, keepdim=True).mean())).float().double()


def _reference(V, mask, C, eps, G):
    """``dL/dV`` in float64 from an explicitly formed ``H = I + C V_AᵀV_A`` and ``torch.linalg.solve``."""
    sol = rank_pool_solve(V, mask, C, eps, method="pspace", max_iter=200)
    A = sol.state.active.to(F64)
    H = torch.eye(V.shape[-1], dtype=F64) + C * torch.einsum("btp,bt,btq->bpq", V, A, V)
    W = torch.linalg.solve(H, G)
    return -RankPoolObjective(C, eps).vjp_v(V, sol.u, mask, W, sol.state)


def _layer_grad(V, lengths, C, eps, G, **kw):
    X = V.detach().clone().requires_grad_(True)
    U = RankPool(C, eps, **kw)(X, lengths)
    (U * G.to(U.dtype)).sum().backward()
    return U, X.grad


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("method", METHODS)
def test_float32_ill_conditioned_samples_are_solved_in_float64(method):
    """Frames of norm ~100 with ``C = 10``: ``ε₃₂ C Σ_A ‖v_t‖²`` is up to 0.14, and the float32
    solve left these gradients 4.3 % (tspace), 1.3 % (pspace) and 0.27 % (cg) off, with nothing to
    tell them from good ones. Those samples are solved in float64 and their gradients are
    float64's, rounded (3.5e-8)."""
    T, lengths = 20, torch.tensor([20, 14, 9])
    mask = _mask(lengths, T)
    V = _walk(3, T, 64, 100.0) * mask.unsqueeze(-1)
    G = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = _reference(V, mask, 10.0, 0.1, G)
    obj = RankPoolObjective(10.0, 0.1, method=method)
    assert obj.solve(V.float(), mask).state.wide
    U, dV = _layer_grad(V.float(), lengths, 10.0, 0.1, G, method=method)
    assert dV.dtype == torch.float32
    assert _rel(dV, ref) < 1e-6


def test_only_ill_conditioned_samples_are_redone():
    """A batch of one ill-conditioned and one ordinary sample: the ordinary one keeps its float32
    solve (the same point as alone), the other gets the float64 one."""
    mask = torch.ones(2, 30, dtype=torch.bool)
    V = torch.cat((_walk(1, 30, 16, 100.0, seed=2), _walk(1, 30, 16, 1.0, seed=3))).float()
    bound = torch.finfo(torch.float32).eps * 1.0 * V.double().square().sum((1, 2))
    assert float(bound[0]) > ILL_CONDITIONED > float(bound[1])
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="pspace")
    alone = rank_pool_solve(V[1:], mask[1:], 1.0, 0.1, method="pspace")
    sixty_four = rank_pool_solve(V[:1].double(), mask[:1], 1.0, 0.1, method="pspace")
    torch.testing.assert_close(sol.u[1:], alone.u, rtol=0, atol=0)
    torch.testing.assert_close(sol.state.u[:1], sixty_four.state.u, rtol=0, atol=0)
    assert sol.state.wide and not alone.state.wide


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_with_a_redone_sample_runs_its_backward_in_float64(method):
    """One ill-conditioned sample and one ordinary one: the state stays float64 and the
    operator is float64 (the layer's strategy solves in float64), and the gradient is the float64
    backward of that very state, rounded. (Rounded to float32, ``w`` and the products ``v_tᵀw``
    left the redone samples 7–30 % off: ``w`` is large off the frames' span and small along it.)
    Without such a sample, state and operator stay in the dtype of ``V``."""
    mask = torch.ones(2, 20, dtype=torch.bool)
    V = torch.cat((_walk(1, 20, 64, 100.0, seed=2), _walk(1, 20, 64, 1.0, seed=3)))
    G = torch.randn(2, 64, generator=torch.Generator().manual_seed(5), dtype=F64)
    obj = RankPoolObjective(10.0, 0.1, method=method)
    sol = obj.solve(V.float(), mask)
    st = sol.state
    assert st.wide and st.u.dtype == st.e.dtype == F64
    H = obj.hessian(V.float(), sol.u, mask, st)
    assert H.dtype == F64
    W = RankPoolBackward().solve(obj.hessian(V, st.u, mask, st), G)  # float64 V, the same state
    exact = -obj.vjp_v(V, st.u, mask, W, st)
    _, dV = _layer_grad(V.float(), None, 10.0, 0.1, G, method=method)
    assert _rel(dV, exact) < 1e-6
    ordinary = obj.solve(V[1:].float(), mask[1:])
    assert not ordinary.state.wide and ordinary.state.e.dtype == torch.float32
    assert obj.hessian(V[1:].float(), ordinary.u, mask[1:], ordinary.state).dtype == torch.float32


def test_pspace_backward_solves_with_the_factor_of_H():
    """float64, ``C ‖V‖² ≈ 7·10¹⁰``: the Woodbury identity ``w = g − H⁻¹ M g`` cancels (``w``
    1.1e-6 from the explicit solve on these frames); the factor of ``H`` solves it directly
    (3e-15)."""
    mask = torch.ones(3, 40, dtype=torch.bool)
    V = _walk(3, 40, 8, 3e3, seed=6)
    G = torch.randn(3, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    obj = RankPoolObjective(100.0, 0.1, method="pspace")
    sol = obj.solve(V, mask)
    H = obj.hessian(V, sol.u, mask, sol.state)
    assert H.factor is sol.state.factor
    exact = torch.linalg.solve(H.dense(), G)
    assert _rel(Woodbury().solve(H, G), exact) < 1e-12
    identity = LowRankHessian(H.d, H.A, H.Bm, capacitance_factor=H.capacitance_factor)
    assert _rel(Woodbury().solve(identity, G), exact) > 1e-9  # what the factor avoids
    _, dV = _layer_grad(V, None, 100.0, 0.1, G, method="pspace")
    assert _rel(dV, _reference(V, mask, 100.0, 0.1, G)) < 1e-9


def test_low_rank_hessian_refuses_a_factor_of_the_wrong_shape():
    d, A = torch.ones(2, 3, dtype=F64), torch.zeros(2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"factor must have shape \(B, q, q\) = \(2, 3, 3\)"):
        LowRankHessian(d, A, factor=torch.eye(4, dtype=F64).expand(2, 4, 4))


@pytest.mark.parametrize("method", METHODS)
def test_float32_second_order_and_forward_mode_stay_float32(method):
    """The float64 operator of the state does not leak: double backward (which linearises
    afresh) and forward mode return float32 for float32 frames, and agree with float64."""
    pool = RankPool(1.0, 0.1, method=method)
    V64 = _walk(2, 10, 4, 2.0, seed=8)
    outs = {}
    for dt in (torch.float32, F64):
        V = V64.to(dt).requires_grad_(True)
        (g,) = torch.autograd.grad(pool(V).square().sum(), V, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), V)
        with torch.autograd.forward_ad.dual_level():
            out = pool(torch.autograd.forward_ad.make_dual(V.detach(), torch.ones_like(V)))
            tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
        assert g.dtype == gg.dtype == tangent.dtype == dt
        outs[dt] = (g, gg, tangent)
    for a, b in zip(outs[torch.float32], outs[F64]):
        assert _rel(a.detach(), b.detach()) < 1e-3
