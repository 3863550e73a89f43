"""Rank pooling's precision: samples too ill-conditioned for float32 are solved in float64, and
their batch's backward runs in float64 from the forward's float64 state; p-space's backward
solves with the factor of ``H`` rather than by the Woodbury identity; the Woodbury strategy solves
a float32 capacitance matrix too ill-conditioned for float32 in float64."""

from __future__ import annotations

import warnings

import pytest
import torch

import argminlayers
from argminlayers import LowRankHessian, Woodbury
from poolings.rank import METHODS, RankPool, RankPoolBackward, RankPoolObjective, rank_pool_solve
from poolings.rank.objective import ILL_CONDITIONED
from poolings.rank.pspace import PSpace
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
    b = b.detach()
    return float((a.detach().double() - b).norm() / b.norm())


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
def test_a_batch_ill_conditioned_throughout_is_solved_in_float64_at_once(method, monkeypatch):
    """Every sample above the bound over all its steps (frames of norm 30, 220 steps; a problem
    too large for the small-problem path): no float32 solve, which would be redone for every
    sample. The solution is the float64 solve's, rounded, with its float64 state (``wide``), and
    the gradient that of the float64 backward of that state."""
    import poolings.rank.objective as objective

    mask = torch.ones(2, 220, dtype=torch.bool)
    V = _walk(2, 220, 220, 30.0, seed=4).float()
    assert bool((torch.finfo(torch.float32).eps * V.double().square().sum((1, 2)) > ILL_CONDITIONED).all())
    spaces = []
    for name in ("TSpace", "PSpace", "NewtonCGSpace"):
        cls = getattr(objective, name)
        monkeypatch.setattr(objective, name, lambda V, *a, cls=cls, **k: spaces.append(V.dtype) or cls(V, *a, **k))
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method=method)
    assert spaces == [F64]
    ref = rank_pool_solve(V.double(), mask, 1.0, 0.1, method=method)
    assert sol.state.wide and sol.u.dtype == torch.float32 and bool(sol.converged.all())
    assert torch.equal(sol.u, ref.u.float()) and torch.equal(sol.iterations, ref.iterations)
    for name in ("u", "e", "factor", "gram"):
        mine, theirs = getattr(sol.state, name), getattr(ref.state, name)
        assert (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs)), name
    G = torch.randn(2, 220, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, dV = _layer_grad(V, None, 1.0, 0.1, G, method=method)
    _, dV64 = _layer_grad(V.double(), None, 1.0, 0.1, G, method=method)
    assert dV.dtype == torch.float32 and _rel(dV, dV64) < 1e-6


def test_a_batch_with_an_ordinary_sample_keeps_its_float32_solve(monkeypatch):
    """One ill-conditioned sample and one ordinary one, too large for the small-problem path: the
    batch is not solved in float64 at once: it is solved in float32, and the ill-conditioned
    sample alone again in float64."""
    import poolings.rank.objective as objective

    mask = torch.ones(2, 220, dtype=torch.bool)
    V = torch.cat((_walk(1, 220, 220, 30.0, seed=2), _walk(1, 220, 220, 0.05, seed=3))).float()
    bound = torch.finfo(torch.float32).eps * V.double().square().sum((1, 2))
    assert float(bound[0]) > ILL_CONDITIONED > float(bound[1])
    spaces = []
    monkeypatch.setattr(objective, "PSpace", lambda V, *a, **k: spaces.append(tuple(V.shape[:1]) + (V.dtype,))
                        or PSpace(V, *a, **k))
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="pspace")
    assert spaces[0] == (2, torch.float32)  # (the redo of one sample runs the small-problem path)
    assert sol.state.wide and bool(sol.converged.all())


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
def test_second_order_and_forward_mode_of_a_redone_batch_run_in_float64(method):
    """Double backward and forward mode linearise afresh (no state): on a wide batch they do it
    in float64 at the state's float64 ``u`` (in float32 the first-order gradient under
    ``create_graph=True`` was 1e-2–1e-1 off and the forward-mode tangent 1.5e-2–2e-1, where the
    plain backward was 6e-8), and return float32."""
    pool = RankPool(10.0, 0.1, method=method)
    V64 = _walk(2, 10, 64, 100.0, seed=8)
    assert RankPoolObjective(10.0, 0.1, method=method).solve(V64.float(), torch.ones(2, 10, dtype=torch.bool)).state.wide
    outs = {}
    for dt in (torch.float32, F64):
        V = V64.to(dt).requires_grad_(True)
        (g,) = torch.autograd.grad(pool(V).square().sum(), V, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), V)
        with torch.autograd.forward_ad.dual_level():
            out = pool(torch.autograd.forward_ad.make_dual(V.detach(), torch.ones_like(V)))
            tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
        assert g.dtype == gg.dtype == tangent.dtype == dt
        outs[dt] = (g.detach(), gg, tangent)
    for a, b in zip(outs[torch.float32], outs[F64]):
        assert _rel(a, b) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_float32_second_order_and_forward_mode_stay_float32(method):
    """Without a redone sample, double backward and forward mode run in float32 and agree with
    float64 to float32's accuracy there."""
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


