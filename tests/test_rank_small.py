"""Small problems on the CPU: the active-set iteration on NumPy arrays (poolings.rank.small)
against the general iteration, step for step; its refusal path; which problems take it."""

from __future__ import annotations

import pytest
import torch

from poolings.rank import rank_pool_solve
from poolings.rank.active_set import active_set_solve
from poolings.rank.pspace import PSpace
from poolings.rank.small import is_small_numpy, small_solve
from poolings.rank.tspace import TSpace
from test_rank import _data, _liblinear, _mask

SPACES = {"tspace": TSpace, "pspace": PSpace}


def _case(B, T, p, seed, walk):
    V = _data(B, T, p, seed=seed, scale=p**-0.5)
    if walk:
        V = V.cumsum(1) / T**0.5
    lengths = [max(1, T - 3 * b) for b in range(B)]
    mask = _mask(lengths, T)
    return V * mask.unsqueeze(-1), mask


@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B,T,p,walk", [(2, 50, 64, True), (4, 25, 8, False), (3, 8, 5, True), (6, 90, 12, True),
                                        (1, 1, 3, False)])
@pytest.mark.parametrize("C,eps", [(1.0, 0.1), (0.1, 0.0), (100.0, 1.0)])
def test_small_iteration_is_the_general_one(method, B, T, p, walk, C, eps):
    """Same signed sets, iterations and convergence; the same points (1e-12), the same factor
    of the last set and, in p-space, the same M: the backward sees no difference."""
    V, mask = _case(B, T, p, seed=B * T + p, walk=walk)
    general, small = SPACES[method](V, mask, C, eps), SPACES[method](V, mask, C, eps)
    opts = dict(tol=1e-14, check_tol=1.5e-8, max_iter=50)
    a = active_set_solve(general, C, eps, **opts)
    b = small_solve(small, C, eps, **opts)
    assert b is not None
    assert bool(b.converged.all())
    assert torch.equal(a.sign, b.sign) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.iterations, b.iterations)
    assert float((a.x - b.x).abs().max()) <= 1e-12 * float(a.x.abs().max().clamp_min(1))
    fa, fb = general.final_factor(a.active), small.final_factor(b.active)
    assert float((fa - fb).abs().max()) < 1e-12
    if method == "pspace":
        assert float((general.M - small.M).abs().max()) <= 1e-12 * float(general.M.abs().max())


@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B,T,p,walk", [(2, 50, 64, True), (6, 90, 12, True), (4, 25, 8, False)])
def test_small_iteration_is_the_general_one_in_float32(method, B, T, p, walk):
    """float32 frames, at the tolerances the layer uses for them: the same signed sets, iterations
    and convergence, and points (and p-space's M) within float32 rounding of each other (the two
    iterations' products run through NumPy's and torch's BLAS: equal bitwise here, not by contract)."""
    from poolings.rank.common import rounding_floor

    V, mask = _case(B, T, p, seed=B * T + p, walk=walk)
    V = V.float()
    floor_tol, floor_check = rounding_floor(torch.float64 if method == "tspace" else torch.float32)
    opts = dict(tol=max(1e-10, floor_tol), check_tol=max(1e-6, floor_check), max_iter=50)
    general, small = SPACES[method](V, mask, 1.0, 0.1), SPACES[method](V, mask, 1.0, 0.1)
    a = active_set_solve(general, 1.0, 0.1, **opts)
    b = small_solve(small, 1.0, 0.1, **opts)
    assert b is not None and bool(b.converged.all())
    assert torch.equal(a.sign, b.sign) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.iterations, b.iterations)
    assert float((a.x - b.x).abs().max()) <= 1e-6 * float(a.x.abs().max().clamp_min(1))
    if method == "pspace":
        assert float((general.M - small.M).abs().max()) <= 1e-7 * float(general.M.abs().max())


@pytest.mark.parametrize("method", list(SPACES))
def test_c_not_representable_in_float32_converges(method):
    """C = 0.1, ε = 0: every step is active and the first piece is the minimiser. Right-hand
    sides built as ``C * bool_mask`` were float32 (C rounded to 1e-8) and left the general
    iteration line-searching to max_iter; both iterations now converge and match liblinear."""
    V, mask = _case(2, 50, 64, seed=3, walk=True)
    ref = torch.stack([_liblinear(V[b, : int(n)], 0.1, 0.0) for b, n in enumerate(mask.sum(-1))])
    for solve in (active_set_solve, small_solve):
        res = solve(SPACES[method](V, mask, 0.1, 0.0), 0.1, 0.0, tol=1e-14, check_tol=1.5e-8, max_iter=50)
        assert bool(res.converged.all()) and int(res.iterations.max()) <= 2, solve.__name__
    sol = rank_pool_solve(V, mask, 0.1, 0.0, method=method)
    assert float(((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-6


def test_failed_factorisation_falls_back_to_the_general_iteration(monkeypatch):
    """A candidate the small iteration cannot factorise: it returns None, and rank_pool_solve
    runs the general iteration instead (which flags such a candidate per sample)."""
    import poolings.rank.small as small

    V, mask = _case(2, 30, 6, seed=5, walk=True)
    calls = []
    monkeypatch.setattr(small, "cholesky_", lambda A: (calls.append(1), torch.ones(A.shape[0], dtype=torch.int32))[1])
    res = small.small_solve(TSpace(V, mask, 1.0, 0.1), 1.0, 0.1, tol=1e-14, check_tol=1.5e-8, max_iter=50)
    assert res is None and calls
    sol = rank_pool_solve(V, mask, 1.0, 0.1, method="tspace")
    assert bool(sol.converged.all())
    ref = torch.stack([_liblinear(V[b, : int(n)], 1.0, 0.1) for b, n in enumerate(mask.sum(-1))])
    assert float(((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-6


def test_which_problems_are_small():
    assert is_small_numpy(2, 50, "cpu") and is_small_numpy(16, 64, torch.device("cpu"))
    assert not is_small_numpy(4, 512, "cpu")  # B n³ above SMALL_FLOPS
    assert not is_small_numpy(2, 50, "cuda")  # NumPy runs on the CPU only


@pytest.mark.parametrize("method", list(SPACES))
@pytest.mark.parametrize("B", [3, 12])  # the general iteration without (B ≤ 8) and with factor bookkeeping
def test_layer_gives_the_same_gradients_by_either_iteration(method, B, monkeypatch):
    """Forward and exact backward of RankPool with the NumPy iteration and with the general one
    (the backward reuses whichever factor, and M, the forward left)."""
    import poolings.rank.objective as objective
    from poolings import RankPool

    V, mask = _case(B, 30, 6, seed=B, walk=True)
    lengths = mask.sum(-1)
    G = _data(B, 6, 1, seed=9)[..., 0]
    out = []
    for small in (True, False):
        monkeypatch.setattr(objective, "is_small_numpy", lambda *a, small=small: small)
        X = V.clone().requires_grad_(True)
        U = RankPool(1.0, 0.1, method=method)(X, lengths)
        (dV,) = torch.autograd.grad(U, X, G)
        out.append((U, dV))
    (U1, d1), (U2, d2) = out
    assert float((U1 - U2).detach().abs().max()) < 1e-12 and float((d1 - d2).abs().max()) < 1e-10
