# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
r"""The active-set iteration of :func:`poolings.rank.small.small_solve`, compiled: one sample at a
time, BLAS and LAPACK (SciPy's) called directly.

Samples are independent, so each runs the same iteration as the batched NumPy code, alone and
with no temporaries: the same two candidate signed sets, the same factor reuse (the cached
factor where a candidate's support is the last set; one factor where both candidates share a
support), the same passes (p-space: ``Vᵀ[C e, c₁, c₂]`` in the dtype of ``V`` below
:data:`LONG` steps and accumulated in float64 from there, ``V [u₁, u₂]`` in the dtype of
``V``), the same moves, exact line search, step floor and stopping rule. Layouts: every array
is C-contiguous; a row-major matrix is handed to BLAS and LAPACK as its column-major transpose.
"""

from libc.math cimport INFINITY, fabs, isfinite, sqrt
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, dgemv, dtrsv, sgemm, sgemv
from scipy.linalg.cython_lapack cimport dpotrf

import numpy as np

cdef int LONG = 512  # as poolings.rank.pspace.LONG
cdef double TINY = 2.2250738585072014e-308

ctypedef struct Event:
    double alpha
    double da
    double db


cdef int _by_alpha(const void *a, const void *b) noexcept nogil:
    cdef double x = (<Event *> a).alpha, y = (<Event *> b).alpha
    return (x > y) - (x < y)


cdef struct Space:
    int kind  # 0: T-space, 1: p-space with float32 V, 2: p-space with float64 V
    int T, n
    double C, eps
    const double *K  # (T, T) T-space
    const float *Vf  # (T, p)
    const double *Vd
    double *M  # (p, p) p-space: M of M_set
    unsigned char *M_set  # (T,)
    const double *y
    const double *norms
    const unsigned char *mask


cdef struct Work:
    double *cols  # (3, T)
    double *W  # (3, n)
    double *X  # (2, n)
    double *R  # (2, T)
    double *H  # (2, n, n): new factors
    double *Hm  # (2, n, n): p-space, M of each candidate set
    double *d
    double *dr
    double *ra
    double *gam
    double *Kg
    double *chunk  # (LONG, p) float64
    float *f_cols  # (3, T)
    float *f_W  # (3, n)
    float *f_X  # (2, n)
    float *f_R  # (2, T)
    double *Vd  # (T, p) changed rows
    double *Vdw
    double *P  # (p, p)
    float *f_Vd
    float *f_Vdw
    float *f_P
    Event *ev  # (2T,)


cdef inline double _sgn(double v) noexcept nogil:
    return (v > 0) - (v < 0)


cdef inline void _signs(const double *r, double eps, double *s, int T) noexcept nogil:
    cdef int t
    for t in range(T):
        s[t] = _sgn(r[t]) if fabs(r[t]) > eps else 0.0


cdef inline double _loss(const double *r, double eps, int T) noexcept nogil:
    cdef double acc = 0.0, z
    cdef int t
    for t in range(T):
        z = fabs(r[t]) - eps
        if z > 0:
            acc += z * z
    return acc


cdef inline int _same(const double *a, const double *b, int T) noexcept nogil:
    cdef int t
    for t in range(T):
        if a[t] != b[t]:
            return 0
    return 1


cdef inline int _same_support(const double *a, const double *b, int T) noexcept nogil:
    cdef int t
    for t in range(T):
        if (a[t] != 0) != (b[t] != 0):
            return 0
    return 1


cdef inline int _is_set(const double *s, const unsigned char *A, int T) noexcept nogil:
    cdef int t
    for t in range(T):
        if (s[t] != 0) != (A[t] != 0):
            return 0
    return 1


cdef inline void _rhs_col(const Space *sp, const double *S, double *c) noexcept nogil:
    """``C D (y − s ε)`` of the signed set ``S``."""
    cdef int t
    for t in range(sp.T):
        c[t] = sp.C * (sp.y[t] - sp.eps * S[t]) if S[t] != 0 else 0.0


