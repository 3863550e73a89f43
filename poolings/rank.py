r"""Rank pooling (Fernando & Gould, ICML 2016): the pooled vector is the ranking machine
fitted to the frames of one sequence.

Per sequence with valid steps ``v_1 … v_T`` (its own ``T``; targets ``y_t = t``)::

    f(v, u) = ½‖u‖² + C/2 Σ_t [ |y_t − uᵀv_t| − ε ]₊²          u* = argmin_u f(v, u)

This is liblinear's L2-loss support-vector regression without bias (``-s 11``) with
liblinear's ``C`` equal to ``C/2`` here. With ``r_t = y_t − uᵀv_t``, the active set
``A = {t : |r_t| > ε}``, the signs ``s_t = sign(r_t)`` and ``e_t = r_t − s_t ε`` on ``A``::

    ∇_u f  = u − C Σ_{t∈A} e_t v_t
    ∇²_uu f = I + C V_Aᵀ V_A                                 (identity + T rank-one terms)

**Forward (T-space active-set / semismooth Newton).** ``u`` lies in the span of the
``v_t``: ``u = Vᵀβ``. With the Gram matrix ``K = V Vᵀ`` (one batched GEMM, the only
``O(T² p)`` step) and ``D = diag(1_A)`` on valid steps, each iteration solves the
quadratic model of a signed active set in capacitance form::

    (I + C D K D) β = C D (y − s ε),        r = y − K β   (no pass over V)

(see :func:`rank_pool_solve` for the sets tried, the line search and the stopping rule).
A sample stops when the **signed** active set (``A`` and every ``s_t``) is reproduced by
the new point (the point is then the exact minimiser) or when its relative gradient is
below ``tol``. Stopping on the unsigned set is wrong: from ``u = 0`` every ``t`` is active
with ``s_t = +1``, and the first solve can flip signs while keeping every ``t`` active.
The ``T × T`` iterations run in float64 whatever the dtype of ``V`` (they cost ``O(T³)``,
little beside the Gram product), so the factorisation never breaks down in float32 and
the active set is not decided by float32 rounding. ``u = Vᵀβ`` is the second and last
pass over ``V``.

**Backward (exact, T-space).** With ``w = H⁻¹ g`` (Woodbury, reusing the forward Cholesky
factor of ``I + C D K D``)::

    w = g − C V_Aᵀ (I + C K_AA)⁻¹ V_A g
    dL/dv_t = C ( e_t w − (wᵀv_t) u )   for t ∈ A,   0 otherwise

formed as one batched rank-2 product ``[e, −Vw] (B,T,2) @ [w; u] (B,2,p)``. The paper's
diagonal approximation replaces ``H⁻¹`` by ``1 / diag(H)``, ``diag(H) = 1 + C Σ_{t∈A} v_t²``.

``f`` is C¹ but not C² where ``|r_t| = ε`` for some ``t``: there ``u*`` is not
differentiable (a set of measure zero), and the gradient returned is that of the active set
found by the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from argminlayers import ArgminLayer, LowRankHessian, Objective, Solution, step_positions

from .base import Pooling
from .preprocess import l2_normalize, reverse_sequences, signed_sqrt, time_varying_mean

__all__ = [
    "RankPool",
    "RankPoolObjective",
    "RankPoolState",
    "check_rank_params",
    "rank_pool_solve",
    "rank_targets",
    "signed_active_set",
]


# ---------------------------------------------------------------------------------- helpers
def check_rank_params(C: Any, eps: Any) -> tuple[float, float]:
    """Finite ``C > 0`` and finite ``eps ≥ 0``, as floats; errors name the argument."""
    for name, value in (("C", C), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(C), float(eps)


rank_targets = step_positions  # y: (B, T), y_t = t counted over valid steps, zero at padded steps


def signed_active_set(r: Tensor, mask: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(A, s)``: ``A = (|r| > ε) & mask`` (bool) and ``s = sign(r)`` on ``A``, 0 elsewhere. ``(B, T)``."""
    active = (r.abs() > eps) & mask
    sign = torch.where(active, torch.sign(r), torch.zeros((), dtype=r.dtype, device=r.device))
    return active, sign


