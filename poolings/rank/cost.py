"""Which method ``RankPool(method="auto")`` runs: a cost model of forward + exact backward.

Every method pays for the same few kernels, so each one's time is predicted from the sizes
``(B, T, p)``, the dtype and the device, with rates measured on the machine the benchmarks ran
on (``docs/benchmarks/rank_length.md`` lists, per size, each method's measured time next to
the model's choice):

- ``gemm``: a Gram-sized product (``VᵀV`` or ``VVᵀ``), ``2 B T p min(T, p)`` flops;
- ``cholesky``: a float64 factorisation of ``n × n`` matrices, ``n³/3`` flops each, one per
  sample and iteration (two on small problems, which factorise every candidate), plus a fixed
  cost per matrix;
- ``bytes``: memory traffic: a pass over ``V`` (a batched matrix–vector product), and the
  ``(B, n, n)`` buffers an iteration reads and writes;
- ``call``: the fixed cost of one tensor operation; small problems are made of these.

=========  ===========================================================================
method     forward + exact backward
=========  ===========================================================================
tspace     ``VVᵀ`` + ``ITERS`` × (factorisations of ``T × T`` + ``O(T²)``) + 5 passes
pspace     ``VᵀV`` + ``ITERS`` × (factorisations of ``p × p`` + 2 passes) + 2 passes
cg         sketch (two GEMMs of width 64) + ``NEWTON`` × (3 + 2 × ``CG``) passes + a CG backward
=========  ===========================================================================

A method is left out when its ``(B, n, n)`` float64 buffers (about four of them) would exceed
``memory_limit`` (default: 2 GiB on CPU; half the free memory on CUDA).

**Conditioning.** The direct methods factorise, whatever the condition of ``H = I + C V_AᵀV_A``;
CG's iterations grow with it. The rates above are for unit-norm frames with ``C = 1``; with the
per-step load ``ℓ = C · mean_t ‖v_t‖²`` above 1 (unnormalised features, a large ``C``), the
forward's CG iterations grow as ``ℓ^0.47`` and the backward's as ``ℓ^0.25``, fitted to random-walk
frames scaled to norms 1, 3, 10 and 30 at 4 × 1000 × 512 (forward CG iterations per sample 8, 24, 76,
200; i.i.d. frames grew less and then saturated, 13, 54, 73, 62). There ``cg`` took 3.1× ``pspace``'s
time at norm 30 and 4.8× ``tspace``'s at 4 × 1000 × 2048. :func:`choose_method_for` measures ``ℓ``
(one pass over ``V``) where the model would otherwise pick ``cg``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .factored import is_small

METHODS = ("tspace", "pspace", "cg")

# Rates of one CPU thread (AMD EPYC), measured for the kernels the CPU path calls: the Gram
# product by BLAS syrk (counted as 2 B T p min(T, p) flops, of which it does half; torch.bmm
# measured 5e10 and 2.5e10) and SciPy's LAPACK potrf (torch's MKL factorisations: 1.6e9–1e10).
_CPU = {
    "gemm_flops": {torch.float32: 1.5e11, torch.float64: 1.0e11},
    "sketch_flops": {torch.float32: 5.0e10, torch.float64: 2.5e10},  # torch.bmm: CG's Nyström sketch
    "cholesky_flops": (7e9, 2.2e10, 4.0e10),  # float64, n ≤ 128, ≤ 256 and above
    "cholesky_fixed": 5.0e-6,  # seconds per matrix
    "bytes": 6e9,  # a pass over V, or over (B, n, n) buffers
    "call": 5.0e-6,  # seconds per tensor operation launched
}
# CUDA: not measured here (no GPU was available); nominal figures of a data-centre GPU.
_CUDA = {
    "gemm_flops": {torch.float32: 3.0e13, torch.float64: 1.0e13},
    "sketch_flops": {torch.float32: 3.0e13, torch.float64: 1.0e13},
    "cholesky_flops": (2.0e11, 2.0e11, 2.0e11),
    "cholesky_fixed": 2.0e-5,
    "bytes": 1.5e12,
    "call": 1.5e-5,
}
ITERS = 3.5  # active-set iterations, measured 2-5 (walk and i.i.d. features, C = 1)
CALLS = {"tspace": 165, "pspace": 185, "layer": 150}  # operations per iteration, and of the layer itself
NEWTON = 4.5  # Newton-CG steps, measured 3-5
CG = 2.5  # CG iterations per Newton step with the Nyström preconditioner, measured 1.5-3
CG_BACKWARD = 12.0  # CG iterations of the exact backward after Newton-CG
CG_CALLS = (180, 40, 600)  # operations per Newton step, per CG iteration, and of the sketch
CG_GROWTH, CG_BACKWARD_GROWTH = 0.47, 0.25  # exponents of the load ℓ in the CG iterations (see above)
FACTOR_BUFFERS = 4  # (B, n, n) float64 buffers a direct method holds at its peak
DEFAULT_CPU_MEMORY = 2 * 2**30


@dataclass
class MethodCost:
    """Predicted seconds and peak bytes of one method's forward + exact backward."""

    method: str
    seconds: float
    bytes: int


