"""Objectives ``f(v, u, θ)``: the inner problem of an argmin layer.

The simplest objective is a plain per-sample function in torch ops::

    def robust_pool(v, u, mask):             # v: (T, p), u: (q,), mask: (T,) bool
        r = torch.sqrt(1 + ((u - v) ** 2).sum(-1))
        return (r * mask).sum()

Keyword inputs of the layer reach it by name, one sample at a time
(``layer(V, w=W)`` calls ``f(v, u, mask, w=w_b)``), and an :class:`Objective` is an
:class:`torch.nn.Module` whose parameters and buffers belong to the layer. Every one of
them gets gradients.

**Derivatives.** A per-sample objective separates across the batch, so with
``F(U) = Σ_b f(v_b, u_b)`` (one :func:`torch.func.vmap` forward pass, or the function itself
for ``B = 1``) plain autograd gives every derivative the layer needs:

- the batched gradient ``∇_U F``, one reverse pass;
- Hessian–vector products ``∇_U (∇_U F · x)``: ``∇_U F`` is recorded once with
  ``create_graph`` at a point and replayed for every product;
- the dense Hessian as ``q`` such products, batched into one pass (``is_grads_batched``);
- the mixed product ``∂/∂θ [W · ∇_U F]`` over ``V``, inputs and parameters together,
  one more reverse pass through the same record.

No torch.func derivative transform (``grad``, ``jvp``, ``hessian``) runs: they cost a
per-call trace, and their first call imports ``torch._dynamo`` (seconds).

An objective can instead be a subclass of :class:`Objective` that overrides batched
methods with fast paths: its own ``solve``, an ``init``, a structured ``hessian`` (e.g.
:class:`~argminlayers.hessian.LowRankHessian`), a ``hessian_diag``, closed-form ``grad``,
``vjp_v`` (the mixed product over ``V``) or ``vjp`` (over any input or parameter). Every
batched method takes ``V: (B, T, …)`` (padded steps zero), ``U: (B, *q_shape)``, ``mask: (B, T)``
bool and the keyword inputs ``(B, …)``.
"""

from __future__ import annotations

import builtins
import dis
import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch._C import _functorch
from torch.func import vmap

from .hessian import AutogradHessian, FunctionHessian, HessianOperator
from .linalg import vjp

# ----------------------------------------------------------------------- solution and status
#: Why a sample's solve ended (``Solution.status``).
CONVERGED = 0
MAX_ITER = 1  # the iteration budget ran out
NO_DESCENT = 2  # the line search found no decrease
NONFINITE = 3  # the objective or its gradient is NaN/Inf at the iterate
NOT_MINIMUM = 4  # ∇f ≈ 0 but the Hessian is not positive definite (saddle, plateau, flat direction)
NOT_STATIONARY = 5  # an objective's own solve returned a point where ∇f is not small
INFEASIBLE = 6  # constraints could not be met

STATUS_TEXT = {
    CONVERGED: "converged",
    MAX_ITER: "the iteration budget ran out",
    NO_DESCENT: "the line search found no decrease",
    NONFINITE: "the objective or its gradient is NaN or infinite there",
    NOT_MINIMUM: "∇f ≈ 0 but the Hessian is not positive definite (a saddle or a flat region, not a minimum)",
    NOT_STATIONARY: "the objective's own solve returned a point where ∇f is not small",
    INFEASIBLE: "the constraints could not be met",
}


@dataclass
class Solution:
    """What a forward solve returns.

    Attributes:
        u: ``(B, *q_shape)`` the minimisers.
        converged: ``(B,)`` bool, or ``None`` for a closed form (the layer then checks
            stationarity itself).
        iterations: ``(B,)`` iterations used, or ``None``.
        grad_norm: ``(B,)`` ``‖∇_u f‖`` at ``u``, or ``None``.
        state: anything the objective or solver wants back in ``hessian``/``vjp``
            (a factorisation, an active set).
        status: ``(B,)`` integer codes of :data:`STATUS_TEXT` (why each sample stopped), or ``None``.
        multipliers: Lagrange multipliers of constrained problems, or ``None``.
    """

    u: Tensor
    converged: Tensor | None = None
    iterations: Tensor | None = None
    grad_norm: Tensor | None = None
    state: Any = None
    status: Tensor | None = None
    multipliers: Any = None


