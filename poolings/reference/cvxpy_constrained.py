"""cvxpylayers references for constrained layers, and the problems ``argminlayers check`` cross-checks.

Each problem pools one sequence ``V: (T, p)`` of a padded batch (lengths ``T_i``) into ``u: (p,)``:

================  ===========================================================  =========================
problem           ours                                                          cvxpy program (per ``T``)
================  ===========================================================  =========================
simplex           ``ProjectedAvgPool("simplex")``: ``P_Δ(mean_t v_t)``           ``min T/2‖u‖² − (1ᵀV)u``
                                                                                ``s.t. Σu = 1, u ≥ 0``
l1_ball           ``ProjectedAvgPool("l1_ball")``: ``P_{‖·‖₁≤1}(mean_t v_t)``      ``… s.t. ‖u‖₁ ≤ 1``
box_qp            ``½ Σ_t (y_t − uᵀv_t)² + ½‖u‖²``, ``|u_i| ≤ c`` (a QP)         the same, ``y_t = t/T``
eq_lsq            ``½ Σ_t (y_t − uᵀv_t)² + ½‖u‖²``, ``Σ_i u_i = 1``              the same
================  ===========================================================  =========================

The last two run the generic machinery: :class:`RidgeRanking` (``H = I + VᵀV``, declared low
rank, so ``woodbury`` applies) with ``ineq=``/``eq=`` functions, solved by the interior-point
solver. The references run SCS at the tight settings of :mod:`.cvxpy_ref`
(``eps = 1e-9``, dense derivative) and report their **own** accuracy independently of our layer:

- simplex, l1_ball: the distance of ``u_ref`` to the exact projection of the mean (the
  sort-based closed form), relative to its norm;
- box_qp: the natural residual ``‖u − clip(u − ∇f(u), −c, c)‖ / ‖u‖`` (zero exactly at the
  minimiser);
- eq_lsq: ``(‖P ∇f(u)‖ + |Σu − 1|) / ‖u‖`` with ``P`` the projection onto ``{Σx = 0}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from argminlayers import ArgminLayer, LowRankHessian, Objective, step_positions

from . import prepare_sequences
from .cvxpy_ref import CvxpyPooling, _import_cvxpy

BOX = 0.05  # the half-width c of box_qp's box (about half the coordinates of u* hit it on N(0, 1) data)


# ------------------------------------------------------------------------------ our problems
class RidgeRanking(Objective):
    """``f(v, u) = ½ Σ_t (y_t − uᵀv_t)² + ½‖u‖²`` with ``y_t = t/n`` (``n`` valid steps): a ridge
    ranking machine. ``H = I + Σ_t v_t v_tᵀ`` (``LowRankHessian`` with the valid steps as rows);
    its constraints, given to the layer as ``eq=``/``ineq=``, are linear."""

    low_rank_hessian = True
    linear_constraints = True
    sequence = True

    @staticmethod
    def targets(mask: Tensor, dtype: torch.dtype) -> Tensor:
        m = step_positions(mask, dtype)
        return m / mask.sum(-1, keepdim=True).to(dtype)

    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        r = (self.targets(mask, v.dtype) - v @ u) * mask
        return 0.5 * (r * r).sum() + 0.5 * (u * u).sum()

    def hessian(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> LowRankHessian:
        return LowRankHessian(torch.ones_like(U), V, row_scale=mask.to(V.dtype))

    def __repr__(self) -> str:
        return "RidgeRanking()"


def _box(v: Tensor, u: Tensor) -> Tensor:
    return torch.cat((u - BOX, -u - BOX))


def _sum_to_one(v: Tensor, u: Tensor) -> Tensor:
    return (u.sum() - 1).reshape(1)


# ------------------------------------------------------------------------------ the programs
def _simplex_program(T: int, p: int):
    cp, _ = _import_cvxpy()
    V, u = cp.Parameter((T, p)), cp.Variable(p)
    return cp.Problem(cp.Minimize((T / 2) * cp.sum_squares(u) - (np.ones(T) @ V) @ u), [cp.sum(u) == 1, u >= 0]), V, u


def _l1_program(T: int, p: int):
    cp, _ = _import_cvxpy()
    V, u = cp.Parameter((T, p)), cp.Variable(p)
    return cp.Problem(cp.Minimize((T / 2) * cp.sum_squares(u) - (np.ones(T) @ V) @ u), [cp.norm1(u) <= 1]), V, u


def _ridge(T: int, p: int):
    cp, _ = _import_cvxpy()
    V, u = cp.Parameter((T, p)), cp.Variable(p)
    y = np.arange(1, T + 1, dtype=np.float64) / T
    return cp, V, u, 0.5 * cp.sum_squares(V @ u - y) + 0.5 * cp.sum_squares(u)


def _box_program(T: int, p: int):
    cp, V, u, cost = _ridge(T, p)
    return cp.Problem(cp.Minimize(cost), [u <= BOX, u >= -BOX]), V, u


def _eq_program(T: int, p: int):
    cp, V, u, cost = _ridge(T, p)
    return cp.Problem(cp.Minimize(cost), [cp.sum(u) == 1]), V, u


# ------------------------------------------------------------------------- own accuracies
def _relative(x: Tensor, U: Tensor) -> Tensor:
    n = U.double().norm(dim=-1)
    return x / torch.where(n > 0, n, torch.ones_like(n))


def _projection_error(name: str) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    def error(V: Tensor, U: Tensor, lengths: Tensor | None) -> Tensor:
        from argminlayers.projections import PROJECTIONS

        V0, mask, n = prepare_sequences(V, lengths)
        mean = V0.detach().double().sum(1) / n.unsqueeze(-1).double()
        exact = PROJECTIONS[name]().project(mean)[0]
        return _relative((U.detach().double().to(exact.device) - exact).norm(dim=-1), exact)

    return error


def _ridge_grad(V: Tensor, U: Tensor, lengths: Tensor | None) -> Tensor:
    V0, mask, _ = prepare_sequences(V, lengths)
    V0, U = V0.detach().double(), U.detach().double().to(V0.device)
    r = RidgeRanking.targets(mask, torch.float64) - torch.einsum("btp,bp->bt", V0, U)  # zero on padded steps
    return U - torch.einsum("bt,btp->bp", r * mask, V0)


def _box_residual(V: Tensor, U: Tensor, lengths: Tensor | None) -> Tensor:
    U64 = U.detach().double()
    step = (U64 - _ridge_grad(V, U, lengths).to(U64.device)).clamp(-BOX, BOX)
    return _relative((U64 - step).norm(dim=-1), U64)


def _eq_residual(V: Tensor, U: Tensor, lengths: Tensor | None) -> Tensor:
    U64 = U.detach().double()
    g = _ridge_grad(V, U, lengths).to(U64.device)
    tangent = g - g.mean(-1, keepdim=True)
    return _relative(tangent.norm(dim=-1) + (U64.sum(-1) - 1).abs(), U64)


# --------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ConstrainedCheck:
    """A cross-checked problem: our layer, its cvxpy program, the reference's own accuracy."""

    description: str
    program: Callable[[int, int], Any]
    accuracy: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    layer: Callable[[str], nn.Module]

    def reference(self, **options: Any) -> "CvxpyConstrained":
        return CvxpyConstrained(self.program, self.accuracy, **options)


