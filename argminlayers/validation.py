"""Input validation shared by every layer: shapes, masks, lengths, finiteness.

Every check raises an error that names the offending argument and says what was
expected, so that bad input never turns into a silent NaN further down.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import all_finite


def check_sequence(V: Tensor, name: str = "V") -> None:
    """``V`` must be a floating tensor of shape ``(B, T, p)`` with ``B, T, p ≥ 1``."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, T, p), got {type(V).__name__}")
    if V.dim() != 3:
        raise ValueError(
            f"{name} must have 3 dimensions (B, T, p), got {V.dim()} with shape {tuple(V.shape)}"
        )
    if not V.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {V.dtype}")
    B, T, p = V.shape
    if T == 0:
        raise ValueError(f"{name} has T = 0 time steps (shape {tuple(V.shape)}); every sequence needs at least one")
    if B == 0 or p == 0:
        raise ValueError(f"{name} must have B ≥ 1 and p ≥ 1, got shape {tuple(V.shape)}")


def lengths_to_mask(lengths: Tensor, T: int, *, name: str = "lengths") -> Tensor:
    """``(B,)`` integer lengths in ``1..T`` → ``(B, T)`` boolean mask, valid steps first."""
    if lengths.dim() != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        bad = [i for i, n in enumerate(lengths.tolist()) if n < 1 or n > T]
        raise ValueError(
            f"{name} must lie in 1..T = 1..{T}; samples {bad[:8]} have lengths "
            f"{[lengths[i].item() for i in bad[:8]]}"
        )
    steps = torch.arange(T, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def step_positions(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``t = 1, 2, …`` counted over the valid steps of each sequence (last dimension), 0 at
    padded steps: the regression targets of rank-pooling-style objectives. Works on a
    ``(B, T)`` batch and, under ``vmap``, on one ``(T,)`` mask."""
    m = mask.to(dtype)
    return torch.cumsum(m, dim=-1) * m


def check_batch(V: Tensor, name: str = "V") -> None:
    """``V`` must be a floating tensor of shape ``(B, *)`` with ``B ≥ 1`` and no empty dimension."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(V).__name__}")
    if V.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (B, ...), got a scalar")
    if not V.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {V.dtype}")
    if V.dim() >= 2 and V.shape[1] == 0:
        raise ValueError(f"{name} has T = 0 time steps (shape {tuple(V.shape)}); every sequence needs at least one")
    if V.numel() == 0:
        raise ValueError(f"{name} must have B ≥ 1 and no empty dimension, got shape {tuple(V.shape)}")


def resolve_mask(
    V: Tensor,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    name: str = "V",
    sequence: bool = True,
) -> Tensor:
    """Validate ``V`` and return a ``(B, T)`` boolean mask of its valid steps.

    ``mask`` may be a ``(B, T)`` boolean mask or, for convenience, ``(B,)`` integer
    lengths; ``lengths`` is the explicit form of the latter. Without either, every step
    is valid. Non-finite values are rejected at valid steps only: padded steps are
    never read.

    ``sequence=True`` requires ``V: (B, T, p)`` (the poolings); ``sequence=False`` accepts
    any ``(B, T, …)`` with a mask over ``T``, or any ``(B, …)`` without one (then ``T`` is
    ``V.shape[1]``, or 1 for ``V: (B,)``).
    """
    if sequence:
        check_sequence(V, name)
    else:
        check_batch(V, name)
    B = V.shape[0]
    T = V.shape[1] if V.dim() >= 2 else 1
    if mask is not None and lengths is not None:
        raise ValueError("pass either mask or lengths, not both")
    if mask is not None and not isinstance(mask, Tensor) and isinstance(mask, (list, tuple)):
        mask = torch.as_tensor(mask, device=V.device)  # a list of lengths or of mask rows
    if mask is not None and isinstance(mask, Tensor) and mask.dim() == 1 and mask.dtype != torch.bool:
        lengths, mask = mask, None
    if (mask is not None or lengths is not None) and V.dim() < 2:
        raise ValueError(f"mask/lengths mark steps along dimension 1 of {name}, which has shape {tuple(V.shape)}")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths, device=V.device)
        if lengths.device != V.device:
            raise ValueError(f"lengths is on {lengths.device} but {name} is on {V.device}; move them to one device")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
        mask = lengths_to_mask(lengths, T)
    elif mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=V.device)
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a boolean torch.Tensor of shape (B, T), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean tensor of shape (B, T), got dtype {mask.dtype}")
        if mask.shape != (B, T):
            raise ValueError(
                f"mask must have shape (B, T) = ({B}, {T}) to match {name}, got {tuple(mask.shape)}"
            )
        if mask.device != V.device:
            raise ValueError(f"mask is on {mask.device} but {name} is on {V.device}; move them to one device")
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"mask has no valid step in rows {rows[:8]}; every sequence needs at least one")
    # A NaN or Inf anywhere makes the sum non-finite: one read pass over V and one read-back
    # decide the common case (all_finite tests each entry where finite entries overflowed the
    # sum); only then is each step summed, its padded steps left out. (There, a finite step
    # whose sum overflows is flagged too; its values would overflow inside any objective.)
    if all_finite(V):
        return mask
    steps = V.reshape(B, T, -1)
    bad = ~torch.isfinite(steps.sum(dim=-1)) & mask
    if bool(bad.any()):
        bad = ~torch.isfinite(steps).all(dim=-1) & mask  # the exact culprits, for the message
        b, t = bad.nonzero()[0].tolist() if bool(bad.any()) else (0, 0)
        raise ValueError(
            f"{name} contains NaN or Inf at {int(bad.sum())} valid step(s), first at sample {b}, step {t}"
        )
    return mask


