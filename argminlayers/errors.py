"""Exceptions and warnings raised by argminlayers."""

from __future__ import annotations


class _Report:
    """Structured facts of a failed solve, beside the message: ``samples`` (indices), ``grad_norms``
    (``‖∇f‖`` of each, or ``None``), ``statuses`` (codes of ``argminlayers.objective.STATUS_TEXT``)
    and ``tol`` (the tolerance in force)."""

    def __init__(self, message: str = "", *, samples=(), grad_norms=None, statuses=(), tol=None):
        super().__init__(message)
        self.samples, self.statuses, self.tol = list(samples), list(statuses), tol
        self.grad_norms = None if grad_norms is None else list(grad_norms)


class ConvergenceWarning(_Report, UserWarning):
    """A forward solve (or an iterative backward solve) stopped before meeting its tolerance.
    Its ``samples``, ``grad_norms``, ``statuses`` and ``tol`` attributes say which and why."""


class ConvergenceError(_Report, RuntimeError):
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


class PrecisionWarning(UserWarning):
    """A result in the input's dtype is likely inaccurate there and the layer could not compute it
    in a wider one (e.g. float32 rank pooling of ill-conditioned frames through a generic solver);
    the message says what to change."""
