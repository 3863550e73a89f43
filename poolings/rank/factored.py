"""Direct methods: a space whose piece minimisers come from a batched Cholesky factorisation.

The T-space and p-space methods differ only in the matrix they factorise for a set ``A``
(``I + C D K D``, ``T × T``; or ``I + C V_Aᵀ V_A``, ``p × p``), in the right-hand side of a
signed set and in how residuals are formed. What they share lives here:

- the **factor cache**: per sample, the factor of the set last moved to. A candidate set with
  the same ``A`` (a solve that flipped signs only) reuses it, and when the two candidate sets
  of a sample share ``A`` they share one new factor (two right-hand sides);
- new factors are built only for live samples and only where needed, directly in their own
  buffer (no gather of the cache), and factorised in place. Small problems skip all of this
  and factorise every candidate (``is_small``): a few kernels instead of dozens;
- the cache is full size ``(B, n, n)`` and is the factor the backward pass reuses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .active_set import Space

# Small problems (B n³ ≤ SMALL_FLOPS and B ≤ SMALL_BATCH) factorise every candidate of every
# sample afresh: there, the kernels the reuse bookkeeping launches cost more than it saves.
SMALL_FLOPS = 2e7
SMALL_BATCH = 8
SMALL_COPY = 2**20  # elements: factors are committed with one gather below this, row by row above


def is_small(B: int, n: int) -> bool:
    """Whether a batch of ``B`` systems of size ``n`` is solved without the factor bookkeeping."""
    return B * n**3 <= SMALL_FLOPS and B <= SMALL_BATCH


def _same(a: Tensor, b: Tensor) -> Tensor:
    return (a == b).all(-1)


CHOLESKY_BLOCK = 128


# On the CPU, Cholesky factors and Gram products go to the LAPACK/BLAS that SciPy ships
# (OpenBLAS; the compiled kernel of small problems calls the same library) one sample at a time,
# where torch's CPU build calls MKL. Measured on the development machine (AMD EPYC, one thread):
# ``potrf`` factorised 4 matrices of 512 in 7.6 ms where torch took 16.8 ms (4 of 64: 0.07 against
# 0.20 ms; 4 of 1024: 51 against 134 ms), and ``syrk`` (the Gram product's symmetric half, half
# the flops) took 34 ms for VᵀV at 4 × 4000 × 512 (float32) where ``torch.bmm`` took 96 ms.
_LAPACK_MIN_N = 32      # below this, one batched torch call beats a loop over the samples
_SYRK_MIN_FLOPS = 2e6   # T p² (or T² p) per sample below which torch.bmm is as fast


def _numpy_ok(A: Tensor) -> bool:
    """Whether ``A`` can be handed to NumPy: on the CPU, float32/64, and not recorded by autograd
    (the solves run without it: inside the layer's ``autograd.Function``, or detached)."""
    return (A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64)
            and not (A.requires_grad and torch.is_grad_enabled()))


def _lapack():
    from scipy.linalg import blas, lapack

    return blas, lapack


