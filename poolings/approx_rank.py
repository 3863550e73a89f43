"""Approximate rank pooling (Bilen et al., *Dynamic Image Networks*, 2016): a closed form

    u = Σ_t α_t v_t,   α_t = 2(T − t + 1) − (T + 1)(H_T − H_{t−1}),
    H_t = Σ_{i ≤ t} 1/i,  H_0 = 0,

with ``T`` each sequence's own length and ``t = 1..T`` its valid steps in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Pooling


def approx_rank_weights(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``α: (B, T)`` for a ``(B, T)`` bool mask; zero at padded steps."""
    m = mask.to(dtype)
    t = torch.cumsum(m, dim=1)  # position of each valid step, 1..T_i
    T = m.sum(1, keepdim=True)  # (B, 1)
    inv = torch.where(mask, 1.0 / t.clamp_min(1), torch.zeros_like(t))
    H_t = torch.cumsum(inv, dim=1)  # H_t at valid steps
    H_prev = H_t - inv  # H_{t-1}
    H_T = H_t.amax(dim=1, keepdim=True)  # H_{T_i}
    alpha = 2 * (T - t + 1) - (T + 1) * (H_T - H_prev)
    return alpha * m


def approx_rank_pool(V: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t α_t v_t``; ``V: (B, T, p)`` → ``(B, p)``."""
    alpha = approx_rank_weights(mask, V.dtype)
    return torch.bmm(alpha.unsqueeze(1), V).squeeze(1)


class ApproxRankPool(Pooling):
    """Approximate rank pooling: one weighted sum, ``O(T p)``.

    Example::

        >>> import torch
        >>> from poolings.approx_rank import approx_rank_weights
        >>> approx_rank_weights(torch.ones(1, 3, dtype=torch.bool), torch.float64)
        tensor([[-1.3333,  0.6667,  0.6667]], dtype=torch.float64)
    """

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        return approx_rank_pool(V, mask)
