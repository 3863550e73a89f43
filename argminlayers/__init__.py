"""argminlayers: differentiable argmin layers for PyTorch.

``ArgminLayer(f)`` solves ``u* = argmin_u f(v, u)`` in the forward pass, batched, and
back-propagates with the implicit function theorem, ``du*/dv = −H⁻¹ f_uv``, applying
``H⁻¹`` with a pluggable strategy (dense, diagonal, Sherman–Morrison, Woodbury, CG).
Constraints ``h(v, u) = 0`` and ``g(v, u) ≤ 0`` (``eq=``, ``ineq=``) make the backward a KKT
solve with the same strategies (:mod:`argminlayers.constraints`).
"""

from . import check
from .constraints import ConstraintSet, KKTLinearization, Multipliers
from .errors import (
    CapturedTensorError,
    ConvergenceError,
    ConvergenceWarning,
    DegeneracyWarning,
    DegenerateConstraintError,
    PrecisionWarning,
    SingularHessianError,
    StructureError,
)
from .hessian import AutogradHessian, DenseHessian, FunctionHessian, HessianOperator, LowRankHessian
from .interior_point import InteriorPoint
from .kkt import ConstraintJacobian, ProjectedCG
from .layer import ArgminLayer
from .objective import STATUS_TEXT, FunctionObjective, Linearization, Objective, Solution, SolverState, as_objective
from .problem import Problem
from .solvers import LBFGS, Newton, NewtonCG, Solver, available_solvers, get_solver, register_solver
from .strategies import (
    CG,
    Dense,
    Diagonal,
    ShermanMorrison,
    Strategy,
    Woodbury,
    available_strategies,
    get_strategy,
    register_strategy,
)
from .validation import lengths_to_mask, resolve_mask, step_positions, zero_padding

__version__ = "0.1.0"

__all__ = [
    "ArgminLayer",
    "Objective",
    "FunctionObjective",
    "Solution",
    "SolverState",
    "STATUS_TEXT",
    "Linearization",
    "Problem",
    "as_objective",
    "AutogradHessian",
    "HessianOperator",
    "DenseHessian",
    "FunctionHessian",
    "LowRankHessian",
    "Strategy",
    "Dense",
    "Diagonal",
    "ShermanMorrison",
    "Woodbury",
    "CG",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "Solver",
    "Newton",
    "NewtonCG",
    "LBFGS",
    "register_solver",
    "get_solver",
    "available_solvers",
    "ConvergenceWarning",
    "DegeneracyWarning",
    "PrecisionWarning",
    "DegenerateConstraintError",
    "ConstraintSet",
    "ConstraintJacobian",
    "KKTLinearization",
    "Multipliers",
    "InteriorPoint",
    "ProjectedCG",
    "CapturedTensorError",
    "ConvergenceError",
    "SingularHessianError",
    "StructureError",
    "resolve_mask",
    "lengths_to_mask",
    "zero_padding",
    "step_positions",
    "check",
]
