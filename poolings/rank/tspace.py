r"""T-space direct method: Cholesky of the ``T × T`` capacitance matrix.

``u`` lies in the span of the frames, ``u = Vᵀβ``. With the Gram matrix ``K = V Vᵀ`` (one
batched GEMM, the only ``O(T² p)`` step) and ``D = diag(1_A)`` on valid steps, the minimiser
of the piece of a signed set ``(A, s)`` solves, in capacitance form,

    (I + C D K D) β = C D (y − s ε),        r = y − K β   (no pass over V)

``I + C D K D`` has identity rows and columns at inactive and padded steps and eigenvalues
``≥ 1``. Norms need no pass over ``V`` either: ``‖u‖² = βᵀKβ = βᵀ(y − r)`` and, with
``∇_u f = Vᵀγ``, ``γ = β − C e``, ``‖∇_u f‖² = γᵀKγ``. ``u = Vᵀβ`` is the second and last
pass over ``V``.

Cost: one Gram GEMM ``B T² p``; per iteration a batched ``T × T`` Cholesky (``T³/3``) for the
samples whose set changed, and ``O(T²)`` products with ``K``. The ``T × T`` work runs in float64
whatever the dtype of ``V``, so the factorisation never breaks down in float32 and the active
set is not decided by float32 rounding. Memory: ``K`` and the factor cache, ``(B, T, T)``
float64 each, plus the new factors of one iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import excess, rank_targets
from .factored import FactoredSpace, gram

WD = torch.float64


class TSpace(FactoredSpace):
    """The T-space method as a :class:`~poolings.rank.active_set.Space` (variable ``β``)."""

    def __init__(self, V: Tensor, mask: Tensor, C: float, eps: float):
        B, T, _ = V.shape
        self.C, self.eps = C, eps
        self.mask = mask
        self.y = rank_targets(mask, WD)
        self.K = gram(V, outer=True).to(WD)  # (B, T, T): the only GEMM over V
        self.norms = self.K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # ‖v_t‖
        self._init_cache(B, T, WD, V.device)

    def zeros(self) -> Tensor:
        return torch.zeros_like(self.y)

    def gradient(self, x, u2, r, sign, S):
        e = excess(r, sign, self.eps)
        gamma = x - self.C * e
        g2 = (gamma * torch.bmm(gamma.unsqueeze(1), self.K).squeeze(1)).sum(-1)
        scale = u2.clamp_min(0).sqrt() + self.C * (e.abs() * self.norms).sum(-1)
        return g2.clamp_min(0).sqrt(), scale

    def _matrices(self, rows: Tensor, act: Tensor, out: Tensor) -> Tensor:
        """``I + C D K D`` for the given rows, ``(m, T, T)``: identity rows/columns off ``A``."""
        M = torch.index_select(self.K, 0, rows, out=out)
        a = act.to(WD)
        M.mul_(a.unsqueeze(-1)).mul_((self.C * a).unsqueeze(-2))
        M.diagonal(dim1=-2, dim2=-1).add_(1)
        return M

    def _rhs(self, S, A):
        return A * (self.C * (self.y.unsqueeze(1) - S * self.eps))  # C D (y − s ε); A is bool: scaled after

    def _residuals(self, X):
        R = self.y.unsqueeze(1) - torch.bmm(X, self.K)  # K symmetric: (Kβ)ᵀ = βᵀK
        return R, (X * (self.y.unsqueeze(1) - R)).sum(-1)

    def line_terms(self, x, d, r, dr):
        return -(x * dr).sum(-1), -(d * dr).sum(-1)  # K d = −Δr
