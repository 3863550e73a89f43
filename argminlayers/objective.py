"""Objectives ``f(v, u)``: the inner problem of an argmin layer.

The simplest objective is a plain per-sample function in torch ops::

    def robust_pool(v, u, mask):             # v: (T, p), u: (q,), mask: (T,) bool
        r = torch.sqrt(1 + ((u - v) ** 2).sum(-1))
        return (r * mask).sum()

Everything else (batched values, gradients, Hessian–vector products, the mixed
derivative ``∂/∂v [wᵀ ∇_u f]``) is derived from it with :mod:`torch.func`:
``vmap`` over the batch, ``grad``/``jvp``/``vjp`` inside. A function of ``(v, u)``
alone is accepted too, for sequences without padding.

An objective can instead be a subclass of :class:`Objective` that overrides the
batched methods with fast paths: its own ``solve``, an ``init``, a structured
``hessian`` (e.g. :class:`~argminlayers.hessian.LowRankHessian`), a ``hessian_diag``
or a closed-form ``vjp_v``. Every batched method takes ``V: (B, T, p)``,
``U: (B, q)`` and ``mask: (B, T)`` bool, where padded steps of ``V`` are zero.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .hessian import FunctionHessian, HessianOperator


@dataclass
class Solution:
    """What a forward solve returns.

    Attributes:
        u: ``(B, q)`` the minimisers.
        converged: ``(B,)`` bool, or ``None`` for a closed form.
        iterations: ``(B,)`` iterations used, or ``None``.
        grad_norm: ``(B,)`` ``‖∇_u f‖`` at ``u``, or ``None``.
        state: anything the objective wants back in ``hessian``/``vjp_v`` (e.g. a factorisation).
    """

    u: Tensor
    converged: Tensor | None = None
    iterations: Tensor | None = None
    grad_norm: Tensor | None = None
    state: Any = None


class Objective:
    """Base class of objectives. Override :meth:`f` (per sample) or the batched methods.

    Class attributes:
        low_rank_hessian: ``True`` when :meth:`hessian` returns a
            :class:`~argminlayers.hessian.LowRankHessian`, which the ``sherman_morrison``
            and ``woodbury`` strategies need.
        uses_mask: whether :meth:`f` takes a mask (a function of ``(v, u)`` alone cannot
            ignore padded steps).

    Optional fast path ``solve(V, mask) -> Tensor | Solution``: when a subclass defines
    it, the layer uses it instead of a generic solver (unless a solver is named).
    """

    low_rank_hessian: bool = False
    uses_mask: bool = True
    solve: Callable[..., Any] | None = None

    # ---- the per-sample definition -------------------------------------------------
    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        """The objective for one sample: ``v: (T, p)``, ``u: (q,)``, ``mask: (T,)`` → scalar."""
        raise NotImplementedError(
            f"{type(self).__name__} must define f(v, u, mask) or override the batched methods it uses"
        )

    # ---- batched methods, derived from f by torch.func ------------------------------
    def init(self, V: Tensor, mask: Tensor) -> Tensor:
        """Starting point ``(B, q)``; its width sets ``q``. Default: zeros of width ``p``."""
        return V.new_zeros(V.shape[0], V.shape[2])

    def value(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``f`` for every sample, ``(B,)``."""
        return vmap(self.f)(V, U, mask)

    def grad(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``∇_u f``, ``(B, q)``."""
        return vmap(grad(self.f, argnums=1))(V, U, mask)

    def hvp(self, V: Tensor, U: Tensor, mask: Tensor, X: Tensor) -> Tensor:
        """``∇²_uu f · x`` for every sample, ``(B, q)`` (forward-over-reverse)."""
        g = grad(self.f, argnums=1)

        def one(v, u, m, x):
            return jvp(lambda uu: g(v, uu, m), (u,), (x,))[1]

        return vmap(one)(V, U, mask, X)

    def hessian(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> HessianOperator:
        """The Hessian ``∇²_uu f`` at ``U`` as an operator (matrix-free by default)."""
        B, q = U.shape
        diag = None
        if type(self).hessian_diag is not Objective.hessian_diag:
            diag = lambda: self.hessian_diag(V, U, mask, state)  # noqa: E731
        return FunctionHessian(
            B,
            q,
            U.dtype,
            U.device,
            matvec=lambda X: self.hvp(V, U, mask, X),
            dense=lambda: vmap(torch.func.hessian(self.f, argnums=1))(V, U, mask),
            diagonal=diag,
        )

    def hessian_diag(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> Tensor:
        """``diag(∇²_uu f)``, ``(B, q)``. Override when it is cheaper than the dense Hessian."""
        return self.hessian(V, U, mask, state).dense().diagonal(dim1=-2, dim2=-1)

    def vjp_v(self, V: Tensor, U: Tensor, mask: Tensor, W: Tensor, state: Any = None) -> Tensor:
        """``∂/∂V [Σ_b W_bᵀ ∇_u f(V_b, U_b)]``, ``(B, T, p)``: one reverse pass through ``∇_u f``.

        The input gradient of the layer is minus this, at ``W = H⁻¹ g``. ``f_uv`` is never built.
        The result must be a new tensor (not a view of an input): the layer negates it in place.
        """
        g = grad(self.f, argnums=1)

        def one(v, u, m, w):
            _, pullback = vjp(lambda vv: g(vv, u, m), v)
            return pullback(w)[0]

        return vmap(one)(V, U, mask, W)


class FunctionObjective(Objective):
    """Wraps a plain per-sample function ``fn(v, u)`` or ``fn(v, u, mask)``."""

    def __init__(self, fn: Callable[..., Tensor]):
        if not callable(fn):
            raise TypeError(f"objective must be callable or an Objective, got {type(fn).__name__}")
        self.fn = fn
        self.uses_mask = _count_positional(fn) >= 3
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        return self.fn(v, u, mask) if self.uses_mask else self.fn(v, u)

    def __repr__(self) -> str:
        return f"FunctionObjective({self.__name__})"


def _count_positional(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 3
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 3
    n = sum(p.kind in kinds for p in params)
    if n < 2:
        raise TypeError(
            f"objective function {getattr(fn, '__name__', fn)!r} must take (v, u) or (v, u, mask), "
            f"it takes {n} positional argument(s)"
        )
    return n


def as_objective(objective: "Objective | Callable[..., Tensor]") -> Objective:
    """An :class:`Objective` from an objective object or a plain function."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, type):
        raise TypeError(f"objective must be an instance, got the class {objective.__name__}; call it first")
    return FunctionObjective(objective)
