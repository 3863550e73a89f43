"""Forward solvers: batched minimisation of ``f(v, ·)`` for every sample at once.

Every solver has one required method,
``minimize(objective, V, mask, U0) -> Solution``. Each sample stops when its own
gradient is small (``‖∇_u f‖ ≤ tol · max(1, ‖∇_u f(u₀)‖)``); there is no Python
loop over the batch: finished samples are frozen by a mask. A sample that has not
converged within ``max_iter`` comes back with ``converged = False`` and the layer
reports it.

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

from .linalg import batched_cg
from .objective import Objective, Solution

_SOLVERS: dict[str, type["Solver"]] = {}


def default_tol(dtype: torch.dtype) -> float:
    """Relative gradient tolerance of the forward solvers for a dtype."""
    return 1e-11 if dtype == torch.float64 else 1e-5


class Solver:
    """Minimises an objective for a batch. Subclasses implement :meth:`minimize`.

    Args:
        tol: relative gradient tolerance; default 1e-11 (float64) or 1e-5 (float32).
        max_iter: iterations per sample.
    """

    name: str = "solver"

    def __init__(self, tol: float | None = None, max_iter: int = 100):
        if tol is not None and not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer ≥ 1, got {max_iter!r}")
        self.tol, self.max_iter = tol, max_iter

    def minimize(self, objective: Objective, V: Tensor, mask: Tensor, U0: Tensor) -> Solution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol}, max_iter={self.max_iter})"

    # shared loop: every solver differs only in its search direction
    def _descend(
        self,
        objective: Objective,
        V: Tensor,
        mask: Tensor,
        U0: Tensor,
        direction: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
        after_step: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None] | None = None,
    ) -> Solution:
        tol = self.tol if self.tol is not None else default_tol(U0.dtype)
        U = U0
        f = objective.value(V, U, mask)
        g = objective.grad(V, U, mask)
        gnorm = g.norm(dim=-1)
        scale = gnorm.clamp_min(1.0)
        converged = gnorm <= tol * scale
        stalled = ~torch.isfinite(f) | ~torch.isfinite(gnorm)
        iters = torch.zeros(U.shape[0], dtype=torch.long, device=U.device)
        for _ in range(self.max_iter):
            active = ~converged & ~stalled
            if not bool(active.any()):
                break
            d = direction(U, g, gnorm, active)
            d = torch.where(active.unsqueeze(-1), d, torch.zeros_like(d))
            U_new, f_new, ok = armijo(objective, V, mask, U, f, g, d, active)
            g_new = objective.grad(V, U_new, mask)
            if after_step is not None:
                after_step(U_new - U, g_new - g, active & ok, U_new, g_new)
            U, f, g = U_new, f_new, g_new
            gnorm = g.norm(dim=-1)
            iters = iters + active.long()
            stalled = stalled | (active & ~ok)
            converged = gnorm <= tol * scale
        return Solution(U, converged=converged, iterations=iters, grad_norm=gnorm)


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
                "or pass an object with a minimize(objective, V, mask, U0) method"
            )
        return _SOLVERS[spec](**options)
    if callable(getattr(spec, "minimize", None)):
        return spec
    raise TypeError(
        f"solver must be a solver name {available_solvers()} or an object with a "
        f"minimize(objective, V, mask, U0) method, got {type(spec).__name__}"
    )


def armijo(
    objective: Objective,
    V: Tensor,
    mask: Tensor,
    U: Tensor,
    f: Tensor,
    g: Tensor,
    d: Tensor,
    active: Tensor,
    *,
    c: float = 1e-4,
    shrink: float = 0.5,
    max_steps: int = 40,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched backtracking line search: the first ``α ∈ {1, ½, ¼, …}`` with
    ``f(u + α d) ≤ f(u) + c α gᵀd`` (plus a rounding allowance), per sample.

    Returns ``(U_new, f_new, ok)``; samples that are inactive, or find no step, keep ``U``
    (``ok`` is ``False`` for the latter).
    """
    slope = (g * d).sum(-1)
    slack = 16 * torch.finfo(f.dtype).eps * f.abs()
    alpha = torch.ones_like(f)
    done = ~active
    ok = torch.zeros_like(active)
    U_new, f_new = U, f
    for _ in range(max_steps):
        cand = U + alpha.unsqueeze(-1) * d
        fc = objective.value(V, cand, mask)
        accept = ~done & torch.isfinite(fc) & (fc <= f + c * alpha * slope + slack)
        U_new = torch.where(accept.unsqueeze(-1), cand, U_new)
        f_new = torch.where(accept, fc, f_new)
        ok = ok | accept
        done = done | accept
        if bool(done.all()):
            break
        alpha = torch.where(done, alpha, alpha * shrink)
    return U_new, f_new, ok