def _excess(r: Tensor, sign: Tensor, eps: float) -> Tensor:
    """``e = r − s ε`` on the active set (``s ≠ 0``), 0 elsewhere."""
    return torch.where(sign != 0, r - sign * eps, torch.zeros((), dtype=r.dtype, device=r.device))


def _loss(r: Tensor, mask: Tensor, eps: float) -> Tensor:
    """``Σ_t [|r_t| − ε]₊²`` over valid steps (last dimension)."""
    return ((r.abs() - eps).clamp_min(0).square() * mask).sum(-1)


def _frames_dot(V: Tensor, x: Tensor) -> Tensor:
    """``(V x)_t = v_tᵀ x``: ``(B, T, p), (B, p) → (B, T)``, one pass over ``V``.

    Written as the row-vector product ``xᵀ Vᵀ`` ``(B, 1, p) @ (B, p, T)``: on CPU this batched
    GEMV is several times faster than ``V @ x`` ``(B, T, p) @ (B, p, 1)`` (measured 1.8 vs 7.8 ms
    at B=16, T=100, p=4096, float32, one thread).
    """
    return torch.bmm(x.unsqueeze(1), V.transpose(1, 2)).squeeze(1)


def _sym_matvec(K: Tensor, x: Tensor) -> Tensor:
    """``K x`` for symmetric ``K: (B, T, T)``, ``x: (B, T)``, as the faster row-vector product ``xᵀK``."""
    return torch.bmm(x.unsqueeze(1), K).squeeze(1)


def _capacitance(K: Tensor, active: Tensor, C: float) -> Tensor:
    """``I + C D K D``, ``(B, T, T)``: identity rows/columns at inactive and padded steps."""
    outer = active.unsqueeze(-1) & active.unsqueeze(-2)
    M = torch.where(outer, K, torch.zeros((), dtype=K.dtype, device=K.device)).mul_(C)
    M.diagonal(dim1=-2, dim2=-1).add_(1)
    return M


@dataclass
class RankPoolState:
    """What the forward solve leaves for the backward pass (all at the returned ``u``).

    Attributes:
        factor: ``(B, T, T)`` lower Cholesky factor of ``I + C D K D`` (dtype of ``V``), the
            capacitance matrix of ``H = I + C V_Aᵀ V_A``.
        active: ``(B, T)`` bool, the active set ``A`` the factor belongs to.
        e: ``(B, T)`` ``e_t = r_t − s_t ε`` on ``A``, 0 elsewhere (dtype of ``V``).
    """

    factor: Tensor
    active: Tensor
    e: Tensor


