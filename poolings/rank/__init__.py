r"""Rank pooling (Fernando & Gould, ICML 2016): the pooled vector is the ranking machine
fitted to the frames of one sequence.

Per sequence with valid steps ``v_1 … v_T`` (its own ``T``; targets ``y_t = t``)::

    f(v, u) = ½‖u‖² + C/2 Σ_t [ |y_t − uᵀv_t| − ε ]₊²          u* = argmin_u f(v, u)

This is liblinear's L2-loss support-vector regression without bias (``-s 11``) with
liblinear's ``C`` equal to ``C/2`` here. The forward pass is exact, by one active-set
(semismooth Newton) iteration (:mod:`~poolings.rank.active_set`) run in one of three spaces:

==========  ======================================  =========================================
method      each step                                suits
==========  ======================================  =========================================
``tspace``  ``T × T`` Cholesky of ``I + C D K D``    ``T ≤ p``, moderate ``T``
``pspace``  ``p × p`` Cholesky of ``I + C V_AᵀV_A``  ``p < T``, moderate ``p``
``cg``      preconditioned CG on ``H``, matrix-free  ``T`` and ``p`` both large
==========  ======================================  =========================================

``RankPool(method="auto")`` (the default) picks one per call with the cost model of
:mod:`~poolings.rank.cost`. Modules:

- :mod:`~poolings.rank.common`: parameters, targets, signed sets, the exact line search;
- :mod:`~poolings.rank.active_set`: the iteration shared by the three methods;
- :mod:`~poolings.rank.tspace`, :mod:`~poolings.rank.pspace`, :mod:`~poolings.rank.newton_cg`;
- :mod:`~poolings.rank.small`: the same iteration on NumPy arrays for small T-space and p-space
  problems on the CPU, where launching tensor operations, not flops, is the cost;
- :mod:`~poolings.rank.objective`: the objective, its fast paths and the backward;
- :mod:`~poolings.rank.layer`: the :class:`RankPool` module.
"""

from .common import check_rank_param, check_rank_params, rank_targets, signed_active_set
from .cost import METHODS, choose_method, choose_method_for, method_costs
from .layer import RankPool
from .objective import RankPoolBackward, RankPoolObjective, RankPoolState, rank_pool_solve

__all__ = [
    "METHODS",
    "RankPool",
    "RankPoolBackward",
    "RankPoolObjective",
    "RankPoolState",
    "check_rank_param",
    "check_rank_params",
    "choose_method",
    "choose_method_for",
    "method_costs",
    "rank_pool_solve",
    "rank_targets",
    "signed_active_set",
]
