"""Euclidean projections onto convex sets and spheres, as constrained argmin objectives.

    u* = P_C(v) = argmin_u ½‖u − v‖²   subject to   u ∈ C        (v, u: (q,); V: (B, q))

Each set is declared by its constraints (``equality_constraints`` / ``inequality_constraints``,
per sample), and each projection has a closed-form or sort-based batched forward that returns
the exact multipliers as well. The gradient is the generic KKT backward of
:mod:`argminlayers.constraints` (``H = (1 + curvature) I``, declared as a diagonal, so every
strategy is exact here), not a hand-written Jacobian.

=====================  =======================================  ==================================================
objective              set ``C``                                 forward (``θ`` by sorting ``|v|``, ``O(q log q)``)
=====================  =======================================  ==================================================
SimplexProjection      ``u ≥ 0, Σu = z``                         ``u = (v − θ)₊``
L1BallProjection       ``‖u‖₁ ≤ r``                              ``u = sign(v) (|v| − θ)₊`` (``θ = 0`` inside)
L1SphereProjection     ``‖u‖₁ = r``                              as the ball; inside it ``θ = (‖v‖₁ − r)/q < 0``
L2BallProjection       ``‖u‖₂ ≤ r``                              ``u = v min(1, r/‖v‖)``
L2SphereProjection     ``‖u‖₂ = r``                              ``u = r v/‖v‖``
LInfBallProjection     ``‖u‖∞ ≤ r``                              ``u = clamp(v, −r, r)``
LInfSphereProjection   ``‖u‖∞ = r``                              clamp; inside, the largest ``|v_j|`` moves to ``r``
BoxProjection          ``lower ≤ u ≤ upper``                     ``u = clamp(v, lower, upper)``
=====================  =======================================  ==================================================

The L1 and L∞ sets are not smooth; near the solution they are the smooth sets the constraints
describe with the sign pattern ``σ = sign(v)`` (``sign(0) = +1``) and, for the L∞ sphere, the
index ``j`` of the largest ``|v_j|``, both piecewise constant in ``v``. Where ``v`` sits on a
boundary of those pieces (``v_i = 0`` on the L1 sets, a tie for the largest ``|v_j|``) the
projection is not differentiable and the constraints are degenerate (reported, see
docs/constraints.md). Spheres are not convex: ``P_C(v)`` is unique except at ``v = 0`` (for
the L2 sphere, reported as ``NOT_MINIMUM``).

Example::

    >>> import torch
    >>> from argminlayers import ArgminLayer
    >>> from argminlayers.projections import SimplexProjection
    >>> project = ArgminLayer(SimplexProjection())
    >>> v = torch.tensor([[0.9, 0.6, -0.2]], dtype=torch.float64, requires_grad=True)
    >>> u = project(v)
    >>> u.detach()
    tensor([[0.6500, 0.3500, 0.0000]], dtype=torch.float64)
    >>> g = torch.autograd.grad(u[0, 0], v)[0]      # ∂u₁/∂v = e₁ − ½ (e₁ + e₂) on the support
    >>> g.round(decimals=12)                       # (v₃'s entry is 0 up to rounding, ~1e-16 on some CPUs)
    tensor([[ 0.5000, -0.5000,  0.0000]], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .constraints import Multipliers
from .hessian import LowRankHessian
from .objective import CONVERGED, NOT_MINIMUM, Objective, Solution


def _radius(r: float, name: str = "radius") -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
        raise ValueError(f"{name} must be a finite number > 0, got {r!r}")
    return float(r)


def _sign(v: Tensor) -> Tensor:
    """``sign(v)`` with ``sign(0) = +1`` (piecewise constant; zero derivative)."""
    return torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))


def simplex_threshold(Y: Tensor, z: "float | Tensor") -> Tensor:
    """``θ`` with ``Σ_i (y_i − θ)₊ = z`` for every row of ``Y: (B, q)`` (``z > 0``), by sorting:
    ``θ = (Σ_{i ≤ ρ} y_(i) − z)/ρ`` with ``ρ`` the number of sorted ``y_(i) > (Σ_{j ≤ i} y_(j) − z)/i``."""
    s, _ = torch.sort(Y, dim=-1, descending=True)
    cs = s.cumsum(-1) - z
    idx = torch.arange(1, Y.shape[-1] + 1, dtype=Y.dtype, device=Y.device)
    rho = (s - cs / idx > 0).sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    return cs.gather(-1, rho - 1) / rho.to(Y.dtype)  # (B, 1)


class Projection(Objective):
    """Base class: ``f(v, u) = ½‖u − v‖²`` over ``V: (B, q)``, with a batched closed form.

    Subclasses define the per-sample constraints, :meth:`project` (``V → (U, λ, μ)``) and, when
    the constraints are curved, :meth:`curvature` (``Σ_i ν_i ∇²c_i = curvature · I``).
    """

    low_rank_hessian = True  # H = (1 + curvature) I: a diagonal with no low-rank terms
    linear_constraints = False

    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        return 0.5 * ((u - v) ** 2).sum()

    def value(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        return 0.5 * ((U - V) ** 2).sum(-1)

    def grad(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        return U - V

    def hessian(self, V, U, mask, state=None) -> LowRankHessian:
        return LowRankHessian(torch.ones_like(U), U.new_zeros(U.shape[0], 0, U.shape[1]))

    def curvature(self, nu: Tensor) -> Tensor:
        """``(B, 1)``: the constraints' ``Σ_i ν_i ∇²c_i`` as a multiple of the identity (0: linear)."""
        return nu.new_zeros(nu.shape[0], 1)

    def lagrangian_hessian(self, V, U, mask, nu, state=None) -> LowRankHessian:
        """``∇²L = (1 + curvature(ν)) I``."""
        d = (1.0 + self.curvature(nu)).expand_as(U).contiguous()
        return LowRankHessian(d, U.new_zeros(U.shape[0], 0, U.shape[1]))

    def vjp_v(self, V, U, mask, W, state=None) -> Tensor:
        return -W  # ∂/∂v [wᵀ(u − v)]

    def project(self, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, λ, μ)``: the projections ``(B, q)`` and their exact multipliers ``(B, m)``, ``(B, k)``."""
        raise NotImplementedError

    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        if V.dim() != 2:
            raise ValueError(f"{type(self).__name__} projects points V: (B, q), got shape {tuple(V.shape)}")
        U, lam, mu = self.project(V)
        return Solution(U, multipliers=Multipliers(lam, mu))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k):g}" for k in ("radius",) if hasattr(self, k))


class SimplexProjection(Projection):
    """Onto the simplex ``{u ≥ 0, Σ_i u_i = z}``: ``u = (v − θ)₊`` (:func:`simplex_threshold`);
    ``λ = θ``, ``μ_i = (θ − v_i)₊``."""

    linear_constraints = True

    def __init__(self, radius: float = 1.0):
        self.radius = _radius(radius)

    def equality_constraints(self, v, u, mask):
        return (u.sum() - self.radius).reshape(1)

    def inequality_constraints(self, v, u, mask):
        return -u

    def project(self, V):
        theta = simplex_threshold(V, self.radius)
        return (V - theta).clamp_min(0), theta, (theta - V).clamp_min(0)


class L1BallProjection(Projection):
    """Onto ``{‖u‖₁ ≤ r}``, as ``σᵀu ≤ r`` and ``σ_i u_i ≥ 0`` with ``σ = sign(v)``: ``u = σ (|v| − θ)₊``,
    ``θ = 0`` inside the ball; ``μ₀ = θ``, ``μ_i = (θ − |v_i|)₊``."""

    linear_constraints = True

    def __init__(self, radius: float = 1.0):
        self.radius = _radius(radius)

    def inequality_constraints(self, v, u, mask):
        su = _sign(v) * u
        return torch.cat(((su.sum() - self.radius).reshape(1), -su))

    def _theta(self, A: Tensor) -> Tensor:
        return simplex_threshold(A, self.radius)

    def project(self, V):
        A, sgn = V.abs(), _sign(V)
        outside = A.sum(-1, keepdim=True) > self.radius
        theta = torch.where(outside, self._theta(A), torch.zeros_like(A[:, :1]))
        U = sgn * (A - theta).clamp_min(0)
        mu = torch.cat((theta, (theta - A).clamp_min(0)), -1)
        return U, V.new_zeros(V.shape[0], 0), mu


class L1SphereProjection(L1BallProjection):
    """Onto ``{‖u‖₁ = r}``, as ``σᵀu = r`` and ``σ_i u_i ≥ 0``: ``u = σ (|v| − θ)₊`` with ``θ`` as for the
    ball outside it and ``θ = (‖v‖₁ − r)/q < 0`` inside (every coordinate moves out by ``|θ|``);
    ``λ = θ``, ``μ_i = (θ − |v_i|)₊``."""

    def equality_constraints(self, v, u, mask):
        return ((_sign(v) * u).sum() - self.radius).reshape(1)

    def inequality_constraints(self, v, u, mask):
        return -_sign(v) * u

    def project(self, V):
        A, sgn = V.abs(), _sign(V)
        norm1 = A.sum(-1, keepdim=True)
        theta = torch.where(norm1 >= self.radius, self._theta(A), (norm1 - self.radius) / V.shape[-1])
        U = sgn * (A - theta).clamp_min(0)
        return U, theta, (theta - A).clamp_min(0)


class L2BallProjection(Projection):
    """Onto ``{‖u‖₂ ≤ r}``, as ``½(‖u‖² − r²) ≤ 0``: ``u = v min(1, r/‖v‖)``, ``μ = (‖v‖/r − 1)₊``;
    ``∇²L = (1 + μ) I``."""

    def __init__(self, radius: float = 1.0):
        self.radius = _radius(radius)

    def inequality_constraints(self, v, u, mask):
        return (0.5 * ((u * u).sum() - self.radius**2)).reshape(1)

    def curvature(self, nu):
        return nu.sum(-1, keepdim=True)

    def project(self, V):
        n = V.norm(dim=-1, keepdim=True)
        mu = (n / self.radius - 1).clamp_min(0)
        return V / (1 + mu), V.new_zeros(V.shape[0], 0), mu


class L2SphereProjection(L2BallProjection):
    """Onto ``{‖u‖₂ = r}``, as ``½(‖u‖² − r²) = 0``: ``u = r v/‖v‖``, ``λ = ‖v‖/r − 1``;
    ``∇²L = (1 + λ) I = (‖v‖/r) I``. At ``v = 0`` every point of the sphere is a projection:
    reported as ``NOT_MINIMUM`` (no gradient)."""

    def equality_constraints(self, v, u, mask):
        return (0.5 * ((u * u).sum() - self.radius**2)).reshape(1)

    inequality_constraints = None

    def project(self, V):
        n = V.norm(dim=-1, keepdim=True)
        zero = n == 0
        e1 = torch.zeros_like(V)
        e1[:, 0] = self.radius
        U = torch.where(zero, e1, self.radius * V / torch.where(zero, torch.ones_like(n), n))
        return U, n / self.radius - 1, V.new_zeros(V.shape[0], 0)

    def solve(self, V, mask):
        sol = super().solve(V, mask)
        unique = V.norm(dim=-1) > 0
        return Solution(sol.u, converged=unique, status=torch.where(unique, CONVERGED, NOT_MINIMUM),
                        multipliers=sol.multipliers)


class BoxProjection(Projection):
    """Onto the box ``{lower ≤ u ≤ upper}`` (numbers, or tensors broadcasting to ``(q,)``), as
    ``u − upper ≤ 0`` and ``lower − u ≤ 0``: ``u = clamp(v, lower, upper)``,
    ``μ = ((v − upper)₊, (lower − v)₊)``."""

    linear_constraints = True

    def __init__(self, lower: "float | Tensor" = -1.0, upper: "float | Tensor" = 1.0):
        lo, hi = torch.as_tensor(lower, dtype=torch.float64), torch.as_tensor(upper, dtype=torch.float64)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("lower and upper must be finite")
        if not bool((lo < hi).all()):
            raise ValueError(f"lower must be < upper everywhere, got lower={lower!r}, upper={upper!r}")
        self.register_buffer("lower", lo)
        self.register_buffer("upper", hi)

    def inequality_constraints(self, v, u, mask):
        return torch.cat((u - self.upper.to(u.dtype), self.lower.to(u.dtype) - u))

    def project(self, V):
        lo = self.lower.to(V.dtype).expand_as(V)
        hi = self.upper.to(V.dtype).expand_as(V)
        U = torch.minimum(torch.maximum(V, lo), hi)
        return U, V.new_zeros(V.shape[0], 0), torch.cat(((V - hi).clamp_min(0), (lo - V).clamp_min(0)), -1)

    def extra_repr(self) -> str:
        def show(x):
            return f"{x.item():g}" if x.numel() == 1 else f"tensor{tuple(x.shape)}"

        return f"lower={show(self.lower)}, upper={show(self.upper)}"


class LInfBallProjection(BoxProjection):
    """Onto ``{‖u‖∞ ≤ r}``: the box ``[−r, r]^q``."""

    def __init__(self, radius: float = 1.0):
        self.radius = _radius(radius)
        super().__init__(-self.radius, self.radius)

    def extra_repr(self) -> str:
        return f"radius={self.radius:g}"


class LInfSphereProjection(Projection):
    """Onto ``{‖u‖∞ = r}``, as ``σ_j u_j = r`` for ``j = argmax_i |v_i|`` and ``σ_i u_i ≤ r`` for
    ``i ≠ j``: ``u = clamp(v, −r, r)`` with ``u_j = σ_j r``; ``λ = |v_j| − r``, ``μ_i = (|v_i| − r)₊``."""

    linear_constraints = True

    def __init__(self, radius: float = 1.0):
        self.radius = _radius(radius)

    @staticmethod
    def _largest(v: Tensor) -> Tensor:
        return torch.arange(v.shape[-1], device=v.device) == v.abs().argmax(-1, keepdim=True)

    def equality_constraints(self, v, u, mask):
        j = self._largest(v)
        return ((_sign(v) * u * j).sum() - self.radius).reshape(1)

    def inequality_constraints(self, v, u, mask):
        j = self._largest(v)
        return torch.where(j, -self.radius * torch.ones_like(u), _sign(v) * u - self.radius)

    def project(self, V):
        sgn, j = _sign(V), self._largest(V)
        U = torch.where(j, sgn * self.radius, V.clamp(-self.radius, self.radius))
        A = V.abs()
        lam = (A * j).sum(-1, keepdim=True) - self.radius
        mu = torch.where(j, torch.zeros_like(A), (A - self.radius).clamp_min(0))
        return U, lam, mu


PROJECTIONS = {
    "simplex": SimplexProjection,
    "l1_ball": L1BallProjection,
    "l1_sphere": L1SphereProjection,
    "l2_ball": L2BallProjection,
    "l2_sphere": L2SphereProjection,
    "linf_ball": LInfBallProjection,
    "linf_sphere": LInfSphereProjection,
    "box": BoxProjection,
}
