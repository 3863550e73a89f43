"""Average pooling, written as an argmin so that it runs through :class:`~argminlayers.ArgminLayer`.

    u* = argmin_u ½ Σ_{t valid} ‖u − v_t‖²  =  (1/n) Σ_{t valid} v_t

The objective is :class:`argminlayers.objectives.SquaredDistance` (closed-form solve,
Hessian ``n I``), so every backward strategy is exact here.
"""

from __future__ import annotations

from torch import Tensor

from argminlayers import ArgminLayer
from argminlayers.objectives import SquaredDistance

from .base import Pooling


class AvgPool(Pooling):
    """Temporal average over valid steps, as an argmin layer.

    Args:
        backward: any strategy of :class:`~argminlayers.ArgminLayer`; all are exact here.

    Example::

        >>> import torch
        >>> from poolings import AvgPool
        >>> AvgPool()(torch.ones(2, 4, 3), torch.tensor([4, 2])).shape
        torch.Size([2, 3])
    """

    def __init__(self, *, backward: str = "woodbury", **layer_options):
        super().__init__()
        self.layer = ArgminLayer(SquaredDistance(), backward=backward, **layer_options)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        return self.layer.forward_masked(V, mask)
