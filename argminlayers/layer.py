"""``ArgminLayer``: solve in the forward pass, implicit function theorem in the backward pass.

For ``u*(v, θ) = argmin_u f(v, u, θ)`` with ``H = ∇²_uu f(v, u*, θ)`` positive definite,
the implicit function theorem gives ``du*/dv = −H⁻¹ ∇²_uv f`` and likewise for ``θ`` (keyword
inputs, parameters of the objective, tensors its function captures). Back-propagation needs
only the vector–Jacobian product with the upstream gradient ``g = dL/du*``::

    w     = H⁻¹ g                                         (the backward strategy)
    dL/dv = −∂/∂v [ wᵀ ∇_u f(v, u, θ) ]  at u = u*        (one reverse pass over v and θ
    dL/dθ = −∂/∂θ [ wᵀ ∇_u f(v, u, θ) ]  at u = u*         together; f_uv never built)

**Second order.** With ``create_graph=True`` the backward is itself differentiable for the
exact strategies: it is rebuilt from differentiable operations of ``(v, θ, u*, g)``, where
``u*`` is the layer's own output (so a second differentiation flows through the layer
again), and ``w = H⁻¹ g`` is differentiated through ``w₀ − S(H w₀ − g)`` with ``w₀ = H⁻¹ g``
and ``S`` the strategy's solve: its value is ``w₀`` and its derivative
``−H⁻¹ (dH) w₀ + H⁻¹ dg``, the derivative of ``H⁻¹ g``. The ``diagonal`` approximation has
no such derivative and refuses.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import interior_point  # noqa: F401  (registers solver="interior_point")
from .constraints import ConstraintSet, Multipliers
from .constraints import implicit_grads as _constrained_grads
from .errors import CapturedTensorError, ConvergenceError, ConvergenceWarning, SingularHessianError, StructureError
from .objective import (
    CONVERGED,
    INFEASIBLE,
    MAX_ITER,
    NO_DESCENT,
    NONFINITE,
    NOT_MINIMUM,
    NOT_STATIONARY,
    STATUS_TEXT,
    FunctionObjective,
    Linearization,
    Objective,
    Solution,
    as_objective,
)
from .linalg import all_finite
from .problem import Problem
from .solvers import Solver, default_tol, get_solver
from .strategies import CG, Strategy, available_strategies, get_strategy
from .validation import check_inputs, resolve_mask, zero_padding

_LAYER_OPTIONS = ("tol", "max_iter", "on_nonconvergence", "damping", "init", "batched")

#: The default solver is dense Newton while ``q ≤ DENSE_MAX_Q`` and the batched Hessian's work,
#: ``V.numel() · q`` (``B·T·p·q``: ``q`` reverse passes over the data), stays below
#: ``DENSE_MAX_WORK``; beyond, L-BFGS (gradients only). Measured on a 2-core CPU (docs/benchmarks.md).
DENSE_MAX_Q = 64
DENSE_MAX_WORK = 200_000
#: A constrained problem's backward (a KKT solve) factorises the dense Lagrangian Hessian while
#: ``q ≤ KKT_DENSE_MAX_Q``, else solves by projected CG (docs/constraints.md).
KKT_DENSE_MAX_Q = 32


class ArgminLayer(nn.Module):
    """A differentiable layer ``(V, θ) ↦ u*(V, θ) = argmin_u f(V, u, θ)``, batched.

    Args:
        objective: a per-sample function ``f(v, u)`` or ``f(v, u, mask)``, with optional
            keyword inputs (``f(v, u, mask, w)``), returning a scalar (``v: (T, …)``,
            ``u: q_shape``, ``mask: (T,)`` bool) and batched with :func:`torch.func.vmap`; an
            :class:`~torch.nn.Module` with such a ``forward``; or an
            :class:`~argminlayers.Objective` with fast paths. Parameters of a module objective
            are the layer's own, and get gradients.
        solver: forward solver: ``"newton"``, ``"lbfgs"``, ``"newton_cg"`` or a
            :class:`~argminlayers.solvers.Solver`. ``None`` (default) uses the objective's own
            ``solve`` when it has one, else dense Newton for small problems (``q ≤ 64`` and
            ``B·T·p·q ≤ 2·10⁵``) and L-BFGS beyond.
        backward: how ``H⁻¹ g`` is applied: ``"dense"``, ``"diagonal"``, ``"sherman_morrison"``,
            ``"woodbury"``, ``"cg"`` or a :class:`~argminlayers.strategies.Strategy`. ``None``
            (default): ``"woodbury"`` for objectives that declare low-rank structure, else
            ``"dense"`` (reusing the forward's last factorisation) after dense Newton, else
            ``"cg"`` (Jacobi-preconditioned when the objective has a cheap ``hessian_diag``).
        tol: relative gradient tolerance of the forward solver (default: 1e-11 in float64,
            1e-5 in float32).
        max_iter: iterations of the forward solver (default: the solver's own).
        on_nonconvergence: ``"warn"`` (default) or ``"raise"`` when a sample's solve does not
            reach a minimum; never silent. Under ``"warn"`` such samples get zero gradient,
            and the warning says so.
        damping: ``λ ≥ 0``; the backward pass uses ``(H + λI)⁻¹``. ``0`` (default) is the exact
            gradient and raises :class:`~argminlayers.SingularHessianError` at a singular or
            indefinite Hessian.
        init: optional ``init(V, mask, **inputs) -> (B, *q_shape)``, the starting point of a
            generic solver (default: the objective's ``init``, zeros shaped like one step of V).
        batched: the plain function already takes whole batches and returns ``(B,)`` values
            (sample ``b`` depending on sample ``b`` alone); ``vmap`` is skipped.
        eq: optional equality constraints ``h(v, u) = 0``: a per-sample function ``eq(v, u)`` or
            ``eq(v, u, mask)``, with the keyword inputs it names, returning ``(m,)``.
        ineq: optional inequality constraints ``g(v, u) ≤ 0``, likewise returning ``(k,)``. An
            :class:`~argminlayers.Objective` may define ``equality_constraints`` /
            ``inequality_constraints`` instead. A constrained layer solves with
            ``solver="interior_point"`` (or the objective's own ``solve``) and back-propagates
            through the KKT system; see :mod:`argminlayers.constraints`. The multipliers are in
            :meth:`solve`'s ``Solution.multipliers``.

    Shape:
        ``V: (B, T, *feature_shape)`` with an optional ``mask: (B, T)`` bool or
        ``lengths: (B,)``, or any ``(B, *)`` without one; keyword inputs ``(B, *)``; output
        ``(B, *q_shape)``, ``q_shape`` set by ``init`` (default ``V.shape[2:]``, or ``V.shape[1:]``
        for ``V: (B, n)``). Padded steps have no influence on the output and get exactly zero
        gradient.

    Precision:
        The solve and the backward run in float32 at least: float16/bfloat16 inputs are cast
        up, autocast is switched off inside the layer, and the output is cast back to the
        input's dtype.

    Example::

        >>> import torch
        >>> from argminlayers import ArgminLayer
        >>> def robust_pool(v, u, mask, w):            # weighted pseudo-Huber pooling
        ...     return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()
        >>> pool = ArgminLayer(robust_pool)
        >>> V = torch.randn(4, 10, 3, requires_grad=True)
        >>> w = torch.rand(4, 10, requires_grad=True)   # per-frame weights, learnable too
        >>> u = pool(V, lengths=torch.tensor([10, 7, 3, 1]), w=w)
        >>> u.shape
        torch.Size([4, 3])
        >>> u.sum().backward()
        >>> bool(V.grad[3, 1:].abs().sum() == 0), w.grad.shape   # padded steps: exactly zero
        (True, torch.Size([4, 10]))
    """

    def __init__(
        self,
        objective: "Objective | Callable[..., Tensor]",
        *,
        solver: "str | Solver | None" = None,
        backward: "str | Strategy | None" = None,
        eq: "Callable[..., Tensor] | None" = None,
        ineq: "Callable[..., Tensor] | None" = None,
        **options: Any,
    ):
        super().__init__()
        unknown = sorted(set(options) - set(_LAYER_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; ArgminLayer accepts {list(_LAYER_OPTIONS)}")
        self.objective = as_objective(objective, batched=bool(options.get("batched", False)))
        self.constraints = ConstraintSet.of(self.objective, eq, ineq)
        self.strategy = None if backward is None else get_strategy(backward)
        if getattr(self.strategy, "needs_low_rank", False) and not self.objective.low_rank_hessian:
            usable = [s for s in available_strategies() if s not in ("sherman_morrison", "woodbury")]
            raise StructureError(
                f"backward={getattr(self.strategy, 'name', backward)!r} needs the Hessian declared as "
                f"diagonal + low rank (H = D + Σ a_i b_iᵀ), which {self.objective.describe()} does not declare; "
                f"it can use {usable}"
            )
        on_nc = options.get("on_nonconvergence", "warn")
        if on_nc not in ("warn", "raise"):
            raise ValueError(f"on_nonconvergence must be 'warn' or 'raise', got {on_nc!r}")
        damping = float(options.get("damping", 0.0))
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"damping must be finite and ≥ 0, got {damping}")
        init = options.get("init")
        if init is not None and not callable(init):
            raise TypeError(f"init must be a callable init(V, mask, **inputs) -> (B, *q_shape), got {type(init).__name__}")
        self.on_nonconvergence, self.damping, self.init = on_nc, damping, init
        self._solver_opts = {k: options[k] for k in ("tol", "max_iter") if options.get(k) is not None}
        self._solvers: dict[str, Solver] = {}
        self._probed: tuple | None = None  # the per-sample shapes of the last probed call
        if solver is None and self.objective.solve is not None:
            if self._solver_opts:
                raise TypeError(
                    f"options {sorted(self._solver_opts)} configure a generic solver, but "
                    f"{self.objective.describe()} solves itself; name a solver (solver='newton') to use them"
                )
            self.solver: Solver | None = None
            self._auto_solver = False
        elif solver is None:
            self.solver, self._auto_solver = None, True
            # validate the options now, not at the first call
            for name in ("newton", "lbfgs") if self.constraints is None else ("interior_point",):
                self._solvers[name] = get_solver(name, **self._solver_opts)
        else:
            if not isinstance(solver, str) and self._solver_opts:
                raise TypeError("tol/max_iter go to the solver object itself when solver= is an object")
            self.solver, self._auto_solver = get_solver(solver, **self._solver_opts), False
            if self.constraints is not None and not getattr(self.solver, "handles_constraints", False):
                raise TypeError(
                    f"solver={getattr(self.solver, 'name', solver)!r} ignores constraints, and this layer has "
                    f"{self.constraints}; use solver='interior_point' (or the objective's own solve)"
                )

    def extra_repr(self) -> str:
        solver = "auto" if self._auto_solver else ("objective.solve" if self.solver is None else repr(self.solver))
        backward = "auto" if self.strategy is None else repr(self.strategy)
        return f"solver={solver}, backward={backward}, damping={self.damping}"

    # ------------------------------------------------------------------------ the call
    def forward(self, V: Tensor, mask: Tensor | None = None, *, lengths: Tensor | None = None,
                **inputs: Tensor) -> Tensor:
        """``V: (B, T, …)`` → ``(B, *q_shape)``. ``mask: (B, T)`` bool, or ``lengths: (B,)``;
        keyword inputs ``(B, …)`` reach the objective by name, one sample at a time."""
        if torch.compiler.is_compiling():  # run eagerly inside a compiled model: one graph break
            return torch.compiler.disable(self._call)(V, mask, lengths, inputs, False)
        return self._call(V, mask, lengths, inputs, False)

    def forward_masked(self, V: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """:meth:`forward` for input that is already validated (``resolve_mask``) and whose
        padded steps are already zero (``zero_padding``): what a pooling that wraps the
        layer calls, so that the checks and the copy are not made twice."""
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self._call)(V, mask, None, inputs, True)
        return self._call(V, mask, None, inputs, True)

    def _call(self, V: Tensor, mask: Any, lengths: Any, inputs: dict, validated: bool) -> Tensor:
        if torch.is_inference_mode_enabled():  # (also inside a compiled model, where the call runs eagerly)
            return _outside_inference(self._call, V, mask, lengths, inputs, validated)
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a torch.Tensor of shape (B, ...), got {type(V).__name__}")
        if (V.dim() == 2 and (mask is not None or lengths is not None) and self.init is None
                and type(self.objective).init is Objective.init and not (self.solver is None and not self._auto_solver)):
            raise ValueError(
                f"V has shape {tuple(V.shape)} = (B, T) with a mask or lengths, so its steps are scalars, but the default "
                "u has the shape of one step only for V of shape (B, T, *feature_shape): give init= (e.g. "
                "init=lambda V, mask: V.new_zeros(V.shape[0])), or V of shape (B, T, 1)"
            )
        if isinstance(lengths, Tensor) and torch._C._functorch.is_batchedtensor(lengths):
            raise ValueError(
                "lengths is mapped by torch.func.vmap, which the layer cannot fold into its batch; pass the mask "
                "instead (mask = torch.arange(T) < lengths[..., None], as the second argument): a mapped mask is folded")
        names = tuple(inputs)
        self._bind(names)
        params = {n: p for n, p in self.objective.named_parameters() if p.requires_grad}
        clash = sorted(set(names) & set(params))
        if clash:
            raise TypeError(f"keyword input(s) {clash} have the names of parameters of {self.objective.describe()}")
        captured = self._captured()
        if torch.autograd.forward_ad._current_level >= 0:  # forward mode: every tangent is carried or refused
            self._refuse_dual_parameters()
        # precision: solve in float32 at least, never under autocast; cast the output back
        out_dtype = V.dtype
        work = V.dtype if V.dtype in (torch.float32, torch.float64) or not V.is_floating_point() else torch.float32
        if work != V.dtype:
            V = V.to(work)
            inputs = {k: (x.to(work) if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x)
                      for k, x in inputs.items()}
        tensors = (*inputs.values(), *params.values(), *captured.values())
        # when a gradient will be asked for, the solver's records carry the graph back to V and
        # the inputs, so that the backward reuses the last one instead of recording it again
        track = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (V, *tensors))
        spec = _Call(names=names, params=tuple(params), captured=tuple(captured), validated=validated,
                     lengths=lengths, track=track)
        ctx = contextlib.nullcontext()
        if V.is_floating_point() and torch.is_autocast_enabled(V.device.type):
            ctx = torch.autocast(V.device.type, enabled=False)
        with ctx:
            U = _ArgminFunction.apply(self, spec, V, mask, *tensors)
        return U if U.dtype == out_dtype or not V.is_floating_point() else U.to(out_dtype)

    def _bind(self, names: tuple[str, ...]) -> None:
        """Hand each plain function (objective, constraints) the keyword inputs it takes."""
        others: tuple[str, ...] = ()
        if self.constraints is not None:
            self.constraints.bind(names)
            others = self.constraints.accepted(names)
        if isinstance(self.objective, FunctionObjective):
            self.objective.bind(names, others)

    def _captured(self) -> dict[str, Tensor]:
        return self.objective.captured_tensors()

    # ------------------------------------------------------------------------ the solve
    def solve(self, V: Tensor, mask: Tensor | None = None, **inputs: Tensor) -> Solution:
        """The forward solve alone (no autograd), with convergence reported: ``V`` validated,
        padded steps zeroed; returns the :class:`~argminlayers.Solution` (``status`` per sample,
        ``multipliers`` for constrained problems)."""
        if torch.is_inference_mode_enabled():
            return _outside_inference(lambda V, mask, _, inputs, __: self.solve(V, mask, **inputs), V, mask, None,
                                      inputs, False)
        mask = resolve_mask(V, mask, sequence=False)
        V = zero_padding(V, mask)
        check_inputs(inputs, V)
        self._bind(tuple(inputs))
        with torch.no_grad(), _own_saved_tensors():
            sol, _ = self._solve(V.detach(), {k: x.detach() for k, x in inputs.items()}, mask=mask)
        return sol

    def _solve(self, V: Tensor, inputs: dict, *, mask: Tensor,
               known: "tuple[Tensor, ...] | None" = None) -> tuple[Solution, Problem]:
        """The forward solve; ``known``: the parameters and captured tensors the call routes
        gradients to (gathered by the call; by default gathered here)."""
        objective = self.objective
        if getattr(objective, "sequence", False) and V.dim() != 3:
            raise ValueError(
                f"V must have 3 dimensions (B, T, p) for {objective.describe()}, got {V.dim()} with shape {tuple(V.shape)}"
            )
        if not self.objective.uses_mask and not bool(mask.all()):
            raise ValueError(
                "mask/lengths mark padded steps, but the objective takes no mask, so it would read them; "
                "write it as f(v, u, mask) and leave padded steps out of the sum"
            )
        B = V.shape[0]
        own = self.solver is None and not self._auto_solver
        if own:
            sol = objective.solve(V, mask, **inputs)
            if not isinstance(sol, Solution):
                sol = Solution(sol)
            _check_shape(sol.u, B, V, objective, "solve", inputs)
            problem = Problem(objective, V, mask, inputs, tuple(sol.u.shape[1:]), self.constraints)
            if self._probed != _sample_shapes(V, sol.u, inputs):
                self._probe(problem, sol.u)
            if sol.converged is None or problem.constraints is not None:
                sol = self._check_stationary(problem, sol)
        else:
            U0 = (self.init or objective.init)(V, mask, **inputs)
            _check_shape(U0, B, V, objective, "init", inputs)
            problem = Problem(objective, V, mask, inputs, tuple(U0.shape[1:]), self.constraints)
            if self._probed != _sample_shapes(V, U0, inputs):
                self._probe(problem, U0)
            solver = self._pick_solver(problem)
            sol = solver.minimize(problem, U0.reshape(B, -1))
            sol.u = problem.shaped(sol.u)
            _check_shape(sol.u, B, V, objective, f"{type(solver).__name__}.minimize", inputs)
            # the last record's graph reaches every tensor that requires grad now (the first call's
            # check saw those of its own time: a module frozen then, unfrozen since, is caught here)
            record = getattr(getattr(sol.state, "linearization", None), "_record", None)
            if V.requires_grad and record is not None:
                self._refuse_hidden(record[0], f"objective {objective.describe()}",
                                    (V, record[1], *inputs.values(), *(self._routed() if known is None else known)))
        self._report(sol, V)
        if problem.constraints is not None:
            problem.constraints.check_padding(problem, sol.u)
            problem.constraints.warn_degenerate(sol, objective.describe())
        return sol, problem

    def _pick_solver(self, problem: Problem) -> Solver:
        if not self._auto_solver:
            return self.solver
        if problem.constraints is not None:
            return self._solvers["interior_point"]
        return self._solvers["newton" if _dense_pays(problem) else "lbfgs"]

    def pick_strategy(self, problem: Problem, sol: Solution) -> Strategy:
        """The backward strategy of this call: the one asked for, or the default rule."""
        if self.strategy is not None:
            return self.strategy
        objective = self.objective
        if problem.constraints is not None:  # a KKT solve: Schur with Woodbury where H_L keeps the structure
            structured = objective.low_rank_hessian and (
                problem.constraints.linear or getattr(objective, "lagrangian_hessian", None) is not None)
            if structured:
                return _auto_strategy("woodbury")
            return _auto_strategy("dense" if problem.q <= KKT_DENSE_MAX_Q else "projected_cg")
        if objective.low_rank_hessian:
            return _auto_strategy("woodbury")
        hessian = getattr(sol.state, "hessian", None)
        if hessian is not None or _dense_pays(problem):
            return _auto_strategy("dense")
        jacobi = type(objective).hessian_diag is not Objective.hessian_diag
        return _auto_strategy("cg_jacobi" if jacobi else "cg")

    def _check_stationary(self, problem: Problem, sol: Solution) -> Solution:
        """An objective's own solve that reports no convergence is checked: ``‖∇f(u)‖`` must be
        small against ``‖∇f(0)‖`` (cheap, batched). A constrained problem's KKT conditions instead
        (:meth:`~argminlayers.constraints.ConstraintSet.check`)."""
        if problem.constraints is not None:
            return problem.constraints.check(problem, sol)
        U = sol.u.reshape(problem.batch, -1)
        g = torch.linalg.vector_norm(problem.linearize(U, sol.state, second_order=False).grad, dim=-1)
        g0 = torch.linalg.vector_norm(problem.linearize(torch.zeros_like(U), second_order=False).grad, dim=-1)
        tol = 1e-6 if U.dtype == torch.float64 else 1e-3
        ok = torch.isfinite(g) & (g <= tol * torch.where(torch.isfinite(g0), g0, torch.zeros_like(g0)).clamp_min(1.0))
        status = torch.where(ok, CONVERGED, NOT_STATIONARY)
        return Solution(sol.u, converged=ok, iterations=sol.iterations, grad_norm=g, state=sol.state,
                        status=status, multipliers=sol.multipliers)

    def _probe(self, problem: Problem, U0: Tensor) -> None:
        """First call, and each call whose per-sample shapes differ from the last probed one (a
        keyword input of the wrong length then gets the message below, not torch's alone): the
        objective must not modify its arguments, and every tensor that requires grad and that it
        reads must be one the layer can route gradients to."""
        objective = self.objective
        V1 = problem.V[:1].detach().clone()
        inputs1 = {k: x[:1].detach().clone() for k, x in problem.inputs.items()}
        U1 = U0[:1].detach().clone()
        versions = [t._version for t in (V1, U1, *inputs1.values())]
        with torch.enable_grad():
            try:
                out = objective.value(V1, U1, problem.mask[:1], **inputs1)
            except RuntimeError as e:  # e.g. a keyword input whose per-sample shape does not fit
                shapes = ", ".join([f"v {tuple(V1.shape[1:])}", f"u {tuple(U1.shape[1:])}",
                                    *(f"{k} {tuple(x.shape[1:])}" for k, x in inputs1.items())])
                raise RuntimeError(
                    f"objective {objective.describe()} failed on its first sample, called with per-sample shapes "
                    f"{shapes} (keyword inputs are sliced along their first dimension, B): {e}"
                ) from e
            outs = [out]
            if problem.constraints is not None:
                outs.append(problem.constraints.values(V1, U1, problem.mask[:1], inputs1))
        if [t._version for t in (V1, U1, *inputs1.values())] != versions:
            raise RuntimeError(
                f"objective {objective.describe()} modified its arguments (v, u or a keyword input) in place; "
                "that would corrupt the caller's tensors and the solve (this was found on copies: yours are untouched). "
                "Compute on new tensors "
                "(e.g. v = v * 2 instead of v *= 2)"
            )
        if type(objective).grad is Objective.grad:  # its gradient comes from autograd through f
            with torch.enable_grad():
                depends = objective.value(V1, U1.clone().requires_grad_(True), problem.mask[:1], **inputs1).requires_grad
            if not depends:
                raise ValueError(
                    f"objective {objective.describe()} returns a value with no gradient with respect to u, so u* "
                    "is not defined by it (computed under no_grad, with .detach(), .item() or integer ops?); "
                    "compute f from u with differentiable torch operations"
                )
        for i, out in enumerate(outs):
            self._refuse_hidden(out, f"objective {objective.describe()}" if i == 0 else f"{problem.constraints}")
        self._probed = _sample_shapes(problem.V, U0, problem.inputs)

    def _refuse_hidden(self, out: Any, who: str, known: "tuple[Tensor, ...] | None" = None) -> None:
        """Raise :class:`CapturedTensorError` if ``out`` depends on a tensor that requires grad and
        that the layer cannot route a gradient to: not one of ``known`` (by default the objective's
        parameters and captured tensors; a call passes its own inputs, parameters and captured
        tensors, gathered once)."""
        if not (isinstance(out, Tensor) and out.requires_grad):
            return
        if known is None:
            known = self._routed()
        stops = {id(t.grad_fn) for t in known if t.grad_fn is not None}
        known = {id(t) for t in known}
        hidden = _hidden_leaves(out, known, stops)
        if hidden:
            t = hidden[0]
            kind = "an nn.Parameter" if isinstance(t, nn.Parameter) else "a tensor"
            raise CapturedTensorError(
                f"{who} captures {kind} that requires grad (shape "
                f"{tuple(t.shape)}, {t.dtype}) through something the layer cannot see, so its gradient "
                "would be lost. Pass it as a keyword input instead, layer(V, name=tensor) with the "
                "objective taking a `name` argument, or make it a parameter of an Objective (an nn.Module)"
            )

    def _refuse_dual_parameters(self) -> None:
        """A parameter, buffer or captured tensor of the objective with a forward-mode tangent is
        refused: the tangent would be lost (only ``V`` and keyword inputs carry one)."""
        unpack = torch.autograd.forward_ad.unpack_dual
        named = (*self.objective.named_parameters(), *self.objective.named_buffers(), *self._captured().items())
        dual = [n for n, t in named if unpack(t).tangent is not None]
        if dual:
            raise NotImplementedError(
                f"{type(self).__name__}: forward-mode AD with a tangent on a parameter or captured tensor of the objective "
                f"({', '.join(dual)}) is not supported; give tangents to V and keyword inputs (or use reverse mode)")

    def _routed(self) -> tuple[Tensor, ...]:
        """The objective's parameters and captured tensors: those the layer routes gradients to."""
        return (*self.objective.parameters(), *self._captured().values())

    def _report(self, sol: Solution, V: Tensor) -> None:
        u = sol.u.reshape(sol.u.shape[0], -1)
        if sol.converged is not None and all_finite(u) and bool(sol.converged.all()):
            return  # the common case in two read-backs; the rest finds which samples and why
        nonfinite = ~torch.isfinite(u).all(-1)
        bad = nonfinite if sol.converged is None else nonfinite | ~sol.converged
        if not bool(bad.any()):
            return
        idx = bad.nonzero().flatten().tolist()
        reasons: dict[int, list[int]] = {}
        for i in idx:
            code = -1 if bool(nonfinite[i]) else (int(sol.status[i]) if sol.status is not None else MAX_ITER)
            reasons.setdefault(code, []).append(i)
        tol = self._solver_opts.get("tol", default_tol(V.dtype))
        parts = []
        for code, samples in reasons.items():
            text = "the solution is NaN or infinite" if code == -1 else STATUS_TEXT.get(code, "it did not converge")
            hint = _HINTS.get(code, "").format(tol=tol)
            if code in (MAX_ITER, NO_DESCENT, INFEASIBLE):
                # a run away to a huge u (far beyond the data's scale) is an objective without a minimum
                far = float(u[samples].norm(dim=-1).amax())
                if far > _FAR * max(1.0, float(V.detach().abs().amax()) if V.numel() else 1.0):
                    hint = (f"u ran away to ‖u‖ = {far:.2g}: the objective may be unbounded below"
                            f"{' on the constraint set' if self.constraints is not None else ''} (no minimiser); "
                            + hint)
            where = f"samples {samples[:8]}{' ...' if len(samples) > 8 else ''}: " if len(reasons) > 1 else ""
            parts.append(f"{where}{text}{'; ' + hint if hint else ''}")
        gn = ""
        if sol.grad_norm is not None:
            constrained = isinstance(sol.multipliers, Multipliers)
            gn = f" ({'‖∇f + Jᵀν‖' if constrained else '‖∇f‖'} = {[f'{x:.2e}' for x in sol.grad_norm[idx[:4]].tolist()]}"
            if constrained and sol.multipliers.violation is not None:
                gn += f", constraint violation = {[f'{x:.2e}' for x in sol.multipliers.violation[idx[:4]].tolist()]}"
            gn += ")"
        msg = (
            f"the forward solve of {self.objective.describe()} did not converge for samples "
            f"{idx[:8]}{' ...' if len(idx) > 8 else ''}{gn}: {'. '.join(parts)}. Those samples get zero gradient."
        )
        facts = dict(samples=idx, statuses=[int(sol.status[i]) for i in idx] if sol.status is not None else [],
                     grad_norms=None if sol.grad_norm is None else sol.grad_norm[idx].tolist(), tol=tol)
        if self.on_nonconvergence == "raise" or bool(nonfinite.any()):
            raise ConvergenceError(msg.removesuffix(" Those samples get zero gradient."), **facts)
        warnings.warn(ConvergenceWarning(msg, **facts), stacklevel=_caller_stacklevel())

    # ------------------------------------------------------------------------ the backward
    def implicit_vjp(self, V: Tensor, mask: Tensor, sol: Solution, grad_u: Tensor, **inputs: Tensor) -> Tensor:
        """``dL/dV = −∂/∂V [wᵀ ∇_u f]`` with ``w = H⁻¹ grad_u`` for a stored solution of
        :meth:`solve` (``V`` validated, padded steps zero): the layer's backward over ``V``
        alone, without autograd around it; ``(B, T, …)``."""
        self._bind(tuple(inputs))
        problem = Problem(self.objective, V.detach().requires_grad_(True), mask,
                          {k: x.detach() for k, x in inputs.items()}, tuple(sol.u.shape[1:]), self.constraints)
        with torch.enable_grad():
            dV = self.implicit_grads(problem, sol, grad_u, {"V": problem.V})["V"]
        if dV is None:
            return torch.zeros_like(V)
        if not bool(mask.all()):
            dV = _zero_outside(mask, dV)
        return dV

    def implicit_grads(self, problem: Problem, sol: Solution, grad_u: Tensor, wrt: dict[str, Tensor],
                       *, create_graph: bool = False) -> dict[str, Tensor | None]:
        """``−∂/∂x [wᵀ ∇_u f]`` for every named tensor ``x`` of ``wrt``, with ``w = H⁻¹ grad_u``
        (flat ``(B, q)``); one strategy solve, one reverse pass. ``create_graph``: differentiable
        in everything (double backward)."""
        with _damping_hint(self.damping):
            return self._implicit_grads(problem, sol, grad_u, wrt, create_graph)

    def _implicit_grads(self, problem: Problem, sol: Solution, grad_u: Tensor, wrt: dict[str, Tensor],
                        create_graph: bool) -> dict[str, Tensor | None]:
        strategy = self.pick_strategy(problem, sol)
        if problem.constraints is not None:
            if create_graph:
                raise NotImplementedError("the backward of a constrained layer is not differentiable (no double backward)")
            return _constrained_grads(self, problem, sol, grad_u, wrt, strategy)
        B = problem.batch
        g = grad_u.reshape(B, -1)
        U = sol.u.reshape(B, -1)
        if not create_graph:
            # w needs no graph here: without no_grad the strategy's products on leaves that require
            # grad (V, inputs) were recorded for nothing (the vjp's own graph is the linearisation's
            # record, taken with grad enabled). At 2 × 50 × 64 rank pooling, 3.5 % of the call.
            with torch.no_grad():
                W, lin = self._inverse(problem, sol, strategy, g)
            return lin.vjp(-W, wrt)  # −∂/∂x[wᵀ∇f] = ∂/∂x[(−w)ᵀ∇f]: the sign on (B, q), not on each gradient
        problem, U, wrt, back = _widened(problem, sol, U, wrt)
        g = g.to(U.dtype)
        fixed = Problem(problem.objective, problem.V.detach(), problem.mask,
                        {k: x.detach() for k, x in problem.inputs.items()}, problem.q_shape)
        H0, keep = _minima_only(fixed.linearize(U.detach(), sol.state).hessian.shifted(self.damping), sol)
        with torch.no_grad():
            W0 = strategy.solve(H0, g.detach().to(H0.dtype)).to(g.dtype)
            W0 = W0 if keep is None else _zero_outside(keep, W0)
        lin = problem.linearize(U, None, create_graph=True)
        residual = lin.hessian.shifted(self.damping).matvec(W0) - g
        W = W0 - _Solve.apply(strategy, H0, residual)
        return back(lin.vjp(-W, wrt))

    def _inverse(self, problem: Problem, sol: Solution, strategy: Strategy, g: Tensor) -> tuple[Tensor, Linearization]:
        """``(H⁻¹ g, linearization at u*)``, flat ``(B, q)``: the forward's record and factorised
        Hessian where they are at these leaves, else a new linearization."""
        st = sol.state
        U = sol.u.reshape(problem.batch, -1)
        lin = getattr(st, "linearization", None)
        if lin is None or lin.V is not problem.V or any(lin.inputs.get(k) is not x for k, x in problem.inputs.items()):
            lin = problem.linearize(U.detach(), st)  # no record on these leaves to reuse
        H = lin.hessian
        if getattr(st, "hessian", None) is not None and not lin._own_hessian:
            H = st.hessian  # the forward's dense Hessian at this point, already factorised
        H, keep = _minima_only(H.shifted(self.damping), sol)
        # in the operator's dtype: an objective whose forward factorised in float64 (rank pooling)
        # hands over a float64 operator for float32 data, and w stays float64 for its mixed product
        W = strategy.solve(H, g.to(H.dtype))
        return (W if keep is None else _zero_outside(keep, W)), lin

    def implicit_tangent(self, problem: Problem, sol: Solution, tangents: dict[str, Tensor]) -> Tensor:
        """Forward mode: ``u̇ = −H⁻¹ Σ_x (∂∇_u f/∂x) ẋ`` for the named tangents (``"V"`` and keyword
        inputs), flat ``(B, q)``. The mixed product ``(∂∇_u f/∂x) ẋ`` is the transpose of the
        backward's ``x̄ = (∂∇_u f/∂x)ᵀ z``: the derivative in ``z`` of ``Σ_x ⟨x̄(z), ẋ⟩`` (two reverse
        passes over the objective's own mixed products)."""
        if problem.constraints is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: forward-mode AD through a constrained layer (a KKT solve) is not supported; "
                "use reverse mode (torch.autograd.grad, torch.autograd.functional.jacobian)")
        B = problem.batch
        U = sol.u.reshape(B, -1).detach()
        with torch.enable_grad():
            V = problem.V.detach().requires_grad_("V" in tangents)
            inputs = {k: x.detach().requires_grad_(k in tangents) for k, x in problem.inputs.items()}
            leaves = {"V": V, **inputs}
            wrt = {k: leaves[k] for k in tangents}
            prob = Problem(problem.objective, V, problem.mask, inputs, problem.q_shape)
            prob, U, wrt, back = _widened(prob, sol, U, wrt)
            lin = prob.linearize(U, None, create_graph=True)
            # any Z will do (the products are linear in it); a nonzero one tells a product that does not
            # depend on x (zero) from one that is not differentiable in Z (a closed form that detaches it)
            Z = torch.ones_like(U, requires_grad=True)
            parts = back(lin.vjp(Z, wrt))
            total = sum((x * tangents[k]).sum() for k, x in parts.items() if x is not None)
            mixed = None
            if isinstance(total, Tensor) and total.requires_grad:
                (mixed,) = torch.autograd.grad(total, Z, allow_unused=True)
        if mixed is None:
            if isinstance(total, Tensor) and bool(total != 0):
                raise RuntimeError(
                    f"{type(self).__name__}: forward mode differentiates the objective's mixed product "
                    f"(∂/∂x[wᵀ∇_u f]) in w, but {problem.objective.describe()}'s vjp/vjp_v is not differentiable in w "
                    "(it detaches it, or runs under no_grad); write it in differentiable torch operations, or use reverse mode")
            return torch.zeros_like(U, dtype=sol.u.dtype)
        with _damping_hint(self.damping):
            W, _ = self._inverse(problem, sol, self.pick_strategy(problem, sol), mixed)
        return -W.to(sol.u.dtype)


_FAR = 1e6
"""``‖u‖`` beyond this many times the data's largest entry (or 1) marks a failed solve that ran
away: its warning says the objective may have no minimiser."""

_HINTS = {
    MAX_ITER: "raise max_iter (or loosen tol, now {tol:g})",
    NO_DESCENT: "no step decreases f any more: loosen tol (now {tol:g}) or try another solver",
    NONFINITE: "check the objective where the solver starts (init=) and its domain",
    NOT_MINIMUM: "start elsewhere (init=) or regularise the objective",
    NOT_STATIONARY: "the solve does not minimise this objective (a constrained problem? declare eq=/ineq=)",
    INFEASIBLE: "check that the constraints can be met together, and the starting point (init=)",
}


def _widened(problem: Problem, sol: Solution, U: Tensor, wrt: dict[str, Tensor]):
    """``(problem, U, wrt, back)`` for a linearisation that differentiates afresh (double backward,
    forward mode): where the forward's state is ``wide`` (its solve ran in float64 for data of a
    lower precision, as rank pooling's does for ill-conditioned samples) the data, the floating
    keyword inputs and ``U`` are cast to float64 (differentiable casts; ``U`` takes the state's
    float64 value ``u`` and keeps its own graph), ``wrt`` names the casts, and ``back`` rounds
    the results to the dtypes of the tensors they are gradients of. Elsewhere, all unchanged."""
    st = sol.state
    if not getattr(st, "wide", False) or problem.V.dtype == torch.float64:
        return problem, U, wrt, lambda grads: grads
    wide = torch.float64
    V = problem.V.to(wide)
    inputs = {k: (x.to(wide) if x.is_floating_point() else x) for k, x in problem.inputs.items()}
    exact = getattr(st, "u", None)
    exact = U.detach().to(wide) if exact is None else exact.reshape(U.shape).to(wide)
    U = U.to(wide) + (exact - U.detach().to(wide))  # the value of u in float64, the graph of U
    leaves = {"V": V, **inputs}
    dtypes = {k: x.dtype for k, x in wrt.items()}
    wrt = {k: leaves.get(k, x) for k, x in wrt.items()}
    prob = Problem(problem.objective, V, problem.mask, inputs, problem.q_shape, problem.constraints)

    def back(grads: dict) -> dict:
        return {k: (x if x is None or k not in dtypes else x.to(dtypes[k])) for k, x in grads.items()}

    return prob, U, wrt, back


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside torch and this package: warnings point at
    the user's call, however deep the layer sits in a model."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if not (mod.startswith("torch") or mod.startswith("argminlayers") or mod.startswith("poolings")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _same(x: Tensor) -> Tensor:
    return x


def _changed_since(live: tuple, saved: tuple) -> bool:
    """Whether the saved tensors (as unpacked for the backward) hold other values than the live
    tensors the forward was given: never where they share memory (a live tensor modified in place
    is then refused by autograd's version check), only where saved-tensor hooks made copies."""
    for a, b in zip(live, saved):
        if a is b or not isinstance(a, Tensor) or not isinstance(b, Tensor):
            continue
        if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
            continue
        if a.shape != b.shape or not torch.equal(a, b.to(a.device)):
            return True
    return False


def _own_saved_tensors() -> Any:
    """The solver's own records keep their saved tensors as they are: identity hooks over any
    the caller set (``torch.utils.checkpoint``'s non-reentrant form, ``save_on_cpu``). Those
    records are differentiated inside the call, so the caller's hooks would run on every inner
    reverse pass: checkpoint recomputed the whole checkpointed region for each one (a BatchNorm
    in it counted 11 batches in one forward), and ``save_on_cpu`` would move every Hessian product
    to the CPU and back. The layer's own saved tensors (those of the autograd Function) still go
    through the caller's hooks. (Nothing where no hooks are set, or where hooks are disabled, as
    under a torch.func transform.)"""
    hooks = torch._C._autograd
    if not hooks._saved_tensors_hooks_is_enabled() or hooks._top_saved_tensors_default_hooks(False) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


def _outside_inference(call: Callable, V: Any, mask: Any, lengths: Any, inputs: dict, validated: bool) -> Any:
    """``call(V, mask, lengths, inputs, validated)`` with inference mode off, under ``no_grad``.

    Inference mode turns autograd off even where the solver and the checks turn it on again to
    differentiate ``f`` (its gradient and Hessian products), so inside it a record has no graph
    and ``f`` would look flat in ``u``. The solve runs as under ``no_grad`` instead, on normal
    copies of the inference tensors among its arguments (those cannot be saved for a reverse
    pass); the result is an ordinary tensor that needs no gradient."""

    def normal(x: Any) -> Any:
        return x.clone() if isinstance(x, Tensor) and x.is_inference() else x

    with torch.inference_mode(False), torch.no_grad():
        return call(normal(V), normal(mask), normal(lengths), {k: normal(x) for k, x in inputs.items()}, validated)


def _dense_pays(problem: Problem) -> bool:
    """Whether the dense Hessian is cheap enough for the default rule (see ``DENSE_MAX_WORK``)."""
    return problem.q <= DENSE_MAX_Q and problem.V.numel() * problem.q <= DENSE_MAX_WORK


def _auto_strategy(name: str) -> Strategy:
    if name not in _AUTO:
        _AUTO[name] = CG(preconditioner="jacobi") if name == "cg_jacobi" else get_strategy(name)
    return _AUTO[name]


_AUTO: dict[str, Strategy] = {}


def _leaves(V: Tensor, inputs: dict, track: bool) -> tuple[Tensor, dict]:
    """Detached copies of ``V`` and the inputs for the solve; leaves that require grad when the
    solve's records should carry a graph back to them (``track``)."""
    def leaf(x: Tensor) -> Tensor:
        x = x.detach()
        return x.requires_grad_(True) if track and x.is_floating_point() else x

    return leaf(V), {k: leaf(x) for k, x in inputs.items()}


def _check_shape(U: Any, B: int, V: Tensor, objective: Objective, where: str, inputs: dict | None = None) -> None:
    if not isinstance(U, Tensor):
        raise TypeError(f"{objective.describe()}.{where} must return a tensor (B, *q_shape), got {type(U).__name__}")
    if U.dim() == 0 or U.shape[0] != B:
        raise ValueError(
            f"{objective.describe()}.{where} returned shape {tuple(U.shape)}; it must be (B, *q_shape) with "
            f"B = {B}"
        )
    if U.dtype != V.dtype or U.device != V.device:
        # a keyword input, parameter, buffer or captured tensor of another dtype or device promotes f
        # and its derivatives: name it
        odd = lambda t: t.is_floating_point() and (t.dtype != V.dtype or t.device != V.device)  # noqa: E731
        given = [(n, t) for n, t in (inputs or {}).items() if isinstance(t, Tensor) and odd(t)]
        held = [(n, t) for n, t in (*objective.named_parameters(), *objective.named_buffers(),
                                    *objective.captured_tensors().items()) if odd(t)]
        hint = ""
        if given:
            n, t = given[0]
            hint = (f" (keyword input {n!r} is {t.dtype} on {t.device}, which promotes the objective's values: pass "
                    f"it as {n}={n}.to(V), or V to match)")
        elif held:
            n, t = held[0]
            hint = (f" (the objective's {n!r} is {t.dtype} on {t.device}, which promotes its values: move the layer "
                    f"with layer.to(V.dtype) / layer.to(V.device), or V to match)")
        raise ValueError(
            f"{objective.describe()}.{where} returned {U.dtype} on {U.device}; it must match V ({V.dtype} on "
            f"{V.device}){hint}"
        )


def _hidden_leaves(out: Tensor, known: set[int], stops: set[int]) -> list[Tensor]:
    """Leaf tensors requiring grad that ``out`` depends on, other than ``known`` ones
    (the walk stops at the graph nodes in ``stops``: known non-leaf tensors)."""
    hidden, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in known:
                hidden.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return hidden


@contextlib.contextmanager
def _bound_parameters(module: nn.Module, tensors: dict[str, Tensor]):
    """Temporarily make ``module``'s parameters the given tensors (by dotted name), where they differ."""
    swapped = []
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = owner._parameters.get(leaf)
        if current is not t:
            swapped.append((owner, leaf, current))
            owner._parameters[leaf] = t
    try:
        yield
    finally:
        for owner, leaf, current in swapped:
            owner._parameters[leaf] = current


def _check_captured(layer: ArgminLayer, call: "_Call", saved: tuple) -> dict[str, Tensor]:
    """The captured tensors that now refer to other tensors than in the forward pass: a plain
    tensor attribute of the objective (``self.C = C``) is returned, to be bound to the forward's
    tensor for the backward (a model that assigns it again before the backward, or the recompute
    of a non-reentrant checkpoint); anything else (a closure, a global) is refused."""
    if not call.captured:
        return {}
    now = layer._captured()
    changed = [n for n, t in zip(call.captured, saved) if now.get(n) is not t]
    objective = layer.objective
    attrs = {n: t for n, t in zip(call.captured, saved)
             if n in changed and (isinstance(objective.__dict__.get(n), Tensor) or n in objective._buffers)}
    rest = [n for n in changed if n not in attrs]
    if rest:
        raise RuntimeError(
            f"objective {objective.describe()} captures {rest}, which now refer to other tensors than in "
            "the forward pass, so their gradients cannot be computed; pass them as keyword inputs instead"
        )
    return attrs


@contextlib.contextmanager
def _bound_attributes(module: nn.Module, tensors: dict[str, Tensor]):
    """Temporarily make these tensor attributes (or buffers) of ``module`` the given tensors."""
    old = {}
    for name, t in tensors.items():
        where = module._buffers if name in module._buffers else module.__dict__
        old[name] = (where, where[name])
        where[name] = t
    try:
        yield
    finally:
        for name, (where, x) in old.items():
            where[name] = x


@dataclass
class _Call:
    """What one call hands its autograd Function besides tensors."""

    names: tuple[str, ...]  # keyword inputs, in order
    params: tuple[str, ...]  # parameters that require grad, in order
    captured: tuple[str, ...]  # captured tensors, in order
    validated: bool
    lengths: Any = None
    track: bool = False
    sol: Solution | None = None
    problem: Problem | None = None
    ok: Tensor | None = None
    mask: Tensor | None = None
    given: tuple = ()  # V and the keyword inputs the forward was given
    extra: dict = field(default_factory=dict)


def _minima_only(H: Any, sol: Solution) -> tuple[Any, Tensor | None]:
    """``(H, keep)``: where some samples did not converge (``keep``: those that did), ``H`` with
    the identity in their place (:meth:`~argminlayers.HessianOperator.masked`). They get no
    gradient; their own ``H`` (a saddle's, singular or indefinite) made dense, diagonal and
    Woodbury solves refuse the whole batch, the minima's gradients with it."""
    conv = sol.converged
    if conv is None or bool(conv.all()):
        return H, None
    return H.masked(conv), conv


def _sample_shapes(V: Tensor, U: Tensor, inputs: dict) -> tuple:
    """The per-sample shapes of a call (``v``, ``u``, each keyword input): when to probe again."""
    return (V.shape[1:], U.shape[1:], *((k, x.shape[1:]) for k, x in inputs.items()))


def _zero_outside(keep: Tensor, x: Tensor) -> Tensor:
    """``x`` where ``keep`` (a leading-dimensions bool, broadcast over the rest of ``x``), 0 elsewhere."""
    keep = keep.reshape(*keep.shape, *([1] * (x.dim() - keep.dim())))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


@contextlib.contextmanager
def _damping_hint(damping: float):
    """A strategy's :class:`SingularHessianError` advises ``damping=λ > 0``; where the layer has
    a damping already, the message says that it is set and not enough there."""
    try:
        yield
    except SingularHessianError as e:
        if damping <= 0 or "pass damping=" not in str(e):
            raise
        msg = re.sub(r"pass damping=λ > 0 to the layer.*$",
                     f"damping={damping:g} is set (the backward solves with H + λI) and is not enough there: "
                     "raise it, or check that the solution is a strict minimum", str(e))
        raise SingularHessianError(msg) from e


_NO_FUNC_TRANSFORMS = (
    "{name}: torch.func derivative transforms (grad, jacrev, jacfwd, hessian, jvp) over the layer are not "
    "supported; use torch.autograd.grad or torch.autograd.functional.jacobian/hessian with vectorize=False (reverse mode), "
    "torch.autograd.forward_ad (forward mode), and torch.func.vmap over the layer itself (it folds the mapped "
    "dimension into the batch)"
)


_NO_BATCHED = (
    "{name}: batched products through the layer (torch.autograd.functional.jacobian/hessian with vectorize=True, "
    "torch.autograd.grad with is_grads_batched=True) are not supported: the backward and the forward mode read "
    "values (checks, a solve), which no batched pass can; use vectorize=False (or one torch.autograd.grad call "
    "a product)"
)


def _refuse_batched(layer: nn.Module, *xs: Any) -> None:
    if any(isinstance(x, Tensor) and torch._C._functorch.is_legacy_batchedtensor(x) for x in xs):
        raise RuntimeError(_NO_BATCHED.format(name=type(layer).__name__))


class _ArgminFunction(torch.autograd.Function):
    """``(V, inputs…, parameters…, captured…) ↦ u*``: the solve, and the implicit backward."""

    @staticmethod
    def forward(layer: ArgminLayer, call: _Call, V: Tensor, mask: Any, *tensors: Tensor) -> Tensor:
        n_in = len(call.names)
        inputs = dict(zip(call.names, tensors[:n_in]))
        given = mask
        if call.validated:
            Vz = V
        else:
            mask = resolve_mask(V, mask, call.lengths, sequence=False)
            Vz = zero_padding(V, mask)
        if mask is given:  # the caller's own tensor: the backward reads it, so keep it as it is now
            mask = mask.clone()
        call.given = (V, *tensors[:n_in])
        check_inputs(inputs, Vz)
        with _own_saved_tensors():
            sol, problem = layer._solve(*_leaves(Vz, inputs, call.track), mask=mask, known=tensors[n_in:])
        call.sol, call.problem, call.mask = sol, problem, mask
        conv = sol.converged
        call.ok = None if conv is None or bool(conv.all()) else conv
        return sol.u.clone()  # a tensor of its own: the caller may modify it

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        layer, call, V, _, *tensors = inputs
        ctx.layer, ctx.call = layer, call
        ctx.save_for_backward(V, output, *tensors)

    @staticmethod
    def backward(ctx: Any, grad_u: Tensor):
        layer, call = ctx.layer, ctx.call
        V, U, *tensors = ctx.saved_tensors
        if torch._C._functorch.is_batchedtensor(grad_u) or torch._C._functorch.is_gradtrackingtensor(grad_u):
            raise RuntimeError(_NO_FUNC_TRANSFORMS.format(name=type(layer).__name__))
        _refuse_batched(layer, grad_u)
        needs = ctx.needs_input_grad
        need_v, need_t = bool(needs[2]), [bool(x) for x in needs[4:]]
        problem, mask = call.problem, call.mask
        n_in = len(call.names)
        if _changed_since(call.given, (V, *tensors[:n_in])):
            # saved-tensor hooks handed back the forward's values, and the live tensors were modified in
            # place since (allowed under such hooks): differentiate at the values of the forward pass
            Vz = V if call.validated else zero_padding(V, mask)
            problem = Problem(problem.objective, Vz, mask, dict(zip(call.names, tensors[:n_in])), problem.q_shape,
                              problem.constraints)
            call.problem = problem
        g = grad_u
        if call.ok is not None:  # samples that are not minima get no gradient (the warning said so)
            g = _zero_outside(call.ok, g)
        partial = _ImplicitPartials(layer, call, need_v, need_t)
        n_par = len(call.params)
        rebound = _check_captured(layer, call, tensors[n_in + n_par:])
        # the objective is evaluated with the parameters and captured attributes of the forward pass
        # (the same tensors, unless the forward ran under torch.func.functional_call or they were
        # swapped or assigned again since)
        with _bound_parameters(layer.objective, dict(zip(call.params, tensors[n_in:n_in + n_par]))), \
                _bound_attributes(layer.objective, rebound), _own_saved_tensors():
            twice = torch.is_grad_enabled()
            strategy = layer.pick_strategy(problem, call.sol)
            name = getattr(strategy, "name", repr(strategy))
            refuse = None
            if twice and problem.constraints is not None:
                refuse = ("the backward of a constrained layer (a KKT solve) is not differentiable, so its gradient "
                          "cannot be differentiated again (no second derivatives through constraints)")
            elif twice and not getattr(strategy, "exact", True):
                refuse = (f"backward={name!r} approximates H⁻¹, so the layer's gradient cannot be differentiated "
                          "again; use an exact strategy (dense, woodbury, sherman_morrison, cg) for second derivatives")
            elif twice and layer.damping > 0:
                refuse = (f"damping={layer.damping:g} back-propagates through (H + λI)⁻¹, an approximation of the "
                          "implicit gradient, so that gradient cannot be differentiated again; use damping=0 for "
                          "second derivatives")
            if refuse is not None:
                # first-order gradients now; differentiating them again raises (never zeros)
                with torch.no_grad():
                    first = partial(problem.V, U.detach(), g.detach(), *problem.inputs.values(), *tensors[n_in:])
                grads = [None if x is None else _RefuseTwice.apply(refuse, U, x) for x in first]
            elif twice:
                # Double backward: the partial derivatives at independent copies of (V, u*, g, inputs),
                # with their graphs; u* is the layer's output, so a second differentiation reaches the
                # layer again through it (the path through u* is the implicit one).
                Vb = V if call.validated else zero_padding(V, mask)
                grads = _Partial.apply(partial, 3 + n_in, Vb, U, g, *tensors)
            else:
                grads = partial(problem.V, U.detach(), g, *problem.inputs.values(), *tensors[n_in:])
        dV, *out = grads
        if dV is not None and not bool(mask.all()):
            dV = _zero_outside(mask, dV)
        return (None, None, dV, None, *out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any):
        """Forward mode (``torch.autograd.forward_ad``): ``u̇ = −H⁻¹ f_uv ẋ``. Tangents on parameters
        and captured tensors were refused by :meth:`ArgminLayer._call`; ``torch.func.jvp`` is refused here."""
        layer, call = ctx.layer, ctx.call
        if torch._C._functorch.maybe_current_level() is not None:
            raise RuntimeError(_NO_FUNC_TRANSFORMS.format(name=type(layer).__name__))
        _refuse_batched(layer, *tangents)
        _, _, dV, _, *dt = tangents
        tangents_in = {k: t for k, t in zip(call.names, dt) if t is not None}
        if dV is not None:
            tangents_in["V"] = _zero_outside(call.mask, dV)
        U = call.sol.u
        if not tangents_in:
            return torch.zeros_like(U)
        du = layer.implicit_tangent(call.problem, call.sol, tangents_in).reshape(U.shape)
        # samples that are not minima get no derivative (the warning said so)
        return du if call.ok is None else _zero_outside(call.ok, du)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, layer: ArgminLayer, call: _Call, V: Tensor, mask: Any, *tensors: Tensor):
        """``torch.func.vmap`` over the layer: the mapped dimension is folded into the batch."""
        n = info.batch_size
        d_v, d_m, *d_t = in_dims[2:]
        n_in = len(call.names)
        if any(d is not None for d in d_t[n_in:]):
            raise RuntimeError(
                f"{type(layer).__name__}: vmap over parameters or captured tensors of the objective is not "
                "supported (they are shared by every sample); pass per-sample values as keyword inputs"
            )

        def fold(x: Any, d: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            x = x.movedim(d, 0) if d is not None else x.unsqueeze(0).expand(n, *x.shape)
            return x.reshape(n * x.shape[1], *x.shape[2:])

        Vf = fold(V, d_v)
        lengths = call.lengths
        if isinstance(lengths, (list, tuple)):
            lengths = torch.as_tensor(lengths, device=Vf.device)
        if isinstance(lengths, Tensor):
            lengths = fold(lengths, None)
        mf = fold(mask, d_m) if isinstance(mask, Tensor) else mask
        if isinstance(mf, (list, tuple)):
            mf = fold(torch.as_tensor(mf, device=Vf.device), None)
        tf = [fold(t, d) if i < n_in else t for i, (t, d) in enumerate(zip(tensors, d_t))]
        inner = _Call(names=call.names, params=call.params, captured=call.captured, validated=call.validated,
                      lengths=lengths)
        U = _ArgminFunction.apply(layer, inner, Vf, mf, *tf)
        return U.reshape(n, U.shape[0] // n, *U.shape[1:]), 0


# ``Function.apply`` binds the forward's default arguments by ``inspect.signature`` on every call
# (a Function with ``setup_context``); a signature of its own is found at once (about 10–25 µs a
# call; 23 µs of a 640 µs RankPool call at 2 × 50 × 64, measured without and with it)
_ArgminFunction.forward.__signature__ = inspect.signature(_ArgminFunction.forward)


class _ImplicitPartials:
    """``(V, u, g, inputs…, parameters…, captured…) ↦ −∂/∂x [wᵀ ∇_u f]`` with ``w = H⁻¹ g``, for
    ``x`` ∈ ``(V, inputs…, parameters…, captured…)`` (``None`` where not asked for), holding ``u``
    fixed: the partial derivatives of the implicit backward."""

    def __init__(self, layer: ArgminLayer, call: _Call, need_v: bool, need_t: list[bool]):
        self.layer, self.call, self.need_v, self.need_t = layer, call, need_v, need_t

    def __call__(self, V: Tensor, U: Tensor, g: Tensor, *tensors: Tensor, create_graph: bool = False) -> list:
        call, need_t = self.call, self.need_t
        n_in, n_par = len(call.names), len(call.params)
        with torch.enable_grad():
            # the solve's own leaves when they track a graph (the record is then reused), else new ones
            reuse = create_graph or (call.track and V.requires_grad)
            Vb = V if reuse else V.detach().requires_grad_(self.need_v)
            inputs = {}
            for i, (k, x) in enumerate(zip(call.names, tensors[:n_in])):
                inputs[k] = x if reuse else x.detach().requires_grad_(need_t[i] and x.is_floating_point())
            wrt: dict[str, Tensor] = {"V": Vb} if self.need_v else {}
            keys: dict[int, str] = {}  # position in `tensors` → name in `wrt`
            for i, t in enumerate(tensors):
                if not need_t[i]:
                    continue
                if i < n_in:
                    key, x = call.names[i], inputs[call.names[i]]
                elif i < n_in + n_par:
                    key, x = call.params[i - n_in], t
                else:
                    key, x = "captured:" + call.captured[i - n_in - n_par], t
                wrt[key], keys[i] = x, key
            prob = Problem(self.layer.objective, Vb, call.mask, inputs, call.problem.q_shape, call.problem.constraints)
            sol = call.sol
            if create_graph:
                sol = Solution(U, converged=sol.converged, state=sol.state, status=sol.status,
                               multipliers=sol.multipliers)
            grads = self.layer.implicit_grads(prob, sol, g, wrt, create_graph=create_graph)
        out: list[Tensor | None] = [grads.get("V") if self.need_v else None] + [None] * len(tensors)
        for i, key in keys.items():
            out[1 + i] = grads.get(key)
        return out


class _Partial(torch.autograd.Function):
    """Runs :class:`_ImplicitPartials` at independent leaf copies of its first ``n_leaf``
    arguments (the others, parameters and captured tensors, are read by the objective in place)
    and back-propagates through what it recorded: the gradients of the implicit backward."""

    @staticmethod
    def forward(ctx: Any, fn: _ImplicitPartials, n_leaf: int, *args: Tensor):
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(a.is_floating_point()) for a in args[:n_leaf]]
            ins = [*leaves, *args[n_leaf:]]
            V, U, g, *tensors = ins
            outs = fn(V, U, g, *tensors, create_graph=True)
        ctx.ins, ctx.outs = ins, outs
        ctx.save_for_backward(*args)
        return tuple(o.detach() if o is not None else None for o in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor):
        pairs = [(o, gr) for o, gr in zip(ctx.outs, grads) if o is not None and gr is not None and o.requires_grad]
        diff = [x for x in ctx.ins if isinstance(x, Tensor) and x.requires_grad]
        res: dict[int, Tensor | None] = {}
        if pairs and diff:
            outs, cot = [o for o, _ in pairs], [gr for _, gr in pairs]
            if torch.is_grad_enabled():
                # A graph of this backward: exact in the cotangents (it is linear in them: what the
                # double-backward trick of torch.autograd.functional.hvp/jvp differentiates), refused in
                # the layer's inputs (a third derivative: the second-order record is exact to first
                # order only, see ArgminLayer.implicit_grads)
                got = _Cotangent.apply((outs, diff), *cot)
                anchors = [a for a in ctx.saved_tensors if isinstance(a, Tensor) and a.requires_grad]
                if anchors:
                    zero = _RefuseThird.apply(*anchors)
                    got = tuple(x + zero for x in got)
            else:
                with torch.enable_grad():
                    got = torch.autograd.grad(outs, diff, cot, allow_unused=True, retain_graph=True)
            res = {id(x): gx for x, gx in zip(diff, got)}
        return (None, None, *[res.get(id(x)) for x in ctx.ins])


_THIRD = ("third derivatives through an ArgminLayer are not supported: its second-order backward is exact to "
          "first order (first and second derivatives, Hessian-vector products by torch.autograd.functional.hvp/vhp "
          "and hessian are exact); differentiate the layer at most twice")


class _Cotangent(torch.autograd.Function):
    """``c ↦ Jᵀ c`` for the record ``(outs, ins)`` of a :class:`_Partial` (``J = ∂outs/∂ins``), as a
    function of the cotangents ``c`` alone. It is linear, so its backward is ``c' ↦ J c'``: the
    reverse pass of ``Jᵀ z`` (recorded) differentiated in ``z``."""

    @staticmethod
    def forward(ctx: Any, record: tuple, *cot: Tensor):
        outs, ins = record
        ctx.record = record
        got = torch.autograd.grad(outs, ins, cot, allow_unused=True, retain_graph=True)
        return tuple(torch.zeros_like(x) if gx is None else gx for x, gx in zip(ins, got))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor):
        outs, ins = ctx.record
        with torch.enable_grad():
            z = [torch.zeros_like(o, requires_grad=True) for o in outs]
            t = torch.autograd.grad(outs, ins, z, allow_unused=True, retain_graph=True, create_graph=True)
            pairs = [(ti, gi) for ti, gi in zip(t, grads) if ti is not None and gi is not None and ti.requires_grad]
            Jc = (torch.autograd.grad([ti for ti, _ in pairs], z, [gi for _, gi in pairs], allow_unused=True)
                  if pairs else [None] * len(z))
        Jc = [torch.zeros_like(o) if x is None else x for o, x in zip(outs, Jc)]
        if torch.is_grad_enabled():  # (a further derivative: refused, never zeros)
            Jc = [_RefuseTwice.apply(_THIRD, x, x) for x in Jc]
        return (None, *Jc)


class _RefuseThird(torch.autograd.Function):
    """A zero that depends on the layer's inputs: the part of a graph of the second-order backward
    that leads back to them. The engine runs its backward only where a derivative with respect to
    those inputs is asked for (a third derivative), and it raises there."""

    @staticmethod
    def forward(ctx: Any, *anchors: Tensor) -> Tensor:
        return anchors[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        raise RuntimeError(_THIRD)


class _RefuseTwice(torch.autograd.Function):
    """Identity on a first-order gradient whose backward is not differentiable (an approximate
    strategy, a constrained layer); differentiating it again raises ``reason``, so a second
    derivative is never silently wrong."""

    @staticmethod
    def forward(ctx: Any, reason: str, anchor: Tensor, x: Tensor) -> Tensor:
        ctx.reason = reason
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        raise RuntimeError(ctx.reason)


class _Solve(torch.autograd.Function):
    """``x ↦ H⁻¹ x`` by a strategy, for a fixed (detached) Hessian; its backward is the same
    solve (``H`` is symmetric). Carries the derivative of ``H⁻¹ g`` in double backward."""

    @staticmethod
    def forward(ctx: Any, strategy: Strategy, H: Any, x: Tensor) -> Tensor:
        ctx.strategy, ctx.H = strategy, H
        return strategy.solve(H, x.to(H.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        if torch.is_grad_enabled():  # differentiable in grad (the same linear map), for a graph of this backward
            return None, None, _Solve.apply(ctx.strategy, ctx.H, grad)
        with torch.no_grad():
            return None, None, ctx.strategy.solve(ctx.H, grad.to(ctx.H.dtype)).to(grad.dtype)