cdef void _combine(const Space *sp, Work *w, const double *cols, int k, double *out) noexcept nogil:
    """``out (k, p) = cols (k, T) @ V``: float64 out; as ``combine_long``."""
    cdef int T = sp.T, p = sp.n, i, t0, L, j
    cdef double one = 1.0, zero = 0.0
    cdef float fone = 1.0, fzero = 0.0
    cdef int inc = 1
    if sp.kind == 2:  # matrix-vector products: a GEMM of 2-3 columns spends its time packing V
        for i in range(k):
            dgemv(b"N", &p, &T, &one, <double *> sp.Vd, &p, <double *> cols + i * T, &inc, &zero, out + i * p, &inc)
    elif T < LONG:
        for i in range(k * T):
            w.f_cols[i] = <float> cols[i]
        for i in range(k):
            sgemv(b"N", &p, &T, &fone, <float *> sp.Vf, &p, w.f_cols + i * T, &inc, &fzero, w.f_W + i * p, &inc)
        for i in range(k * p):
            out[i] = w.f_W[i]
    else:
        memset(out, 0, k * p * sizeof(double))
        t0 = 0
        while t0 < T:
            L = min(LONG, T - t0)
            for j in range(L * p):
                w.chunk[j] = sp.Vf[t0 * p + j]
            for i in range(k):
                dgemv(b"N", &p, &L, &one, w.chunk, &p, <double *> cols + i * T + t0, &inc, &one, out + i * p, &inc)
            t0 += LONG


cdef void _residuals(const Space *sp, Work *w, const double *X, int k, double *R, double *U2) noexcept nogil:
    """``R (k, T) = y − V u`` (p-space) or ``y − K β`` (T-space) of the points ``X (k, n)``, and ``‖u‖²``."""
    cdef int T = sp.T, n = sp.n, i, t, j
    cdef double one = 1.0, zero = 0.0, acc
    cdef float fone = 1.0, fzero = 0.0
    cdef int inc = 1
    for i in range(k):
        if sp.kind == 0:
            dgemv(b"N", &T, &T, &one, <double *> sp.K, &T, <double *> X + i * n, &inc, &zero, R + i * T, &inc)
        elif sp.kind == 2:
            dgemv(b"T", &n, &T, &one, <double *> sp.Vd, &n, <double *> X + i * n, &inc, &zero, R + i * T, &inc)
        else:
            for j in range(n):
                w.f_X[i * n + j] = <float> X[i * n + j]
            sgemv(b"T", &n, &T, &fone, <float *> sp.Vf, &n, w.f_X + i * n, &inc, &fzero, w.f_R + i * T, &inc)
            for t in range(T):
                R[i * T + t] = w.f_R[i * T + t]
    for i in range(k):
        acc = 0.0
        for t in range(T):
            R[i * T + t] = sp.y[t] - R[i * T + t]
        if sp.kind == 0:  # ‖u‖² = βᵀKβ = βᵀ(y − r)
            for t in range(T):
                acc += X[i * n + t] * (sp.y[t] - R[i * T + t])
        else:
            for j in range(n):
                acc += X[i * n + j] * X[i * n + j]
        U2[i] = acc


cdef void _matrix(const Space *sp, Work *w, const double *S, double *H, double *Hm) noexcept nogil:
    """The matrix of the support of ``S`` into ``H (n, n)`` (p-space: its ``M`` into ``Hm`` too)."""
    cdef int T = sp.T, n = sp.n, i, j, t, k = 0
    cdef double C = sp.C, one = 1.0, zero = 0.0, wt
    cdef float fone = 1.0, fzero = 0.0
    if sp.kind == 0:  # I + C D K D
        for i in range(n):
            for j in range(n):
                H[i * n + j] = sp.K[i * n + j] * C if (S[i] != 0 and S[j] != 0) else 0.0
            H[i * n + i] += 1.0
        return
    memcpy(H, sp.M, n * n * sizeof(double))
    for t in range(T):  # the steps whose membership changes, gathered with their signs
        if (S[t] != 0) != (sp.M_set[t] != 0):
            wt = 1.0 if S[t] != 0 else -1.0
            if sp.kind == 1:
                for j in range(n):
                    w.f_Vd[k * n + j] = sp.Vf[t * n + j]
                    w.f_Vdw[k * n + j] = sp.Vf[t * n + j] * <float> wt
            else:
                for j in range(n):
                    w.Vd[k * n + j] = sp.Vd[t * n + j]
                    w.Vdw[k * n + j] = sp.Vd[t * n + j] * wt
            k += 1
    if k:  # C V_Δᵀ diag(±1) V_Δ, the product in the dtype of V
        if sp.kind == 1:
            sgemm(b"N", b"T", &n, &n, &k, &fone, w.f_Vdw, &n, w.f_Vd, &n, &fzero, w.f_P, &n)
            for i in range(n * n):
                H[i] += C * w.f_P[i]
        else:
            dgemm(b"N", b"T", &n, &n, &k, &C, w.Vdw, &n, w.Vd, &n, &one, H, &n)
    memcpy(Hm, H, n * n * sizeof(double))
    for i in range(n):
        H[i * n + i] += 1.0


