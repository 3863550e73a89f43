"""A batched primal–dual interior-point solver for constrained inner problems.

    min_u f(u)   subject to   h(u) = 0 (m),   g(u) + s = 0,   s ≥ 0 (k slacks)

Each iteration takes a Newton step on the perturbed KKT conditions of the barrier problem
(``τ`` the barrier parameter, ``z`` the multipliers of the inequalities, ``D = Z S⁻¹``)::

    [H + J_gᵀ D J_g   J_hᵀ] [Δu]     [∇_u L + J_gᵀ (D (g + s) − z + τ/s)]
    [J_h              0   ] [Δλ] = − [h                                 ]
    Δs = −(g + s) − J_g Δu,    Δz = (τ − s z − z Δs) / s

with ``H = ∇²_uu L`` the Hessian of the Lagrangian ``L = f + λᵀh + zᵀg``, solved by the Schur
complement on a Cholesky factor of ``H + J_gᵀ D J_g`` (damped, as in Newton, where it is not
positive definite). The step is cut to keep ``s, z > 0`` (fraction to the boundary, 0.995)
and backtracked on the merit ``f − τ Σ log s + ρ (‖h‖₁ + ‖g + s‖₁)`` (``ρ`` above the
multipliers, so the merit is exact), with one second-order correction of the equalities
where the full step is rejected. ``τ`` decreases per sample, superlinearly
(``min(τ/5, τ^1.5)``), once the barrier problem is solved to ``10τ``. Without inequalities this
is Newton's method on the KKT system of the equalities (SQP).

A sample whose violation stops falling (by 0.1 % in 15 iterations) is reported ``INFEASIBLE``.
Where ``H + J_gᵀ D J_g`` is not positive definite, ``c J_hᵀJ_h`` is added (the same step, since
``J_h Δu = −h``) before damping, so that a Hessian positive definite on the tangent space of
the equalities keeps exact Newton steps. A sample has converged when ``‖∇_u L‖ ≤ tol · ‖∇f(u₀)‖``, the violation
``max(|h|, g₊) ≤ tol · max(1, |c(u₀)|)``, ``max s z ≤ tol · ‖∇f(u₀)‖`` (``‖∇f(u₀)‖`` read as 1
where it is 0; not floored at 1, so that an objective of small scale is solved as accurately),
its Newton step ``‖Δu‖ ≤ √tol · max(1, ‖u‖)`` (as Newton's: the residuals are relative to
``‖∇f(u₀)‖``, which a start far out on a steep objective makes huge), and the Hessian
of the Lagrangian is positive definite on the tangent space of the active constraints
(else ``NOT_MINIMUM``). A sample that stops otherwise while its constraints are violated is
reported ``INFEASIBLE``. Dense: ``O(q³ + (m + k) q²)`` per iteration, for small ``q``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .constraints import KKTLinearization, compact, scatter_rows
from .kkt import ConstraintJacobian, tangent_positive_definite
from .objective import CONVERGED, INFEASIBLE, MAX_ITER, NO_DESCENT, NONFINITE, NOT_MINIMUM, Solution
from .problem import Problem
from .solvers import Solver, damped_cholesky, register_solver


def _fraction_to_boundary(x: Tensor, dx: Tensor, kappa: float) -> Tensor:
    """Largest ``α ∈ (0, 1]`` with ``x + α dx ≥ (1 − κ) x`` for every entry (``x > 0``), ``(B,)``."""
    if x.shape[-1] == 0:
        return x.new_ones(x.shape[0])
    ratio = torch.where(dx < 0, -kappa * x / torch.where(dx < 0, dx, -torch.ones_like(dx)), torch.ones_like(x))
    return ratio.amin(-1).clamp(max=1.0)


def _bmv(A: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(A, x.unsqueeze(-1)).squeeze(-1)


@register_solver("interior_point")
class InteriorPoint(Solver):
    """Primal–dual interior point for ``min f`` subject to ``h = 0``, ``g ≤ 0`` (module docstring):
    batched, per-sample convergence and barrier parameter, dense steps (small ``q``).

    Args:
        tol: relative KKT tolerance; default 1e-11 (float64) or 1e-5 (float32).
        max_iter: iterations per sample (default 200).
    """

    handles_constraints = True
    patience = 15  # iterations without progress on the violation before a sample is reported infeasible

    def __init__(self, tol: float | None = None, max_iter: int = 200):
        super().__init__(tol, max_iter)

    @staticmethod
    def _augmentation(M: Tensor, Jh: Tensor, live: Tensor) -> Tensor:
        """``c`` ``(B,)``: 0 where ``M`` is positive definite, else the smallest of ``max|M_ii| · 10^j``
        (``j = 0..7``) that makes ``M + c J_hᵀJ_h`` so (0 where none does: damping takes over)."""
        _, info = torch.linalg.cholesky_ex(M)
        fail = (info > 0) & live
        c = M.new_zeros(M.shape[0])
        if not bool(fail.any()):
            return c
        JtJ = torch.bmm(Jh.transpose(1, 2), Jh)
        base = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        for j in range(8):
            trial = base * 10.0**j
            _, info = torch.linalg.cholesky_ex(M + trial[:, None, None] * JtJ)
            ok = fail & (info == 0)
            c = torch.where(ok, trial, c)
            fail = fail & ~ok
            if not bool(fail.any()):
                break
        return c

    def minimize(self, problem: Problem, U0: Tensor) -> Solution:
        cons = problem.constraints
        if cons is None:
            raise TypeError("solver='interior_point' solves constrained problems; declare eq=/ineq= or use 'newton'")
        from .constraints import Multipliers

        tol = self.tolerance(U0.dtype)
        B, q = U0.shape
        dev, dt = U0.device, U0.dtype
        U = U0
        with torch.no_grad():
            C0 = cons.values(problem.V, problem.shaped(U), problem.mask, problem.inputs)
        m, k = cons.m, cons.k
        lam = U.new_zeros(B, m)
        g0 = C0[:, m:]
        s = (-g0).clamp_min(1.0) if k else U.new_zeros(B, 0)
        z = torch.ones_like(s)
        tau = torch.full((B,), 0.1 if k else 0.0, dtype=dt, device=dev)
        rho = U.new_ones(B)
        status = torch.full((B,), MAX_ITER, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        iters = torch.zeros(B, dtype=torch.long, device=dev)
        scale = cscale = best = since = None
        kl = None
        for it in range(self.max_iter + 1):
            kl = KKTLinearization(problem, U, None)
            C = kl.values
            f, gf = kl.objective_terms
            J = kl.jacobian()  # (B, m + k, q)
            h, g = C[:, :m], C[:, m:]
            Jh, Jg = J[:, :m], J[:, m:]
            if m:  # least-squares multipliers of the equalities at the new point: argmin ‖∇f + J_gᵀz + J_hᵀλ‖
                lam = -torch.linalg.lstsq(Jh.transpose(1, 2), (gf + _bmv(Jg.transpose(1, 2), z)).unsqueeze(-1)
                                          ).solution.squeeze(-1)
                lam = torch.where(done.unsqueeze(-1), lam_prev, lam) if it else lam
            lam_prev = lam
            nu = torch.cat((lam, z), -1)
            kl.nu = nu
            rd = gf + _bmv(J.transpose(1, 2), nu)
            if scale is None:
                # ‖∇f(u₀)‖ itself, not floored at 1: a floor makes the test absolute, and so loose, for an
                # objective of small scale (one written with .mean() or small weights)
                scale = gf.norm(dim=-1).nan_to_num(0.0)
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                cscale = (C.abs().amax(-1) if C.shape[1] else U.new_zeros(B)).nan_to_num(0.0).clamp_min(1.0)
                tau_min = 0.1 * tol * scale
            ri = g + s
            viol = torch.cat((h.abs(), g.clamp_min(0)), -1).amax(-1) if C.shape[1] else U.new_zeros(B)
            comp = (s * z).amax(-1) if k else U.new_zeros(B)
            opt = rd.norm(dim=-1) / scale
            finite = torch.isfinite(f) & torch.isfinite(opt) & torch.isfinite(viol)
            bad = ~done & ~finite
            status = torch.where(bad, NONFINITE, status)
            done = done | bad
            # KKT residuals at the tolerance make a candidate; it has converged once its Newton step is
            # small too (below): relative to ‖∇f(u₀)‖ alone, a start far out on a steep objective
            # (‖∇f(u₀)‖ ~ 1e13 for cosh(10(u − v))) passed the residual test far from u*
            cand = ~done & (opt <= tol) & (viol <= tol * cscale) & (comp <= tol * scale)
            # infeasible: the violation has not fallen by 0.1 % in `patience` iterations
            if best is None:
                best, since = viol, torch.zeros_like(iters)
            better = viol < 0.999 * best
            best = torch.where(better, viol, best)
            since = torch.where(better, 0, since + 1)
            stalled = ~done & (since >= self.patience) & (viol > 1e3 * tol * cscale)
            status = torch.where(stalled, INFEASIBLE, status)
            done = done | stalled
            if bool(done.all()) or (it == self.max_iter and not bool(cand.any())):
                break
            live = ~done
            if k:  # the barrier parameter falls once its problem is solved to 10τ
                for _ in range(4):
                    err = torch.maximum(torch.maximum(opt, viol / cscale), (s * z - tau.unsqueeze(-1)).abs().amax(-1) / scale)
                    dec = live & (err <= 10 * tau / scale) & (tau > tau_min)
                    tau = torch.where(dec, torch.maximum(tau_min, torch.minimum(0.2 * tau, tau**1.5)), tau)
            # the Newton step
            D = z / torch.where(s > 0, s, torch.ones_like(s))
            H = kl.hessian.dense()
            M = H + torch.bmm(Jg.transpose(1, 2) * D.unsqueeze(1), Jg)
            rhs = -rd - _bmv(Jg.transpose(1, 2), D * ri - z + tau.unsqueeze(-1) / s) if k else -rd
            M = 0.5 * (M + M.transpose(1, 2))
            if m:  # H + c J_hᵀJ_h is positive definite for a large c when H is so on null(J_h): the same step
                c = self._augmentation(M, Jh, live)
                M = M + c[:, None, None] * torch.bmm(Jh.transpose(1, 2), Jh)
                rhs = rhs - c.unsqueeze(-1) * _bmv(Jh.transpose(1, 2), h)
            L, _, _ = damped_cholesky(M, live)
            Y = torch.cholesky_solve(torch.cat((rhs.unsqueeze(-1), Jh.transpose(1, 2)), -1), L)
            Mr, MJ = Y[..., 0], Y[..., 1:]
            if m:
                S = torch.bmm(Jh, MJ)
                S = S + 1e-13 * S.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)[:, None, None] * torch.eye(
                    m, dtype=dt, device=dev)
                dlam = torch.linalg.solve_ex(S, (_bmv(Jh, Mr) + h).unsqueeze(-1))[0].squeeze(-1)
                du = Mr - _bmv(MJ, dlam)
            else:
                dlam, du = lam, Mr
            ds = -ri - _bmv(Jg, du)
            dz = (tau.unsqueeze(-1) - s * z - z * ds) / torch.where(s > 0, s, torch.ones_like(s))
            if bool(cand.any()):  # as Newton's test: the step to u* at √tol of ‖u‖ (or 1)
                conv = cand & (du.norm(dim=-1) <= tol**0.5 * U.norm(dim=-1).clamp_min(1.0))
                status = torch.where(conv, CONVERGED, status)
                done = done | conv
                live = live & ~conv
                if it == self.max_iter or bool(done.all()):
                    break
            kappa = 0.995
            a_s = _fraction_to_boundary(s, ds, kappa)
            a_z = _fraction_to_boundary(z, dz, kappa)
            nu_new = torch.cat((lam + dlam, z + dz), -1) if m + k else lam
            if m + k:
                rho = torch.maximum(rho, 1.5 * nu_new.abs().amax(-1).nan_to_num(0.0) + 1.0)
            # backtracking on the merit function
            phi0 = self._merit(f, h, g, s, tau, rho)
            dphi = (gf * du).sum(-1) - rho * (h.abs().sum(-1) + ri.abs().sum(-1))
            if k:
                dphi = dphi - tau * (ds / s).sum(-1)
            dphi = torch.where(torch.isfinite(dphi), dphi.clamp(max=0.0), torch.zeros_like(dphi))
            step = torch.isfinite(du).all(-1) & torch.isfinite(ds).all(-1) & live
            alpha = torch.where(step, a_s, torch.zeros_like(a_s))
            accepted = torch.zeros_like(live)
            U_new, s_new = U, s
            slack = 1e3 * torch.finfo(dt).eps * phi0.abs().nan_to_num(0.0).clamp_min(1.0)
            for trial in range(40):
                cand_u = U + alpha.unsqueeze(-1) * du
                cand_s = s + alpha.unsqueeze(-1) * ds
                f_c, C_c = self._evaluate(problem, cand_u)
                h_c, g_c = C_c[:, :m], C_c[:, m:]
                phi_c = self._merit(f_c, h_c, g_c, cand_s, tau, rho)
                ok = step & ~accepted & torch.isfinite(phi_c) & (phi_c <= phi0 + 1e-4 * alpha * dphi + slack)
                if trial == 0 and m:  # second-order correction of the equalities for a rejected full step
                    soc = step & ~ok & (alpha == 1)
                    if bool(soc.any()):
                        corr = _bmv(torch.linalg.pinv(Jh), h_c)  # (B, q): the least-norm fix of h
                        soc = soc & (corr.norm(dim=-1) <= du.norm(dim=-1))  # a local device: small corrections only
                        cu = cand_u - corr
                        f_s, C_s = self._evaluate(problem, cu)
                        cs = cand_s
                        phi_s = self._merit(f_s, C_s[:, :m], C_s[:, m:], cs, tau, rho)
                        ok_s = soc & torch.isfinite(phi_s) & (phi_s <= phi0 + 1e-4 * dphi + slack)
                        U_new = torch.where(ok_s.unsqueeze(-1), cu, U_new)
                        s_new = torch.where(ok_s.unsqueeze(-1), cs, s_new)
                        accepted = accepted | ok_s
                U_new = torch.where(ok.unsqueeze(-1), cand_u, U_new)
                s_new = torch.where(ok.unsqueeze(-1), cand_s, s_new)
                accepted = accepted | ok
                if bool((accepted | ~step).all()):
                    break
                alpha = torch.where(accepted, alpha, 0.5 * alpha)
            stuck = live & ~accepted
            status = torch.where(stuck, NO_DESCENT, status)
            done = done | stuck
            moved = live & accepted
            a_d = torch.where(moved, a_z, torch.zeros_like(a_z))
            U = torch.where(moved.unsqueeze(-1), U_new, U)
            s = torch.where(moved.unsqueeze(-1), s_new, s)
            z = z + a_d.unsqueeze(-1) * dz if k else z
            iters = iters + moved.long()

        # the multipliers: λ, and z on the active inequalities (z > s), zero elsewhere
        active = z > s
        mu = torch.where(active, z, torch.zeros_like(z))
        mult, _ = cons.report(problem, U, lam, mu)
        conv = status == CONVERGED
        if bool(conv.any()):
            U, mult, pd = self._refined_polish(problem, U, mult, conv)
            status = torch.where(conv & ~pd, NOT_MINIMUM, status)
        tol_c = tol * (cscale if cscale is not None else U.new_ones(B))
        # (a NONFINITE ending at a finite point with finite f is the multipliers' blow-up of constraints
        # that cannot be met, not a non-finite objective)
        finite_end = torch.isfinite(U).all(-1) & torch.isfinite(problem.value(U))
        infeasible = ((status != CONVERGED) & ((status != NONFINITE) | finite_end)
                      & torch.isfinite(mult.violation) & (mult.violation > 1e3 * tol_c))
        status = torch.where(infeasible, INFEASIBLE, status)
        mult = Multipliers(mult.eq, mult.ineq, mult.active, mult.weakly_active, mult.kkt_residual, mult.violation)
        return Solution(U, converged=status == CONVERGED, iterations=iters, grad_norm=mult.kkt_residual,
                        status=status, multipliers=mult)

    @classmethod
    def _refined_polish(cls, problem: Problem, U: Tensor, mult: Any, conv: Tensor) -> tuple[Tensor, Any, Tensor]:
        """:meth:`_polish`, and where its step is refused, again on a corrected guess of the active set
        (a few times): an inequality whose Newton multiplier came out negative leaves it, one that the
        step violated joins it. The barrier's guess (``z > s``) is ambiguous where an inequality is
        within about the barrier's offset of its bound: both ``s`` and ``z`` are small there, and a
        wrong guess left the barrier's point (off by about 1e-6) with a multiplier on an inactive
        inequality, and a zero gradient, reported converged."""
        from .constraints import _tolerances

        _, zero = _tolerances(U.dtype)
        barrier = mult  # the barrier's report, for samples no step could be kept for
        todo, pd_all = conv, torch.ones_like(conv)
        for attempt in range(4):
            U, mult, pd, kept, mu_try, g_try = cls._polish(problem, U, mult, todo)
            pd_all = torch.where(todo, pd, pd_all)
            todo = todo & ~kept
            if attempt == 3 or not bool(todo.any()) or mult.active is None or mult.active.shape[1] == 0:
                break
            scale_g = zero * U.abs().amax(-1, keepdim=True).clamp_min(1.0)
            scale_mu = zero * mu_try.abs().amax(-1, keepdim=True).clamp_min(1.0)
            guess = (mult.active & ~(mu_try < -scale_mu)) | (g_try > scale_g)
            changed = todo & (guess != mult.active).any(-1)
            if not bool(changed.any()):
                break
            todo = changed
            mult = type(mult)(mult.eq, mult.ineq, torch.where(changed.unsqueeze(-1), guess, mult.active),
                              mult.weakly_active, mult.kkt_residual, mult.violation)
        if bool(todo.any()):  # no step kept: the barrier's point keeps the barrier's own report (not a guess)
            pick = lambda a, b: None if a is None else torch.where(todo.reshape(-1, *([1] * (a.dim() - 1))), a, b)  # noqa: E731
            mult = type(mult)(*(pick(a, b) for a, b in zip(
                (barrier.eq, barrier.ineq, barrier.active, barrier.weakly_active, barrier.kkt_residual,
                 barrier.violation),
                (mult.eq, mult.ineq, mult.active, mult.weakly_active, mult.kkt_residual, mult.violation))))
        return U, mult, pd_all

    @staticmethod
    def _polish(problem: Problem, U: Tensor, mult: Any, conv: Tensor) -> tuple[Tensor, ...]:
        """One Newton step on the KKT system of the active set, ``[H J_Aᵀ; J_A 0][Δu; ν] = −[∇f; c_A]``,
        which removes the barrier's ``O(τ)`` offset; kept per sample where the KKT residual does not grow
        and the multipliers stay consistent. Returns ``(U, multipliers, pd)``, ``pd`` (B,): the Lagrangian
        Hessian is positive definite on the tangent space of the active constraints (at the point kept),
        ``kept`` (B,), and the step's inequality multipliers and values ``(B, k)`` (kept or not)."""
        cons = problem.constraints
        B, q = U.shape
        rows, valid = compact(cons.active_rows(Solution(U, multipliers=mult), B, U.device))
        kl = KKTLinearization(problem, U, mult.stacked())
        C = kl.values
        gf = kl.objective_terms[1]
        jac = ConstraintJacobian(kl.jacobian(rows, valid), valid)
        H = kl.hessian.dense()
        pd = tangent_positive_definite(H, jac)
        r = jac.rows
        pad = torch.diag_embed((~valid).to(H.dtype))
        K = torch.cat((torch.cat((H, jac.J.transpose(1, 2)), 2), torch.cat((jac.J, pad), 2)), 1)
        cA = torch.where(valid, C.gather(1, rows), torch.zeros_like(valid, dtype=C.dtype))
        sol, info = torch.linalg.solve_ex(K, -torch.cat((gf, cA), -1).unsqueeze(-1))
        sol = sol.squeeze(-1)
        du, nu_a = sol[:, :q], torch.where(valid, sol[:, q:], torch.zeros_like(sol[:, q:]))
        U_new = U + du
        nu = scatter_rows(nu_a, rows, valid, C.shape[1])
        lam, mu = cons.split(nu)
        new, consistent = cons.report(problem, U_new, lam, mu)
        g_new = cons.split(KKTLinearization(problem, U_new, None).values)[1]
        slack = 1e3 * torch.finfo(U.dtype).eps
        keep = (conv & pd & (info == 0) & torch.isfinite(du).all(-1) & consistent
                & (new.kkt_residual <= mult.kkt_residual + slack * gf.norm(dim=-1).clamp_min(1.0))
                & (new.violation <= mult.violation + slack))
        k = keep.unsqueeze(-1)
        U = torch.where(k, U_new, U)
        pick = lambda a, b: None if a is None else torch.where(keep.reshape(-1, *([1] * (a.dim() - 1))), a, b)  # noqa: E731
        mult = type(mult)(*(pick(a, b) for a, b in zip(
            (new.eq, new.ineq, new.active, new.weakly_active, new.kkt_residual, new.violation),
            (mult.eq, mult.ineq, mult.active, mult.weakly_active, mult.kkt_residual, mult.violation))))
        return U, mult, pd, keep, mu, g_new

    @staticmethod
    def _merit(f: Tensor, h: Tensor, g: Tensor, s: Tensor, tau: Tensor, rho: Tensor) -> Tensor:
        phi = f + rho * (h.abs().sum(-1) + (g + s).abs().sum(-1))
        if s.shape[-1]:
            phi = phi - tau * torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)).sum(-1)
        return phi

    @staticmethod
    def _evaluate(problem: Problem, U: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            C = problem.constraints.values(problem.V, problem.shaped(U), problem.mask, problem.inputs)
        return problem.value(U), C

    def __repr__(self) -> str:
        return f"InteriorPoint(tol={self.tol}, max_iter={self.max_iter})"