# ------------------------------------------------------------------------------ the solve
def rank_pool_solve(
    V: Tensor,
    mask: Tensor,
    C: float,
    eps: float,
    *,
    tol: float = 1e-10,
    check_tol: float = 1e-6,
    max_iter: int = 50,
) -> Solution:
    """Exact rank-pool minimiser by a batched T-space active-set (semismooth Newton) method.

    ``u = Vᵀβ``, ``K = V Vᵀ``, ``r = y − Kβ``. Each iteration solves, for up to two signed
    sets ``(A, s)`` per sample at once (one batched Cholesky),

        (I + C D K D) β' = C D (y − s ε),   D = diag(1_A),      r' = y − K β'

    - the **semismooth Newton** set of the current point: ``A = {|r_t| > ε}``, ``s = sign(r)``;
      ``β' − β`` is the Newton direction of ``f``;
    - the **primal–dual** set: the support of ``β`` (``β_t = C e_t`` on the active set, so
      ``sign(β_t)`` is the side of the tube ``t`` was on) plus ``{β_t = 0, |r_t| > ε}``.
      A step whose residual has crossed into the tube keeps its weight and flips its sign
      instead of being dropped; without it, data whose steps must cross the tube (every
      ``|r_t| ≈ ε`` at the optimum, common when ``C K`` is large) re-enter one line-search
      step at a time (tens of iterations instead of 2–4).

    A sample has converged when either new point is optimal: its own signed set is
    reproduced (exact minimiser up to rounding) with ``‖∇_u f‖ ≤ check_tol · scale``, or
    ``‖∇_u f‖ ≤ tol · scale``, where ``scale = ‖u‖ + C Σ_{t∈A} |e_t| ‖v_t‖`` is the size of the
    terms that cancel in ``∇_u f = u − C Σ_A e_t v_t``. Otherwise it moves to the new point
    with the lower ``f`` if that decreases ``f``, else along the Newton direction with an
    exact line search (``f`` is a convex piecewise quadratic along the line; see
    :func:`_exact_line_search`). ``f`` decreases at every step, so no set is visited twice.

    Args:
        V: ``(B, T, p)`` features, padded steps zero.
        mask: ``(B, T)`` bool, valid steps (they are never active).
        tol, check_tol: the two optimality tolerances above.
        max_iter: iterations per sample.

    Returns:
        :class:`~argminlayers.Solution` with ``u (B, p)`` in the dtype of ``V``, per-sample
        ``converged``, ``iterations``, ``grad_norm`` (``‖∇_u f‖``, measured in T-space as
        ``sqrt(γᵀKγ)`` with ``∇_u f = Vᵀγ``) and a :class:`RankPoolState` whose factor belongs
        to the set that produced the returned point.

    Cost: one Gram GEMM ``K = V Vᵀ`` and one pass ``u = Vᵀβ`` over ``V``; each iteration is a
    batched ``T × T`` Cholesky and ``O(T²)`` work, in float64 whatever the dtype of ``V``. Only
    live samples are worked on, a second set only where it differs from the first, and a set
    whose ``A`` is the one last factorised for its sample (a solve that flipped signs only)
    reuses that factor. No Python loop over the batch.
    """
    B, T, _ = V.shape
    wd = torch.float64
    dev = V.device
    K = torch.bmm(V, V.transpose(1, 2)).to(wd)  # (B, T, T): the only GEMM over V
    y = rank_targets(mask, wd)  # (B, T)
    tiny = torch.finfo(wd).tiny
    zero = torch.zeros((), dtype=wd, device=dev)
    inf = torch.full((), float("inf"), dtype=wd, device=dev)

    def value(beta: Tensor, r: Tensor, y: Tensor, m: Tensor) -> Tensor:  # ½βᵀKβ + C/2 Σ[|r| − ε]₊², Kβ = y − r
        return 0.5 * (beta * (y - r)).sum(-1) + 0.5 * C * _loss(r, m, eps)

    beta = torch.zeros(B, T, dtype=wd, device=dev)
    r = y.clone()
    f = value(beta, r, y, mask)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    failed = torch.zeros_like(done)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    # the returned point and the signed set / factor that produced it, filled as samples finish
    beta_out, r_out = beta.clone(), r.clone()
    L_out = torch.zeros(B, T, T, dtype=wd, device=dev)
    act_out = torch.zeros(B, T, dtype=torch.bool, device=dev)
    sgn_out = torch.zeros(B, T, dtype=wd, device=dev)
    L_cache = torch.zeros(B, T, T, dtype=wd, device=dev)  # last factor of each sample, of the set A_cache
    A_cache = torch.zeros(B, T, dtype=torch.bool, device=dev)
    cached = torch.zeros(B, dtype=torch.bool, device=dev)

    for _ in range(max_iter):
        # work only on the live samples, and on a second candidate only where its set differs
        idx = (~done & ~failed).nonzero().squeeze(-1)  # (n,)
        n = idx.numel()
        if n == 0:
            break
        iters[idx] += 1
        Kl = K if n == B else K[idx]  # (n, T, T); no copy while every sample is live
        yl, ml, bl, rl, fl = y[idx], mask[idx], beta[idx], r[idx], f[idx]
        act1, sgn1 = signed_active_set(rl, ml, eps)  # semismooth Newton set
        support = bl != 0
        act2 = (support | (rl.abs() > eps)) & ml  # primal-dual set
        sgn2 = torch.where(act2, torch.where(support, torch.sign(bl), torch.sign(rl)), zero)
        j = ((act1 != act2) | (sgn1 != sgn2)).any(-1).nonzero().squeeze(-1)  # (m,)
        if j.numel() == 0:
            Kc, yc, mc, act, sgn, owner = Kl, yl, ml, act1, sgn1, idx
        else:
            Kc, yc, mc = torch.cat((Kl, Kl[j])), torch.cat((yl, yl[j])), torch.cat((ml, ml[j]))
            act, sgn, owner = torch.cat((act1, act2[j])), torch.cat((sgn1, sgn2[j])), torch.cat((idx, idx[j]))

        # The capacitance matrix depends on A only, not on the signs: a row whose A is the
        # one its sample last factorised (typically: the first solve flipped signs only)
        # reuses that factor. The others are factorised, and become the sample's cache.
        L = L_cache[owner]  # (n + m, T, T)
        info = torch.zeros(owner.shape, dtype=torch.int32, device=dev)
        fresh = (~cached[owner] | (act != A_cache[owner]).any(-1)).nonzero().squeeze(-1)
        if fresh.numel():
            L_f, info_f = torch.linalg.cholesky_ex(_capacitance(Kc[fresh], act[fresh], C))
            L[fresh], info[fresh] = L_f, info_f
            keep = (fresh < n) & (info_f == 0)  # cache: the Newton set's factor, one row per sample
            L_cache[owner[fresh[keep]]], A_cache[owner[fresh[keep]]] = L_f[keep], act[fresh[keep]]
            cached[owner[fresh[keep]]] = True
        rhs = C * act.to(wd) * (yc - sgn * eps)  # C D (y − s ε)
        beta_n = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)  # (n + m, T)
        r_n = yc - _sym_matvec(Kc, beta_n)
        act_n, sgn_n = signed_active_set(r_n, mc, eps)
        stable = (act_n == act).all(-1) & (sgn_n == sgn).all(-1)
        gnorm_n, scale_n = _grad_norms(Kc, beta_n, r_n, yc, sgn_n, C, eps)
        rel_n = torch.where(gnorm_n > 0, gnorm_n / scale_n.clamp_min(tiny), zero)
        good = (info == 0) & torch.isfinite(rel_n) & torch.isfinite(beta_n).all(-1)
        optimal = good & ((rel_n <= tol) | (stable & (rel_n <= check_tol)))
        f_n = torch.where(good, value(beta_n, r_n, yc, mc), inf)

        # the candidate row of each live sample: an optimal one first (Newton's), else lower f
        first = torch.arange(n, device=dev)
        second = torch.full((n,), -1, dtype=torch.long, device=dev)
        second[j] = n + torch.arange(j.numel(), device=dev)
        has2 = second >= 0
        row2 = second.clamp_min(0)
        opt2 = has2 & optimal[row2]
        pick2 = ~optimal[:n] & (opt2 | (has2 & (f_n[row2] < f_n[:n])))
        row = torch.where(pick2, row2, first)
        finished = optimal[:n] | opt2
        jump = ~finished & (f_n[row] < fl)

        take = finished | jump
        moved = torch.zeros_like(take)
        if not bool(take.all()):
            # neither candidate decreases f: Newton direction with an exact line search.
            # K d = r − r_new, so the line search needs no product with K.
            d, dr = beta_n[:n] - bl, r_n[:n] - rl
            alpha = _exact_line_search(rl, dr, -(bl * dr).sum(-1), -(d * dr).sum(-1), ml, C, eps)
            moved = ~take & good[:n] & (alpha > 0)
            bl = torch.where(moved.unsqueeze(-1), bl + alpha.unsqueeze(-1) * d, bl)
            rl = torch.where(moved.unsqueeze(-1), rl + alpha.unsqueeze(-1) * dr, rl)
        bl = torch.where(take.unsqueeze(-1), beta_n[row], bl)
        rl = torch.where(take.unsqueeze(-1), r_n[row], rl)
        beta[idx], r[idx], f[idx] = bl, rl, value(bl, rl, yl, ml)

        fin = idx[finished]
        rows = row[finished]
        beta_out[fin], r_out[fin], L_out[fin] = beta_n[rows], r_n[rows], L[rows]
        act_out[fin], sgn_out[fin] = act[rows], sgn[rows]
        done[fin] = True
        failed[idx[~take & ~moved]] = True

    stopped = ~done
    if bool(stopped.any()):
        # not converged (max_iter, or no descent left): return the last iterate, with the
        # factor of its own active set so that the backward pass stays consistent.
        act, sgn = signed_active_set(r, mask, eps)
        L, _ = torch.linalg.cholesky_ex(_capacitance(K, act, C))
        s = stopped.unsqueeze(-1)
        beta_out, r_out = torch.where(s, beta, beta_out), torch.where(s, r, r_out)
        act_out, sgn_out = torch.where(s, act, act_out), torch.where(s, sgn, sgn_out)
        L_out = torch.where(s.unsqueeze(-1), L, L_out)

    _, sgn_true = signed_active_set(r_out, mask, eps)
    gnorm, scale = _grad_norms(K, beta_out, r_out, y, sgn_true, C, eps)
    # a sample stopped without finishing may still be optimal to tol
    done = done | (stopped & (gnorm <= tol * scale.clamp_min(tiny)))
    e_out = _excess(r_out, sgn_out, eps)
    U = torch.bmm(beta_out.to(V.dtype).unsqueeze(1), V).squeeze(1)  # (B, p): the second pass over V
    state = RankPoolState(factor=L_out.to(V.dtype), active=act_out, e=e_out.to(V.dtype))
    return Solution(U, converged=done, iterations=iters, grad_norm=gnorm.to(V.dtype), state=state)