cdef int _factorise(double *H, int n) noexcept nogil:
    """Lower Cholesky factor of ``H`` in place, row-major (upper triangle zeroed); LAPACK's info."""
    cdef int info = 0, i, j
    dpotrf(b"U", &n, H, &n, &info)  # the column-major upper factor is the row-major lower one
    for i in range(n):
        for j in range(i + 1, n):
            H[i * n + j] = 0.0
    return info


cdef void _chol_solve(const double *F, double *b, int n) noexcept nogil:
    """``(L Lᵀ)⁻¹ b`` in place, ``F`` the row-major lower factor (column-major ``U = Lᵀ``): two
    triangular solves (``dpotrs`` goes through a GEMM-based ``dtrsm`` that packs the factor)."""
    cdef int inc = 1
    dtrsv(b"U", b"T", b"N", &n, <double *> F, &n, b, &inc)  # Uᵀ z = b
    dtrsv(b"U", b"N", b"N", &n, <double *> F, &n, b, &inc)  # U x = z


cdef double _line_search(const Space *sp, Work *w, const double *r, const double *dr, double ud,
                         double dd) noexcept nogil:
    """``argmin_{α ≥ 0} f(u + α d)`` exactly, as :func:`~poolings.rank.common.exact_line_search`."""
    cdef int T = sp.T, t, m = 0, i, cnt, k
    cdef double C = sp.C, eps = sp.eps, a0 = 0.0, b0 = 0.0, al, s, a, b, slope, g, g0
    cdef double s_k = 0.0, g_k = 0.0, c_k = 0.0, end_k, alpha
    cdef Event *ev = w.ev
    cdef int up
    for t in range(T):
        if not sp.mask[t]:
            continue
        if fabs(r[t]) > eps:
            s = _sgn(r[t])
            a0 += dr[t] * (r[t] - s * eps)
            b0 += dr[t] * dr[t]
        if dr[t] == 0:
            continue
        up = dr[t] > 0
        al = (eps - r[t]) / dr[t]  # crossing +ε: entering when Δr > 0
        if isfinite(al) and (al > 0 or (al == 0 and up)):
            ev[m].alpha = al
            ev[m].da = (1.0 if up else -1.0) * (dr[t] * (r[t] - eps))
            ev[m].db = (1.0 if up else -1.0) * (dr[t] * dr[t])
            m += 1
        al = (-eps - r[t]) / dr[t]  # crossing −ε: entering when Δr < 0
        if isfinite(al) and (al > 0 or (al == 0 and not up)):
            ev[m].alpha = al
            ev[m].da = (-1.0 if up else 1.0) * (dr[t] * (r[t] + eps))
            ev[m].db = (-1.0 if up else 1.0) * (dr[t] * dr[t])
            m += 1
    qsort(ev, m, sizeof(Event), _by_alpha)
    # pieces 0..m: piece 0 starts at 0 with (a0, b0); piece i + 1 at ev[i] with the sums after it
    a, b = a0, b0
    slope = dd + C * b
    g0 = ud + C * a
    cnt = 0
    k = 0
    if g0 <= 0:
        cnt = 1
        s_k, g_k, c_k = 0.0, g0, slope
    for i in range(m):
        a += ev[i].da
        b += ev[i].db
        slope = dd + C * b
        g = ud + C * a + ev[i].alpha * slope
        if g <= 0:
            cnt += 1
    k = cnt - 1 if cnt > 0 else 0
    # the values of piece k (recomputed: the sums up to it)
    a, b = a0, b0
    s_k = 0.0
    for i in range(k):
        a += ev[i].da
        b += ev[i].db
        s_k = ev[i].alpha
    c_k = dd + C * b
    g_k = ud + C * a + s_k * c_k
    end_k = ev[k].alpha if k < m else INFINITY
    alpha = s_k - g_k / (c_k if c_k > 0 else INFINITY)
    alpha = min(max(alpha, s_k), end_k)
    if g0 < 0 and isfinite(alpha):
        return alpha
    return 0.0


