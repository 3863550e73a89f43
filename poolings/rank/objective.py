r"""The rank-pool objective, its exact solve by any of the three methods, and its backward.

Per sequence with valid steps ``v_1 … v_T`` (its own ``T``; targets ``y_t = t``)::

    f(v, u) = ½‖u‖² + C/2 Σ_t [ |y_t − uᵀv_t| − ε ]₊²          u* = argmin_u f(v, u)
    ∇_u f  = u − C Σ_{t∈A} e_t v_t,        ∇²_uu f = H = I + C V_Aᵀ V_A

**Backward.** With ``w = H⁻¹ g`` (``g = dL/du*``)::

    dL/dv_t = C ( e_t w − (wᵀv_t) u )   for t ∈ A,   0 otherwise

formed as one batched rank-2 product ``[e, −Vw] (B,T,2) @ [w; u] (B,2,p)``. How ``w`` is
computed is the layer's backward strategy; :meth:`RankPoolObjective.hessian` hands each
method's factor over to it (see :class:`RankPoolState`).

``f`` is C¹ but not C² where ``|r_t| = ε`` for some ``t``: there ``u*`` is not
differentiable (a set of measure zero), and the gradient returned is that of the active set
found by the forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from argminlayers import CG, FunctionHessian, LowRankHessian, Objective, PrecisionWarning, Solution, Strategy, Woodbury
from argminlayers.layer import _caller_stacklevel

from .active_set import ActiveSetResult, active_set_solve
from .common import WIDE, check_rank_param, check_rank_value, excess, frames_combine, frames_dot
from .common import frames_dot_wide, loss, rank_targets, rounding_floor, signed_active_set
from .cost import METHODS, choose_method_for
from .newton_cg import NewtonCGSpace, NystromPreconditioner
from .pspace import PSpace
from .small import DirectResult, compiled_direct, is_small_numpy, kernel_runs, small_solve
from .tspace import TSpace

METHOD_CHOICES = ("auto", *METHODS)


def check_method(method: Any) -> str:
    """``method`` must be one of :data:`METHOD_CHOICES`; the error names the argument."""
    if not isinstance(method, str) or method not in METHOD_CHOICES:
        raise ValueError(f"method={method!r} is not known; choose one of {list(METHOD_CHOICES)}")
    return method


@dataclass
class RankPoolState:
    """What the forward solve leaves for the backward pass (all at the returned ``u``).

    Where some sample of a float32 (or lower) batch was solved again in float64 because it is
    too ill-conditioned for float32 (``wide``, see :func:`_finish_in_float64`), the solve's
    quantities stay in float64 and the backward computes in float64 from them (see
    :meth:`RankPoolObjective.hessian` and :meth:`RankPoolObjective.vjp_v`): rounded to float32
    they left those samples' gradients 7 % (3 × 20 × 64) and 30 % (2 × 100 × 512) off (random
    walks of ``100 n_τ / √T``, ``C = 10``), where float64 gives 4–6e-8. Otherwise they are in
    the dtype of ``V``, and so is the backward: below the bound, float32 and float64 backwards
    of the same solve measured the same errors against float64 (those of the float32 solve
    itself).

    Attributes:
        method: ``"tspace"``, ``"pspace"`` or ``"cg"``: the method that ran.
        active: ``(B, T)`` bool, the active set ``A``.
        e: ``(B, T)`` ``e_t = r_t − s_t ε`` on ``A``, 0 elsewhere.
        u: ``(B, p)`` the minimiser (the layer returns it in the dtype of ``V``).
        factor: ``tspace``: ``(B, T, T)`` lower Cholesky factor of the capacitance matrix
            ``I + C D K D`` of ``H``; ``pspace``: ``(B, p, p)`` factor of ``H = I + M`` itself;
            ``cg``: ``None``.
        gram: ``pspace``: ``M = C V_Aᵀ V_A``, ``(B, p, p)``; else ``None``.
        preconditioner: ``cg``: the forward's Nyström preconditioner (dtype of ``V``); else ``None``.
        wide: some sample was too ill-conditioned for float32 and was solved in float64
            (:func:`_finish_in_float64`): ``e``, ``u``, ``factor`` and ``gram`` are then float64,
            and the backward runs in float64.
    """

    method: str
    active: Tensor
    e: Tensor
    u: Tensor | None = None
    factor: Tensor | None = None
    wide: bool = False
    gram: Tensor | None = None
    preconditioner: NystromPreconditioner | None = None


def rank_pool_solve(
    V: Tensor,
    mask: Tensor,
    C: float,
    eps: float,
    *,
    method: str = "auto",
    tol: float = 1e-10,
    check_tol: float = 1e-6,
    max_iter: int = 50,
) -> Solution:
    """Exact rank-pool minimiser by the active-set iteration of :mod:`poolings.rank.active_set`
    in the space of ``method`` (``"auto"``: :func:`~poolings.rank.cost.choose_method_for`).

    Args:
        V: ``(B, T, p)`` features, padded steps zero.
        mask: ``(B, T)`` bool, valid steps (they are never active).
        tol, check_tol: a sample stops when its relative gradient is ``≤ tol``, or when it is
            the minimiser of its own reproduced signed set with a relative gradient
            ``≤ check_tol``. Where gradients are measured by passes over ``V`` (``pspace``,
            ``cg``) both are raised to at least :func:`~poolings.rank.common.rounding_floor`
            of the dtype of ``V``; ``tspace`` measures them in float64 from ``K``.
        max_iter: iterations per sample.

    Returns:
        :class:`~argminlayers.Solution` with ``u (B, p)`` in the dtype of ``V``, per-sample
        ``converged``, ``iterations``, ``grad_norm`` (``‖∇_u f‖`` at ``u``) and a
        :class:`RankPoolState`.
    """
    method = check_method(method)
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != V.shape[:2]:
        raise TypeError(f"mask must be a bool tensor of shape (B, T) = {tuple(V.shape[:2])}, got "
                        f"{type(mask).__name__ if not isinstance(mask, Tensor) else f'{mask.dtype} of shape {tuple(mask.shape)}'}")
    mask = mask.contiguous()  # the compiled iteration reads it (and sets made like it) as C arrays
    if method == "auto":
        method = choose_method_for(V, C, mask)
    asked = {"tol": tol, "check_tol": check_tol, "max_iter": max_iter}
    floor_tol, floor_check = rounding_floor(torch.float64 if method == "tspace" else V.dtype)
    tol = max(float(tol), floor_tol)
    check_tol = max(float(check_tol), floor_check, tol)
    small = method != "cg" and is_small_numpy(V.shape[0], V.shape[1] if method == "tspace" else V.shape[2], V.device)
    if V.dtype != WIDE and not small and V.numel() * 8 <= WIDE_AT_ONCE and _every_sample_ill(V, C):
        return _as_wide(rank_pool_solve(V.to(WIDE), mask, C, eps, method=method, **asked), V.dtype)
    n = V.shape[1] if method == "tspace" else V.shape[2]
    if small and V.numel() and kernel_runs(V.shape[1], n, None if method == "tspace" else V.dtype):
        d = compiled_direct(V.detach().contiguous(), mask, C, eps, method == "tspace", tol=tol,
                            check_tol=check_tol, max_iter=max_iter, step_floor=floor_tol)
        if d is not None:
            return _direct_solution(d, V, mask, C, eps, method, asked)
        small = False  # a candidate matrix was not positive definite: the general iteration reports it
    # the iteration is hundreds of small operations: inference mode spares each one the autograd
    # bookkeeping (measured 9 → 6.5 µs per operation on (2, 50) tensors, one thread); what leaves
    # it is copied into ordinary tensors, which the backward may record on
    with torch.inference_mode():
        space = {"tspace": lambda: TSpace(V, mask, C, eps), "pspace": lambda: PSpace(V, mask, C, eps),
                 "cg": lambda: NewtonCGSpace(V, mask, C, eps, tol=tol)}[method]()
        res = None
        if small:  # (the NumPy iteration: the compiled one does not take this problem)
            res = small_solve(space, C, eps, tol=tol, check_tol=check_tol, max_iter=max_iter, step_floor=floor_tol)
        if res is None:
            res = active_set_solve(space, C, eps, tol=tol, check_tol=check_tol, max_iter=max_iter, step_floor=floor_tol)
        factor = space.final_factor(res.active) if method != "cg" else None
        gram = space.M if method == "pspace" else None
        precond = space.precond if method == "cg" else None
    return _solution(V, mask, C, eps, method, res, space.norms, factor, gram, precond, asked)


def _solution(V: Tensor, mask: Tensor, C: float, eps: float, method: str, res: ActiveSetResult, norms: Tensor,
              factor: Tensor | None, gram: Tensor | None, precond: NystromPreconditioner | None,
              asked: dict) -> Solution:
    """:func:`rank_pool_solve`'s solution from the iteration's result ``res`` and what its space
    holds (the frames' norms, the factor of each final set, p-space's ``M``, cg's preconditioner;
    inference tensors are copied out), redoing in float64 what needs it (:func:`_finish_in_float64`)."""
    dt = V.dtype
    load = C * (norms.square() * res.active).sum(-1)  # C Σ_A ‖v_t‖² ≥ ‖H‖ − 1, (B,)
    ill = _ordinary(torch.finfo(dt).eps * load > ILL_CONDITIONED) if dt != WIDE else None
    wide = redo = False
    worst = load.amax() if load.numel() else load.new_zeros(())
    if ill is not None:  # one read-back for all (each is a device sync on a GPU)
        wide, redo, worst = torch.stack((ill.any(), ~res.converged.all(), worst)).tolist()
    else:
        worst = float(worst)
    _warn_beyond_float64(worst, C)
    sd = WIDE if wide else dt  # the state's dtype: the backward runs in it
    state = RankPoolState(method, _ordinary(res.active), _ordinary(excess(res.r, res.sign, eps), sd), wide=wide)
    if method == "tspace":
        state.u = frames_combine(V.detach(), res.x.to(dt)).to(sd)  # u = Vᵀβ: the second pass over V
        state.factor = _ordinary(factor, sd)
    else:
        state.u = _ordinary(res.x, sd)
        if method == "pspace":
            state.factor, state.gram = _ordinary(factor, sd), _ordinary(gram, sd)
        else:
            state.preconditioner = NystromPreconditioner(_ordinary(precond.U, dt), _ordinary(precond.s, dt))
    sol = Solution(state.u.to(dt), converged=_ordinary(res.converged), iterations=_ordinary(res.iterations),
                   grad_norm=_ordinary(res.grad_norm, dt), state=state)
    if wide or redo:
        _finish_in_float64(sol, V, mask, C, eps, method, ill, **asked)
    return sol


def _direct_solution(d: DirectResult, V: Tensor, mask: Tensor, C: float, eps: float, method: str,
                     asked: dict) -> Solution:
    """:func:`_solution` for :func:`~poolings.rank.small.compiled_direct`'s arrays: the same
    decisions and state, computed in NumPy. Written twice on purpose: at 2 × 50 × 64 the torch
    form of these few lines took 174 µs of a 400 µs solve, this one about 35 µs (the small path's
    whole solve 317 against 400 µs); tests hold the two to the same state."""
    dt, C, eps = V.dtype, float(C), float(eps)
    active = d.sign != 0
    load = C * (np.square(d.norms) * active).sum(-1)  # C Σ_A ‖v_t‖², as rank_pool_solve
    ill = torch.finfo(dt).eps * load > ILL_CONDITIONED if dt != WIDE else None
    wide = bool(ill.any()) if ill is not None else False
    _warn_beyond_float64(float(load.max()) if load.size else 0.0, C)
    redo = ill is not None and not bool(d.done.all())
    sd = WIDE if wide else dt
    e = (d.r - eps * d.sign) * active  # excess
    state = RankPoolState(method, torch.from_numpy(active), torch.from_numpy(e).to(sd), wide=wide,
                          factor=torch.from_numpy(d.factor).to(sd))
    x = torch.from_numpy(d.x)
    if method == "tspace":
        state.u = frames_combine(V.detach(), x.to(dt)).to(sd)  # u = Vᵀβ
    else:
        state.u, state.gram = x.to(sd), torch.from_numpy(d.gram).to(sd)
    sol = Solution(state.u.to(dt), converged=torch.from_numpy(d.done), iterations=torch.from_numpy(d.iters),
                   grad_norm=torch.from_numpy(d.gnorm).to(dt), state=state)
    if wide or redo:
        _finish_in_float64(sol, V, mask, C, eps, method, torch.from_numpy(ill), **asked)
    return sol


def _warn_beyond_float64(load: float, C: float) -> None:
    """A :class:`~argminlayers.PrecisionWarning` where the largest ``C Σ_A ‖v_t‖²`` of a batch
    (``load``, ``≥ ‖H‖ − 1``) makes the problem ill-conditioned even in float64
    (``ε₆₄ · load >`` :data:`ILL_CONDITIONED`): ``u`` and its gradient then carry a relative
    error of up to about that much, and there is no wider dtype to redo the samples in. A bound:
    the error measured (against the piece's solve in extended precision) was far smaller, on
    random-walk frames with ``C = 1``: at 2 × 50 × 64, 5e-7 where the bound is 1e-2 (frames of
    norm 1e6) and 1.3e-2 where it is 0.99 (norm 1e7, that sample also unconverged); at
    2 × 20 × 100, 3e-3 where it is 0.35; at 2 × 300 × 16, 1e-14 where it is 6.6 (p-space, whose
    ``H`` is far better conditioned than the bound when ``T ≫ p``)."""
    bound = torch.finfo(WIDE).eps * load
    if bound > ILL_CONDITIONED:
        warnings.warn(PrecisionWarning(
            f"rank pooling of these frames may be ill-conditioned even in float64: ε·C·Σ‖v_t‖² over the active "
            f"steps is up to {bound:.2g} > {ILL_CONDITIONED:g} (C = {C:g}), which bounds the relative error of u "
            "and its gradient (the error itself is often far smaller; float64 is the widest dtype). Normalize the "
            "frames (normalize=True), scale them down, or use a smaller C"),
            stacklevel=_caller_stacklevel())


def _every_sample_ill(V: Tensor, C: float) -> bool:
    """Whether every sample's ``C Σ_t ‖v_t‖²`` over all its steps (a bound on the active steps'
    sum that decides a redo, :func:`_finish_in_float64`) exceeds :data:`ILL_CONDITIONED` in the
    dtype of ``V``: such a batch (unnormalised CNN features, say) is solved in float64 at once
    instead of in float32 first and again in float64. Measured at 4 × 1000 × 512, frames of norm
    30, ``C = 1``: the float32 solve took 0.69 s (``cg``; ``pspace`` 0.38 s), the float64 one 0.39 s
    (0.19 s), and every sample was redone. One pass over ``V``."""
    load = C * torch.linalg.vector_norm(V.detach(), dim=(1, 2)).square()
    return bool((torch.finfo(V.dtype).eps * load > ILL_CONDITIONED).all())


WIDE_AT_ONCE = 2**30
"""Bytes of ``V`` in float64 up to which a batch ill-conditioned throughout is solved in float64
at once (:func:`_every_sample_ill`); above, in float32 first and redone in groups of
:data:`_REDO_BYTES` (the float64 copy of all of ``V`` would be the peak)."""


def _as_wide(sol: Solution, dtype: torch.dtype) -> Solution:
    """A float64 solve of a ``dtype`` batch as that batch's solution: ``u`` in ``dtype``, the state
    float64 and ``wide`` (the backward runs in float64 from it), as after :func:`_finish_in_float64`."""
    sol.state.wide = True
    return Solution(sol.u.to(dtype), converged=sol.converged, iterations=sol.iterations,
                    grad_norm=sol.grad_norm.to(dtype), state=sol.state)


ILL_CONDITIONED = 1e-3
"""Bound on ``ε · C Σ_{t∈A} ‖v_t‖²`` (``ε`` of the dtype of ``V``) above which a sample's
float32 solve is redone in float64 (:func:`_finish_in_float64`)."""


def _finish_in_float64(sol: Solution, V: Tensor, mask: Tensor, C: float, eps: float, method: str,
                       ill: Tensor, **options: Any) -> None:
    """Solve again in float64 the samples whose float32 (or lower) solve did not converge (it
    ran out of descent, or of iterations, before its stopping test), and those too ill-
    conditioned for float32 (``ill``).

    **Ill-conditioned samples.** ``‖H‖ ≤ 1 + C Σ_{t∈A} ‖v_t‖²`` and ``‖H⁻¹‖ ≤ 1``, so that sum bounds
    the condition number of ``H``; the products with ``V`` formed in float32 (``K = VVᵀ``,
    ``M = VᵀV``, the passes of ``cg``) perturb the problem by ``ε₃₂`` of the data, and move
    ``u*``'s gradient by up to that condition number times as much. Measured on random-walk
    frames scaled up to ``‖v_t‖ ≈ 100`` (3 × 20 × 64 to 2 × 600 × 32, ``C`` = 1 and 10, 25
    cases × 3 methods, against float64): the float32 gradient's relative error was 0.02–1.3
    times ``ε₃₂ C Σ_A ‖v_t‖²`` (below 0.5 times with the method ``"auto"`` picks), and reached 18
    (no correct digit) at a bound of ``10²``, a gradient that looked like any other. Where the
    bound is above :data:`ILL_CONDITIONED` the sample is solved in float64, and its backward
    (which runs in float64 from the state, see :class:`RankPoolState`) is then as accurate as
    float64 gives: 3–6e-8 in those cases. Unit-norm frames with ``C = 1`` (nearly all steps
    active) reach the bound at ``T ≈ 8 400`` steps (``C = 10``: 840); frames of norm 30
    (unnormalised CNN features) at ``T ≈ 10``: normalise them (``normalize=True``) to keep the
    float32 speed.

    Passes over ``V`` in its own dtype measure ``∇_u f = u − C Vᵀe`` only to about ``ε`` times the
    size of its terms, and for long videos of wide frames (``‖u‖`` grows with ``T``) that can sit
    above even the loose ``check_tol`` floor: measured on random-walk features (seeds 0–5), 3 of 84
    samples at ``T = 250–2000``, ``p = 2048–4096`` stopped so in the ``cg`` method (all at
    ``T ≥ 1000``; relative error in ``u`` ~1e-4, ``‖∇f‖`` 1.4–4.3), none of 128 at ``p ≤ 1024``
    (seed 0, also i.i.d. features), and would get no gradient. (A direct method given a floor
    it cannot reach runs to ``max_iter`` instead.) Their float64 solution (same method,
    tolerances and ``max_iter``) replaces theirs, rounded to the dtype of ``V``, with its state
    (active set, excess, factor, ``M``, and the preconditioner where the shapes agree); its
    iterations are added. The samples to redo are solved in groups of at most :data:`_REDO_BYTES`
    of ``V`` in float64 (one sample at a time where one sample is larger)."""
    stuck = ~sol.converged | ill
    st = sol.state
    B, T, p = V.shape
    rows = stuck.nonzero().flatten()
    group = max(1, _REDO_BYTES // (T * p * 8))
    for i in range(0, rows.numel(), group):
        idx = rows[i : i + group]
        sub = rank_pool_solve(V[idx].to(torch.float64), mask[idx], C, eps, method=method, **options)
        sol.u[idx] = sub.u.to(sol.u.dtype)
        sol.converged[idx], sol.grad_norm[idx] = sub.converged, sub.grad_norm.to(sol.grad_norm.dtype)
        sol.iterations[idx] += sub.iterations
        for name in ("active", "e", "u", "factor", "gram"):
            mine, theirs = getattr(st, name), getattr(sub.state, name)
            if mine is not None and theirs is not None:
                mine[idx] = theirs.to(mine.dtype)
        pm, ps = st.preconditioner, sub.state.preconditioner
        if pm is not None and ps is not None and pm.U.shape[1:] == ps.U.shape[1:]:
            pm.U[idx], pm.s[idx] = ps.U.to(pm.U.dtype), ps.s.to(pm.s.dtype)


_REDO_BYTES = 64 * 2**20  # samples redone in float64 together: at most this much of V in float64


def _ordinary(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` (in ``dtype``) as an ordinary tensor: inference-mode tensors are copied out."""
    x = x if dtype is None else x.to(dtype)
    return x.clone() if x.is_inference() else x