@dataclass
class SolverState:
    """What a generic solver leaves in :attr:`Solution.state`: its last linearization, at the
    returned point, with the Hessian operator it built there (e.g. a dense matrix with its
    Cholesky factor). The backward pass reuses both instead of building them again: when the
    layer's inputs require grad, that record already holds the graph back to them."""

    hessian: HessianOperator | None = None
    linearization: "Linearization | None" = None


def vmap_call(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``torch.func.vmap(fn)(*args)`` over dimension 0 of every argument (one output tensor).

    The same batching rules, in one vmap level opened directly: ``vmap``'s generic wrapper
    flattens and checks its arguments on every call, about 0.1 ms, as long as a whole small
    solve step. Anything but tensor arguments and one tensor output goes through ``vmap``
    itself, with its own errors."""
    if not all(isinstance(a, Tensor) and a.dim() > 0 for a in args):
        return vmap(fn)(*args)
    B = args[0].shape[0]
    if any(a.shape[0] != B for a in args):
        return vmap(fn)(*args)
    _vmap_level_ready()
    level = _functorch._vmap_increment_nesting(B, "error")
    try:
        out = fn(*[_functorch._add_batch_dim(a, 0, level) for a in args])
        if not isinstance(out, Tensor):
            raise _NotOneTensor
        return _functorch._remove_batch_dim(out, level, B, 0)
    except _NotOneTensor:
        pass
    finally:
        _functorch._vmap_decrement_nesting()
    return vmap(fn)(*args)  # raises vmap's own error for the output


class _NotOneTensor(Exception):
    pass


@functools.cache
def _vmap_level_ready() -> None:
    """What ``vmap`` does once before its first call: register its decompositions."""
    from torch._functorch.vmap import lazy_load_decompositions

    lazy_load_decompositions()


# ------------------------------------------------------------------------------ objectives
class Objective(nn.Module):
    """Base class of objectives: an :class:`~torch.nn.Module` whose parameters and buffers
    are the layer's own (they appear in ``layer.parameters()`` and ``state_dict``, move with
    ``.to()`` and get gradients). Override :meth:`f` (per sample) or the batched methods.

    Class attributes:
        low_rank_hessian: ``True`` when :meth:`hessian` returns a
            :class:`~argminlayers.hessian.LowRankHessian`, which the ``sherman_morrison``
            and ``woodbury`` strategies need.
        uses_mask: whether :meth:`f` takes a mask (a function of ``(v, u)`` alone cannot
            ignore padded steps).
        sequence: whether ``V`` must be ``(B, T, p)`` (checked, with a clear error).
        scan_f: whether :meth:`captured_tensors` looks for tensors that require grad in what
            :meth:`f` reaches through closures and globals (default ``True``). An objective whose
            ``f`` reads only its own attributes may set ``False`` to spare that walk on every call;
            a subclass that defines its own ``f`` is walked again unless it sets ``False`` itself.

    Optional fast path ``solve(V, mask, **inputs) -> Tensor | Solution``: when a subclass
    defines it, the layer uses it instead of a generic solver (unless a solver is named),
    and checks that the point it returns is stationary.

    Subclasses need not call ``super().__init__()`` before setting plain attributes: the
    module is initialised before their ``__init__`` runs.
    """

    low_rank_hessian: bool = False
    uses_mask: bool = True
    sequence: bool = False
    scan_f: bool = True
    solve: Callable[..., Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "f" in cls.__dict__ and "scan_f" not in cls.__dict__:
            cls.scan_f = True  # a new f is walked unless its own class promises otherwise
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_initialises_module", False):
            return

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            if "_parameters" not in self.__dict__:
                nn.Module.__init__(self)
            init(self, *args, **kw)

        __init__._initialises_module = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[misc]

    def __init__(self) -> None:
        if "_parameters" not in self.__dict__:  # idempotent: a subclass may call it late
            super().__init__()

    # ---- the per-sample definition -------------------------------------------------
    def f(self, v: Tensor, u: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """The objective for one sample: ``v: (T, …)``, ``u: q_shape``, ``mask: (T,)`` → scalar."""
        raise NotImplementedError(
            f"{type(self).__name__} must define f(v, u, mask) or override the batched methods it uses"
        )

    def forward(self, v: Tensor, u: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """Calling the objective evaluates :meth:`f` for one sample."""
        return self.f(v, u, mask, **inputs)

    def _raw_f(self, v: Tensor, u: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        return self.f(v, u, mask, **inputs)

    def _call_f(self, v: Tensor, u: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        out = self._raw_f(v, u, mask, inputs)
        if not isinstance(out, Tensor) or out.numel() != 1:
            got = type(out).__name__ if not isinstance(out, Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise TypeError(f"objective {self.describe()} must return one value per sample, a one-element tensor "
                            f"computed from u, got {got}")
        return out.reshape(()) if out.dim() else out

    # ---- batched methods -----------------------------------------------------------------
    def init(self, V: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """Starting point ``(B, *q_shape)``; its shape sets ``q``. Default: zeros shaped like one
        step of ``V`` (``V.shape[2:]``), or like one sample for ``V: (B, n)``."""
        shape = V.shape[2:] if V.dim() >= 3 else V.shape[1:]
        return V.new_zeros(V.shape[0], *shape)

    def value(self, V: Tensor, U: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """``f`` for every sample, ``(B,)``: ``vmap`` of :meth:`f` (no transform when ``B = 1``)."""
        if V.shape[0] == 1:  # one sample: the function itself, without vmap's per-call cost
            one = {k: x[0] for k, x in inputs.items()}
            return self._call_f(V[0], U[0], mask[0], one).reshape(1)
        names = tuple(inputs)

        def one(v, u, m, *xs):
            return self._call_f(v, u, m, dict(zip(names, xs)))

        return vmap_call(one, V, U, mask, *inputs.values())

    def grad(self, V: Tensor, U: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        """``∇_u f``, ``(B, *q_shape)``: one reverse pass through ``Σ_b f_b``."""
        with torch.enable_grad():
            Ur = U.detach().requires_grad_(True)
            F = self.value(V, Ur, mask, **inputs).sum()
            if not F.requires_grad:  # f does not depend on u
                return torch.zeros_like(U)
            (G,) = torch.autograd.grad(F, Ur, allow_unused=True)
        return torch.zeros_like(U) if G is None else G

    def hvp(self, V: Tensor, U: Tensor, mask: Tensor, X: Tensor, **inputs: Tensor) -> Tensor:
        """``∇²_uu f · x`` for every sample, ``(B, *q_shape)``. Override with a closed form; the
        default replays one recorded reverse pass."""
        B = U.shape[0]
        return Linearization(self, V, U, mask, inputs).hessian.matvec(X.reshape(B, -1)).reshape(U.shape)

    def hessian(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None, **inputs: Tensor) -> HessianOperator:
        """The Hessian ``∇²_uu f`` at ``U`` as an operator on flattened ``(B, q)`` vectors
        (matrix-free by default: products replay one recorded gradient)."""
        return Linearization(self, V, U, mask, inputs, state).hessian

    def hessian_diag(self, V: Tensor, U: Tensor, mask: Tensor, state: Any = None, **inputs: Tensor) -> Tensor:
        """``diag(∇²_uu f)``, ``(B, q)``. Override when it is cheaper than the dense Hessian."""
        return self.hessian(V, U, mask, state, **inputs).dense().diagonal(dim1=-2, dim2=-1)

    def vjp_v(self, V: Tensor, U: Tensor, mask: Tensor, W: Tensor, state: Any = None, **inputs: Tensor) -> Tensor:
        """``∂/∂V [Σ_b W_bᵀ ∇_u f(V_b, U_b)]``, ``(B, T, …)``: the mixed product over ``V`` alone.

        The input gradient of the layer is minus this, at ``W = H⁻¹ g``. ``f_uv`` is never built.
        Override with a closed form; the default is one reverse pass.
        """
        with torch.enable_grad():
            Vr = V.detach().requires_grad_(True)
            out = Linearization(self, Vr, U, mask, inputs, state).vjp(W, {"V": Vr})["V"]
        return out

    def vjp(
        self,
        V: Tensor,
        U: Tensor,
        mask: Tensor,
        W: Tensor,
        wrt: Mapping[str, Tensor],
        state: Any = None,
        **inputs: Tensor,
    ) -> dict[str, Tensor | None]:
        """``∂/∂x [Σ_b W_bᵀ ∇_u f_b]`` for every named tensor ``x`` of ``wrt``: ``"V"``, the
        names of keyword inputs and of parameters (as in :meth:`named_parameters`).

        Override to give closed forms; return ``None`` for a name to fall back to autograd
        for it. The layer's gradient with respect to ``x`` is minus this, at ``W = H⁻¹ g``.
        """
        return {name: None for name in wrt}

    def captured_tensors(self) -> dict[str, Tensor]:
        """Tensors that require grad and that the objective reads without registering them: plain
        tensor attributes of the module (e.g. ``self.C = C`` for a ``C`` computed upstream), and
        what its ``f`` reaches through the globals it names. They get gradients, as parameters do."""
        found = {k: x for k, x in (*self.__dict__.items(), *self._buffers.items())
                 if isinstance(x, Tensor) and x.requires_grad and not isinstance(x, nn.Parameter)}
        if self.scan_f:
            found.update({k: x for k, x in _captured_tensors(type(self).f).items() if k not in found})
        return _distinct(found, self.parameters())

    def describe(self) -> str:
        """A readable name for messages."""
        extra = self.extra_repr()
        return f"{type(self).__name__}({extra})"

    def __repr__(self) -> str:
        return self.describe() if not self._modules else super().__repr__()


class FunctionObjective(Objective):
    """Wraps a plain per-sample function ``fn(v, u)``, ``fn(v, u, mask)`` or either with
    keyword inputs, ``fn(v, u, mask, w=…)``. ``fn`` may be an :class:`~torch.nn.Module`
    (its parameters become the layer's).

    ``batched=True`` declares that ``fn`` already takes whole batches
    (``V: (B, T, …)``, ``U: (B, *q_shape)``, ``mask: (B, T)``, inputs ``(B, …)``) and returns
    ``(B,)`` values, with sample ``b`` of the result depending on sample ``b`` of the
    arguments alone; ``vmap`` is then skipped.
    """

    def __init__(self, fn: Callable[..., Tensor], *, batched: bool = False):
        if not callable(fn):
            raise TypeError(f"objective must be callable or an Objective, got {type(fn).__name__}")
        self.fn = fn
        self.batched = bool(batched)
        self.name = getattr(fn, "__name__", None) or type(fn).__name__
        self._signature = _Signature(fn, self.name)
        self.uses_mask = self._signature.positional >= 3
        self._skip: frozenset[str] = frozenset()

    def bind(self, input_names: tuple[str, ...], others: tuple[str, ...] = ()) -> None:
        """Check that ``fn`` accepts these keyword inputs; decides whether it takes a mask.
        ``others``: inputs that other functions of the layer (its constraints) take; ``fn``
        need not take those, and is called without the ones it does not."""
        own = tuple(n for n in input_names if n not in others or self._signature.accepts(n))
        self.uses_mask = self._signature.takes_mask(own)
        self._signature.check_inputs(own)
        self._skip = frozenset(input_names) - frozenset(own)

    def _raw_f(self, v: Tensor, u: Tensor, mask: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        if self._skip:
            inputs = {k: x for k, x in inputs.items() if k not in self._skip}
        return self.fn(v, u, mask, **inputs) if self.uses_mask else self.fn(v, u, **inputs)

    def f(self, v: Tensor, u: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        return self._call_f(v, u, mask, inputs)

    def value(self, V: Tensor, U: Tensor, mask: Tensor, **inputs: Tensor) -> Tensor:
        if self.batched:
            out = self._raw_f(V, U, mask, inputs)
            if not isinstance(out, Tensor) or out.shape != (V.shape[0],):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"objective {self.name!r} is declared batched=True and must return one value per sample, "
                    f"shape (B,) = ({V.shape[0]},) for this call on {V.shape[0]} sample(s), got {got}"
                )
            return out
        return super().value(V, U, mask, **inputs)

    def captured_tensors(self) -> dict[str, Tensor]:
        """Tensors that require grad and that ``fn`` reaches through its closure, the globals
        it names, its defaults or a ``functools.partial``: they get gradients too."""
        found = _captured_tensors(self.fn)
        found.update({k: x for k, x in super().captured_tensors().items() if k not in found and k != "fn"})
        return _distinct(found, self.parameters())

    def describe(self) -> str:
        return self.name

    def extra_repr(self) -> str:
        return self.name


class _Signature:
    """What a plain objective function accepts: positional arity, keyword inputs, the mask."""

    def __init__(self, fn: Callable[..., Any], name: str, what: str = "objective function"):
        self.name, self.what = name, what
        if isinstance(fn, nn.Module):  # its call is (*args, **kwargs): its forward says what it takes
            fn = fn.forward
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = None
        P = inspect.Parameter
        if params is None:
            self.positional_names, self.keywords, self.var_kw, self.var_pos = None, set(), True, True
            self.required_kw: set[str] = set()
            self.positional = 3
            return
        self.var_pos = any(p.kind == P.VAR_POSITIONAL for p in params)
        self.var_kw = any(p.kind == P.VAR_KEYWORD for p in params)
        self.positional_names = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        self.keywords = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        self.required_kw = {p.name for p in params if p.kind == P.KEYWORD_ONLY and p.default is P.empty}
        # positional parameters after (v, u, mask) without a default can only come as keyword inputs
        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        self.required_kw |= {p.name for p in positional[3:] if p.default is P.empty}
        self.positional = 3 if self.var_pos else len(self.positional_names)
        if self.positional < 2:
            raise TypeError(
                f"{what} {name!r} must take (v, u) or (v, u, mask), "
                f"it takes {self.positional} positional argument(s)"
            )

    def accepts(self, name: str) -> bool:
        """Whether the function takes a keyword input of this name."""
        return self.positional_names is None or self.var_kw or name in self.keywords

    def takes_mask(self, input_names: tuple[str, ...]) -> bool:
        """Whether the mask is passed: to the first positional parameter after ``(v, u)`` that is not
        a keyword input of this call. That parameter must be named like a mask (``mask``, ``m``,
        or a name containing ``mask``): a keyword input left out of the call, ``f(v, u, w)``
        called without ``w=``, would otherwise receive the mask silently."""
        if self.positional_names is None or self.var_pos:
            return True
        rest = [n for n in self.positional_names[2:] if n not in input_names]
        if rest and not (rest[0] == "m" or "mask" in rest[0]):
            raise TypeError(
                f"{self.what} {self.name!r}: its argument {rest[0]!r} after (v, u) would receive the mask ((T,) bool, "
                f"the valid steps), but no keyword input {rest[0]!r} was given; pass it, layer(V, {rest[0]}=...), "
                f"or, if it is the mask, name it `mask`"
            )
        return bool(rest)

    def check_inputs(self, input_names: tuple[str, ...]) -> None:
        if self.positional_names is None:
            return
        if not self.var_kw:
            unknown = [n for n in input_names if n not in self.keywords]
            if unknown:
                raise TypeError(
                    f"the layer got keyword input(s) {unknown}, but {self.what.split()[0]} {self.name!r} takes no such "
                    f"argument; add it to its signature, e.g. def {self.name}(v, u, mask, {unknown[0]})"
                )
        missing = sorted(self.required_kw - set(input_names))
        if missing:
            raise TypeError(f"{self.what.split()[0]} {self.name!r} needs keyword input(s) {missing}; "
                            f"pass them as layer(V, {missing[0]}=...)")


def _distinct(found: dict[str, Tensor], parameters: Any) -> dict[str, Tensor]:
    """``found`` without the module's parameters and with each tensor once (its first name): a
    tensor reached by two names (a parameter also bound to a global, a tensor attribute also
    captured by ``f``) is one input of the layer, and would otherwise get its gradient twice."""
    seen = {id(p) for p in parameters}
    out = {}
    for k, x in found.items():
        if id(x) not in seen:
            seen.add(id(x))
            out[k] = x
    return out


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names ``code`` loads as globals (and those its nested code objects load:
    comprehensions, inner functions): not ``co_names``, which also holds every attribute
    name (``self.delta`` would match a global ``delta``)."""
    names = [ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_global_names(c))
    return tuple(dict.fromkeys(names))


def _captured_tensors(fn: Any) -> dict[str, Tensor]:
    """Tensors requiring grad that ``fn`` captures, by a readable name; each tensor once."""
    found: dict[str, Tensor] = {}
    ids: set[int] = set()

    def add(name: str, x: Any) -> None:
        if isinstance(x, Tensor):
            if x.requires_grad and id(x) not in ids and name not in found:
                found[name] = x
                ids.add(id(x))
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                if isinstance(y, Tensor):
                    add(f"{name}[{i}]", y)
        elif isinstance(x, dict):
            for k, y in x.items():
                if isinstance(y, Tensor):
                    add(f"{name}[{k!r}]", y)

    seen: set[int] = set()

    def visit(f: Any, depth: int) -> None:
        if id(f) in seen or depth > 3:
            return
        seen.add(id(f))
        if isinstance(f, functools.partial):
            for i, a in enumerate(f.args):
                add(f"partial argument {i}", a)
            for k, a in f.keywords.items():
                add(f"partial argument {k!r}", a)
            visit(f.func, depth + 1)
            return
        if isinstance(f, nn.Module):  # its parameters are registered; look at its methods' closures
            return
        if isinstance(f, types.MethodType):
            owner = f.__self__
            if not isinstance(owner, nn.Module):
                for k, a in vars(owner).items() if hasattr(owner, "__dict__") else ():
                    add(f"{type(owner).__name__}.{k}", a)
            visit(f.__func__, depth + 1)
            return
        code = getattr(f, "__code__", None)
        if code is None:
            return
        for name, cell in zip(code.co_freevars, getattr(f, "__closure__", None) or ()):
            try:
                val = cell.cell_contents
            except ValueError:
                continue
            add(name, val)
            if isinstance(val, types.FunctionType):
                visit(val, depth + 1)
        glb = getattr(f, "__globals__", {})
        for name in _global_names(code):
            if name in glb:
                add(name, glb[name])
                if isinstance(glb[name], types.FunctionType):
                    visit(glb[name], depth + 1)
            elif not hasattr(builtins, name):
                continue
        for i, d in enumerate(getattr(f, "__defaults__", None) or ()):
            add(f"default argument {i}", d)
        for k, d in (getattr(f, "__kwdefaults__", None) or {}).items():
            add(f"default argument {k!r}", d)

    visit(fn, 0)
    return found


def as_objective(objective: "Objective | Callable[..., Tensor]", *, batched: bool = False) -> Objective:
    """An :class:`Objective` from an objective object or a plain function."""
    if isinstance(objective, Objective):
        if batched:
            raise TypeError("batched=True applies to plain functions; an Objective defines value() for batches")
        return objective
    if isinstance(objective, type):
        raise TypeError(f"objective must be an instance, got the class {objective.__name__}; call it first")
    return FunctionObjective(objective, batched=batched)


# ---------------------------------------------------------------------------- linearization
class Linearization:
    """The objective at one point ``U``: value, gradient, Hessian operator and mixed products.

    Whatever the objective declares (``grad``, ``hessian``, ``vjp``, ``vjp_v``) is used; the
    rest comes from one record of ``G = ∇_U Σ_b f_b`` with ``create_graph``, taken lazily at
    the first need and replayed for every Hessian–vector product and the mixed product.
    The record holds a graph back to every tensor that requires grad (``V``, inputs and
    parameters, when the caller made them require grad), so a single forward pass serves the
    backward strategy and the gradients of the layer.

    Args:
        create_graph: keep the graph of every product (for double backward); ``U`` is then used
            as given (it carries the graph of the layer's output).
        second_order: record the gradient with a graph from the start, because Hessian products
            will be asked for (``False`` for gradient-only solvers; the record is then taken again
            with a graph if a product is asked for after all).
    """

    def __init__(
        self,
        objective: Objective,
        V: Tensor,
        U: Tensor,
        mask: Tensor,
        inputs: Mapping[str, Tensor],
        state: Any = None,
        *,
        create_graph: bool = False,
        second_order: bool = True,
    ):
        self.objective, self.V, self.U, self.mask = objective, V, U, mask
        self.inputs, self.state, self.create_graph = dict(inputs), state, create_graph
        self.second_order = second_order
        self._value: Tensor | None = None
        self._grad: Tensor | None = None
        self._hessian: HessianOperator | None = None
        self._record: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._record_graph = False
        cls = type(objective)
        self._own_grad = cls.grad is not Objective.grad
        self._own_hessian = cls.hessian is not Objective.hessian

    # the recorded gradient ------------------------------------------------------------
    def record(self, graph: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(F, Ur, G)``: the batched values, the point (a leaf unless ``create_graph``) and
        ``G = ∇_U Σ F``, with its graph when ``graph`` (``None`` when ``f`` does not depend on ``u``)."""
        if self._record is None or (graph and not self._record_graph):
            graph = graph or self.second_order
            with torch.enable_grad():
                Ur = self.U if (self.create_graph and self.U.requires_grad) else self.U.detach().requires_grad_(True)
                F = self.objective.value(self.V, Ur, self.mask, **self.inputs)
                G = None
                if F.requires_grad:
                    (G,) = vjp(F, (Ur,), torch.ones_like(F), retain_graph=graph, create_graph=graph)
                    if G is not None and not G.requires_grad:
                        G = G.detach()
            self._record, self._record_graph = (F, Ur, G), graph
        return self._record

    @property
    def value(self) -> Tensor:
        """``f`` per sample, ``(B,)``."""
        if self._value is None:
            if self._record is not None or not self._own_grad:
                F = self.record(graph=False)[0]
                self._value = F if self.create_graph else F.detach()
            else:
                with torch.set_grad_enabled(self.create_graph):
                    self._value = self.objective.value(self.V, self.U, self.mask, **self.inputs)
        return self._value

    @property
    def grad(self) -> Tensor:
        """``∇_u f``, flattened ``(B, q)``."""
        if self._grad is None:
            if self._own_grad:
                with torch.set_grad_enabled(self.create_graph):
                    g = self.objective.grad(self.V, self.U, self.mask, **self.inputs)
            else:
                G = self.record(graph=False)[2]
                g = torch.zeros_like(self.U) if G is None else (G if self.create_graph else G.detach())
            self._grad = g.reshape(g.shape[0], -1)
        return self._grad

    @property
    def hessian(self) -> HessianOperator:
        """``∇²_uu f`` at ``U`` on flattened vectors, ``(B, q, q)``."""
        if self._hessian is None:
            if (not self._own_hessian and isinstance(self.state, SolverState) and self.state.hessian is not None
                    and not self.create_graph):
                self._hessian = self.state.hessian  # built by the forward solver at this very point
            elif self._own_hessian:
                with torch.set_grad_enabled(self.create_graph):
                    self._hessian = self.objective.hessian(self.V, self.U, self.mask, self.state, **self.inputs)
            elif type(self.objective).hvp is not Objective.hvp:  # a closed-form product, nothing else
                obj, V, U, mask, inp, cg = self.objective, self.V, self.U, self.mask, self.inputs, self.create_graph
                B = U.shape[0]

                def matvec(x: Tensor) -> Tensor:
                    with torch.set_grad_enabled(cg):
                        return obj.hvp(V, U, mask, x.reshape(U.shape), **inp).reshape(B, -1)

                self._hessian = FunctionHessian(B, U[0].numel(), U.dtype, U.device, matvec=matvec)
            else:
                _, Ur, G = self.record()
                diag = None
                if type(self.objective).hessian_diag is not Objective.hessian_diag:
                    obj, V, U, mask, st, inp = self.objective, self.V, self.U, self.mask, self.state, self.inputs
                    diag = lambda: obj.hessian_diag(V, U, mask, st, **inp).reshape(U.shape[0], -1)  # noqa: E731
                self._hessian = AutogradHessian(Ur, G, create_graph=self.create_graph, diagonal=diag,
                                                size=self.data_size)
        return self._hessian

    @property
    def data_size(self) -> int:
        """Entries of the largest tensor ``f`` reads (``V`` or an input): about what one reverse
        pass through ``f`` holds per intermediate."""
        return max([self.V.numel(), self.U.numel()] + [x.numel() for x in self.inputs.values()
                                                      if isinstance(x, Tensor)])

    # the mixed product ------------------------------------------------------------------
    def vjp(self, W: Tensor, wrt: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        """``∂/∂x [Σ_b W_b · ∇_u f_b]`` for every named tensor of ``wrt`` (``W`` flat ``(B, q)``);
        ``None`` where ``f`` does not depend on ``x``."""
        if not wrt:
            return {}
        Wq = W.reshape(self.U.shape)
        obj = self.objective
        out: dict[str, Tensor | None] = {}
        with torch.set_grad_enabled(self.create_graph):
            if type(obj).vjp is not Objective.vjp:
                out.update({k: v for k, v in obj.vjp(self.V, self.U, self.mask, Wq, wrt, self.state, **self.inputs).items()
                            if v is not None})
            if "V" in wrt and "V" not in out and type(obj).vjp_v is not Objective.vjp_v:
                out["V"] = obj.vjp_v(self.V, self.U, self.mask, Wq, self.state, **self.inputs)
        rest = {k: x for k, x in wrt.items() if k not in out}
        if rest:
            G = self.record()[2]
            if G is None or not G.requires_grad:
                out.update({k: None for k in rest})
            else:
                with torch.enable_grad():
                    grads = vjp(G, tuple(rest.values()), Wq.to(G.dtype), create_graph=self.create_graph)
                out.update(zip(rest, grads))
        return out
