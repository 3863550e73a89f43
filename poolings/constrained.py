r"""Constrained temporal poolings: the pooled vector is the minimiser of a pooling objective over a set.

**Rank pooling on the sphere** (:class:`SphereRankPool`): scale-free rank-pooling descriptors::

    u* = argmin_u ½‖u‖² + C/2 Σ_t [ |t − uᵀv_t| − ε ]₊²   subject to   ½(‖u‖² − ρ²) = 0

(``½‖u‖²`` is constant on the sphere; it keeps the objective the one of :class:`~poolings.RankPool`).
With the multiplier ``λ``, ``u*`` minimises ``½(1 + λ)‖u‖² + C/2 Σ_t […]₊²``: rank pooling with
the regularisation ``a = 1 + λ``. Substituting ``u = x/√a`` gives rank pooling of the frames
``v_t/√a``, so ``u(a) = RankPoolObjective.solve(V/√a)/√a`` (the exact T-space solve), and ``a`` is
the root of the secular equation ``φ(a) = 1/‖u(a)‖ − 1/ρ = 0``, found by safeguarded Newton steps
with ``φ'(a) = uᵀ H(a)⁻¹ u / ‖u‖³``, ``H(a) = a I + C V_Aᵀ V_A`` (Woodbury, from the solve's factor).
``‖u(a)‖`` falls as ``a`` grows, so the root is unique for ``a > 0``. The Lagrangian Hessian
``H(a)`` is the rank-pool Hessian shifted by ``λ``, declared low rank, so the KKT backward is the
Schur complement on Woodbury (one extra column: ``J = uᵀ``). Where even ``a → 0`` (no
regularisation) leaves ``‖u‖ < ρ``, the ranking can be fitted with a shorter vector and the
minimiser on the sphere is not unique: reported as ``NOT_MINIMUM`` (no gradient).

For ``ρ`` far below the norm of plain rank pooling (``≈ 43`` on unit-norm frames at ``T = 50``),
``a`` is large and ``u*`` tends to the normalised ``Σ_t (t − ε) v_t`` (docs/constraints.md).

**Projected average pooling** (:class:`ProjectedAvgPool`): the average of the valid frames,
projected onto a set of :mod:`argminlayers.projections` (simplex, L1/L2/L∞ balls and spheres,
box)::

    u* = argmin_u ½ Σ_t ‖u − v_t‖²  subject to  u ∈ C   =   P_C(mean_t v_t)

e.g. non-negative descriptors that sum to one (``"simplex"``). The forward is the projection's
closed form, the multipliers are the projection's times the number of valid frames, and the
gradient is the KKT backward (``H = n I``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from argminlayers import ArgminLayer, LowRankHessian, Multipliers, Solution, Woodbury
from argminlayers.constraints import SumHessian
from argminlayers.objective import CONVERGED, MAX_ITER, NOT_MINIMUM
from argminlayers.objectives import SquaredDistance
from argminlayers.projections import PROJECTIONS, Projection

from .base import Pooling
from .rank import RankPoolObjective, check_rank_params

__all__ = ["ProjectedAvgPool", "ProjectedMean", "SphereRankObjective", "SphereRankPool"]


def _check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    return float(radius)


# ------------------------------------------------------------------------ rank pooling on the sphere
class SphereRankObjective(RankPoolObjective):
    """The rank-pool objective on the sphere ``‖u‖ = radius`` (module docstring), with its own solve.

    Args:
        C, eps: of the rank-pool objective.
        radius: ``ρ > 0``.
        tol: relative tolerance on ``|‖u‖ − ρ|`` (default 1e-12 in float64, 1e-6 in float32).
        max_iter: Newton steps on ``a`` (each one rank-pool solve).
    """

    def __init__(self, C: float = 1.0, eps: float = 0.1, radius: float = 1.0, *, tol: float | None = None,
                 max_iter: int = 50):
        super().__init__(*check_rank_params(C, eps))
        self.radius = _check_radius(radius)
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.sphere_tol, self.sphere_max_iter = tol, max_iter

    def __repr__(self) -> str:
        return f"SphereRankObjective(C={self.C:g}, eps={self.eps:g}, radius={self.radius:g})"

    def equality_constraints(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        return (0.5 * ((u * u).sum() - self.radius**2)).reshape(1)

    def batched_equality_constraints(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        return 0.5 * ((U * U).sum(-1, keepdim=True) - self.radius**2)

    def lagrangian_hessian(self, V: Tensor, U: Tensor, mask: Tensor, nu: Tensor, state: Any = None):
        """``H_f + λ I``: the rank-pool Hessian with its diagonal shifted by ``λ`` (low rank kept)."""
        H = self.hessian(V, U, mask)
        lam = nu[:, :1]  # (B, 1)
        lr = H.low_rank()
        if lr is None:
            return SumHessian(H, LowRankHessian(lam.expand_as(U).contiguous(), U.new_zeros(U.shape[0], 0, U.shape[1])))
        return LowRankHessian(lr.d + lam, lr.A, lr.Bm, row_scale=lr.row_scale)

    def _at(self, V: Tensor, mask: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(u(a), H(a)⁻¹ u(a), converged)`` for ``a: (B,)`` (rank pooling of ``V/√a``)."""
        s = a.sqrt().to(V.dtype)  # (B,)
        Vs = V / s[:, None, None]
        sol = super().solve(Vs, mask)
        if not isinstance(sol, Solution):
            sol = Solution(sol)
        U = sol.u / s[:, None]
        Hs = self.hessian(Vs, sol.u, mask, sol.state)  # H(a) = a · H_scaled
        HinvU = Woodbury().solve(Hs, U) / a.unsqueeze(-1).to(V.dtype)
        conv = sol.converged if sol.converged is not None else torch.ones_like(a, dtype=torch.bool)
        return U, HinvU, conv

    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        """Safeguarded Newton on ``φ(a) = 1/‖u(a)‖ − 1/ρ``, bracketed in ``(0, ∞)``; ``λ = a − 1``."""
        B = V.shape[0]
        work = torch.float64
        tol = self.sphere_tol if self.sphere_tol is not None else (1e-12 if V.dtype == torch.float64 else 1e-6)
        r = self.radius
        a = torch.ones(B, dtype=work, device=V.device)
        lo, hi = torch.zeros_like(a), torch.full_like(a, math.inf)
        done = torch.zeros(B, dtype=torch.bool, device=V.device)
        status = torch.full((B,), MAX_ITER, dtype=torch.long, device=V.device)
        iters = torch.zeros(B, dtype=torch.long, device=V.device)
        U = None
        for _ in range(self.sphere_max_iter):
            U_a, HinvU, ok = self._at(V, mask, a)
            U = U_a if U is None else torch.where(done.unsqueeze(-1), U, U_a)
            n = U_a.norm(dim=-1).to(work)
            phi = 1.0 / n - 1.0 / r
            conv = ~done & ok & ((n - r).abs() <= tol * r)
            status = torch.where(conv, CONVERGED, status)
            # a ≈ 0 and still inside the sphere: the ranking fits with a shorter vector (not unique)
            flat = ~done & ~conv & (phi > 0) & (a <= 1e-10)
            status = torch.where(flat, NOT_MINIMUM, status)
            done = done | conv | flat
            if bool(done.all()):
                break
            lo = torch.where(phi < 0, a, lo)  # ‖u‖ > ρ: more regularisation
            hi = torch.where(phi > 0, a, hi)
            dphi = (U_a * HinvU).sum(-1).to(work) / n**3
            step = a - phi / dphi
            inside = torch.isfinite(step) & (step > lo) & (step < hi)
            fallback = torch.where(torch.isfinite(hi), torch.where(lo > 0, (lo * hi).sqrt(), hi / 10), lo * 10)
            a = torch.where(done, a, torch.where(inside, step, fallback))
            iters = iters + (~done).long()
        lam = (a - 1).to(V.dtype).unsqueeze(-1)
        converged = status == CONVERGED
        return Solution(U, converged=converged, iterations=iters, status=status,
                        multipliers=Multipliers(lam, U.new_zeros(B, 0)))