cdef double _piece_scale(Space *sp, const double *s, double u2) noexcept nogil:
    """``‖u‖ (1 + C Σ_A ‖v_t‖²) + C Σ_A |y_t − s_t ε| ‖v_t‖``: the scale of a reproduced set's
    test, as ``poolings.rank.active_set.piece_scale``."""
    cdef int t
    cdef double load = 1.0, rhs = 0.0, nt
    for t in range(sp.T):
        if s[t] != 0:
            nt = sp.norms[t]
            load += sp.C * nt * nt
            rhs += sp.C * fabs(sp.y[t] - sp.eps * s[t]) * nt
    return sqrt(max(u2, 0.0)) * load + rhs


cdef int _solve_one(Space *sp, Work *w, double tol, double check_tol, int max_iter, double step_floor,
                    double *x, double *r, double *cache, unsigned char *cache_set, unsigned char *out_done,
                    long long *out_iters, double *out_gnorm, unsigned char *out_factored,
                    double *beta, double *S2, double *e) noexcept nogil:
    """One sample's iteration (see the module docstring); 1 where a matrix was not positive
    definite (the caller then runs the general iteration), else 0."""
    cdef int T = sp.T, n = sp.n, it, t, j, differ, new1, new2, pick, hit, jump, moved, progress, step
    cdef int src2  # the factor of the second candidate: 0 cache, 1 the first's new one, 2 its own
    cdef double C = sp.C, eps = sp.eps, u2 = 0.0, f, g, rel, scale, F1, F2, Fm1, Fm2, Fk, ud, dd, a, u2a, fa
    cdef double nd, nx, acc
    cdef double U2[2]
    cdef int rep[2]
    cdef double one = 1.0, zero = 0.0
    cdef int i1 = 1
    cdef int stable = 0, done = 0, factored = 0, ending = 0
    cdef long long iters = 0
    cdef double *s1 = S2
    cdef double *s2 = S2 + T
    cdef double *F_1
    cdef double *F_2
    cdef double *Xk
    cdef double *Rk
    cdef double *Sk
    memset(x, 0, n * sizeof(double))
    memset(beta, 0, T * sizeof(double))
    memcpy(r, sp.y, T * sizeof(double))
    f = 0.5 * C * _loss(r, eps, T)
    g = 0.0
    for it in range(max_iter + 1):
        _signs(r, eps, s1, T)
        for t in range(T):
            e[t] = (r[t] - eps * s1[t]) if s1[t] != 0 else 0.0
            s2[t] = _sgn(beta[t]) if beta[t] != 0 else s1[t]
        differ = not _same(s1, s2, T)
        # the gradient's norm, and the right-hand sides of both candidate sets
        if sp.kind == 0:
            for t in range(T):
                w.gam[t] = x[t] - C * e[t]
            dgemv(b"N", &T, &T, &one, <double *> sp.K, &T, w.gam, &i1, &zero, w.Kg, &i1)
            acc = 0.0
            for t in range(T):
                acc += w.gam[t] * w.Kg[t]
            g = sqrt(max(acc, 0.0))
            _rhs_col(sp, s1, w.W + n)
            _rhs_col(sp, s2, w.W + 2 * n)
        else:
            for t in range(T):
                w.cols[t] = C * e[t]
            _rhs_col(sp, s1, w.cols + T)
            if differ:
                _rhs_col(sp, s2, w.cols + 2 * T)
            _combine(sp, w, w.cols, 3 if differ else 2, w.W)
            if not differ:
                memcpy(w.W + 2 * n, w.W + n, n * sizeof(double))
            acc = 0.0
            for j in range(n):
                acc += (x[j] - w.W[j]) * (x[j] - w.W[j])
            g = sqrt(acc)
        scale = sqrt(max(u2, 0.0))
        for t in range(T):
            scale += C * fabs(e[t]) * sp.norms[t]
        rel = g / max(scale, TINY)
        if ending:  # stopped last iteration: the gradient is measured at the final point
            break
        if rel <= tol or (stable and g <= check_tol * _piece_scale(sp, s1, u2)):
            done = 1
            break
        if it == max_iter:
            break

        # a factor for each candidate: the cache where its support is the cached set, the first's
        # where both share a support, else a new one
        new1 = not (factored and _is_set(s1, cache_set, T))
        F_1 = w.H if new1 else cache
        new2 = 0
        src2 = 0
        F_2 = F_1
        if differ:
            if _same_support(s1, s2, T):
                src2 = 1
            elif not (factored and _is_set(s2, cache_set, T)):
                src2 = 2
                new2 = 1
                F_2 = w.H + n * n
            else:
                F_2 = cache
        if new1:
            _matrix(sp, w, s1, w.H, w.Hm)
            if _factorise(w.H, n) != 0:
                return 1
        if new2:
            _matrix(sp, w, s2, w.H + n * n, w.Hm + n * n)
            if _factorise(w.H + n * n, n) != 0:
                return 1
        memcpy(w.X, w.W + n, n * sizeof(double))
        _chol_solve(F_1, w.X, n)
        if differ:
            memcpy(w.X + n, w.W + 2 * n, n * sizeof(double))
            _chol_solve(F_2, w.X + n, n)
        _residuals(sp, w, w.X, 2 if differ else 1, w.R, U2)
        iters += 1
        _signs(w.R, eps, w.ra, T)
        rep[0] = _same(w.ra, s1, T)
        F1 = 0.5 * U2[0] + 0.5 * C * _loss(w.R, eps, T)
        Fm1 = -INFINITY if rep[0] else F1
        pick = 0
        if differ:
            _signs(w.R + T, eps, w.ra, T)
            rep[1] = _same(w.ra, s2, T)
            F2 = 0.5 * U2[1] + 0.5 * C * _loss(w.R + T, eps, T)
            Fm2 = -INFINITY if rep[1] else F2
            if Fm2 < Fm1:
                pick = 1
        Fk = F2 if pick else F1
        hit = rep[pick]
        jump = hit or Fk < f
        moved = 0
        progress = 0
        if jump:
            Sk, Rk, Xk = S2 + pick * T, w.R + pick * T, w.X + pick * n
            for t in range(T):
                beta[t] = C * (Rk[t] - Sk[t] * eps) if Sk[t] != 0 else 0.0
            memcpy(x, Xk, n * sizeof(double))
            memcpy(r, Rk, T * sizeof(double))
            u2, f = U2[pick], Fk
            # the picked candidate's factor, where it is new: the first's, or the second's own
            if pick == 0 or src2 == 1:
                if new1:
                    _keep(sp, cache, cache_set, w.H, w.Hm, Sk, T, n)
            elif new2:
                _keep(sp, cache, cache_set, w.H + n * n, w.Hm + n * n, Sk, T, n)
            moved = progress = 1
        else:  # the Newton direction with an exact line search (r is affine in x)
            for j in range(n):
                w.d[j] = w.X[j] - x[j]
            for t in range(T):
                w.dr[t] = w.R[t] - r[t]
            ud, dd = 0.0, 0.0
            if sp.kind == 0:
                for t in range(T):
                    ud -= x[t] * w.dr[t]
                    dd -= w.d[t] * w.dr[t]
            else:
                for j in range(n):
                    ud += x[j] * w.d[j]
                    dd += w.d[j] * w.d[j]
            a = _line_search(sp, w, r, w.dr, ud, dd)
            for t in range(T):
                w.ra[t] = r[t] + a * w.dr[t]
            u2a = u2 + 2 * a * ud + a * a * dd
            fa = 0.5 * u2a + 0.5 * C * _loss(w.ra, eps, T)
            step = a > 0 and fa <= f
            nd, nx = 0.0, 0.0
            for j in range(n):
                nd += w.d[j] * w.d[j]
                nx += x[j] * x[j]
            progress = step and a * sqrt(nd) > step_floor * sqrt(nx)
            if step:
                for j in range(n):
                    x[j] = x[j] + a * w.d[j]
                memcpy(r, w.ra, T * sizeof(double))
                for t in range(T):
                    beta[t] += a * ((C * (w.R[t] - s1[t] * eps) if s1[t] != 0 else 0.0) - beta[t])
                u2, f = u2a, fa
                if new1:
                    _keep(sp, cache, cache_set, w.H, w.Hm, s1, T, n)
                moved = 1
        if moved:
            factored = 1
        stable = jump and hit
        if not progress:  # no descent left at working precision
            if rel <= check_tol:
                done = 1
            ending = 1
    out_done[0], out_iters[0], out_gnorm[0], out_factored[0] = done, iters, g, factored
    return 0


