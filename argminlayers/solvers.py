"""Forward solvers: batched minimisation of ``f(v, ·)`` for every sample at once.

Every solver has one required method, ``minimize(problem, U0) -> Solution``, with
``problem`` a :class:`~argminlayers.problem.Problem` (the objective bound to one batch)
and flat iterates ``U: (B, q)``. There is no Python loop over the batch: finished samples
are frozen by a mask. A sample has **converged** at ``u`` when

- ``‖∇_u f‖ ≤ tol · max(1, ‖∇_u f(u₀)‖)`` (finite) and, so that the accuracy does not depend
  on the objective's scale (one written with ``.mean()`` or small weights has
  ``‖∇_u f(u₀)‖ < 1``), either ``‖∇_u f‖ ≤ tol · ‖∇_u f(u₀)‖`` or the step to the minimiser
  (the Newton step; L-BFGS's, or a short conjugate-gradient estimate) is ``≤ tol · max(1, ‖u‖)``
  (a warm start),
- the Hessian is positive definite there (Cholesky succeeds, or conjugate gradient meets
  no direction of non-positive curvature; where ``∇f = 0`` exactly, from a seeded probe
  direction, since ``∇f`` itself shows nothing of ``H``), and
- the Newton step ``‖H⁻¹∇f‖ ≤ √tol · max(1, ‖u‖)`` is small, so a flat plateau where the
  gradient merely underflows is not mistaken for a minimum.

Any other ending is reported in ``Solution.status`` (see
:data:`~argminlayers.objective.STATUS_TEXT`), and the layer turns it into a warning or an
error.

=========  =======================================================  =================
name       step                                                     needs
=========  =======================================================  =================
newton     ``H d = −g`` by Cholesky, damped (``H + λI``) when       dense Hessian,
           ``H`` is not positive definite; Armijo backtracking      ``q`` small
lbfgs      two-loop recursion on the last ``history`` pairs;        gradients only
           Armijo backtracking
newton_cg  truncated conjugate gradient on Hessian–vector           HVPs only
           products (inexact Newton); Armijo backtracking
=========  =======================================================  =================
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .hessian import DenseHessian
from .linalg import batched_cg
from .objective import CONVERGED, MAX_ITER, NO_DESCENT, NONFINITE, NOT_MINIMUM, Linearization, Solution, SolverState
from .problem import Problem

_SOLVERS: dict[str, type["Solver"]] = {}


_INF = float("inf")


def _norm(x: Tensor, dim: int = -1) -> Tensor:
    return torch.linalg.vector_norm(x, dim=dim)


def default_tol(dtype: torch.dtype) -> float:
    """Relative gradient tolerance of the forward solvers for a dtype."""
    return 1e-11 if dtype == torch.float64 else 1e-5


class Solver:
    """Minimises a batch of problems. Subclasses implement :meth:`minimize`.

    Args:
        tol: relative gradient tolerance; default 1e-11 (float64) or 1e-5 (float32).
        max_iter: iterations per sample.
    """

    name: str = "solver"
    second_order: bool = True  # whether the solver asks for Hessian products

    def __init__(self, tol: float | None = None, max_iter: int = 100):
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
        self.tol, self.max_iter = tol, max_iter

    def minimize(self, problem: Problem, U0: Tensor) -> Solution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol}, max_iter={self.max_iter})"

    def tolerance(self, dtype: torch.dtype) -> float:
        return self.tol if self.tol is not None else default_tol(dtype)

    # shared loop: every solver differs only in its search direction
    def _descend(
        self,
        problem: Problem,
        U0: Tensor,
        direction: Callable[[Linearization, Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]],
        after_step: Callable[[Tensor, Tensor, Tensor], None] | None = None,
        keep_hessian: bool = False,
        is_step: Callable[[], Tensor] | None = None,
    ) -> Solution:
        """Line-search descent along ``direction(lin, U, gnorm, active) -> (d, pd)``; ``pd`` (B,)
        says where the Hessian is positive definite (``None``: not known, checked by CG at the end).
        ``is_step() -> (B,)``: where a gradient-only ``d`` estimates the step to the minimiser
        (``None``: everywhere)."""
        tol = self.tolerance(U0.dtype)
        U = U0
        lin = problem.linearize(U, second_order=self.second_order)
        f, g = lin.value, lin.grad
        gnorm = _norm(g)
        finite = torch.isfinite(f) & torch.isfinite(gnorm)
        g0 = torch.where(finite, gnorm, torch.zeros_like(gnorm))
        scale = g0.clamp_min(1.0)
        status = torch.where(finite, MAX_ITER, NONFINITE)
        done = ~finite
        iters = torch.zeros(U.shape[0], dtype=torch.long, device=U.device)
        hessian = None
        # a gradient-only direction's curvature check costs Hessian products over the whole batch,
        # however few samples it checks: a sample whose gradient is small waits, frozen ("held"),
        # until no other is still descending, and one run checks them all (at 256 × 20 × 16, five
        # runs a call became one). One that fails the check takes a step before it waits again.
        held = torch.zeros_like(done)
        for it in range(self.max_iter + 1):
            live = ~done
            d, pd = direction(lin, U, gnorm, live)
            if keep_hessian:
                hessian = getattr(lin, "factored", None)
            small_g = live & (gnorm <= tol * scale)
            if pd is None:
                held = small_g
                if bool(held.any()) and it < self.max_iter and bool((live & ~held).any()):
                    small_g = torch.zeros_like(small_g)  # not yet: the others are still descending
                else:
                    held = torch.zeros_like(held)  # check them now; those that fail step at once
            if bool(small_g.any()):  # every test below needs a small gradient: most iterations skip them
                # where ‖∇f(u₀)‖ < 1 the absolute test above depends on the objective's scale (an
                # objective written with .mean() or small weights passes it far from u*): also ask for
                # the gradient relative to its start, or a step (the distance to u*) at the tolerance
                dn = _norm(d)
                unorm = _norm(U).clamp_min(1.0)
                step_ok = dn <= tol * unorm
                if is_step is not None:  # (before L-BFGS stores a pair, d is the scaled gradient, not a step)
                    step_ok = step_ok & is_step()
                fine = (gnorm <= tol * g0) | step_ok
                if pd is None:
                    # gradient-only direction: the curvature and the step to u* (by CG) where a sample
                    # would stop. Its gradient relative to ‖∇f(u₀)‖ is not enough: a start far out on a
                    # steep objective (cosh(10(u − v)) from 0: 5e13) passed it 0.5 from u*, and the
                    # check at the end then called that point a saddle
                    if isinstance(lin, _Rows):  # the check's products need the whole batch's record
                        lin = problem.linearize(U)
                    pd_c, dn_c = _curvature(lin, lin.grad, small_g)
                    fine = fine | (dn_c <= tol * unorm)  # (a warm start, say: the step itself is tiny)
                    conv = small_g & fine & pd_c & (dn_c <= (tol**0.5) * unorm)
                    saddle = small_g & ~pd_c
                else:
                    small_d = dn <= (tol**0.5) * unorm
                    conv = small_g & fine & pd & small_d
                    saddle = small_g & ~pd
                status = torch.where(conv, CONVERGED, torch.where(saddle, NOT_MINIMUM, status))
                done = done | conv | saddle
            active = ~done & ~held
            n_active = int(active.sum())
            if it == self.max_iter or n_active == 0:
                break
            if n_active < active.numel():
                d = torch.where(active.unsqueeze(-1), d, torch.zeros_like(d))
            if not self.second_order and 2 * n_active <= active.numel() and active.numel() >= _COMPACT_MIN:
                # a gradient-only step of a few samples: f and its gradient on those rows alone (the
                # objective is per sample), not on the whole batch. At 256 × 20 × 16 (pseudo-Huber,
                # float32), the last of five L-BFGS iterations stepped 1 sample and cost a fifth of the solve
                rows = active.nonzero().squeeze(-1)
                sub = problem.rows(rows)
                Ur, dr = U[rows], d[rows]
                trial = sub.linearize(Ur + dr, second_order=False)
                stepped = torch.ones(rows.numel(), dtype=torch.bool, device=U.device)
                Ur_new, fr_new, ok_r, full = armijo(sub, Ur, f[rows], g[rows], dr, stepped, first=trial.value)
                step_lin = trial if full else sub.linearize(Ur_new, second_order=False)
                U_new, f_new = U.index_copy(0, rows, Ur_new), f.index_copy(0, rows, fr_new)
                ok = torch.zeros_like(active).index_copy(0, rows, ok_r)
                lin = _Rows(g.index_copy(0, rows, step_lin.grad.to(g.dtype)))
            else:
                # the full step is recorded as the next linearization: when every sample takes it
                # (Newton near its solution), the line search costs no extra pass
                trial = problem.linearize(U + d, second_order=self.second_order)
                U_new, f_new, ok, full = armijo(problem, U, f, g, d, active, first=trial.value)
                lin = trial if full else problem.linearize(U_new, second_order=self.second_order)
            g_new = lin.grad
            if after_step is not None:
                after_step(U_new - U, g_new - g, active & ok)
            U, f, g = U_new, f_new, g_new
            gnorm = _norm(g)
            iters += active
            finite = gnorm < _INF  # (a norm is ≥ 0 or NaN: one comparison instead of isfinite's five ops)
            if not (full and bool(finite.all())):  # (full: every active sample stepped)
                nonfinite = active & ~finite
                stuck = active & ~ok
                status = torch.where(nonfinite, NONFINITE, torch.where(stuck, NO_DESCENT, status))
                done = done | nonfinite | stuck
        converged = status == CONVERGED
        state = SolverState(hessian=hessian, linearization=None if isinstance(lin, _Rows) else lin)
        return Solution(U, converged=converged, iterations=iters, grad_norm=gnorm, state=state, status=status)


_COMPACT_MIN = 8
"""Batches from this size on step a gradient-only solver's few active samples on their rows alone."""


