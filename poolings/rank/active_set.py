r"""The active-set (semismooth Newton) iteration every rank-pool method runs.

``f`` is a convex piecewise quadratic: on each **signed set** ``(A, s)`` (the steps outside the
tube and the side each is on) it is the quadratic

    f_{A,s}(u) = ½‖u‖² + C/2 Σ_{t∈A} (y_t − s_t ε − uᵀv_t)²

whose minimiser solves ``(I + C V_Aᵀ V_A) u = C V_Aᵀ (y − s ε)_A``. A *space* (T-space,
p-space, Newton-CG; see :class:`Space`) computes that minimiser for a set; this module decides
which sets to try, which point to move to and when to stop, the same way for every space.

Each iteration, for every live sample (no Python loop over the batch):

1. **Check the current point.** Its signed set ``(A, s)`` and relative gradient
   ``‖∇_u f‖ / (‖u‖ + C Σ_{t∈A} |e_t| ‖v_t‖)`` (the denominator is the size of the terms that
   cancel in ``∇_u f = u − C Σ_A e_t v_t``). The sample is **done** when the point is the
   exact minimiser of its own piece and that set is reproduced there (``A`` *and every sign*)
   with a gradient ``≤ check_tol`` times its piece's scale (:func:`piece_scale`), or when the
   relative gradient is ``≤ tol``.
   Stopping on the unsigned set is wrong: from ``u = 0`` every step is active with
   ``s_t = +1``, and the first solve can flip signs while keeping every step active.
2. **Two candidate sets** (spaces with exact solves):

   - the semismooth Newton set of the current point, ``A = {|r_t| > ε}``, ``s = sign(r)``:
     its minimiser minus the current point is the Newton direction of ``f``;
   - the primal–dual set: the support of the dual weights ``β`` (``u = Vᵀβ``, ``β_t = C e_t``
     at a piece minimiser, so ``sign(β_t)`` is the side of the tube step ``t`` was on) plus
     ``{β_t = 0, |r_t| > ε}``. A step whose residual has crossed into the tube keeps its
     weight and flips its sign instead of being dropped; without it, data whose steps must
     cross the tube (every ``|r_t| ≈ ε`` at the optimum, common when ``C K`` is large)
     re-enter one line-search step at a time (tens of iterations instead of 2–4).

3. **Move.** To a candidate whose own set is reproduced (it is then the minimiser of ``f``),
   else to the candidate with the lower ``f`` if that decreases ``f``, else along the Newton
   direction with an exact line search (:func:`~poolings.rank.common.exact_line_search`).
   ``f`` decreases at every step, so no set is visited twice. Spaces with inexact solves
   (Newton-CG) move to their candidate only where its set is reproduced (its gradient is then
   the residual of the solve), and otherwise along it with the exact line search; they stop
   on the relative gradient only.

A sample with no descent left at working precision (no step, or a line-search step at the
rounding level of the measurements) is done if its relative gradient is already
``≤ check_tol`` (it sits at the rounding floor of the data, e.g. float32 features), and is
otherwise stopped. A sample stopped so, or still running after ``max_iter`` iterations, is
returned with ``converged = False`` (the layer then warns or raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import exact_line_search, loss


class Space:
    """How one method computes piece minimisers. The variable ``x`` is the method's own
    (``β`` in T-space, ``u`` in p-space), ``(B, q)`` in float64; residuals ``r = y − V u`` are
    ``(B, T)`` float64. A signed set is its sign vector ``s ∈ {−1, 0, 1}^T`` (0 off the set);
    ``k`` candidate sets come stacked, ``S: (B, k, T)``. Every method sees all ``B`` samples;
    ``live`` (``(B,)`` bool) says which still iterate, and a method may skip work for the others.

    Attributes:
        exact: whether :meth:`solve` returns the exact minimiser of each piece.
        candidates: 2 (Newton and primal–dual sets) or 1 (Newton set only).
        y: ``(B, T)`` targets; mask: ``(B, T)`` valid steps.
    """

    exact: bool = True
    candidates: int = 2
    y: Tensor
    mask: Tensor

    def zeros(self) -> Tensor:
        """``x`` at ``u = 0``, ``(B, q)``."""
        raise NotImplementedError

    def gradient(self, x: Tensor, u2: Tensor, r: Tensor, sign: Tensor, S: Tensor | None
                 ) -> tuple[Tensor, Tensor]:
        """``(‖∇_u f‖, scale)`` at the current points, ``(B,)`` each (``sign``: the signed set at
        ``r``, ``u2 = ‖u‖²``). ``S`` are the candidate sets :meth:`solve` will be asked for
        next (``None``: none), so that a method may compute what they need in the same pass."""
        raise NotImplementedError

    def solve(self, x: Tensor, S: Tensor, live: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Minimisers of the pieces ``S (B, k, T)`` for the live samples: ``X (B, k, q)``, their
        residuals ``R (B, k, T)``, ``‖u‖² (B, k)`` and ``good (B, k)`` (the solve succeeded)."""
        raise NotImplementedError

    def line_terms(self, x: Tensor, d: Tensor, r: Tensor, dr: Tensor) -> tuple[Tensor, Tensor]:
        """``(uᵀd_u, d_uᵀd_u)`` for the direction ``d`` in ``x`` (``dr = −V d_u``), ``(B,)`` each."""
        raise NotImplementedError

    def commit(self, choice: Tensor) -> None:
        """Keep what :meth:`solve` computed for candidate ``choice[b]`` (``−1``: nothing)."""

    def residuals(self, x: Tensor) -> Tensor:
        """``r = y − V u`` at ``x``, ``(B, T)`` (spaces with inexact solves only)."""
        raise NotImplementedError


