"""What every rank-pool method shares: the parameters, the targets, the signed active set,
the loss, products with ``V`` and the exact line search.

Notation (per sequence, valid steps ``t = 1 … T``, targets ``y_t = t``)::

    f(v, u) = ½‖u‖² + C/2 Σ_t [ |r_t| − ε ]₊²,     r_t = y_t − uᵀv_t
    A = {t : |r_t| > ε},   s_t = sign(r_t),   e_t = r_t − s_t ε   on A (0 elsewhere)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from argminlayers import step_positions

rank_targets = step_positions  # y: (B, T), y_t = t counted over valid steps, zero at padded steps


def check_rank_params(C: Any, eps: Any) -> tuple[float, float]:
    """Finite ``C > 0`` and finite ``eps ≥ 0``, as floats; errors name the argument."""
    for name, value in (("C", C), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return check_rank_value("C", float(C)), check_rank_value("eps", float(eps))


def check_rank_param(name: str, value: Any) -> float | Tensor:
    """``C`` or ``eps`` as a float (:func:`check_rank_params`), or as a 0-d floating tensor (an
    ``nn.Parameter`` to learn it) with a value in the same range."""
    if not isinstance(value, Tensor):
        return check_rank_params(**{"C": 1.0, "eps": 0.0, name: value})[name == "eps"]
    if value.dim() != 0 or not value.is_floating_point():
        raise TypeError(f"{name} must be a real number or a 0-d floating tensor (e.g. torch.tensor(1.0)), got a "
                        f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
    check_rank_value(name, float(value.detach()))
    return value


def check_rank_value(name: str, value: float, *, learned: bool = False) -> float:
    """``value`` of ``C`` (finite, ``> 0``) or ``eps`` (finite, ``≥ 0``); ``learned``: the
    message says how to keep a trained one in range."""
    bound = "> 0" if name == "C" else ">= 0"
    if not math.isfinite(value) or (value <= 0 if name == "C" else value < 0):
        what = f"must be finite and {bound}" if not math.isfinite(value) else f"must be {bound}"
        hint = (f"; keep a learned {name} in range by a parametrisation, e.g. {name} = exp(θ) with "
                f"torch.nn.utils.parametrize.register_parametrization" if learned else "")
        raise ValueError(f"{name} {what}, got {value}{hint}")
    return value


def signed_active_set(r: Tensor, mask: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(A, s)``: ``A = (|r| > ε) & mask`` (bool) and ``s = sign(r)`` on ``A``, 0 elsewhere. ``(B, T)``."""
    active = (r.abs() > eps) & mask
    return active, torch.sign(r) * active


def excess(r: Tensor, sign: Tensor, eps: float) -> Tensor:
    """``e = r − s ε`` on the active set (``s ≠ 0``), 0 elsewhere."""
    return (r - sign * eps) * (sign != 0)


def loss(r: Tensor, mask: Tensor, eps: float) -> Tensor:
    """``Σ_t [|r_t| − ε]₊²`` over valid steps (last dimension)."""
    return ((r.abs() - eps).clamp_min(0).square() * mask).sum(-1)


def frames_dot(V: Tensor, x: Tensor) -> Tensor:
    """``(V x)_t = v_tᵀ x``: ``(B, T, p), (B, p) → (B, T)``, one pass over ``V``.

    Written as the row-vector product ``xᵀ Vᵀ`` ``(B, 1, p) @ (B, p, T)``: on CPU this batched
    GEMV is several times faster than ``V @ x`` ``(B, T, p) @ (B, p, 1)`` (measured 1.8 vs 7.8 ms
    at B=16, T=100, p=4096, float32, one thread).
    """
    return torch.bmm(x.unsqueeze(1), V.transpose(1, 2)).squeeze(1)


def frames_combine(V: Tensor, c: Tensor) -> Tensor:
    """``Vᵀ c = Σ_t c_t v_t``: ``(B, T, p), (B, T) → (B, p)``, one pass over ``V``."""
    return torch.bmm(c.unsqueeze(1), V).squeeze(1)


WIDE = torch.float64
_WIDE_CHUNK = 2**22  # elements of V cast to float64 at a time (32 MiB)


