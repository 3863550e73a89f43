"""Rank pooling: exact forward (vs liblinear and the generic Newton path), every backward
strategy (gradcheck, mutual agreement, closed forms vs torch.func), preprocessing, errors.
The three forward methods against each other: tests/test_rank_methods.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import argminlayers
from argminlayers import CG, Objective
from torch.autograd.gradcheck import GradcheckError

from argminlayers.check import errors, gradcheck
from poolings.preprocess import l2_normalize, reverse_sequences, signed_sqrt, time_varying_mean
from poolings.rank import RankPool, RankPoolObjective, RankPoolState, rank_pool_solve, rank_targets

F64 = torch.float64
STRATEGIES = ["woodbury", "diagonal", "sherman_morrison", "cg", "dense"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids OpenMP barriers stalling when the
    cores are shared with other test workers (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(B, T, p, seed=0, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, p, generator=g, dtype=dtype)


def _mask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)


def _residuals(V, U, mask):
    return rank_targets(mask, V.dtype) - torch.einsum("btp,bp->bt", V, U)


def _margin(V, U, mask, eps):
    """``min_t ||r_t| − ε|`` over valid steps: distance to the non-differentiable points."""
    r = _residuals(V, U, mask)
    return float(((r.abs() - eps).abs())[mask].min())


def _liblinear(v, C, eps):
    from sklearn.svm import LinearSVR

    n = v.shape[0]
    svr = LinearSVR(C=C / 2, epsilon=eps, loss="squared_epsilon_insensitive", fit_intercept=False,
                    dual=True, tol=1e-10, max_iter=100000)
    svr.fit(v.numpy(), np.arange(1, n + 1, dtype=np.float64))
    return torch.from_numpy(svr.coef_.copy())


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("T,p", [(5, 3), (5, 64), (20, 16), (60, 3), (60, 64)])
@pytest.mark.parametrize("variable", [False, True])
def test_forward_matches_liblinear(T, p, variable):
    C, eps = 1.0, 0.1
    B = 3
    lengths = [T, max(1, T // 2), max(1, T // 3)] if variable else [T] * B
    V = _data(B, T, p, seed=T * 100 + p, scale=0.3)
    U = RankPool(C, eps)(V, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        ref = _liblinear(V[b, :n], C, eps)
        assert float((U[b] - ref).norm() / ref.norm()) < 1e-6


def test_forward_matches_generic_newton_and_is_optimal():
    V = _data(4, 15, 6, seed=1, scale=0.5)
    lengths = torch.tensor([15, 11, 6, 2])
    fast = RankPool(2.0, 0.3)
    newton = RankPool(2.0, 0.3, solver="newton")
    assert newton.layer.solver is not None and fast.layer.solver is None
    U_fast, U_newton = fast(V, lengths), newton(V, lengths)
    assert float((U_fast - U_newton).norm() / U_newton.norm()) < 1e-8
    # the backward without the forward state (active set from U, capacitance factorised by Woodbury)
    cmp = argminlayers.check.compare(newton, fast, V, lengths)
    assert cmp.grad_rel_err < 1e-8
    mask = _mask(lengths, 15)
    sol = fast.layer.solve(V, mask)
    assert bool(sol.converged.all())
    g = fast.objective.grad(V, sol.u, mask)
    assert float(g.norm(dim=-1).max() / sol.u.norm(dim=-1).min()) < 1e-10
    assert torch.allclose(sol.grad_norm, g.norm(dim=-1), atol=1e-9)


@pytest.mark.parametrize("method", ["tspace", "pspace", "cg"])
@pytest.mark.parametrize("case", ["constant", "random"])
def test_signed_active_set_trap(case, method):
    """From u = 0 every step is active with s = +1. Here the first Newton solve flips signs
    while every step stays active: stopping on the unsigned set would return a wrong point.

    ``constant``: v_t = 1, targets 1..4, ε = 0.2: the first solve gives u ≈ 2.3 (residuals
    −1.3, −0.3, 0.7, 1.7: all active, two signs flipped); the optimum is u ≈ 2.5."""
    if case == "constant":
        C, eps, V = 100.0, 0.2, torch.ones(1, 4, 1, dtype=F64)
    else:
        C, eps, V = 10.0, 0.01, _data(1, 20, 2, seed=3)
    T, p = V.shape[1:]
    mask = torch.ones(1, T, dtype=torch.bool)
    y = rank_targets(mask, F64)[0]
    v = V[0]
    # the first solve of the active-set method (all active, s = +1), written out in u-space
    u_first = torch.linalg.solve(torch.eye(p, dtype=F64) + C * v.T @ v, C * v.T @ (y - eps))
    r_first = y - v @ u_first
    assert bool((r_first.abs() > eps).all()), "the unsigned active set must be unchanged (all active)"
    assert bool((r_first < -eps).any()), "some signs must have flipped"
    obj = RankPoolObjective(C, eps)
    g_first = obj.grad(V, u_first.unsqueeze(0), mask)
    assert float(g_first.norm() / u_first.norm()) > 1e-2  # the unsigned stopping rule is not optimal
    sol = rank_pool_solve(V, mask, C, eps, method=method)
    # (with p = 1, Newton-CG's exact line search along its first direction is the whole problem)
    assert bool(sol.converged.all()) and int(sol.iterations[0]) >= (1 if (method, p) == ("cg", 1) else 2)
    assert float(obj.grad(V, sol.u, mask).norm() / sol.u.norm()) < 1e-10
    assert float((sol.u[0] - _liblinear(v, C, eps)).norm() / sol.u.norm()) < 1e-6
    if case == "constant":
        assert float((sol.u[0] - u_first).norm() / sol.u.norm()) > 5e-2


def _relative_kkt(obj, V, U, mask):
    """``‖∇_u f‖ / (‖u‖ + C Σ_A |e_t| ‖v_t‖)`` in u-space: the size of the terms that cancel."""
    r = _residuals(V, U, mask)
    e = torch.where((r.abs() > obj.eps) & mask, r - torch.sign(r) * obj.eps, torch.zeros_like(r))
    scale = U.norm(dim=-1) + obj.C * (e.abs() * V.norm(dim=-1)).sum(-1)
    return obj.grad(V, U, mask).norm(dim=-1) / scale


@pytest.mark.parametrize("method", ["tspace", "pspace"])
@pytest.mark.parametrize("case", ["relu", "walk", "tall"])
def test_hard_regimes_converge_in_few_iterations(case, method, monkeypatch):
    """Large C·K: ReLU features (every |r_t| ≈ ε at the optimum, steps must cross the tube),
    a random walk (half the steps inactive; it needs the exact line search), and T ≫ p."""
    import poolings.rank.active_set as active_set
    import poolings.rank.small as small

    searches = []
    original = active_set.exact_line_search
    monkeypatch.setattr(small, "COMPILED", False)  # the kernel's own line search: test_rank_small.py
    for module in (active_set, small):  # the general iteration and the small problems' NumPy one
        monkeypatch.setattr(module, "exact_line_search", lambda *a, **k: (searches.append(1), original(*a, **k))[1])
    g = torch.Generator().manual_seed(31)
    if case == "relu":
        V = torch.randn(4, 40, 300, generator=g, dtype=F64).relu()
    elif case == "walk":
        V = torch.randn(4, 40, 300, generator=g, dtype=F64).cumsum(1) / 300 ** 0.5
    else:
        V = 3 * torch.randn(4, 80, 3, generator=g, dtype=F64)
    mask = torch.ones(4, V.shape[1], dtype=torch.bool)
    obj = RankPoolObjective(100.0, 0.1)
    sol = rank_pool_solve(V, mask, obj.C, obj.eps, method=method)
    assert bool(sol.converged.all())
    assert int(sol.iterations.max()) <= 10
    assert float(_relative_kkt(obj, V, sol.u, mask).max()) < 1e-11
    if case == "walk":
        assert searches, "this case exercises the line-search fallback"


def test_exact_line_search_minimises_along_the_line():
    from poolings.rank.common import exact_line_search

    g = torch.Generator().manual_seed(32)
    B, T, C, eps = 6, 12, 3.0, 0.4
    X = torch.randn(B, T, 5, generator=g, dtype=F64)
    K = X @ X.transpose(1, 2)
    mask = _mask([12, 12, 10, 7, 12, 3], T)
    K = K * (mask.unsqueeze(1) & mask.unsqueeze(2))
    y = rank_targets(mask, F64)
    beta = torch.randn(B, T, generator=g, dtype=F64) * mask
    d = torch.randn(B, T, generator=g, dtype=F64) * mask
    d[4] = -d[4]
    r, dr = y - (K @ beta.unsqueeze(-1)).squeeze(-1), -(K @ d.unsqueeze(-1)).squeeze(-1)

    def phi(a):  # a: (S,) -> (B, S)
        b = beta.unsqueeze(1) + a.view(1, -1, 1) * d.unsqueeze(1)
        ra = r.unsqueeze(1) + a.view(1, -1, 1) * dr.unsqueeze(1)
        quad = 0.5 * (b * (b @ K)).sum(-1)
        return quad + 0.5 * C * ((ra.abs() - eps).clamp_min(0).square() * mask.unsqueeze(1)).sum(-1)

    # in T-space u = Vᵀβ and K d = −Δr: uᵀd_u = −βᵀΔr, d_uᵀd_u = −dᵀΔr
    alpha = exact_line_search(r, dr, -(beta * dr).sum(-1), -(d * dr).sum(-1), mask, C, eps)
    grid = torch.linspace(0, 3, 30001, dtype=F64)
    f_grid = phi(grid)
    best = f_grid.min(-1).values
    f_alpha = phi(alpha.view(-1))[torch.arange(B), torch.arange(B)]
    assert bool((f_alpha <= best + 1e-9 * best.abs().clamp_min(1)).all())
    # where the direction is not a descent direction, no step is taken
    assert bool(((alpha == 0) == (f_grid[:, 1] >= f_grid[:, 0])).all())


@pytest.mark.parametrize("method", ["tspace", "pspace", "cg"])
def test_padded_steps_inactive_and_exact_zeros_in_state(method):
    V = _data(2, 7, 4, seed=5)
    mask = _mask([7, 3], 7)
    V = V * mask.unsqueeze(-1)
    C = 1.0
    sol = rank_pool_solve(V, mask, C, 0.1, method=method)
    st = sol.state
    assert isinstance(st, RankPoolState) and st.method == method
    assert not bool(st.active[1, 3:].any())
    assert bool((st.e[1, 3:] == 0).all())
    a = st.active.to(F64).unsqueeze(-1)
    if method == "tspace":  # factor of I + C D K D: identity rows at padded (and inactive) steps
        eye = torch.eye(7, dtype=F64)
        LLt = st.factor @ st.factor.transpose(1, 2)
        assert torch.allclose(LLt[1, 3:, :], eye[3:, :].expand(4, 7))
        assert torch.allclose(LLt, eye + C * (a * V) @ (a * V).transpose(1, 2), atol=1e-12)
    elif method == "pspace":  # factor of H = I + M, M = C V_Aᵀ V_A: padded steps play no part
        M = C * (a * V).transpose(1, 2) @ (a * V)
        torch.testing.assert_close(st.gram, M, atol=1e-12, rtol=0)
        LLt = st.factor @ st.factor.transpose(1, 2)
        torch.testing.assert_close(LLt, torch.eye(4, dtype=F64) + M, atol=1e-12, rtol=0)
    else:
        assert st.factor is None and st.preconditioner is not None


def test_unreachable_targets_give_zero():
    """``ε ≥ T``: every target is inside the tube at u = 0, so u* = 0 with nothing active."""
    V = _data(2, 3, 4, seed=6)
    U = RankPool(1.0, 5.0)(V)
    assert bool((U == 0).all())


def test_nonconvergence_is_reported():
    V = _data(2, 60, 3, seed=7, scale=3.0)
    with pytest.warns(argminlayers.ConvergenceWarning, match="did not converge"):
        RankPool(100.0, 0.5, max_iter=1)(V)
    with pytest.raises(argminlayers.ConvergenceError):
        RankPool(100.0, 0.5, max_iter=1, on_nonconvergence="raise")(V)


# ------------------------------------------------------------------------------ backward
def _gradcheck_data():
    """B=3, T=6, p=3 with lengths (6, 4, 2); both active and inactive steps, away from |r| = ε."""
    C, eps = 1.0, 0.4
    V = _data(3, 6, 3, seed=2, scale=0.6)
    lengths = torch.tensor([6, 4, 2])
    mask = _mask(lengths, 6)
    sol = rank_pool_solve(V * mask.unsqueeze(-1), mask, C, eps)
    return C, eps, V, lengths, mask, sol


def test_gradcheck_data_is_away_from_kinks():
    C, eps, V, lengths, mask, sol = _gradcheck_data()
    assert _margin(V * mask.unsqueeze(-1), sol.u, mask, eps) > 1e-2
    active = sol.state.active
    assert bool(active[mask].any()) and not bool(active[mask].all())  # D ≠ I is exercised


@pytest.mark.parametrize("backward", STRATEGIES)
def test_gradcheck_every_strategy(backward):
    C, eps, V, lengths, mask, sol = _gradcheck_data()
    strategy = CG(tol=1e-13) if backward == "cg" else backward
    pool = RankPool(C, eps, backward=strategy)
    if backward == "diagonal":
        # an approximation: on generic data its gradient is not the derivative ...
        with pytest.raises(GradcheckError):
            X = V.clone().requires_grad_(True)
            torch.autograd.gradcheck(lambda x: pool(x, lengths), (X,), atol=1e-5, rtol=1e-3, fast_mode=True)
        # ... but it is exact where H is diagonal (p = 1, or features on disjoint coordinates),
        # and there it passes gradcheck, padded steps included
        assert gradcheck(pool, V[..., :1], lengths)
        onehot = torch.zeros(3, 6, 6, dtype=F64)
        onehot[:, torch.arange(6), torch.arange(6)] = 0.5 + 0.1 * torch.arange(6, dtype=F64)
        assert gradcheck(pool, onehot, lengths)
    else:
        assert gradcheck(pool, V, lengths)


def test_diagonal_gradcheck_against_its_own_definition():
    """The diagonal strategy is exactly -∂/∂V[wᵀ∇f] with w = g / diag(H): check that formula."""
    C, eps, V, lengths, mask, sol = _gradcheck_data()
    V = V * mask.unsqueeze(-1)
    obj = RankPoolObjective(C, eps)
    G = _data(1, 3, 3, seed=12)[0]
    X = V.clone().requires_grad_(True)
    (dV,) = torch.autograd.grad(RankPool(C, eps, backward="diagonal")(X, lengths), X, G)
    W = G / obj.hessian_diag(V, sol.u, mask)
    ref = -Objective.vjp_v(obj, V, sol.u, mask, W)
    assert torch.allclose(dV, ref * mask.unsqueeze(-1), atol=1e-12)


def _grads(backward, V, lengths, G, C=1.0, eps=0.3):
    X = V.clone().requires_grad_(True)
    (dV,) = torch.autograd.grad(RankPool(C, eps, backward=backward)(X, lengths), X, G)
    return dV


def test_exact_strategies_agree():
    V = _data(3, 12, 9, seed=13, scale=0.5)
    lengths = torch.tensor([12, 8, 4])
    G = _data(1, 3, 9, seed=14)[0]
    ref = _grads("woodbury", V, lengths, G)
    for backward in ["sherman_morrison", "dense", CG(tol=1e-14, max_iter=200)]:
        rel, _, _ = errors(_grads(backward, V, lengths, G), ref)
        assert rel < 1e-8, (backward, rel)


def test_diagonal_is_an_approximation(capsys):
    """Cosine of the diagonal gradient to the exact one, measured (not asserted to be high)."""
    V = _data(4, 30, 64, seed=15, scale=64 ** -0.5)
    G = _data(1, 4, 64, seed=16)[0]
    exact, diag = _grads("woodbury", V, None, G, eps=0.1), _grads("diagonal", V, None, G, eps=0.1)
    _, _, cos = errors(diag, exact)
    print(f"diagonal vs exact gradient cosine (B=4, T=30, p=64): {cos:.4f}")
    assert 0 < cos < 1 - 1e-6


@pytest.mark.parametrize("p", [64, 300])  # a batched GEMM, and two elementwise passes (wide frames)
def test_mixed_product_closed_form_matches_autograd_at_any_width(p):
    obj = RankPoolObjective(1.5, 0.1, method="tspace")
    V = _data(2, 120, p, seed=21, scale=0.1)
    mask = _mask([120, 70], 120)
    V = V * mask.unsqueeze(-1)
    U, X = _data(1, 2, p, seed=22)[0] * 0.05, _data(1, 2, p, seed=23)[0]
    closed = obj.vjp_v(V, U, mask, X)
    assert closed.abs().amax() > 0
    torch.testing.assert_close(closed, Objective.vjp_v(obj, V, U, mask, X), atol=1e-12, rtol=1e-10)


def test_closed_forms_match_torch_func():
    obj = RankPoolObjective(1.5, 0.2, method="tspace")
    V = _data(3, 9, 5, seed=17, scale=0.5)
    mask = _mask([9, 6, 2], 9)
    V = V * mask.unsqueeze(-1)
    U = _data(1, 3, 5, seed=18)[0]  # a generic point, not the optimum
    X = _data(1, 3, 5, seed=19)[0]
    assert torch.allclose(obj.value(V, U, mask), Objective.value(obj, V, U, mask), atol=1e-12)
    assert torch.allclose(obj.grad(V, U, mask), Objective.grad(obj, V, U, mask), atol=1e-12)
    assert torch.allclose(obj.hvp(V, U, mask, X), Objective.hvp(obj, V, U, mask, X), atol=1e-12)
    H_generic = torch.func.vmap(torch.func.hessian(obj.f, argnums=1))(V, U, mask)
    assert torch.allclose(obj.hessian(V, U, mask).dense(), H_generic, atol=1e-12)
    assert torch.allclose(obj.hessian_diag(V, U, mask), H_generic.diagonal(dim1=-2, dim2=-1), atol=1e-12)
    assert torch.allclose(obj.vjp_v(V, U, mask, X), Objective.vjp_v(obj, V, U, mask, X), atol=1e-12)
    # at the optimum, with the forward state
    sol = obj.solve(V, mask)
    ref = Objective.vjp_v(obj, V, sol.u, mask, X)
    assert torch.allclose(obj.vjp_v(V, sol.u, mask, X, sol.state), ref, atol=1e-12)
    H = obj.hessian(V, sol.u, mask, sol.state)
    assert torch.allclose(H.dense(), Objective.hessian(obj, V, sol.u, mask).dense(), atol=1e-12)
    # the forward factor is the Cholesky factor of exactly the Woodbury capacitance matrix
    cap = H.capacitance()  # I + A Aᵀ with the scaled rows
    A, _ = H.rows()
    torch.testing.assert_close(cap, torch.eye(9, dtype=F64) + A @ A.transpose(1, 2))
    L = sol.state.factor
    assert torch.allclose(L @ L.transpose(1, 2), cap, atol=1e-10)


@pytest.mark.parametrize("method", ["tspace", "pspace"])
@pytest.mark.parametrize("backward", ["woodbury", "auto"])
def test_woodbury_reuses_the_forward_factorisation(monkeypatch, method, backward):
    """The exact backward factorises nothing: T-space hands over the capacitance factor,
    p-space the factor of H itself (as the capacitance factor of H = I + I·M)."""
    V = _data(2, 10, 6, seed=20, scale=0.5).requires_grad_(True)
    pool = RankPool(1.0, 0.1, method=method, backward=backward)
    seen = {}
    original_hessian = pool.objective.hessian

    def spy_hessian(V, U, mask, state=None):
        H = original_hessian(V, U, mask, state)
        seen["factor"], seen["state"] = H.capacitance_factor, state
        return H

    monkeypatch.setattr(pool.objective, "hessian", spy_hessian)
    U = pool(V)
    calls = []
    for name in ["cholesky", "cholesky_ex", "lu_factor", "lu_factor_ex", "solve", "inv"]:
        fn = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    U.sum().backward()
    assert calls == []
    assert isinstance(seen["state"], RankPoolState) and seen["state"].method == method
    assert seen["factor"] is seen["state"].factor
    n = 10 if method == "tspace" else 6
    assert seen["factor"].shape == (2, n, n)


# ---------------------------------------------------------------------------- preprocessing
def test_time_varying_mean_formula():
    V = _data(2, 5, 3, seed=21)
    mask = _mask([5, 3], 5)
    M = time_varying_mean(V, mask)
    for b, n in enumerate([5, 3]):
        for t in range(n):
            assert torch.allclose(M[b, t], V[b, : t + 1].mean(0))
        assert bool((M[b, n:] == 0).all())


def test_reverse_sequences():
    V = torch.arange(2 * 4 * 1, dtype=F64).view(2, 4, 1) + 1
    out = reverse_sequences(V, _mask([4, 2], 4))
    assert out[0, :, 0].tolist() == [4, 3, 2, 1]
    assert out[1, :, 0].tolist() == [6, 5, 0, 0]
    mask = torch.tensor([[True, False, True, True]])  # a mask with a hole: valid steps reversed in place
    assert reverse_sequences(V[:1], mask)[0, :, 0].tolist() == [4, 0, 3, 1]
    assert torch.equal(reverse_sequences(reverse_sequences(V, _mask([4, 2], 4)), _mask([4, 2], 4)),
                       V * _mask([4, 2], 4).unsqueeze(-1))


def test_signed_sqrt_value_and_finite_gradient_at_zero():
    x = torch.tensor([-4.0, -1e-30, 0.0, 1e-30, 0.25, 9.0], dtype=F64, requires_grad=True)
    y = signed_sqrt(x)
    assert torch.allclose(y, torch.sign(x) * x.abs().sqrt())
    y.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert float(x.grad[2]) == 0.0
    assert torch.allclose(x.grad[[0, 4, 5]], 0.5 / x.detach()[[0, 4, 5]].abs().sqrt())
    xs = torch.tensor([-2.0, 0.3, 1.7], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(signed_sqrt, (xs,))


def test_l2_normalize_safe_at_zero():
    V = _data(1, 3, 4, seed=22)
    V[0, 1] = 0
    V.requires_grad_(True)
    out = l2_normalize(V, torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(out[0, [0, 2]].norm(dim=-1), torch.ones(2, dtype=F64))
    assert bool((out[0, 1] == 0).all())
    out.sum().backward()
    assert bool(torch.isfinite(V.grad).all())


def test_bidirectional_shape_and_halves():
    V = _data(3, 6, 4, seed=23, scale=0.5)
    lengths = torch.tensor([6, 4, 2])
    pool = RankPool(bidirectional=True)
    U = pool(V, lengths)
    assert U.shape == (3, 8) and pool.output_dim(4) == 8 and RankPool().output_dim(4) == 4
    mask = _mask(lengths, 6)
    assert torch.allclose(U[:, :4], RankPool()(V, lengths))
    assert torch.allclose(U[:, 4:], RankPool()(reverse_sequences(V, mask), lengths))


def test_preprocessing_order_is_videodarwin():
    V = _data(2, 5, 3, seed=24)
    mask = _mask([5, 4], 5)
    pool = RankPool(smoothing=True, signed_sqrt=True, normalize=True)
    expected = l2_normalize(signed_sqrt(time_varying_mean(V, mask)), mask)
    assert torch.allclose(pool.preprocess(V * mask.unsqueeze(-1), mask), expected)
    assert torch.allclose(pool(V, mask), RankPool()(expected, mask))


@pytest.mark.parametrize("backward", ["woodbury", "diagonal"])
def test_padded_steps_have_no_influence_with_every_option(backward):
    kw = dict(smoothing=True, signed_sqrt=True, normalize=True, bidirectional=True, backward=backward)
    pool = RankPool(1.0, 0.1, **kw)
    lengths = torch.tensor([6, 3])
    mask = _mask(lengths, 6)
    V1 = _data(2, 6, 4, seed=25)
    V2 = torch.where(mask.unsqueeze(-1), V1, _data(2, 6, 4, seed=26, scale=100.0))
    V3 = torch.where(mask.unsqueeze(-1), V1, torch.full_like(V1, float("nan")))
    outs, grads = [], []
    for V in (V1, V2, V3):
        X = V.clone().requires_grad_(True)
        U = pool(X, lengths)
        U.pow(2).sum().backward()
        outs.append(U.detach())
        grads.append(X.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for g in grads:
        assert bool((g[~mask] == 0).all()) and bool(torch.isfinite(g).all())
        assert float(g[mask].abs().sum()) > 0
    assert gradcheck(RankPool(1.0, 0.1, smoothing=True, signed_sqrt=True, normalize=True, bidirectional=True),
                     V1.abs() + 0.1, lengths)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("C,eps,name", [(0.0, 0.1, "C"), (-1.0, 0.1, "C"), (1.0, -0.1, "eps"),
                                         (float("nan"), 0.1, "C"), (1.0, float("inf"), "eps")])
def test_bad_hyperparameters(C, eps, name):
    with pytest.raises(ValueError, match=name):
        RankPool(C, eps)


@pytest.mark.parametrize("options", [{}, {"smoothing": True, "bidirectional": True}])
def test_bad_inputs(options):
    pool = RankPool(**options)
    V = _data(2, 5, 3, seed=27)
    with pytest.raises(ValueError, match="lengths"):
        pool(V, torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="lengths"):
        pool(V, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="lengths"):
        pool(V, torch.tensor([5, 2, 1]))
    with pytest.raises(ValueError, match="mask"):
        pool(V, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="V"):
        pool(V[0])
    bad = V.clone()
    bad[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="V"):
        pool(bad)
    bad[1, 1, 2] = 0
    bad[1, 4, 0] = float("nan")  # NaN at a padded step is fine
    assert bool(torch.isfinite(pool(bad, torch.tensor([5, 4]))).all())


def test_bad_solver_options():
    with pytest.raises(ValueError, match="max_iter"):
        RankPool(max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        RankPool(tol=-1.0)
    with pytest.raises(ValueError, match="backward"):
        RankPool(backward="nope")
    with pytest.raises(ValueError, match="method='nope' is not known"):
        RankPool(method="nope")
    with pytest.raises(ValueError, match="method"):
        rank_pool_solve(_data(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), 1.0, 0.1, method="Tspace")


# ------------------------------------------------------------------------- dtypes, devices
def test_float32_close_to_float64():
    V = _data(3, 40, 32, seed=28, scale=0.2)
    lengths = torch.tensor([40, 25, 9])
    U64 = RankPool()(V, lengths)
    V32 = V.float().requires_grad_(True)
    U32 = RankPool()(V32, lengths)
    assert U32.dtype == torch.float32
    assert float((U32.detach().double() - U64).norm() / U64.norm()) < 1e-4
    U32.sum().backward()
    G64 = _grads("woodbury", V, lengths, torch.ones(3, 32, dtype=F64), eps=0.1)
    assert errors(V32.grad, G64)[0] < 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    V = _data(3, 20, 16, seed=29, scale=0.3)
    lengths = torch.tensor([20, 12, 5])
    G = _data(1, 3, 16, seed=30)[0]
    for backward in ["woodbury", "diagonal"]:
        ref = _grads(backward, V, lengths, G, eps=0.1)
        X = V.cuda().requires_grad_(True)
        U = RankPool(backward=backward)(X, lengths.cuda())
        (dV,) = torch.autograd.grad(U, X, G.cuda())
        assert U.device.type == "cuda"
        assert torch.allclose(U.cpu(), RankPool()(V, lengths), atol=1e-9)
        assert torch.allclose(dV.cpu(), ref, atol=1e-8)
    U32 = RankPool()(V.float().cuda(), lengths.cuda())
    assert float((U32.double().cpu() - RankPool()(V, lengths)).norm()) < 1e-3 * float(RankPool()(V, lengths).norm())


def test_loose_tolerance_is_accepted():
    """A user tolerance looser than the internal optimality check is honoured, not refused."""
    V = _data(2, 10, 4, seed=3)
    u = RankPool(tol=1e-3, max_iter=3)(V)
    assert torch.isfinite(u).all()


@pytest.mark.parametrize("module", ["layer", "objective", "active_set", "tspace", "pspace", "newton_cg", "cost",
                                    "common", "factored"])
def test_docstring_examples_of_the_rank_package(module):
    """The examples in the docstrings of every module of ``poolings.rank`` run."""
    import doctest
    import importlib

    mod = importlib.import_module(f"poolings.rank.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module == "layer":
        assert result.attempted > 0


@pytest.mark.parametrize("method", ["pspace", "cg"])
def test_a_float32_solve_out_of_descent_is_finished_in_float64(monkeypatch, method):
    # float32 passes over V cannot bring the relative gradient to 1e-12: with that floor every
    # sample stops without descent left (cg, as long videos of wide frames do at the real floor)
    # or runs out of iterations (pspace), and is solved again in float64 instead of being
    # returned unconverged (no gradient)
    import poolings.rank.objective as ro

    real = ro.rounding_floor
    monkeypatch.setattr(ro, "rounding_floor", lambda dt: (1e-13, 1e-12) if dt == torch.float32 else real(dt))
    mask = _mask([40, 25, 9], 40)
    V = (_data(3, 40, 6, seed=5, scale=0.3) * mask.unsqueeze(-1)).float()
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method=method, tol=1e-13, check_tol=1e-12)
    ref = rank_pool_solve(V.double(), mask, 1.0, 0.1, method=method, tol=1e-13, check_tol=1e-12)
    assert bool(sol.converged.all()) and bool(ref.converged.all())
    assert bool((sol.iterations > ref.iterations).all())  # the float32 attempt came first
    assert sol.u.dtype == torch.float32
    torch.testing.assert_close(sol.u, ref.u.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sol.state.active, ref.state.active)
    torch.testing.assert_close(sol.state.e, ref.state.e.float(), atol=1e-6, rtol=1e-6)


def test_line_search_steps_at_the_rounding_level_end_the_solve(monkeypatch):
    # one sample of long float32 video whose solve, with its passes accumulated in float32 (as
    # p-space's were), reached a relative gradient of 1.5e-4 (under the float32 check_tol floor,
    # its last set not reproduced by float32 residuals) and then took line-search steps of
    # α ~ 1e-11 that lowered f by rounding, one an iteration, for 8 iterations: such a step is no
    # descent, and the sample is done at once (after 4 iterations, not 11)
    import poolings.rank.pspace as ps
    from poolings.bench.common import make_sequences

    monkeypatch.setattr(ps, "combine_long", lambda cols, V: torch.bmm(cols.to(V.dtype), V).double())
    V = make_sequences(4, 8000, 512, kind="walk", seed=0, dtype=torch.float32, device="cpu")[3:4].contiguous()
    mask = torch.ones(1, 8000, dtype=torch.bool)
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="pspace")
    assert bool(sol.converged.all()) and int(sol.iterations.max()) <= 5


def test_float32_long_video_pspace_is_accurate():
    # the right-hand sides C V_Aᵀ(y − sε) sum 4000 terms whose targets reach 4000: accumulated in
    # float32 they left u 1.1e-3 from the float64 minimiser of the same data; in float64, 1.5e-5
    from poolings.bench.common import make_sequences

    V = make_sequences(2, 4000, 256, kind="walk", seed=0, dtype=torch.float32, device="cpu")
    mask = _mask([4000, 3100], 4000)
    V = V * mask.unsqueeze(-1)
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="pspace")
    ref = rank_pool_solve(V.double(), mask, 1.0, 0.1, method="pspace")
    assert bool(sol.converged.all())
    err = (sol.u.double() - ref.u).norm(dim=-1) / ref.u.norm(dim=-1)
    assert float(err.max()) < 1e-4