@dataclass
class ActiveSetResult:
    """The returned points and their signed sets (float64 except the masks)."""

    x: Tensor  # (B, q)
    r: Tensor  # (B, T)
    active: Tensor  # (B, T) bool
    sign: Tensor  # (B, T)
    converged: Tensor  # (B,) bool
    iterations: Tensor  # (B,) long
    grad_norm: Tensor  # (B,)


def piece_scale(u2, y, sign, norms, C: float, eps: float):
    """``‖u‖ (1 + C Σ_A ‖v_t‖²) + C Σ_A |y_t − s_t ε| ‖v_t‖``, ``(B,)``: the size of the two
    terms that cancel in ``∇_u f = (I + C V_Aᵀ V_A) u − C V_Aᵀ (y − s ε)_A`` on the piece of the
    signed set ``sign``. A piece minimiser solved by a Cholesky factorisation has a gradient of
    about ``ε (1 + C ‖V_A‖²) ‖u‖`` (its backward error), which this scale bounds; the test of a
    reproduced set (``check_tol``) is relative to it. The plain relative gradient's scale
    (``‖u‖ + C Σ_A |e_t| ‖v_t‖``) leaves out the cancellation inside ``e_t = y_t − s_t ε − v_tᵀu``,
    which dominates where ``C ‖v_t‖² ≫ 1`` with small excesses: float64 frames of norm 1e5
    (2 × 50 × 64, ``C = 1``) stopped at a reproduced set with a relative gradient of 3e-6,
    ``ε (1 + C ‖V_A‖²) ‖u‖ / scale`` there, and ran out of iterations unconverged.
    Works on torch tensors and NumPy arrays alike."""
    act = sign != 0
    load = 1 + C * (norms * norms * act).sum(-1)
    return (u2 * (u2 > 0)) ** 0.5 * load + C * (abs(y - eps * sign) * norms * act).sum(-1)