def frames_dot_wide(V: Tensor, x: Tensor) -> Tensor:
    """:func:`frames_dot` in float64 whatever the dtype of ``V`` (``x (B, p)`` float64): ``(B, T)``.

    In float32, ``v_tᵀw`` carries an error of ``ε ‖v_t‖ ‖w‖``; where ``w = H⁻¹g`` is large across
    the frames and small along them (T-space: ``T < p``, ``H`` is 1 off the frames' span) that
    error exceeds the value itself by the ratio of the two, up to ``C ‖V‖²``; it then sets
    the backward's accuracy (measured at 3 × 20 × 64, random walks ``Σ_τ 100 n_τ``, ``C = 10``,
    with the exact float64 ``w``: relative gradient error 0.77 with this product in float32,
    9e-8 in float64)."""
    if V.dtype == WIDE:
        return frames_dot(V, x)
    B, T, p = V.shape
    out = torch.empty(B, T, dtype=WIDE, device=V.device)
    step = max(1, _WIDE_CHUNK // max(1, B * p))
    for t in range(0, T, step):  # V cast at most _WIDE_CHUNK elements at a time
        out[:, t : t + step] = frames_dot(V[:, t : t + step].to(WIDE), x)
    return out


def rounding_floor(dtype: torch.dtype) -> tuple[float, float]:
    """``(tol, check_tol)`` floors for relative gradients measured by passes over ``V`` in ``dtype``.

    ``64 ε`` for the plain gradient test (``1.4e-14`` in float64, ``7.6e-6`` in float32), and
    ``√ε`` for the test of a reproduced signed set (``1.5e-8``; ``3.5e-4``). The second is loose
    on purpose: a reproduced set already makes the point the exact minimiser of its piece, and
    in float32 the data's own rounding (``VᵀV`` formed in float32) leaves a relative gradient of
    about ``ε ‖VᵀV‖ ‖u‖ / scale``, measured ``1.5e-5`` at 4 × 4000 × 512 on random-walk features.
    """
    eps = torch.finfo(dtype).eps
    return 64 * eps, eps**0.5


def exact_line_search(
    r: Tensor, dr: Tensor, ud: Tensor, dd: Tensor, mask: Tensor, C: float, eps: float
) -> Tensor:
    """``argmin_{α ≥ 0} φ(α)``, ``φ(α) = f(u + α d)``, exactly, for every sample; ``(B,)``.

    Along the line ``r(α) = r + α Δr`` (``Δr = −V d``) and ``‖u(α)‖² = ‖u‖² + 2α uᵀd + α² dᵀd``, so

        φ'(α) = uᵀd + α dᵀd + C Σ_{t active at α} Δr_t (r_t − s_t ε + α Δr_t)

    is piecewise linear and non-decreasing (φ is convex), with a breakpoint wherever some
    ``r_t(α)`` crosses ``±ε``. The breakpoints are sorted, and the sums
    ``a = Σ Δr_t (r_t − s_t ε)``, ``b = Σ Δr_t²`` over the active steps are updated across
    them by one cumulative sum, so ``φ' = uᵀd + C a + α (dᵀd + C b)`` on every piece; the
    root lies on the last piece whose start has ``φ' ≤ 0``. ``O(T log T)`` per sample.
    ``ud = uᵀd`` and ``dd = dᵀd`` come from the caller's space (in T-space, ``u = Vᵀβ`` and
    ``K d = −Δr``, so they need no product with ``K``). Returns 0 where ``φ'(0) ≥ 0``
    (no descent left).
    """
    with torch.no_grad():
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
        active, sign = signed_active_set(r, mask, eps)
        a0 = (torch.where(active, dr * (r - sign * eps), zero)).sum(-1)  # (B,)
        b0 = (torch.where(active, dr.square(), zero)).sum(-1)
        up = dr > 0
        # crossing +ε at α₊ = (ε − r)/Δr: entering (s = +1) when Δr > 0, leaving when Δr < 0;
        # crossing −ε at α₋ = (−ε − r)/Δr: leaving (s = −1) when Δr > 0, entering when Δr < 0.
        alpha_ev = torch.cat(((eps - r) / dr, (-eps - r) / dr), dim=-1)  # (B, 2T)
        enter = torch.cat((up, ~up), dim=-1)
        pm = torch.where(enter, 1.0, -1.0).to(r.dtype)
        da = pm * torch.cat((dr * (r - eps), dr * (r + eps)), dim=-1)
        db = pm * torch.cat((dr.square(), dr.square()), dim=-1)
        mask2 = torch.cat((mask, mask), dim=-1) & torch.isfinite(alpha_ev) & (torch.cat((dr, dr), -1) != 0)
        real = mask2 & ((alpha_ev > 0) | ((alpha_ev == 0) & enter))
        alpha_ev = torch.where(real, alpha_ev, inf)
        alpha_ev, order = alpha_ev.sort(dim=-1)
        real = torch.isfinite(alpha_ev)
        da = torch.where(real, torch.gather(da, -1, order), zero)
        db = torch.where(real, torch.gather(db, -1, order), zero)
        # piece k = 0..2T: [start_k, end_k] with sums a_k, b_k (piece 0 starts at α = 0)
        a = torch.cat((a0.unsqueeze(-1), a0.unsqueeze(-1) + torch.cumsum(da, -1)), dim=-1)  # (B, 2T+1)
        b = torch.cat((b0.unsqueeze(-1), b0.unsqueeze(-1) + torch.cumsum(db, -1)), dim=-1)
        start = torch.cat((torch.zeros_like(a0).unsqueeze(-1), torch.where(real, alpha_ev, zero)), dim=-1)
        exists = torch.cat((torch.ones_like(real[:, :1]), real), dim=-1)
        slope = dd.unsqueeze(-1) + C * b  # φ'' on each piece
        g_start = ud.unsqueeze(-1) + C * a + start * slope  # φ' at the start of each piece
        k = (exists & (g_start <= 0)).sum(-1, keepdim=True) - 1  # last piece starting with φ' ≤ 0
        k = k.clamp_min(0)
        s_k, g_k, c_k = (torch.gather(x, -1, k).squeeze(-1) for x in (start, g_start, slope))
        end_k = torch.gather(torch.cat((alpha_ev, inf.expand(r.shape[0], 1)), dim=-1), -1, k).squeeze(-1)
        alpha = s_k - g_k / torch.where(c_k > 0, c_k, inf)
        alpha = torch.minimum(torch.maximum(alpha, s_k), end_k)
        descent = g_start[:, 0] < 0
        return torch.where(descent & torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