@pytest.mark.parametrize("backward", ["woodbury", "dense", "sherman_morrison", "cg", "diagonal", "auto"])
@pytest.mark.parametrize("method", METHODS)
def test_strategies_take_a_float32_g_for_a_float64_operator(method, backward):
    """A strategy called directly (as the sphere-constrained pooling and the benchmarks do) on a
    wide state's float64 operator with a float32 ``g`` solves in float64 (the factor path of
    ``woodbury`` and ``dense`` raised "b and A to have the same dtype")."""
    mask = torch.ones(2, 12, dtype=torch.bool)
    V = _walk(2, 12, 6, 100.0, seed=9).float()
    obj = RankPoolObjective(10.0, 0.1, method=method)
    sol = obj.solve(V, mask)
    H = obj.hessian(V, sol.u, mask, sol.state)
    assert sol.state.wide and H.dtype == F64
    g = torch.randn(2, 6, generator=torch.Generator().manual_seed(10))
    strategy = RankPoolBackward() if backward == "auto" else argminlayers.get_strategy(backward)
    w = strategy.solve(H, g)
    assert w.dtype == F64
    if backward != "diagonal":
        torch.testing.assert_close(w, torch.linalg.solve(H.dense(), g.double()), rtol=1e-6, atol=0)


def test_float32_parameter_C_on_a_redone_batch():
    """A float32 ``nn.Parameter`` C with T-space on a wide batch: the operator's row scale is √C of
    the float the forward factorised with (``C**0.5`` of the float32 tensor differs from it by its
    rounding, which Woodbury amplified: dV 4.9e-4 off, dC 4.4e-6, dε 1.4e-4)."""
    lengths = torch.tensor([20, 14, 9])
    mask = _mask(lengths, 20)
    V = _walk(3, 20, 16, 100.0, seed=11) * mask.unsqueeze(-1)
    G = torch.randn(3, 16, generator=torch.Generator().manual_seed(12), dtype=F64)
    grads = {}
    for dt in (torch.float32, F64):
        C = torch.nn.Parameter(torch.tensor(10.0, dtype=dt))
        eps = torch.nn.Parameter(torch.tensor(0.1, dtype=dt))
        X = V.to(dt).requires_grad_(True)
        U = RankPool(C, eps, method="tspace")(X, lengths)
        (U * G.to(dt)).sum().backward()
        grads[dt] = (X.grad, C.grad, eps.grad)
    for a, b in zip(grads[torch.float32], grads[F64]):
        assert _rel(a, b) < 1e-6


def test_sphere_rank_pool_on_a_redone_batch():
    """The sphere-constrained rank pooling solves with the rank objective's operator and a
    float32 ``u``; on a wide p-space batch (T ≫ p) it raised a dtype error."""
    from poolings import SphereRankPool

    V = _walk(2, 400, 8, 10.0, seed=0)
    outs = {}
    for dt in (torch.float32, F64):
        X = V.to(dt).requires_grad_(True)
        U = SphereRankPool(10.0, 0.1, radius=5.0)(X)
        U.sum().backward()
        outs[dt] = (U.detach(), X.grad)
    torch.testing.assert_close(outs[torch.float32][0].norm(dim=-1), torch.full((2,), 5.0), rtol=1e-5, atol=0)
    for a, b in zip(outs[torch.float32], outs[F64]):
        assert _rel(a, b) < 1e-5


def test_woodbury_solves_an_ill_conditioned_float32_capacitance_in_float64():
    """``H = I + AᵀA`` with ``n = 20`` rows of norm ~300 in ``q = 8``: the capacitance matrix
    ``I + AAᵀ`` has condition ~10⁶ while ``H``'s is far smaller, and the float32 identity lost
    it (a float32 LogCoshRegression's gradient: 1.3e-2 off); it is solved in float64 instead."""
    from argminlayers.objectives import LogCoshRegression

    g = torch.Generator().manual_seed(13)
    A = (300 * torch.randn(3, 20, 8, generator=g, dtype=F64)).float().double()
    H64 = LowRankHessian(torch.ones(3, 8, dtype=F64), A, positive_diagonal=True)
    H32 = LowRankHessian(torch.ones(3, 8), A.float(), positive_diagonal=True)
    G = torch.randn(3, 8, generator=g, dtype=F64)
    exact = torch.linalg.solve(H64.dense(), G)
    w = Woodbury().solve(H32, G.float())
    assert w.dtype == torch.float32 and _rel(w, exact) < 1e-6
    W = Woodbury().solve_many(H32, G.float().unsqueeze(-1)).squeeze(-1)
    assert _rel(W, exact) < 1e-6
    mask = torch.ones(3, 20, dtype=torch.bool)
    V = _walk(3, 20, 8, 100.0, seed=14)
    grads = {}
    for dt in (torch.float32, F64):
        X = V.to(dt).requires_grad_(True)
        (argminlayers.ArgminLayer(LogCoshRegression(10.0), backward="woodbury")(X, mask) * G.to(dt)).sum().backward()
        grads[dt] = X.grad
    assert _rel(grads[torch.float32], grads[F64]) < 1e-4


