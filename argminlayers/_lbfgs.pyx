# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
r"""L-BFGS's per-iteration work on CPU tensors, compiled: the two-loop recursion and the
storing of a pair (:class:`argminlayers.solvers.LBFGS`), one sample at a time.

The batched torch form of the same steps is about 7 small tensor operations a stored pair
and direction, each a few microseconds of dispatch on CPU: 150–240 µs a direction at
``m = 10`` pairs for ``(B, q)`` up to ``(256, 16)``, against the microseconds of arithmetic
they do. Here each direction and each update is one call.

The pairs are a ring of ``m`` slots, ``S, Y: (m, B, q)`` and ``rho: (m, B)``, ``count`` of
them stored, the oldest at ``head``; a sample that stored nothing at a step has a zero pair
(``rho = 0``) in that slot, which the recursion passes over. Dot products accumulate in
float64 for both dtypes. Every array is C-contiguous.
"""

from libc.math cimport sqrt

ctypedef fused real:
    float
    double


def direction(real[:, :, ::1] S, real[:, :, ::1] Y, real[:, ::1] rho, int head, int count,
              real[::1] gamma, unsigned char[::1] first, real[:, ::1] g, real[::1] gnorm,
              real[:, ::1] out, double[::1] alphas):
    """``out = −H g``, ``H`` the L-BFGS inverse Hessian of each sample's stored pairs scaled by
    ``gamma``; ``−g / max(1, ‖g‖)`` where ``first`` (no pair yet). ``alphas``: ``m`` scratch."""
    cdef Py_ssize_t B = g.shape[0], q = g.shape[1], m = S.shape[0]
    cdef Py_ssize_t b, i, j, k
    cdef double a, dot, scale, gm
    with nogil:
        for b in range(B):
            if first[b]:
                gm = gnorm[b]
                scale = 1.0 / (gm if gm > 1.0 else 1.0)
                for k in range(q):
                    out[b, k] = -g[b, k] * scale
                continue
            for k in range(q):
                out[b, k] = g[b, k]
            for i in range(count - 1, -1, -1):  # newest first
                j = (head + i) % m
                if rho[j, b] == 0:
                    alphas[i] = 0
                    continue
                dot = 0
                for k in range(q):
                    dot = dot + S[j, b, k] * out[b, k]
                a = rho[j, b] * dot
                alphas[i] = a
                for k in range(q):
                    out[b, k] = out[b, k] - a * Y[j, b, k]
            for k in range(q):
                out[b, k] = gamma[b] * out[b, k]
            for i in range(count):  # oldest first
                j = (head + i) % m
                if rho[j, b] == 0:
                    continue
                dot = 0
                for k in range(q):
                    dot = dot + Y[j, b, k] * out[b, k]
                a = alphas[i] - rho[j, b] * dot
                for k in range(q):
                    out[b, k] = out[b, k] + a * S[j, b, k]
            for k in range(q):
                out[b, k] = -out[b, k]


def store(real[:, :, ::1] S, real[:, :, ::1] Y, real[:, ::1] rho, int slot,
          real[:, ::1] s, real[:, ::1] y, unsigned char[::1] stepped,
          real[::1] gamma, unsigned char[::1] first, double eps):
    """Store ``(s, y)`` in ``slot`` where ``stepped`` and ``sᵀy > eps ‖s‖ ‖y‖`` (a NaN fails),
    a zero pair elsewhere; there ``gamma = sᵀy / yᵀy`` and ``first`` clears. Returns whether
    some sample still has ``first`` set."""
    cdef Py_ssize_t B = s.shape[0], q = s.shape[1]
    cdef Py_ssize_t b, k
    cdef double sy, yy, ss
    cdef bint good, any_first = False
    with nogil:
        for b in range(B):
            sy = 0
            yy = 0
            ss = 0
            for k in range(q):
                sy = sy + s[b, k] * y[b, k]
                yy = yy + y[b, k] * y[b, k]
                ss = ss + s[b, k] * s[b, k]
            good = stepped[b] and sy > eps * sqrt(ss) * sqrt(yy)
            if good:
                for k in range(q):
                    S[slot, b, k] = s[b, k]
                    Y[slot, b, k] = y[b, k]
                rho[slot, b] = <real> (1.0 / sy)
                gamma[b] = <real> (sy / yy)
                first[b] = 0
            else:
                for k in range(q):
                    S[slot, b, k] = 0
                    Y[slot, b, k] = 0
                rho[slot, b] = 0
            if first[b]:
                any_first = True
    return any_first