def _projected(name: str) -> Callable[[str], nn.Module]:
    def make(backward: str) -> nn.Module:
        from poolings.constrained import ProjectedAvgPool

        return ProjectedAvgPool(name, backward=backward)

    return make


def _generic(**constraints: Any) -> Callable[[str], nn.Module]:
    def make(backward: str) -> nn.Module:
        return ArgminLayer(RidgeRanking(), backward=backward, **constraints)

    return make


CHECKS: dict[str, ConstrainedCheck] = {
    "simplex": ConstrainedCheck("projection of the mean onto the simplex", _simplex_program,
                                _projection_error("simplex"), _projected("simplex")),
    "l1_ball": ConstrainedCheck("projection of the mean onto the unit L1 ball", _l1_program,
                                _projection_error("l1_ball"), _projected("l1_ball")),
    "box_qp": ConstrainedCheck(f"ridge ranking in the box |u_i| ≤ {BOX:g} (a QP)", _box_program, _box_residual,
                               _generic(ineq=_box)),
    "eq_lsq": ConstrainedCheck("ridge ranking with Σu = 1 (equality-constrained least squares)", _eq_program,
                               _eq_residual, _generic(eq=_sum_to_one)),
}


class CvxpyConstrained(CvxpyPooling):
    """A :class:`~poolings.reference.CvxpyPooling` of a constrained program that reports its own
    accuracy (``kkt_residual``; module docstring)."""

    def __init__(self, program: Callable[[int, int], Any], accuracy: Callable[..., Tensor], **options: Any):
        super().__init__(program, **options)
        self._accuracy = accuracy

    def kkt_residual(self, V: Tensor, U: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B,)`` float64: the reference's own error (module docstring)."""
        return self._accuracy(V, U, lengths)
