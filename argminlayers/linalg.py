"""Batched linear-algebra kernels shared by the backward strategies and the forward solvers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .errors import SingularHessianError

_engine = torch.autograd.Variable._execution_engine


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite. A NaN or ±Inf makes the sum non-finite, so one
    reduction and one read-back decide; the exact test runs only where the sum is not finite
    (an overflow of finite entries). ``torch.isfinite(x).all()`` is four operations, and on one
    CPU thread took 28 µs against 6 µs for the sum on a ``(2, 64)`` tensor."""
    if math.isfinite(float(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())


def vjp(
    output: Tensor,
    inputs: "tuple[Tensor, ...] | list[Tensor]",
    grad_output: Tensor,
    *,
    retain_graph: bool = True,
    create_graph: bool = False,
) -> tuple["Tensor | None", ...]:
    """``∂/∂x ⟨grad_output, output⟩`` for every ``x`` of ``inputs`` (``None`` where unused): what
    :func:`torch.autograd.grad` computes, straight from the autograd engine, without its
    per-call argument handling (a third of the cost of a small reverse pass). ``grad_output``
    must have the shape of ``output``."""
    return _engine.run_backward((output,), (grad_output,), retain_graph, create_graph, tuple(inputs), True, False)


def batched_vjp(output: Tensor, input: Tensor, grad_outputs: Tensor, *, create_graph: bool = False,
                rows: int | None = None) -> "Tensor | None":
    """``k`` vector–Jacobian products of ``output`` with respect to ``input`` in batched reverse
    passes (``grad_outputs: (k, *output.shape)`` → ``(k, *input.shape)``): what
    ``torch.autograd.grad(..., is_grads_batched=True)`` does, without the argument handling
    whose first call imports sympy (over a second), and without the generic vmap wrapper's
    argument flattening (about 0.2 ms a call): one vmap level around each engine call.

    ``rows``: at most this many products per pass (``None``: all ``k`` in one). A batched pass
    carries ``rows`` copies of every intermediate of the graph; once those outgrow the cache,
    each elementwise op streams them from memory (see :func:`rows_per_pass`). Under
    ``torch.autograd.detect_anomaly`` (its NaN check), one product a pass."""
    k = grad_outputs.shape[0]
    if torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled():
        # anomaly mode's NaN check reads each gradient's values, which no batched pass can: one at a time
        parts = [_engine.run_backward((output,), (grad_outputs[i],), True, create_graph, (input,), True, False)[0]
                 for i in range(k)]
        return None if k == 0 or parts[0] is None else torch.stack(parts)
    if rows is not None and rows < k:
        parts = [batched_vjp(output, input, grad_outputs[i:i + rows], create_graph=create_graph)
                 for i in range(0, k, rows)]
        return None if parts[0] is None else torch.cat(parts)
    level = torch._C._vmapmode_increment_nesting()
    try:
        batched = torch._add_batch_dim(grad_outputs, 0, level)
        (out,) = _engine.run_backward((output,), (batched,), True, create_graph, (input,), True, False)
        return None if out is None else torch._remove_batch_dim(out, level, k, 0)
    finally:
        torch._C._vmapmode_decrement_nesting()


#: Bytes of one batched reverse pass's copies of its data (see :func:`rows_per_pass`).
PASS_BYTES = 1 << 20


def rows_per_pass(elements: int, itemsize: int) -> int:
    """How many products one batched reverse pass takes when each product's intermediates hold
    about ``elements`` entries of ``itemsize`` bytes: enough to fill ``PASS_BYTES`` (about a core's
    L2 cache), at least one. The dense Hessian of pseudo-Huber pooling (B·T·p entries a product),
    float64, one CPU thread, in one pass against chunks of this size: 256 × 20 × 16 31 → 6.6 ms,
    16 × 10 × 64 9.5 → 2.9 ms, 16 × 100 × 64 207 → 30 ms; the best chunk held 0.6–1.6 MiB at
    every size, in float32 and float64."""
    return max(1, PASS_BYTES // max(1, elements * itemsize))


@dataclass
class CGResult:
    x: Tensor  # (B, q) solution
    converged: Tensor  # (B,) bool: relative residual ≤ tol
    iterations: Tensor  # (B,) iterations each sample used
    negative_curvature: Tensor  # (B,) bool: a direction with pᵀHp ≤ 0 was met


def batched_cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    tol: "float | Tensor",
    max_iter: int,
    precond: Tensor | None = None,
) -> CGResult:
    """Preconditioned conjugate gradient for ``H x = b``, every sample at once.

    Each sample stops on its own once ``‖b − H x‖ ≤ tol · ‖b‖`` (its step size is
    then zero), with no Python loop over the batch. A sample that meets a direction
    of non-positive curvature stops there and is flagged in ``negative_curvature``.

    Args:
        matvec: ``x (B, q) -> H x (B, q)``; ``H`` symmetric.
        b: ``(B, q)`` right-hand sides.
        precond: optional ``(B, q)`` inverse diagonal (Jacobi preconditioner ``M⁻¹``).
    """
    dot = torch.linalg.vecdot
    x = torch.zeros_like(b)
    r = b
    z = r * precond if precond is not None else r
    p = z
    rz = dot(r, z)
    thresh2 = (tol * tol) * dot(b, b)  # tol: a float, or (B,) per-sample tolerances
    active = dot(r, r) > thresh2
    negative = torch.zeros_like(active)
    iters = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Hp = matvec(p)
        pHp = dot(p, Hp)
        curved = pHp > 0
        negative = negative | (active & ~curved)
        step = active & curved
        alpha = torch.where(step, rz / pHp, zero).unsqueeze(-1)  # the unused branch may be inf: not selected
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, Hp, value=-1)
        z = r * precond if precond is not None else r
        rz_new = dot(r, z)
        p = torch.addcmul(z, torch.where(step, rz_new / rz, zero).unsqueeze(-1), p)
        rz = rz_new
        iters += step
        active = step & ((rz_new if precond is None else dot(r, r)) > thresh2)  # (rᵀz = rᵀr unpreconditioned)
    converged = ~active & ~negative
    return CGResult(x, converged, iters, negative)


def cholesky_or_raise(H: Tensor, what: str = "Hessian") -> Tensor:
    """Lower Cholesky factor of ``H (B, q, q)``; raises :class:`SingularHessianError` naming the samples
    whose matrix is not (numerically) positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if H.shape[-1] == 0:
        return L
    # Cholesky of an exactly singular matrix can "succeed" with a rounding-sized pivot;
    # treat pivots² below 10·eps of the largest as singular too.
    pivots = L.diagonal(dim1=-2, dim2=-1).abs() ** 2  # (B, q)
    tiny = pivots.amin(-1) <= 10 * torch.finfo(H.dtype).eps * pivots.amax(-1)
    failed = (info > 0) | tiny | ~torch.isfinite(L).flatten(1).all(-1)
    if bool(failed.any()):
        samples = failed.nonzero().flatten().tolist()
        raise SingularHessianError(
            f"the {what} at the solution is singular or not positive definite for samples "
            f"{samples[:8]}{' ...' if len(samples) > 8 else ''}, so the implicit gradient does not "
            "exist there; pass damping=λ > 0 to the layer to back-propagate through (H + λI)⁻¹ instead"
        )
    return L