def cholesky_(A: Tensor) -> Tensor:
    """Lower Cholesky factors of ``A (m, n, n)`` in place (upper triangle zeroed); returns ``info (m,)``
    (0, or the order of the first leading minor that is not positive definite). Only the lower
    triangle of ``A`` is read.

    On the CPU (``n ≥ 32``, each ``A[i]`` contiguous), SciPy's LAPACK ``potrf`` factorises each
    matrix in place (see the note above :data:`_LAPACK_MIN_N`). Elsewhere,
    blocked right-looking for ``n > 2 × 128``: per block column, LAPACK on the ``128 × 128``
    diagonal block, a triangular solve for the panel below it and a GEMM update of the trailing
    matrix, so most of the ``n³/3`` flops run as GEMM. On the development machine (one thread,
    MKL, whose own factorisation ran at 1.5–3 GFLOP/s there) this factorised 4 matrices of 512 in
    37 ms where ``torch.linalg.cholesky_ex`` took 58 ms, and 4 of 1024 in 165 ms against 347 ms;
    both agree to 1e-15.
    """
    m, n, _ = A.shape
    if n >= _LAPACK_MIN_N and _numpy_ok(A) and A.stride()[1:] == (n, 1):
        return _potrf_(A)
    info = torch.zeros(m, dtype=torch.int32, device=A.device)
    if n <= 2 * CHOLESKY_BLOCK:
        # LAPACK factorises column-major matrices: the upper factor of Aᵀ (a column-major view
        # of A's rows, reading A's lower triangle) lands in place as L, with no transposed copy
        # in or out (measured 0.7 → 0.35 ms for 16 of 64, 7.0 → 2.8 ms for 16 of 128, float64)
        torch.linalg.cholesky_ex(A.mT, upper=True, out=(A.mT, info))
        return info
    for k in range(0, n, CHOLESKY_BLOCK):
        e = min(k + CHOLESKY_BLOCK, n)
        Akk = A[:, k:e, k:e]
        L, bad = torch.linalg.cholesky_ex(Akk)
        info = torch.where((info == 0) & (bad > 0), bad + k, info)
        Akk.copy_(L)
        if e < n:
            A21 = A[:, e:, k:e]
            A21.copy_(torch.linalg.solve_triangular(L.mT, A21, upper=True, left=False))  # A21 L⁻ᵀ
            A[:, e:, e:].baddbmm_(A21, A21.mT, alpha=-1)
    A.tril_()
    return info


def _potrf_(A: Tensor) -> Tensor:
    """:func:`cholesky_` by SciPy's ``potrf``, sample by sample, in place."""
    _, lapack = _lapack()
    potrf = lapack.dpotrf if A.dtype == torch.float64 else lapack.spotrf
    info = torch.zeros(A.shape[0], dtype=torch.int32)
    An = A.detach().numpy()
    for i in range(A.shape[0]):
        x = An[i].T  # column-major view: its upper triangle is A[i]'s lower one
        c, bad = potrf(x, lower=0, overwrite_a=1, clean=1)  # the upper factor Uᵀ U of x is L = Uᵀ
        if c is not x and not np.shares_memory(c, x):  # pragma: no cover (f2py copied after all)
            x[...] = c
        if bad < 0:  # pragma: no cover (the arguments are valid by construction)
            raise RuntimeError(f"LAPACK potrf: illegal argument {-bad}")
        # OpenBLAS reports success on NaN input (torch's LAPACK does not): a factor that is not
        # finite is a failure, at its first non-finite pivot
        pivots = np.isfinite(x.diagonal())
        info[i] = bad if bad or pivots.all() else int(np.argmin(pivots)) + 1
    return info


def gram(V: Tensor, outer: bool) -> Tensor:
    """``V Vᵀ`` (``outer``, ``(B, T, T)``) or ``Vᵀ V`` (``(B, p, p)``) of ``V (B, T, p)``, in the
    dtype of ``V``, symmetric. On the CPU, for products of at least :data:`_SYRK_MIN_FLOPS` per
    sample and a contiguous ``V``, BLAS ``syrk`` computes one triangle (half the flops of
    ``torch.bmm``) and the other is mirrored; elsewhere ``torch.bmm``."""
    B, T, p = V.shape
    flops = T * T * p if outer else T * p * p
    if flops < _SYRK_MIN_FLOPS or not _numpy_ok(V) or not V.is_contiguous():
        return torch.bmm(V, V.transpose(1, 2)) if outer else torch.bmm(V.transpose(1, 2), V)
    blas, _ = _lapack()
    syrk = blas.dsyrk if V.dtype == torch.float64 else blas.ssyrk
    n = T if outer else p
    out = torch.empty(B, n, n, dtype=V.dtype)
    Vn, On = V.detach().numpy(), out.numpy()
    for i in range(B):
        # V[i]ᵀ is column-major (p, T): trans=0 gives V[i]ᵀV[i], trans=1 gives V[i]V[i]ᵀ, in the
        # upper triangle of a column-major result, i.e. the lower one of the row-major out[i]
        c = syrk(1.0, Vn[i].T, trans=1 if outer else 0, lower=0)
        On[i] = c.T
    out.tril_()
    return out.add_(out.tril(-1).mT)


