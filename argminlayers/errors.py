"""Exceptions and warnings raised by argminlayers."""

from __future__ import annotations


class ConvergenceWarning(UserWarning):
    """A forward solve (or an iterative backward solve) stopped before meeting its tolerance."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when ``on_nonconvergence="raise"``."""


class SingularHessianError(RuntimeError):
    """The Hessian at the solution is singular or indefinite, so the implicit gradient does not exist.

    The message names the offending samples. Passing ``damping=λ > 0`` to the layer
    regularises the backward solve to ``(H + λI)⁻¹``; the gradient is then that of the
    damped system, not the exact one.
    """


class StructureError(ValueError):
    """A backward strategy needs Hessian structure that the objective does not declare."""


class CapturedTensorError(RuntimeError):
    """An objective reads a tensor that requires grad through a path the layer cannot follow
    (so its gradient would be lost); pass it as a keyword input or make it a parameter."""


class DegenerateConstraintError(RuntimeError):
    """The gradients of the active constraints are linearly dependent at the solution, so the
    multipliers are not unique and the implicit gradient is not defined there. The message
    names the samples; remove the redundant constraints."""


class DegeneracyWarning(UserWarning):
    """A constrained solution is degenerate but still has a (one-sided) gradient: an inequality
    is weakly active (``g_i = 0`` with multiplier ``μ_i = 0``). It is then treated as active."""