def _number(x: float | Tensor) -> float:
    """The float value of ``C`` or ``eps`` (a tensor's without touching its graph)."""
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


# ------------------------------------------------------------------------------ objective
class RankPoolObjective(Objective):
    """The rank-pool objective ``f(v, u) = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²`` with fast paths.

    Batched methods take ``V: (B, T, p)`` (padded steps zero), ``U: (B, p)`` and ``mask: (B, T)``
    bool; targets count valid steps, ``y = cumsum(mask) · mask``. ``f`` itself (per sample, torch
    ops) serves the generic :mod:`torch.func` paths and cross-checks. ``C`` and ``eps`` live
    here and only here: every method reads them from the objective.

    ``C`` and ``eps`` are numbers, or 0-d tensors: an ``nn.Parameter`` is registered
    (it appears in ``parameters()`` and gets its gradient), a tensor that requires grad is read
    as an attribute and differentiated as one, and any other tensor is a buffer. The solve
    always runs on their float values; their gradients come from the closed forms of
    :meth:`vjp`.

    Args:
        C: regularisation, ``> 0`` (liblinear's ``C`` is ``C/2``).
        eps: insensitive zone ``ε ≥ 0``.
        method: ``"auto"`` (default; chosen per call by the cost model), ``"tspace"``,
            ``"pspace"`` or ``"cg"``.
        tol, check_tol, max_iter: of :func:`rank_pool_solve`.

    Attributes:
        last_method: the method the last :meth:`solve` ran (``None`` before the first).
    """

    low_rank_hessian = True
    sequence = True
    scan_f = False  # f reads C and eps from the module, and only functions from its globals

    def __init__(self, C: float = 1.0, eps: float = 0.1, *, method: str = "auto", tol: float = 1e-10,
                 check_tol: float = 1e-6, max_iter: int = 50):
        for name, value in (("C", C), ("eps", eps)):
            value = check_rank_param(name, value)
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and not value.requires_grad:
                self.register_buffer(name, value)
            else:  # a number; a Parameter (registered, frozen or not); a tensor computed upstream (an attribute)
                setattr(self, name, value)
        self.method = check_method(method)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        check_tol = max(float(check_tol), float(tol))  # the looser test can never be the tighter one
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.tol, self.check_tol, self.max_iter = float(tol), float(check_tol), max_iter
        self.last_method: str | None = None

    def extra_repr(self) -> str:
        return f"C={_number(self.C):g}, eps={_number(self.eps):g}, method={self.method!r}"

    def values(self) -> tuple[float, float]:
        """``(C, eps)`` as floats, what the solves run on; a learned value that left its range
        (``C ≤ 0``, ``eps < 0``, not finite) is refused with a hint."""
        return tuple(check_rank_value(name, _number(x), learned=isinstance(x, Tensor))
                     for name, x in (("C", self.C), ("eps", self.eps)))

    def choose_method(self, V: Tensor, mask: Tensor | None = None) -> str:
        """The method :meth:`solve` runs for ``V (B, T, p)`` (valid steps ``mask``): ``method``
        unless it is ``"auto"`` (then :func:`~poolings.rank.cost.choose_method_for`)."""
        if self.method != "auto":
            return self.method
        return choose_method_for(V, self.values()[0], mask)

    # per sample, for torch.func
    def f(self, v: Tensor, u: Tensor, mask: Tensor) -> Tensor:
        """``v: (T, p)``, ``u: (p,)``, ``mask: (T,)`` → scalar."""
        r = rank_targets(mask, v.dtype) - v @ u  # (T,)
        return 0.5 * (u @ u) + 0.5 * self.C * ((r.abs() - self.eps).clamp_min(0).square() * mask).sum()

    # batched fast paths
    def solve(self, V: Tensor, mask: Tensor) -> Solution:
        """:func:`rank_pool_solve` with this objective's ``C``, ``eps``, method and tolerances."""
        method = self.choose_method(V, mask)
        self.last_method = method
        C, eps = self.values()
        return rank_pool_solve(V, mask, C, eps, method=method, tol=self.tol, check_tol=self.check_tol,
                               max_iter=self.max_iter)

    def _residuals(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``r = y − V u``, ``(B, T)``: one pass over ``V``."""
        return rank_targets(mask, V.dtype) - frames_dot(V, U)

    def _active_and_excess(self, V: Tensor, U: Tensor, mask: Tensor, state: Any) -> tuple[Tensor, Tensor]:
        """``(A, e)`` from the forward state when there is one, else from ``U``."""
        if isinstance(state, RankPoolState):
            return state.active, state.e
        r = self._residuals(V, U, mask)
        active, sign = signed_active_set(r, mask, self.eps)
        return active, excess(r, sign, self.eps)

    def value(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``f``, ``(B,)``."""
        return 0.5 * U.square().sum(-1) + 0.5 * self.C * loss(self._residuals(V, U, mask), mask, self.eps)

    def grad(self, V: Tensor, U: Tensor, mask: Tensor) -> Tensor:
        """``∇_u f = u − C Σ_{t∈A} e_t v_t = u − C Vᵀ e``, ``(B, p)``."""
        r = self._residuals(V, U, mask)
        _, sign = signed_active_set(r, mask, self.eps)
        return U - self.C * frames_combine(V, excess(r, sign, self.eps))

    def hvp(self, V: Tensor, U: Tensor, mask: Tensor, X: Tensor) -> Tensor:
        """``H x = x + C V_Aᵀ (V_A x)``, ``(B, p)``."""
        active, _ = signed_active_set(self._residuals(V, U, mask), mask, self.eps)
        return X + self.C * frames_combine(V, frames_dot(V, X) * active)

    def hessian_diag(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> Tensor:
        """``diag(H) = 1 + C Σ_{t∈A} v_t²``, ``(B, p)`` (what the ``diagonal`` strategy uses)."""
        return self.hessian(V, U, mask, state).diagonal()

    def hessian(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None) -> LowRankHessian:
        """``H = I + C V_Aᵀ V_A`` as a :class:`~argminlayers.LowRankHessian`, in the form that
        lets the layer's strategy reuse the forward's work:

        - ``tspace`` (and no state): ``H = I + AᵀA`` with ``A = √C D V`` (rows ``√C v_t`` on
          ``A``), passed as ``V`` with a row scale (no scaled copy). With the forward state,
          ``capacitance_factor`` is the forward's Cholesky factor of ``I + A Aᵀ = I + C D K D``,
          so Woodbury solves with it directly; without, Woodbury factorises that ``T × T``
          matrix itself when it is used;
        - ``pspace``: ``H = I + Σ_{i≤p} e_i m_iᵀ`` (``A = I``, an expanded view, and ``B = M``),
          whose capacitance matrix ``I + M`` is ``H`` itself: the forward's factor of ``H`` is the
          capacitance factor, and also handed over as ``H``'s own factor (see below);
        - ``cg``: the ``tspace`` form without a factor, carrying the forward's preconditioner
          (:class:`PreconditionedHessian`), which ``backward="auto"`` uses.

        With a ``wide`` state (:class:`RankPoolState`) the operator is in float64 whatever the
        dtype of ``V`` (for ``tspace`` and ``cg`` it holds a float64 copy of all of ``V`` for the
        backward's duration; ``p``-space needs only ``M`` and the factor): the layer's strategy
        then solves ``H w = g`` in float64.
        ``p``-space also hands over the factor as that of ``H`` itself (``factor``), so
        ``woodbury`` (and ``dense``) solve with it directly instead of by the identity
        ``w = g − H⁻¹ M g``, whose subtraction loses ``‖M‖`` of the precision (``w`` 1.1e-6 from
        the explicit solve in float64 where ``C ‖V‖² ≈ 7·10¹⁰``, 3e-15 by the direct one).
        """
        own = isinstance(state, RankPoolState)
        active = state.active if own else signed_active_set(self._residuals(V, U, mask), mask, self.eps)[0]
        if own and state.method == "pspace":
            B, p = U.shape
            ones = torch.ones(B, p, dtype=state.gram.dtype, device=U.device)
            eye = torch.eye(p, dtype=state.gram.dtype, device=U.device).expand(B, p, p)
            return LowRankHessian(ones, eye, state.gram, capacitance_factor=state.factor, factor=state.factor,
                                  positive_diagonal=True)
        if own and state.wide:
            V = V.to(WIDE)
        # rows √C v_t on A, no copy of V. With the forward's state, √C of the value its factor was
        # built with (a float32 tensor C's own √C differs from it by its rounding, which Woodbury
        # amplifies: 5e-4 off at 3 × 20 × 16 with frames of norm 100); without, C itself, whose
        # graph a double backward differentiates
        root = self.values()[0] ** 0.5 if own else self.C**0.5
        scale = root * active.to(V.dtype)  # (B, T)
        ones = torch.ones(U.shape, dtype=V.dtype, device=U.device)
        if own and state.method == "cg":
            pre = state.preconditioner
            if pre is not None and pre.U.dtype != V.dtype:
                pre = NystromPreconditioner(pre.U.to(V.dtype), pre.s.to(V.dtype))
            return PreconditionedHessian(ones, V, row_scale=scale, preconditioner=pre, positive_diagonal=True)
        factor = state.factor if own else None
        return LowRankHessian(ones, V, row_scale=scale, capacitance_factor=factor, positive_diagonal=True)

    def _wide(self, V: Tensor, W: Tensor, state: Any) -> tuple[Tensor, Tensor] | None:
        """``(u, w)`` in float64 where the backward computes in float64 (a ``wide`` state of the
        forward, whose ``u`` and ``e`` are float64); else ``None``."""
        if V.dtype == WIDE or not isinstance(state, RankPoolState) or not state.wide:
            return None
        return state.u, W.to(WIDE)

    def vjp_v(self, V: Tensor, U: Tensor, mask: Tensor, W: Tensor, state: Any = None) -> Tensor:
        """``∂/∂v_t [wᵀ∇_u f] = −C (e_t w − (wᵀv_t) u)`` on ``A``, 0 elsewhere; ``(B, T, p)``.

        One pass for ``V w`` and one rank-2 product ``[e, −Vw] (B,T,2) @ [w; u] (B,2,p)``: a batched
        GEMM for small ``p``; from ``p > 128`` (and ``B·T·p > 2¹⁶``) two fused elementwise passes,
        because a GEMM with an inner dimension of 2 ran 4–6× slower there (one thread, MKL:
        5.0 vs 1.2 ms at 16 × 100 × 4096, 1.1 vs 0.21 ms at 4 × 1000 × 512; at 16 × 300 × 64 the
        GEMM is faster, 38 vs 44 µs).
        """
        active, e = self._active_and_excess(V, U, mask, state)
        wide = self._wide(V, W, state)
        if wide is not None:  # v_tᵀw in float64 from the state's u and e, V cast a chunk at a time
            U, W = wide
            Vw = frames_dot_wide(V, W) * active
            # the rank-2 product itself rounds as its float32 result does (measured: 5–8e-8
            # from float64 with it in float32, 3–5e-8 with it in float64 too)
            dt = V.dtype
            return self._rank2(e.to(dt), Vw.to(dt), W.to(dt), U.to(dt))
        Vw = frames_dot(V, W) * active  # (B, T)
        return self._rank2(e, Vw, W, U)

    def _rank2(self, e: Tensor, Vw: Tensor, W: Tensor, U: Tensor) -> Tensor:
        """``−C (e_t w − (wᵀv_t) u)``, ``(B, T, p)``, from ``e`` and ``Vw = (wᵀv_t)`` on ``A``."""
        (B, T), p = e.shape, W.shape[-1]
        if p > 128 and B * T * p > 2**16:
            out = (e * -self.C).unsqueeze(-1) * W.unsqueeze(1)  # −C e_t w
            return out.addcmul_((Vw * self.C).unsqueeze(-1), U.unsqueeze(1))  # + C (wᵀv_t) u
        coef = torch.stack((e, -Vw), dim=-1) * (-self.C)  # (B, T, 2)
        rows = torch.stack((W, U), dim=1)  # (B, 2, p)
        return torch.bmm(coef, rows)


    def vjp(self, V: Tensor, U: Tensor, mask: Tensor, W: Tensor, wrt: Any, state: Any = None) -> dict[str, Tensor]:
        """Closed forms for a tensor ``C`` or ``eps`` (``V`` is :meth:`vjp_v`'s), summed over the batch::

            ∂/∂C [wᵀ∇_u f] = −Σ_{t∈A} e_t (wᵀv_t)        ∂/∂ε [wᵀ∇_u f] = C Σ_{t∈A} s_t (wᵀv_t)

        (``∇_u f = u − C Σ_A e_t v_t`` with ``e_t = r_t − s_t ε``). One pass over ``V`` for ``V w``.
        """
        hits = {k: x for k, x in wrt.items() if isinstance(x, Tensor) and (x is self.C or x is self.eps)}
        if not hits:
            return {}
        _, e = self._active_and_excess(V, U, mask, state)
        wide = self._wide(V, W, state)
        Vw = frames_dot(V, W) if wide is None else frames_dot_wide(V, wide[1])  # (B, T); e is zero off A
        out = {}
        for k, x in hits.items():
            d = torch.zeros((), dtype=Vw.dtype, device=V.device)
            if x is self.C:
                d = d - (e * Vw).sum()
            if x is self.eps:
                d = d + self.C * (torch.sign(e) * Vw).sum()
            out[k] = d.to(x.dtype).reshape(x.shape)
        return out

class PreconditionedHessian(LowRankHessian):
    """A :class:`~argminlayers.LowRankHessian` that also carries the forward's
    :class:`~poolings.rank.newton_cg.NystromPreconditioner` (``preconditioner``)."""

    def __init__(self, *args: Any, preconditioner: NystromPreconditioner | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.preconditioner = preconditioner


class RankPoolBackward(Strategy):
    """``backward="auto"``: the exact backward of whichever method ran.

    - ``tspace``, ``pspace``: Woodbury with the forward's factor (:class:`~argminlayers.Woodbury`;
      one triangular solve pair, no factorisation);
    - ``cg``: conjugate gradient on ``H w = g`` (two passes over ``V`` per iteration), split-
      preconditioned by the forward's Nyström preconditioner ``S``: ``(S H S) z = S g``,
      ``w = S z``, with :class:`~argminlayers.CG` to a relative residual (of the preconditioned
      system) ``tol``: default ``1e-10`` in float64 and ``1e-5`` in float32;
    - an operator without either (a damped Hessian, a generic solver): Woodbury.

    Args:
        tol, max_iter: of the CG solve (``max_iter`` default 500).
    """

    name = "auto"
    exact = True

    def __init__(self, tol: float | None = None, max_iter: int = 500):
        self.cg = CG(tol=tol, max_iter=max_iter)
        self.woodbury = Woodbury()

    def solve(self, hessian, g: Tensor) -> Tensor:
        g = g.to(hessian.dtype)
        precond = getattr(hessian, "preconditioner", None)
        if precond is None or hessian.low_rank().capacitance_factor is not None:
            return self.woodbury.solve(hessian, g)
        S = precond.apply
        op = FunctionHessian(hessian.batch, hessian.q, g.dtype, g.device, matvec=lambda z: S(hessian.matvec(S(z))))
        return S(self.cg.solve(op, S(g)))

    def __repr__(self) -> str:
        return f"RankPoolBackward(cg={self.cg!r})"
