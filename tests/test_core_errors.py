"""Every bad input to the core gets a clear error that names the argument."""

from __future__ import annotations

import warnings

import pytest
import torch

from argminlayers import (
    CG,
    ArgminLayer,
    ConvergenceError,
    ConvergenceWarning,
    Objective,
    SingularHessianError,
    Solution,
    StructureError,
)
from argminlayers.objectives import LogCoshRegression, PseudoHuber, SquaredDistance

DT = torch.float64


def quad(v, u, mask):
    return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()


@pytest.fixture
def layer():
    return ArgminLayer(quad)


def V(B=2, T=3, p=2):
    return torch.randn(B, T, p, dtype=DT)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(layer, value):
    X = V()
    X[1, 2, 0] = value
    with pytest.raises(ValueError, match=r"V contains NaN or Inf .* sample 1, step 2"):
        layer(X)


def test_non_finite_at_padded_step_is_ignored(layer):
    X = V()
    X[1, 2] = float("nan")
    u = layer(X, torch.tensor([3, 2]))
    assert torch.isfinite(u).all()


def test_scalar_input(layer):
    with pytest.raises(ValueError, match=r"V must have a batch dimension \(B, ...\)"):
        layer(torch.zeros((), dtype=DT))


@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 2, 1), (5,)])
def test_wrong_ndim_for_a_pooling(shape):
    from poolings import RankPool

    with pytest.raises(ValueError, match=r"V must have 3 dimensions \(B, T, p\)"):
        RankPool()(torch.zeros(shape, dtype=DT))


def test_not_a_tensor(layer):
    with pytest.raises(TypeError, match="V must be a torch.Tensor"):
        layer([[[1.0]]])


def test_integer_input(layer):
    with pytest.raises(TypeError, match="V must be a floating-point tensor"):
        layer(torch.zeros(2, 3, 2, dtype=torch.long))


def test_zero_steps(layer):
    with pytest.raises(ValueError, match="V has T = 0"):
        layer(torch.zeros(2, 0, 3, dtype=DT))


def test_all_false_mask_row(layer):
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"mask has no valid step in rows \[1\]"):
        layer(V(), mask)


def test_mask_shape_mismatch(layer):
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(2, 3\)"):
        layer(V(), torch.ones(2, 4, dtype=torch.bool))


def test_mask_wrong_dtype(layer):
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        layer(V(), torch.ones(2, 3, dtype=DT))


def test_mask_device_mismatch(layer):
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask is on meta but V is on cpu"):
        layer(V(), mask)