@register_solver("newton")
class Newton(Solver):
    """Damped Newton: ``(H + λI) d = −g`` with ``λ = 0`` whenever ``H`` is positive
    definite (then convergence is quadratic), else the smallest ``λ`` in a ×10 ladder
    that makes the Cholesky factorisation succeed. Costs a dense ``q × q`` Hessian
    and an ``O(q³)`` factorisation per iteration."""

    def minimize(self, objective: Objective, V: Tensor, mask: Tensor, U0: Tensor) -> Solution:
        def direction(U, g, gnorm, active):
            H = objective.hessian(V, U, mask).dense()
            eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
            L, info = torch.linalg.cholesky_ex(H)
            base = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(torch.finfo(H.dtype).tiny)
            lam = torch.zeros_like(base)
            for _ in range(30):
                failing = (info > 0) & active
                if not bool(failing.any()):
                    break
                lam = torch.where(failing, torch.where(lam == 0, 1e-8 * base, 10 * lam), lam)
                L, info = torch.linalg.cholesky_ex(H + lam[:, None, None] * eye)
            return -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)

        return self._descend(objective, V, mask, U0, direction)


@register_solver("newton_cg")
class NewtonCG(Solver):
    """Inexact Newton: ``H d = −g`` solved by conjugate gradient on Hessian–vector
    products to a relative residual ``min(½, √(‖g‖/scale))``, truncated at negative
    curvature (falling back to ``−g``). Never builds ``H``."""

    def __init__(self, tol: float | None = None, max_iter: int = 100, cg_max_iter: int | None = None):
        super().__init__(tol, max_iter)
        self.cg_max_iter = cg_max_iter

    def minimize(self, objective: Objective, V: Tensor, mask: Tensor, U0: Tensor) -> Solution:
        cg_iters = self.cg_max_iter or max(2 * U0.shape[-1], 50)
        scale: list[Tensor] = []  # ‖∇f(u₀)‖, from the first call

        def direction(U, g, gnorm, active):
            if not scale:
                scale.append(gnorm.clamp_min(1.0))
            H = objective.hessian(V, U, mask)
            forcing = (gnorm / scale[0]).sqrt().clamp(min=1e-14, max=0.5)  # (B,), per sample
            res = batched_cg(H.matvec, -g, tol=forcing, max_iter=cg_iters)
            fallback = res.x.abs().amax(-1) == 0
            d = torch.where(fallback.unsqueeze(-1), -g, res.x)
            descent = (d * g).sum(-1) < 0
            return torch.where(descent.unsqueeze(-1), d, -g)

        return self._descend(objective, V, mask, U0, direction)


@register_solver("lbfgs")
class LBFGS(Solver):
    """Limited-memory BFGS: the two-loop recursion over the last ``history`` pairs
    ``(s, y)``, kept per sample (a pair is stored only where ``sᵀy > 0``), with Armijo
    backtracking. Gradients only; convergence is superlinear, so it needs more
    iterations than Newton: ``max_iter`` defaults to 500."""

    def __init__(self, tol: float | None = None, max_iter: int = 500, history: int = 10):
        super().__init__(tol, max_iter)
        if history < 1:
            raise ValueError(f"history must be ≥ 1, got {history}")
        self.history = history

    def minimize(self, objective: Objective, V: Tensor, mask: Tensor, U0: Tensor) -> Solution:
        B, q = U0.shape
        m = self.history
        S = U0.new_zeros(B, m, q)
        Y = U0.new_zeros(B, m, q)
        rho = U0.new_zeros(B, m)
        gamma = U0.new_ones(B)
        first = torch.ones(B, dtype=torch.bool, device=U0.device)
        slot = [0]

        def direction(U, g, gnorm, active):
            r = g.clone()
            order = [(slot[0] - 1 - j) % m for j in range(m)]  # newest first
            alphas = {}
            for j in order:
                a = rho[:, j] * (S[:, j] * r).sum(-1)
                alphas[j] = a
                r = r - a.unsqueeze(-1) * Y[:, j]
            r = gamma.unsqueeze(-1) * r
            for j in reversed(order):
                b = rho[:, j] * (Y[:, j] * r).sum(-1)
                r = r + (alphas[j] - b).unsqueeze(-1) * S[:, j]
            # first step: a unit-length steepest-descent step, scaled by the gradient
            r = torch.where(first.unsqueeze(-1), g / gnorm.clamp_min(1.0).unsqueeze(-1), r)
            return -r

        def after_step(s, y, stepped, U_new, g_new):
            sy = (s * y).sum(-1)
            yy = (y * y).sum(-1)
            good = stepped & (sy > torch.finfo(s.dtype).eps * s.norm(dim=-1) * y.norm(dim=-1))
            j = slot[0]
            S[:, j] = torch.where(good.unsqueeze(-1), s, torch.zeros_like(s))
            Y[:, j] = torch.where(good.unsqueeze(-1), y, torch.zeros_like(y))
            rho[:, j] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), torch.zeros_like(sy))
            gamma.copy_(torch.where(good, sy / torch.where(good, yy, torch.ones_like(yy)), gamma))
            first.copy_(first & ~good)
            slot[0] = (j + 1) % m

        return self._descend(objective, V, mask, U0, direction, after_step)
