"""Backward strategies: how ``w = H⁻¹ g`` is computed.

Every strategy has one required method, ``solve(hessian, g) -> w``, with
``hessian`` a :class:`~argminlayers.hessian.HessianOperator` of shape ``(B, q, q)``
and ``g, w`` of shape ``(B, q)``. The layer then forms the input gradient
``dL/dv = −∂/∂v [wᵀ ∇_u f(v, u)]`` with one reverse-mode pass, whatever the strategy.

=================  ==================================  ===========================  ========
name               formula                              cost (per sample)            exact
=================  ==================================  ===========================  ========
dense              Cholesky of ``H``                    ``O(q³)`` + building ``H``   yes
diagonal           ``w = g / diag(H)``                  ``O(q)`` + ``diag(H)``       no
sherman_morrison   ``H⁻¹`` by ``n`` rank-one updates    ``O(n q²)``                  yes
woodbury           solve in the ``n``-space             ``O(n² q + n³)``             yes
cg                 conjugate gradient on ``H x``        ``k`` Hessian–vector prods   to tol
=================  ==================================  ===========================  ========

A constrained layer calls ``solve_kkt(hessian, jacobian, g)`` instead, for the KKT system
``[H Jᵀ; J 0][w; z] = [g; 0]`` (:mod:`argminlayers.kkt`): ``dense`` factorises the full KKT
matrix, every other strategy by default solves the Schur complement ``J H⁻¹ Jᵀ`` with its own
``H⁻¹`` through ``solve_many`` (``k`` right-hand sides at once; by default ``k`` calls of
``solve``).

A new strategy is a subclass of :class:`Strategy` with a ``solve`` method, made
available by name with :func:`register_strategy`::

    @register_strategy("jacobi_sweeps")
    class JacobiSweeps(Strategy):
        exact = False
        def solve(self, hessian, g):
            d = hessian.diagonal()
            w = g / d
            for _ in range(3):
                w = w + (g - hessian.matvec(w)) / d
            return w
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from .errors import ConvergenceError, ConvergenceWarning, SingularHessianError, StructureError
from .hessian import HessianOperator, LowRankHessian
from .linalg import all_finite, batched_cg, cholesky_or_raise

_STRATEGIES: dict[str, type["Strategy"]] = {}


class Strategy:
    """Computes ``w = H⁻¹ g`` for a batch. Subclasses implement :meth:`solve`.

    ``w`` is computed in the operator's dtype (``hessian.dtype``): an objective may hand over a
    float64 operator for float32 data (rank pooling does, for samples too ill-conditioned for
    float32), and the built-in strategies cast ``g`` to it.

    Attributes:
        exact: whether ``w`` is ``H⁻¹ g`` up to rounding (``cg`` is exact to its tolerance).
        needs_low_rank: whether the Hessian must be declared as ``diag(d) + Σ a_i b_iᵀ``.
    """

    name: str = "strategy"
    exact: bool = True
    needs_low_rank: bool = False

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        raise NotImplementedError

    def solve_many(self, hessian: HessianOperator, G: Tensor) -> Tensor:
        """``H⁻¹ G`` for ``k`` right-hand sides ``G: (B, q, k)``; by default ``k`` calls of :meth:`solve`."""
        return torch.stack([self.solve(hessian, G[..., j]) for j in range(G.shape[-1])], dim=-1)

    def solve_kkt(self, hessian: HessianOperator, jacobian, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, z)`` with ``[H Jᵀ; J 0][w; z] = [g; 0]`` for the active constraints ``J`` of a constrained
        layer (a :class:`~argminlayers.kkt.ConstraintJacobian`): by default the Schur complement with this
        strategy's ``H⁻¹`` (:func:`~argminlayers.kkt.schur_kkt_solve`)."""
        from .kkt import schur_kkt_solve

        return schur_kkt_solve(self, hessian, jacobian, g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a :class:`Strategy` subclass available as ``backward=name``."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return deco


def available_strategies() -> list[str]:
    """Names accepted by ``backward=``."""
    return sorted(_STRATEGIES)


def get_strategy(spec: "str | Strategy") -> Strategy:
    """A strategy from its registered name, or the object itself if it has a ``solve`` method."""
    if isinstance(spec, str):
        try:
            return _STRATEGIES[spec]()
        except KeyError:
            raise ValueError(
                f"backward={spec!r} is not a known strategy; choose one of {available_strategies()} "
                "or pass an object with a solve(hessian, g) method"
            ) from None
    if callable(getattr(spec, "solve", None)):
        return spec
    raise TypeError(
        f"backward must be a strategy name {available_strategies()} or an object with a "
        f"solve(hessian, g) method, got {type(spec).__name__}"
    )


def _require_low_rank(hessian: HessianOperator, name: str) -> LowRankHessian:
    lr = hessian.low_rank()
    if lr is None:
        raise StructureError(
            f"backward={name!r} needs the Hessian declared as diagonal + low rank (H = D + Σ a_i b_iᵀ), "
            "and this objective declares no such structure; use 'dense', 'diagonal' or 'cg', or give "
            "the objective a hessian() returning a LowRankHessian"
        )
    return lr


def _check_finite(w: Tensor, name: str) -> Tensor:
    if not all_finite(w):
        bad = (~torch.isfinite(w).all(-1)).nonzero().flatten().tolist()
        raise SingularHessianError(
            f"backward={name!r} produced non-finite values for samples {bad[:8]}: the Hessian is singular "
            "or badly conditioned there; pass damping=λ > 0 to the layer"
        )
    return w


@register_strategy("dense")
class Dense(Strategy):
    """``w = H⁻¹ g`` by batched Cholesky of the materialised Hessian.

    Cost ``O(q³)`` per sample plus building ``H`` (``q`` Hessian–vector products for a
    matrix-free objective), or ``O(q²)`` when the operator carries its factor already
    (dense Newton's last step). Exact. Raises :class:`SingularHessianError` when ``H`` is
    not positive definite: at a strict local minimum it always is.
    """

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        return self.solve_many(hessian, g.unsqueeze(-1)).squeeze(-1)

    def solve_many(self, hessian: HessianOperator, G: Tensor) -> Tensor:
        L = getattr(hessian, "factor", None)
        if L is None:
            L = cholesky_or_raise(hessian.dense())
        return _check_finite(torch.cholesky_solve(G.to(L.dtype), L), self.name)

    def solve_kkt(self, hessian: HessianOperator, jacobian, g: Tensor) -> tuple[Tensor, Tensor]:
        """The full KKT matrix, by LU (:func:`~argminlayers.kkt.dense_kkt_solve`)."""
        from .kkt import dense_kkt_solve

        return dense_kkt_solve(hessian, jacobian, g, self.name)


@register_strategy("diagonal")
class Diagonal(Strategy):
    """``w = g / diag(H)``: the paper's diagonal approximation.

    Cost ``O(q)`` given ``diag(H)``. Exact only when ``H`` is diagonal; otherwise an
    approximation whose error the benchmarks report.
    """

    exact = False

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        return self.solve_many(hessian, g.unsqueeze(-1)).squeeze(-1)

    def solve_many(self, hessian: HessianOperator, G: Tensor) -> Tensor:
        d = hessian.diagonal()
        G = G.to(d.dtype)
        bad = ~(d > 0).all(-1)
        if bool(bad.any()):
            raise SingularHessianError(
                f"backward='diagonal' met a non-positive Hessian diagonal for samples "
                f"{bad.nonzero().flatten().tolist()[:8]}; pass damping=λ > 0 to the layer"
            )
        return G / d.unsqueeze(-1)


@register_strategy("sherman_morrison")
class ShermanMorrison(Strategy):
    """The paper's Lemma 3: ``H⁻¹`` built from ``D⁻¹`` by ``n`` Sherman–Morrison updates

    ``(M + a bᵀ)⁻¹ = M⁻¹ − M⁻¹ a bᵀ M⁻¹ / (1 + bᵀ M⁻¹ a)``

    for ``H = D + Σ_i a_i b_iᵀ``. Cost ``O(n q²)`` time and ``O(q²)`` memory per sample:
    exact, but it materialises a ``q × q`` inverse. Needs the low-rank structure.
    """

    needs_low_rank = True

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        lr = _require_low_rank(hessian, self.name)
        if not lr.diagonal_nonzero():
            raise SingularHessianError("backward='sherman_morrison' needs a non-zero diagonal D")
        Minv = torch.diag_embed(1.0 / lr.d)  # (B, q, q)
        A, Bm = lr.rows()
        for i in range(lr.rank):
            a, b = A[:, i], Bm[:, i]  # (B, q)
            Ma = torch.bmm(Minv, a.unsqueeze(-1)).squeeze(-1)  # (B, q)
            bM = torch.bmm(b.unsqueeze(1), Minv).squeeze(1)  # (B, q)
            denom = 1.0 + (b * Ma).sum(-1, keepdim=True)  # (B, 1)
            Minv = Minv - torch.bmm(Ma.unsqueeze(-1), (bM / denom).unsqueeze(1))
        w = torch.bmm(Minv, g.to(Minv.dtype).unsqueeze(-1)).squeeze(-1)
        return _check_finite(w, self.name)


WOODBURY_PRECISION = 1e-3
"""Bound on ``ε (1 + tr(A D⁻¹ Aᵀ))`` above which :class:`Woodbury` solves a float32 (or lower)
``H = D + AᵀA`` with more rows than dimensions in float64 (see ``Woodbury._needs_float64``)."""


def _in_float64(lr: LowRankHessian) -> LowRankHessian:
    """``lr`` cast to float64 (for :class:`Woodbury` to form and solve its capacitance matrix in)."""
    wide = torch.float64
    cast = lambda x: None if x is None else x.to(wide)  # noqa: E731
    return LowRankHessian(cast(lr.d), cast(lr.A), cast(lr.Bm), row_scale=cast(lr.row_scale),
                          positive_diagonal=lr.positive_diagonal)


@register_strategy("woodbury")
class Woodbury(Strategy):
    """Woodbury identity, solved in the ``n``-space of the low-rank terms:

    ``(D + AᵀB)⁻¹ g = D⁻¹g − D⁻¹Aᵀ (I + B D⁻¹ Aᵀ)⁻¹ B D⁻¹ g``.

    Cost ``O(n² q + n³)`` per sample, or ``O(n q + n²)`` when the objective hands over
    the capacitance matrix already factorised (``LowRankHessian.capacitance_factor``),
    as the rank-pool forward pass does. Where it hands over the factor of ``H`` itself
    (``LowRankHessian.factor``), ``w`` is solved with that, ``O(q²)``: the identity would
    subtract two terms of size ``‖g‖/d`` to leave ``w``, which loses the precision of every
    direction the low-rank terms dominate. A float32 (or lower) symmetric ``H = D + AᵀA`` with
    more rows than dimensions whose capacitance matrix is too ill-conditioned for the dtype is
    solved in float64 (see :data:`WOODBURY_PRECISION`). Exact. Needs the low-rank structure.
    """

    needs_low_rank = True

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        lr = _require_low_rank(hessian, self.name)
        g = g.to(lr.dtype)
        if lr.factor is not None:
            return _check_finite(torch.cholesky_solve(g.to(lr.factor.dtype).unsqueeze(-1), lr.factor).squeeze(-1),
                                 self.name)
        if not lr.diagonal_nonzero():
            raise SingularHessianError("backward='woodbury' needs a non-zero diagonal D")
        Dinv_g = g / lr.d  # (B, q)
        if lr.rank == 0:
            return _check_finite(Dinv_g, self.name)
        if self._needs_float64(lr):
            return self.solve(_in_float64(lr), g.to(torch.float64)).to(lr.dtype)
        y = self._capacitance_solve(lr, lr.apply_B(Dinv_g).unsqueeze(-1))  # (B, n, 1)
        w = Dinv_g - lr.apply_At(y.squeeze(-1)) / lr.d
        return _check_finite(w, self.name)

    def solve_many(self, hessian: HessianOperator, G: Tensor) -> Tensor:
        """``k`` right-hand sides ``(B, q, k)`` with one factorisation of the capacitance matrix."""
        lr = _require_low_rank(hessian, self.name)
        G = G.to(lr.dtype)
        if lr.factor is not None:
            return _check_finite(torch.cholesky_solve(G.to(lr.factor.dtype), lr.factor), self.name)
        if not lr.diagonal_nonzero():
            raise SingularHessianError("backward='woodbury' needs a non-zero diagonal D")
        Dinv_G = G / lr.d.unsqueeze(-1)  # (B, q, k)
        if lr.rank == 0:
            return _check_finite(Dinv_G, self.name)
        if self._needs_float64(lr):
            return self.solve_many(_in_float64(lr), G.to(torch.float64)).to(lr.dtype)
        s = None if lr.row_scale is None else lr.row_scale.unsqueeze(-1)  # (B, n, 1)
        Z = torch.bmm(lr.right, Dinv_G)  # (B, n, k)
        Y = self._capacitance_solve(lr, Z if s is None else Z * s)
        Y = Y if s is None else Y * s
        W = Dinv_G - torch.bmm(lr.A.transpose(1, 2), Y) / lr.d.unsqueeze(-1)
        return _check_finite(W, self.name)

    @staticmethod
    def _needs_float64(lr: LowRankHessian) -> bool:
        """Whether the capacitance matrix ``I + B D⁻¹ Aᵀ`` is too ill-conditioned for the dtype
        (never where the objective handed over its factor, or the dtype is float64).

        With more rows than dimensions (``n > q``) its condition number far exceeds ``H``'s, and
        its factorisation and the identity's subtraction lose about that much of ``w``'s
        precision however well conditioned ``H`` is: a float32
        :class:`~argminlayers.objectives.LogCoshRegression` (3 × 20 × 8, frames of norm 30–100,
        ``C = 10``) had its gradient 1.0e-3–1.3e-2 off, 1e-6–7e-5 in float64 (8 seeds), as a dense
        float32 solve. (With ``n ≤ q`` the float32 identity measured 1e-7–2e-5 where that
        condition number was up to 2·10⁶: no widening there.) For ``H = D + AᵀA`` with ``D > 0``
        the condition number is at most ``1 + tr(A D⁻¹ Aᵀ) = 1 + Σ_i s_i² Σ_j a_ij²/d_j``
        (``O(nq)``, no ``n × n`` product); where ``ε`` times that exceeds
        :data:`WOODBURY_PRECISION`, the whole batch is solved in float64."""
        if (lr.capacitance_factor is not None or lr.dtype == torch.float64 or lr.rank <= lr.q
                or not lr.symmetric or not lr.diagonal_positive()):
            return False
        with torch.no_grad():
            rows = torch.bmm(lr.A.square(), (1 / lr.d).unsqueeze(-1)).squeeze(-1)  # (B, n): Σ_j a_ij²/d_j
            if lr.row_scale is not None:
                rows = rows * lr.row_scale.square()
            bound = 1 + float(rows.sum(-1).amax())
        return bound * torch.finfo(lr.dtype).eps > WOODBURY_PRECISION

    @staticmethod
    def _capacitance_solve(lr: LowRankHessian, Z: Tensor) -> Tensor:
        """``(I + B D⁻¹ Aᵀ)⁻¹ Z`` for ``Z: (B, n, k)``, by the forward's factor when there is one."""
        if lr.capacitance_factor is not None:
            return torch.cholesky_solve(Z, lr.capacitance_factor)
        cap = lr.capacitance()  # (B, n, n)
        if lr.symmetric and lr.diagonal_positive():
            return torch.cholesky_solve(Z, cholesky_or_raise(cap, "capacitance matrix I + A D⁻¹ Aᵀ"))
        LU, piv, info = torch.linalg.lu_factor_ex(cap)
        if bool((info > 0).any()):
            raise SingularHessianError(
                "backward='woodbury': the capacitance matrix I + B D⁻¹ Aᵀ is singular for samples "
                f"{(info > 0).nonzero().flatten().tolist()[:8]}"
            )
        return torch.linalg.lu_solve(LU, piv, Z)


@register_strategy("cg")
class CG(Strategy):
    """Conjugate gradient on Hessian–vector products; matrix-free.

    Cost: ``k`` Hessian–vector products, ``k ≤ max_iter``; exact to ``tol`` (relative
    residual ``‖g − H w‖ ≤ tol ‖g‖``). ``preconditioner="jacobi"`` divides by ``diag(H)``
    (free for declared structure, ``q`` HVPs for a matrix-free objective).

    Args:
        tol: relative residual; default ``1e-10`` in float64, ``1e-5`` in float32.
        max_iter: default ``max(2q, 50)``.
        preconditioner: ``None`` or ``"jacobi"``.
        on_nonconvergence: ``"warn"`` (default) or ``"raise"``.
    """

    def __init__(
        self,
        tol: float | None = None,
        max_iter: int | None = None,
        preconditioner: str | None = None,
        on_nonconvergence: str = "warn",
    ):
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
            raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
        if preconditioner not in (None, "jacobi"):
            raise ValueError(f"preconditioner must be None or 'jacobi', got {preconditioner!r}")
        if on_nonconvergence not in ("warn", "raise"):
            raise ValueError(f"on_nonconvergence must be 'warn' or 'raise', got {on_nonconvergence!r}")
        self.tol, self.max_iter = tol, max_iter
        self.preconditioner, self.on_nonconvergence = preconditioner, on_nonconvergence

    def solve(self, hessian: HessianOperator, g: Tensor) -> Tensor:
        g = g.to(hessian.dtype)
        tol = self.tol if self.tol is not None else (1e-10 if g.dtype == torch.float64 else 1e-5)
        max_iter = self.max_iter if self.max_iter is not None else max(2 * hessian.q, 50)
        precond = None
        if self.preconditioner == "jacobi":
            d = hessian.diagonal()
            if not bool((d > 0).all()):
                raise SingularHessianError("backward='cg' with a Jacobi preconditioner met a non-positive diagonal")
            precond = 1.0 / d
        res = batched_cg(hessian.matvec, g, tol=tol, max_iter=max_iter, precond=precond)
        if bool(res.negative_curvature.any()):
            raise SingularHessianError(
                f"backward={self.name!r} met non-positive curvature for samples "
                f"{res.negative_curvature.nonzero().flatten().tolist()[:8]}: the Hessian at the solution is "
                "not positive definite; pass damping=λ > 0 to the layer"
            )
        self._report(res, tol, max_iter)
        return res.x

    def _report(self, res, tol: float, max_iter: int) -> None:
        """Warn (or raise) for samples whose conjugate-gradient run did not reach ``tol``."""
        if not bool(res.converged.all()):
            bad = (~res.converged).nonzero().flatten().tolist()
            msg = (
                f"backward={self.name!r} did not reach tol={tol:g} within max_iter={max_iter} for samples {bad[:8]}; "
                "raise max_iter, use preconditioner='jacobi', or use an exact strategy"
            )
            if self.on_nonconvergence == "raise":
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"CG(tol={self.tol}, max_iter={self.max_iter}, preconditioner={self.preconditioner!r})"
