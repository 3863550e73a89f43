"""Constrained argmin layers: h(v, u) = 0 and g(v, u) ≤ 0, the KKT backward, degenerate points, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from argminlayers import (
    CG,
    ArgminLayer,
    CapturedTensorError,
    ConvergenceError,
    ConvergenceWarning,
    DegeneracyWarning,
    DegenerateConstraintError,
    Multipliers,
    Objective,
    ProjectedCG,
    SingularHessianError,
    Solution,
)
from argminlayers.objective import CONVERGED, INFEASIBLE
from argminlayers.objectives import LogCoshRegression

DT = torch.float64
LENGTHS = torch.tensor([5, 3, 1])


def tight(backward):
    if backward == "cg":
        return CG(tol=1e-13, max_iter=200)
    if backward == "projected_cg":
        return ProjectedCG(tol=1e-13, max_iter=200)
    return backward


def data(B=3, T=5, p=3, seed=0, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(B, T, p, generator=g, dtype=DT) + shift


def weights(B=3, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(B, T, generator=g, dtype=DT)


def huber(v, u, mask, w):  # weighted pseudo-Huber pooling; w: a keyword input
    return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()


def unit_mean(V, mask, **inputs):  # a start on the unit sphere
    m = (V * mask.unsqueeze(-1)).sum(1)
    return m / m.norm(dim=-1, keepdim=True)


PROBLEMS = {
    "sum_to_one": dict(eq=lambda v, u: u.sum() - 1),  # linear equality
    "unit_sphere": dict(eq=lambda v, u: 0.5 * ((u * u).sum() - 1), init=unit_mean),  # nonlinear equality
    "nonnegative": dict(ineq=lambda v, u: -u),  # bounds (shift < 0 below makes some active)
    "ball": dict(ineq=lambda v, u, r: (0.5 * ((u * u).sum() - r**2)).reshape(1)),  # radius: a keyword input
}
STRATEGIES = ["dense", "cg", "projected_cg"]  # dense KKT, Schur + CG, projected CG


def problem_inputs(name, B=3, T=5):
    inputs = {"w": weights(B, T)}
    if name == "ball":
        inputs["r"] = torch.tensor([0.2, 0.25, 0.3], dtype=DT)[:B]
    return inputs


def problem_data(name, B=3, T=5, p=3, seed=0):
    return data(B=B, T=T, p=p, seed=seed, shift=0.2 if name == "nonnegative" else 0.3)


def checked_solve(layer, V, lengths=None, **inputs):
    sol = layer.solve(V, lengths, **inputs)
    assert bool(sol.converged.all()), sol.status
    return sol


# ---------------------------------------------------------------------------------- gradients
def check_problem(name, backward, lengths, fast_mode, B=3, T=5, p=3, seed=0):
    layer = ArgminLayer(huber, backward=tight(backward), **PROBLEMS[name])
    V = problem_data(name, B, T, p, seed).requires_grad_(True)
    inputs = {k: x.requires_grad_(True) for k, x in problem_inputs(name, B, T).items()}
    sol = checked_solve(layer, V.detach(), lengths, **{k: x.detach() for k, x in inputs.items()})
    if name == "nonnegative":
        assert bool(sol.multipliers.active.any()) and not bool(sol.multipliers.active.all())
        assert bool((~sol.multipliers.active).any(-1).all())  # every sample has a free coordinate
    if name == "ball":
        assert bool(sol.multipliers.active.all())  # every sample on the sphere of its radius
    names = list(inputs)

    def fn(V, *xs):
        return layer(V, lengths=lengths, **dict(zip(names, xs)))

    assert torch.autograd.gradcheck(fn, (V, *inputs.values()), fast_mode=fast_mode)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("backward", STRATEGIES)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gradcheck(name, backward, masked):
    """Every problem × strategy, with and without padding (gradcheck's fast mode: a random projection of
    the Jacobian, so that each check takes a few solves)."""
    check_problem(name, backward, LENGTHS if masked else None, fast_mode=True)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gradcheck_every_entry(name):
    """The full Jacobian, entry by entry, at a small size with padding."""
    check_problem(name, "dense", torch.tensor([3, 2]), fast_mode=False, B=2, T=3, p=2, seed=3)


def test_strategies_agree():
    V, inputs = problem_data("nonnegative"), problem_inputs("nonnegative")
    G = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(5))
    grads = {}
    for backward in ["dense", "cg", "projected_cg", "diagonal"]:
        layer = ArgminLayer(huber, backward=tight(backward), ineq=lambda v, u: -u)
        X = V.clone().requires_grad_(True)
        grads[backward] = torch.autograd.grad(layer(X, LENGTHS, **inputs), X, G)[0]
    for backward in ["cg", "projected_cg"]:
        torch.testing.assert_close(grads[backward], grads["dense"], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(grads["diagonal"], grads["dense"], rtol=1e-3)  # an approximation, not exact


class SimplexLogCosh(LogCoshRegression):
    """A smooth rank pooling on the simplex: H = I + C Σ sech²(r_t) v_t v_tᵀ declared low rank, and
    linear constraints, so the Schur complement runs on Woodbury."""

    linear_constraints = True

    def equality_constraints(self, v, u, mask):
        return (u.sum() - 1).reshape(1)

    def inequality_constraints(self, v, u, mask):
        return -u


@pytest.mark.parametrize("backward", ["dense", "woodbury", "sherman_morrison"])
def test_gradcheck_schur_woodbury(backward):
    layer = ArgminLayer(SimplexLogCosh(C=0.5), backward=backward)
    V = data(T=5, p=4, shift=0.0).requires_grad_(True)
    sol = checked_solve(layer, V.detach(), LENGTHS)
    assert bool(sol.multipliers.active.any())
    assert torch.autograd.gradcheck(lambda V: layer(V, LENGTHS), (V,), fast_mode=True)


def test_default_strategy_is_woodbury_for_declared_structure():
    from argminlayers import Problem

    layer = ArgminLayer(SimplexLogCosh(C=0.5))
    V = data(T=5, p=4, shift=0.0)
    mask = torch.ones(3, 5, dtype=torch.bool)
    sol = layer.solve(V)
    problem = Problem(layer.objective, V, mask, {}, (4,), layer.constraints)
    assert layer.pick_strategy(problem, sol).name == "woodbury"
    assert ArgminLayer(huber, eq=lambda v, u: u.sum() - 1).pick_strategy(problem, sol).name == "dense"


def test_default_kkt_strategy_is_projected_cg_above_q_32():
    from argminlayers import Problem

    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1)
    for p, name in ((32, "dense"), (33, "projected_cg")):
        V = torch.zeros(1, 2, p, dtype=torch.float64)
        problem = Problem(layer.objective, V, torch.ones(1, 2, dtype=torch.bool), {}, (p,), layer.constraints)
        assert layer.pick_strategy(problem, None).name == name


class RadiusPool(Objective):
    """Pseudo-Huber pooling (learnable δ) inside a ball of learnable radius: both nn.Parameters."""

    def __init__(self):
        self.delta = nn.Parameter(torch.tensor(0.8, dtype=DT))
        self.log_r = nn.Parameter(torch.tensor(-1.0, dtype=DT))

    def f(self, v, u, mask):
        d = self.delta
        return (d**2 * (torch.sqrt(1 + ((u - v) ** 2).sum(-1) / d**2) - 1) * mask).sum()

    def inequality_constraints(self, v, u, mask):
        return (0.5 * ((u * u).sum() - torch.exp(2 * self.log_r))).reshape(1)


@pytest.mark.parametrize("backward", STRATEGIES)
def test_gradcheck_parameters(backward):
    layer = ArgminLayer(RadiusPool(), backward=tight(backward))
    assert sorted(n for n, _ in layer.named_parameters()) == ["objective.delta", "objective.log_r"]
    V = data(shift=1.0).requires_grad_(True)
    assert bool(checked_solve(layer, V.detach(), LENGTHS).multipliers.active.all())
    delta = torch.tensor(0.8, dtype=DT, requires_grad=True)
    log_r = torch.tensor(-1.0, dtype=DT, requires_grad=True)

    def fn(V, delta, log_r):
        return functional_call(layer, {"objective.delta": delta, "objective.log_r": log_r}, (V,), {"lengths": LENGTHS})

    assert torch.autograd.gradcheck(fn, (V, delta, log_r), fast_mode=True)


def test_parameter_of_the_constraint_trains():
    obj = RadiusPool()
    layer = ArgminLayer(obj)
    opt = torch.optim.SGD([obj.log_r], lr=0.5)
    V = data(shift=1.0)
    for _ in range(10):
        opt.zero_grad()
        loss = (layer(V).norm(dim=-1) - 0.6).pow(2).sum()  # wants a radius of 0.6
        loss.backward()
        opt.step()
    assert abs(torch.exp(obj.log_r).item() - 0.6) < 0.05


def test_keyword_input_only_the_constraint_takes():
    def f(v, u, mask):  # takes no r
        return (torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()

    layer = ArgminLayer(f, ineq=lambda v, u, r: (0.5 * ((u * u).sum() - r**2)).reshape(1))
    V = data().requires_grad_(True)
    r = torch.tensor([0.2, 0.25, 0.3], dtype=DT, requires_grad=True)
    u = layer(V, r=r)
    torch.testing.assert_close(u.norm(dim=-1), r.detach())
    assert torch.autograd.gradcheck(lambda V, r: layer(V, r=r), (V, r), fast_mode=True)


def test_padded_steps_get_zero_gradient():
    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1)
    V = data().requires_grad_(True)
    u = layer(V, LENGTHS, w=weights())
    u.sum().backward()
    assert bool((V.grad[1, 3:] == 0).all()) and bool((V.grad[2, 1:] == 0).all())


def test_float32():
    layer = ArgminLayer(huber, ineq=lambda v, u: -u)
    V, w = problem_data("nonnegative"), weights()
    u64 = layer(V, w=w)
    u32 = layer(V.float(), w=w.float())
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64, rtol=1e-3, atol=1e-4)  # float32 solves to tol 1e-5


def test_double_backward_refuses():
    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1)
    V = data().requires_grad_(True)
    (g,) = torch.autograd.grad(layer(V, w=weights()).square().sum(), V, create_graph=True)
    with pytest.raises(RuntimeError, match="constrained layer .* not differentiable"):
        g.sum().backward()


# ---------------------------------------------------------------------------- forward report
def test_multipliers_and_report():
    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1, ineq=lambda v, u: -u)
    V, w = problem_data("nonnegative"), weights()
    sol = checked_solve(layer, V, LENGTHS, w=w)
    mult = sol.multipliers
    assert isinstance(mult, Multipliers)
    assert mult.eq.shape == (3, 1) and mult.ineq.shape == (3, 3)
    assert bool((mult.ineq >= 0).all()) and bool((mult.ineq[~mult.active] == 0).all())
    assert float(mult.kkt_residual.max()) < 1e-9 and float(mult.violation.max()) < 1e-12
    # stationarity of the Lagrangian at the returned point, recomputed here
    U = sol.u.clone().requires_grad_(True)
    mask = torch.arange(5) < LENGTHS.unsqueeze(1)
    f = sum(huber(V[b], U[b], mask[b], w[b]) for b in range(3))
    (gf,) = torch.autograd.grad(f, U)
    torch.testing.assert_close(gf + mult.eq - mult.ineq, torch.zeros_like(gf), atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.u.sum(-1), torch.ones(3, dtype=DT))


def test_interior_point_matches_closed_form_projection():
    from argminlayers.projections import SimplexProjection

    Y = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    own = ArgminLayer(SimplexProjection()).solve(Y)
    ipm = ArgminLayer(SimplexProjection(), solver="interior_point").solve(Y)
    assert bool(ipm.converged.all())
    torch.testing.assert_close(ipm.u, own.u, atol=1e-9, rtol=0)
    torch.testing.assert_close(ipm.multipliers.stacked(), own.multipliers.stacked(), atol=1e-8, rtol=0)


def test_interior_point_accuracy_does_not_depend_on_the_objective_scale():
    """A small objective (‖∇f(u₀)‖ ≪ 1) is solved as accurately as at scale 1 (the KKT tests are
    relative to ‖∇f(u₀)‖, not to max(1, ‖∇f(u₀)‖): 1.5e-3 off in float32 at scale 1e-5 before)."""
    V = 0.3 * torch.randn(8, 30, 5, dtype=DT, generator=torch.Generator().manual_seed(0))

    def pseudo_huber(s):
        return lambda v, u: s * torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum()

    def simplex(s):
        return ArgminLayer(pseudo_huber(s), eq=lambda v, u: u.sum() - 1, ineq=lambda v, u: -u)

    ref = simplex(1.0)(V)
    for dtype, atol in ((torch.float32, 1e-6), (DT, 1e-12)):
        for s in (1e-3, 1e-5):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                u = simplex(s)(V.to(dtype))
            torch.testing.assert_close(u.to(DT), ref, rtol=0, atol=atol)


def test_infeasible_is_reported_and_gets_zero_gradient():
    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1, ineq=lambda v, u: u + 1)  # Σu = 1 and u ≤ −1
    V = data().requires_grad_(True)
    with pytest.warns(ConvergenceWarning, match="constraint violation .* the constraints could not be met"):
        u = layer(V, w=weights())
    with pytest.warns(ConvergenceWarning):
        assert bool((layer.solve(V.detach(), w=weights()).status == INFEASIBLE).all())
    u.sum().backward()
    assert bool((V.grad == 0).all())
    strict = ArgminLayer(huber, eq=lambda v, u: u.sum() - 1, ineq=lambda v, u: u + 1, on_nonconvergence="raise")
    with pytest.raises(ConvergenceError, match="could not be met"):
        strict(V, w=weights())


def test_own_solve_is_checked():
    class Wrong(Objective):  # claims the mean solves a problem on the unit sphere
        def f(self, v, u, mask):
            return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

        def equality_constraints(self, v, u, mask):
            return (0.5 * ((u * u).sum() - 1)).reshape(1)

        def solve(self, V, mask):
            return (V * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)

    with pytest.warns(ConvergenceWarning, match="own solve returned a point where"):
        ArgminLayer(Wrong())(data())


def test_own_solve_without_multipliers_gets_least_squares_ones():
    class Sphere(Objective):  # u = mean / ‖mean‖, multipliers left to the layer
        def f(self, v, u, mask):
            return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

        def equality_constraints(self, v, u, mask):
            return (0.5 * ((u * u).sum() - 1)).reshape(1)

        def solve(self, V, mask):
            m = (V * mask.unsqueeze(-1)).sum(1)
            return m / m.norm(dim=-1, keepdim=True)

    V = data()
    sol = ArgminLayer(Sphere()).solve(V, LENGTHS)
    assert bool(sol.converged.all())
    m = (V * (torch.arange(5) < LENGTHS.unsqueeze(1)).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(sol.multipliers.eq.squeeze(-1), m.norm(dim=-1) - LENGTHS.to(DT))  # λ = ‖Σv‖ − n
    ref = ArgminLayer(lambda v, u, mask: 0.5 * (((u - v) ** 2).sum(-1) * mask).sum(),
                      eq=lambda v, u: 0.5 * ((u * u).sum() - 1), init=unit_mean)
    Va, Vb = V.clone().requires_grad_(True), V.clone().requires_grad_(True)
    G = torch.randn(3, 3, dtype=DT)
    ga = torch.autograd.grad(ArgminLayer(Sphere())(Va, LENGTHS), Va, G)[0]
    gb = torch.autograd.grad(ref(Vb, LENGTHS), Vb, G)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


# -------------------------------------------------------------------------------- degenerate
def test_weakly_active_inequality_is_reported_and_treated_as_active():
    from argminlayers.projections import SimplexProjection

    layer = ArgminLayer(SimplexProjection())
    y = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.3, -0.5]], dtype=DT, requires_grad=True)
    with pytest.warns(DegeneracyWarning, match=r"samples \[0\]: inequalities \[2\] .* weakly active"):
        u = layer(y)
    torch.testing.assert_close(u[0].detach(), torch.tensor([0.5, 0.5, 0.0], dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegeneracyWarning)
        jac = torch.autograd.functional.jacobian(lambda y: layer(y)[0], y)[:, 0]  # (3, 3): du_0/dy_0
    active = torch.tensor([[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=DT)  # u_3 held at 0
    torch.testing.assert_close(jac, active)


@pytest.mark.parametrize("backward", ["dense", "cg", "projected_cg"])
def test_dependent_constraint_gradients_raise(backward):
    layer = ArgminLayer(huber, backward=backward, eq=lambda v, u: torch.stack((u.sum() - 1, 2 * u.sum() - 2)))
    V = data().requires_grad_(True)
    u = layer(V, w=weights())  # the forward is fine: the point is unique, its multipliers are not
    torch.testing.assert_close(u.detach().sum(-1), torch.ones(3, dtype=DT))
    with pytest.raises(DegenerateConstraintError, match=r"linearly dependent for samples \[0, 1, 2\]"):
        u.sum().backward()


class FarthestPoint(Objective):
    """An own solve that returns the farthest point of the unit sphere from the mean: a KKT point
    (λ = −‖mean‖ − 1) where the Lagrangian Hessian, (1 + λ) I, is negative on the tangent space."""

    def f(self, v, u, mask):
        return 0.5 * ((u - v[0]) ** 2).sum()

    def equality_constraints(self, v, u, mask):
        return (0.5 * ((u * u).sum() - 1)).reshape(1)

    def solve(self, V, mask):
        y = V[:, 0]
        n = y.norm(dim=-1, keepdim=True)
        return Solution(-y / n, multipliers=Multipliers(-n - 1, y.new_zeros(y.shape[0], 0)))


@pytest.mark.parametrize("backward", ["dense", "cg", "projected_cg"])
def test_not_positive_definite_on_the_tangent_space_raises(backward):
    layer = ArgminLayer(FarthestPoint(), backward=backward)
    V = data(T=1).requires_grad_(True)
    u = layer(V)
    match = "tangent space" if backward != "cg" else "Schur complement, which needs the Hessian"
    with pytest.raises(SingularHessianError, match=match):
        u.sum().backward()


def test_interior_point_reports_a_maximum():
    # started at the farthest point of the sphere, a KKT point that is a maximum, Newton stays there
    layer = ArgminLayer(lambda v, u: 0.5 * ((u - v[0]) ** 2).sum(), eq=lambda v, u: 0.5 * ((u * u).sum() - 1),
                        init=lambda V, mask: -V[:, 0] / V[:, 0].norm(dim=-1, keepdim=True))
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        sol = layer.solve(data(T=1))
    assert not bool(sol.converged.any())


def test_schur_needs_a_positive_definite_hessian_where_dense_does_not():
    # min −‖u‖²/2 + 2 u₁² s.t. u₂ = 1 / 2 ... an indefinite H that is positive definite on null(J)
    def f(v, u):
        return -0.5 * (u[1] - v[0, 1]) ** 2 + 2 * (u[0] - v[0, 0]) ** 2 + (v[0] * u).sum()

    layer = dict(eq=lambda v, u: (u[1] - v[0, 1]).reshape(1), init=lambda V, m: V[:, 0].clone())
    V = data(T=1, p=2).requires_grad_(True)
    dense = ArgminLayer(f, backward="dense", **layer)
    assert torch.autograd.gradcheck(lambda V: dense(V), (V,))
    assert torch.autograd.gradcheck(lambda V: ArgminLayer(f, backward=tight("projected_cg"), **layer)(V), (V,))
    with pytest.raises(SingularHessianError, match="backward='dense' .* or 'projected_cg'"):
        ArgminLayer(f, backward="cg", **layer)(V).sum().backward()


# ---------------------------------------------------------------------------------- errors
def test_constraint_of_wrong_shape():
    layer = ArgminLayer(huber, eq=lambda v, u: u.outer(u))
    with pytest.raises(ValueError, match=r"eq=<lambda> must return shape \(n,\) per sample .* got \(3, 3\)"):
        layer(data(), w=weights())


def test_constraint_count_may_follow_the_shape_of_the_call():
    from argminlayers.projections import SimplexProjection

    layer = ArgminLayer(SimplexProjection())
    for q in (3, 5):
        sol = layer.solve(torch.randn(2, q, dtype=DT))
        assert sol.multipliers.ineq.shape == (2, q) and bool(sol.converged.all())


def test_maskless_constraint_must_not_read_padded_steps():
    layer = ArgminLayer(huber, eq=lambda v, u: u.sum() - v.mean(0).sum())  # the mean over padded steps too
    with pytest.raises(ValueError, match=r"eq=<lambda> takes no mask but reads the padded steps"):
        layer(data(), LENGTHS, w=weights())
    masked = ArgminLayer(huber, eq=lambda v, u, mask: u.sum() - (v * mask[:, None]).sum() / mask.sum())
    assert bool(masked.solve(data(), LENGTHS, w=weights()).converged.all())


def test_constraint_not_a_tensor_and_not_callable():
    with pytest.raises(TypeError, match="ineq must be a function"):
        ArgminLayer(huber, ineq=3.0)
    layer = ArgminLayer(huber, ineq=lambda v, u: 1.0)
    with pytest.raises(TypeError, match="must return a tensor"):
        layer(data(), w=weights())


def test_constraint_arity():
    with pytest.raises(TypeError, match=r"constraint function 'eq=<lambda>' must take \(v, u\)"):
        ArgminLayer(huber, eq=lambda u: u.sum())


def test_solver_that_ignores_constraints():
    with pytest.raises(TypeError, match="solver='newton' ignores constraints.* use solver='interior_point'"):
        ArgminLayer(huber, solver="newton", eq=lambda v, u: u.sum() - 1)


def test_constraints_declared_twice():
    with pytest.raises(TypeError, match="defines equality_constraints itself; do not pass eq="):
        ArgminLayer(FarthestPoint(), eq=lambda v, u: u.sum())


def test_module_constraint_with_parameters():
    class Eq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.ones(()))

        def forward(self, v, u):
            return u.sum() - self.c

    with pytest.raises(TypeError, match="module with parameters"):
        ArgminLayer(huber, eq=Eq())


def test_captured_tensor_in_a_constraint():
    radius = torch.tensor(0.5, dtype=DT, requires_grad=True)
    layer = ArgminLayer(huber, ineq=lambda v, u: (0.5 * ((u * u).sum() - radius**2)).reshape(1))
    with pytest.raises(CapturedTensorError, match="captures a tensor that requires grad"):
        layer(data(), w=weights())


def test_missing_keyword_input_of_a_constraint():
    layer = ArgminLayer(huber, ineq=lambda v, u, *, r: (u * u).sum().reshape(1) - r**2)
    with pytest.raises(TypeError, match=r"constraint 'ineq=<lambda>' needs keyword input\(s\) \['r'\]"):
        layer(data(), w=weights())


def test_status_converged_for_projection():
    from argminlayers.projections import L2SphereProjection

    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=DT)
    with pytest.warns(ConvergenceWarning, match=r"samples \[1\]"):
        sol = ArgminLayer(L2SphereProjection()).solve(y)
    assert sol.status.tolist()[0] == CONVERGED and not bool(sol.converged[1])


def test_implicit_vjp_of_a_fresh_layer_equals_autograd():
    """The backward of a stored solution, on a layer that has not solved anything itself."""
    kw = dict(eq=lambda v, u: u.sum() - 1, ineq=lambda v, u: -u)
    V, w = problem_data("nonnegative"), weights()
    mask = torch.ones(3, 5, dtype=torch.bool)
    G = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    sol = ArgminLayer(huber, **kw).solve(V, mask, w=w)
    X = V.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(ArgminLayer(huber, **kw)(X, w=w), X, G)
    torch.testing.assert_close(ArgminLayer(huber, **kw).implicit_vjp(V, mask, sol, G, w=w), auto)


@pytest.mark.parametrize("d", [-1e-3, -1e-6, -1e-7, -1e-9, 1e-7])
def test_an_inequality_near_its_bound_gets_the_right_active_set(d):
    """Projection onto u₀ ≤ 0 of a mean d close to the bound: u₀ = min(d, 0) to rounding, and
    du₀/dV₀₀ = 1/2 (inactive) or 0 (active). Within about the barrier's offset of the bound the
    barrier's active-set guess was wrong: u₀ came out ~4e-6 off with a multiplier on an inactive
    inequality and a zero gradient, reported converged; the polish now corrects the guess."""
    def f(v, u, mask):
        return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

    layer = ArgminLayer(f, ineq=lambda v, u: u)
    V = torch.tensor([[[d, -1.0], [d, -3.0]]], dtype=DT, requires_grad=True)
    sol = layer.solve(V.detach(), torch.tensor([2]))
    assert bool(sol.converged.all())
    assert sol.multipliers.active[0].tolist() == [d > 0, False]
    u = layer(V, torch.tensor([2]))
    assert abs(float(u[0, 0].detach()) - min(d, 0.0)) <= 1e-14
    (g,) = torch.autograd.grad(u[0, 0], V)
    assert float(g[0, 0, 0]) == pytest.approx(0.0 if d > 0 else 0.5, abs=1e-12)


def test_inequalities_that_cannot_be_met_together_are_reported_infeasible():
    """u ≥ 1 and u ≤ 0: the slack multipliers grow without bound, which ended the solve as
    'NaN or infinite objective'; the objective is finite there, so it is reported infeasible."""
    def f(v, u, mask):
        return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

    layer = ArgminLayer(f, ineq=lambda v, u: torch.cat([1 - u, u]))
    V = data().requires_grad_(True)
    with pytest.warns(ConvergenceWarning, match="the constraints could not be met"):
        assert bool((layer.solve(V.detach()).status == INFEASIBLE).all())
    with pytest.warns(ConvergenceWarning, match="the constraints could not be met"):
        u = layer(V)
    u.sum().backward()
    assert bool((V.grad == 0).all())


def test_a_polish_that_is_never_kept_leaves_the_barriers_own_report(monkeypatch):
    """Where no active-set step is kept, the barrier's point keeps the barrier's report: its
    multipliers and its active set together, never a corrected guess of the active set paired
    with the barrier's multipliers."""
    from argminlayers.interior_point import InteriorPoint

    real = InteriorPoint._polish

    def refused(problem, U, mult, conv):
        out = real(problem, U, mult, torch.zeros_like(conv))  # computed, and kept nowhere
        return (*out[:3], torch.zeros_like(conv), *out[4:])

    monkeypatch.setattr(InteriorPoint, "_polish", staticmethod(refused))

    def f(v, u, mask):
        return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

    V = torch.tensor([[[-1e-7, -1.0], [-1e-7, -3.0]]], dtype=DT)
    mult = ArgminLayer(f, ineq=lambda v, u: u).solve(V, torch.tensor([2])).multipliers
    assert bool(mult.active[0, 0])  # the barrier's guess, kept with its multiplier
    assert bool(((mult.ineq != 0) <= mult.active).all()) and float(mult.ineq[0, 0]) > 0


@pytest.mark.parametrize("kind", ["ineq", "eq"])
def test_a_steep_start_is_not_converged_far_from_the_minimiser(kind):
    """The KKT residuals are relative to ‖∇f(u₀)‖, which a start far out on a steep objective
    makes huge (cosh(10(u − v)) from u₀ = 0: 5e13), so ‖∇L‖ ≤ tol · ‖∇f(u₀)‖ held 0.3 from u*
    (u = 2.70 for v = 3, with an inactive inequality; an equality the minimiser meets gave
    [2.72, 2.14, −2.36]), reported converged. A candidate also needs a small Newton step."""
    f = lambda v, u: torch.cosh(10 * (u - v)).sum()  # noqa: E731
    V = torch.tensor([[3.0, 2.0, -2.5]], dtype=torch.float64)
    cons = {"ineq": lambda v, u: u - 100} if kind == "ineq" else {"eq": lambda v, u: (u.sum() - 2.5).reshape(1)}
    sol = ArgminLayer(f, **cons).solve(V)
    assert sol.converged.all()
    torch.testing.assert_close(sol.u, V, rtol=0, atol=1e-8)