cdef inline void _keep(Space *sp, double *cache, unsigned char *cache_set, const double *H, const double *Hm,
                       const double *S, int T, int n) noexcept nogil:
    """The sample moves to the support of ``S``: its factor (and, in p-space, ``M``) are kept."""
    cdef int t
    memcpy(cache, H, n * n * sizeof(double))
    for t in range(T):
        cache_set[t] = S[t] != 0
    if sp.kind != 0:
        memcpy(sp.M, Hm, n * n * sizeof(double))
        for t in range(T):
            sp.M_set[t] = S[t] != 0


def fits(Py_ssize_t T, Py_ssize_t n, bint tspace):
    """Whether one sample's workspace (``T`` steps, ``n × n`` systems) can be indexed in C ``int``:
    with room to spare, ``16 (T·m + T + n²) + 1024 n`` below ``2³¹`` (``m`` = ``T`` in T-space,
    ``p`` in p-space)."""
    cdef Py_ssize_t m = T if tspace else n
    return 16 * (T * m + T + n * n) + 1024 * n < 2**31 - 1


def solve(object K, object V, double[:, :, ::1] M, unsigned char[:, ::1] M_set, const double[:, ::1] y,
          const double[:, ::1] norms, const unsigned char[:, ::1] mask, double C, double eps, double tol,
          double check_tol, int max_iter, double step_floor, double[:, :, ::1] cache,
          unsigned char[:, ::1] cache_set):
    """The iteration on every sample: T-space with ``K (B, T, T)`` float64 (``V``, ``M``, ``M_set``
    unused), or p-space with ``V (B, T, p)`` float32 or float64 (``K`` ``None``) and ``M (B, p, p)``,
    ``M_set (B, T)`` updated in place, as are the factor cache and its sets.

    Returns ``(x, r, done, iters, gnorm, factored)`` as arrays, or ``None`` where a candidate
    matrix was not positive definite."""
    cdef const double[:, :, ::1] Kv
    cdef const float[:, :, ::1] Vf
    cdef const double[:, :, ::1] Vd
    cdef Space sp
    cdef Work w
    cdef Py_ssize_t n_ = K.shape[2] if K is not None else V.shape[2]
    if not fits(y.shape[1], n_, K is not None):
        raise ValueError(f"rank pooling's compiled iteration indexes in C int: T = {y.shape[1]}, n = {n_} is too "
                         "large (small_solve sends such samples to the NumPy iteration)")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    cdef int B = y.shape[0], T = y.shape[1], n, p, b, failed = 0
    if K is not None:
        Kv = K
        sp.kind, n, p = 0, T, 0
    elif V.dtype == np.float32:
        Vf = V
        sp.kind, n = 1, V.shape[2]
        p = n
    else:
        Vd = V
        sp.kind, n = 2, V.shape[2]
        p = n
    sp.T, sp.n, sp.C, sp.eps = T, n, C, eps
    x = np.zeros((B, n))
    r = np.zeros((B, T))
    done = np.zeros(B, dtype=np.uint8)
    iters = np.zeros(B, dtype=np.longlong)
    gnorm = np.zeros(B)
    factored = np.zeros(B, dtype=np.uint8)
    cdef double[:, ::1] xv = x, rv = r
    cdef unsigned char[::1] dv = done, fv = factored
    cdef long long[::1] iv = iters
    cdef double[::1] gv = gnorm
    cdef double *dbuf
    cdef float *fbuf
    cdef size_t nd = (3 * T + 3 * n + 2 * n + 2 * T + 4 * n * n + n + 4 * T + 4 * T  # cols..Kg, beta, S2, e
                      + (LONG * p + 2 * T * p + p * p if sp.kind == 2 or (sp.kind == 1 and T >= LONG) else 0))
    cdef size_t nf = (3 * T + 3 * n + 2 * n + 2 * T + 2 * T * p + p * p) if sp.kind == 1 else 1
    dbuf = <double *> malloc(nd * sizeof(double))
    fbuf = <float *> malloc(nf * sizeof(float))
    w.ev = <Event *> malloc((2 * T + 1) * sizeof(Event))
    if dbuf == NULL or fbuf == NULL or w.ev == NULL:
        free(dbuf)
        free(fbuf)
        free(w.ev)
        raise MemoryError("rank pooling: no memory for the small-problem workspace")
    cdef double *q = dbuf
    w.cols = q; q += 3 * T
    w.W = q; q += 3 * n
    w.X = q; q += 2 * n
    w.R = q; q += 2 * T
    w.H = q; q += 2 * n * n
    w.Hm = q; q += 2 * n * n
    w.d = q; q += n
    w.dr = q; q += T
    w.ra = q; q += T
    w.gam = q; q += T
    w.Kg = q; q += T
    cdef double *beta = q
    q += T
    cdef double *S2 = q
    q += 2 * T
    if sp.kind == 2 or (sp.kind == 1 and T >= LONG):
        w.chunk = q; q += LONG * p
        w.Vd = q; q += T * p
        w.Vdw = q; q += T * p
        w.P = q; q += p * p
    cdef double *e = q
    q += T
    cdef float *g = fbuf
    if sp.kind == 1:
        w.f_cols = g; g += 3 * T
        w.f_W = g; g += 3 * n
        w.f_X = g; g += 2 * n
        w.f_R = g; g += 2 * T
        w.f_Vd = g; g += T * p
        w.f_Vdw = g; g += T * p
        w.f_P = g; g += p * p
    try:
        with nogil:
            for b in range(B):
                if sp.kind == 0:
                    sp.K = &Kv[b, 0, 0]
                elif sp.kind == 1:
                    sp.Vf = &Vf[b, 0, 0]
                else:
                    sp.Vd = &Vd[b, 0, 0]
                if sp.kind != 0:
                    sp.M, sp.M_set = &M[b, 0, 0], &M_set[b, 0]
                sp.y, sp.norms, sp.mask = &y[b, 0], &norms[b, 0], &mask[b, 0]
                if _solve_one(&sp, &w, tol, check_tol, max_iter, step_floor, &xv[b, 0], &rv[b, 0],
                              &cache[b, 0, 0], &cache_set[b, 0], &dv[b], &iv[b], &gv[b], &fv[b],
                              beta, S2, e):
                    failed = 1
                    break
    finally:
        free(dbuf)
        free(fbuf)
        free(w.ev)
    if failed:
        return None
    return x, r, done.astype(bool), iters.astype(np.int64), gnorm, factored.astype(bool)


def combine(const double[:, :, ::1] cols, const float[:, :, ::1] V, double[:, :, ::1] out):
    """``out (B, k, p) = cols (B, k, T) @ V (B, T, p)`` for float32 ``V``, accumulated in float64:
    :func:`poolings.rank.pspace.combine_long` in one pass over ``V`` (no float64 copy of it).
    Columns are skipped where ``cols`` is zero (steps inside the tube, or off a candidate set)."""
    cdef Py_ssize_t B = V.shape[0], T = V.shape[1], p = V.shape[2], k = cols.shape[1]
    cdef Py_ssize_t b, t, j, i
    cdef double c
    cdef const float *row
    cdef double *o
    if cols.shape[0] != B or cols.shape[2] != T or out.shape[0] != B or out.shape[1] != k or out.shape[2] != p:
        raise ValueError("combine: shapes do not match")
    with nogil:
        for b in range(B):
            for j in range(k):
                o = &out[b, j, 0]
                for i in range(p):
                    o[i] = 0.0
            for t in range(T):
                row = &V[b, t, 0]
                for j in range(k):
                    c = cols[b, j, t]
                    if c != 0.0:
                        o = &out[b, j, 0]
                        for i in range(p):
                            o[i] += c * <double> row[i]
