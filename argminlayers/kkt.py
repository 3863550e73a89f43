"""The KKT system of a constrained backward pass, and the ways to solve it.

With ``H = ∇²_uu L`` ``(B, q, q)`` (an operator), ``J`` ``(B, r, q)`` the Jacobian of the active
constraints and ``g`` ``(B, q)`` the upstream gradient::

    [H  Jᵀ] [w]   [g]
    [J  0 ] [z] = [0]

Every backward strategy has ``solve_kkt(hessian, jacobian, g) -> (w, z)``:

==================  =========================================================  ==============================
strategy            method                                                     cost (per sample)
==================  =========================================================  ==============================
dense               the full ``(q + r)²`` KKT matrix, LU                        ``O((q + r)³)`` + building ``H``
any other           Schur complement with the strategy's ``H⁻¹``:               ``r + 1`` applications of
(woodbury,          ``w = H⁻¹g − H⁻¹Jᵀ (J H⁻¹ Jᵀ)⁻¹ J H⁻¹ g``,                  ``H⁻¹`` + ``O(r³)``
diagonal, cg, …)    ``z = (J H⁻¹ Jᵀ)⁻¹ J H⁻¹ g``
projected_cg        conjugate gradient on ``P H P`` in ``null(J)``,             ``k`` HVPs + ``O(r³ + k r q)``
                    ``P = I − Jᵀ(JJᵀ)⁻¹J``; ``z = (JJᵀ)⁻¹ J (g − H w)``
==================  =========================================================  ==============================

The Schur complement needs ``H`` itself positive definite; ``dense`` and ``projected_cg`` need
it only on the tangent space ``null(J)`` (the second-order condition of a strict minimum).
Samples have different numbers of active constraints: ``J`` is padded to the largest ``r``
with zero rows marked invalid, whose ``z`` is zero.

Degenerate points raise, naming the samples: dependent rows of ``J``
(:class:`~argminlayers.DegenerateConstraintError`), ``H`` not positive definite on
``null(J)`` (:class:`~argminlayers.SingularHessianError`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DegenerateConstraintError, SingularHessianError
from .hessian import HessianOperator
from .linalg import batched_cg, cholesky_or_raise
from .strategies import CG, Strategy, register_strategy

#: Dependent rows: a pivot² of the (float64) Gram matrix ``J Jᵀ`` below this fraction of the largest
#: (a condition number of ``J`` above about 10⁶).
RANK_TOL = 1e-12


def _samples(bad: Tensor) -> str:
    idx = bad.nonzero().flatten().tolist()
    return f"{idx[:8]}{' ...' if len(idx) > 8 else ''}"


class ConstraintJacobian:
    """The active rows ``J = ∂c_A/∂u``, ``(B, r, q)``, padded with zero rows where ``valid: (B, r)`` is False."""

    def __init__(self, J: Tensor, valid: Tensor):
        if J.dim() != 3 or valid.shape != J.shape[:2]:
            raise ValueError(f"J must be (B, r, q) with valid (B, r), got {tuple(J.shape)} and {tuple(valid.shape)}")
        self.J, self.valid = J, valid
        self._gram_factor: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.J.shape[1]

    def matvec(self, x: Tensor) -> Tensor:
        """``J x``: ``(B, q) → (B, r)``."""
        return torch.bmm(self.J, x.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, y: Tensor) -> Tensor:
        """``Jᵀ y``: ``(B, r) → (B, q)``."""
        return torch.bmm(y.unsqueeze(1), self.J).squeeze(1)

    def pad_identity(self, S: Tensor) -> Tensor:
        """``S: (B, r, r)`` with the rows and columns of padded constraints replaced by the identity."""
        pair = self.valid.unsqueeze(-1) & self.valid.unsqueeze(-2)
        eye = torch.eye(self.rows, dtype=S.dtype, device=S.device)
        return torch.where(pair, S, eye.expand_as(S))

    def dependent(self) -> Tensor:
        """``(B,)`` bool: samples whose active constraint gradients are linearly dependent (a pivot of
        the Cholesky factor of ``J Jᵀ``, taken in float64, below ``RANK_TOL`` relative)."""
        if self.rows == 0:
            return torch.zeros(self.J.shape[0], dtype=torch.bool, device=self.J.device)
        J = self.J.double()
        G = self.pad_identity(torch.bmm(J, J.transpose(1, 2)))
        L, info = torch.linalg.cholesky_ex(G)
        p2 = L.diagonal(dim1=-2, dim2=-1) ** 2
        scale = torch.where(self.valid, p2, torch.zeros_like(p2)).amax(-1, keepdim=True).clamp_min(1e-300)
        small = ((p2 <= RANK_TOL * scale) & self.valid).any(-1)
        return (info > 0) | small | ~torch.isfinite(p2).all(-1)

    def check_independent(self, name: str) -> None:
        bad = self.dependent()
        if bool(bad.any()):
            raise DegenerateConstraintError(
                f"backward={name!r}: the gradients of the active constraints are linearly dependent for samples "
                f"{_samples(bad)}, so the multipliers are not unique and the implicit gradient is not defined there; "
                "remove redundant constraints (e.g. the same constraint twice, or an equality implied by others)"
            )

    def gram_solve(self, y: Tensor) -> Tensor:
        """``(J Jᵀ)⁻¹ y`` for ``y: (B, r)`` (padded rows: identity); the factor is kept."""
        if self._gram_factor is None:
            G = self.pad_identity(torch.bmm(self.J, self.J.transpose(1, 2)))
            self._gram_factor = cholesky_or_raise(G, "Gram matrix J Jᵀ of the active constraints")
        return torch.cholesky_solve(y.unsqueeze(-1), self._gram_factor).squeeze(-1)

    def project(self, x: Tensor) -> Tensor:
        """``P x = x − Jᵀ (J Jᵀ)⁻¹ J x``: onto the tangent space ``null(J)``."""
        if self.rows == 0:
            return x
        return x - self.rmatvec(self.gram_solve(self.matvec(x)))


def tangent_positive_definite(H: Tensor, jac: ConstraintJacobian) -> Tensor:
    """``(B,)`` bool: ``H`` positive definite on ``null(J)``. Cholesky of ``P H P + γ (I − P)``
    (``γ`` the mean of ``|diag H|``), whose eigenvalues are those of the reduced Hessian and ``γ``."""
    B, q, _ = H.shape
    eye = torch.eye(q, dtype=H.dtype, device=H.device)
    if jac.rows:
        P = eye - torch.bmm(torch.linalg.pinv(jac.J), jac.J)  # dependent or padded rows: the pseudo-inverse
    else:
        P = eye.expand(B, q, q)
    gamma = H.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(H.dtype).tiny)
    R = torch.bmm(P, torch.bmm(H, P))
    R = 0.5 * (R + R.transpose(1, 2)) + gamma[:, None, None] * (eye - P)
    L, info = torch.linalg.cholesky_ex(R)
    p2 = L.diagonal(dim1=-2, dim2=-1) ** 2
    tiny = p2.amin(-1) <= 1e3 * torch.finfo(H.dtype).eps * p2.amax(-1)
    return (info == 0) & ~tiny & torch.isfinite(p2).all(-1)


def _not_tangent_pd(name: str, bad: Tensor) -> SingularHessianError:
    return SingularHessianError(
        f"backward={name!r}: the Hessian of the Lagrangian is not positive definite on the tangent space of the "
        f"active constraints for samples {_samples(bad)}, so the solution is not a strict minimum there and the "
        "implicit gradient does not exist; pass damping=λ > 0 to the layer to back-propagate through H + λI instead"
    )


def dense_kkt_solve(hessian: HessianOperator, jac: ConstraintJacobian, g: Tensor, name: str = "dense"):
    """``(w, z)`` by LU of the full KKT matrix ``[[H, Jᵀ], [J, 0]]`` (padded constraints: ``z_i = 0``),
    after checking that ``J`` has independent rows and ``H`` is positive definite on ``null(J)``."""
    jac.check_independent(name)
    H = hessian.dense()
    ok = tangent_positive_definite(H, jac)
    if not bool(ok.all()):
        raise _not_tangent_pd(name, ~ok)
    B, q, _ = H.shape
    r = jac.rows
    pad = torch.diag_embed((~jac.valid).to(H.dtype))  # (B, r, r): z_i = 0 for padded rows
    K = torch.cat((torch.cat((H, jac.J.transpose(1, 2)), 2), torch.cat((jac.J, pad), 2)), 1)
    rhs = torch.cat((g, g.new_zeros(B, r)), -1).unsqueeze(-1)
    sol, info = torch.linalg.solve_ex(K, rhs)
    bad = (info > 0) | ~torch.isfinite(sol).flatten(1).all(-1)
    if bool(bad.any()):
        raise SingularHessianError(f"backward={name!r}: the KKT matrix is singular for samples {_samples(bad)}")
    sol = sol.squeeze(-1)
    return sol[:, :q], sol[:, q:]


def schur_kkt_solve(strategy: Strategy, hessian: HessianOperator, jac: ConstraintJacobian, g: Tensor):
    """``(w, z)`` by the Schur complement ``S = J H⁻¹ Jᵀ`` with the strategy's ``H⁻¹``
    (``strategy.solve_many`` on ``[g, Jᵀ]``, ``r + 1`` right-hand sides)."""
    name = getattr(strategy, "name", type(strategy).__name__)
    jac.check_independent(name)
    X = torch.cat((g.unsqueeze(-1), jac.J.transpose(1, 2)), -1)  # (B, q, 1 + r)
    try:
        Y = strategy.solve_many(hessian, X)
    except SingularHessianError as exc:
        raise SingularHessianError(
            f"backward={name!r} solves the KKT system by the Schur complement, which needs the Hessian of the "
            "Lagrangian itself positive definite, and it is not; use backward='dense' (the full KKT matrix) or "
            f"'projected_cg', which need it positive definite only on the tangent space ({exc})"
        ) from exc
    Hg, HJ = Y[..., 0], Y[..., 1:]  # (B, q), (B, q, r)
    S = torch.bmm(jac.J, HJ)
    S = jac.pad_identity(0.5 * (S + S.transpose(1, 2)))
    rhs = jac.matvec(Hg)
    z = torch.cholesky_solve(rhs.unsqueeze(-1), cholesky_or_raise(S, "Schur complement J H⁻¹ Jᵀ")).squeeze(-1)
    z = torch.where(jac.valid, z, torch.zeros_like(z))
    w = Hg - torch.bmm(HJ, z.unsqueeze(-1)).squeeze(-1)
    return w, z


@register_strategy("projected_cg")
class ProjectedCG(CG):
    """Conjugate gradient in the tangent space of the active constraints; matrix-free.

    ``w`` solves ``P H P w = P g`` with ``P = I − Jᵀ(JJᵀ)⁻¹J`` (``w ∈ null(J)``), and
    ``z = (JJᵀ)⁻¹ J (g − H w)``. Cost: ``k`` Hessian–vector products, one ``r × r``
    factorisation and ``O(r q)`` per projection. Needs ``H`` positive definite only on
    ``null(J)``; a direction of non-positive curvature there raises
    :class:`~argminlayers.SingularHessianError`. Without constraints it is :class:`CG`.
    Exact to ``tol``, no preconditioner.
    """

    def __init__(self, tol: float | None = None, max_iter: int | None = None, on_nonconvergence: str = "warn"):
        super().__init__(tol=tol, max_iter=max_iter, on_nonconvergence=on_nonconvergence)

    def solve_kkt(self, hessian: HessianOperator, jac: ConstraintJacobian, g: Tensor):
        jac.check_independent(self.name)
        tol = self.tol if self.tol is not None else (1e-10 if g.dtype == torch.float64 else 1e-5)
        max_iter = self.max_iter if self.max_iter is not None else max(2 * hessian.q, 50)
        Pg = jac.project(g)
        # g (almost) normal to the tangent space: w = 0 (CG on the rounding left would be noise)
        tiny = Pg.norm(dim=-1) <= tol * g.norm(dim=-1)
        Pg = torch.where(tiny.unsqueeze(-1), torch.zeros_like(Pg), Pg)
        res = batched_cg(lambda x: jac.project(hessian.matvec(jac.project(x))), Pg, tol=tol, max_iter=max_iter)
        if bool(res.negative_curvature.any()):
            raise _not_tangent_pd(self.name, res.negative_curvature)
        self._report(res, tol, max_iter)
        w = jac.project(res.x)
        z = jac.gram_solve(jac.matvec(g - hessian.matvec(w)))
        return w, torch.where(jac.valid, z, torch.zeros_like(z))

    def __repr__(self) -> str:
        return f"ProjectedCG(tol={self.tol}, max_iter={self.max_iter})"
