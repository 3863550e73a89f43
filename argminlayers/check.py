"""Gradient checks: compare two layers, and finite differences / gradcheck in float64."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

Layer = Callable[..., Tensor]


@dataclass
class Comparison:
    """How far two layers are apart on the same input.

    ``output_*`` compare the outputs ``U_a, U_b``; ``grad_*`` compare the input gradients
    ``dL/dV`` for the same random upstream gradient ``dL/dU``. Relative errors are
    ``‖a − b‖ / max(‖b‖, tiny)`` (``b`` is the reference). ``time_a``/``time_b`` are one
    forward + backward call each, first-call costs included: use ``benchmarks/`` for timings.
    """

    output_rel_err: float
    output_max_abs: float
    output_cosine: float
    grad_rel_err: float
    grad_max_abs: float
    grad_cosine: float
    time_a: float
    time_b: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"output: rel {self.output_rel_err:.2e}  max|Δ| {self.output_max_abs:.2e}  cos {self.output_cosine:.12f}\n"
            f"grad:   rel {self.grad_rel_err:.2e}  max|Δ| {self.grad_max_abs:.2e}  cos {self.grad_cosine:.12f}\n"
            f"time:   a {self.time_a * 1e3:.1f} ms  b {self.time_b * 1e3:.1f} ms"
        )


def errors(a: Tensor, b: Tensor) -> tuple[float, float, float]:
    """``(relative error, max abs difference, cosine)`` of ``a`` against the reference ``b``."""
    a = a.detach().double().flatten().cpu()
    b = b.detach().double().flatten().cpu()
    tiny = torch.finfo(torch.float64).tiny
    rel = float((a - b).norm() / b.norm().clamp_min(tiny))
    mx = float((a - b).abs().max()) if a.numel() else 0.0
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(tiny))
    return rel, mx, cos


def _output_and_grad(layer: Layer, V: Tensor, args: tuple, grad_output: Tensor | None, seed: int):
    X = V.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    U = layer(X, *args)
    if grad_output is None:
        gen = torch.Generator().manual_seed(seed)
        grad_output = torch.randn(U.shape, generator=gen, dtype=torch.float64).to(U)
    (dV,) = torch.autograd.grad(U, X, grad_output.to(U))
    return U.detach(), dV, time.perf_counter() - t0, grad_output


def compare(
    a: Layer,
    b: Layer,
    V: Tensor,
    *args,
    grad_output: Tensor | None = None,
    seed: int = 0,
) -> Comparison:
    """Run layers ``a`` and ``b`` (``b`` the reference) on the same ``V`` (and extra
    positional ``args``, e.g. lengths), with the same upstream gradient (random, seeded,
    unless given), and measure outputs and input gradients.

    Example::

        >>> import torch
        >>> from argminlayers import ArgminLayer
        >>> from argminlayers.check import compare
        >>> f = lambda v, u: 0.5 * ((u - v) ** 2).sum()
        >>> dense, cg = ArgminLayer(f, backward="dense"), ArgminLayer(f, backward="cg")
        >>> c = compare(cg, dense, torch.randn(2, 5, 3, dtype=torch.float64))
        >>> c.grad_rel_err < 1e-8
        True
    """
    Ua, dVa, ta, go = _output_and_grad(a, V, args, grad_output, seed)
    Ub, dVb, tb, _ = _output_and_grad(b, V, args, go, seed)
    out = errors(Ua, Ub)
    grad = errors(dVa, dVb)
    return Comparison(*out, *grad, time_a=ta, time_b=tb)


def finite_difference(
    layer: Layer,
    V: Tensor,
    *args,
    eps: float = 1e-6,
    n_directions: int = 3,
    seed: int = 0,
) -> float:
    """Largest relative error between the analytic directional derivative
    ``⟨dL/dV, D⟩`` and the central difference ``(L(V + εD) − L(V − εD)) / 2ε`` over
    random directions ``D``, with ``L = ⟨layer(V), G⟩`` for a random ``G``; float64."""
    V = V.detach().double()
    gen = torch.Generator().manual_seed(seed)
    X = V.clone().requires_grad_(True)
    U = layer(X, *args)
    G = torch.randn(U.shape, generator=gen, dtype=torch.float64).to(U.device)
    (dV,) = torch.autograd.grad(U, X, G)
    worst = 0.0
    with torch.no_grad():
        for _ in range(n_directions):
            D = torch.randn(V.shape, generator=gen, dtype=torch.float64).to(V.device)
            fd = ((layer(V + eps * D, *args) - layer(V - eps * D, *args)) * G).sum() / (2 * eps)
            an = (dV * D).sum()
            worst = max(worst, float((fd - an).abs() / an.abs().clamp_min(1e-12)))
    return worst


def gradcheck(layer: Layer, V: Tensor, *args, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3) -> bool:
    """:func:`torch.autograd.gradcheck` of ``layer`` with respect to ``V`` in float64.

    Every entry of ``V`` is perturbed, padded steps included, so this also checks that
    padded steps get exactly zero gradient. Raises ``GradcheckError`` on failure.
    """
    X = V.detach().double().requires_grad_(True)
    return torch.autograd.gradcheck(lambda x: layer(x, *args), (X,), eps=eps, atol=atol, rtol=rtol)
