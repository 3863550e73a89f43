"""Independent reference implementations of the poolings, used only to cross-check them.

Every reference shares the pooling call ``ref(V, lengths=None) -> U`` with
``V: Tensor[B, T, p]`` floating, ``lengths: Tensor[B]`` integers in ``1..T`` (``None``:
every step is valid) and ``U: Tensor[B, p]`` on ``V``'s device and dtype, differentiable
with respect to ``V``; padded steps get exactly zero gradient. Each reference also
reports its own accuracy through ``ref.kkt_residual(V, U, lengths)``, so a
cross-check can tell the reference's error apart from the layer's.

Rank pooling (per sequence ``i`` of length ``T_i``, targets ``y_t = t``)::

    f(v, u) = ½‖u‖² + C/2 Σ_{t ≤ T_i} [ |t − uᵀv_t| − ε ]₊²
    ∇_u f   = u − C Σ_{t ∈ A} e_t v_t,   r_t = t − uᵀv_t,
              A = {t : |r_t| > ε},        e_t = r_t − sign(r_t) ε

Average pooling as an argmin::

    f(v, u) = ½ Σ_{t ≤ T_i} ‖u − v_t‖²,   ∇_u f = T_i u − Σ_t v_t   (solution: the mean)

The references:

- :class:`CvxpyRankPool`, :class:`CvxpyAvgPool`, :class:`CvxpyPooling` (any program) (``cvxpy_ref``): cvxpylayers 1.2.0,
  a conic solve (SCS or Clarabel through diffcp) with tight tolerances.
- :class:`TheseusRankPool` (``theseus_ref``): theseus 0.2.3 Gauss–Newton with
  implicit differentiation.

The heavy packages (cvxpy, cvxpylayers, theseus) are imported only when a reference
is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from argminlayers.validation import resolve_mask

from ..rank import check_rank_param, check_rank_params  # one validator for every rank pooling

__all__ = [
    "CvxpyAvgPool",
    "CvxpyPooling",
    "CvxpyRankPool",
    "TheseusRankPool",
    "avg_pool_grad_u",
    "check_rank_param",
    "check_rank_params",
    "prepare_sequences",
    "rank_pool_grad_u",
    "relative_kkt_residual",
]


def prepare_sequences(V: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Validate ``(V, lengths)`` and zero the padded steps.

    Returns ``(V0, mask, lengths)``: ``V0`` ``(B, T, p)`` equals ``V`` on valid steps and
    is exactly 0 on padded ones (so padded entries, even NaN, have no influence and get a
    zero gradient), ``mask`` ``(B, T)`` bool and ``lengths`` ``(B,)`` int64, both on
    ``V``'s device. Errors name ``V`` or ``lengths``.
    """
    if lengths is not None and not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"lengths must be a (B,) integer tensor or sequence of ints, got {lengths!r}") from exc
        if isinstance(V, Tensor):
            lengths = lengths.to(V.device)
    mask = resolve_mask(V, lengths=lengths)  # (B, T) bool; checks V, lengths, finiteness
    V0 = torch.where(mask.unsqueeze(-1), V, torch.zeros((), dtype=V.dtype, device=V.device))
    return V0, mask, mask.sum(dim=1)


def _targets(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``(B, T)`` targets ``y_t = t`` (1-based), zero on padded steps."""
    T = mask.shape[1]
    y = torch.arange(1, T + 1, dtype=dtype, device=mask.device)
    return y.expand_as(mask) * mask


def rank_pool_grad_u(V: Tensor, U: Tensor, lengths: Tensor | None, C: float, eps: float) -> Tensor:
    """Closed-form ``∇_u f`` of the rank-pool objective, in float64. Shapes: ``(B, T, p), (B, p) → (B, p)``.

    ``∇_u f = u − C Σ_{t ∈ A} e_t v_t`` with ``r_t = t − uᵀv_t``, ``A = {t ≤ T_i : |r_t| > ε}``,
    ``e_t = r_t − sign(r_t) ε``. Computed without autograd (detached).
    """
    C, eps = check_rank_params(C, eps)
    V0, mask, _ = prepare_sequences(V, lengths)
    V0 = V0.detach().double()  # (B, T, p)
    U = _check_solution(U, V0).detach().double().to(V0.device)  # (B, p)
    r = _targets(mask, torch.float64) - torch.einsum("btp,bp->bt", V0, U)  # (B, T)
    active = (r.abs() > eps) & mask
    e = torch.where(active, r - torch.sign(r) * eps, torch.zeros((), dtype=r.dtype, device=r.device))
    return U - C * torch.einsum("bt,btp->bp", e, V0)


def avg_pool_grad_u(V: Tensor, U: Tensor, lengths: Tensor | None = None) -> Tensor:
    """``∇_u f = T_i u − Σ_{t ≤ T_i} v_t`` of ``f = ½ Σ_t ‖u − v_t‖²``, in float64. ``(B, T, p), (B, p) → (B, p)``."""
    V0, mask, n = prepare_sequences(V, lengths)
    U = _check_solution(U, V0).detach().double().to(V0.device)
    return n.unsqueeze(1).double() * U - V0.detach().double().sum(dim=1)


def relative_kkt_residual(grad_u: Tensor, U: Tensor, scale: Tensor | None = None) -> Tensor:
    """Per-sample ``‖∇_u f‖ / (scale · ‖u‖)`` in float64, ``(B, p) → (B,)``.

    ``scale`` (``(B,)``, default 1) brings ``∇_u f`` to the units of ``u``: 1 for rank
    pooling (its ``∇_u f`` is ``u`` minus a term equal to ``u`` at the optimum), ``T_i``
    for average pooling. ``‖u‖ = 0`` is treated as 1 (then the residual is absolute).
    """
    g = grad_u.double().norm(dim=-1)
    un = U.detach().double().to(g.device).norm(dim=-1)
    un = torch.where(un > 0, un, torch.ones_like(un))
    if scale is not None:
        un = un * scale.double().to(g.device)
    return g / un


def _check_solution(U: Tensor, V: Tensor) -> Tensor:
    if not isinstance(U, Tensor):
        raise TypeError(f"U must be a torch.Tensor of shape (B, p), got {type(U).__name__}")
    B, _, p = V.shape
    if U.shape != (B, p):
        raise ValueError(f"U must have shape (B, p) = ({B}, {p}) to match V, got {tuple(U.shape)}")
    return U


# The reference classes import their heavy packages lazily; these imports are light.
from .cvxpy_ref import CvxpyAvgPool, CvxpyPooling, CvxpyRankPool  # noqa: E402
from .theseus_ref import TheseusRankPool  # noqa: E402
