"""The three exact forward methods of rank pooling (T-space, p-space, Newton-CG): each against
liblinear and the others, every backward strategy after each of them (gradcheck, agreement),
the structure each one hands to the backward, the method choice ("auto") and its errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import argminlayers
from argminlayers import CG
from argminlayers.check import errors, gradcheck
from poolings.rank import METHODS, RankPool, RankPoolObjective, choose_method, method_costs, rank_pool_solve
from poolings.rank.newton_cg import NystromPreconditioner
from test_rank import F64, _data, _liblinear, _mask, _margin

EXACT = ["woodbury", "auto", "sherman_morrison", "dense", "cg"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _strategy(backward):
    return CG(tol=1e-13, max_iter=500) if backward == "cg" else backward


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("B,T,p", [(3, 60, 4), (3, 6, 48), (3, 24, 24), (2, 150, 12)])
@pytest.mark.parametrize("variable", [False, True])
def test_methods_agree_and_match_liblinear(B, T, p, variable):
    """T ≫ p, T ≪ p, T = p; float64. liblinear to 1e-6, the methods to each other to 1e-8."""
    C, eps = 1.0, 0.1
    lengths = [T, max(1, T // 2), max(1, T // 5)][:B] if variable else [T] * B
    V = _data(B, T, p, seed=T * 7 + p, scale=p**-0.5).cumsum(1) / T**0.5  # drifting frames
    mask = _mask(lengths, T)
    V = V * mask.unsqueeze(-1)
    ref = torch.stack([_liblinear(V[b, :n], C, eps) for b, n in enumerate(lengths)])
    U = {}
    for method in METHODS:
        sol = rank_pool_solve(V, mask, C, eps, method=method)
        assert bool(sol.converged.all()), method
        assert sol.state.method == method
        U[method] = sol.u
        rel = ((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
        assert float(rel) < 1e-6, (method, float(rel))
    for method in METHODS[1:]:
        assert float((U[method] - U["tspace"]).norm() / U["tspace"].norm()) < 1e-8, method


@pytest.mark.parametrize("method", METHODS)
def test_float32_matches_float64(method):
    V = _data(3, 40, 12, seed=28, scale=0.2)
    lengths = torch.tensor([40, 25, 9])
    U64 = RankPool(method="tspace")(V, lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no ConvergenceWarning
        U32 = RankPool(method=method)(V.float(), lengths)
    assert U32.dtype == torch.float32
    assert float((U32.double() - U64).norm() / U64.norm()) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_nonconvergence_is_reported_by_every_method(method):
    V = _data(2, 60, 3, seed=7, scale=3.0)
    with pytest.raises(argminlayers.ConvergenceError, match="did not converge"):
        RankPool(100.0, 0.5, method=method, max_iter=1, on_nonconvergence="raise")(V)


# ------------------------------------------------------------------------------ backward
def _gradcheck_case(T, p):
    """B = 3 with lengths (T, T−2, 2): active and inactive steps, away from |r| = ε."""
    V = _data(3, T, p, seed={(6, 3): 0, (4, 6): 2}[T, p], scale=0.6)
    lengths = torch.tensor([T, T - 2, 2])
    mask = _mask(lengths, T)
    sol = rank_pool_solve(V * mask.unsqueeze(-1), mask, 1.0, 0.4, method="tspace")
    assert _margin(V * mask.unsqueeze(-1), sol.u, mask, 0.4) > 1e-2
    active = sol.state.active[mask]
    assert bool(active.any()) and not bool(active.all())
    return V, lengths


@pytest.mark.parametrize("shape", [(6, 3), (4, 6)], ids=["T>p", "T<p"])
@pytest.mark.parametrize("backward", EXACT)
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_every_method_and_exact_backward(method, backward, shape):
    V, lengths = _gradcheck_case(*shape)
    assert gradcheck(RankPool(1.0, 0.4, method=method, backward=_strategy(backward)), V, lengths)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_backward_after_every_method(method):
    """The diagonal approximation is ``−∂/∂V[wᵀ∇f]`` with ``w = g / diag(H)``, whatever the method."""
    V, lengths = _gradcheck_case(6, 3)
    G = _data(1, 3, 3, seed=12)[0]
    grads = []
    for m in (method, "tspace"):
        X = V.clone().requires_grad_(True)
        (dV,) = torch.autograd.grad(RankPool(1.0, 0.4, method=m, backward="diagonal")(X, lengths), X, G)
        grads.append(dV)
    assert errors(grads[0], grads[1])[0] < 1e-10


def test_exact_backwards_agree_across_methods():
    """Every method × exact strategy gives one gradient (1e-8), padded steps exactly zero."""
    for T, p in [(30, 5), (5, 30)]:
        V = _data(3, T, p, seed=13 + T, scale=0.5)
        lengths = torch.tensor([T, T - 3, 2])
        G = _data(1, 3, p, seed=14)[0]
        ref = None
        for method in METHODS:
            for backward in EXACT:
                X = V.clone().requires_grad_(True)
                pool = RankPool(1.0, 0.3, method=method, backward=_strategy(backward))
                (dV,) = torch.autograd.grad(pool(X, lengths), X, G)
                assert bool((dV[1, T - 3:] == 0).all())
                if ref is None:
                    ref = dV
                rel = errors(dV, ref)[0]
                assert rel < 1e-8, (T, p, method, backward, rel)


def test_pspace_hands_over_the_factor_of_H():
    """p-space: ``H = I + I·M`` with ``A = I`` (an expanded view) and ``B = M = C V_AᵀV_A``; its
    capacitance matrix is ``H`` itself, factorised by the forward; no ``T × T`` buffer anywhere."""
    V = _data(2, 40, 5, seed=40, scale=0.4)
    mask = _mask([40, 30], 40)
    V = V * mask.unsqueeze(-1)
    obj = RankPoolObjective(2.0, 0.1, method="pspace")
    sol = obj.solve(V, mask)
    H = obj.hessian(V, sol.u, mask, sol.state)
    assert H.A.stride(0) == 0  # the identity, not materialised per sample
    assert H.capacitance_factor is sol.state.factor and H.capacitance_factor.shape == (2, 5, 5)
    torch.testing.assert_close(H.capacitance(), H.dense())  # I + M = H
    dense = obj.hessian(V, sol.u, mask).dense()  # the T-row structure, from u
    torch.testing.assert_close(H.dense(), dense)
    L = H.capacitance_factor
    torch.testing.assert_close(L @ L.mT, dense)
    g = _data(1, 2, 5, seed=41)[0]
    w = argminlayers.Woodbury().solve(H, g)
    torch.testing.assert_close(w, torch.linalg.solve(dense, g))
    assert all(t.shape[-1] != 40 or t.dim() < 3 for t in (sol.state.factor, sol.state.gram))


def test_cg_backward_is_preconditioned_cg(monkeypatch):
    """After Newton-CG the exact backward ("auto") runs CG on S H S with the forward's Nyström
    preconditioner S, not a factorisation; it matches Woodbury to 1e-8."""
    V = _data(2, 30, 8, seed=42, scale=0.3).cumsum(1)
    G = _data(1, 2, 8, seed=43)[0]
    ref = torch.autograd.grad(RankPool(method="tspace", backward="woodbury")(V.requires_grad_(True)), V, G)[0]
    applied = []
    original = NystromPreconditioner.apply
    monkeypatch.setattr(NystromPreconditioner, "apply", lambda self, x: (applied.append(1), original(self, x))[1])
    X = V.detach().clone().requires_grad_(True)
    U = RankPool(method="cg")(X)
    applied.clear()
    calls = []
    for name in ["cholesky", "cholesky_ex"]:
        fn = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    (dV,) = torch.autograd.grad(U, X, G)
    assert calls == [] and len(applied) > 2
    assert errors(dV, ref)[0] < 1e-8


def test_nystrom_preconditioner_is_the_stated_operator():
    """``S = I + U diag(s − 1) Uᵀ`` with orthonormal ``U`` and ``s ∈ (0, 1]``; ``S H S`` has
    its largest eigenvalues pulled in (a smaller condition number than ``H``)."""
    V = _data(2, 200, 30, seed=44, scale=30**-0.5).cumsum(1)
    mask = torch.ones(2, 200, dtype=torch.bool)
    P = NystromPreconditioner.sketch(V, mask, 1.0, rank=8)
    assert P.U.shape == (2, 30, 8) and P.s.shape == (2, 8)
    torch.testing.assert_close(P.U.mT @ P.U, torch.eye(8, dtype=F64).expand(2, 8, 8))
    assert bool(((P.s > 0) & (P.s <= 1)).all())
    H = torch.eye(30, dtype=F64) + V.mT @ V
    S = torch.stack([torch.func.vmap(lambda e: P.apply(e.expand(2, 30))[b])(torch.eye(30, dtype=F64))
                     for b in range(2)])
    cond = torch.linalg.cond(H)
    cond_p = torch.linalg.cond(S @ H @ S)
    assert bool((cond_p < cond / 10).all()), (cond, cond_p)


def test_a_non_finite_sample_leaves_the_others_their_sketch_and_their_solve():
    """NaN frames in one sample of a direct ``rank_pool_solve`` call (the layer refuses them
    earlier): that sample gets no preconditioning and is reported not converged; the others are
    solved as alone (the sketch's eigenproblem used to raise for the whole batch)."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 10, 4, generator=g).cumsum(1) / 10**0.5  # float32
    mask = torch.ones(3, 10, dtype=torch.bool)
    bad = V.clone()
    bad[0, 3, 1] = float("nan")
    P = NystromPreconditioner.sketch(bad, mask, 1.0)
    assert bool((P.s[0] == 1).all()) and bool(torch.isfinite(P.s).all()) and not bool((P.s[1] == 1).all())
    sol = rank_pool_solve(bad, mask, 1.0, 0.1, method="cg")
    assert sol.converged.tolist() == [False, True, True]
    good = rank_pool_solve(V[1:], mask[1:], 1.0, 0.1, method="cg")
    torch.testing.assert_close(sol.u[1:], good.u, rtol=1e-5, atol=1e-6)


def test_an_all_zero_video_gets_the_gradient_of_every_method():
    """An all-zero video (ReLU features of a black clip): the sketch has no factor, so that sample
    gets no preconditioning, and its gradient (at u* = 0) is the one the direct methods give. The preconditioner was NaN there, and so was the gradient under cg, silently."""
    V = _data(3, 6, 4, seed=8, scale=0.3)
    V[1] = 0
    P = NystromPreconditioner.sketch(V, torch.ones(3, 6, dtype=torch.bool), 1.0)
    assert bool(torch.isfinite(P.U).all()) and bool((P.apply(V[:, 0])[1] == 0).all())
    grads = {}
    for method in ("cg", "tspace", "pspace"):
        X = V.clone().requires_grad_(True)
        RankPool(method=method)(X).sum().backward()
        grads[method] = X.grad
    assert bool(torch.isfinite(grads["cg"]).all()) and bool((grads["cg"][1].abs().sum(-1) > 0).all())
    torch.testing.assert_close(grads["cg"], grads["tspace"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads["pspace"], grads["tspace"], rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- the choice
def test_auto_runs_the_chosen_method_and_reports_it():
    tall, wide = _data(2, 400, 4, seed=45, scale=0.1), _data(2, 4, 400, seed=46, scale=0.3)
    for V in (tall, wide):
        pool = RankPool()
        assert pool.method == "auto" and pool.last_method is None
        U = pool(V)
        chosen = choose_method(*V.shape, dtype=V.dtype, device=V.device)
        assert pool.last_method == chosen == pool.objective.choose_method(V)
        sol = pool.layer.solve(V, torch.ones(V.shape[:2], dtype=torch.bool))
        assert sol.state.method == chosen
        torch.testing.assert_close(U, RankPool(method=chosen)(V))
    assert RankPool()(tall) is not None and RankPool().objective.choose_method(tall) == "pspace"
    assert RankPool().objective.choose_method(wide) == "tspace"
    for method in METHODS:
        pool = RankPool(method=method)
        pool(tall)
        assert pool.last_method == method == pool.objective.choose_method(tall)
    assert RankPool(solver="newton").last_method is None


def test_cost_model_choices():
    """Small ``min(T, p)``: the space of the smaller side; both large: matrix-free; memory caps."""
    assert choose_method(16, 300, 64) == "pspace"
    assert choose_method(4, 8000, 64) == "pspace"
    assert choose_method(2, 50, 512) == "tspace"
    assert choose_method(4, 100, 4096) == "tspace"
    assert choose_method(4, 4000, 512) != "tspace"
    assert choose_method(16, 4000, 4096) == "cg"
    assert choose_method(2, 100, 80, memory_limit=1) == "cg"  # nothing direct fits
    costs = method_costs(16, 4000, 2048)
    assert set(costs) == set(METHODS)
    assert costs["tspace"].bytes > 4 * 2**30 and costs["cg"].bytes < 2**27
    assert choose_method(16, 4000, 2048) != "tspace"


def test_cost_model_counts_the_load_of_the_frames():
    """CG's iterations grow with the per-step load ``C mean ‖v_t‖²``; the direct methods' cost
    does not: unnormalised frames (or a large ``C``) move the choice from ``cg`` to a direct
    method. (Measured at 4 × 1000 × 2048, frames of norm 30: ``cg`` 5.2 s, ``tspace`` 1.1 s.)"""
    from poolings.bench.common import make_sequences
    from poolings.rank import choose_method_for

    assert choose_method(4, 1000, 2048) == "cg" == choose_method(4, 1000, 2048, load=0.5)
    assert choose_method(4, 1000, 2048, load=900.0) == "tspace"
    assert choose_method(2, 2000, 1024, load=100.0) == "pspace"
    costs = [method_costs(4, 1000, 2048, load=x) for x in (1.0, 10.0, 100.0)]
    assert costs[0]["cg"].seconds < costs[1]["cg"].seconds < costs[2]["cg"].seconds
    assert costs[0]["tspace"].seconds == costs[2]["tspace"].seconds
    V = make_sequences(2, 2000, 1024)  # unit-norm frames
    assert choose_method_for(V, 1.0) == "cg"
    assert choose_method_for(V * 10, 1.0) == choose_method_for(V, 100.0) == "pspace"
    half = torch.arange(2000) < 1000  # padded steps (zero) do not dilute the load of the valid ones
    mask = half.expand(2, 2000)
    assert choose_method_for(V * 10 * mask.unsqueeze(-1), 1.0, mask) == "pspace"
    assert RankPoolObjective(100.0).choose_method(V) == "pspace" and RankPoolObjective(1.0).choose_method(V) == "cg"


@pytest.mark.parametrize("bad", ["nope", "Tspace", None, 3])
def test_bad_method_is_refused(bad):
    with pytest.raises(ValueError, match=f"method={bad!r} is not known; choose one of"):
        RankPool(method=bad)
    with pytest.raises(ValueError, match="method="):
        RankPoolObjective(method=bad)
    with pytest.raises(ValueError, match="method="):
        rank_pool_solve(_data(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), 1.0, 0.1, method=bad)


# ------------------------------------------------------------------------------- devices
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu_every_method(method):
    V = _data(3, 20, 16, seed=29, scale=0.3)
    lengths = torch.tensor([20, 12, 5])
    G = _data(1, 3, 16, seed=30)[0]
    ref = torch.autograd.grad(RankPool(method="tspace")(V.requires_grad_(True), lengths), V, G)[0]
    X = V.detach().cuda().requires_grad_(True)
    U = RankPool(method=method)(X, lengths.cuda())
    (dV,) = torch.autograd.grad(U, X, G.cuda())
    assert U.device.type == "cuda"
    torch.testing.assert_close(U.cpu(), RankPool(method="tspace")(V.detach(), lengths), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(dV.cpu(), ref, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("n", [5, 64, 300])  # in place on the transposed view; blocked above 2 × 128
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lapack", [True, False], ids=["scipy-lapack", "torch"])
def test_cholesky_in_place_is_lower_factor_and_reports_the_failing_minor(n, dtype, lapack, monkeypatch):
    from poolings.rank import factored
    from poolings.rank.factored import cholesky_

    calls = []
    potrf = factored._potrf_
    monkeypatch.setattr(factored, "_potrf_", lambda A: calls.append(A.shape) or potrf(A))
    if not lapack:  # torch's path (CUDA's on the CPU): LAPACK only from an n never reached
        monkeypatch.setattr(factored, "_LAPACK_MIN_N", 10**9)

    g = torch.Generator().manual_seed(n)
    X = torch.randn(3, n, n + 4, generator=g, dtype=F64)
    A = X @ X.mT / n + torch.eye(n, dtype=F64)
    A[2, 3, 3] = -1.0  # not positive definite: the 4th leading minor fails
    A = A.to(dtype)
    H = A.tril() + 7.0 * A.triu(1)  # the lower triangle alone is read: another upper one changes nothing
    info = cholesky_(H)
    assert info.tolist() == [0, 0, 4]
    L = H[:2]
    assert torch.equal(L, L.tril())
    tol = 1e-12 if dtype == F64 else 1e-5
    assert float((L.double() @ L.double().mT - A[:2].double()).abs().max()) <= tol * float(A[:2].abs().max())
    assert bool(calls) == (lapack and n >= factored._LAPACK_MIN_N)


@pytest.mark.parametrize("lapack", [True, False], ids=["scipy-lapack", "torch"])
def test_cholesky_of_a_non_finite_matrix_fails(lapack, monkeypatch):
    """OpenBLAS's potrf reports success on NaN input; cholesky_ reports the first non-finite
    pivot, as torch's factorisation reports a failure."""
    from poolings.rank import factored

    if not lapack:
        monkeypatch.setattr(factored, "_LAPACK_MIN_N", 10**9)
    A = torch.eye(40, dtype=F64).repeat(2, 1, 1)
    A[1, 5, 5] = float("nan")
    info = factored.cholesky_(A)
    assert info[0] == 0 and info[1] > 0
    if lapack:
        assert info[1] == 6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("outer", [True, False])
def test_gram_by_syrk_equals_the_product_and_is_symmetric(dtype, outer, monkeypatch):
    """Above _SYRK_MIN_FLOPS a CPU Gram product is BLAS syrk's triangle, mirrored: it equals
    torch.bmm to rounding and is exactly symmetric; a non-contiguous V takes torch.bmm, and so
    does a V that autograd records."""
    from poolings.rank import factored
    from poolings.rank.factored import _SYRK_MIN_FLOPS, gram

    used = []
    lapack = factored._lapack
    monkeypatch.setattr(factored, "_lapack", lambda: used.append(1) or lapack())

    g = torch.Generator().manual_seed(3)
    V = torch.randn(3, 1500, 40, generator=g, dtype=F64).to(dtype)
    assert (1500 * 1500 * 40 if outer else 1500 * 40 * 40) >= _SYRK_MIN_FLOPS
    ref = (torch.bmm(V, V.mT) if outer else torch.bmm(V.mT, V)).double()
    tracked = V.clone().requires_grad_(True)
    for X, syrk in ((V, True), (V.transpose(1, 2).contiguous().transpose(1, 2), False), (tracked, False)):
        used.clear()
        G = gram(X, outer)
        assert bool(used) == syrk
        assert G.dtype == dtype and G.shape == ref.shape
        tol = 1e-13 if dtype == F64 else 1e-6
        assert float((G.detach().double() - ref).abs().max()) <= tol * float(ref.abs().max())
        if syrk:
            assert torch.equal(G, G.mT)
    with torch.no_grad():                       # as inside the layer's autograd.Function
        used.clear()
        gram(tracked, outer)
        assert used


@pytest.mark.skipif(not __import__("poolings.rank.small", fromlist=["_kernel"])._kernel(),
                    reason="the kernel is not built")
def test_compiled_long_pass_equals_the_chunked_float64_pass(monkeypatch):
    """combine_long on float32 frames from 512 steps: the compiled pass (float64 accumulation,
    no float64 copy of V, zero columns skipped) equals the chunked torch pass to float64 rounding."""
    from poolings.rank import pspace, small

    g = torch.Generator().manual_seed(5)
    V = torch.randn(2, 1300, 24, generator=g).float()
    cols = torch.randn(2, 3, 1300, generator=g, dtype=F64)
    cols[:, 1:, ::3] = 0.0
    ref = torch.bmm(cols, V.double())
    fast = pspace.combine_long(cols, V)
    monkeypatch.setattr(small, "COMPILED", False)
    slow = pspace.combine_long(cols, V)
    assert pspace._compiled_combine(V) is None
    for out in (fast, slow):
        assert out.dtype == F64
        assert float((out - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
