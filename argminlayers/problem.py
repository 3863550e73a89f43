"""A batch of inner problems: an objective bound to its data.

Solvers see a :class:`Problem` and work on flat iterates ``U: (B, q)``; the problem
reshapes them to the objective's ``(B, *q_shape)`` on the way in and flattens what comes
back, so that every solver and backward strategy is written once for vectors.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .objective import Linearization, Objective


class Problem:
    """``min_u f(v_b, u, θ)`` for every sample ``b`` of one call.

    Args:
        objective: the :class:`~argminlayers.Objective`.
        V: ``(B, T, …)`` data, padded steps zero.
        mask: ``(B, T)`` bool, valid steps.
        inputs: keyword inputs, each ``(B, …)``.
        q_shape: shape of one sample's ``u``.
        constraints: the :class:`~argminlayers.constraints.ConstraintSet` of a constrained
            problem (``h(v, u) = 0``, ``g(v, u) ≤ 0``), or ``None``.
    """

    def __init__(self, objective: Objective, V: Tensor, mask: Tensor, inputs: Mapping[str, Tensor],
                 q_shape: tuple[int, ...], constraints: Any = None):
        self.objective, self.V, self.mask, self.inputs = objective, V, mask, dict(inputs)
        self.constraints = constraints
        self.q_shape = tuple(q_shape)
        self.batch = V.shape[0]
        q = 1
        for n in self.q_shape:
            q *= n
        self.q = q

    def rows(self, index: Tensor) -> "Problem":
        """The samples ``index`` alone, a smaller batch of the same objective (which is per
        sample), on detached data: what a solver steps when few samples are left."""
        def pick(x: Any) -> Any:
            return x.detach()[index] if isinstance(x, Tensor) and x.dim() and x.shape[0] == self.batch else x

        return Problem(self.objective, pick(self.V), self.mask[index], {k: pick(x) for k, x in self.inputs.items()},
                       self.q_shape, self.constraints)

    def shaped(self, U: Tensor) -> Tensor:
        """Flat ``(B, q)`` → ``(B, *q_shape)`` (a view)."""
        return U.reshape(U.shape[0], *self.q_shape)

    def value(self, U: Tensor) -> Tensor:
        """``f`` per sample at flat ``U``, ``(B,)``, without a graph."""
        with torch.no_grad():
            return self.objective.value(self.V, self.shaped(U), self.mask, **self.inputs)

    def linearize(self, U: Tensor, state: Any = None, *, create_graph: bool = False,
                  second_order: bool = True) -> Linearization:
        """The objective at flat ``U``: value, gradient, Hessian operator, mixed products
        (``second_order=False``: only the value and gradient are expected)."""
        return Linearization(self.objective, self.V, self.shaped(U), self.mask, self.inputs, state,
                             create_graph=create_graph, second_order=second_order)
