"""The reference layers (cvxpylayers, theseus): accuracy, gradients, padding, error paths.

Everything runs in float64 at small sizes. The exact implicit gradient used here is
the dense closed form of DESIGN.md §2, written out in this file so that the
references are checked against something that shares no code with them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from argminlayers.check import finite_difference
from argminlayers.errors import ConvergenceWarning
from poolings.reference import (
    CvxpyAvgPool,
    CvxpyRankPool,
    TheseusRankPool,
    rank_pool_grad_u,
    relative_kkt_residual,
)

import cvxpylayers  # noqa: E402,F401  (installed by the set-up; never skipped)
import theseus  # noqa: E402,F401

# cvxpylayers 1.2.0's backward converts tensors to numpy with a numpy-1 idiom
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

C, EPS = 1.0, 0.1
DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def data():
    """V (2, 12, 5), lengths [12, 8] (sample 1 padded), upstream gradient G (2, 5)."""
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(2, 12, 5, generator=gen, dtype=DT)
    G = torch.randn(2, 5, generator=gen, dtype=DT)
    return V, torch.tensor([12, 8]), G


@pytest.fixture(scope="module")
def theseus_ref():
    return TheseusRankPool(C=C, eps=EPS)


@pytest.fixture(scope="module")
def scs_ref():
    return CvxpyRankPool(C=C, eps=EPS)


@pytest.fixture(scope="module")
def clarabel_ref():
    return CvxpyRankPool(C=C, eps=EPS, solve_method="Clarabel")


def run(ref, V, lengths, G):
    """``U = ref(V, lengths)`` and ``dL/dV`` for ``L = ⟨G, U⟩``."""
    X = V.detach().clone().requires_grad_(True)
    U = ref(X, lengths)
    (gV,) = torch.autograd.grad(U, X, G)
    return U.detach(), gV


def exact_rank_vjp(V, U, lengths, G, C, eps):
    """Dense closed-form implicit gradient, sample by sample:
    ``w = (I + C V_Aᵀ V_A)⁻¹ g``, ``dL/dv_t = C (e_t w − (wᵀv_t) u)`` on ``A``, 0 elsewhere."""
    out = torch.zeros_like(V)
    for b, n in enumerate(lengths.tolist()):
        v, u = V[b, :n], U[b]
        r = torch.arange(1, n + 1, dtype=DT) - v @ u
        A = r.abs() > eps
        e = r - torch.sign(r) * eps
        H = torch.eye(V.shape[2], dtype=DT) + C * v[A].T @ v[A]
        w = torch.linalg.solve(H, G[b])
        out[b, :n] = C * (e[:, None] * w[None, :] - (v @ w)[:, None] * u[None, :]) * A[:, None]
    return out


def liblinear(V, lengths, C, eps):
    """liblinear's L2-loss SVR without bias (its C is our C/2), per sample."""
    import sklearn.svm as svm
    rows = []
    for b, n in enumerate(lengths.tolist()):
        model = svm.LinearSVR(
            C=C / 2, epsilon=eps, loss="squared_epsilon_insensitive", fit_intercept=False,
            dual=True, tol=1e-10, max_iter=100000,
        )
        model.fit(V[b, :n].numpy(), torch.arange(1, n + 1, dtype=DT).numpy())
        rows.append(torch.from_numpy(model.coef_.copy()))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- forward


def test_theseus_forward_is_tight(data, theseus_ref):
    V, lengths, _ = data
    U = theseus_ref(V, lengths)
    assert U.shape == (2, 5) and U.dtype == DT
    assert theseus_ref.kkt_residual(V, U, lengths).max() < 1e-12
    assert rel(U, liblinear(V, lengths, C, EPS)) < 1e-8


def test_cvxpy_scs_forward(data, scs_ref):
    V, lengths, _ = data
    U = scs_ref(V, lengths)
    assert U.shape == (2, 5) and U.dtype == DT
    # measured about 1e-9 or better at these sizes (docs/crosscheck.md)
    assert scs_ref.kkt_residual(V, U, lengths).max() < 1e-7
    assert rel(U, liblinear(V, lengths, C, EPS)) < 1e-7


def test_cvxpy_clarabel_forward_within_its_accuracy(data, clarabel_ref):
    V, lengths, _ = data
    U = clarabel_ref(V, lengths)
    kkt = clarabel_ref.kkt_residual(V, U, lengths).max()
    assert kkt < 1e-4  # the interior-point solution is accurate to about 1e-6 here
    assert rel(U, liblinear(V, lengths, C, EPS)) < 1e-4


