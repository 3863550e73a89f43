"""``RankPool``: the rank-pooling layer, ``(B, T, p)`` (+ lengths) → ``(B, p)``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from argminlayers import ArgminLayer, PrecisionWarning

from ..base import Pooling
from ..preprocess import l2_normalize, reverse_sequences, signed_sqrt, time_varying_mean
from .objective import ILL_CONDITIONED, RankPoolBackward, RankPoolObjective, _number


class RankPool(Pooling):
    """Rank pooling as a differentiable layer: ``(B, T, p)`` (+ lengths) → ``(B, p)``, or ``(B, 2p)``
    when bidirectional.

    Args:
        C: regularisation ``> 0`` of ``f(v, u) = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²``
            (liblinear's ``-c`` is ``C/2``). A number or a 0-d tensor; an
            ``nn.Parameter`` is learned with the rest of the model (exact gradients).
        eps: insensitive zone ``ε ≥ 0``; a number or a 0-d tensor, as ``C``.
        method: the exact forward: ``"auto"`` (default: chosen per call from ``(B, T, p)``, dtype,
            device and the frames' load ``C · mean ‖v_t‖²`` by
            :func:`~poolings.rank.cost.choose_method_for`), ``"tspace"`` (``T × T``
            Cholesky), ``"pspace"`` (``p × p`` Cholesky) or ``"cg"`` (matrix-free Newton-CG).
            ``last_method`` says which one the last call ran.
        backward: ``"auto"`` (default: exact; Woodbury with the forward's factor, or
            preconditioned CG after ``method="cg"``; see
            :class:`~poolings.rank.objective.RankPoolBackward`), ``"woodbury"`` (exact),
            ``"diagonal"`` (the paper's approximation), ``"sherman_morrison"`` (exact, rank-one
            updates), ``"cg"``, ``"dense"`` (``O(p³)``), or a strategy object.
        smoothing: time-varying mean ``m_t = (1/t) Σ_{τ≤t} v_τ`` before pooling.
        signed_sqrt: ``sign(x) sqrt|x|`` before pooling.
        normalize: L2-normalise every frame before pooling.
        bidirectional: also pool each sequence reversed and concatenate, ``[u_fwd, u_rev]``.
        solver: ``None`` (the exact active-set solve of ``method``) or a generic solver of
            :class:`~argminlayers.ArgminLayer` (``"newton"``, ``"lbfgs"``, ``"newton_cg"``).
        layer_options: ``on_nonconvergence``, ``damping``, and ``tol``/``max_iter`` (of the
            active-set solve when ``solver`` is ``None``, else of the named solver).

    Preprocessing runs in VideoDarwin's order: smoothing → signed sqrt → L2 normalisation;
    the reversed sequence of the bidirectional variant goes through the same chain.

    Example::

        >>> import torch
        >>> from poolings import RankPool
        >>> pool = RankPool(C=1.0, eps=0.1, bidirectional=True)
        >>> V = torch.randn(3, 8, 5, requires_grad=True)
        >>> U = pool(V, torch.tensor([8, 5, 2]))
        >>> U.shape
        torch.Size([3, 10])
        >>> U.sum().backward()
        >>> bool(V.grad[2, 2:].abs().sum() == 0)          # padded steps: zero gradient
        True
        >>> pool.last_method in {"tspace", "pspace", "cg"}   # what "auto" ran for (6, 8, 5)
        True
    """

    def __init__(
        self,
        C: float = 1.0,
        eps: float = 0.1,
        *,
        method: str = "auto",
        backward: Any = "auto",
        smoothing: bool = False,
        signed_sqrt: bool = False,
        normalize: bool = False,
        bidirectional: bool = False,
        solver: Any = None,
        **layer_options: Any,
    ):
        super().__init__()
        objective_options = {}
        if solver is None:  # tol / max_iter configure the active-set solve itself
            objective_options = {k: layer_options.pop(k) for k in ("tol", "max_iter") if k in layer_options}
            objective_options = {k: v for k, v in objective_options.items() if v is not None}
        objective = RankPoolObjective(C, eps, method=method, **objective_options)
        if isinstance(backward, str) and backward == "auto":
            backward = RankPoolBackward()
        self.layer = ArgminLayer(objective, backward=backward, solver=solver, **layer_options)
        self.smoothing, self.signed_sqrt = bool(smoothing), bool(signed_sqrt)
        self.normalize, self.bidirectional = bool(normalize), bool(bidirectional)

    @property
    def objective(self) -> RankPoolObjective:
        """The layer's objective (registered once, under ``layer.objective``: a learned ``C``
        is ``layer.objective.C`` in ``state_dict``)."""
        return self.layer.objective

    @property
    def C(self) -> float | Tensor:
        return self.objective.C

    @property
    def eps(self) -> float | Tensor:
        return self.objective.eps

    @property
    def method(self) -> str:
        return self.objective.method

    @property
    def last_method(self) -> str | None:
        """The method the last forward ran (``None`` before the first, or with a generic ``solver``)."""
        return self.objective.last_method if self.layer.solver is None else None

    def extra_repr(self) -> str:
        return (
            f"C={_number(self.C):g}, eps={_number(self.eps):g}, method={self.method!r}, smoothing={self.smoothing}, "
            f"signed_sqrt={self.signed_sqrt}, normalize={self.normalize}, bidirectional={self.bidirectional}"
        )

    def output_dim(self, p: int) -> int:
        return 2 * p if self.bidirectional else p

    def preprocess(self, V: Tensor, mask: Tensor) -> Tensor:
        """The enabled preprocessing, in VideoDarwin's order; ``(B, T, p)``, padded steps zero."""
        if self.smoothing:
            V = time_varying_mean(V, mask)
        if self.signed_sqrt:
            V = signed_sqrt(V)
        if self.normalize:
            V = l2_normalize(V, mask)
        return V

    def forward(self, V: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``V: (B, T, p)``, ``lengths: (B,)`` integers or a ``(B, T)`` bool mask → ``(B, output_dim(p))``."""
        if not (self.smoothing or self.signed_sqrt or self.normalize or self.bidirectional):
            if self.layer.solver is not None and isinstance(V, Tensor):
                self._warn_precision(V)
            return self.layer(V, lengths)  # the layer validates V and the lengths/mask once
        return super().forward(V, lengths)

    def _warn_precision(self, V: Tensor) -> None:
        """A generic ``solver`` runs in the dtype of ``V``, without the active-set solve's float64
        redo of samples too ill-conditioned for it (:data:`~poolings.rank.objective.ILL_CONDITIONED`):
        warn where ``ε C Σ_t ‖v_t‖²`` (padded steps included: an upper bound) exceeds that bound.
        Measured at 3 × 20 × 64, frames of norm 100, ``C = 10``, float32 ``solver="newton"``: ``u``
        3e-2 and the gradient 1.8 off, without a word."""
        if not V.is_floating_point() or V.dtype == torch.float64 or V.dim() != 3:
            return
        eps = torch.finfo(torch.float32 if V.dtype in (torch.float16, torch.bfloat16) else V.dtype).eps
        with torch.no_grad():
            load = float(V.detach().square().sum((1, 2)).amax()) * self.objective.values()[0]
        if eps * load > ILL_CONDITIONED:
            warnings.warn(PrecisionWarning(
                f"RankPool(solver={self.layer.solver!r}) runs in {V.dtype}, and these frames are too ill-conditioned "
                f"for it (ε·C·Σ‖v_t‖² up to {eps * load:.2g} > {ILL_CONDITIONED:g}): u and its gradient may have no "
                "correct digit. Use solver=None (the exact solve, which redoes such samples in float64), float64 "
                "frames, normalize=True, or a smaller C"), stacklevel=3)

    def pool(self, V: Tensor, mask: Tensor) -> Tensor:
        # V is validated and its padded steps are zero (Pooling.forward); preprocessing keeps them zero
        if self.bidirectional:
            V = torch.cat((V, reverse_sequences(V, mask)), dim=0)  # (2B, T, p)
            mask = torch.cat((mask, mask), dim=0)
        V = self.preprocess(V, mask)
        if self.layer.solver is not None:
            self._warn_precision(V)
        U = self.layer.forward_masked(V, mask)
        if self.bidirectional:
            U = torch.cat(U.chunk(2, dim=0), dim=1)  # (B, 2p)
        return U