def test_lengths_device_mismatch(layer):
    with pytest.raises(ValueError, match="lengths is on meta but V is on cpu"):
        layer(V(), lengths=torch.ones(2, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("lengths", [[0, 3], [4, 1], [-1, 2]])
def test_lengths_out_of_range(layer, lengths):
    with pytest.raises(ValueError, match=r"lengths must lie in 1..T = 1..3"):
        layer(V(), torch.tensor(lengths))


def test_lengths_wrong_shape(layer):
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \(2,\)"):
        layer(V(), lengths=torch.tensor([3, 3, 3]))


def test_mask_and_lengths_together(layer):
    with pytest.raises(ValueError, match="either mask or lengths"):
        layer(V(), torch.ones(2, 3, dtype=torch.bool), lengths=torch.tensor([3, 3]))


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"backward='choleski' is not a known strategy; choose one of \['cg', "):
        ArgminLayer(quad, backward="choleski")


def test_strategy_of_wrong_type():
    with pytest.raises(TypeError, match="backward must be a strategy name"):
        ArgminLayer(quad, backward=42)


def test_unknown_solver():
    with pytest.raises(ValueError, match=r"solver='adam' is not a known solver; choose one of \['interior_point', 'lbfgs', "):
        ArgminLayer(quad, solver="adam")


def test_unknown_option():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tolerance'\]"):
        ArgminLayer(quad, tolerance=1e-3)


@pytest.mark.parametrize("option, value, pattern", [
    ("damping", -1.0, "damping must be finite and ≥ 0"),
    ("damping", float("inf"), "damping must be finite and ≥ 0"),
    ("on_nonconvergence", "ignore", "on_nonconvergence must be 'warn' or 'raise'"),
    ("tol", 0.0, "tol must be > 0"),
    ("max_iter", 0, "max_iter must be an integer ≥ 1"),
])
def test_bad_option_values(option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        ArgminLayer(quad, **{option: value})


@pytest.mark.parametrize("backward", ["sherman_morrison", "woodbury"])
def test_structure_needed(backward):
    with pytest.raises(StructureError, match=rf"backward='{backward}' needs the Hessian declared as diagonal \+ low rank.*it can use \['cg', 'dense', 'diagonal'"):
        ArgminLayer(quad, backward=backward)


def test_objective_wrong_arity():
    with pytest.raises(TypeError, match="must take \\(v, u\\) or \\(v, u, mask\\)"):
        ArgminLayer(lambda v: v.sum())


def test_objective_class_not_instance():
    with pytest.raises(TypeError, match="objective must be an instance, got the class PseudoHuber"):
        ArgminLayer(PseudoHuber)


def test_objective_not_callable():
    with pytest.raises(TypeError, match="objective must be callable"):
        ArgminLayer(3.0)


def test_maskless_function_refuses_padding():
    layer = ArgminLayer(lambda v, u: 0.5 * ((u - v) ** 2).sum())
    assert layer(V()).shape == (2, 2)
    with pytest.raises(ValueError, match="the objective takes no mask"):
        layer(V(), torch.tensor([3, 2]))


@pytest.mark.parametrize("name, value", [("delta", 0.0), ("C", -1.0), ("delta", float("inf")), ("C", float("nan"))])
def test_objective_parameters(name, value):
    cls = PseudoHuber if name == "delta" else LogCoshRegression
    with pytest.raises(ValueError, match=f"{name} must be finite and > 0"):
        cls(**{name: value})


class Saddle(Objective):
    """f = ½(u₀ − m)² − ½ u₁²: its own solve returns the critical point, a saddle."""

    def f(self, v, u, mask):
        m = (v[:, 0] * mask).sum() / mask.sum()
        return 0.5 * (u[0] - m) ** 2 - 0.5 * u[1] ** 2

    def solve(self, V, mask):
        U = V.new_zeros(V.shape[0], 2)
        U[:, 0] = (V[:, :, 0] * mask).sum(1) / mask.sum(1)
        return U


class Flat(Saddle):
    """f = ½(u₀ − m)²: the second coordinate has zero curvature (singular Hessian)."""

    def f(self, v, u, mask):
        m = (v[:, 0] * mask).sum() / mask.sum()
        return 0.5 * (u[0] - m) ** 2


@pytest.mark.parametrize("objective", [Saddle(), Flat()], ids=["indefinite", "singular"])
@pytest.mark.parametrize("backward", ["dense", "cg", "diagonal"])
def test_singular_or_indefinite_hessian(objective, backward):
    X = V().requires_grad_(True)
    u = ArgminLayer(objective, backward=backward)(X)
    with pytest.raises(SingularHessianError, match=r"damping=λ > 0"):
        u.sum().backward()


def test_damping_option_gets_through_a_singular_hessian():
    X = V().requires_grad_(True)
    u = ArgminLayer(Flat(), damping=1e-3)(X)
    u.sum().backward()
    assert torch.isfinite(X.grad).all()
    # the well-posed coordinate: du₀/dv_t0 = 1/T exactly (its curvature is 1, damped to 1.001)
    torch.testing.assert_close(X.grad[:, :, 0], torch.full((2, 3), 1 / 3 / 1.001, dtype=DT))


@pytest.mark.parametrize("backward", ["dense", "cg", "diagonal"])
def test_damping_too_small_for_an_indefinite_hessian_says_so(backward):
    X = V().requires_grad_(True)
    u = ArgminLayer(Saddle(), backward=backward, damping=0.5)(X)  # curvature −1: H + 0.5 I is still indefinite
    with pytest.raises(SingularHessianError, match=r"damping=0.5 is set .* not enough there: raise it") as e:
        u.sum().backward()
    assert "pass damping" not in str(e.value)


def test_nonconvergence_warns_by_default():
    layer = ArgminLayer(PseudoHuber(), max_iter=1)
    with pytest.warns(ConvergenceWarning, match=r"did not converge for samples \[0, 1\]"):
        layer(10 * V())


def test_nonconvergence_raises_on_request():
    layer = ArgminLayer(PseudoHuber(), max_iter=1, on_nonconvergence="raise")
    with pytest.raises(ConvergenceError, match="did not converge"):
        layer(10 * V())


def test_converged_solve_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArgminLayer(PseudoHuber())(V())


def test_objective_solve_reporting_failure_is_not_silent():
    class Failing(SquaredDistance):
        def solve(self, V, mask):
            sol = super().solve(V, mask)
            return Solution(sol.u, converged=torch.tensor([True, False]))

    with pytest.warns(ConvergenceWarning, match=r"samples \[1\]"):
        ArgminLayer(Failing())(V())


def test_the_closed_form_mean_reports_itself_and_overflow_is_not_silent(monkeypatch):
    """SquaredDistance's solve is the exact mean: it reports convergence itself, so the layer
    skips its stationarity check; a mean that overflows (finite frames of float32's largest size)
    is refused as before."""
    monkeypatch.setattr(ArgminLayer, "_check_stationary", lambda *a: pytest.fail("the check ran"))
    X = V().requires_grad_(True)
    u = ArgminLayer(SquaredDistance())(X)
    torch.testing.assert_close(u, X.mean(1))
    (dV,) = torch.autograd.grad(u.sum(), X)
    torch.testing.assert_close(dV, torch.full_like(X, 1 / X.shape[1]))
    big = torch.full((2, 4, 3), 3e38)
    with pytest.raises(ConvergenceError, match=r"NaN or infinite"):
        ArgminLayer(SquaredDistance())(big)


def test_objective_solve_returning_nan_raises():
    class Broken(SquaredDistance):
        def solve(self, V, mask):
            return torch.full((V.shape[0], V.shape[2]), float("nan"), dtype=V.dtype)

    with pytest.raises(ConvergenceError, match=r"samples \[0, 1\]"):
        ArgminLayer(Broken())(V())


def test_cg_nonconvergence_is_reported():
    X = V(B=2, T=10, p=6).requires_grad_(True)
    u = ArgminLayer(LogCoshRegression(C=10.0), backward=CG(tol=1e-14, max_iter=1))(X)
    with pytest.warns(ConvergenceWarning, match=r"backward='cg' did not reach tol"):
        u.sum().backward()
    u = ArgminLayer(LogCoshRegression(C=10.0), backward=CG(tol=1e-14, max_iter=1, on_nonconvergence="raise"))(X)
    with pytest.raises(ConvergenceError, match="raise max_iter"):
        u.sum().backward()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"tol": -1}, "tol must be > 0"),
    ({"max_iter": 0}, "max_iter must be an integer ≥ 1"),
    ({"max_iter": 2.5}, "max_iter must be an integer ≥ 1"),
    ({"preconditioner": "ilu"}, "preconditioner must be None or 'jacobi'"),
    ({"on_nonconvergence": "skip"}, "on_nonconvergence must be 'warn' or 'raise'"),
])
def test_cg_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CG(**kwargs)


