"""Which method ``RankPool(method="auto")`` runs: a cost model of forward + exact backward.

Every method pays for the same few kernels, so each one's time is predicted from the sizes
``(B, T, p)``, the dtype and the device, with rates measured on the machine the benchmarks ran
on (``docs/benchmarks/rank_length.md`` lists, per size, each method's measured time next to
the model's choice):

- ``gemm``: a Gram-sized product (``VᵀV`` or ``VVᵀ``), ``2 B T p min(T, p)`` flops;
- ``cholesky``: a batched float64 factorisation of ``n × n`` matrices, ``n³/3`` flops each,
  about ``1.3`` per sample and iteration, plus a fixed cost per matrix;
- ``pass``: one read of ``V`` (a batched matrix–vector product), memory bound;
- ``step``: the fixed cost of one iteration (kernel launches; it dominates small problems).

=========  ===========================================================================
method     forward + exact backward
=========  ===========================================================================
tspace     ``VVᵀ`` + ``ITERS`` × (factorisations of ``T × T`` + ``O(T²)``) + 4 passes
pspace     ``VᵀV`` + ``ITERS`` × (factorisations of ``p × p`` + updates + 2 passes) + 2 passes
cg         sketch (two GEMMs of width 64) + ``NEWTON`` × (2 + 2 × ``CG``) passes + a CG backward
=========  ===========================================================================

A method is left out when its ``(B, n, n)`` float64 buffers (about four of them) would exceed
``memory_limit`` (default: 2 GiB on CPU; half the free memory on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("tspace", "pspace", "cg")

# Rates of one CPU thread (AVX-512, AMD EPYC), from the rank_length benchmark's calibration run.
_CPU = {
    "gemm_flops": {torch.float32: 1.0e11, torch.float64: 5.0e10},
    "cholesky_flops": 2.0e10,  # float64, large n
    "cholesky_fixed": 1.0e-5,  # seconds per matrix
    "pass_bytes": 1.2e10,
    "step": 1.2e-4,  # seconds per iteration, fixed
}
# CUDA: not measured here (no GPU was available); nominal figures of a data-centre GPU.
_CUDA = {
    "gemm_flops": {torch.float32: 3.0e13, torch.float64: 1.0e13},
    "cholesky_flops": 5.0e11,
    "cholesky_fixed": 2.0e-5,
    "pass_bytes": 1.5e12,
    "step": 5.0e-4,
}
ITERS = 4.0  # active-set iterations, measured 2-6 (walk and i.i.d. features, C = 1)
FACTORS_PER_ITER = 1.3  # new factorisations per sample and iteration (shared / reused otherwise)
NEWTON = 5.0  # Newton-CG steps, measured 4-6
CG = 8.0  # CG iterations per Newton step with the Nyström preconditioner
CG_BACKWARD = 20.0  # CG iterations of the exact backward after Newton-CG
FACTOR_BUFFERS = 4  # (B, n, n) float64 buffers a direct method holds at its peak
DEFAULT_CPU_MEMORY = 2 * 2**30


@dataclass
class MethodCost:
    """Predicted seconds and peak bytes of one method's forward + exact backward."""

    method: str
    seconds: float
    bytes: int


def method_costs(B: int, T: int, p: int, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str" = "cpu") -> dict[str, MethodCost]:
    """The cost model above for every method: ``{method: MethodCost}``."""
    rates = _CUDA if torch.device(device).type == "cuda" else _CPU
    item = torch.finfo(dtype).bits // 8
    gemm = rates["gemm_flops"].get(dtype, rates["gemm_flops"][torch.float32])
    one_pass = B * T * p * item / rates["pass_bytes"]

    def chol(n: int) -> float:
        return B * FACTORS_PER_ITER * (n**3 / 3 / rates["cholesky_flops"] + rates["cholesky_fixed"])

    t_space = (2 * B * T * T * p / gemm + ITERS * (chol(T) + 6 * B * T * T * 8 / rates["pass_bytes"])
               + 4 * one_pass + (ITERS + 2) * rates["step"])
    changes = max(1.0, 0.2 * T)  # steps whose membership changes per iteration
    p_space = (2 * B * T * p * p / gemm + ITERS * (chol(p) + 2 * B * changes * p * p / (gemm / 2)
               + 2 * one_pass) + 2 * one_pass + (ITERS + 2) * rates["step"])
    k = min(64, p, T)
    cg = (4 * B * T * p * k / gemm + NEWTON * (2 + 2 * CG) * one_pass + 2 * CG_BACKWARD * one_pass
          + (NEWTON * (CG + 2) + CG_BACKWARD) * rates["step"])
    nbytes = {
        "tspace": FACTOR_BUFFERS * B * T * T * 8,
        "pspace": FACTOR_BUFFERS * B * p * p * 8,
        "cg": 4 * B * p * k * 8 + 8 * B * (T + p) * 8,
    }
    seconds = {"tspace": t_space, "pspace": p_space, "cg": cg}
    return {m: MethodCost(m, seconds[m], nbytes[m]) for m in METHODS}


def default_memory_limit(device: "torch.device | str") -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free // 2)
    return DEFAULT_CPU_MEMORY


def choose_method(B: int, T: int, p: int, dtype: torch.dtype = torch.float32,
                  device: "torch.device | str" = "cpu", *, memory_limit: int | None = None) -> str:
    """The method with the least predicted time among those whose buffers fit ``memory_limit``
    (bytes; ``None``: :func:`default_memory_limit`). ``cg`` always fits."""
    limit = default_memory_limit(device) if memory_limit is None else memory_limit
    costs = method_costs(B, T, p, dtype, device)
    fits = [c for c in costs.values() if c.bytes <= limit or c.method == "cg"]
    return min(fits, key=lambda c: c.seconds).method