def test_lengths_none_means_full(data, theseus_ref, scs_ref):
    V, _, _ = data
    full = torch.tensor([12, 12])
    for ref in (theseus_ref, scs_ref):
        torch.testing.assert_close(ref(V), ref(V, full), rtol=0, atol=0)


def test_kkt_residual_detects_a_wrong_solution(data, theseus_ref):
    V, lengths, _ = data
    U = theseus_ref(V, lengths)
    assert theseus_ref.kkt_residual(V, U * 1.01, lengths).min() > 1e-3
    with pytest.raises(ValueError, match="U must have shape"):
        theseus_ref.kkt_residual(V, U[:, :3], lengths)


def test_kkt_helper_matches_autograd(data):
    """The closed-form ∇_u f equals autograd's gradient of f."""
    V, lengths, _ = data
    U = torch.randn(2, 5, dtype=DT, generator=torch.Generator().manual_seed(3)) * 0.3
    mask = torch.arange(12)[None, :] < lengths[:, None]
    Ux = U.clone().requires_grad_(True)
    r = torch.arange(1, 13, dtype=DT) - torch.einsum("btp,bp->bt", V, Ux)
    f = 0.5 * (Ux**2).sum() + C / 2 * ((torch.clamp(r.abs() - EPS, min=0) * mask) ** 2).sum()
    (g,) = torch.autograd.grad(f, Ux)
    torch.testing.assert_close(rank_pool_grad_u(V, U, lengths, C, EPS), g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(relative_kkt_residual(g, U), g.norm(dim=1) / U.norm(dim=1))


# ----------------------------------------------------------------------------- gradients


def test_theseus_gradient_is_the_exact_implicit_gradient(data, theseus_ref):
    V, lengths, G = data
    U, gV = run(theseus_ref, V, lengths, G)
    assert rel(gV, exact_rank_vjp(V, U, lengths, G, C, EPS)) < 1e-12
    assert torch.all(gV[1, 8:] == 0)


def test_theseus_gradient_matches_finite_differences(data, theseus_ref):
    V, lengths, _ = data
    assert finite_difference(theseus_ref, V, lengths, eps=1e-6, n_directions=3) < 1e-6


def test_cvxpy_scs_gradient(data, scs_ref, theseus_ref):
    V, lengths, G = data
    U, gV = run(scs_ref, V, lengths, G)
    U_th, g_th = run(theseus_ref, V, lengths, G)
    assert rel(gV, g_th) < 1e-6  # measured about 1e-9 or better
    assert rel(gV, exact_rank_vjp(V, U_th, lengths, G, C, EPS)) < 1e-6
    assert torch.all(gV[1, 8:] == 0)


def test_cvxpy_clarabel_gradient_within_its_accuracy(data, clarabel_ref, theseus_ref):
    V, lengths, G = data
    _, gV = run(clarabel_ref, V, lengths, G)
    _, g_th = run(theseus_ref, V, lengths, G)
    assert rel(gV, g_th) < 1e-3
    assert torch.all(gV[1, 8:] == 0)


@pytest.mark.parametrize("make", [TheseusRankPool, CvxpyRankPool, CvxpyAvgPool], ids=["theseus", "scs", "avg"])
def test_padded_steps_have_no_influence(make, data):
    """Garbage (NaN) in padded steps changes nothing and gets exactly zero gradient."""
    ref = make() if make is CvxpyAvgPool else make(C=C, eps=EPS)
    V, lengths, G = data
    Vg = V.clone()
    Vg[1, 8:] = float("nan")
    U, gV = run(ref, Vg, lengths, G)
    U_trim = ref(V[1:, :8])
    torch.testing.assert_close(U[1:], U_trim, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(gV).all()
    assert torch.all(gV[1, 8:] == 0)


# ----------------------------------------------------------------------------- average pooling


def test_avg_reference_is_the_masked_mean(data):
    V, lengths, G = data
    ref = CvxpyAvgPool()
    U, gV = run(ref, V, lengths, G)
    mean = torch.stack([V[b, :n].mean(0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(U, mean, rtol=1e-9, atol=1e-10)
    assert ref.kkt_residual(V, U, lengths).max() < 1e-8
    # dL/dv_t = G / T_i on valid steps, 0 on padded ones
    expected = torch.zeros_like(V)
    for b, n in enumerate(lengths.tolist()):
        expected[b, :n] = G[b] / n
    torch.testing.assert_close(gV, expected, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- plumbing


def test_dtype_is_preserved_and_layers_are_cached(data):
    V, lengths, _ = data
    ref = CvxpyRankPool(C=C, eps=EPS)
    assert ref.prepare(lengths, 5) > 0
    assert ref.prepare(lengths, 5) == 0  # cached: one layer per (length, p)
    assert sorted(ref._layers) == [(8, 5), (12, 5)]
    for r in (ref, TheseusRankPool(C=C, eps=EPS)):
        U32 = r(V.float(), lengths)
        assert U32.dtype == torch.float32
        torch.testing.assert_close(U32.double(), r(V, lengths), rtol=1e-4, atol=1e-5)


def test_lengths_as_a_list(data, theseus_ref):
    V, lengths, _ = data
    torch.testing.assert_close(theseus_ref(V, [12, 8]), theseus_ref(V, lengths), rtol=0, atol=0)


@pytest.mark.parametrize("module", ["poolings.reference.cvxpy_ref", "poolings.reference.theseus_ref"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_theseus_reports_non_convergence(data):
    V, lengths, _ = data
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        TheseusRankPool(C=C, eps=EPS, max_iterations=2)(3 * V, lengths)


def test_no_warning_when_converged(data, theseus_ref):
    V, lengths, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theseus_ref(V, lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_give_cuda_outputs(data, theseus_ref, scs_ref):
    V, lengths, G = data
    Vc, Lc = V.cuda(), lengths.cuda()
    U_cpu = theseus_ref(V, lengths)
    for ref in (theseus_ref, scs_ref):
        U, gV = run(ref, Vc, Lc, G.cuda())
        assert U.device.type == "cuda" and gV.device.type == "cuda"
        torch.testing.assert_close(U.cpu(), U_cpu, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- error paths

REFS = {
    "theseus": lambda: TheseusRankPool(C=C, eps=EPS),
    "scs": lambda: CvxpyRankPool(C=C, eps=EPS),
    "avg": lambda: CvxpyAvgPool(),
}


@pytest.mark.parametrize("name", sorted(REFS))
@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda V: (V[0], None), ValueError, "V must have 3 dimensions"),
        (lambda V: (V.long(), None), TypeError, "V must be a floating-point"),
        (lambda V: (V.numpy(), None), TypeError, "V must be a torch.Tensor"),
        (lambda V: (V, torch.tensor([12, 0])), ValueError, "lengths must lie in 1..T"),
        (lambda V: (V, torch.tensor([13, 8])), ValueError, "lengths must lie in 1..T"),
        (lambda V: (V, torch.tensor([12, 8, 3])), ValueError, "lengths must have shape"),
        (lambda V: (V, torch.tensor([12.0, 8.0])), TypeError, "lengths must be an integer"),
        (lambda V: (V.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"), dtype=DT)), None),
         ValueError, "V contains NaN"),
    ],
    ids=["ndim", "int-dtype", "numpy", "length-0", "length>T", "lengths-shape", "float-lengths", "nan"],
)
def test_bad_input_names_the_argument(name, make_input, error, match, data):
    V, _, _ = data
    X, lengths = make_input(V)
    with pytest.raises(error, match=match):
        REFS[name]()(X, lengths)


@pytest.mark.parametrize("cls", [TheseusRankPool, CvxpyRankPool])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"C": 0.0}, ValueError, "C must be > 0"),
        ({"C": -1.0}, ValueError, "C must be > 0"),
        ({"C": float("nan")}, ValueError, "C must be finite"),
        ({"C": "1"}, TypeError, "C must be a real number"),
        ({"eps": -0.1}, ValueError, "eps must be >= 0"),
        ({"eps": float("inf")}, ValueError, "eps must be finite"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"solve_method": "ECOS"}, ValueError, "solve_method must be one of"),
        ({"solver_args": {"solver": "SCS"}}, ValueError, "solve_method="),
        ({"solver_args": {"solve_method": "SCS"}}, ValueError, "solve_method="),
        ({"solver_args": [("eps_abs", 1e-9)]}, TypeError, "solver_args must be a dict"),
    ],
)
def test_bad_solver_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        CvxpyRankPool(**kwargs)


def test_bad_theseus_options():
    with pytest.raises(ValueError, match="max_iterations"):
        TheseusRankPool(max_iterations=1)
    with pytest.raises(ValueError, match="rel_err_tolerance"):
        TheseusRankPool(rel_err_tolerance=-1.0)