@pytest.mark.parametrize("n, q, size", [(5, 4, 0.3), (8, 32, 100.0)], ids=["well-conditioned", "fewer-rows"])
def test_woodbury_keeps_these_float32_solves_in_float32(monkeypatch, n, q, size):
    """A well-conditioned capacitance matrix, and one with fewer rows than dimensions (there the
    float32 identity measured 5e-6 at a bound of 0.12): no float64 solve."""
    import argminlayers.strategies as strategies

    monkeypatch.setattr(strategies, "_in_float64", lambda lr: pytest.fail("widened this solve"))
    A = (torch.randn(2, n, q, generator=torch.Generator().manual_seed(15), dtype=F64).cumsum(1))
    A = (A * (size / A.norm(dim=-1, keepdim=True).mean())).float()
    H = LowRankHessian(torch.ones(2, q), A, positive_diagonal=True)
    G = torch.randn(2, q, generator=torch.Generator().manual_seed(16), dtype=F64)
    exact = torch.linalg.solve(LowRankHessian(torch.ones(2, q, dtype=F64), A.double()).dense(), G)
    assert _rel(Woodbury().solve(H, G.float()), exact) < 1e-4


def test_woodbury_returns_the_operators_dtype_for_any_g():
    """A float64 ``g`` for a float32 operator (the identity path raised "expected scalar type
    Double"), and a float32 ``g`` for a float64 one."""
    A = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(17))
    for dt, other in ((torch.float32, F64), (F64, torch.float32)):
        H = LowRankHessian(torch.ones(2, 4, dtype=dt), A.to(dt), positive_diagonal=True)
        G = torch.randn(2, 4, generator=torch.Generator().manual_seed(18)).to(other)
        assert Woodbury().solve(H, G).dtype == dt
        assert Woodbury().solve_many(H, G.unsqueeze(-1)).dtype == dt
        assert argminlayers.get_strategy("diagonal").solve(H, G).dtype == dt


