"""``ArgminLayer``: solve in the forward pass, implicit function theorem in the backward pass.

For ``u*(v) = argmin_u f(v, u)`` with ``H = ∇²_uu f(v, u*)`` positive definite, the
implicit function theorem gives ``du*/dv = −H⁻¹ ∇²_uv f``. Back-propagation needs only
the vector–Jacobian product with the upstream gradient ``g = dL/du*``::

    w     = H⁻¹ g                                    (the backward strategy)
    dL/dv = −∂/∂v [ wᵀ ∇_u f(v, u) ]  at u = u*      (one reverse pass; f_uv never built)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import ConvergenceError, ConvergenceWarning, StructureError
from .objective import Objective, Solution, as_objective
from .solvers import Solver, default_tol, get_solver
from .strategies import Strategy, available_strategies, get_strategy
from .validation import resolve_mask, zero_padding

_LAYER_OPTIONS = ("tol", "max_iter", "on_nonconvergence", "damping")


class ArgminLayer(nn.Module):
    """A differentiable layer ``V ↦ u*(V) = argmin_u f(V, u)``, batched.

    Args:
        objective: a per-sample function ``f(v, u)`` or ``f(v, u, mask)`` returning a scalar
            (``v: (T, p)``, ``u: (q,)``, ``mask: (T,)`` bool), batched with
            :func:`torch.func.vmap`; or an :class:`~argminlayers.Objective` with fast paths.
        solver: forward solver: ``"newton"``, ``"lbfgs"``, ``"newton_cg"`` or a
            :class:`~argminlayers.solvers.Solver`. ``None`` (default) uses the objective's own
            ``solve`` when it has one, else ``"newton"``.
        backward: how ``H⁻¹ g`` is applied: ``"dense"`` (default), ``"diagonal"``,
            ``"sherman_morrison"``, ``"woodbury"``, ``"cg"`` or a
            :class:`~argminlayers.strategies.Strategy`.
        tol: relative gradient tolerance of the forward solver (default: 1e-11 in float64,
            1e-5 in float32).
        max_iter: iterations of the forward solver (default: the solver's own).
        on_nonconvergence: ``"warn"`` (default) or ``"raise"`` when a sample's solve does not
            converge; never silent.
        damping: ``λ ≥ 0``; the backward pass uses ``(H + λI)⁻¹``. ``0`` (default) is the exact
            gradient and raises :class:`~argminlayers.SingularHessianError` at a singular or
            indefinite Hessian.

    Shape:
        ``V: (B, T, p)``, optional ``mask: (B, T)`` bool or ``lengths: (B,)`` → ``(B, q)``;
        ``q = p`` unless the objective's ``init`` sets another width. Padded steps have no
        influence on the output and get exactly zero gradient.

    Example::

        >>> import torch
        >>> from argminlayers import ArgminLayer
        >>> def robust_pool(v, u, mask):               # pseudo-Huber pooling
        ...     return (torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()
        >>> pool = ArgminLayer(robust_pool, backward="cg")
        >>> V = torch.randn(4, 10, 3, requires_grad=True)
        >>> u = pool(V, lengths=torch.tensor([10, 7, 3, 1]))
        >>> u.shape
        torch.Size([4, 3])
        >>> u.sum().backward()
        >>> bool(V.grad[3, 1:].abs().sum() == 0)        # padded steps: exactly zero gradient
        True
    """

    def __init__(
        self,
        objective: "Objective | Callable[..., Tensor]",
        *,
        solver: "str | Solver | None" = None,
        backward: "str | Strategy" = "dense",
        **options: Any,
    ):
        super().__init__()
        unknown = sorted(set(options) - set(_LAYER_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; ArgminLayer accepts {list(_LAYER_OPTIONS)}")
        self.objective = as_objective(objective)
        self.strategy = get_strategy(backward)
        if getattr(self.strategy, "needs_low_rank", False) and not self.objective.low_rank_hessian:
            usable = [s for s in available_strategies() if s not in ("sherman_morrison", "woodbury")]
            raise StructureError(
                f"backward={getattr(self.strategy, 'name', backward)!r} needs the Hessian declared as "
                f"diagonal + low rank (H = D + Σ a_i b_iᵀ), which {self.objective!r} does not declare; "
                f"it can use {usable}"
            )
        on_nc = options.get("on_nonconvergence", "warn")
        if on_nc not in ("warn", "raise"):
            raise ValueError(f"on_nonconvergence must be 'warn' or 'raise', got {on_nc!r}")
        damping = float(options.get("damping", 0.0))
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be finite and ≥ 0, got {damping}")
        self.on_nonconvergence, self.damping = on_nc, damping
        solver_opts = {k: options[k] for k in ("tol", "max_iter") if options.get(k) is not None}
        if solver is None and self.objective.solve is not None:
            if solver_opts:
                raise TypeError(
                    f"options {sorted(solver_opts)} configure a generic solver, but {self.objective!r} "
                    "solves itself; name a solver (solver='newton') to use them"
                )
            self.solver = None
        else:
            self.solver = get_solver("newton" if solver is None else solver, **solver_opts)
            if not isinstance(solver, (str, type(None))) and solver_opts:
                raise TypeError("tol/max_iter go to the solver object itself when solver= is an object")

    def extra_repr(self) -> str:
        solver = "objective.solve" if self.solver is None else repr(self.solver)
        return f"objective={self.objective!r}, solver={solver}, backward={self.strategy!r}, damping={self.damping}"

    # ------------------------------------------------------------------------------
    def forward(self, V: Tensor, mask: Tensor | None = None, *, lengths: Tensor | None = None) -> Tensor:
        """``V: (B, T, p)`` → ``(B, q)``. ``mask: (B, T)`` bool, or ``lengths: (B,)``."""
        mask = resolve_mask(V, mask, lengths)
        return self.forward_masked(zero_padding(V, mask), mask)

    def forward_masked(self, V: Tensor, mask: Tensor) -> Tensor:
        """:meth:`forward` for input that is already validated (``resolve_mask``) and whose
        padded steps are already zero (``zero_padding``): what a pooling that wraps the
        layer calls, so that the checks and the copy are not made twice."""
        if not self.objective.uses_mask and not bool(mask.all()):
            raise ValueError(
                "mask/lengths mark padded steps, but the objective takes no mask, so it would read them; "
                "write it as f(v, u, mask) and leave padded steps out of the sum"
            )
        return _ArgminFunction.apply(self, V, mask)

    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        """The forward solve alone (no autograd), with convergence reported."""
        objective = self.objective
        with torch.no_grad():
            if self.solver is None:
                sol = objective.solve(V, mask)
                if not isinstance(sol, Solution):
                    sol = Solution(sol)
            else:
                sol = self.solver.minimize(objective, V, mask, objective.init(V, mask))
        self._report(sol, V)
        return sol

    def _report(self, sol: Solution, V: Tensor) -> None:
        bad = ~torch.isfinite(sol.u).all(-1)
        if sol.converged is not None:
            bad = bad | ~sol.converged
        if not bool(bad.any()):
            return
        idx = bad.nonzero().flatten().tolist()
        gn = "" if sol.grad_norm is None else f" (‖∇f‖ = {[f'{x:.2e}' for x in sol.grad_norm[idx[:4]].tolist()]})"
        msg = (
            f"the forward solve of {self.objective!r} did not converge for samples "
            f"{idx[:8]}{' ...' if len(idx) > 8 else ''}{gn}; raise max_iter, loosen tol "
            f"(default {default_tol(V.dtype):g}), or try another solver"
        )
        if self.on_nonconvergence == "raise" or not bool(torch.isfinite(sol.u).all()):
            raise ConvergenceError(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)

    def implicit_vjp(self, V: Tensor, mask: Tensor, sol: Solution, grad_u: Tensor) -> Tensor:
        """``dL/dV = −∂/∂V [wᵀ ∇_u f]`` with ``w = H⁻¹ grad_u``; ``(B, T, p)``."""
        objective = self.objective
        H = objective.hessian(V, sol.u, mask, sol.state).shifted(self.damping)
        W = self.strategy.solve(H, grad_u)
        # On detached tensors: dV is a plain tensor, so a second differentiation fails loudly
        # (the Function is once_differentiable) instead of following a partial graph.
        with torch.no_grad():
            dV = objective.vjp_v(V.detach(), sol.u.detach(), mask, W.detach(), sol.state)
        dV = dV.neg_()  # vjp_v returns a tensor of its own (its contract): no copy
        if not bool(mask.all()):
            dV.masked_fill_(~mask.unsqueeze(-1), 0)
        return dV


class _ArgminFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: ArgminLayer, V: Tensor, mask: Tensor) -> Tensor:
        sol = layer.solve(V, mask)
        ctx.layer, ctx.sol = layer, sol
        ctx.save_for_backward(V, mask)
        return sol.u.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u: Tensor):
        V, mask = ctx.saved_tensors
        dV = ctx.layer.implicit_vjp(V, mask, ctx.sol, grad_u.contiguous())
        return None, dV, None
