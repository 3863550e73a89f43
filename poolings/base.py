"""The one call every pooling shares: ``pool(V, lengths=None)``, ``(B, T, p) → (B, q)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from argminlayers import resolve_mask


class Pooling(nn.Module):
    """Base class: ``forward(V, lengths=None)`` with ``V: (B, T, p)`` and ``lengths: (B,)``
    (or a ``(B, T)`` bool mask) → ``(B, output_dim(p))``. Padded steps have no influence."""

    def output_dim(self, p: int) -> int:
        """Width of the pooled vector for ``p``-dimensional features."""
        return p

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        mask = resolve_mask(V, lengths)
        # Zero padded steps: whatever they hold (even NaN) cannot leak, and torch.where
        # sends them exactly zero gradient.
        V = torch.where(mask.unsqueeze(-1), V, torch.zeros((), dtype=V.dtype, device=V.device))
        return self.pool(V, mask)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        """``V: (B, T, p)`` (validated, padded steps zero), ``mask: (B, T)`` bool → ``(B, q)``."""
        raise NotImplementedError