def method_costs(B: int, T: int, p: int, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str" = "cpu", *, load: float = 1.0) -> dict[str, MethodCost]:
    """The cost model above for every method: ``{method: MethodCost}``; ``load``: the per-step
    load ``ℓ = C · mean_t ‖v_t‖²`` (values up to 1 cost as 1)."""
    rates = _CUDA if torch.device(device).type == "cuda" else _CPU
    item = torch.finfo(dtype).bits // 8
    gemm = rates["gemm_flops"].get(dtype, rates["gemm_flops"][torch.float32])
    sketch = rates["sketch_flops"].get(dtype, rates["sketch_flops"][torch.float32])
    bw, call = rates["bytes"], rates["call"]
    one_pass = B * T * p * item / bw
    rounds = ITERS + 1

    def direct(n: int, gram_flops: float, passes: float, calls: int) -> float:
        small = is_small(B, n)
        factors = (2 * ITERS if small else ITERS - 0.5) * B
        rate = rates["cholesky_flops"][0 if n <= 128 else (1 if n <= 256 else 2)]
        return (gram_flops / gemm + B * n * n * (item + 8) / bw  # the Gram product, cast to float64
                + factors * (n**3 / 3 / rate + rates["cholesky_fixed"])
                + rounds * 100 * B * n * n / bw  # the (B, n, n) traffic of an iteration
                + passes * one_pass + (rounds * calls + CALLS["layer"]) * call)

    t_space = direct(T, 2 * B * T * T * p, 5, CALLS["tspace"])
    p_space = direct(p, 2 * B * T * p * p, 2 * rounds + 2, CALLS["pspace"])
    k = min(64, p, T)
    grow = max(float(load), 1.0)
    cg_forward, cg_backward = CG * grow**CG_GROWTH, CG_BACKWARD * grow**CG_BACKWARD_GROWTH
    cg = (4 * B * T * p * k / sketch + (NEWTON * (3 + 2 * cg_forward) + 2 * cg_backward) * one_pass
          + (NEWTON * (CG_CALLS[0] + CG_CALLS[1] * cg_forward) + CG_CALLS[1] * cg_backward + CG_CALLS[2]
             + CALLS["layer"]) * call)
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
                  device: "torch.device | str" = "cpu", *, memory_limit: int | None = None,
                  load: float = 1.0) -> str:
    """The method with the least predicted time among those whose buffers fit ``memory_limit``
    (bytes; ``None``: :func:`default_memory_limit`). ``cg`` always fits. ``load``: as in
    :func:`method_costs` (taken at half-octave steps)."""
    limit = default_memory_limit(device) if memory_limit is None else memory_limit
    return _cheapest(B, T, p, dtype, str(torch.device(device)), limit, _load_step(load))


def choose_method_for(V: torch.Tensor, C: float, mask: "torch.Tensor | None" = None, *,
                      memory_limit: int | None = None) -> str:
    """:func:`choose_method` for the frames ``V (B, T, p)`` (padded steps zero) with ``C``: where
    unit-norm frames would run ``cg``, the per-step load ``ℓ = C · mean ‖v_t‖²`` of these (over the
    valid steps of ``mask``, else all steps) is measured and the choice made with it."""
    B, T, p = V.shape
    method = choose_method(B, T, p, V.dtype, V.device, memory_limit=memory_limit)
    if method != "cg":
        return method
    steps = B * T if mask is None else max(int(mask.sum()), 1)
    load = C * float(torch.linalg.vector_norm(V.detach()).square()) / steps
    return choose_method(B, T, p, V.dtype, V.device, memory_limit=memory_limit, load=load)


def _load_step(load: float) -> float:
    """``load`` at half-octave steps (1 and below: 1), so that the kept choices stay few."""
    if not load > 1:
        return 1.0
    return 2 ** (round(2 * math.log2(min(load, 1e30))) / 2)


@functools.lru_cache(maxsize=1024)
def _cheapest(B: int, T: int, p: int, dtype: torch.dtype, device: str, limit: int, load: float) -> str:
    """:func:`choose_method`'s pick, kept per size (the model is a pure function of its arguments;
    evaluating it took about 40 µs a call, a tenth of a small layer call's Python)."""
    costs = method_costs(B, T, p, dtype, device, load=load)
    fits = [c for c in costs.values() if c.bytes <= limit or c.method == "cg"]
    return min(fits, key=lambda c: c.seconds).method
