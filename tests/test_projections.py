"""Euclidean projections: closed forms against the interior-point solver, KKT gradients against closed-form
Jacobians and finite differences."""

from __future__ import annotations

import pytest
import torch

from argminlayers import ArgminLayer
from argminlayers.projections import (
    PROJECTIONS,
    BoxProjection,
    L1BallProjection,
    L2BallProjection,
    L2SphereProjection,
    SimplexProjection,
    simplex_threshold,
)

DT = torch.float64
SPHERES = ("l1_sphere", "l2_sphere", "linf_sphere")


def points(B=4, q=6, seed=0):
    """Points outside every unit ball, and (the last two) inside."""
    g = torch.Generator().manual_seed(seed)
    Y = 1.5 * torch.randn(B, q, generator=g, dtype=DT)
    Y[-2:] *= 0.05
    return Y


def start_on_sphere(name):
    return (lambda V, mask: V / V.norm(dim=-1, keepdim=True)) if name in SPHERES else None


@pytest.mark.parametrize("q", [3, 8])
@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_closed_form_matches_interior_point(name, q):
    obj = PROJECTIONS[name]()
    Y = points(q=q)
    own = ArgminLayer(obj).solve(Y)
    ipm = ArgminLayer(obj, solver="interior_point", init=start_on_sphere(name)).solve(Y)
    assert bool(own.converged.all()) and bool(ipm.converged.all())
    assert float(own.multipliers.kkt_residual.max()) < 1e-12
    torch.testing.assert_close(ipm.u, own.u, atol=1e-8, rtol=0)
    torch.testing.assert_close(ipm.multipliers.stacked(), own.multipliers.stacked(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("backward", ["dense", "woodbury", "diagonal", "projected_cg"])
@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_gradcheck(name, backward):
    layer = ArgminLayer(PROJECTIONS[name](), backward=backward)
    Y = points(q=5).requires_grad_(True)
    assert torch.autograd.gradcheck(layer, (Y,))


def jacobian(layer, y):
    return torch.autograd.functional.jacobian(lambda y: layer(y.unsqueeze(0))[0], y)


def test_simplex_jacobian_closed_form():
    y = points(B=3, q=7)[0]
    u = ArgminLayer(SimplexProjection())(y.unsqueeze(0))[0]
    s = (u > 0).to(DT)
    torch.testing.assert_close(jacobian(ArgminLayer(SimplexProjection()), y), torch.diag(s) - torch.outer(s, s) / s.sum())


def test_l1_ball_jacobian_closed_form():
    y = points(B=3, q=7)[0]
    u = ArgminLayer(L1BallProjection())(y.unsqueeze(0))[0]
    s, sgn = (u != 0).to(DT), torch.sign(y)
    ref = torch.diag(s) - torch.outer(s * sgn, s * sgn) / s.sum()
    torch.testing.assert_close(jacobian(ArgminLayer(L1BallProjection()), y), ref)


@pytest.mark.parametrize("cls", [L2BallProjection, L2SphereProjection])
def test_l2_jacobian_closed_form(cls):
    y = points(B=3, q=5)[0]  # outside the ball: ∂(r y/‖y‖)/∂y = (r/‖y‖)(I − ŷŷᵀ)
    n = y.norm()
    ref = (torch.eye(5, dtype=DT) - torch.outer(y, y) / n**2) / n
    torch.testing.assert_close(jacobian(ArgminLayer(cls()), y), ref)
    inside = 0.3 * y / n
    ball = jacobian(ArgminLayer(L2BallProjection()), inside)
    sphere = jacobian(ArgminLayer(L2SphereProjection()), inside)
    torch.testing.assert_close(ball, torch.eye(5, dtype=DT))
    torch.testing.assert_close(sphere, (torch.eye(5, dtype=DT) - torch.outer(inside, inside) / 0.09) / 0.3)


def test_box_jacobian_and_bounds():
    lower = torch.tensor([-1.0, 0.0, -0.5, -2.0], dtype=DT)
    layer = ArgminLayer(BoxProjection(lower, 1.0))
    y = torch.tensor([-3.0, 0.5, 0.2, 4.0], dtype=DT)
    torch.testing.assert_close(layer(y.unsqueeze(0))[0], torch.tensor([-1.0, 0.5, 0.2, 1.0], dtype=DT))
    torch.testing.assert_close(jacobian(layer, y), torch.diag(torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=DT)))


def test_simplex_threshold_radius_and_ties():
    Y = torch.tensor([[0.2, 0.2, 0.2], [3.0, 1.0, -1.0]], dtype=DT)
    U = (Y - simplex_threshold(Y, 2.0)).clamp_min(0)
    torch.testing.assert_close(U.sum(-1), torch.full((2,), 2.0, dtype=DT))
    torch.testing.assert_close(U[1], torch.tensor([2.0, 0.0, 0.0], dtype=DT))


def test_spheres_put_inner_points_on_the_sphere():
    Y = points()[-2:]
    for name in SPHERES:
        u = ArgminLayer(PROJECTIONS[name](radius=2.0))(Y)
        order = {"l1_sphere": 1, "l2_sphere": 2, "linf_sphere": float("inf")}[name]
        torch.testing.assert_close(u.norm(p=order, dim=-1), torch.full((2,), 2.0, dtype=DT))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), True])
def test_radius_must_be_positive(bad):
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        SimplexProjection(radius=bad)


def test_box_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="lower must be < upper"):
        BoxProjection(1.0, 0.0)


def test_points_must_be_a_batch_of_vectors():
    with pytest.raises(ValueError, match=r"projects points V: \(B, q\)"):
        ArgminLayer(SimplexProjection())(torch.zeros(2, 3, 4, dtype=DT))
