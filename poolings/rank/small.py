r"""Small direct problems on the CPU: the active-set iteration compiled, or on NumPy arrays.

On small problems the iteration of :func:`~poolings.rank.active_set.active_set_solve` is
bound by launches, not flops: at ``B = 2, T = 50`` it is about 800 tensor operations on
``(2, 50)`` tensors, each 6–9 µs to launch on one CPU thread, where the same NumPy operation
takes about 2 µs (measured on the development machine). :func:`small_solve` runs the same
iteration outside torch, on a T-space or p-space method's data, in one of two forms:

- compiled (:func:`compiled_solve`, the Cython extension :mod:`poolings.rank._small_kernel`,
  built by ``make env`` / ``pip install -e .``): each sample alone, with BLAS and LAPACK
  (SciPy's ``cython_blas`` / ``cython_lapack``) called directly and no temporaries. At
  ``2 × 50 × 64`` forward + backward went from 1.44–1.68 to 0.58–0.64 ms, at
  ``16 × 300 × 64`` from 3.75–4.3 to 2.15 ms (one thread, same process);
- NumPy (:class:`SmallTSpace`, :class:`SmallPSpace`), batched over the live samples: where the
  extension is not built (no C compiler at install time) or is older than its source, and as
  the tests' oracle for the compiled form (they agree step for step).

Both run the same iteration as the torch one:

- the same two candidate signed sets (Newton, primal–dual), the second only where it differs
  from the first, for the live samples only; the same reuse of factors (the sample's cached
  factor where a candidate's support is its last set, one factor for two candidates of one
  support), and the same factorisation (:func:`~poolings.rank.factored.cholesky_` in NumPy,
  LAPACK's ``dpotrf`` compiled) and triangular solves;
- the same passes: in p-space the gradient and both right-hand sides in one product with
  ``V`` (:func:`~poolings.rank.pspace.combine_long`), and both candidates' residuals in another,
  in the dtype of ``V``;
- the same moves: a reproduced candidate, else the one with the lower ``f`` if it decreases
  ``f``, else the Newton direction with the exact line search of
  :func:`~poolings.rank.common.exact_line_search` (that function in NumPy, its transcription
  in C compiled; both on float64 data);
- the same stopping rule: a sample is done when its point is the minimiser of its own piece
  with that signed set reproduced (``A`` and every sign) and a relative gradient
  ``≤ check_tol`` (relative to the scale of its piece, :func:`~poolings.rank.active_set.piece_scale`),
  or when its relative gradient is ``≤ tol``; one with no descent left is
  done only at ``≤ check_tol``, and one still running after ``max_iter`` iterations is not;
- what the method keeps for the backward pass: the factor of each sample's last set in the
  method's factor cache (and, in p-space, ``M`` of that set), as
  :meth:`~poolings.rank.factored.FactoredSpace.commit` leaves them.

Padded steps need no mask: their frames and targets are zero, so their residuals stay
exactly zero and they are never active. Problems qualify by :func:`is_small_numpy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from argminlayers._compiled import load_compiled

from .active_set import ActiveSetResult, piece_scale
from .common import exact_line_search
from .factored import SMALL_FLOPS, FactoredSpace, cholesky_, cholesky_solve
from .pspace import PSpace, combine_long
from .tspace import TSpace


def is_small_numpy(B: int, n: int, device: torch.device | str) -> bool:
    """Whether ``B`` systems of size ``n`` run by :func:`small_solve`: on the CPU, with
    ``B n³ ≤`` :data:`~poolings.rank.factored.SMALL_FLOPS`."""
    return torch.device(device).type == "cpu" and B * n**3 <= SMALL_FLOPS


def _signs(r: np.ndarray, eps: float) -> np.ndarray:
    """The signed set at residuals ``r``: ``sign(r)`` where ``|r| > ε``, 0 elsewhere."""
    return np.sign(r) * (np.abs(r) > eps)


def _add_identity_(H: np.ndarray) -> None:
    """``H += I`` on each ``(n, n)`` matrix of ``H (c, n, n)``, in place: the diagonals alone
    instead of a full-size add."""
    if H.flags.c_contiguous:  # the diagonals as one strided view
        H.reshape(H.shape[0], -1)[:, :: H.shape[-1] + 1] += 1
    else:
        d = np.arange(H.shape[-1])
        H[:, d, d] += 1


def _loss(r: np.ndarray, eps: float) -> np.ndarray:
    return np.square(np.maximum(np.abs(r) - eps, 0)).sum(-1)


def tspace_matrices(K: np.ndarray, C: float, rows: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``I + C D K D`` of the sets ``A (c, T)`` (float64 0/1) of samples ``rows (c,)``, ``(c, T, T)``."""
    H = K[rows] * (C * A)[:, :, None] * A[:, None, :]
    _add_identity_(H)
    return H