class _Rows:
    """What a gradient-only direction reads after a step on some rows alone: the whole batch's
    gradient (the stepped rows' new one, the others' as they were). No record is kept: the
    curvature check and the backward linearize the whole batch again."""

    def __init__(self, grad: Tensor):
        self.grad = grad


def _curvature(lin: Linearization, g: Tensor, check: Tensor) -> tuple[Tensor, Tensor]:
    """``(pd, ‖H⁻¹g‖)`` by a short conjugate-gradient run on ``H d = g`` where ``check``;
    ``pd`` is ``False`` where a direction of non-positive curvature is met.

    Where ``g`` is exactly zero (a start at a critical point, a plateau where the objective
    underflows) its Krylov space is empty, so the run probes ``H`` from a fixed pseudo-random
    direction instead (seeded: the same on every call), and the Newton step there is zero."""
    pd = torch.ones_like(check)
    dn = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if not bool(check.any()):
        return pd, dn
    rhs = torch.where(check.unsqueeze(-1), g, torch.zeros_like(g))
    zero = check & ~(torch.linalg.vecdot(g, g) > 0)
    if bool(zero.any()):
        probe = torch.randn(g.shape, generator=torch.Generator(g.device).manual_seed(0), dtype=g.dtype, device=g.device)
        rhs = torch.where(zero.unsqueeze(-1), probe, rhs)
    # a few steps suffice: a flat or negatively curved Krylov direction shows at once
    res = batched_cg(lin.hessian.matvec, rhs, tol=1e-3, max_iter=min(g.shape[-1], 2))
    return ~(res.negative_curvature & check), torch.where(check & ~zero, _norm(res.x), dn)


