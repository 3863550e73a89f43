"""theseus reference: rank pooling as a nonlinear least-squares problem.

The rank-pool objective is a sum of squared residuals::

    f(v, u) = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊² = ½ (‖ρ_u‖² + ‖ρ_r‖²)
    ρ_u = u                                      (dim p)
    ρ_r,t = m_t √C [|r_t| − ε]₊,  r_t = t − uᵀv_t  (dim T; m_t = 0 on padded steps)
    J_r,t = −m_t √C 1[|r_t| > ε] sign(r_t) v_tᵀ    (analytic Jacobian, differentiable in V)

theseus 0.2.3 minimises it with Gauss–Newton and a dense Cholesky solve, in float64,
from ``u = 0``. Gauss–Newton on this piecewise-quadratic objective is the
semismooth Newton method: ``JᵀJ = I + C V_Aᵀ V_A`` *is* the Hessian, so once the
active set is right one step lands on the minimiser, and the run stops when a step no
longer changes the objective (relative change below ``rel_err_tolerance``).

``BackwardMode.IMPLICIT`` differentiates one extra Gauss–Newton step taken at the
solution with the Hessian detached: ``dL/dv = −∂/∂v [wᵀ Jᵀρ]`` with ``w = (JᵀJ)⁻¹ g``,
which is the implicit-function-theorem gradient exactly because ``Jᵀρ = ∇_u f`` and
``JᵀJ = ∇²_u f``. Away from the kinks ``|r_t| = ε`` it agrees with an exact implicit
gradient to rounding (about 1e-15 relative in float64).
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from argminlayers.errors import ConvergenceWarning

from . import _targets, check_rank_params, prepare_sequences, rank_pool_grad_u, relative_kkt_residual

_INSTALL_HINT = (
    "pip install --no-deps --no-build-isolation theseus-ai==0.2.3 torchlie torchkin "
    "semantic-version urdf_parser_py (see scripts/setup_env.sh)"
)


def _import_theseus():
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Couldn't import skparse.cholmod")
            import theseus as th
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the theseus reference needs theseus-ai 0.2.3: {_INSTALL_HINT}") from exc
    return th


@functools.lru_cache(maxsize=None)
def _cost_functions():
    """The two theseus cost functions (defined lazily: they subclass ``th.CostFunction``)."""
    th = _import_theseus()

    class RankResidual(th.CostFunction):
        """``ρ_t = m_t √C [|y_t − uᵀv_t| − ε]₊``, ``(B, T)``; aux variables ``V (B, T, p)``, ``y, mask (B, T)``."""

        def __init__(self, u, V, y, mask, C: float, eps: float, weight, name=None):
            super().__init__(weight, name=name)
            self.u, self.V, self.y, self.mask = u, V, y, mask
            self.C, self.eps = C, eps
            self.register_optim_vars(["u"])
            self.register_aux_vars(["V", "y", "mask"])

        def _residual(self) -> Tensor:
            return self.y.tensor - torch.einsum("btp,bp->bt", self.V.tensor, self.u.tensor)  # (B, T)

        def _error(self, r: Tensor) -> Tensor:
            return self.C**0.5 * torch.clamp(r.abs() - self.eps, min=0) * self.mask.tensor

        def error(self) -> Tensor:
            return self._error(self._residual())

        def jacobians(self):
            r = self._residual()
            active = ((r.abs() > self.eps) & (self.mask.tensor > 0)).to(r.dtype)
            J = -(self.C**0.5) * (torch.sign(r) * active).unsqueeze(-1) * self.V.tensor  # (B, T, p)
            return [J], self._error(r)

        def dim(self) -> int:
            return self.V.tensor.shape[1]

        def _copy_impl(self, new_name=None):
            return RankResidual(
                self.u.copy(), self.V.copy(), self.y.copy(), self.mask.copy(),
                self.C, self.eps, self.weight.copy(), name=new_name,
            )

    class NormResidual(th.CostFunction):
        """``ρ = u``, ``(B, p)``: the ½‖u‖² term."""

        def __init__(self, u, weight, name=None):
            super().__init__(weight, name=name)
            self.u = u
            self.register_optim_vars(["u"])

        def error(self) -> Tensor:
            return self.u.tensor

        def jacobians(self):
            U = self.u.tensor
            B, p = U.shape
            return [torch.eye(p, dtype=U.dtype, device=U.device).expand(B, p, p)], U

        def dim(self) -> int:
            return self.u.dof()

        def _copy_impl(self, new_name=None):
            return NormResidual(self.u.copy(), self.weight.copy(), name=new_name)

    return RankResidual, NormResidual


class TheseusRankPool(nn.Module):
    """Rank pooling through theseus (Gauss–Newton, implicit backward), computed in float64.

    Args:
        C, eps: the objective's hyperparameters (``C > 0``, ``eps ≥ 0``).
        max_iterations: Gauss–Newton iterations (one of them is the differentiated step).
        rel_err_tolerance: stop when a step changes the objective by less than this, relatively.
        abs_err_tolerance: stop when the objective or its change falls below this.

    A sample that has not converged raises a :class:`~argminlayers.errors.ConvergenceWarning`
    naming it; :attr:`last_info` holds theseus' ``OptimizerInfo`` of the last call.

    Example::

        >>> ref = TheseusRankPool(C=1.0, eps=0.1)
        >>> V = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
        >>> lengths = torch.tensor([8, 5])
        >>> U = ref(V, lengths)
        >>> U.shape
        torch.Size([2, 3])
        >>> bool(ref.kkt_residual(V, U, lengths).max() < 1e-12)
        True
    """

    def __init__(
        self,
        C: float = 1.0,
        eps: float = 0.1,
        *,
        max_iterations: int = 100,
        rel_err_tolerance: float = 1e-15,
        abs_err_tolerance: float = 1e-30,
    ):
        super().__init__()
        self.C, self.eps = check_rank_params(C, eps)
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 2:
            raise ValueError(f"max_iterations must be an int >= 2, got {max_iterations!r}")
        for name, value in (("rel_err_tolerance", rel_err_tolerance), ("abs_err_tolerance", abs_err_tolerance)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.max_iterations = max_iterations
        self.rel_err_tolerance = float(rel_err_tolerance)
        self.abs_err_tolerance = float(abs_err_tolerance)
        self.last_info = None

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``V: Tensor[B, T, p]``, ``lengths: Tensor[B]`` → ``Tensor[B, p]`` (V's device and dtype)."""
        th = _import_theseus()
        RankResidual, NormResidual = _cost_functions()
        V0, mask, _ = prepare_sequences(V, lengths)
        B, T, p = V0.shape
        dt, dev = torch.float64, V0.device
        Vd = V0.to(dt)  # (B, T, p), differentiable
        y = _targets(mask, dt)  # (B, T)
        m = mask.to(dt)  # (B, T)

        u = th.Vector(tensor=torch.zeros(B, p, dtype=dt, device=dev), name="u")
        aux_V = th.Variable(Vd.detach().clone(), name="V")
        aux_y = th.Variable(y, name="y")
        aux_m = th.Variable(m, name="mask")
        one = th.ScaleCostWeight(torch.ones(1, 1, dtype=dt, device=dev))
        objective = th.Objective(dtype=dt)
        objective.add(RankResidual(u, aux_V, aux_y, aux_m, self.C, self.eps, one, name="rank"))
        objective.add(NormResidual(u, one.copy(), name="norm"))
        optimizer = th.GaussNewton(
            objective,
            th.CholeskyDenseSolver,
            max_iterations=self.max_iterations,
            abs_err_tolerance=self.abs_err_tolerance,
            rel_err_tolerance=self.rel_err_tolerance,
        )
        layer = th.TheseusLayer(optimizer, vectorize=False)
        inputs = {"u": torch.zeros(B, p, dtype=dt, device=dev), "V": Vd, "y": y, "mask": m}
        with warnings.catch_warnings():
            # theseus 0.2.3 builds its status array with a numpy-1 idiom
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            solution, info = layer.forward(inputs, optimizer_kwargs={"backward_mode": th.BackwardMode.IMPLICIT})
        self.last_info = info
        U = solution["u"]  # (B, p) float64
        status = [str(s) for s in info.status]
        failed = [i for i, s in enumerate(status) if not s.endswith("CONVERGED")]
        if failed:
            kkt = self.kkt_residual(V0, U, mask.sum(dim=1))
            warnings.warn(
                f"TheseusRankPool: samples {failed[:8]} did not converge in max_iterations="
                f"{self.max_iterations} (status {status[failed[0]]}); their KKT residuals "
                f"‖∇_u f‖/‖u‖ are {[f'{kkt[i].item():.1e}' for i in failed[:8]]}",
                ConvergenceWarning,
                stacklevel=2,
            )
        return U.to(V.dtype)

    def kkt_residual(self, V: Tensor, U: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``(B,)`` float64 ``‖∇_u f(U)‖ / ‖U‖``: how far ``U`` is from the exact minimiser's condition."""
        return relative_kkt_residual(rank_pool_grad_u(V, U, lengths, self.C, self.eps), U)

    def extra_repr(self) -> str:
        return f"C={self.C}, eps={self.eps}, max_iterations={self.max_iterations}"