def pspace_matrices(V: np.ndarray, M: np.ndarray, M_set: np.ndarray, C: float, rows: np.ndarray,
                    A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(I + M_A, M_A)`` of the sets ``A (c, T)`` (float64 0/1) of samples ``rows (c,)``, each
    ``(c, p, p)``: from the sample's ``M`` (of the set ``M_set``) and the steps whose membership
    changed."""
    old = M_set[rows].astype(bool)
    H = M[rows]
    ch = (A != 0) != old
    k = int(ch.sum(-1).max())
    if k:
        idx = np.argsort(~ch, axis=-1, kind="stable")[:, :k]  # the changed steps first
        Vd = V[rows[:, None], idx]  # (c, k, p), in the dtype of V
        w = np.take_along_axis(A - old, idx, 1).astype(Vd.dtype)  # +1 entering, −1 leaving, 0 padding
        # as PSpace: the product in V's dtype (exact signs), scaled by C in float64
        H += np.float64(C) * np.matmul((Vd * w[:, :, None]).transpose(0, 2, 1), Vd)
    gram = H.copy()  # M of each set, before the identity (and the factorisation in place)
    _add_identity_(H)
    return H, gram


class SmallTSpace:
    """NumPy views of a :class:`~poolings.rank.tspace.TSpace` (variable ``β``, ``n = T``)."""

    def __init__(self, space: TSpace):
        self.K = space.K.numpy()  # (B, T, T)
        self.y, self.C, self.eps = space.y.numpy(), space.C, space.eps

    def gradient(self, x, e, S):
        """``‖∇_u f‖`` at the points ``x`` (``e``: their excesses), ``(B,)``, and the right-hand
        sides of the candidate sets ``S (B, 2, T)``, ``(B, 2, n)``."""
        gamma = x - self.C * e  # ∇_u f = Vᵀγ, ‖∇_u f‖² = γᵀKγ
        g = np.sqrt(np.maximum((gamma * np.matmul(gamma[:, None], self.K)[:, 0]).sum(-1), 0))
        return g, (S != 0) * (self.C * (self.y[:, None] - self.eps * S))  # C D (y − s ε)

    def matrices(self, rows, A):
        return tspace_matrices(self.K, self.C, rows, A)

    def residuals(self, X):
        """``(R, ‖u‖²)`` of the points ``X (B, 2, n)``: ``(B, 2, T)``, ``(B, 2)``."""
        R = self.y[:, None] - np.matmul(X, self.K)  # r = y − Kβ
        return R, (X * (self.y[:, None] - R)).sum(-1)  # ‖u‖² = βᵀKβ

    def line_terms(self, x, d, r, dr):
        return -(x * dr).sum(-1), -(d * dr).sum(-1)  # K d = −Δr

    def adopt(self, rows, new, sets):
        """Samples ``rows`` move to the sets ``sets`` of the last :meth:`matrices`' entries ``new``
        (``−1``: the set kept already); nothing to keep in T-space."""


class SmallPSpace:
    """NumPy views of a :class:`~poolings.rank.pspace.PSpace` (variable ``u``, ``n = p``).

    Passes over ``V`` run as in :class:`~poolings.rank.pspace.PSpace`;
    ``H_A = I + M_A`` is built from the sample's kept ``M`` and the steps that changed."""

    def __init__(self, space: PSpace):
        self.Vt = space.V.detach()  # (B, T, p)
        self.V = self.Vt.numpy()
        self.M, self.M_set = space.M.numpy(), space.M_set.numpy()  # (B, p, p) float64, (B, T) bool: views
        self.M_set &= space.mask.numpy()  # padded steps are zero: leaving M's set changes nothing
        self.y, self.C, self.eps = space.y.numpy(), space.C, space.eps
        self._H = None

    def _pass(self, c, transpose):
        """``Vᵀc`` (``c (B, k, T)`` → ``(B, k, p)``) by :func:`~poolings.rank.pspace.combine_long`,
        or, ``transpose``, ``V c`` (``(B, k, p)`` → ``(B, k, T)``), a batched product in the dtype
        of ``V``; float64 out: one pass."""
        if not transpose:
            return combine_long(torch.from_numpy(c), self.Vt).numpy()
        c = torch.from_numpy(c).to(self.Vt.dtype)
        return torch.bmm(c, self.Vt.transpose(1, 2)).to(torch.float64).numpy()

    def gradient(self, x, e, S):
        # u − C Vᵀe and C V_Aᵀ(y − s ε) of the candidate sets, in one pass
        W = self._pass(np.concatenate(((self.C * e)[:, None], (S != 0) * (self.C * (self.y[:, None] - self.eps * S))),
                                      axis=1), False)  # (B, 3, p)
        return np.linalg.norm(x - W[:, 0], axis=-1), W[:, 1:]

    def matrices(self, rows, A):
        H, self._H = pspace_matrices(self.V, self.M, self.M_set, self.C, rows, A)
        return H

    def residuals(self, X):
        return self.y[:, None] - self._pass(X, True), np.square(X).sum(-1)  # r = y − V u

    def line_terms(self, x, d, r, dr):
        return (x * d).sum(-1), np.square(d).sum(-1)

    def adopt(self, rows, new, sets):
        fresh = new >= 0
        self.M[rows[fresh]], self.M_set[rows[fresh]] = self._H[new[fresh]], sets[fresh]


def _keep(cache: np.ndarray, cache_set: np.ndarray, H: np.ndarray, rows: np.ndarray, new: np.ndarray,
          sets: np.ndarray) -> None:
    """Samples ``rows`` keep the factors ``H[new]`` of their sets ``sets`` (``new = −1``: the kept one)."""
    fresh = new >= 0
    cache[rows[fresh]], cache_set[rows[fresh]] = H[new[fresh]], sets[fresh]


def _kernel():
    """The compiled iteration (:mod:`poolings.rank._small_kernel`), imported on first use; ``None``
    where the package was installed without it (no C compiler), or where it is older than its
    source (see :func:`argminlayers._compiled.load_compiled`)."""
    global _KERNEL
    if _KERNEL is False:
        _KERNEL = load_compiled("poolings.rank._small_kernel", "rank pooling's small problems run the NumPy iteration")
    return _KERNEL


_KERNEL = False
COMPILED = True  # use the compiled iteration where it is available (False: always NumPy)


def small_solve(space: FactoredSpace, C: float, eps: float, *, tol: float, check_tol: float,
                max_iter: int, step_floor: float = 0.0, compiled: bool | None = None) -> ActiveSetResult | None:
    """The active-set iteration on ``space`` (a :class:`~poolings.rank.tspace.TSpace` or
    :class:`~poolings.rank.pspace.PSpace` on the CPU): compiled where the extension is built
    (:func:`compiled_solve`), else in NumPy; ``None`` where a candidate matrix could not be
    factorised (the caller then runs the general iteration, which reports it).
    ``step_floor``: as in :func:`~poolings.rank.active_set.active_set_solve`; ``compiled``:
    ``None`` (default: :data:`COMPILED`), ``True`` or ``False`` (the NumPy iteration)."""
    tspace = isinstance(space, TSpace)
    if kernel_runs(space.y.shape[1], space.n, None if tspace else space.V.dtype, compiled=compiled):
        return compiled_solve(space, C, eps, tol=tol, check_tol=check_tol, max_iter=max_iter, step_floor=step_floor)
    sp = SmallTSpace(space) if tspace else SmallPSpace(space)
    y, norms = space.y.numpy(), space.norms.numpy()  # (B, T) float64 each
    B, T = y.shape
    n = space.n
    x, r, beta = np.zeros((B, n)), y.copy(), np.zeros((B, T))  # x (β or u), r = y − V u, dual weights
    u2 = np.zeros(B)
    f = 0.5 * C * _loss(r, eps)
    stable, done, factored = np.zeros(B, dtype=bool), np.zeros(B, dtype=bool), np.zeros(B, dtype=bool)
    live = np.ones(B, dtype=bool)
    iters = np.zeros(B, dtype=np.int64)
    tiny = np.finfo(np.float64).tiny
    cache, cache_set = space._cache().numpy(), space.factor_set.numpy()  # views: factors of each last set
    for it in range(max_iter + 1):
        sgn1 = _signs(r, eps)  # Newton set of the current point
        e = (r - eps * sgn1) * (sgn1 != 0)
        S2 = np.stack((sgn1, np.where(beta != 0, np.sign(beta), sgn1)), axis=1)  # Newton, primal-dual sets
        g, rhs2 = sp.gradient(x, e, S2)  # (B,), (B, 2, n)
        rel = g / np.maximum(np.sqrt(np.maximum(u2, 0)) + C * (np.abs(e) * norms).sum(-1), tiny)
        finished = live & ((rel <= tol) | (stable & (g <= check_tol * piece_scale(u2, y, sgn1, norms, C, eps))))
        gnorm = g
        done |= finished
        live &= ~finished
        if it == max_iter or not live.any():
            break

        # the candidates of the live samples L: every Newton set, then the primal-dual sets that differ
        L = np.flatnonzero(live)
        m = L.size
        s1, s2 = S2[L, 0], S2[L, 1]
        D = np.flatnonzero((s1 != s2).any(-1))
        second = np.arange(m)  # the candidate index of each sample's second set (its first where equal)
        second[D] = m + np.arange(D.size)
        owner = np.concatenate((L, L[D]))  # sample of each candidate, and which of its two sets
        kind = np.concatenate((np.zeros(m, dtype=np.int64), np.ones(D.size, dtype=np.int64)))
        S = np.concatenate((s1, s2[D]))  # (c, T)
        A = S != 0
        # a factor for each candidate: the cache where its support is the cached set (signs flipped
        # only), the first candidate's where both of a sample share a support, else a new one
        src = np.where(factored[owner] & (A == cache_set[owner]).all(-1), -1, np.arange(owner.size))
        shared = np.flatnonzero((A[m:] == A[D]).all(-1))
        src[m + shared] = src[D[shared]]
        N = np.flatnonzero(src == np.arange(owner.size))  # candidates with a new factor
        new = np.full(owner.size, -1)
        new[N] = np.arange(N.size)
        H = np.empty((0, n, n))
        if N.size:
            H = sp.matrices(owner[N], A[N].astype(np.float64))
            if bool(cholesky_(torch.from_numpy(H)).any()):  # in place: H now holds the factors
                return None
        hidx = np.where(src < 0, -1, new[np.maximum(src, 0)])  # (c,) index into H, −1: the cache
        rhs = rhs2[owner, kind][:, :, None]
        X = np.empty((owner.size, n))
        for rows, F_ in ((hidx >= 0, H), (hidx < 0, cache)):
            if rows.any():
                at = hidx[rows] if F_ is H else owner[rows]
                F_ = F_ if F_ is H and np.array_equal(at, np.arange(len(H))) else F_[at]
                X[rows] = cholesky_solve(torch.from_numpy(rhs[rows]), torch.from_numpy(F_)).numpy()[:, :, 0]
        Xd = np.zeros((B, 2, n))
        Xd[owner, kind] = X
        R, U2 = sp.residuals(Xd)
        R, U2 = R[owner, kind], U2[owner, kind]
        iters[L] += 1
        reproduced = (_signs(R, eps) == S).all(-1)
        F = 0.5 * U2 + 0.5 * C * _loss(R, eps)
        first = np.arange(m)
        Fm = np.where(reproduced, -np.inf, F)
        pick = np.where(Fm[second] < Fm[first], second, first)  # a reproduced one, else lower f; ties: Newton
        Fk, hit = F[pick], reproduced[pick]
        jump = hit | (Fk < f[L])
        J, cj = L[jump], pick[jump]  # samples that move to a candidate
        Sk, Rk = S[cj], R[cj]
        beta[J] = (Sk != 0) * (C * (Rk - Sk * eps))
        x[J], r[J], u2[J], f[J] = X[cj], Rk, U2[cj], Fk[jump]
        _keep(cache, cache_set, H, J, hidx[cj], Sk != 0)
        sp.adopt(J, hidx[cj], Sk != 0)
        moved = np.zeros(B, dtype=bool)
        moved[J] = True
        progress = moved.copy()  # moved, by more than a step at the rounding level
        if not jump.all():
            # the Newton direction with an exact line search (r is affine in x)
            Q, q = L[~jump], first[~jump]
            xq, rq = x[Q], r[Q]
            d, dr = X[q] - xq, R[q] - rq
            ud, dd = sp.line_terms(xq, d, rq, dr)
            a = exact_line_search(*(torch.from_numpy(z) for z in (rq, dr, ud, dd)),
                                  space.mask[torch.from_numpy(Q)], C, eps).numpy()
            r_a = rq + a[:, None] * dr
            u2_a = u2[Q] + 2 * a * ud + a * a * dd
            f_a = 0.5 * u2_a + 0.5 * C * _loss(r_a, eps)
            step = (a > 0) & (f_a <= f[Q])
            real = step & (a * np.linalg.norm(d, axis=-1) > step_floor * np.linalg.norm(xq, axis=-1))
            progress[Q[real]] = True
            P, ps, a = Q[step], q[step], a[step, None]
            beta_n = (s1[ps] != 0) * (C * (R[ps] - s1[ps] * eps))
            x[P], r[P] = xq[step] + a * d[step], r_a[step]
            beta[P] += a * (beta_n - beta[P])
            u2[P], f[P] = u2_a[step], f_a[step]
            _keep(cache, cache_set, H, P, hidx[ps], s1[ps] != 0)  # the Newton set's factor, as commit keeps
            sp.adopt(P, hidx[ps], s1[ps] != 0)
            moved[P] = True
        factored |= moved
        stable = np.zeros(B, dtype=bool)
        stable[J[hit[jump]]] = True
        stuck = live & ~progress  # no descent left at working precision
        done |= stuck & (rel <= check_tol)
        live &= progress

    space.has_factor |= torch.from_numpy(factored)
    sgn = torch.from_numpy(_signs(r, eps))
    return ActiveSetResult(torch.from_numpy(x), torch.from_numpy(r), sgn != 0, sgn, torch.from_numpy(done),
                           torch.from_numpy(iters), torch.from_numpy(gnorm))


_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_runs(T: int, n: int, dtype: torch.dtype | None, *, compiled: bool | None = None) -> bool:
    """Whether the compiled iteration takes a small problem of ``T`` steps and size ``n``: the
    kernel is built, current and used (``compiled``: ``None``, :data:`COMPILED`), a p-space ``V``
    (its ``dtype``; ``None`` for T-space, whose data are float64) is float32 or float64, and a
    sample fits C int indexing (``kernel.fits``; larger ones run the NumPy iteration)."""
    kernel = _kernel() if (COMPILED if compiled is None else compiled) else None
    tspace = dtype is None
    return kernel is not None and (tspace or dtype in _KERNEL_DTYPES) and kernel.fits(T, n, tspace)


def compiled_solve(space: FactoredSpace, C: float, eps: float, *, tol: float, check_tol: float,
                   max_iter: int, step_floor: float = 0.0) -> ActiveSetResult | None:
    """:func:`small_solve`'s iteration in :mod:`poolings.rank._small_kernel`: each sample alone,
    with BLAS and LAPACK called directly (the same sets, moves, passes and stopping rule), leaving
    the same factor cache (and, in p-space, ``M``) for the backward pass."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("poolings.rank._small_kernel is not built (pip install -e . builds it)")
    as_u8 = lambda t: t.numpy().view(np.uint8)  # noqa: E731 - bool tensors, shared memory
    mask = as_u8(space.mask)
    cache, cache_set = space._cache().numpy(), as_u8(space.factor_set)
    y, norms = np.ascontiguousarray(space.y.numpy()), np.ascontiguousarray(space.norms.numpy())
    if isinstance(space, TSpace):
        out = kernel.solve(np.ascontiguousarray(space.K.numpy()), None, np.zeros((1, 1, 1)),
                           np.zeros((1, 1), np.uint8), y, norms, mask, C, eps, tol, check_tol, max_iter,
                           step_floor, cache, cache_set)
    else:
        M_set = as_u8(space.M_set)
        M_set &= mask  # padded steps are zero: leaving M's set changes nothing
        out = kernel.solve(None, np.ascontiguousarray(space.V.detach().numpy()), space.M.numpy(), M_set, y, norms,
                           mask, C, eps, tol, check_tol, max_iter, step_floor, cache, cache_set)
    if out is None:
        return None
    x, r, done, iters, gnorm, factored = (torch.from_numpy(z) for z in out)
    space.has_factor |= factored
    sgn = torch.from_numpy(_signs(r.numpy(), eps))
    return ActiveSetResult(x, r, sgn != 0, sgn, done, iters, gnorm)


@dataclass
class DirectResult:
    """What :func:`compiled_direct` returns, as NumPy arrays (float64 unless said): the points
    ``x (B, n)`` (``β`` in T-space, ``u`` in p-space), residuals ``r (B, T)``, signs ``sign (B, T)``
    of the final signed sets, ``done (B,)`` bool, ``iters (B,)`` int64, ``gnorm (B,)``, the factor
    ``(B, n, n)`` of each sample's final set, p-space's ``M (B, p, p)`` of that set (else ``None``)
    and the frames' norms ``(B, T)``."""

    x: np.ndarray
    r: np.ndarray
    sign: np.ndarray
    done: np.ndarray
    iters: np.ndarray
    gnorm: np.ndarray
    factor: np.ndarray
    gram: np.ndarray | None
    norms: np.ndarray


def compiled_direct(V: torch.Tensor, mask: torch.Tensor, C: float, eps: float, tspace: bool, *, tol: float,
                    check_tol: float, max_iter: int, step_floor: float = 0.0) -> DirectResult | None:
    """The whole direct solve of a small CPU problem in :func:`compiled_solve`'s iteration, its
    data prepared and its results read on NumPy arrays: no :class:`~poolings.rank.factored.FactoredSpace`
    and none of the small tensor operations around the kernel (at ``2 × 50 × 64`` those took
    about three times the kernel's own 0.13 ms). The data are the spaces' own (``K = V Vᵀ`` or
    ``M = C VᵀV`` by the same products, the targets, the norms); the final sets' factors are
    :meth:`~poolings.rank.factored.FactoredSpace.final_factor`'s: the kernel's cache, refactorised
    where it belongs to another set.

    For the non-empty problems that :func:`is_small_numpy` and :func:`kernel_runs` admit (the
    caller asks them); ``V`` contiguous, on the CPU. ``None`` where a candidate matrix could not
    be factorised: the caller then runs the general iteration, which reports it."""
    B, T, p = V.shape
    n = T if tspace else p
    kernel = _kernel()
    C, eps = float(C), float(eps)
    m = np.ascontiguousarray(mask.numpy())
    mu8 = m.view(np.uint8)
    y = m.cumsum(1).astype(np.float64)
    y *= m  # step_positions: t over the valid steps, 0 at padded ones
    cache = np.zeros((B, n, n))
    _add_identity_(cache)  # rows never filled stay finite
    cache_set = np.zeros((B, T), np.uint8)
    if tspace:
        K = torch.bmm(V, V.transpose(1, 2))  # TSpace's K, in float64
        K = K.numpy().astype(np.float64) if K.dtype in _KERNEL_DTYPES else K.to(torch.float64).numpy()
        norms = np.sqrt(np.maximum(np.diagonal(K, axis1=1, axis2=2), 0))
        M = M_set = Vn = None
        out = kernel.solve(K, None, np.zeros((1, 1, 1)), np.zeros((1, 1), np.uint8), y, norms, mu8, C, eps, tol,
                           check_tol, max_iter, step_floor, cache, cache_set)
    else:
        Vn = V.numpy()
        M = torch.bmm(V.transpose(1, 2), V).numpy().astype(np.float64)
        M *= C  # PSpace's M, of the set M_set
        M_set = mu8.copy()  # all valid steps (padded ones are zero: leaving M's set changes nothing)
        norms = torch.linalg.vector_norm(V, dim=-1).numpy().astype(np.float64)
        out = kernel.solve(None, Vn, M, M_set, y, norms, mu8, C, eps, tol, check_tol, max_iter, step_floor,
                           cache, cache_set)
    if out is None:
        return None
    x, r, done, iters, gnorm, factored = out
    sign = _signs(r, eps)
    active = sign != 0
    stale = np.flatnonzero(~factored.astype(bool) | (cache_set.view(bool) != active).any(-1))
    if stale.size:  # as final_factor: the factor (and M) of the final set, where the cache has another's
        A = active[stale].astype(np.float64)
        if tspace:
            H = tspace_matrices(K, C, stale, A)
        else:
            H, M[stale] = pspace_matrices(Vn, M, M_set, C, stale, A)
        cholesky_(torch.from_numpy(H))
        cache[stale] = H
    return DirectResult(x, r, sign, done.astype(bool), iters.astype(np.int64), gnorm, cache, M, norms)
