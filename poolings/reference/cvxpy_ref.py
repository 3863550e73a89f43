"""cvxpylayers references: rank pooling and average pooling as disciplined-parametrised programs.

cvxpylayers 1.2.0 canonicalises the problem to a cone program, solves it with diffcp
(SCS or Clarabel) and differentiates the cone program's optimality conditions. Two
settings decide whether it is a reference at all:

- **Tolerances.** The defaults (SCS, ``eps_abs = eps_rel = 1e-4``, iterative ``lsqr``
  derivative) are far off on rank pooling. Here SCS runs with
  ``eps_abs = eps_rel = 1e-9``, ``max_iters = 100000`` and the ``dense`` derivative,
  and Clarabel (the interior-point alternative) with gap and feasibility tolerances
  of ``1e-12``.
- **Target scale.** The objective is homogeneous in ``(y, ε)``: with ``k > 0``,
  ``f_k(u') = ½‖u'‖² + C/2 Σ_t [|t/k − u'ᵀv_t| − ε/k]₊² = f(k u')/k²``, so
  ``u* = k · argmin f_k`` exactly. Solving with ``k = T_i`` keeps the cone program's
  magnitudes O(1); without it SCS stalls far from the optimum at ``T ≳ 50``.

Measured in float64 against an exact solve (docs/crosscheck.md has the tables):
SCS reaches ``u`` and ``dL/dV`` to about 1e-9, Clarabel to 1e-5…1e-7 for ``u``; its
gradient can be off by percents when ``p > T`` (an interior point is not strictly
complementary, which the cone-program derivative assumes). SCS is therefore the default.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import avg_pool_grad_u, check_rank_param, prepare_sequences, rank_pool_grad_u, relative_kkt_residual

_INSTALL_HINT = "pip install 'cvxpylayers==1.2.0' cvxpy diffcp clarabel scs (or `pip install -e .[cvxpylayers]`)"

# Per solve method: solver options (passed through diffcp to the solver) and the
# derivative mode. "dense" factorises the derivative system exactly; diffcp's default
# "lsqr" is iterative and adds its own error.
SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "SCS": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000, "mode": "dense"},
    "Clarabel": {
        "tol_gap_abs": 1e-12,
        "tol_gap_rel": 1e-12,
        "tol_feas": 1e-12,
        "tol_ktratio": 1e-10,
        "max_iter": 500,
        "mode": "dense",
    },
}


def _import_cvxpy():
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the cvxpylayers reference needs cvxpylayers 1.2.0 and cvxpy: {_INSTALL_HINT}") from exc
    return cp, CvxpyLayer


def resolve_solver_args(solve_method: str, solver_args: dict[str, Any] | None) -> dict[str, Any]:
    """Merge user ``solver_args`` over the accurate defaults of ``solve_method`` ("SCS" or "Clarabel")."""
    methods = {m.lower(): m for m in SOLVER_DEFAULTS}
    if not isinstance(solve_method, str) or solve_method.lower() not in methods:
        raise ValueError(f"solve_method must be one of {sorted(SOLVER_DEFAULTS)}, got {solve_method!r}")
    method = methods[solve_method.lower()]
    if not isinstance(solver_args, (dict, type(None))):
        raise TypeError(f"solver_args must be a dict or None, got {type(solver_args).__name__}")
    extra = dict(solver_args or {})
    for key in ("solver", "solve_method"):
        if key in extra:
            raise ValueError(
                f"solver_args must not contain {key!r}: choose the solver with solve_method= "
                f"(cvxpylayers/diffcp take the solver as 'solve_method'; a 'solver' key raises inside diffcp)"
            )
    return {**SOLVER_DEFAULTS[method], **extra, "solve_method": method}


class _CvxpyPool(nn.Module):
    """Shared shell: one cached ``CvxpyLayer`` per ``(T_i, p)``, the batch grouped by length.

    Subclasses define :meth:`_problem` (the DPP program for one length) and
    :meth:`_target_scale`. Building a layer takes seconds at realistic sizes; the time
    spent building is accumulated in :attr:`build_seconds` and :meth:`prepare` builds
    ahead of a timed call.
    """

    def __init__(self, *, solve_method: str = "SCS", solver_args: dict[str, Any] | None = None):
        super().__init__()
        self.solver_args = resolve_solver_args(solve_method, solver_args)
        self._layers: dict[tuple[int, int], Any] = {}
        self.build_seconds = 0.0

    @property
    def solve_method(self) -> str:
        return self.solver_args["solve_method"]

    def _problem(self, T: int, p: int):  # pragma: no cover - abstract
        """Return ``(problem, V_param (T, p), u_var (p,))``; ``V_param`` may also be a list
        ``[V_param, *others]`` whose other parameters take the values of :meth:`_values`."""
        raise NotImplementedError

    def _values(self, T: int) -> tuple[Tensor, ...]:
        """Values of the program's parameters other than ``V`` for length ``T`` (differentiable)."""
        return ()

    def _target_scale(self, T: int) -> float:
        return 1.0

    def _layer(self, T: int, p: int):
        key = (T, p)
        if key not in self._layers:
            _, CvxpyLayer = _import_cvxpy()
            start = time.perf_counter()
            problem, params, u_var = self._problem(T, p)
            if not problem.is_dpp():  # pragma: no cover - the formulations are DPP
                raise RuntimeError("internal error: the reference problem is not DPP")
            params = list(params) if isinstance(params, (list, tuple)) else [params]
            self._layers[key] = CvxpyLayer(problem, parameters=params, variables=[u_var])
            self.build_seconds += time.perf_counter() - start
        return self._layers[key]

    def prepare(self, lengths: Tensor | list[int], p: int) -> float:
        """Build (and cache) the layers for these sequence lengths; returns the seconds spent now."""
        before = self.build_seconds
        for T in sorted({int(n) for n in torch.as_tensor(lengths).flatten().tolist()}):
            if T < 1:
                raise ValueError(f"lengths must be >= 1, got {T}")
            self._layer(T, int(p))
        return self.build_seconds - before

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``V: Tensor[B, T, p]``, ``lengths: Tensor[B]`` → ``Tensor[B, p]`` (V's device and dtype)."""
        V0, _, n = prepare_sequences(V, lengths)
        p = V0.shape[2]
        Vc = V0.to(device="cpu", dtype=torch.float64)  # (B, T, p); cvxpylayers solves on the CPU
        needs_grad = torch.is_grad_enabled() and (
            V.requires_grad or any(x.requires_grad for x in self._values(1)))
        args = dict(self.solver_args)
        if not needs_grad:
            args.pop("mode", None)  # a derivative option; diffcp passes it to the solver otherwise
        n_cpu = n.cpu()
        pieces, order = [], []
        for T in sorted(set(n_cpu.tolist())):
            idx = (n_cpu == T).nonzero().flatten()  # samples of this length
            k = self._target_scale(T)
            layer = self._layer(T, p)
            extra = [x.to(device="cpu", dtype=torch.float64).reshape(()) for x in self._values(T)]
            with warnings.catch_warnings():
                # cvxpylayers 1.2.0 converts tensors with a numpy-1 idiom
                warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
                (u,) = layer(Vc[idx, :T], *extra, solver_args=args)  # (b, p)
            pieces.append(u.reshape(len(idx), p) * k)
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        U = torch.cat(pieces)[inverse]  # (B, p) float64, CPU
        return U.to(device=V.device, dtype=V.dtype)


class CvxpyPooling(_CvxpyPool):
    """Any pooling written as a cvxpy program, as a differentiable reference.

    Args:
        program: ``program(T, p) -> (problem, V, u)``: a DPP ``cvxpy.Problem`` for one
            sequence of ``T`` steps, its ``(T, p)`` parameter ``V`` and its variable ``u``.
        solve_method, solver_args: as for :class:`CvxpyRankPool` (tight SCS by default).

    Example (pseudo-Huber pooling, ``Σ_t √(1 + ‖u − v_t‖²)``)::

        >>> import cvxpy as cp, torch
        >>> def program(T, p):
        ...     V, u = cp.Parameter((T, p)), cp.Variable(p)
        ...     cost = sum(cp.norm(cp.hstack([1.0, u - V[t]])) for t in range(T))
        ...     return cp.Problem(cp.Minimize(cost)), V, u
        >>> CvxpyPooling(program)(torch.ones(1, 3, 2, dtype=torch.float64)).round(decimals=6)
        tensor([[1., 1.]], dtype=torch.float64)
    """

    def __init__(self, program, *, solve_method: str = "SCS", solver_args: dict[str, Any] | None = None):
        if not callable(program):
            raise TypeError(f"program must be a callable (T, p) -> (problem, V, u), got {type(program).__name__}")
        super().__init__(solve_method=solve_method, solver_args=solver_args)
        self.program = program

    def _problem(self, T: int, p: int):
        out = self.program(T, p)
        if not (isinstance(out, tuple) and len(out) == 3):
            raise TypeError("program(T, p) must return (problem, V_parameter, u_variable)")
        return out

    def extra_repr(self) -> str:
        return f"program={getattr(self.program, '__name__', self.program)!r}, solve_method={self.solve_method!r}"


class CvxpyRankPool(_CvxpyPool):
    """Rank pooling through cvxpylayers: ``u* = argmin_u ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²``.

    DPP program for one sequence of length ``T`` (parameter ``V`` ``(T, p)``, variables
    ``u`` ``(p,)`` and slacks ``s`` ``(T,)``, targets scaled by ``k = T``, see the module
    docstring)::

        minimise ½ ‖u‖² + C/2 ‖s‖²   s.t.  s ≥ y/k − V u − ε/k,   s ≥ V u − y/k − ε/k

    ``s ≥ 0`` is not needed: where ``|r_t| < ε`` the smallest feasible ``s_t²`` is at
    ``s_t = 0``, so at the optimum ``s_t = [|r_t| − ε]₊``.

    With ``C`` or ``eps`` given as tensors, both become ``cp.Parameter`` objects of the program
    (``C`` multiplies ``‖s‖²``, ``ε/k`` enters the constraints; still DPP), and cvxpylayers
    differentiates with respect to them too: the reference for learned ``C`` and ``ε``.

    Args:
        C, eps: the objective's hyperparameters (``C > 0``, ``eps ≥ 0``): numbers, or
            0-d tensors that get gradients.
        solve_method: "SCS" (default, the accurate one here) or "Clarabel".
        solver_args: options merged over the accurate defaults in ``SOLVER_DEFAULTS``
            (solver options plus diffcp's derivative ``mode``).

    Example::

        >>> ref = CvxpyRankPool(C=1.0, eps=0.1)
        >>> V = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
        >>> lengths = torch.tensor([8, 5])
        >>> U = ref(V, lengths)
        >>> U.shape
        torch.Size([2, 3])
        >>> U.sum().backward()
        >>> bool((V.grad[1, 5:] == 0).all())          # padded steps
        True
        >>> bool(ref.kkt_residual(V, U, lengths).max() < 1e-6)  # its own accuracy
        True
    """

    def __init__(
        self,
        C: float = 1.0,
        eps: float = 0.1,
        *,
        solve_method: str = "SCS",
        solver_args: dict[str, Any] | None = None,
    ):
        super().__init__(solve_method=solve_method, solver_args=solver_args)
        self.C, self.eps = check_rank_param("C", C), check_rank_param("eps", eps)
        self.parametric = isinstance(self.C, Tensor) or isinstance(self.eps, Tensor)

    def _target_scale(self, T: int) -> float:
        return float(T)

    def _values(self, T: int) -> tuple[Tensor, ...]:
        if not self.parametric:
            return ()
        C, eps = (torch.as_tensor(x, dtype=torch.float64) for x in (self.C, self.eps))
        return C, eps / self._target_scale(T)

    def _problem(self, T: int, p: int):
        cp, _ = _import_cvxpy()
        k = self._target_scale(T)
        V = cp.Parameter((T, p))
        u = cp.Variable(p)
        s = cp.Variable(T)
        y = np.arange(1, T + 1, dtype=np.float64) / k
        if self.parametric:
            C, e = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
            params = [V, C, e]
        else:
            C, e, params = float(self.C), float(self.eps) / k, V
        objective = cp.Minimize(0.5 * cp.sum_squares(u) + (C / 2) * cp.sum_squares(s))
        return cp.Problem(objective, [s >= y - V @ u - e, s >= V @ u - y - e]), params, u

    def kkt_residual(self, V: Tensor, U: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B,)`` float64 ``‖∇_u f(U)‖ / ‖U‖``: how far ``U`` is from the exact minimiser's condition."""
        return relative_kkt_residual(rank_pool_grad_u(V, U, lengths, float(self.C), float(self.eps)), U)

    def extra_repr(self) -> str:
        return f"C={float(self.C)}, eps={float(self.eps)}, solve_method={self.solve_method!r}"


class CvxpyAvgPool(_CvxpyPool):
    """Average pooling as an argmin through cvxpylayers: ``u* = argmin_u ½ Σ_t ‖u − v_t‖²`` (the mean).

    DPP program for one sequence of length ``T``: parameter ``V`` ``(T, p)``, variable
    ``u`` ``(p,)``, the objective expanded without its constant ``½ Σ_t ‖v_t‖²``::

        minimise T/2 ‖u‖² − (1ᵀV) u

    (The literal ``½ ‖V − 1uᵀ‖_F²`` canonicalises to a ``T·p``-dimensional cone on which
    SCS stalls at ``T = 50, p = 64``.) Same arguments as :class:`CvxpyRankPool` without
    ``C`` and ``eps``.
    """

    def _problem(self, T: int, p: int):
        cp, _ = _import_cvxpy()
        V = cp.Parameter((T, p))
        u = cp.Variable(p)
        ones = np.ones(T)
        objective = cp.Minimize((T / 2) * cp.sum_squares(u) - (ones @ V) @ u)
        return cp.Problem(objective), V, u

    def kkt_residual(self, V: Tensor, U: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B,)`` float64 ``‖∇_u f(U)‖ / (T_i ‖U‖) = ‖U − mean‖ / ‖U‖``."""
        _, _, n = prepare_sequences(V, lengths)
        return relative_kkt_residual(avg_pool_grad_u(V, U, lengths), U, scale=n)

    def extra_repr(self) -> str:
        return f"solve_method={self.solve_method!r}"