class SphereRankPool(Pooling):
    """Rank pooling constrained to the sphere ``‖u‖ = radius``: ``(B, T, p)`` (+ lengths) → ``(B, p)``
    (module docstring).

    Args:
        C, eps: of the rank-pool objective (as :class:`~poolings.RankPool`).
        radius: of the sphere (default 1: unit-norm descriptors).
        backward: ``"woodbury"`` (default: the Schur complement on the Woodbury identity, exact),
            ``"dense"`` (the ``(p + 1)²`` KKT matrix), ``"cg"`` (Schur on conjugate gradient),
            ``"projected_cg"``, or ``"diagonal"`` (Schur on the paper's diagonal approximation).
        layer_options: ``on_nonconvergence``, ``damping``.

    Example::

        >>> import torch
        >>> from poolings.constrained import SphereRankPool
        >>> pool = SphereRankPool(C=1.0, eps=0.1)
        >>> V = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
        >>> U = pool(V, torch.tensor([8, 5]))
        >>> U.norm(dim=-1)
        tensor([1.0000, 1.0000], dtype=torch.float64, grad_fn=<LinalgVectorNormBackward0>)
        >>> U.sum().backward()
        >>> bool(V.grad[1, 5:].abs().sum() == 0)
        True
    """

    def __init__(self, C: float = 1.0, eps: float = 0.1, radius: float = 1.0, *, backward: Any = "woodbury",
                 **layer_options: Any):
        super().__init__()
        self.objective = SphereRankObjective(C, eps, radius)
        self.layer = ArgminLayer(self.objective, backward=backward, **layer_options)

    def extra_repr(self) -> str:
        o = self.objective
        return f"C={o.C:g}, eps={o.eps:g}, radius={o.radius:g}"

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        return self.layer.forward_masked(V, mask)