def test_solver_options_with_own_solve():
    with pytest.raises(TypeError, match=r"options \['tol'\] configure a generic solver"):
        ArgminLayer(SquaredDistance(), tol=1e-3)


def test_vmap_call_matches_vmap_and_keeps_its_errors():
    from torch.func import vmap

    from argminlayers.objective import vmap_call

    def f(v, u, m, w):
        return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * m).sum()

    V, U, W = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 4)
    M = torch.tensor([[True] * 4, [True, True, False, False], [True] + [False] * 3])
    assert torch.equal(vmap_call(f, V, U, M, W.double()), vmap(f)(V, U, M, W.double()))
    with pytest.raises(ValueError, match="must only return Tensors"):
        vmap_call(lambda v, u: 1.0, V, U)
    with pytest.raises(ValueError, match="vmap"):  # batch sizes that differ: vmap's own message
        vmap_call(lambda v, u: (u - v).sum(), V, U[:2])


@pytest.mark.parametrize("fn, got", [
    (lambda v, u, mask: 1.0, "got float"),
    (lambda v, u, mask: ((u - v) ** 2).sum(-1), r"got a tensor of shape \(4,\)"),
])
def test_objective_must_return_one_value_per_sample(fn, got):
    with pytest.raises(TypeError, match=r"objective <lambda> must return one value per sample.*" + got):
        ArgminLayer(fn)(torch.randn(3, 4, 2))


def test_a_one_element_value_of_any_shape_counts_as_one_value():
    V = torch.randn(4, 6, 3, dtype=torch.float64)
    U = ArgminLayer(lambda v, u, mask: (((u - v) ** 2).sum(-1) * mask).sum().reshape(1, 1))(V)
    torch.testing.assert_close(U, V.mean(1))


def test_scalar_steps_with_lengths_need_an_init():
    V, lengths = torch.randn(4, 5, dtype=torch.float64), torch.tensor([1, 2, 5, 3])

    def f(v, u, mask):
        return (((u - v) ** 2) * mask).sum()

    with pytest.raises(ValueError, match=r"V has shape \(4, 5\) = \(B, T\) with a mask or lengths.*give init="):
        ArgminLayer(f)(V, lengths=lengths)
    U = ArgminLayer(f, init=lambda V, mask: V.new_zeros(V.shape[0]))(V, lengths=lengths)
    mask = torch.arange(5) < lengths.unsqueeze(1)
    torch.testing.assert_close(U, (V * mask).sum(1) / lengths)


def test_an_objective_without_a_gradient_in_u_is_refused():
    def f(v, u, mask):
        return (((u - v) ** 2).sum(-1) * mask).sum().detach()

    with pytest.raises(ValueError, match=r"objective f returns a value with no gradient with respect to u"):
        ArgminLayer(f)(torch.randn(3, 4, 2, dtype=torch.float64))


def test_a_positional_input_after_the_mask_that_was_not_passed_is_named():
    def f(v, u, mask, w):
        return (w * ((u - v) ** 2).sum(-1) * mask).sum()

    with pytest.raises(TypeError, match=r"objective 'f' needs keyword input\(s\) \['w'\]; pass them as layer\(V, w=\.\.\.\)"):
        ArgminLayer(f)(torch.randn(2, 3, 2, dtype=torch.float64))
