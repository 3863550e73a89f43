r"""Matrix-free method: Newton-CG in p-space, for large ``T`` and ``p`` alike.

Nothing of size ``T × T`` or ``p × p`` is formed. Each Newton step solves

    H_A d = −∇_u f(u),     H_A = I + C V_Aᵀ V_A   (A: the semismooth Newton set at u)

by conjugate gradient on Hessian–vector products ``H_A z = z + C V_Aᵀ (1_A ⊙ V z)`` (two passes
over ``V``), and moves to ``u + α d`` with the exact line search. Passes over ``V`` are the unit
of cost, so the CG iterations are kept few:

- **warm start**: each step starts from the current point, so CG solves only for the step,
  to a relative residual ``η = min(0.1, ρ)`` (``ρ``: the current relative gradient), never
  tighter than the stopping tolerance needs (``η ρ ≥ tol / 10``). Early steps, whose sets are
  still changing, get a loose solve; the last ones a tight one;
- **a randomized Nyström preconditioner** (Frangella, Tropp & Udell 2023), built once per call
  from a rank-``k`` sketch of ``C VᵀV`` over all valid steps (two GEMMs of width ``k``, ``k = 64``
  by default): with the sketch ``C VᵀV ≈ U Λ Uᵀ``,

      P⁻¹ = (λ_k + 1) U (Λ + I)⁻¹ Uᵀ + (I − U Uᵀ)

  maps the ``k`` largest eigenvalues of ``H`` near ``λ_k + 1``. Frames of a video drift
  smoothly, so the spectrum of ``VᵀV`` decays fast and a few dozen directions carry most of
  it: on unit-norm random-walk features (T = 2000, p = 1024) the five Newton steps took 71 CG
  iterations without it and 18 with it. CG runs on the split form ``S H S``, ``S = P^{-1/2}``
  (same iterates as preconditioned CG), with :func:`argminlayers.linalg.batched_cg`.

Each Newton step is inexact, so a sample stops only on its relative gradient
(``‖∇_u f‖ ≤ tol · scale``, measured by a pass over ``V`` at every point) — never on a
reproduced set. Per step: one pass for the gradient, ``2 × (CG iterations)`` for the solve,
one for the residuals of the full step and, where the line search moves elsewhere on the line,
one more for the residuals there (measured, not extrapolated: near the optimum of float32
data the extrapolation is noise). Memory: a few ``(B, p)`` and ``(B, T)`` vectors and the ``(B, p, k)``
sketch.

**Backward.** No factor exists, so the exact backward solves ``H w = g`` by the same
preconditioned CG (``backward="auto"``); see :class:`~poolings.rank.objective.RankPoolBackward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from argminlayers.linalg import batched_cg

from .active_set import Space
from .common import excess, frames_combine, frames_dot, rank_targets

WD = torch.float64
SKETCH_RANK = 64
SKETCH_SEED = 0


@dataclass
class NystromPreconditioner:
    """``S = P^{-1/2} = I + U diag(s − 1) Uᵀ`` (``U: (B, p, k)`` orthonormal columns, ``s: (B, k)``
    in ``(0, 1]``): the square root of the inverse Nyström preconditioner of ``I + C VᵀV``."""

    U: Tensor
    s: Tensor

    def apply(self, x: Tensor) -> Tensor:
        """``S x`` for ``x: (B, p)``; two ``p × k`` products."""
        Utx = torch.bmm(x.unsqueeze(1), self.U).squeeze(1)  # (B, k)
        return x + torch.bmm(((self.s - 1) * Utx).unsqueeze(1), self.U.transpose(1, 2)).squeeze(1)

    @classmethod
    def sketch(cls, V: Tensor, mask: Tensor, C: float, rank: int = SKETCH_RANK) -> "NystromPreconditioner":
        """From a rank-``k`` Nyström sketch ``Y = C Vᵀ(D V Ω)`` of ``C VᵀV`` (valid steps ``D``);
        ``k = min(rank, p, T)``, ``Ω`` a fixed orthonormal ``p × k`` test matrix (one seed, so every
        call is deterministic; kept across calls). With ``Y_ν = Y + νΩ`` (a shift at the rounding
        level), ``Ωᵀ Y_ν = L Lᵀ`` and ``F = Y_ν L⁻ᵀ``, the sketch is ``F Fᵀ − ν I``; its
        eigenpairs come from the ``k × k`` eigenproblem of ``FᵀF = W Σ² Wᵀ``: ``U = F W Σ⁻¹``,
        ``λ = Σ² − ν`` (no ``p × k`` SVD)."""
        B, T, p = V.shape
        k = max(1, min(rank, p, T))
        Omega = _test_matrix(p, k, V.device)  # (p, k) float64
        Z = torch.matmul(V, Omega.to(V.dtype)) * mask.unsqueeze(-1)  # (B, T, k)
        Y = C * torch.bmm(V.transpose(1, 2), Z).to(WD)  # (B, p, k) ≈ C VᵀV Ω
        nu = (p**0.5) * torch.finfo(V.dtype).eps * torch.linalg.matrix_norm(Y)  # (B,) stabilising shift
        Y = Y + nu.view(B, 1, 1) * Omega
        L, info = torch.linalg.cholesky_ex(Omega.T @ Y)  # (B, k, k)
        F = torch.linalg.solve_triangular(L, Y.transpose(1, 2), upper=False).transpose(1, 2)  # Y L⁻ᵀ
        G = F.transpose(1, 2) @ F
        # a sample with a non-finite sketch (NaN frames in a direct call) gets no preconditioning
        # below; zeroing its Gram matrix keeps eigh from raising for the whole batch
        sig2, W = torch.linalg.eigh(torch.where(torch.isfinite(G), G, torch.zeros((), dtype=G.dtype)))  # ascending
        sig2, W = sig2.flip(-1), W.flip(-1)
        keep = sig2 > sig2[:, :1] * torch.finfo(WD).eps * k  # directions the sketch resolves
        U = (F @ W) * torch.where(keep, sig2.clamp_min(torch.finfo(WD).tiny).rsqrt(), torch.zeros_like(sig2)).unsqueeze(1)
        lam = (sig2 - nu.unsqueeze(-1)).clamp_min(0) * keep  # (B, k), descending
        lam_k = torch.where(keep, lam, torch.full_like(lam, float("inf"))).amin(-1, keepdim=True)
        s = torch.where(keep, ((lam_k + 1) / (lam + 1)).sqrt(), torch.ones_like(lam))
        ok = (info == 0).unsqueeze(-1) & torch.isfinite(s).all(-1, keepdim=True) & torch.isfinite(U).all(1)
        # a failed sketch (an all-zero video: Y = 0, so Ωᵀ Y has no factor, and F, U are NaN) gives no
        # preconditioning: U = 0 as well as s = 1, or S x = x + 0 · NaN would be NaN
        U = torch.where(ok.unsqueeze(1), U, torch.zeros((), dtype=U.dtype, device=U.device))
        return cls(U, torch.where(ok, s, torch.ones_like(s)))


_TEST_MATRICES: dict[tuple, Tensor] = {}


def _test_matrix(p: int, k: int, device: torch.device) -> Tensor:
    """The orthonormal Gaussian test matrix ``Ω (p, k)`` of the sketch, made once per size and device."""
    key = (p, k, str(device))
    if key not in _TEST_MATRICES:
        gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED)
        _TEST_MATRICES[key] = torch.linalg.qr(torch.randn(p, k, generator=gen, dtype=WD)).Q.to(device)
    return _TEST_MATRICES[key]


class NewtonCGSpace(Space):
    """Newton-CG as a :class:`~poolings.rank.active_set.Space` (variable ``u``, inexact solves)."""

    exact = False
    candidates = 1

    def __init__(self, V: Tensor, mask: Tensor, C: float, eps: float, *, tol: float,
                 max_cg: int = 200, rank: int = SKETCH_RANK):
        self.V, self.C, self.eps, self.tol, self.max_cg = V, C, eps, tol, max_cg
        self.mask = mask
        self.y = rank_targets(mask, WD)
        self.norms = torch.linalg.vector_norm(V, dim=-1).to(WD)  # ‖v_t‖
        self.precond = NystromPreconditioner.sketch(V, mask, C, rank)
        self.cg_iterations = torch.zeros(V.shape[0], dtype=torch.long, device=V.device)
        self._g = self._rel = None

    def zeros(self) -> Tensor:
        return torch.zeros(self.V.shape[0], self.V.shape[2], dtype=WD, device=self.V.device)

    def hvp(self, active: Tensor, z: Tensor) -> Tensor:
        """``H_A z = z + C V_Aᵀ (V_A z)``, ``(B, p)``: two passes over ``V``."""
        Vz = frames_dot(self.V, z.to(self.V.dtype)) * active
        return z + self.C * frames_combine(self.V, Vz).to(WD)

    def gradient(self, x, u2, r, sign, S):
        e = excess(r, sign, self.eps)
        g = x - self.C * frames_combine(self.V, e.to(self.V.dtype)).to(WD)  # one pass
        gn = torch.linalg.vector_norm(g, dim=-1)
        scale = u2.clamp_min(0).sqrt() + self.C * (e.abs() * self.norms).sum(-1)
        self._g, self._rel = g, gn / scale.clamp_min(torch.finfo(WD).tiny)
        return gn, scale

    def solve(self, x, S, live):
        active = (S[:, 0] != 0).to(self.V.dtype)
        S = self.precond.apply
        eta = torch.minimum(self._rel.clamp(max=0.1), torch.ones_like(self._rel))
        eta = torch.maximum(eta, 0.1 * self.tol / self._rel.clamp_min(torch.finfo(WD).tiny)).clamp(max=0.5)
        b = S(-self._g) * live.unsqueeze(-1)
        res = batched_cg(lambda z: S(self.hvp(active, S(z))), b, tol=eta, max_iter=self.max_cg)
        self.cg_iterations += res.iterations
        X = (x + S(res.x)).unsqueeze(1)  # (B, 1, p)
        good = live.unsqueeze(-1) & torch.isfinite(X).all(-1)
        return X, self.residuals(X[:, 0]).unsqueeze(1), X.square().sum(-1), good

    def residuals(self, x: Tensor) -> Tensor:
        return self.y - frames_dot(self.V, x.to(self.V.dtype)).to(WD)  # one pass

    def line_terms(self, x, d, r, dr):
        return (x * d).sum(-1), d.square().sum(-1)
