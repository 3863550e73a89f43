"""The one call every pooling shares: ``pool(V, lengths=None)``, ``(B, T, p) → (B, q)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from argminlayers import resolve_mask, zero_padding


def _validated(V: Tensor, lengths) -> tuple[Tensor, Tensor]:
    """``(V with padded steps zero, mask)``, ``V`` and ``lengths`` checked."""
    mask = resolve_mask(V, lengths)
    return zero_padding(V, mask), mask


# Inside a compiled model the checks run eagerly (their data-dependent tests would each break
# the graph, with a warning about Tensor.item()): one graph break, and the pooling itself compiles.
_validated_eagerly = torch.compiler.disable(_validated)


class Pooling(nn.Module):
    """Base class: ``forward(V, lengths=None)`` with ``V: (B, T, p)`` and ``lengths: (B,)``
    (or a ``(B, T)`` bool mask) → ``(B, output_dim(p))``. Padded steps have no influence."""

    def output_dim(self, p: int) -> int:
        """Width of the pooled vector for ``p``-dimensional features."""
        return p

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        Vz, mask = (_validated_eagerly if torch.compiler.is_compiling() else _validated)(V, lengths)
        return self.pool(Vz, mask)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        """``V: (B, T, p)`` (validated, padded steps zero), ``mask: (B, T)`` bool → ``(B, q)``."""
        raise NotImplementedError