def zero_padding(V: Tensor, mask: Tensor) -> Tensor:
    """``V`` with padded steps set to zero (a copy only when there is padding).

    ``torch.where`` sends padded steps exactly zero gradient, and whatever they held
    (even NaN) cannot leak into what follows.
    """
    if bool(mask.all()):
        return V
    m = mask.reshape(*mask.shape, *([1] * (V.dim() - 2)))
    return torch.where(m, V, torch.zeros((), dtype=V.dtype, device=V.device))


_RESERVED = frozenset({"v", "u", "mask", "lengths", "V", "U", "state", "wrt", "W"})


def check_inputs(inputs: dict, V: Tensor, reserved: frozenset[str] = _RESERVED) -> dict:
    """Keyword inputs of a layer: tensors with leading dimension ``B`` on ``V``'s device;
    floating ones finite. Errors name the input."""
    B = V.shape[0]
    for name, x in inputs.items():
        if name in reserved:
            raise TypeError(f"keyword input {name!r} is reserved by the layer; rename it")
        if not isinstance(x, Tensor):
            raise TypeError(
                f"keyword input {name!r} must be a torch.Tensor with leading dimension B = {B}, got "
                f"{type(x).__name__}; constants belong in the objective (e.g. a buffer of an Objective)"
            )
        if x.dim() == 0 or x.shape[0] != B:
            raise ValueError(
                f"keyword input {name!r} must have leading dimension B = {B} (one slice per sample), "
                f"got shape {tuple(x.shape)}"
            )
        if x.device != V.device:
            raise ValueError(f"keyword input {name!r} is on {x.device} but V is on {V.device}; move them to one device")
        if x.is_floating_point() and V.is_floating_point() and torch.promote_types(x.dtype, V.dtype) != V.dtype:
            # it would promote the objective's values past V's dtype, and the solve's result with them
            # (for some data only: where the solver stops at its first point, u keeps V's dtype)
            raise TypeError(f"keyword input {name!r} is {x.dtype} but V is {V.dtype}; pass it in V's dtype "
                            f"({name}={name}.to(V)) or V in {x.dtype}")
        if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"keyword input {name!r} contains NaN or Inf")
    return inputs
