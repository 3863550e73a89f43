"""The one call every pooling shares: ``pool(V, lengths=None)``, ``(B, T, p) → (B, q)``."""

from __future__ import annotations

from torch import Tensor, nn

from argminlayers import resolve_mask, zero_padding


class Pooling(nn.Module):
    """Base class: ``forward(V, lengths=None)`` with ``V: (B, T, p)`` and ``lengths: (B,)``
    (or a ``(B, T)`` bool mask) → ``(B, output_dim(p))``. Padded steps have no influence."""

    def output_dim(self, p: int) -> int:
        """Width of the pooled vector for ``p``-dimensional features."""
        return p

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        mask = resolve_mask(V, lengths)
        return self.pool(zero_padding(V, mask), mask)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        """``V: (B, T, p)`` (validated, padded steps zero), ``mask: (B, T)`` bool → ``(B, q)``."""
        raise NotImplementedError
