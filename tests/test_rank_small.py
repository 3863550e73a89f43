"""Small problems on the CPU: the active-set iteration of poolings.rank.small, compiled
(poolings.rank._small_kernel) and on NumPy arrays, against the general iteration, step for step;
their refusal paths; which problems take them; that the kernel is built and current."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from poolings.rank import rank_pool_solve
from poolings.rank.active_set import active_set_solve
from poolings.rank.pspace import PSpace
import poolings.rank.small as small_module
from poolings.rank.small import is_small_numpy, small_solve
from poolings.rank.tspace import TSpace
from test_rank import _data, _liblinear, _mask

SPACES = {"tspace": TSpace, "pspace": PSpace}
BUILT = small_module._kernel() is not None
ITERATIONS = [pytest.param("compiled", marks=pytest.mark.skipif(not BUILT, reason="the kernel is not built")),
              "numpy"]


def _small(space, C, eps, iteration, **opts):
    return small_solve(space, C, eps, compiled=iteration == "compiled", **opts)


def _case(B, T, p, seed, walk):
    V = _data(B, T, p, seed=seed, scale=p**-0.5)
    if walk:
        V = V.cumsum(1) / T**0.5
    lengths = [max(1, T - 3 * b) for b in range(B)]
    mask = _mask(lengths, T)
    return V * mask.unsqueeze(-1), mask


@pytest.mark.parametrize("iteration", ITERATIONS)
@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B,T,p,walk", [(2, 50, 64, True), (4, 25, 8, False), (3, 8, 5, True), (6, 90, 12, True),
                                        (1, 1, 3, False)])
@pytest.mark.parametrize("C,eps", [(1.0, 0.1), (0.1, 0.0), (100.0, 1.0)])
def test_small_iteration_is_the_general_one(method, B, T, p, walk, C, eps, iteration):
    """Same signed sets, iterations and convergence; the same points (1e-12), the same factor
    of the last set and, in p-space, the same M: the backward sees no difference."""
    V, mask = _case(B, T, p, seed=B * T + p, walk=walk)
    general, small = SPACES[method](V, mask, C, eps), SPACES[method](V, mask, C, eps)
    opts = dict(tol=1e-14, check_tol=1.5e-8, max_iter=50)
    a = active_set_solve(general, C, eps, **opts)
    b = _small(small, C, eps, iteration, **opts)
    assert b is not None
    assert bool(b.converged.all())
    assert torch.equal(a.sign, b.sign) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.iterations, b.iterations)
    assert float((a.x - b.x).abs().max()) <= 1e-12 * float(a.x.abs().max().clamp_min(1))
    fa, fb = general.final_factor(a.active), small.final_factor(b.active)
    assert float((fa - fb).abs().max()) < 1e-12
    if method == "pspace":
        assert float((general.M - small.M).abs().max()) <= 1e-12 * float(general.M.abs().max())


@pytest.mark.parametrize("iteration", ITERATIONS)
@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B,T,p,walk", [(2, 50, 64, True), (6, 90, 12, True), (4, 25, 8, False)])
def test_small_iteration_is_the_general_one_in_float32(method, B, T, p, walk, iteration):
    """float32 frames, at the tolerances the layer uses for them: the same signed sets, iterations
    and convergence, and points (and p-space's M) within float32 rounding of each other. The
    NumPy iteration's products run through torch's BLAS and come out equal bitwise here (not by
    contract); the kernel's p-space passes are SciPy's BLAS matrix-vector products, summed in
    another order: their float32 rounding moves ``u`` by up to 2e-6 of its size in these cases
    (float32 p-space is 1e-5–1e-4 from the float64 minimiser either way)."""
    from poolings.rank.common import rounding_floor

    V, mask = _case(B, T, p, seed=B * T + p, walk=walk)
    V = V.float()
    floor_tol, floor_check = rounding_floor(torch.float64 if method == "tspace" else torch.float32)
    opts = dict(tol=max(1e-10, floor_tol), check_tol=max(1e-6, floor_check), max_iter=50)
    general, small = SPACES[method](V, mask, 1.0, 0.1), SPACES[method](V, mask, 1.0, 0.1)
    a = active_set_solve(general, 1.0, 0.1, **opts)
    b = _small(small, 1.0, 0.1, iteration, **opts)
    assert b is not None and bool(b.converged.all())
    assert torch.equal(a.sign, b.sign) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.iterations, b.iterations)
    bound = 5e-6 if iteration == "compiled" and method == "pspace" else 1e-6
    assert float((a.x - b.x).abs().max()) <= bound * float(a.x.abs().max().clamp_min(1))
    if method == "pspace":
        assert float((general.M - small.M).abs().max()) <= 1e-7 * float(general.M.abs().max())


@pytest.mark.parametrize("iteration", ITERATIONS)
@pytest.mark.parametrize("method", list(SPACES))
def test_c_not_representable_in_float32_converges(method, iteration):
    """C = 0.1, ε = 0: every step is active and the first piece is the minimiser. Right-hand
    sides built as ``C * bool_mask`` were float32 (C rounded to 1e-8) and left the general
    iteration line-searching to max_iter; both iterations now converge and match liblinear."""
    V, mask = _case(2, 50, 64, seed=3, walk=True)
    ref = torch.stack([_liblinear(V[b, : int(n)], 0.1, 0.0) for b, n in enumerate(mask.sum(-1))])
    for solve in (active_set_solve, lambda *a, **k: _small(*a, iteration, **k)):
        res = solve(SPACES[method](V, mask, 0.1, 0.0), 0.1, 0.0, tol=1e-14, check_tol=1.5e-8, max_iter=50)
        assert bool(res.converged.all()) and int(res.iterations.max()) <= 2
    sol = rank_pool_solve(V, mask, 0.1, 0.0, method=method)
    assert float(((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-6


def test_failed_factorisation_falls_back_to_the_general_iteration(monkeypatch):
    """A candidate the small iteration cannot factorise: it returns None, and rank_pool_solve
    runs the general iteration instead (which flags such a candidate per sample)."""
    import poolings.rank.small as small

    V, mask = _case(2, 30, 6, seed=5, walk=True)
    calls = []
    monkeypatch.setattr(small, "cholesky_", lambda A: (calls.append(1), torch.ones(A.shape[0], dtype=torch.int32))[1])
    monkeypatch.setattr(small, "COMPILED", False)
    res = small.small_solve(TSpace(V, mask, 1.0, 0.1), 1.0, 0.1, tol=1e-14, check_tol=1.5e-8, max_iter=50)
    assert res is None and calls
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="tspace")
    assert bool(sol.converged.all())
    ref = torch.stack([_liblinear(V[b, : int(n)], 1.0, 0.1) for b, n in enumerate(mask.sum(-1))])
    assert float(((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-6


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["plain", "u_zero", "max_iter", "ill"])
def test_the_direct_path_leaves_the_state_of_the_space_path(method, dtype, case, monkeypatch):
    """rank_pool_solve's small CPU path (compiled_direct: the kernel on NumPy arrays, no
    FactoredSpace) returns what the kernel on a space returns: the same u, convergence,
    iterations and gradient norms, and the same state (active set, excess, the factor of each
    final set, M, wide), also where the kernel's cache holds another set's factor (samples
    with u* = 0, or stopped by max_iter) and where float32 samples are redone in float64."""
    import poolings.rank.objective as objective

    V, mask = _case(3, 30, 6, seed=4, walk=True)  # lengths 30, 27, 24
    C, eps, opts = 1.0, 0.1, {}
    if case == "u_zero":
        eps = 28.0  # |y_t| ≤ 27 < ε: samples 1 and 2 have u* = 0 and no factor of their own
    elif case == "max_iter":
        opts = {"max_iter": 1}
    elif case == "ill":
        V, C = V * 100, 10.0  # ε₃₂ C Σ‖v_t‖² far above ILL_CONDITIONED: float32 redone in float64
    V = V.to(dtype)
    calls = []
    real = objective.compiled_direct
    monkeypatch.setattr(objective, "compiled_direct", lambda *a, **k: calls.append(1) or real(*a, **k))
    direct = rank_pool_solve(V, mask, C, eps, method=method, **opts)
    assert calls
    monkeypatch.setattr(objective, "kernel_runs", lambda *a, **k: False)  # small_solve: the kernel on a space
    kernel_on_space = []
    real_space = small_module.compiled_solve
    monkeypatch.setattr(small_module, "compiled_solve", lambda *a, **k: kernel_on_space.append(1) or real_space(*a, **k))
    space = rank_pool_solve(V, mask, C, eps, method=method, **opts)
    assert kernel_on_space
    if case == "u_zero":
        assert bool((direct.u[1:] == 0).all()) and bool(direct.u[0].abs().sum() > 0)
    if case == "ill" and dtype == torch.float32:
        assert direct.state.wide
    assert direct.state.wide == space.state.wide and direct.state.method == space.state.method == method
    for name in ("converged", "iterations"):
        assert torch.equal(getattr(direct, name), getattr(space, name)), name
    assert torch.equal(direct.state.active, space.state.active)
    pairs = [(direct.u, space.u), (direct.grad_norm, space.grad_norm), (direct.state.e, space.state.e),
             (direct.state.u, space.state.u), (direct.state.factor, space.state.factor)]
    if method == "pspace":
        pairs.append((direct.state.gram, space.state.gram))
    else:
        assert direct.state.gram is None and space.state.gram is None
    for a, b in pairs:  # (p-space's M of a stale sample's set: the update's product in V's dtype, another BLAS)
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 1e-12 if a.dtype == torch.float64 else 1e-6
        assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1)))


@pytest.mark.parametrize("method", list(SPACES))
def test_direct_calls_outside_the_kernel(method):
    """What the compiled path does not take still solves: bfloat16 frames (the general iteration
    on float64 data), an empty batch, ``C`` as a 0-d tensor; a mask that is not bool is refused
    (the kernel would read its bytes as a bool mask)."""
    V, mask = _case(2, 12, 5, seed=3, walk=True)
    ref = rank_pool_solve(V, mask, 1.0, 0.1, method=method)
    if method == "tspace":  # (p-space passes over V in its dtype, which torch's products lack for bfloat16)
        low = rank_pool_solve(V.to(torch.bfloat16), mask, 1.0, 0.1, method=method)
        assert bool(low.converged.all()) and float((low.u.double() - ref.u).abs().max()) < 0.1
    empty = rank_pool_solve(V[:0], mask[:0], 1.0, 0.1, method=method)
    assert empty.u.shape == (0, 5)
    as_tensor = rank_pool_solve(V, mask, torch.tensor(1.0, dtype=torch.float64), 0.1, method=method)
    torch.testing.assert_close(as_tensor.u, ref.u, rtol=0, atol=0)
    for bad in (mask.to(torch.int64), mask.to(torch.float32), mask[:, :5]):
        with pytest.raises(TypeError, match=r"mask must be a bool tensor of shape \(B, T\) = \(2, 12\)"):
            rank_pool_solve(V, bad, 1.0, 0.1, method=method)


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
def test_a_kernel_failure_runs_the_general_iteration_once(monkeypatch):
    """The kernel reports a candidate it could not factorise (``None``): rank_pool_solve runs the
    general iteration, without running the kernel again on a space."""
    kernel = small_module._kernel()
    calls = []
    monkeypatch.setattr(kernel, "solve", lambda *a: calls.append(1))
    V, mask = _case(2, 30, 6, seed=5, walk=True)
    for method in SPACES:
        calls.clear()
        sol = rank_pool_solve(V, mask, 1.0, 0.1, method=method)
        assert calls == [1] and bool(sol.converged.all())


def test_which_problems_are_small():
    assert is_small_numpy(2, 50, "cpu") and is_small_numpy(16, 64, torch.device("cpu"))
    assert not is_small_numpy(4, 512, "cpu")  # B n³ above SMALL_FLOPS
    assert not is_small_numpy(2, 50, "cuda")  # NumPy runs on the CPU only


@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B", [3, 12])  # the general iteration without (B ≤ 8) and with factor bookkeeping
def test_layer_gives_the_same_gradients_by_every_iteration(method, B, monkeypatch):
    """Forward and exact backward of RankPool with the compiled iteration, the NumPy one and the
    general one (the backward reuses whichever factor, and M, the forward left)."""
    import poolings.rank.objective as objective
    from poolings import RankPool

    V, mask = _case(B, 30, 6, seed=B, walk=True)
    lengths = mask.sum(-1)
    G = _data(B, 6, 1, seed=9)[..., 0]
    out = []
    for small, compiled in ((True, True), (True, False), (False, False)):
        if compiled and not BUILT:
            continue
        monkeypatch.setattr(objective, "is_small_numpy", lambda *a, small=small: small)
        monkeypatch.setattr(small_module, "COMPILED", compiled)
        X = V.clone().requires_grad_(True)
        U = RankPool(1.0, 0.1, method=method)(X, lengths)
        (dV,) = torch.autograd.grad(U, X, G)
        out.append((U, dV))
    U1, d1 = out[-1]
    for U2, d2 in out[:-1]:
        assert float((U1 - U2).detach().abs().max()) < 1e-12 and float((d1 - d2).abs().max()) < 1e-10


# ---------------------------------------------------------------------------- the kernel
def test_the_kernel_is_built_where_there_is_a_compiler():
    """``make env`` (pip install -e .) builds poolings.rank._small_kernel; the NumPy iteration is
    only the fallback of an install without a C compiler, so a missing build here is an error."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert BUILT, "poolings.rank._small_kernel is not built: run `make env` (or pip install -e .)"


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("case", ["relu", "walk", "tall"])
def test_kernel_is_the_numpy_iteration_in_hard_regimes(method, case):
    """C = 100: ReLU features (steps must cross the tube), a random walk (the exact line search
    and the step floor run) and T ≫ p: the same iterations and signed sets, points to 1e-10."""
    g = torch.Generator().manual_seed(31)
    if case == "relu":
        V = torch.randn(4, 40, 30, generator=g, dtype=torch.float64).relu()
    elif case == "walk":
        V = torch.randn(4, 40, 30, generator=g, dtype=torch.float64).cumsum(1) / 30**0.5
    else:
        V = 3 * torch.randn(4, 80, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(4, V.shape[1], dtype=torch.bool)
    opts = dict(tol=1e-14, check_tol=1.5e-8, max_iter=50, step_floor=1e-13)
    a = _small(SPACES[method](V, mask, 100.0, 0.1), 100.0, 0.1, "numpy", **opts)
    b = _small(SPACES[method](V, mask, 100.0, 0.1), 100.0, 0.1, "compiled", **opts)
    assert bool(a.converged.all()) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.iterations, b.iterations) and torch.equal(a.sign, b.sign)
    # T ≫ p in T-space: β solves I + C D K D with a condition number ~1e5 here (1e-12 of it apart)
    assert float((a.x - b.x).abs().max()) <= 1e-10 * float(a.x.abs().max().clamp_min(1))


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
def test_kernel_long_float32_videos_accumulate_in_float64():
    """From 512 steps the p-space pass accumulates in float64 (V cast 512 steps at a time), as
    ``combine_long``: float32 frames of 2 × 1300 × 32 (three chunks, the last one short, and
    variable lengths) solve as the NumPy iteration does, 1.3e-5 from the float64 minimiser (a
    float32 pass: 1.4e-4)."""
    from poolings.rank.common import rounding_floor

    V, mask = _case(2, 1300, 32, seed=4, walk=True)
    mask[1, 1100:] = False
    V = V * mask.unsqueeze(-1)
    ref = rank_pool_solve(V, mask, 1.0, 0.1, method="pspace").u
    floor_tol, floor_check = rounding_floor(torch.float32)
    opts = dict(tol=floor_tol, check_tol=max(1e-6, floor_check), max_iter=50, step_floor=floor_tol)
    out = [_small(PSpace(V.float(), mask, 1.0, 0.1), 1.0, 0.1, it, **opts) for it in ("numpy", "compiled")]
    for res in out:
        assert bool(res.converged.all())
        assert float(((res.x - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 4e-5
    assert torch.equal(out[0].sign, out[1].sign)
    assert float(((out[0].x - out[1].x).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-5  # float32 residual passes


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
@pytest.mark.parametrize("method", list(SPACES))
def test_kernel_refuses_a_matrix_that_is_not_positive_definite(method):
    """A candidate matrix LAPACK cannot factorise (made so by corrupting K or M): the kernel
    returns None, which sends rank_pool_solve to the general iteration (that fallback is the
    test above, through the NumPy iteration)."""
    V, mask = _case(2, 30, 6, seed=5, walk=True)
    space = SPACES[method](V, mask, 1.0, 0.1)
    if method == "tspace":
        space.K.diagonal(dim1=-2, dim2=-1).fill_(-10.0)
    else:
        space.M.diagonal(dim1=-2, dim2=-1).fill_(-1e6)
    assert _small(space, 1.0, 0.1, "compiled", tol=1e-14, check_tol=1.5e-8, max_iter=50) is None


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
def test_a_kernel_older_than_its_source_is_not_used(monkeypatch, tmp_path):
    """A checkout that changed _small_kernel.pyx after the build: said once, and the NumPy
    iteration runs (never a stale kernel)."""
    import os

    kernel = small_module._kernel()
    monkeypatch.setattr(small_module, "_KERNEL", False)
    built = os.stat(kernel.__file__).st_mtime
    source = Path(small_module.__file__).with_name("_small_kernel.pyx")
    real_stat = Path.stat

    def stat(self, *a, **k):
        st = real_stat(self, *a, **k)
        if self == source:
            return os.stat_result((*st[:8], built + 10, built + 10))
        return st

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.warns(RuntimeWarning, match="older than its source _small_kernel.pyx: rebuild it with `make env`"):
        assert small_module._kernel() is None
    V, mask = _case(2, 30, 6, seed=5, walk=True)
    assert bool(rank_pool_solve(V, mask, 1.0, 0.1, method="tspace").converged.all())


@pytest.mark.parametrize("method", list(SPACES))
def test_a_mask_that_is_not_contiguous(method, monkeypatch):
    """A cropped padded batch (``V[:, :30]``, ``mask[:, :30]``): the compiled iteration reads the
    mask as a C array, so the solve makes it contiguous; the result is the NumPy iteration's."""
    from poolings import RankPool

    V, mask = _case(3, 40, 6, seed=2, walk=True)
    Vc, mc = V[:, :30], mask[:, :30]
    assert not mc.is_contiguous()
    X = Vc.clone().requires_grad_(True)
    U = RankPool(1.0, 0.1, method=method)(X, mc)
    (dV,) = torch.autograd.grad(U.sum(), X)
    monkeypatch.setattr(small_module, "COMPILED", False)
    Xn = Vc.clone().requires_grad_(True)
    Un = RankPool(1.0, 0.1, method=method)(Xn, mc.contiguous())
    (dVn,) = torch.autograd.grad(Un.sum(), Xn)
    assert float((U - Un).detach().abs().max()) < 1e-12 and float((dV - dVn).abs().max()) < 1e-10


def test_max_iter_is_checked():
    V, mask = _case(2, 10, 4, seed=1, walk=True)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
            rank_pool_solve(V, mask, 1.0, 0.1, max_iter=bad)


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
def test_samples_the_kernel_cannot_index_run_the_numpy_iteration(monkeypatch):
    """The compiled iteration indexes a sample's workspace in C int: a sample beyond that
    (e.g. T = 1.5e8 at p = 8, whose workspace size wrapped around before) goes to NumPy."""
    kernel = small_module._kernel()
    assert kernel.fits(300, 64, False) and kernel.fits(271, 271, True)
    assert not kernel.fits(148_102_167, 8, False) and not kernel.fits(12_000, 12_000, True)
    V, mask = _case(2, 30, 6, seed=5, walk=True)
    monkeypatch.setattr(kernel, "fits", lambda *a: False)
    monkeypatch.setattr(small_module, "compiled_solve", lambda *a, **k: pytest.fail("the kernel ran"))
    for method in SPACES:
        res = small_solve(SPACES[method](V, mask, 1.0, 0.1), 1.0, 0.1, tol=1e-14, check_tol=1.5e-8, max_iter=50)
        assert res is not None and bool(res.converged.all())


@pytest.mark.skipif(not BUILT, reason="the kernel is not built")
def test_the_kernel_refuses_a_negative_max_iter():
    V, mask = _case(2, 30, 6, seed=5, walk=True)
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        small_module.compiled_solve(TSpace(V, mask, 1.0, 0.1), 1.0, 0.1, tol=1e-14, check_tol=1.5e-8, max_iter=-1)