def register_solver(name: str) -> Callable[[type[Solver]], type[Solver]]:
    """Class decorator: make a :class:`Solver` subclass available as ``solver=name``."""

    def deco(cls: type[Solver]) -> type[Solver]:
        cls.name = name
        _SOLVERS[name] = cls
        return cls

    return deco


def available_solvers() -> list[str]:
    """Names accepted by ``solver=``."""
    return sorted(_SOLVERS)


def get_solver(spec: "str | Solver", **options) -> Solver:
    """A solver from its registered name (built with ``options``), or the object itself."""
    if isinstance(spec, str):
        if spec not in _SOLVERS:
            raise ValueError(
                f"solver={spec!r} is not a known solver; choose one of {available_solvers()} "
                "or pass an object with a minimize(problem, U0) method"
            )
        return _SOLVERS[spec](**options)
    if callable(getattr(spec, "minimize", None)):
        return spec
    raise TypeError(
        f"solver must be a solver name {available_solvers()} or an object with a "
        f"minimize(problem, U0) method, got {type(spec).__name__}"
    )


def armijo(
    problem: Problem,
    U: Tensor,
    f: Tensor,
    g: Tensor,
    d: Tensor,
    active: Tensor,
    *,
    c: float = 1e-4,
    shrink: float = 0.5,
    max_steps: int = 40,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Batched backtracking line search: the first ``α`` of a decreasing sequence from 1 with
    ``f(u + α d) ≤ f(u) + c α gᵀd`` (plus a rounding allowance), per sample. Each rejected ``α``
    is followed by the minimiser of the parabola through ``f(u)``, its slope ``gᵀd`` and
    ``f(u + α d)``, kept within ``[α/10, α·shrink]`` (safeguarded quadratic interpolation): a
    step that overshoots by a factor ``k ≤ 10`` on a quadratic is cut to ``1/k`` at once, where
    halving took ``log₂ k`` more evaluations of ``f`` (L-BFGS's first, unit-length step on
    pseudo-Huber pooling at 256 × 20 × 16: 4 of them, now 1).

    ``first``: ``f(u + d)`` when the caller has it already. Returns ``(U_new, f_new, ok, full)``;
    samples that are inactive, or find no step, keep ``U`` (``ok`` is ``False`` for the latter);
    ``full``: every active sample took the full step (``U_new = U + d``).
    """
    slope = torch.linalg.vecdot(g, d)
    bound = torch.add(f, f.abs(), alpha=16 * torch.finfo(f.dtype).eps)  # f plus a rounding allowance
    cand = U + d
    fc = problem.value(cand) if first is None else first
    # |f| < inf: finite (NaN fails it), two ops instead of isfinite's five; the comparison alone would let
    # +inf through a bound that overflowed to inf
    ok = active & (fc <= torch.add(bound, slope, alpha=c)) & (fc.abs() < _INF)
    if bool((ok == active).all()):
        return cand, torch.where(ok, fc, f), ok, True
    U_new = torch.where(ok.unsqueeze(-1), cand, U)
    f_new = torch.where(ok, fc, f)
    done = ~active | ok
    alpha = _interpolate(torch.ones_like(f), fc, f, slope, shrink)
    for _ in range(max_steps - 1):
        cand = U + alpha.unsqueeze(-1) * d
        fc = problem.value(cand)
        accept = ~done & (fc <= bound + c * alpha * slope) & (fc.abs() < _INF)
        U_new = torch.where(accept.unsqueeze(-1), cand, U_new)
        f_new = torch.where(accept, fc, f_new)
        ok = ok | accept
        done = done | accept
        if bool(done.all()):
            break
        alpha = torch.where(done, alpha, _interpolate(alpha, fc, f, slope, shrink))
    return U_new, f_new, ok, False


def _interpolate(alpha: Tensor, fc: Tensor, f: Tensor, slope: Tensor, shrink: float) -> Tensor:
    """The next trial step after ``α`` was rejected: the minimiser ``−slope α² / (2 (f(u + α d) − f −
    slope α))`` of the parabola through ``f``, ``slope`` and ``fc = f(u + α d)``, within
    ``[α/10, α·shrink]``; ``α·shrink`` where the parabola has no minimiser (``fc`` not finite)."""
    excess = fc - f - slope * alpha  # > 0 wherever the sufficient decrease failed by more than rounding
    step = -slope * alpha * alpha / (2 * excess)
    step = torch.where((excess > 0) & (fc.abs() < _INF) & (step.abs() < _INF), step, shrink * alpha)
    return torch.minimum(torch.maximum(step, 0.1 * alpha), shrink * alpha)


_DAMPED_PIVOTS = 1e-8
"""Smallest pivot² of a damped factor relative to its largest (:func:`damped_cholesky`)."""


def damped_cholesky(H: Tensor, active: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(L, pd, every)``: the Cholesky factor of ``H + λI`` with ``λ = 0`` where ``H`` is positive
    definite (``pd``), else the smallest ``λ`` of a ×10 ladder from ``1e-8 · max|H_ii|`` that
    makes the factorisation succeed with pivots² within :data:`_DAMPED_PIVOTS` of each other
    (only for ``active`` samples); ``every``: ``pd.all()``, read
    back once here for the caller too."""
    L, info = torch.linalg.cholesky_ex(H)
    pivots = L.diagonal(dim1=-2, dim2=-1)
    lo, hi = torch.aminmax(pivots * pivots, dim=-1)
    # a pivot² below 10·eps of the largest is a singular matrix that Cholesky "factorised";
    # a NaN or infinite pivot fails the comparison too
    pd = (info == 0) & (lo > 10 * torch.finfo(H.dtype).eps * hi)
    if bool(pd.all()):
        return L, pd, True
    failing = ~pd & active
    if bool(failing.any()):
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        base = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(torch.finfo(H.dtype).tiny)
        lam = torch.zeros_like(base)
        for _ in range(30):
            lam = torch.where(failing, torch.where(lam == 0, 1e-8 * base, 10 * lam), lam)
            L2, info2 = torch.linalg.cholesky_ex(H + lam[:, None, None] * eye)
            L = torch.where(failing[:, None, None], L2, L)
            # a damped factor must also be well conditioned: a rung just above −λ_min(H) factorises
            # (pivots² [1.3, 0.23, 2e-16] on a double well) into a step of 1e15 that the line search
            # cannot shorten; the next rung overshoots −λ_min by about 10×
            lo2, hi2 = torch.aminmax(L2.diagonal(dim1=-2, dim2=-1).square(), dim=-1)
            failing = failing & ((info2 > 0) | ~(lo2 > _DAMPED_PIVOTS * hi2))
            if not bool(failing.any()):
                break
    return L, pd, False


@register_solver("newton")
class Newton(Solver):
    """Damped Newton: ``(H + λI) d = −g`` with ``λ = 0`` whenever ``H`` is positive
    definite (then convergence is quadratic), else the smallest ``λ`` in a ×10 ladder
    that makes the Cholesky factorisation succeed. Costs a dense ``q × q`` Hessian
    (``q`` Hessian–vector products in one batched pass) and an ``O(q³)`` factorisation per
    iteration. The last Hessian and its factor are handed to the backward pass."""

    def minimize(self, problem: Problem, U0: Tensor) -> Solution:
        def direction(lin, U, gnorm, active):
            H = lin.hessian.dense()
            L, pd, every = damped_cholesky(H, active)
            # the factor of H itself where it is positive definite (the backward reuses it), the
            # identity elsewhere: those samples are not minima and get no gradient
            factor = L
            if not every:
                eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
                factor = torch.where(pd[:, None, None], L, eye)
            lin.factored = DenseHessian(H, factor)
            d = -torch.cholesky_solve(lin.grad.unsqueeze(-1), L).squeeze(-1)
            return d, pd

        return self._descend(problem, U0, direction, keep_hessian=True)


@register_solver("newton_cg")
class NewtonCG(Solver):
    """Inexact Newton: ``H d = −g`` solved by conjugate gradient on Hessian–vector
    products to a relative residual ``min(½, √(‖g‖/scale))``, truncated at negative
    curvature (falling back to ``−g``). Never builds ``H``: each product replays one
    recorded reverse pass."""

    def __init__(self, tol: float | None = None, max_iter: int = 100, cg_max_iter: int | None = None):
        super().__init__(tol, max_iter)
        self.cg_max_iter = cg_max_iter

    def minimize(self, problem: Problem, U0: Tensor) -> Solution:
        cg_iters = self.cg_max_iter or max(2 * problem.q, 50)
        scale: list[Tensor] = []  # ‖∇f(u₀)‖, from the first call

        def direction(lin, U, gnorm, active):
            if not scale:
                scale.append(gnorm.clamp_min(1.0))
            g = lin.grad
            forcing = (gnorm / scale[0]).sqrt().clamp(min=1e-14, max=0.5)  # (B,), per sample
            rhs = torch.where(active.unsqueeze(-1), -g, torch.zeros_like(g))
            res = batched_cg(lin.hessian.matvec, rhs, tol=forcing, max_iter=cg_iters)
            fallback = res.x.abs().amax(-1) == 0
            d = torch.where(fallback.unsqueeze(-1), -g, res.x)
            descent = (d * g).sum(-1) < 0
            d = torch.where(descent.unsqueeze(-1), d, -g)
            pd = ~res.negative_curvature
            still = active & ~(torch.linalg.vecdot(g, g) > 0)  # g = 0: CG saw nothing of H; probe it
            if bool(still.any()):
                pd = pd & _curvature(lin, g, still)[0]
            return d, pd

        return self._descend(problem, U0, direction)


@register_solver("lbfgs")
class LBFGS(Solver):
    """Limited-memory BFGS: the two-loop recursion over the last ``history`` pairs
    ``(s, y)``, kept per sample (a pair is stored only where ``sᵀy > 0``), with Armijo
    backtracking. Gradients only (the curvature at the end is checked by a short
    conjugate-gradient run); convergence is superlinear, so it needs more iterations than
    Newton: ``max_iter`` defaults to 500."""

    second_order = False

    def __init__(self, tol: float | None = None, max_iter: int = 500, history: int = 10):
        super().__init__(tol, max_iter)
        if history < 1:
            raise ValueError(f"history must be ≥ 1, got {history}")
        self.history = history

    def minimize(self, problem: Problem, U0: Tensor) -> Solution:
        pairs = (_CompiledPairs if _CompiledPairs.takes(U0) else _TorchPairs)(U0, self.history)
        return self._descend(problem, U0, pairs.direction, pairs.store, is_step=pairs.has_pair)


class _TorchPairs:
    """L-BFGS's pairs and two-loop recursion in batched torch operations (any device, dtype and
    autograd mode). The pairs, newest last: s, y and their scaled ρs, ρy (ρ = 1/sᵀy), each
    (B, q) with zeros for a sample that stored no pair at that step; a ring of Python lists
    (no indexing ops per use)."""

    def __init__(self, U0: Tensor, history: int):
        B = U0.shape[0]
        self.m = history
        self.S: list[Tensor] = []
        self.Y: list[Tensor] = []
        self.rS: list[Tensor] = []
        self.rY: list[Tensor] = []
        self.gamma = U0.new_ones(B, 1)
        self.first = torch.ones(B, dtype=torch.bool, device=U0.device)
        self.any_first = True  # whether some sample has no pair yet (read back when it changes)

    def direction(self, lin: Linearization, U: Tensor, gnorm: Tensor, active: Tensor) -> tuple[Tensor, None]:
        g = lin.grad
        r = g
        alphas = []
        for sj, yj in zip(reversed(self.rS), reversed(self.Y)):  # newest first
            a = (sj * r).sum(-1, keepdim=True)
            alphas.append(a)
            r = torch.addcmul(r, a, yj, value=-1)
        r = self.gamma * r
        for sj, yj, a in zip(self.S, self.rY, reversed(alphas)):  # oldest first
            r = torch.addcmul(r, a - (yj * r).sum(-1, keepdim=True), sj)
        if self.any_first:  # first step: a unit-length steepest-descent step, scaled by the gradient
            r = torch.where(self.first.unsqueeze(-1), g / gnorm.clamp_min(1.0).unsqueeze(-1), r)
        return -r, None

    def store(self, s: Tensor, y: Tensor, stepped: Tensor) -> None:
        sy = (s * y).sum(-1, keepdim=True)
        yy = (y * y).sum(-1, keepdim=True)
        ss = (s * s).sum(-1, keepdim=True)
        good = stepped.unsqueeze(-1) & (sy > torch.finfo(s.dtype).eps * ss.sqrt() * yy.sqrt())  # (NaN fails)
        zero = s.new_zeros(())
        rho = torch.where(good, sy.reciprocal(), zero)  # 1/sᵀy, 0 where no pair is stored
        if len(self.S) == self.m:
            for ring in (self.S, self.Y, self.rS, self.rY):
                ring.pop(0)
        s, y = torch.where(good, s, zero), torch.where(good, y, zero)
        self.S.append(s)
        self.Y.append(y)
        self.rS.append(s * rho)
        self.rY.append(y * rho)
        self.gamma.copy_(torch.where(good, sy / yy, self.gamma))  # (yy > 0 where good; the other branch is not taken)
        if self.any_first:
            self.first.logical_and_(~good.squeeze(-1))
            self.any_first = bool(self.first.any())

    def has_pair(self) -> Tensor:
        return ~self.first


class _CompiledPairs:
    """The same pairs and recursion on CPU float32/float64 tensors, one compiled call a
    direction and one a stored pair (:mod:`argminlayers._lbfgs`): a ring of ``m`` slots
    ``S, Y (m, B, q)``, ``rho (m, B)``, the oldest at ``head``."""

    @staticmethod
    def takes(U0: Tensor) -> bool:
        return (COMPILED and U0.device.type == "cpu" and U0.dtype in (torch.float32, torch.float64)
                and not (torch.is_grad_enabled() and U0.requires_grad) and _lbfgs_kernel() is not None)

    def __init__(self, U0: Tensor, history: int):
        B, q = U0.shape
        self.kernel = _lbfgs_kernel()
        self.S = U0.new_zeros(history, B, q)
        self.Y = U0.new_zeros(history, B, q)
        self.rho = U0.new_zeros(history, B)
        self.head = self.count = 0
        self.gamma = U0.new_ones(B)
        self.first = torch.ones(B, dtype=torch.bool)
        self.alphas = torch.empty(history, dtype=torch.float64).numpy()
        self.eps = torch.finfo(U0.dtype).eps
        self.arrays = (self.S.numpy(), self.Y.numpy(), self.rho.numpy())
        self.gamma_np, self.first_np = self.gamma.numpy(), self.first.numpy().view("u1")

    def direction(self, lin: Linearization, U: Tensor, gnorm: Tensor, active: Tensor) -> tuple[Tensor, None]:
        g = lin.grad.detach().to(self.S.dtype).contiguous()
        d = torch.empty_like(g)
        S, Y, rho = self.arrays
        self.kernel.direction(S, Y, rho, self.head, self.count, self.gamma_np, self.first_np, g.numpy(),
                              gnorm.detach().to(g.dtype).contiguous().numpy(), d.numpy(), self.alphas)
        return d, None

    def store(self, s: Tensor, y: Tensor, stepped: Tensor) -> None:
        m = self.S.shape[0]
        if self.count == m:
            self.head = (self.head + 1) % m
            self.count -= 1
        slot = (self.head + self.count) % m
        self.count += 1
        S, Y, rho = self.arrays
        self.kernel.store(S, Y, rho, slot, s.detach().to(self.S.dtype).contiguous().numpy(),
                          y.detach().to(self.S.dtype).contiguous().numpy(),
                          stepped.contiguous().numpy().view("u1"), self.gamma_np, self.first_np, self.eps)

    def has_pair(self) -> Tensor:
        return ~self.first


#: Use the compiled L-BFGS steps where they are built and apply (False: always torch).
COMPILED = True
_KERNEL = False


def _lbfgs_kernel():
    global _KERNEL
    if _KERNEL is False:
        from ._compiled import load_compiled

        _KERNEL = load_compiled("argminlayers._lbfgs", "L-BFGS runs its steps in torch operations")
    return _KERNEL

