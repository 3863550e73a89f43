"""Frame preprocessing before rank pooling, as in the original rank-pooling code (VideoDarwin).

Each function is pure and differentiable, takes ``V: (B, T, p)`` with a ``(B, T)`` bool
``mask`` of valid steps, and returns ``(B, T, p)`` with padded steps exactly zero: padded
values (whatever they hold) have no influence on the result and receive zero gradient.

VideoDarwin applies them in this order, then fits the ranking machine::

    V  →  time_varying_mean  →  signed_sqrt  →  l2_normalize  →  rank pool

and its bidirectional variant reverses the raw frames first (``reverse_sequences``) and
runs the same chain on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from argminlayers import zero_padding

__all__ = ["time_varying_mean", "signed_sqrt", "l2_normalize", "reverse_sequences"]




def time_varying_mean(V: Tensor, mask: Tensor) -> Tensor:
    """Running mean over valid steps: ``m_t = (1/n_t) Σ_{τ ≤ t, τ valid} v_τ``.

    ``n_t`` counts the valid steps up to ``t``, so ``m_t = (1/t) Σ_{τ ≤ t} v_τ`` for
    sequences padded at the end. ``(B, T, p) → (B, T, p)``; padded steps are zero.
    """
    Vz = zero_padding(V, mask)  # (B, T, p)
    counts = torch.cumsum(mask.to(V.dtype), dim=1).clamp_min(1).unsqueeze(-1)  # (B, T, 1)
    return zero_padding(torch.cumsum(Vz, dim=1) / counts, mask)


def signed_sqrt(V: Tensor) -> Tensor:
    """``sign(x) · sqrt(|x|)`` elementwise, with a finite gradient everywhere.

    The value is exact. The derivative ``1 / (2 sqrt|x|)`` is exact at every ``x ≠ 0``
    (large, but finite, for tiny ``|x|``) and is set to ``0`` at ``x = 0``, where the true
    derivative is infinite: the same convention as ``torch.abs`` and ``torch.relu`` at
    their kinks. A zero (a padded step, or a ReLU feature that is off) therefore never
    produces an Inf or NaN gradient. Implemented with the double-``where`` trick: the
    square root is evaluated at ``1`` wherever ``x = 0``, so no infinite intermediate exists.
    """
    zero = V == 0
    safe = torch.where(zero, torch.ones((), dtype=V.dtype, device=V.device), V)
    out = torch.sign(safe) * torch.sqrt(safe.abs())
    return torch.where(zero, torch.zeros((), dtype=V.dtype, device=V.device), out)


def l2_normalize(V: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Each frame divided by its L2 norm: ``v_t / max(‖v_t‖, eps)``.

    A zero frame stays zero with a finite gradient (the norm is clamped at ``eps``, as in
    :func:`torch.nn.functional.normalize`). ``(B, T, p) → (B, T, p)``; padded steps are zero.
    """
    Vz = zero_padding(V, mask)
    return torch.nn.functional.normalize(Vz, p=2.0, dim=-1, eps=eps)


def reverse_sequences(V: Tensor, mask: Tensor) -> Tensor:
    """Reverse each sequence within its own valid steps; padded steps stay where they are.

    With ``n`` valid steps at positions ``τ_1 < … < τ_n``, the output holds ``v_{τ_{n+1−k}}``
    at ``τ_k`` (for lengths, ``out[b, t] = V[b, T_b − 1 − t]`` for ``t < T_b``); padded steps
    are zero. ``(B, T, p) → (B, T, p)``; one gather along time.
    """
    B, T, p = V.shape
    steps = torch.arange(T, device=V.device).expand(B, T)  # (B, T)
    # valid positions first, in order (stable sort of the padded flag)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, T)
    rank = torch.cumsum(mask.long(), dim=1) - 1  # 0-based rank of each valid step
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    partner = torch.gather(order, 1, (n - 1 - rank).clamp(0, T - 1))  # position of the mirror step
    index = torch.where(mask, partner, steps)  # (B, T)
    out = torch.gather(V, 1, index.unsqueeze(-1).expand(B, T, p))
    return zero_padding(out, mask)