def _exact_line_search(
    r: Tensor, dr: Tensor, bKd: Tensor, dKd: Tensor, mask: Tensor, C: float, eps: float
) -> Tensor:
    """``argmin_{α ≥ 0} φ(α)``, ``φ(α) = f(β + α d)``, exactly, for every sample; ``(B,)``.

    Along the line ``r(α) = r + α Δr`` and ``‖u(α)‖² = ‖u‖² + 2α βᵀKd + α² dᵀKd``, so

        φ'(α) = βᵀKd + α dᵀKd + C Σ_{t active at α} Δr_t (r_t − s_t ε + α Δr_t)

    is piecewise linear and non-decreasing (φ is convex), with a breakpoint wherever some
    ``r_t(α)`` crosses ``±ε``. The breakpoints are sorted, and the sums
    ``a = Σ Δr_t (r_t − s_t ε)``, ``b = Σ Δr_t²`` over the active steps are updated across
    them by one cumulative sum, so ``φ' = βᵀKd + C a + α (dᵀKd + C b)`` on every piece; the
    root lies on the last piece whose start has ``φ' ≤ 0``. ``O(T log T)`` per sample.
    Returns 0 where ``φ'(0) ≥ 0`` (no descent left).
    """
    with torch.no_grad():
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
        active, sign = signed_active_set(r, mask, eps)
        a0 = (torch.where(active, dr * (r - sign * eps), zero)).sum(-1)  # (B,)
        b0 = (torch.where(active, dr.square(), zero)).sum(-1)
        up = dr > 0
        # crossing +ε at α₊ = (ε − r)/Δr: entering (s = +1) when Δr > 0, leaving when Δr < 0;
        # crossing −ε at α₋ = (−ε − r)/Δr: leaving (s = −1) when Δr > 0, entering when Δr < 0.
        alpha_ev = torch.cat(((eps - r) / dr, (-eps - r) / dr), dim=-1)  # (B, 2T)
        enter = torch.cat((up, ~up), dim=-1)
        pm = torch.where(enter, 1.0, -1.0).to(r.dtype)
        da = pm * torch.cat((dr * (r - eps), dr * (r + eps)), dim=-1)
        db = pm * torch.cat((dr.square(), dr.square()), dim=-1)
        mask2 = torch.cat((mask, mask), dim=-1) & torch.isfinite(alpha_ev) & (torch.cat((dr, dr), -1) != 0)
        real = mask2 & ((alpha_ev > 0) | ((alpha_ev == 0) & enter))
        alpha_ev = torch.where(real, alpha_ev, inf)
        alpha_ev, order = alpha_ev.sort(dim=-1)
        real = torch.isfinite(alpha_ev)
        da = torch.where(real, torch.gather(da, -1, order), zero)
        db = torch.where(real, torch.gather(db, -1, order), zero)
        # piece k = 0..2T: [start_k, end_k] with sums a_k, b_k (piece 0 starts at α = 0)
        a = torch.cat((a0.unsqueeze(-1), a0.unsqueeze(-1) + torch.cumsum(da, -1)), dim=-1)  # (B, 2T+1)
        b = torch.cat((b0.unsqueeze(-1), b0.unsqueeze(-1) + torch.cumsum(db, -1)), dim=-1)
        start = torch.cat((torch.zeros_like(a0).unsqueeze(-1), torch.where(real, alpha_ev, zero)), dim=-1)
        exists = torch.cat((torch.ones_like(real[:, :1]), real), dim=-1)
        slope = dKd.unsqueeze(-1) + C * b  # φ'' on each piece
        g_start = bKd.unsqueeze(-1) + C * a + start * slope  # φ' at the start of each piece
        k = (exists & (g_start <= 0)).sum(-1, keepdim=True) - 1  # last piece starting with φ' ≤ 0
        k = k.clamp_min(0)
        s_k, g_k, c_k = (torch.gather(x, -1, k).squeeze(-1) for x in (start, g_start, slope))
        end_k = torch.gather(torch.cat((alpha_ev, inf.expand(r.shape[0], 1)), dim=-1), -1, k).squeeze(-1)
        alpha = s_k - g_k / torch.where(c_k > 0, c_k, inf)
        alpha = torch.minimum(torch.maximum(alpha, s_k), end_k)
        descent = g_start[:, 0] < 0
        return torch.where(descent & torch.isfinite(alpha), alpha, torch.zeros_like(alpha))