def active_set_solve(space: Space, C: float, eps: float, *, tol: float, check_tol: float,
                     max_iter: int, step_floor: float = 0.0) -> ActiveSetResult:
    """Run the iteration described in the module docstring on ``space``; see there.
    ``step_floor``: a line-search step ``α‖d‖ ≤ step_floor · ‖x‖`` is rounding, not descent (the
    sample then counts as having none left)."""
    y, mask = space.y, space.mask
    B, T = y.shape
    dev, wd = y.device, y.dtype
    two = space.candidates == 2
    x = space.zeros()
    r = y.clone()
    beta = torch.zeros_like(y)  # dual weights, u = Vᵀβ
    u2 = torch.zeros(B, dtype=wd, device=dev)
    f = 0.5 * C * loss(r, mask, eps)
    stable = torch.zeros(B, dtype=torch.bool, device=dev)  # x is the minimiser of its own, reproduced piece
    live = torch.ones_like(stable)
    done = torch.zeros_like(stable)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    tiny = torch.finfo(wd).tiny
    mask_k = mask.unsqueeze(1)
    norms = space.norms

    for it in range(max_iter + 1):
        sgn1 = torch.sign(r) * ((r.abs() > eps) & mask)  # Newton set of the current point
        S = None
        if it < max_iter:
            S = sgn1.unsqueeze(1)
            if two:  # primal-dual set: the support of β with its signs, plus the Newton set
                S = torch.stack((sgn1, torch.where(beta != 0, torch.sign(beta), sgn1)), dim=1)
        g, scale = space.gradient(x, u2, r, sgn1, S)
        rel = g / scale.clamp_min(tiny)
        finished = live & ((rel <= tol) | (stable & (g <= check_tol * piece_scale(u2, y, sgn1, norms, C, eps))))
        gnorm = g  # a finished sample's point no longer moves: its g stays what it was
        done |= finished
        live &= ~finished
        if S is None or not bool(live.any()):
            break

        X, R, U2, good = space.solve(x, S, live)  # (B, k, q), (B, k, T), (B, k), (B, k)
        iters += live
        Rabs = R.abs()
        reproduced = (torch.sign(R) * ((Rabs > eps) & mask_k) == S).all(-1) & good
        F = 0.5 * U2 + 0.5 * C * ((Rabs - eps).clamp_min(0).square() * mask_k).sum(-1)
        F = F.masked_fill(~good, float("inf"))

        # the candidate of each sample: a reproduced one first (the Newton set's), else lower f.
        # An inexact solve is taken only where its set is reproduced (its gradient is then the
        # solve's residual); otherwise it only gives the direction of the line search.
        if two:
            k = F.masked_fill(reproduced, float("-inf")).argmin(1)  # ties: the first (Newton) set
            Fk = F.gather(1, k.unsqueeze(1)).squeeze(1)
            hit = reproduced.gather(1, k.unsqueeze(1)).squeeze(1)
        else:
            k, Fk, hit = torch.zeros_like(iters), F[:, 0], reproduced[:, 0]
        jump = live & (hit | (Fk < f)) if space.exact else live & hit & (Fk <= f)
        search = live & ~jump & good[:, 0]
        moved = progress = jump
        if bool(jump.any()):
            j = jump.unsqueeze(-1)
            if two:
                Xk = X.gather(1, k.view(B, 1, 1).expand(B, 1, X.shape[-1])).squeeze(1)
                Rk = R.gather(1, k.view(B, 1, 1).expand(B, 1, T)).squeeze(1)
                Sk = torch.where(k.unsqueeze(-1) == 1, S[:, 1], sgn1)
            else:
                Xk, Rk, Sk = X[:, 0], R[:, 0], sgn1
            beta = torch.where(j, (Sk != 0) * (C * (Rk - Sk * eps)), beta)
            x = torch.where(j, Xk, x)
            r = torch.where(j, Rk, r)
            u2 = torch.where(jump, U2.gather(1, k.unsqueeze(1)).squeeze(1), u2)
            f = torch.where(jump, Fk, f)
        if bool(search.any()):
            # Newton direction with an exact line search; in every space r is affine in x
            d, dr = X[:, 0] - x, R[:, 0] - r
            ud, dd = space.line_terms(x, d, r, dr)
            a = exact_line_search(r, dr, ud, dd, mask, C, eps)
            x_a = x + a.unsqueeze(-1) * d
            # exact solves: r is affine in x, so r(α) = r + α Δr. Inexact ones are measured
            # again: near the optimum, rounding of the data (float32) makes the line's derivative
            # noise, and a step that raises f is refused
            r_a = r + a.unsqueeze(-1) * dr if space.exact else space.residuals(x_a)
            u2_a = u2 + 2 * a * ud + a * a * dd
            f_a = 0.5 * u2_a + 0.5 * C * loss(r_a, mask, eps)
            step = search & (a > 0) & (f_a <= f)
            s = step.unsqueeze(-1)
            # a step at the rounding level of the measurements (float32 passes near the floor
            # take α ~ 1e-11 steps that "decrease" f by noise, one iteration each) is not descent
            real = step & (a * torch.linalg.vector_norm(d, dim=-1) > step_floor * torch.linalg.vector_norm(x, dim=-1))
            beta_n = (sgn1 != 0) * (C * (R[:, 0] - sgn1 * eps))
            x = torch.where(s, x_a, x)
            r = torch.where(s, r_a, r)
            beta = torch.where(s, beta + a.unsqueeze(-1) * (beta_n - beta), beta)
            u2 = torch.where(step, u2_a, u2)
            f = torch.where(step, f_a, f)
            moved = moved | step
            progress = progress | real
        # what the space keeps: the factor of the set moved to (the Newton set's after a line search)
        space.commit(torch.where(jump, k, torch.where(moved, 0, -1)))
        stable = jump & hit & space.exact
        # no descent left at working precision: done if the gradient is at check_tol already
        # (rounding floor of the data), else stopped and reported as not converged
        stuck = live & ~progress
        done |= stuck & (rel <= check_tol)
        live &= progress

    sgn = torch.sign(r) * ((r.abs() > eps) & mask)
    return ActiveSetResult(x, r, sgn != 0, sgn, done, iters, gnorm)
