"""Constraints of an argmin layer, ``h(v, u) = 0`` and ``g(v, u) ≤ 0``, and the KKT conditions.

The layer computes::

    u*(v, θ) = argmin_u f(v, u, θ)   subject to   h(v, u, θ) = 0   (m values)
                                                  g(v, u, θ) ≤ 0   (k values)

**Forward.** A constrained solver (:class:`~argminlayers.interior_point.InteriorPoint`) or the
objective's own ``solve`` returns ``u*`` and the multipliers ``(λ*, μ*)``; an own solve without
multipliers gets them by least squares on the active constraints (``min ‖∇f + J_Aᵀν‖``). The
point is checked either way: KKT residual ``‖∇_u L‖``, constraint violation, signs of ``μ`` and
complementarity, reported per sample in :class:`Multipliers`.

**Backward.** At a regular KKT point, with ``A = {i : g_i = 0}`` the active inequalities,
``c = (h, g_A)`` and ``ν = (λ, μ_A)`` (``r = m + |A|`` values), ``L = f + νᵀc``,
``H = ∇²_uu L`` and ``J = ∂c/∂u`` (``r × q``), the implicit function theorem applied to
``∇_u L = 0, c = 0`` gives, for the upstream gradient ``g = dℓ/du*``::

    [H  Jᵀ] [w]   [g]
    [J  0 ] [z] = [0]                                   (a KKT strategy, see kkt.py)

    dℓ/dθ = −∂/∂θ [ wᵀ ∇_u L(v, u, ν, θ) + zᵀ c(v, u, θ) ]   at (u*, ν*)

for ``θ`` ∈ {``V``, keyword inputs, parameters}: one reverse pass, as for unconstrained layers,
with no ``f_uv`` or ``c_uv`` matrix built. ``∇_u L`` and ``c`` are recorded once at ``u*``
(:class:`KKTLinearization`), and the same record serves the Hessian–vector products of ``H``.

**Degenerate points** are reported, not silently differentiated:

- a weakly active inequality (``g_i = 0`` and ``μ_i = 0``): ``u*`` is only one-sidedly
  differentiable there. It is treated as active (the derivative for perturbations that keep it
  active, the convention of ``relu'(0) = 0``), and a :class:`~argminlayers.DegeneracyWarning`
  names the samples;
- linearly dependent active constraint gradients (rows of ``J``): the multipliers are not
  unique, and the backward raises :class:`~argminlayers.DegenerateConstraintError`;
- ``H`` not positive definite on the tangent space ``null(J)``: not a strict minimum; the
  forward reports it (``NOT_MINIMUM``) and the backward raises
  :class:`~argminlayers.SingularHessianError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .errors import DegeneracyWarning
from .hessian import AutogradHessian, HessianOperator
from .linalg import batched_vjp
from .objective import CONVERGED, NOT_STATIONARY, Objective, Solution, SolverState, _Signature, vmap_call

_METHODS = {"eq": "equality_constraints", "ineq": "inequality_constraints"}
_WHAT = {"eq": "equality constraint h(v, u) = 0", "ineq": "inequality constraint g(v, u) ≤ 0"}


@dataclass
class Multipliers:
    """Lagrange multipliers of a constrained solution, and its KKT report.

    Attributes:
        eq: ``(B, m)`` multipliers ``λ`` of the equalities.
        ineq: ``(B, k)`` multipliers ``μ ≥ 0`` of the inequalities (zero where inactive).
        active: ``(B, k)`` bool, the inequalities the backward treats as active (``g_i = 0``).
        weakly_active: ``(B, k)`` bool, active inequalities with ``μ_i ≈ 0`` (degenerate).
        kkt_residual: ``(B,)`` ``‖∇_u f + Jᵀν‖``.
        violation: ``(B,)`` ``max(max_i |h_i|, max_i g_i₊)``.
    """

    eq: Tensor
    ineq: Tensor
    active: Tensor | None = None
    weakly_active: Tensor | None = None
    kkt_residual: Tensor | None = None
    violation: Tensor | None = None

    def stacked(self) -> Tensor:
        """``(λ, μ)``, ``(B, m + k)``."""
        return torch.cat((self.eq, self.ineq), dim=-1)

    def select(self, idx: Tensor) -> "Multipliers":
        """The samples ``idx`` of the batch."""
        return Multipliers(*(None if x is None else x[idx] for x in (self.eq, self.ineq, self.active,
                                                                      self.weakly_active, self.kkt_residual,
                                                                      self.violation)))


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(check, zero)``: the relative KKT tolerance of an own solve's check (1e-6 in float64, 1e-3 in
    float32), and ``1000 ε``, below which ``g_i`` and ``μ_i`` (relative to ``max(1, ‖u‖∞)`` and
    ``max(1, ‖∇f‖∞)``) count as zero when the inequalities are classified."""
    return (1e-6 if dtype == torch.float64 else 1e-3), 1e3 * torch.finfo(dtype).eps