def _grad_norms(
    K: Tensor, beta: Tensor, r: Tensor, y: Tensor, sign: Tensor, C: float, eps: float
) -> tuple[Tensor, Tensor]:
    """``(‖∇_u f‖, scale)`` at ``u = Vᵀβ``, in T-space.

    ``∇_u f = Vᵀγ`` with ``γ = β − C e`` (``e`` on the set whose signs are ``sign``), so
    ``‖∇_u f‖² = γᵀKγ``. ``scale = ‖u‖ + C Σ_t |e_t| ‖v_t‖`` bounds the size of the terms
    that cancel in ``∇_u f = u − C Σ_t e_t v_t`` (``‖u‖² = βᵀKβ = βᵀ(y − r)``, ``‖v_t‖² = K_tt``):
    a relative gradient ``‖∇_u f‖ / scale`` near machine precision is a backward-stable solve.
    """
    e = _excess(r, sign, eps)
    gamma = beta - C * e
    g2 = (gamma * _sym_matvec(K, gamma)).sum(-1)
    u2 = (beta * (y - r)).sum(-1)
    terms = C * (e.abs() * K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()).sum(-1)
    return g2.clamp_min(0).sqrt(), u2.clamp_min(0).sqrt() + terms


# ------------------------------------------------------------------------------ objective
class RankPoolObjective(Objective):
    """The rank-pool objective ``f(v, u) = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²`` with fast paths.

    Batched methods take ``V: (B, T, p)`` (padded steps zero), ``U: (B, p)`` and ``mask: (B, T)``
    bool; targets count valid steps, ``y = cumsum(mask) · mask``. ``f`` itself (per sample, torch
    ops) serves the generic :mod:`torch.func` paths and cross-checks.

    Args:
        C: regularisation, ``> 0`` (liblinear's ``C`` is ``C/2``).
        eps: insensitive zone ``ε ≥ 0``.
        tol, check_tol, max_iter: of :func:`rank_pool_solve`.
    """

    low_rank_hessian = True
    sequence = True

    def __init__(self, C: float = 1.0, eps: float = 0.1, *, tol: float = 1e-10, check_tol: float = 1e-6,
                 max_iter: int = 50):
        self.C, self.eps = check_rank_params(C, eps)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        check_tol = max(float(check_tol), float(tol))  # the looser test can never be the tighter one
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.tol, self.check_tol, self.max_iter = float(tol), float(check_tol), max_iter

    def __repr__(self) -> str:
        return f"RankPoolObjective(C={self.C:g}, eps={self.eps:g})"

    # per sample, for torch.func
    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        """``v: (T, p)``, ``u: (p,)``, ``mask: (T,)`` → scalar."""
        r = rank_targets(mask, v.dtype) - v @ u  # (T,)
        return 0.5 * (u @ u) + 0.5 * self.C * ((r.abs() - self.eps).clamp_min(0).square() * mask).sum()

    # batched fast paths
    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        """:func:`rank_pool_solve` with this objective's ``C``, ``eps`` and tolerances."""
        return rank_pool_solve(V, mask, self.C, self.eps, tol=self.tol, check_tol=self.check_tol,
                               max_iter=self.max_iter)

    def _residuals(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``r = y − V u``, ``(B, T)``: one pass over ``V``."""
        return rank_targets(mask, V.dtype) - _frames_dot(V, U)

    def _active_and_excess(self, V: Tensor, U: Tensor, mask: Tensor, state: Any) -> tuple[Tensor, Tensor]:
        """``(A, e)`` from the forward state when there is one, else from ``U``."""
        if isinstance(state, RankPoolState):
            return state.active, state.e
        r = self._residuals(V, U, mask)
        active, sign = signed_active_set(r, mask, self.eps)
        return active, _excess(r, sign, self.eps)

    def value(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``f``, ``(B,)``."""
        return 0.5 * U.square().sum(-1) + 0.5 * self.C * _loss(self._residuals(V, U, mask), mask, self.eps)

    def grad(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``∇_u f = u − C Σ_{t∈A} e_t v_t = u − C Vᵀ e``, ``(B, p)``."""
        r = self._residuals(V, U, mask)
        _, sign = signed_active_set(r, mask, self.eps)
        e = _excess(r, sign, self.eps)
        return U - self.C * torch.bmm(e.unsqueeze(1), V).squeeze(1)

    def hvp(self, V: Tensor, U: Tensor, mask: Tensor, X: Tensor) -> Tensor:
        """``H x = x + C V_Aᵀ (V_A x)``, ``(B, p)``."""
        active, _ = signed_active_set(self._residuals(V, U, mask), mask, self.eps)
        Vx = _frames_dot(V, X) * active  # (B, T)
        return X + self.C * torch.bmm(Vx.unsqueeze(1), V).squeeze(1)

    def hessian_diag(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> Tensor:
        """``diag(H) = 1 + C Σ_{t∈A} v_t²``, ``(B, p)`` (what the ``diagonal`` strategy uses)."""
        return self.hessian(V, U, mask, state).diagonal()

    def hessian(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> LowRankHessian:
        """``H = I + Aᵀ A`` with ``A = √C D V`` (rows ``√C v_t`` on ``A``, zero elsewhere),
        passed as ``V`` with a row scale, so no scaled copy of ``V`` is made.

        With the forward state, ``capacitance_factor`` is the forward Cholesky factor of
        ``I + A Aᵀ = I + C D K D``, so the Woodbury strategy solves with it directly.
        Without it (a generic solver), the active set comes from ``U`` and the Woodbury
        strategy factorises the capacitance matrix itself, only when it is used.
        """
        if isinstance(state, RankPoolState):
            active, factor = state.active, state.factor
        else:
            active, _ = signed_active_set(self._residuals(V, U, mask), mask, self.eps)
            factor = None
        scale = math.sqrt(self.C) * active.to(V.dtype)  # (B, T): rows √C v_t on A, no copy of V
        return LowRankHessian(torch.ones_like(U), V, row_scale=scale, capacitance_factor=factor)

    def vjp_v(self, V: Tensor, U: Tensor, mask: Tensor, W: Tensor, state: Any = None) -> Tensor:
        """``∂/∂v_t [wᵀ∇_u f] = −C (e_t w − (wᵀv_t) u)`` on ``A``, 0 elsewhere; ``(B, T, p)``.

        One pass for ``V w`` and one batched rank-2 product ``[e, −Vw] (B,T,2) @ [w; u] (B,2,p)``.
        """
        active, e = self._active_and_excess(V, U, mask, state)
        Vw = _frames_dot(V, W)  # (B, T)
        Vw = torch.where(active, Vw, torch.zeros((), dtype=Vw.dtype, device=Vw.device))
        coef = torch.stack((e, -Vw), dim=-1) * (-self.C)  # (B, T, 2)
        rows = torch.stack((W, U), dim=1)  # (B, 2, p)
        return torch.bmm(coef, rows)


# --------------------------------------------------------------------------------- module
class RankPool(Pooling):
    """Rank pooling as a differentiable layer: ``(B, T, p)`` (+ lengths) → ``(B, p)``, or ``(B, 2p)``
    when bidirectional.

    Args:
        C: regularisation ``> 0`` of ``f(v, u) = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²``
            (liblinear's ``-c`` is ``C/2``).
        eps: insensitive zone ``ε ≥ 0``.
        backward: ``"woodbury"`` (default: exact, reuses the forward factorisation),
            ``"diagonal"`` (the paper's approximation), ``"sherman_morrison"`` (the paper's
            Lemma 3, ``O(T p²)``), ``"cg"``, ``"dense"`` (``O(p³)``), or a strategy object.
        smoothing: time-varying mean ``m_t = (1/t) Σ_{τ≤t} v_τ`` before pooling.
        signed_sqrt: ``sign(x) sqrt|x|`` before pooling.
        normalize: L2-normalise every frame before pooling.
        bidirectional: also pool each sequence reversed and concatenate, ``[u_fwd, u_rev]``.
        solver: ``None`` (the exact T-space active-set solve) or a generic solver of
            :class:`~argminlayers.ArgminLayer` (``"newton"``, ``"lbfgs"``, ``"newton_cg"``).
        layer_options: ``on_nonconvergence``, ``damping``, and ``tol``/``max_iter`` (of the
            T-space solve when ``solver`` is ``None``, else of the named solver).

    Preprocessing runs in VideoDarwin's order: smoothing → signed sqrt → L2 normalisation;
    the reversed sequence of the bidirectional variant goes through the same chain.

    Example::

        >>> import torch
        >>> from poolings import RankPool
        >>> pool = RankPool(C=1.0, eps=0.1, bidirectional=True)
        >>> V = torch.randn(3, 8, 5, requires_grad=True)
        >>> U = pool(V, torch.tensor([8, 5, 2]))
        >>> U.shape
        torch.Size([3, 10])
        >>> U.sum().backward()
        >>> bool(V.grad[2, 2:].abs().sum() == 0)          # padded steps: zero gradient
        True
    """

    def __init__(
        self,
        C: float = 1.0,
        eps: float = 0.1,
        *,
        backward: Any = "woodbury",
        smoothing: bool = False,
        signed_sqrt: bool = False,
        normalize: bool = False,
        bidirectional: bool = False,
        solver: Any = None,
        **layer_options: Any,
    ):
        super().__init__()
        objective_options = {}
        if solver is None:  # tol / max_iter configure the T-space solve itself
            objective_options = {k: layer_options.pop(k) for k in ("tol", "max_iter") if k in layer_options}
            objective_options = {k: v for k, v in objective_options.items() if v is not None}
        self.objective = RankPoolObjective(C, eps, **objective_options)
        self.layer = ArgminLayer(self.objective, backward=backward, solver=solver, **layer_options)
        self.C, self.eps = self.objective.C, self.objective.eps
        self.smoothing, self.signed_sqrt = bool(smoothing), bool(signed_sqrt)
        self.normalize, self.bidirectional = bool(normalize), bool(bidirectional)

    def extra_repr(self) -> str:
        return (
            f"C={self.C:g}, eps={self.eps:g}, smoothing={self.smoothing}, signed_sqrt={self.signed_sqrt}, "
            f"normalize={self.normalize}, bidirectional={self.bidirectional}"
        )

    def output_dim(self, p: int) -> int:
        return 2 * p if self.bidirectional else p

    def preprocess(self, V: Tensor, mask: Tensor) -> Tensor:
        """The enabled preprocessing, in VideoDarwin's order; ``(B, T, p)``, padded steps zero."""
        if self.smoothing:
            V = time_varying_mean(V, mask)
        if self.signed_sqrt:
            V = signed_sqrt(V)
        if self.normalize:
            V = l2_normalize(V, mask)
        return V

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``V: (B, T, p)``, ``lengths: (B,)`` integers or a ``(B, T)`` bool mask → ``(B, output_dim(p))``."""
        if not (self.smoothing or self.signed_sqrt or self.normalize or self.bidirectional):
            return self.layer(V, lengths)  # the layer validates V and the lengths/mask once
        return super().forward(V, lengths)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        # V is validated and its padded steps are zero (Pooling.forward); preprocessing keeps them zero
        if self.bidirectional:
            V = torch.cat((V, reverse_sequences(V, mask)), dim=0)  # (2B, T, p)
            mask = torch.cat((mask, mask), dim=0)
        U = self.layer.forward_masked(self.preprocess(V, mask), mask)
        if self.bidirectional:
            U = torch.cat(U.chunk(2, dim=0), dim=1)  # (B, 2p)
        return U