# ------------------------------------------------------------------------ projected average pooling
def _mean(v: Tensor, mask: Tensor) -> Tensor:
    """The mean of the valid steps of one sequence ``v: (T, p)``."""
    m = mask.to(v.dtype)
    return (v * m.unsqueeze(-1)).sum(0) / m.sum()


class _AtMean:
    """A projection's constraint function at the mean of the valid frames, ``(v, u, mask) ↦ c``: a
    class, not a lambda, so that a pooling that holds it can be pickled (``torch.save``)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(self).__name__)

    def __call__(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        return self.fn(_mean(v, mask), u, None)


class ProjectedMean(SquaredDistance):
    """``½ Σ_t ‖u − v_t‖²`` subject to the constraints of a :class:`~argminlayers.projections.Projection`
    at the mean of the valid frames: ``u* = P_C(mean)``, multipliers ``n`` times the projection's."""

    def __init__(self, projection: Projection):
        if not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection, got {type(projection).__name__}")
        self.projection = projection
        self.linear_constraints = projection.linear_constraints

    def __repr__(self) -> str:
        return f"ProjectedMean({self.projection!r})"

    def _constraint(self, name: str):
        fn = getattr(self.projection, name, None)
        return None if fn is None else _AtMean(fn)

    @property
    def equality_constraints(self):
        return self._constraint("equality_constraints")

    @property
    def inequality_constraints(self):
        return self._constraint("inequality_constraints")

    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        n = mask.sum(1, keepdim=True).to(V.dtype)  # (B, 1)
        sol = self.projection.solve(super().solve(V, mask).u, None)
        mult = sol.multipliers
        return Solution(sol.u, converged=sol.converged, status=sol.status,
                        multipliers=Multipliers(n * mult.eq, n * mult.ineq))

    def lagrangian_hessian(self, V, U, mask, nu, state=None) -> LowRankHessian:
        """``(n + curvature(ν)) I`` (the projection's curvature is linear in ``ν``)."""
        n = mask.sum(1, keepdim=True).to(U.dtype)
        d = (n + self.projection.curvature(nu)).expand_as(U).contiguous()
        return LowRankHessian(d, U.new_zeros(U.shape[0], 0, U.shape[1]))


class ProjectedAvgPool(Pooling):
    """Average pooling projected onto a set: ``u* = P_C(mean_t v_t)`` (module docstring).

    Args:
        projection: a name of :data:`argminlayers.projections.PROJECTIONS` (``"simplex"``, ``"l1_ball"``,
            ``"l1_sphere"``, ``"l2_ball"``, ``"l2_sphere"``, ``"linf_ball"``, ``"linf_sphere"``, ``"box"``)
            or a :class:`~argminlayers.projections.Projection`.
        backward: any strategy; all are exact here (``H`` is a multiple of the identity).
        projection_options: for a named projection, e.g. ``radius=2.0`` or ``lower=0, upper=1``.

    Example::

        >>> import torch
        >>> from poolings.constrained import ProjectedAvgPool
        >>> U = ProjectedAvgPool("simplex")(torch.randn(2, 6, 4), torch.tensor([6, 3]))
        >>> bool((U >= 0).all()), torch.allclose(U.sum(-1), torch.ones(2))
        (True, True)
    """

    def __init__(self, projection: "str | Projection" = "simplex", *, backward: Any = "woodbury",
                 **projection_options: Any):
        super().__init__()
        layer_options = {k: projection_options.pop(k) for k in ("on_nonconvergence", "damping")
                         if k in projection_options}
        if isinstance(projection, str):
            if projection not in PROJECTIONS:
                raise ValueError(f"projection={projection!r} is not known; choose one of {sorted(PROJECTIONS)}")
            projection = PROJECTIONS[projection](**projection_options)
        elif projection_options:
            raise TypeError(f"options {sorted(projection_options)} configure a named projection; "
                            "a Projection object is configured by its own constructor")
        self.objective = ProjectedMean(projection)
        self.layer = ArgminLayer(self.objective, backward=backward, **layer_options)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        return self.layer.forward_masked(V, mask)