# ------------------------------------------------------------------------------- declaration
class _Part:
    """The equalities or the inequalities of a layer: a plain function ``fn(v, u[, mask], **inputs)``
    or the objective's per-sample method (``equality_constraints`` / ``inequality_constraints``),
    with its optional batched fast path (``batched_equality_constraints`` / ...)."""

    def __init__(self, kind: str, fn: Callable[..., Tensor] | None = None, objective: Objective | None = None):
        self.kind = kind
        self.size: int | None = None
        self.names: tuple[str, ...] | None = None  # keyword inputs it takes; None: all of them
        if fn is not None:
            if isinstance(fn, type) or not callable(fn):
                raise TypeError(f"{kind} must be a function {kind}(v, u) or {kind}(v, u, mask) returning one value per "
                                f"{_WHAT[kind]}, got {type(fn).__name__}")
            if isinstance(fn, nn.Module) and any(p.requires_grad for p in fn.parameters()):
                raise TypeError(
                    f"{kind}= is a module with parameters, which the layer cannot route gradients to; define the "
                    f"constraints as {_METHODS[kind]}(v, u, mask) of an Objective subclass, whose parameters are the "
                    "layer's own"
                )
            self.fn = fn
            self.name = f"{kind}={getattr(fn, '__name__', None) or type(fn).__name__}"
            self.signature: _Signature | None = _Signature(fn, self.name, what="constraint function")
            self.uses_mask = self.signature.positional >= 3
            self.batched = None
        else:
            self.fn = getattr(objective, _METHODS[kind])
            self.name = f"{objective.describe()}.{_METHODS[kind]}"
            self.signature, self.uses_mask = None, True
            self.batched = getattr(objective, "batched_" + _METHODS[kind], None)

    def bind(self, input_names: tuple[str, ...]) -> None:
        if self.signature is None:
            return
        self.names = tuple(n for n in input_names if self.signature.accepts(n))
        self.uses_mask = self.signature.takes_mask(self.names)
        self.signature.check_inputs(self.names)

    def accepts(self, name: str) -> bool:
        return self.signature is None or self.signature.accepts(name)

    def one(self, v: Tensor, u: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        if self.names is not None:
            inputs = {k: inputs[k] for k in self.names}
        out = self.fn(v, u, **inputs) if not self.uses_mask else self.fn(v, u, mask, **inputs)
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name} must return a tensor of shape (n,) per sample, got {type(out).__name__}")
        return out

    def values(self, V: Tensor, U: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        """``(B, n)``: ``vmap`` of the per-sample function (no transform for ``B = 1``), or the fast path."""
        B = V.shape[0]
        if self.batched is not None:
            out = self.batched(V, U, mask, **inputs)
            per_sample = None if not isinstance(out, Tensor) else tuple(out.shape[1:])
        elif B == 1:
            out = self.one(V[0], U[0], mask[0], {k: x[0] for k, x in inputs.items()})
            per_sample = None if not isinstance(out, Tensor) else tuple(out.shape)
            out = out.reshape(1, -1) if per_sample is not None and len(per_sample) <= 1 else out
        else:
            names = tuple(inputs)

            def one(v, u, m, *xs):
                return self.one(v, u, m, dict(zip(names, xs)))

            out = vmap_call(one, V, U, mask, *inputs.values())
            per_sample = tuple(out.shape[1:])
            if len(per_sample) == 0:
                out = out.unsqueeze(-1)
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name} must return a tensor of shape (n,) per sample, got {type(out).__name__}")
        if per_sample is None or len(per_sample) > 1 or out.dim() != 2 or out.shape[0] != B:
            where = "(B, n) for the batch" if self.batched is not None else "(n,) per sample (or a scalar)"
            raise ValueError(f"{self.name} must return shape {where}, got {per_sample if per_sample is not None else '?'}"
                             f" per sample ({tuple(out.shape)} in all)")
        if out.dtype != U.dtype:
            raise ValueError(f"{self.name} returned {out.dtype}; it must match u ({U.dtype})")
        self.size = out.shape[1]  # of the last evaluation (it may depend on the shapes of the call)
        return out