def test_woodbury_check_on_a_leaf_that_requires_grad_is_silent():
    """The bound is read without the graph: the float32 sphere-constrained pooling's backward
    (its operator built from frames that require grad) printed torch's "Converting a tensor with
    requires_grad=True to a scalar" warning. torch prints it once per process, so in a new one."""
    import subprocess
    import sys

    code = (
        "import torch, warnings\n"
        "from poolings import SphereRankPool\n"
        "X = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(19)).cumsum(1)\n"
        "X = (X / X.norm(dim=-1, keepdim=True)).requires_grad_(True)\n"
        "warnings.simplefilter('error')\n"
        "SphereRankPool(1.0, 0.1, radius=1.0)(X).sum().backward()\n"
        "assert torch.isfinite(X.grad).all()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("normalize", [False, True])
def test_a_generic_solver_warns_on_frames_too_ill_conditioned_for_float32(normalize):
    """``solver="newton"`` runs in float32 without the float64 redo: on frames of norm 100 with
    ``C = 10`` its ``u`` was 3e-2 and its gradient 1.8 off without a word. It warns, naming the
    fixes; normalised frames (the same data with ``normalize=True``) are within float32's reach."""
    V = _walk(3, 20, 64, 100.0, seed=20).float()
    pool = RankPool(10.0, 0.1, solver="newton", normalize=normalize)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pool(V)
    mine = [w for w in seen if issubclass(w.category, argminlayers.PrecisionWarning)]
    if normalize:
        assert mine == []
    else:
        assert len(mine) == 1 and "solver=None" in str(mine[0].message) and "float64" in str(mine[0].message)
    with warnings.catch_warnings(record=True) as seen:  # the exact solve needs no warning: it redoes them
        warnings.simplefilter("always")
        RankPool(10.0, 0.1)(V)
    assert not [w for w in seen if issubclass(w.category, argminlayers.PrecisionWarning)]


def _piece_solution_extended(V, u, C, eps):
    """The minimiser of the piece of ``u``'s signed set, solved in NumPy's extended precision
    (long double, Gaussian elimination with partial pivoting): a reference beyond float64."""
    import numpy as np

    T, p = V.shape
    Vn = V.numpy()
    r = np.arange(1, T + 1) - Vn @ u.numpy()
    s = np.sign(r) * (np.abs(r) > eps)
    A = s != 0
    VA = Vn[A].astype(np.longdouble)
    H = np.eye(p, dtype=np.longdouble) + np.longdouble(C) * VA.T @ VA
    b = np.longdouble(C) * VA.T @ (np.arange(1, T + 1)[A].astype(np.longdouble) - np.longdouble(eps) * s[A])
    for k in range(p):
        piv = k + int(np.argmax(np.abs(H[k:, k])))
        H[[k, piv]], b[[k, piv]] = H[[piv, k]], b[[piv, k]]
        m = H[k + 1:, k] / H[k, k]
        H[k + 1:, k:] -= m[:, None] * H[k, k:]
        b[k + 1:] -= m * b[k]
    x = np.zeros(p, dtype=np.longdouble)
    for i in range(p - 1, -1, -1):
        x[i] = (b[i] - H[i, i + 1:] @ x[i + 1:]) / H[i, i]
    return torch.from_numpy(x.astype(np.float64))


@pytest.mark.parametrize("iteration", ["compiled", "numpy", "torch"])
@pytest.mark.parametrize("method", ["tspace", "pspace"])
def test_float64_frames_of_norm_1e5_converge(method, iteration, monkeypatch):
    """Where ``C ‖v_t‖² ≫ 1`` and the excesses are small, a reproduced set's gradient is its
    solve's backward error, ``ε (1 + C ‖V_A‖²) ‖u‖``, far above ``√ε`` times the plain relative
    gradient's scale: float64 frames of norm 1e5 ran T-space out of iterations unconverged (every
    iteration the same reproduced set) and zeroed their gradient. The reproduced set's test is
    relative to the scale of its piece (:func:`~poolings.rank.active_set.piece_scale`): every
    iteration (compiled, NumPy, torch) converges in a few iterations, to the piece's
    extended-precision minimiser within the bound ε·C·Σ_A‖v_t‖² (4e-5), and without a
    warning."""
    import poolings.rank.objective as objective
    import poolings.rank.small as small

    if iteration == "compiled" and small._kernel() is None:
        pytest.skip("the kernel is not built")
    if iteration != "compiled":
        monkeypatch.setattr(small, "COMPILED", False)
    if iteration == "torch":
        monkeypatch.setattr(objective, "is_small_numpy", lambda *a: False)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(2, 50, 64, generator=g, dtype=F64).cumsum(1)
    V = V * (1e5 / V.norm(dim=-1).amax())
    mask = torch.ones(2, 50, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = rank_pool_solve(V, mask, 1.0, 0.1, method=method)
    assert sol.converged.all(), sol.iterations
    assert int(sol.iterations.max()) < 20
    for b in range(2):
        ref = _piece_solution_extended(V[b], sol.u[b], 1.0, 0.1)
        bound = torch.finfo(F64).eps * float((V[b].square().sum(-1) * sol.state.active[b]).sum())  # about 4e-5
        assert _rel(sol.u[b], ref) < bound  # measured 4e-9 (T-space), 6e-6 (p-space: M = C VᵀV rounds)
    X = V.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankPool(1.0, 0.1, method=method)(X).sum().backward()
    assert X.grad.abs().sum(-1).gt(0).any(-1).all()  # every sample has its gradient


def test_float64_frames_beyond_float64_warn():
    """Where ``ε₆₄ · C Σ_A ‖v_t‖²`` exceeds :data:`ILL_CONDITIONED` there is no wider dtype to
    redo the samples in: a :class:`~argminlayers.PrecisionWarning` gives the bound and what to
    change (frames of norm 1e6, 2 × 50 × 64: the bound is 1e-2); frames of norm 1e4 do not warn."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(2, 50, 64, generator=g, dtype=F64).cumsum(1)
    V = V / V.norm(dim=-1).amax()
    mask = torch.ones(2, 50, dtype=torch.bool)
    for size, pool_kw in ((1e6, {}), (1e6, {"method": "pspace"})):
        with pytest.warns(argminlayers.PrecisionWarning, match="ill-conditioned even in float64.*bounds the relative error"):
            RankPool(1.0, 0.1, **pool_kw)(V * size)
    with pytest.warns(argminlayers.PrecisionWarning, match=r"C = 1\)"):
        rank_pool_solve(V * 1e6, mask, 1.0, 0.1, method="tspace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankPool(1.0, 0.1)(V * 1e4)
