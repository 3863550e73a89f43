r"""p-space direct method: semismooth Newton on ``u`` with the ``p × p`` Hessian factorised.

The minimiser of the piece of a signed set ``(A, s)`` solves

    H_A u = b_{A,s},     H_A = I + M_A,   M_A = C V_Aᵀ V_A,   b_{A,s} = C V_Aᵀ (y − s ε)_A

``M`` of each sample is kept and **updated** when its set changes: steps entering ``A`` add
``C v_t v_tᵀ``, steps leaving subtract it, one batched product ``C V_Δᵀ diag(±1) V_Δ`` over the
``k`` changed steps (``k p²`` instead of ``|A| p²``). It starts from ``C VᵀV`` over all
steps (the only Gram-sized GEMM), so the first set, which is nearly all valid steps, costs a
small update too. Like that GEMM, the update's product ``V_Δᵀ diag(±1) V_Δ`` runs in the dtype
of ``V`` and is scaled by ``C`` in float64; ``M`` accumulates these products, and ``H_A`` is
factorised, in float64 whatever the dtype of ``V``. In float32, ``M`` thus gathers float32
rounding from each update; the stopping rule does not rely on it (it measures the gradient by
passes over ``V``).

Per iteration: one pass ``Vᵀ[C e, c₁, c₂]`` for the gradient at the current point and the
right-hand sides of both candidate sets (accumulated in float64 for long videos,
:func:`combine_long`: in float32 it set the accuracy of ``u`` there), one pass ``V [u₁, u₂]``
for their residuals (in the dtype of ``V``), a
Cholesky (``p³/3``) for each sample whose set changed and the ``k p²`` update.

**Backward.** The factor of the last set is ``H⁻¹``'s, so the exact backward is one triangular
solve pair, ``w = H⁻¹ g``. It is handed to the layer's Woodbury strategy as the structure

    H = I + Σ_{i=1}^{p} e_i m_iᵀ     (A = I, B = M: the capacitance matrix I + B Aᵀ is H itself)

whose capacitance factor is the forward's factor, so ``woodbury`` computes
``w = g − (I + M)⁻¹ M g = H⁻¹ g`` with one ``p × p`` product and the triangular solves.
Memory: ``M`` and the factor cache, ``(B, p, p)`` float64 each, plus the new factors of one
iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import excess, rank_targets
from .factored import FactoredSpace, _numpy_ok, gram

WD = torch.float64
_BATCHED_UPDATE_BYTES = 64 * 2**20  # above this, M is updated sample by sample, in place


def changed_rows(V: Tensor, rows: Tensor, new: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
    """The steps whose membership changes from set ``old`` to ``new`` (``(m, T)`` bool, samples
    ``rows``), gathered: ``V_Δ (m, k, p)`` in the dtype of ``V`` and signs ``(m, k)``: ``+1``
    entering, ``−1`` leaving, 0 in the padding of samples with fewer than ``k`` changes."""
    ch = new != old
    k = int(ch.sum(-1).max()) if ch.numel() else 0
    w = new.to(V.dtype) - old.to(V.dtype)  # ±1 where changed, 0 elsewhere
    if k == 0:
        return V.new_zeros(rows.numel(), 0, V.shape[-1]), w[:, :0]
    idx = torch.sort(ch.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :k]  # (m, k)
    return V[rows.unsqueeze(-1), idx], w.gather(1, idx)  # (m, k, p), (m, k)


def add_changes_(M: Tensor, Vd: Tensor, w: Tensor, C: float, work: Tensor | None = None) -> Tensor:
    """``M += C V_Δᵀ diag(w) V_Δ`` in place, ``(m, p, p)``. The product runs in the dtype of
    ``V_Δ``, as the Gram product ``M`` starts from (with ``w = ±1`` it rounds exactly as that
    product does), and is added in float64, scaled by ``C`` there; ``work``: a buffer of at
    least ``(m, p, p)`` in the dtype of ``V_Δ`` for it (else one is allocated)."""
    if Vd.shape[1]:
        A = (Vd * w.unsqueeze(-1)).transpose(1, 2)
        if Vd.dtype == M.dtype:
            M.baddbmm_(A, Vd, alpha=C)
        else:
            m, p = M.shape[0], M.shape[-1]
            out = None if work is None else work.view(-1)[: m * p * p].view(m, p, p)
            M.add_(torch.bmm(A, Vd, out=out), alpha=C)
    return M


LONG = 512  # from this many steps combine_long accumulates in float64, casting this many at a time


def combine_long(cols: Tensor, V: Tensor) -> Tensor:
    """``cols @ V`` (``cols (B, k, T)`` float64, ``V (B, T, p)``) → ``(B, k, p)`` float64, accumulated
    in float64 for ``T ≥`` :data:`LONG` (``V`` read :data:`LONG` steps at a time, each chunk cast to
    float64), else a product in the dtype of ``V``.

    These products (the gradient ``u − C Vᵀe`` and the right-hand sides ``C V_Aᵀ(y − sε)``) sum
    ``T`` terms whose targets grow to ``T``; accumulated in float32 they set the accuracy of ``u``:
    measured on float32 random-walk features, relative errors against the float64 minimiser of
    3.2e-3 at 4 × 8000 × 512 and 1.1e-3 at 4 × 4000 × 512, 3.1e-5 with this pass in float64 (a
    float64 Gram product or float64 residual passes changed nothing; the solves also took 2
    iterations instead of 4). Short videos keep the float32 product: 2.9e-5 at 16 × 300 × 64,
    where the float64 one cost about a quarter of the solve."""
    if V.dtype == WD:
        return torch.bmm(cols, V)
    B, T, p = V.shape
    if T < LONG:
        return torch.bmm(cols.to(V.dtype), V).to(WD)
    kernel = _compiled_combine(V)
    if kernel is not None:  # one pass over V, no float64 chunks (measured 4.5 against 7.7 ms at 4 × 4000 × 512)
        out = cols.new_empty(B, cols.shape[1], p)
        kernel(cols.detach().contiguous().numpy(), V.detach().numpy(), out.numpy())
        return out
    out = cols.new_zeros(B, cols.shape[1], p)
    for t in range(0, T, LONG):
        out.baddbmm_(cols[:, :, t : t + LONG], V[:, t : t + LONG].to(WD))
    return out


def _compiled_combine(V: Tensor):
    """The compiled ``combine`` of :mod:`poolings.rank._small_kernel` for a contiguous float32 CPU
    ``V``, or ``None`` (another ``V``, or no compiled kernel: see :func:`poolings.rank.small._kernel`)."""
    if V.dtype != torch.float32 or not V.is_contiguous() or not _numpy_ok(V):
        return None
    from . import small

    mod = small._kernel() if small.COMPILED else None
    return None if mod is None else mod.combine


class PSpace(FactoredSpace):
    """The p-space method as a :class:`~poolings.rank.active_set.Space` (variable ``u``)."""

    def __init__(self, V: Tensor, mask: Tensor, C: float, eps: float):
        B, T, p = V.shape
        self.V, self.C, self.eps = V, C, eps
        self.mask = mask
        self.y = rank_targets(mask, WD)
        self.M = gram(V, outer=False).to(WD).mul_(C)  # (B, p, p): C VᵀV over all T steps
        self.M_set = torch.ones_like(mask)  # the set M belongs to (padded steps leave at the first update)
        self.norms = torch.linalg.vector_norm(V, dim=-1).to(WD)  # ‖v_t‖
        self._init_cache(B, p, WD, V.device)
        self._rhs_cache: Tensor | None = None
        self._deltas: tuple[Tensor, Tensor] | None = None

    def zeros(self) -> Tensor:
        return torch.zeros(self.y.shape[0], self.n, dtype=WD, device=self.y.device)

    def gradient(self, x, u2, r, sign, S):
        e = excess(r, sign, self.eps)
        cols = (self.C * e).unsqueeze(1)
        if S is not None:  # and C V_Aᵀ(y − s ε) of the candidate sets, in the same pass
            cols = torch.cat((cols, (S != 0) * (self.C * (self.y.unsqueeze(1) - S * self.eps))), dim=1)
        W = combine_long(cols, self.V)  # (B, 1 + k, p): one pass (in float64 for long videos)
        self._rhs_cache = W[:, 1:]
        g = x - W[:, 0]
        scale = u2.clamp_min(0).sqrt() + self.C * (e.abs() * self.norms).sum(-1)
        return torch.linalg.vector_norm(g, dim=-1), scale

    def _product_buffer(self, m: int) -> Tensor | None:
        """A kept ``(m, p, p)`` buffer in the dtype of ``V`` for the update's product (``None``
        where ``V`` is float64: the product then goes straight into ``M``)."""
        if self.V.dtype == WD:
            return None
        if getattr(self, "_product", None) is None or self._product.shape[0] < m:
            self._product = torch.empty(m, self.n, self.n, dtype=self.V.dtype, device=self.V.device)
        return self._product

    def _matrices(self, rows: Tensor, act: Tensor, out: Tensor) -> Tensor:
        """``I + M_A`` from each sample's ``M`` and the steps that changed, ``(m, p, p)``."""
        Vd, w = changed_rows(self.V, rows, act, self.M_set[rows])
        self._deltas = (Vd, w, act)
        H = add_changes_(torch.index_select(self.M, 0, rows, out=out), Vd, w, self.C,
                         self._product_buffer(rows.numel()) if Vd.shape[1] else None)
        H.diagonal(dim1=-2, dim2=-1).add_(1)
        return H

    def _adopt(self, rows: Tensor, new: Tensor) -> None:
        Vd, w, act = self._deltas
        B, C = self.M.shape[0], self.C
        work = self._product_buffer(min(rows.numel(), B)) if Vd.shape[1] else None
        if rows.numel() == B and bool((rows == torch.arange(B, device=rows.device)).all()):
            add_changes_(self.M, Vd[new], w[new], C, work)  # every sample, in order: in place
        elif rows.numel() * self.n * self.n * 8 <= _BATCHED_UPDATE_BYTES:
            self.M.index_copy_(0, rows, add_changes_(self.M.index_select(0, rows), Vd[new], w[new], C, work))
        else:  # sample by sample, in place: no (m, p, p) temporary
            for b, i in zip(rows.tolist(), new.tolist()):
                add_changes_(self.M[b : b + 1], Vd[i : i + 1], w[i : i + 1], C, work)
        self.M_set[rows] = act[new]

    def _rhs(self, S, A):
        return self._rhs_cache

    def _residuals(self, X):
        R = self.y.unsqueeze(1) - torch.bmm(X.to(self.V.dtype), self.V.transpose(1, 2)).to(WD)  # one pass
        return R, X.square().sum(-1)

    def line_terms(self, x, d, r, dr):
        return (x * d).sum(-1), d.square().sum(-1)

    def output(self, X: Tensor) -> Tensor:
        return X.to(self.V.dtype)