class ConstraintSet:
    """The constraints of one layer: ``h(v, u) = 0`` and ``g(v, u) ≤ 0``, as ``c = (h, g)``, ``(B, m + k)``.

    Made by :meth:`of` from the ``eq=``/``ineq=`` functions of the layer, or from the objective's
    own per-sample methods ``equality_constraints(v, u, mask, **inputs) -> (m,)`` and
    ``inequality_constraints(v, u, mask, **inputs) -> (k,)``, with optional batched fast paths
    ``batched_equality_constraints(V, U, mask, **inputs) -> (B, m)`` (and likewise).

    An objective may also declare ``linear_constraints = True`` (``∇²c = 0``, so the Lagrangian
    Hessian is its own ``hessian``, structure kept) or define
    ``lagrangian_hessian(V, U, mask, nu, state, **inputs) -> HessianOperator``, the Hessian of
    ``L = f + νᵀc`` with ``nu: (B, m + k)``.
    """

    def __init__(self, objective: Objective, eq: Callable[..., Tensor] | None = None,
                 ineq: Callable[..., Tensor] | None = None):
        self.objective = objective
        parts = {}
        for kind, fn in (("eq", eq), ("ineq", ineq)):
            own = callable(getattr(objective, _METHODS[kind], None))
            if fn is not None and own:
                raise TypeError(f"{objective.describe()} defines {_METHODS[kind]} itself; do not pass {kind}= as well")
            if fn is not None:
                parts[kind] = _Part(kind, fn)
            elif own:
                parts[kind] = _Part(kind, objective=objective)
        self.eq, self.ineq = parts.get("eq"), parts.get("ineq")
        self.linear = bool(getattr(objective, "linear_constraints", False))
        self._padding_checked = False

    @classmethod
    def of(cls, objective: Objective, eq: Any = None, ineq: Any = None) -> "ConstraintSet | None":
        """The constraints of a layer, or ``None`` when it has none."""
        if eq is None and ineq is None and not any(callable(getattr(objective, m, None)) for m in _METHODS.values()):
            return None
        return cls(objective, eq, ineq)

    def __repr__(self) -> str:
        parts = [p.name for p in (self.eq, self.ineq) if p is not None]
        return f"ConstraintSet({', '.join(parts)})"

    @property
    def parts(self) -> list[_Part]:
        return [p for p in (self.eq, self.ineq) if p is not None]

    @property
    def m(self) -> int:
        """Number of equalities (known after the first evaluation)."""
        return 0 if self.eq is None else (self.eq.size or 0)

    @property
    def k(self) -> int:
        """Number of inequalities (known after the first evaluation)."""
        return 0 if self.ineq is None else (self.ineq.size or 0)

    def bind(self, input_names: tuple[str, ...]) -> None:
        """Give each plain function the keyword inputs its signature names."""
        for p in self.parts:
            p.bind(input_names)

    def accepted(self, input_names: tuple[str, ...]) -> tuple[str, ...]:
        """The inputs that some constraint function takes."""
        return tuple(n for n in input_names if any(p.accepts(n) for p in self.parts))

    def values(self, V: Tensor, U: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        """``c = (h, g)`` at ``U: (B, *q_shape)``, ``(B, m + k)``."""
        outs = [p.values(V, U, mask, inputs) for p in self.parts]
        if not outs:
            return U.new_zeros(U.shape[0], 0)
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def check_padding(self, problem: Any, U: Tensor) -> None:
        """A constraint function that takes no mask must not read the padded steps of ``v``: checked
        once per constraint set, at the first call with padding, by moving the padded steps."""
        if self._padding_checked or bool(problem.mask.all()):
            return
        blind = [p for p in self.parts if not p.uses_mask]
        self._padding_checked = True
        if not blind:
            return
        V, mask = problem.V, problem.mask
        pad = (~mask).reshape(*mask.shape, *([1] * (V.dim() - 2))).to(V.dtype)
        with torch.no_grad():
            for p in blind:
                a = p.values(V, U, mask, problem.inputs)
                b = p.values(V + pad, U, mask, problem.inputs)
                if not torch.equal(a, b):
                    raise ValueError(
                        f"{p.name} takes no mask but reads the padded steps of v (its values change with them); "
                        f"write it as {p.kind}(v, u, mask) and leave padded steps out"
                    )

    def split(self, C: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, g)`` of ``c = (h, g)`` (last dimension; after the first evaluation, which sets ``m``)."""
        return C[..., : self.m], C[..., self.m:]

    # ---- the KKT conditions at a solution ----------------------------------------------
    def linearize(self, problem: Any, U: Tensor, nu: Tensor, state: Any = None) -> "KKTLinearization":
        """The Lagrangian ``f + νᵀc`` at flat ``U: (B, q)`` with multipliers ``nu: (B, m + k)``."""
        return KKTLinearization(problem, U, nu, state)

    def report(self, problem: Any, U: Tensor, lam: Tensor | None = None, mu: Tensor | None = None,
               state: Any = None) -> tuple[Multipliers, Tensor]:
        """The KKT report of flat ``U``: multipliers (least squares on the active set where not given),
        classification of the inequalities, residual, violation, and ``consistent`` ``(B,)``
        (multipliers of active inequalities ≥ 0, zero on inactive ones)."""
        B = U.shape[0]
        zero = U.new_zeros(B, 0)
        kl = KKTLinearization(problem, U, None, state)
        C = kl.values
        h, g = self.split(C)
        m, k = h.shape[1], g.shape[1]
        gf = kl.objective_terms[1]
        _, tau = _tolerances(U.dtype)
        tau_g = tau * U.abs().amax(-1).clamp_min(1.0)  # (B,)
        tau_mu = tau * gf.abs().amax(-1).clamp_min(1.0)
        near = g >= -tau_g.unsqueeze(-1)  # (B, k)
        given = lam is not None and mu is not None
        if given:
            cand = near | (mu > tau_mu.unsqueeze(-1))
        else:
            cand = near
        active_rows = torch.cat((torch.ones(B, m, dtype=torch.bool, device=U.device), cand), dim=-1)
        rows, valid = compact(active_rows)
        J = kl.jacobian(rows, valid)  # (B, r, q)
        if not given:
            # ν = argmin ‖∇f + J_Aᵀ ν‖ (minimum norm where J_A is rank deficient)
            nu_a = -torch.linalg.lstsq(J.transpose(1, 2), gf.unsqueeze(-1)).solution.squeeze(-1)
            nu_a = torch.where(valid, nu_a, torch.zeros_like(nu_a))
            nu = scatter_rows(nu_a, rows, valid, m + k)
            lam, mu = self.split(nu)
        else:
            nu_a = torch.cat((lam, mu), -1).gather(1, rows) * valid
        residual = (gf + torch.bmm(nu_a.unsqueeze(1), J).squeeze(1)).norm(dim=-1)
        weakly = near & (mu.abs() <= tau_mu.unsqueeze(-1))
        negative = (mu < -tau_mu.unsqueeze(-1)) & cand
        slack = (mu.abs() > tau_mu.unsqueeze(-1)) & ~cand
        consistent = ~(negative | slack).any(-1)
        mu = torch.where(cand, mu, torch.zeros_like(mu))
        viol = torch.cat((h.abs(), g.clamp_min(0)), -1)
        violation = viol.amax(-1) if viol.shape[1] else zero.new_zeros(B)
        mult = Multipliers(lam if m else zero, mu, active=cand, weakly_active=weakly & cand,
                           kkt_residual=residual, violation=violation)
        return mult, consistent

    def check(self, problem: Any, sol: Solution) -> Solution:
        """An objective's own solve, checked: KKT residual ``‖∇f + Jᵀν‖ ≤ tol · max(1, ‖∇f‖)``,
        violation ``≤ tol · max(1, ‖u‖)``, multipliers of the right signs (``tol``: 1e-6 in
        float64, 1e-3 in float32). Multipliers are estimated when the solve gives none."""
        U = sol.u.reshape(problem.batch, -1)
        lam = mu = None
        if isinstance(sol.multipliers, Multipliers):
            lam, mu = sol.multipliers.eq, sol.multipliers.ineq
        inner = sol.state
        mult, consistent = self.report(problem, U, lam, mu, inner)
        tol, _ = _tolerances(U.dtype)
        gf = problem.linearize(U, inner, second_order=False).grad.norm(dim=-1)
        ok = (torch.isfinite(mult.kkt_residual) & (mult.kkt_residual <= tol * gf.clamp_min(1.0))
              & (mult.violation <= tol * U.norm(dim=-1).clamp_min(1.0)) & consistent)
        if sol.converged is not None:
            ok = ok & sol.converged
        status = torch.where(ok, CONVERGED, NOT_STATIONARY)
        if sol.status is not None:
            status = torch.where(ok, status, torch.where(sol.status == CONVERGED, status, sol.status))
        return Solution(sol.u, converged=ok, iterations=sol.iterations, grad_norm=mult.kkt_residual, state=sol.state,
                        status=status, multipliers=mult)

    def warn_degenerate(self, sol: Solution, name: str) -> None:
        """A :class:`~argminlayers.DegeneracyWarning` for converged samples with weakly active inequalities."""
        mult = sol.multipliers
        if not isinstance(mult, Multipliers) or mult.weakly_active is None or mult.weakly_active.shape[1] == 0:
            return
        weak = mult.weakly_active.any(-1)
        if sol.converged is not None:
            weak = weak & sol.converged
        if not bool(weak.any()):
            return
        idx = weak.nonzero().flatten().tolist()
        which = mult.weakly_active[idx[0]].nonzero().flatten().tolist()
        from .layer import _caller_stacklevel

        warnings.warn(
            f"the solution of {name} is degenerate for samples {idx[:8]}{' ...' if len(idx) > 8 else ''}: inequalities "
            f"{which[:8]} of sample {idx[0]} are weakly active (g_i = 0 with multiplier μ_i = 0), where u* is only "
            "one-sidedly differentiable; the gradient treats them as active (see docs/constraints.md)",
            DegeneracyWarning, stacklevel=_caller_stacklevel(),
        )

    def active_rows(self, sol: Solution, B: int, device: torch.device) -> Tensor:
        """``(B, m + k)`` bool: the constraints of the backward (every equality, the active inequalities)."""
        mult = sol.multipliers
        eq = torch.ones(B, mult.eq.shape[1], dtype=torch.bool, device=device)
        act = mult.active if mult.active is not None else (mult.ineq > 0)
        return torch.cat((eq, act), dim=-1)


# ---------------------------------------------------------------------------- index helpers
def compact(active: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, valid)``, both ``(B, r)`` with ``r`` the largest count: the indices of the ``True``
    entries of ``active: (B, n)`` first, in order, padded (``valid`` False) to ``r``."""
    B, n = active.shape
    counts = active.sum(-1)
    r = int(counts.max()) if B and n else 0
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, :r]
    valid = torch.arange(r, device=active.device).unsqueeze(0) < counts.unsqueeze(-1)
    return order, valid