def cholesky_solve(b: Tensor, L: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ b`` by two triangular solves, ``b: (m, n, c)``. Unlike ``torch.cholesky_solve``
    this does not copy ``L`` (measured 12 vs 45 ms at n = 2048, float64, one thread)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, b, upper=False), upper=True)


class FactoredSpace(Space):
    """A :class:`~poolings.rank.active_set.Space` solved by Cholesky; subclasses give
    :meth:`_matrices` (the matrices to factorise for given sets, written into a workspace),
    :meth:`_rhs` and :meth:`_residuals`.

    Attributes:
        n: size of the factorised matrices.
        factor: ``(B, n, n)`` lower Cholesky factors, of the sets ``factor_set`` where ``has_factor``.
    """

    n: int

    def _init_cache(self, B: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n = n
        self.factor: Tensor | None = None
        self.factor_set = torch.zeros(B, self.y.shape[1], dtype=torch.bool, device=device)
        self.has_factor = torch.zeros(B, dtype=torch.bool, device=device)
        self._pending: tuple | None = None
        self._fdtype, self._fdevice = dtype, device

    def _workspace(self, m: int) -> Tensor:
        """``(m, n, n)`` buffer for new factors, kept across iterations (a fresh large buffer each
        iteration costs its page faults: measured 35 ms for 33 MB on the development machine)."""
        if getattr(self, "_work", None) is None or self._work.shape[0] < m:
            self._work = torch.empty(m, self.n, self.n, dtype=self._fdtype, device=self._fdevice)
        return self._work[:m]

    def _cache(self) -> Tensor:
        if self.factor is None:  # identity rows: a solve against a row never filled stays finite
            B = self.has_factor.shape[0]
            self.factor = torch.zeros(B, self.n, self.n, dtype=self._fdtype, device=self._fdevice)
            self.factor.diagonal(dim1=-2, dim2=-1).fill_(1)
        return self.factor

    # ---- what a direct method supplies ---------------------------------------------------
    def _matrices(self, rows: Tensor, act: Tensor, out: Tensor) -> Tensor:
        """The matrices of sets ``act (m, T)`` for samples ``rows (m,)``, written into ``out (m, n, n)``."""
        raise NotImplementedError

    def _adopt(self, rows: Tensor, new: Tensor) -> None:
        """Samples ``rows`` move to the sets of new factors ``new`` (indices into the last :meth:`_matrices`)."""

    def _rhs(self, S: Tensor, A: Tensor) -> Tensor:
        """Right-hand sides of the candidate sets ``S`` (their supports ``A``), ``(B, k, n)``."""
        raise NotImplementedError

    def _residuals(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, ‖u‖²)`` of the points ``X (B, k, n)``: ``(B, k, T)`` and ``(B, k)``."""
        raise NotImplementedError

    # ---- the shared mechanics --------------------------------------------------------------
    def _factorise(self, rows: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        """Lower Cholesky factors of the matrices of ``act`` (in the workspace, in place) and ``info``."""
        M = self._matrices(rows, act, self._workspace(rows.numel()))
        return M, cholesky_(M)

    def solve(self, x, S, live):
        B, k, T = S.shape
        A = S != 0
        rhs = self._rhs(S, A)  # (B, k, n)
        if is_small(B, self.n):
            # small: factorise every candidate, no bookkeeping (a few kernels instead of dozens)
            F, info = self._factorise(self._rows(B, k), A.view(B * k, T))
            X = cholesky_solve(rhs.reshape(B * k, self.n, 1), F).view(B, k, self.n)
            self._pending = (F, torch.arange(B * k, device=S.device).view(B, k), A)
            R, U2 = self._residuals(X)
            return X, R, U2, (info == 0).view(B, k)
        need = live.unsqueeze(-1).expand(B, k).clone()
        if k == 2:  # the primal-dual set where it equals the Newton set: copied, not solved
            need[:, 1] &= ~_same(S[:, 1], S[:, 0])
        cur = [need[:, j] & self.has_factor & _same(A[:, j], self.factor_set) for j in range(k)]
        new = [need[:, j] & ~cur[j] for j in range(k)]
        share = torch.zeros_like(new[0])
        if k == 2:  # both sets of a sample need a new factor of the same A: one factor, two solves
            share = new[0] & new[1] & _same(A[:, 1], A[:, 0])
            new[1] = new[1] & ~share
        X = torch.zeros(B, k, self.n, dtype=rhs.dtype, device=rhs.device)
        good = need.clone()
        fidx = torch.full((B, k), -1, dtype=torch.long, device=rhs.device)
        rows = [new[j].nonzero().squeeze(-1) for j in range(k)]
        m = sum(int(r.numel()) for r in rows)
        F = None
        if m:
            b = torch.cat(rows)
            kind = torch.cat([torch.full_like(r, j) for j, r in enumerate(rows)])
            F, info = self._factorise(b, A[b, kind])
            cols = rhs[b, kind]  # (m, n)
            if k == 2:
                cols = torch.stack((cols, rhs[b, 1]), dim=-1)  # second column: the shared solve
            sol = cholesky_solve(cols.view(m, self.n, -1), F)
            slot = torch.arange(m, device=b.device)
            X[b, kind] = sol[..., 0]
            fidx[b, kind] = slot
            good[b, kind] = info == 0
            if bool(share.any()):
                sh = (kind == 0) & share[b]
                X[b[sh], 1] = sol[sh, :, 1]
                fidx[b[sh], 1] = slot[sh]
                good[b[sh], 1] = info[sh] == 0
        self._pending = (F, fidx, A)
        use_cur = torch.stack(cur, dim=1)  # (B, k)
        if bool(use_cur.any()):
            sol = cholesky_solve(rhs.transpose(1, 2), self._cache()).transpose(1, 2)  # (B, k, n)
            X = torch.where(use_cur.unsqueeze(-1), sol, X)
        if k == 2:
            copy = live & ~need[:, 1]
            X[:, 1] = torch.where(copy.unsqueeze(-1), X[:, 0], X[:, 1])
            good[:, 1] = torch.where(copy, good[:, 0], good[:, 1])
            fidx[:, 1] = torch.where(copy, fidx[:, 0], fidx[:, 1])
        R, U2 = self._residuals(X)
        return X, R, U2, good

    def _rows(self, B: int, k: int) -> Tensor:
        """``(B k,)`` sample of each candidate, in candidate order (cached)."""
        if getattr(self, "_rows_cache", None) is None or self._rows_cache.numel() != B * k:
            self._rows_cache = torch.arange(B, device=self.y.device).repeat_interleave(k)
        return self._rows_cache

    def commit(self, choice: Tensor) -> None:
        F, fidx, A = self._pending
        self._pending = None
        if F is None:
            return
        slot = fidx.gather(1, choice.clamp_min(0).unsqueeze(1)).squeeze(1)
        take = (choice >= 0) & (slot >= 0)
        rows = take.nonzero().squeeze(-1)
        if rows.numel() == 0:
            return
        slot = slot[rows]
        cache = self._cache()
        B, m = cache.shape[0], rows.numel()
        in_order = bool((slot == torch.arange(m, device=slot.device)).all())
        if in_order and m == B == self._work.shape[0] and bool((rows == slot).all()):
            self.factor, self._work = self._work, cache  # every sample's new factor: swap the buffers
        elif in_order:
            cache.index_copy_(0, rows, F[:m])  # no gather of the factors
        elif m * self.n**2 <= SMALL_COPY:
            cache.index_copy_(0, rows, F[slot])
        else:  # row by row: no (m, n, n) temporary
            for b, i in zip(rows.tolist(), slot.tolist()):
                cache[b].copy_(F[i])
        self.factor_set[rows] = A[rows, choice[rows]]
        self.has_factor[rows] = True
        self._adopt(rows, slot)

    def final_factor(self, act: Tensor) -> Tensor:
        """The factor of each sample's set ``act (B, T)``: the cache, refactorised where it
        belongs to another set (a sample that stopped without converging, or ``u* = 0``)."""
        stale = (~self.has_factor | ~_same(self.factor_set, act)).nonzero().squeeze(-1)
        if stale.numel():
            F, _ = self._factorise(stale, act[stale])
            self._cache().index_copy_(0, stale, F)
            self._adopt(stale, torch.arange(stale.numel(), device=stale.device))
            self.factor_set[stale] = act[stale]
            self.has_factor[stale] = True
        return self._cache()