def scatter_rows(x: Tensor, rows: Tensor, valid: Tensor, n: int) -> Tensor:
    """Values ``x: (B, r)`` at ``rows`` back into ``(B, n)`` (zero elsewhere)."""
    out = x.new_zeros(x.shape[0], n)
    return out.scatter_add(1, rows, torch.where(valid, x, torch.zeros_like(x)))


# ------------------------------------------------------------------------------ linearization
class SumHessian(HessianOperator):
    """``A + B`` of two operators (the objective's Hessian and the constraints' curvature ``Σ ν_i ∇²c_i``)."""

    def __init__(self, a: HessianOperator, b: HessianOperator):
        super().__init__(a.batch, a.q, a.dtype, a.device)
        self.a, self.b = a, b

    def matvec(self, x: Tensor) -> Tensor:
        return self.a.matvec(x) + self.b.matvec(x)

    def dense(self) -> Tensor:
        return self.a.dense() + self.b.dense()

    def diagonal(self) -> Tensor:
        return self.a.diagonal() + self.b.diagonal()


class KKTLinearization:
    """The Lagrangian ``L = f + νᵀc`` at one point ``(U, ν)``: ``∇_u L``, the operator ``∇²_uu L``,
    the constraint values and Jacobian rows, and the mixed product of the backward pass.

    ``f``'s part comes from the objective's :class:`~argminlayers.Linearization` (its fast paths
    are used); the constraints' part from one record of ``c(U)`` and ``G_c = ∇_U Σ_b ν_b·c_b``
    with ``create_graph``, at the same leaf as ``f``'s record when ``f`` has no Hessian of its
    own (then ``H x`` is one replayed reverse pass through both). The multipliers may be set
    after the values and the Jacobian are read, before the Hessian (the solver estimates them from
    the Jacobian).

    Args:
        U: flat ``(B, q)``.
        nu: ``(B, m + k)`` multipliers (zero for inactive inequalities), or ``None`` (all zero).
        state: the objective's own state of the solve (handed to its fast paths).
    """

    def __init__(self, problem: Any, U: Tensor, nu: Tensor | None, state: Any = None):
        self.problem, self.U, self.state = problem, U, state
        self.cons: ConstraintSet = problem.constraints
        self.lin = problem.linearize(U, None if isinstance(state, SolverState) else state)
        self._nu = nu
        obj = problem.objective
        cls = type(obj)
        self._joint = cls.hessian is Objective.hessian and cls.hvp is Objective.hvp
        self._record: tuple[Tensor, Tensor] | None = None
        self._gc: Any = None
        self._hessian: HessianOperator | None = None

    @property
    def nu(self) -> Tensor:
        """The multipliers ``(B, m + k)``; they may be set until the Hessian or ``∇_u L`` is first used."""
        if self._nu is None:
            self._nu = self.U.new_zeros(self.U.shape[0], self.record()[1].shape[1])
        return self._nu

    @nu.setter
    def nu(self, value: Tensor) -> None:
        if self._hessian is not None or self._gc is not None:
            raise RuntimeError("the multipliers of a KKTLinearization are fixed once its Hessian or gradient is used")
        self._nu = value

    def record(self) -> tuple[Tensor, Tensor]:
        """``(Ur, C)``: the point (a leaf; ``f``'s own record's when ``f`` has no Hessian of its own) and
        ``c(Ur)`` ``(B, m + k)`` with its graph."""
        if self._record is None:
            p = self.problem
            with torch.enable_grad():
                Ur = self.lin.record()[1] if self._joint else p.shaped(self.U).detach().requires_grad_(True)
                C = self.cons.values(p.V, Ur, p.mask, p.inputs)
            self._record = (Ur, C)
        return self._record

    @property
    def objective_terms(self) -> tuple[Tensor, Tensor]:
        """``(f, ∇_u f)``, ``(B,)`` and flat ``(B, q)``, from the same record as the constraints."""
        self.record()
        return self.lin.value, self.lin.grad

    def constraint_gradient(self) -> Tensor | None:
        """``G_c = ∇_U Σ_b ν_b·c_b`` with its graph, ``(B, *q_shape)`` (``None`` when ``c`` does not depend on ``u``)."""
        if self._gc is None:
            Ur, C = self.record()
            if C.requires_grad and C.shape[1]:
                with torch.enable_grad():
                    (self._gc,) = torch.autograd.grad((C * self.nu).sum(), Ur, create_graph=True, retain_graph=True,
                                                      allow_unused=True)
            if self._gc is None:
                self._gc = False  # computed: nothing there
        return self._gc if self._gc is not False else None

    @property
    def values(self) -> Tensor:
        """``c = (h, g)``, ``(B, m + k)``, detached."""
        return self.record()[1].detach()

    def jacobian(self, rows: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """Rows of ``J = ∂c/∂u``: all ``m + k`` (``rows=None``), or ``rows: (B, r)`` indices with
        ``valid: (B, r)`` (invalid rows zero); ``(B, r, q)``, one batched reverse pass."""
        Ur, C = self.record()
        B, n = C.shape
        q = self.U.shape[1]
        if rows is None:
            E = torch.eye(n, dtype=C.dtype, device=C.device).unsqueeze(1).expand(n, B, n)
            r = n
        else:
            r = rows.shape[1]
            E = torch.zeros(r, B, n, dtype=C.dtype, device=C.device)
            E.scatter_(2, rows.t().unsqueeze(-1), valid.t().unsqueeze(-1).to(C.dtype))
        if r == 0 or not C.requires_grad:
            return C.new_zeros(B, r, q)
        with torch.enable_grad():
            J = batched_vjp(C, Ur, E.contiguous())
        if J is None:
            return C.new_zeros(B, r, q)
        return J.reshape(r, B, q).transpose(0, 1).detach()

    @property
    def grad(self) -> Tensor:
        """``∇_u L = ∇_u f + Jᵀν``, flat ``(B, q)``."""
        Gc = self.constraint_gradient()
        g = self.objective_terms[1]
        return g if Gc is None else g + Gc.detach().reshape(g.shape)

    @property
    def hessian(self) -> HessianOperator:
        """``∇²_uu L`` on flat vectors: the objective's ``lagrangian_hessian`` when it has one; its own
        Hessian when the constraints are declared linear; else ``f``'s Hessian plus the constraints'
        curvature (one joint record when ``f`` has no Hessian of its own)."""
        if self._hessian is None:
            p, obj = self.problem, self.problem.objective
            own = getattr(obj, "lagrangian_hessian", None)
            if own is not None:
                self._hessian = own(p.V, p.shaped(self.U), p.mask, self.nu, self.state, **p.inputs)
            elif self.cons.linear:
                self._hessian = self.lin.hessian
            elif self._joint:
                Ur, Gc = self.record()[0], self.constraint_gradient()
                Gf = self.lin.record()[2]
                with torch.enable_grad():  # the sum keeps the graph of both records
                    G = Gc if Gf is None else (Gf if Gc is None else Gf + Gc)
                self._hessian = AutogradHessian(Ur, G, size=self.lin.data_size)
            else:
                Ur, Gc = self.record()[0], self.constraint_gradient()
                self._hessian = SumHessian(self.lin.hessian, AutogradHessian(Ur, Gc))
        return self._hessian

    def vjp(self, W: Tensor, Z: Tensor | None, wrt: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        """``∂/∂x [Σ_b W_b·∇_u L_b + Z_b·c_b]`` for every named tensor of ``wrt`` (``W: (B, q)``,
        ``Z: (B, m + k)``, zero for inactive constraints)."""
        out = dict(self.lin.vjp(W, wrt))
        if not wrt:
            return out
        Ur, C = self.record()
        Gc = self.constraint_gradient()
        outs, gos = [], []
        if Gc is not None and Gc.requires_grad:
            outs.append(Gc)
            gos.append(W.reshape(Gc.shape))
        if Z is not None and C.requires_grad:
            outs.append(C)
            gos.append(Z)
        if outs:
            with torch.enable_grad():
                grads = torch.autograd.grad(outs, list(wrt.values()), gos, retain_graph=True, allow_unused=True)
            for name, gx in zip(wrt, grads):
                if gx is not None:
                    out[name] = gx if out.get(name) is None else out[name] + gx
        return out


# ------------------------------------------------------------------------------ the backward
def implicit_grads(layer: Any, problem: Any, sol: Solution, grad_u: Tensor, wrt: dict[str, Tensor],
                   strategy: Any) -> dict[str, Tensor | None]:
    """``−∂/∂x [wᵀ ∇_u L + zᵀ c_A]`` for every named tensor of ``wrt``, with ``(w, z)`` the solution of
    the KKT system (module docstring) by ``strategy.solve_kkt``."""
    from .kkt import ConstraintJacobian

    cons: ConstraintSet = problem.constraints
    B = problem.batch
    g = grad_u.reshape(B, -1)
    U = sol.u.reshape(B, -1).detach()
    mult: Multipliers = sol.multipliers
    ok = sol.converged
    if ok is not None and not bool(ok.all()):
        # samples that are not minima get no gradient: the KKT system is solved for the others alone
        # (theirs may be singular), at leaf copies of their slices, scattered back into the batch
        idx = ok.nonzero().flatten()
        sliced = {k for k in wrt if k == "V" or (k in problem.inputs and wrt[k] is problem.inputs[k])}
        leaves = {k: (problem.V if k == "V" else problem.inputs[k])[idx].detach().requires_grad_(True) for k in sliced}
        sub = type(problem)(problem.objective, leaves.get("V", problem.V[idx].detach()), problem.mask[idx],
                            {k: leaves.get(k, x[idx].detach()) for k, x in problem.inputs.items()}, problem.q_shape,
                            cons)
        sub_sol = Solution(sol.u[idx], converged=ok[idx], multipliers=mult.select(idx))
        grads = {}
        if len(idx):
            grads = implicit_grads(layer, sub, sub_sol, grad_u[idx], {k: leaves.get(k, x) for k, x in wrt.items()},
                                   strategy)
        out: dict[str, Tensor | None] = {}
        for k, x in wrt.items():
            gk = grads.get(k)
            if k in sliced:
                full = torch.zeros_like(x)
                out[k] = full.index_copy(0, idx, gk) if gk is not None else full
            else:
                out[k] = gk if gk is not None else (torch.zeros_like(x) if not len(idx) else None)
        return out
    nu = mult.stacked()
    rows, valid = compact(cons.active_rows(sol, B, U.device))
    kl = KKTLinearization(problem, U, nu, sol.state)
    jac = ConstraintJacobian(kl.jacobian(rows, valid), valid)
    W, z = strategy.solve_kkt(kl.hessian.shifted(layer.damping), jac, g)
    Z = scatter_rows(z, rows, valid, nu.shape[1])
    grads = kl.vjp(W, Z, wrt)
    return {k: (None if x is None else -x) for k, x in grads.items()}
