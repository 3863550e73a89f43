"""Every input of the problem gets its gradient: keyword inputs, parameters of the objective,
tensors its function captures; second derivatives; torch.compile, vmap and precision."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from argminlayers import CG, ArgminLayer, CapturedTensorError, ConvergenceError, ConvergenceWarning, Objective
from argminlayers.objectives import PseudoHuber

DT = torch.float64
EXACT = ["dense", "cg"]  # the strategies every objective here can use (no declared structure)
LENGTHS = {"full": None, "masked": torch.tensor([5, 3, 1])}


def tight(backward):
    return CG(tol=1e-13, max_iter=200) if backward == "cg" else backward


def data(B=3, T=5, p=3, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, p, generator=g, dtype=DT)


def weights(B=3, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(B, T, generator=g, dtype=DT)


def weighted_pool(v, u, mask, w):  # a keyword input: per-frame weights
    return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()


class ScaledHuber(Objective):
    """Pseudo-Huber pooling with a learnable scale δ (an nn.Parameter)."""

    def __init__(self, delta=0.7):
        super().__init__()
        self.delta = nn.Parameter(torch.tensor(delta, dtype=DT))

    def f(self, v, u, mask):
        d = self.delta
        return (d**2 * (torch.sqrt(1 + ((u - v) ** 2).sum(-1) / d**2) - 1) * mask).sum()


def lengths_args(masking):
    return {} if LENGTHS[masking] is None else {"lengths": LENGTHS[masking]}


# ------------------------------------------------------------------------ first order
@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("masking", sorted(LENGTHS))
@pytest.mark.parametrize("backward", EXACT)
def test_gradcheck_keyword_input(backward, masking, mode):
    """Reverse mode, and forward mode (torch.autograd.forward_ad: u̇ = −H⁻¹ f_uv ẋ), against
    finite differences in float64."""
    layer = ArgminLayer(weighted_pool, backward=tight(backward))
    V, w = data().requires_grad_(True), weights().requires_grad_(True)
    kw = lengths_args(masking)
    modes = {} if mode == "reverse" else dict(check_forward_ad=True, check_backward_ad=False,
                                               check_undefined_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own, when it loads its jvp decompositions
        assert torch.autograd.gradcheck(lambda V, w: layer(V, w=w, **kw), (V, w), **modes)


def test_maskless_function_with_keyword_input():
    layer = ArgminLayer(lambda v, u, w: (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1))).sum())
    V, w = data().requires_grad_(True), weights().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda V, w: layer(V, w=w), (V, w))


@pytest.mark.parametrize("masking", sorted(LENGTHS))
@pytest.mark.parametrize("backward", EXACT)
def test_gradcheck_parameter(backward, masking):
    layer = ArgminLayer(ScaledHuber(), backward=tight(backward))
    kw = lengths_args(masking)
    delta = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def fn(V, delta):  # the parameter as a gradcheck input
        return functional_call(layer, {"objective.delta": delta}, (V,), kw)

    assert torch.autograd.gradcheck(fn, (data().requires_grad_(True), delta))


def test_parameters_belong_to_the_layer():
    obj = ScaledHuber()
    layer = ArgminLayer(obj)
    assert [n for n, _ in layer.named_parameters()] == ["objective.delta"]
    assert "objective.delta" in layer.state_dict()
    layer.float()
    assert obj.delta.dtype == torch.float32
    u = layer(data().float())
    u.sum().backward()
    assert obj.delta.grad is not None and obj.delta.grad.abs() > 0


def test_learnable_parameter_moves_under_adam():
    obj = ScaledHuber(delta=2.0)
    layer = ArgminLayer(obj)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    V = data(B=8, T=12, p=3, seed=4)
    V[:, 0] += 5.0  # one outlier frame per sample: a small δ ignores it
    target = V[:, 1:].mean(1)
    start = obj.delta.item()
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(V) - target).pow(2).sum()
        loss.backward()
        opt.step()
    assert obj.delta.item() < start - 0.5


def test_parametrised_parameter_gets_its_gradient_through_the_parametrisation():
    """``torch.nn.utils.parametrize`` on an objective's parameter (``δ = exp(θ) > 0``): the
    original ``θ`` is the layer's parameter and its gradient matches central differences."""
    from torch.nn.utils import parametrize

    class Exp(nn.Module):
        def forward(self, x):
            return x.exp()

        def right_inverse(self, d):
            return d.log()

    obj = ScaledHuber(delta=0.7)
    parametrize.register_parametrization(obj, "delta", Exp())
    layer = ArgminLayer(obj)
    assert [n for n, _ in layer.named_parameters()] == ["objective.parametrizations.delta.original"]
    theta = obj.parametrizations.delta.original
    V, G = data(), torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    (layer(V, lengths=LENGTHS["masked"]) * G).sum().backward()

    def loss(t):
        o = ScaledHuber(delta=float(torch.tensor(t, dtype=DT).exp()))
        with torch.no_grad():
            return float((ArgminLayer(o)(V, lengths=LENGTHS["masked"]) * G).sum())

    t0, e = float(theta.detach()), 1e-6
    fd = (loss(t0 + e) - loss(t0 - e)) / (2 * e)
    assert abs(float(theta.grad) - fd) <= 1e-7 * max(1.0, abs(fd)), (float(theta.grad), fd)


def test_module_objective_parameters():
    class Net(nn.Module):  # a plain nn.Module as the objective
        def __init__(self):
            super().__init__()
            self.log_s = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, v, u, mask):
            return (torch.exp(self.log_s) * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()

    net = Net()
    layer = ArgminLayer(net)
    assert [n for n, _ in layer.named_parameters()] == ["objective.fn.log_s"]
    s = torch.tensor(0.3, dtype=DT, requires_grad=True)
    fn = lambda V, s: functional_call(layer, {"objective.fn.log_s": s}, (V,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (data().requires_grad_(True), s))


def test_module_objective_signature_is_its_forwards():
    """A module objective is called by the rules of its forward's signature, as a function is: a
    maskless forward(v, u) gets no mask, forward(v, u, w) with a keyword input gets it by name, and
    an argument with a default after (v, u) is refused by name (it received the mask before, and
    forward(v, u) raised torch's TypeError: the module's own call takes (*args, **kwargs))."""
    ph = lambda v, u: torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum()  # noqa: E731

    class Plain(nn.Module):
        def forward(self, v, u):
            return ph(v, u)

    class Weighted(nn.Module):
        def forward(self, v, u, mask, w):
            return weighted_pool(v, u, mask, w)

    class Defaulted(nn.Module):
        def forward(self, v, u, delta=2.0):
            return (delta**2 * (torch.sqrt(1 + ((u - v) ** 2).sum(-1) / delta**2) - 1)).sum()

    V, w, lengths = data(), weights(), torch.tensor([5, 3, 2])
    torch.testing.assert_close(ArgminLayer(Plain())(V), ArgminLayer(ph)(V), rtol=0, atol=0)
    torch.testing.assert_close(ArgminLayer(Weighted())(V, lengths=lengths, w=w),
                               ArgminLayer(weighted_pool)(V, lengths=lengths, w=w), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"'Defaulted': its argument 'delta' after \(v, u\) would receive the mask"):
        ArgminLayer(Defaulted())(V)


class _AttrScaled(Objective):
    def f(self, v, u, mask):
        return (torch.sqrt(1 + ((self.S * (u - v)) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()


def test_a_captured_attribute_assigned_again_before_the_backward():
    """A tensor attribute of the objective (``self.S = S`` for an S computed upstream) that the
    model assigns again before the backward (the next step's S, or the recompute of a
    non-reentrant checkpoint): the backward uses the forward's S, and the attribute is back to
    what the caller set afterwards. (The backward refused it before.)"""
    obj = _AttrScaled()
    layer = ArgminLayer(obj)
    V = data()
    a = torch.tensor([0.7, 1.3, 0.9], dtype=DT, requires_grad=True)
    obj.S = a * 1.0
    (ref,) = torch.autograd.grad(layer(V).pow(2).sum(), a)
    obj.S = a * 1.0
    loss = layer(V).pow(2).sum()
    later = torch.full((3,), 5.0, dtype=DT, requires_grad=True)
    obj.S = later  # assigned again before the backward
    (got,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert obj.S is later


def test_non_reentrant_checkpoint_of_a_model_that_assigns_a_captured_attribute():
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.pool = nn.Linear(3, 3).double(), ArgminLayer(_AttrScaled())

        def forward(self, V):
            self.pool.objective.S = nn.functional.softplus(self.net(V.mean((0, 1))))
            return self.pool(V)

    torch.manual_seed(0)
    model, X = Model(), data().requires_grad_(True)
    ref = torch.autograd.grad(model(X).pow(2).sum(), (X, *model.parameters()))
    got = torch.autograd.grad(checkpoint(model, X, use_reentrant=False).pow(2).sum(), (X, *model.parameters()))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


_GLOBAL_SCALE = torch.tensor(1.3, dtype=DT, requires_grad=True)


def _global_scaled(v, u, mask):
    return (_GLOBAL_SCALE * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()


def test_a_captured_global_that_changed_before_the_backward_is_refused():
    global _GLOBAL_SCALE
    old = _GLOBAL_SCALE
    layer = ArgminLayer(_global_scaled)
    loss = layer(data()).sum()
    _GLOBAL_SCALE = torch.tensor(2.0, dtype=DT, requires_grad=True)
    try:
        with pytest.raises(RuntimeError, match=r"captures \['_GLOBAL_SCALE'\], which now refer to other tensors"):
            torch.autograd.grad(loss, old)
    finally:
        _GLOBAL_SCALE = old


def test_captured_tensor_gets_its_gradient():
    scale = torch.tensor(1.3, dtype=DT, requires_grad=True)

    def captured(v, u, mask):
        return (scale * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()

    V = data()
    u = ArgminLayer(captured)(V)
    (auto,) = torch.autograd.grad(u.sum(), scale)

    def explicit(v, u, mask, s):  # the same objective with the scale passed in
        return (s * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()

    s = scale.detach().expand(3).clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(ArgminLayer(explicit)(V, s=s).sum(), s)
    torch.testing.assert_close(auto, ref.sum())
    # and against finite differences
    with torch.no_grad():
        e = 1e-6
        scale += e
        up = ArgminLayer(captured)(V).sum()
        scale -= 2 * e
        down = ArgminLayer(captured)(V).sum()
        scale += e
    torch.testing.assert_close(auto, (up - down) / (2 * e), rtol=1e-6, atol=1e-8)


_alias = None  # a module global that a test binds to a parameter or a captured tensor


def test_a_tensor_reached_by_two_names_gets_its_gradient_once(monkeypatch):
    """A parameter also bound to a global whose name the objective uses as an attribute
    (``s.delta`` and a global ``delta``), or a captured tensor also bound to a second global the
    objective reads, is one input: its gradient equals that of the same layer without the alias
    (and finite differences). Both were doubled: captured tensors were found by name, and a
    function's ``co_names`` holds its attribute names as well as its globals."""

    class Q(Objective):
        def __init__(self):
            super().__init__()
            self.delta = nn.Parameter(torch.tensor(1.3, dtype=DT))

        def f(self, v, u, mask):
            return (torch.sqrt(self.delta**2 + ((u - v) ** 2).sum(-1)) * mask).sum()

    V = data(2, 4, 3)
    layer = ArgminLayer(Q())
    (alone,) = torch.autograd.grad(layer(V).sum(), layer.objective.delta)
    monkeypatch.setitem(globals(), "delta", layer.objective.delta)  # the attribute's name as a global
    (aliased,) = torch.autograd.grad(layer(V).sum(), layer.objective.delta)
    torch.testing.assert_close(aliased, alone, rtol=1e-12, atol=0)
    with torch.no_grad():  # and finite differences
        e = 1e-6
        layer.objective.delta += e
        up = layer(V).sum()
        layer.objective.delta -= 2 * e
        down = layer(V).sum()
        layer.objective.delta += e
    torch.testing.assert_close(alone, (up - down) / (2 * e), rtol=1e-6, atol=1e-9)

    s = torch.tensor(2.0, dtype=DT, requires_grad=True)
    monkeypatch.setitem(globals(), "_alias", s)
    W = torch.tensor([[1.0, -0.5]], dtype=DT)
    once = torch.autograd.grad(ArgminLayer(lambda v, u: s * ((u - v) ** 2).sum() + (u**4).sum())(W).sum(), s)[0]
    twice = torch.autograd.grad(
        ArgminLayer(lambda v, u: s * ((u - v) ** 2).sum() + 0 * _alias + (u**4).sum())(W).sum(), s)[0]
    torch.testing.assert_close(twice, once, rtol=1e-12, atol=0)


def test_a_global_read_inside_a_comprehension_is_captured():
    """Globals loaded by nested code (a generator expression) are found too: they were refused
    as hidden (the outer function's names do not hold them)."""
    s = torch.tensor(1.5, dtype=DT, requires_grad=True)
    W = torch.tensor([[1.0, -0.5]], dtype=DT)
    globals()["_alias"] = s
    try:
        nested = ArgminLayer(lambda v, u: sum(_alias * ((u - v) ** 2).sum() for _ in range(1)) + (u**4).sum())
        plain = ArgminLayer(lambda v, u: _alias * ((u - v) ** 2).sum() + (u**4).sum())
        (g1,) = torch.autograd.grad(nested(W).sum(), s)
        (g2,) = torch.autograd.grad(plain(W).sum(), s)
    finally:
        globals()["_alias"] = None
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)
    assert float(g1) != 0


def test_hidden_captured_tensor_is_refused():
    class Config:
        pass

    cfg = Config()
    cfg.s = torch.tensor(1.0, dtype=DT, requires_grad=True)

    def hidden(v, u, mask):
        return (cfg.s * ((u - v) ** 2).sum(-1) * mask).sum()

    with pytest.raises(CapturedTensorError, match=r"objective hidden captures a tensor that requires grad.*keyword input"):
        ArgminLayer(hidden)(data())


def test_hidden_parameter_unfrozen_after_the_first_call_is_refused():
    """A module the function reaches through its closure, frozen at the first call (nothing to
    refuse then) and unfrozen later: the next call that records a graph refuses it, instead of
    leaving its gradient None."""
    lin = nn.Linear(3, 3).double()
    lin.requires_grad_(False)

    def through_module(v, u, mask):
        return (torch.sqrt(1 + ((lin(u) - v) ** 2).sum(-1)) * mask).sum() + 0.1 * (u * u).sum()

    layer = ArgminLayer(through_module)
    V = data().requires_grad_(True)
    layer(V).sum().backward()
    lin.requires_grad_(True)
    with pytest.raises(CapturedTensorError, match=r"objective through_module captures an nn.Parameter"):
        layer(V)


def test_an_argument_left_for_the_mask_must_be_named_like_one():
    """``f(v, u, w)`` called without ``w=`` would get the mask as ``w``: refused, naming ``w``; the
    same for a constraint; an argument named like a mask (``mask``, ``m``, ``…mask…``) takes it."""
    def weighted(v, u, w):
        return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1))).sum()

    V = data()
    assert ArgminLayer(weighted)(V, w=weights()).shape == (3, 3)
    with pytest.raises(TypeError, match=r"'weighted': its argument 'w' after \(v, u\) would receive the mask.*"
                                        r"layer\(V, w=\.\.\.\)"):
        ArgminLayer(weighted)(V)
    ball = ArgminLayer(lambda v, u: ((u - v) ** 2).sum(), ineq=lambda v, u, r: ((u * u).sum() - r**2).reshape(1))
    with pytest.raises(TypeError, match=r"constraint function .*its argument 'r' after \(v, u\) would receive the mask"):
        ball(V)
    named = ArgminLayer(lambda v, u, mask: ((u - v) ** 2).sum(-1) @ mask.to(v.dtype))(V, lengths=LENGTHS["masked"])
    torch.testing.assert_close(named, V.cumsum(1)[torch.arange(3), LENGTHS["masked"] - 1] / LENGTHS["masked"][:, None])
    for fn in (lambda v, u, m: ((u - v) ** 2).sum(-1) @ m.to(v.dtype),
               lambda v, u, valid_mask: ((u - v) ** 2).sum(-1) @ valid_mask.to(v.dtype)):
        torch.testing.assert_close(ArgminLayer(fn)(V, lengths=LENGTHS["masked"]), named, rtol=0, atol=0)


def test_a_parameter_of_another_dtype_is_named():
    class Scaled(Objective):  # a float64 parameter that promotes f; V in float32
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(1.5, dtype=DT))

        def f(self, v, u, mask):
            return self.a * (torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()

    with pytest.raises(ValueError, match=r"it must match V \(torch.float32 on cpu\) \(the objective's 'a' is "
                                         r"torch.float64 on cpu.*layer.to\(V.dtype\)"):
        ArgminLayer(Scaled())(data().float())
    assert ArgminLayer(Scaled()).float()(data().float()).dtype == torch.float32


def test_keyword_input_errors():
    layer = ArgminLayer(weighted_pool)
    with pytest.raises(ValueError, match=r"keyword input 'w' must have leading dimension B = 3"):
        layer(data(), w=weights(B=2))
    with pytest.raises(TypeError, match=r"keyword input 'w' must be a torch.Tensor"):
        layer(data(), w=1.0)
    with pytest.raises(TypeError, match=r"objective 'weighted_pool' takes no such argument"):
        layer(data(), w=weights(), z=weights())
    with pytest.raises(ValueError, match=r"keyword input 'w' contains NaN"):
        layer(data(), w=torch.full((3, 5), float("nan"), dtype=DT))
    with pytest.raises(RuntimeError, match=r"failed on its first sample, called with per-sample shapes "
                                           r"v \(5, 3\), u \(3,\), w \(4,\)") as info:
        layer(data(), w=weights(T=4))  # per-frame weights of the wrong length
    assert "size of tensor" in str(info.value)  # torch's own message follows
    good = ArgminLayer(weighted_pool)
    good(data(), w=weights())
    with pytest.raises(RuntimeError, match=r"failed on its first sample.*w \(4,\)"):  # a later call: probed again
        good(data(), w=weights(T=4))
    with pytest.raises(TypeError, match=r"keyword input 'w' is torch.float64 but V is torch.float32; pass it in V's dtype"):
        layer(data().float(), w=weights())  # it would promote the values (u float64 for some data only)


# ------------------------------------------------------------------------ second order
SMOOTH = {
    "pseudo_huber": (PseudoHuber(delta=0.7), ["dense", "woodbury", "sherman_morrison", "cg"]),
    "weighted_fn": (weighted_pool, ["dense", "cg"]),
}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_gradgradcheck(name):
    objective, strategies = SMOOTH[name]
    V = data(B=2, T=4, p=3).requires_grad_(True)
    w = weights(B=2, T=4).requires_grad_(True)
    for backward in strategies:
        layer = ArgminLayer(objective, backward=tight(backward))
        if name == "weighted_fn":
            fn, args = (lambda V, w: layer(V, lengths=torch.tensor([4, 2]), w=w)), (V, w)
        else:
            fn, args = (lambda V: layer(V, lengths=torch.tensor([4, 2]))), (V,)
        assert torch.autograd.gradgradcheck(fn, args), backward


def test_functional_hessian_matches_finite_differences():
    layer = ArgminLayer(weighted_pool)
    w = weights(B=1, T=4)
    V0 = data(B=1, T=4, p=2)

    def loss(V):
        return layer(V, w=w).pow(3).sum()

    H = torch.autograd.functional.hessian(loss, V0).reshape(8, 8)
    e, fd = 1e-5, torch.zeros(8, 8, dtype=DT)
    for i in range(8):
        d = torch.zeros(8, dtype=DT)
        d[i] = e
        gp = torch.autograd.functional.jacobian(loss, V0 + d.reshape(V0.shape)).reshape(8)
        gm = torch.autograd.functional.jacobian(loss, V0 - d.reshape(V0.shape)).reshape(8)
        fd[:, i] = (gp - gm) / (2 * e)
    torch.testing.assert_close(H, fd, rtol=1e-5, atol=1e-7)
    assert H.abs().max() > 1e-3


@pytest.mark.parametrize("setting", ["newton+dense", "lbfgs+cg", "woodbury", "weighted"])
def test_functional_hvp_equals_vhp_and_finite_differences(setting):
    """torch.autograd.functional.hvp differentiates the second-order backward in its cotangent
    (the double-backward trick): it equals vhp (the Hessian is symmetric) and finite differences
    of the gradient. It was silently wrong (0.47-0.78 off) while the backward's solve was not
    differentiable in its input."""
    if setting == "woodbury":
        layer, kw = ArgminLayer(PseudoHuber(delta=0.7)), {}
    elif setting == "weighted":
        layer, kw = ArgminLayer(weighted_pool), {"w": weights(B=2, T=4)}
    else:
        solver, backward = setting.split("+")
        layer, kw = ArgminLayer(PseudoHuber(delta=0.7), solver=solver, backward=tight(backward)), {}
    V, d = data(B=2, T=4, p=3), data(B=2, T=4, p=3, seed=5)

    def loss(X):
        return layer(X, **kw).pow(2).sum()

    def grad(X):
        X = X.clone().requires_grad_(True)
        return torch.autograd.grad(loss(X), X)[0]

    _, hv = torch.autograd.functional.hvp(loss, V, d)
    _, vh = torch.autograd.functional.vhp(loss, V, d)
    e = 1e-5
    fd = (grad(V + e * d) - grad(V - e * d)) / (2 * e)
    torch.testing.assert_close(hv, vh, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)
    assert hv.abs().max() > 1e-2


def test_third_derivative_is_refused():
    """A third derivative (a gradient of the second-order backward in the layer's inputs) raises:
    the second-order record is exact to first order only, so it would be silently wrong."""
    layer = ArgminLayer(PseudoHuber(delta=0.7))
    X, v = data().requires_grad_(True), data(seed=4)
    (g,) = torch.autograd.grad(layer(X).pow(2).sum(), X, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), X, create_graph=True)  # a Hessian-vector product: exact
    (h1,) = torch.autograd.grad((g * v).sum(), X, retain_graph=True)
    torch.testing.assert_close(h.detach(), h1, rtol=1e-12, atol=1e-15)
    with pytest.raises(RuntimeError, match="third derivatives through an ArgminLayer are not supported"):
        torch.autograd.grad(h.pow(2).sum(), X)


def test_diagonal_refuses_double_backward():
    X = data().requires_grad_(True)
    (g,) = torch.autograd.grad(ArgminLayer(PseudoHuber(), backward="diagonal")(X).pow(2).sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match=r"backward='diagonal' approximates H⁻¹"):
        torch.autograd.grad(g.sum(), X)


@pytest.mark.parametrize("backward", ["dense", "woodbury", "cg"])
def test_damping_refuses_double_backward(backward):
    """(H + λI)⁻¹ is an approximation of the implicit gradient: its first order is given (and
    agrees across strategies), differentiating it again raises instead of a wrong value."""
    X = data().requires_grad_(True)
    layer = ArgminLayer(PseudoHuber(), backward=tight(backward), damping=0.3)
    (g,) = torch.autograd.grad(layer(X).pow(2).sum(), X, create_graph=True)
    (g1,) = torch.autograd.grad(layer(X).pow(2).sum(), X)
    torch.testing.assert_close(g.detach(), g1, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"damping=0.3 back-propagates through \(H \+ λI\)⁻¹"):
        torch.autograd.grad(g.sum(), X)


# ------------------------------------------------------------------------ composability
def test_torch_compile_matches_eager():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pool, self.head = nn.Linear(4, 4), ArgminLayer(weighted_pool), nn.Linear(4, 2)

        def forward(self, x, lengths, w):
            return self.head(self.pool(torch.tanh(self.embed(x)), lengths=lengths, w=w))

    torch.manual_seed(0)
    model = Model()
    x, lengths, w = torch.randn(3, 6, 4), torch.tensor([6, 4, 2]), torch.rand(3, 6) + 0.5
    ref = model(x, lengths, w)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")  # Dynamo + AOTAutograd; the layer runs eagerly
    out = compiled(x, lengths, w)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


INFERENCE_LAYERS = {
    "newton": lambda: ArgminLayer(weighted_pool),
    "lbfgs": lambda: ArgminLayer(weighted_pool, solver="lbfgs"),
    "newton_cg": lambda: ArgminLayer(weighted_pool, solver="newton_cg"),
    "constrained": lambda: ArgminLayer(weighted_pool, eq=lambda v, u: u.sum() - 1),
}


@pytest.mark.parametrize("first", ["inference", "eager"])
@pytest.mark.parametrize("name", sorted(INFERENCE_LAYERS))
def test_inference_mode_gives_the_eager_result(name, first):
    """Under torch.inference_mode (autograd off even where the solver turns it on to differentiate
    f), the layer and its solve give the eager result, on the first call as on later ones, with
    V and the keyword inputs made inside it; before, the first call raised and later calls
    returned a wrong u (f looked flat in u)."""
    x, lengths, w = torch.randn(3, 6, 4, dtype=DT), torch.tensor([6, 4, 2]), torch.rand(3, 6, dtype=DT) + 0.5
    layer = INFERENCE_LAYERS[name]()
    if first == "eager":
        ref = layer(x, lengths=lengths, w=w)
    with torch.inference_mode():
        xi, wi = x.clone(), w.clone()
        u = layer(xi, lengths=lengths, w=wi)
        sol = layer.solve(xi, torch.arange(6) < lengths[:, None], w=wi)
    if first == "inference":
        ref = layer(x, lengths=lengths, w=w)
    assert not u.requires_grad and bool(sol.converged.all())
    torch.testing.assert_close(u, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.u, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["newton", "lbfgs", "newton_cg"])
def test_caller_saved_tensor_hooks_see_only_the_layers_own_tensors(solver):
    """The solver's inner records keep their saved tensors to themselves: a caller's hooks pack
    the two the layer's autograd Function saves (V and u*), however many reverse passes the solve
    and the backward make inside."""
    layer = ArgminLayer(lambda v, u: torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum(), solver=solver)
    V = data().requires_grad_(True)
    layer(V)
    packs, unpacks = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packs.append(1) or x, lambda x: unpacks.append(1) or x):
        layer(V).sum().backward()
    assert len(packs) == len(unpacks) == 2


@pytest.mark.parametrize("context", ["cloning hooks", "allow_mutation_on_saved_tensors", "mask"])
def test_inputs_modified_after_the_forward(context):
    """The gradient is that of the forward's values when the caller modifies V or the mask in
    place before the backward where autograd allows it: under saved-tensor hooks that copy, under
    allow_mutation_on_saved_tensors, and for the mask (not a differentiable input, so never
    version-checked). An objective whose Hessian and mixed product are its own (built in the
    backward from V) got 0.14-0.24 wrong, without a word, before."""
    layer = ArgminLayer(PseudoHuber(delta=0.7), solver="lbfgs")
    V0, c = data() + 1.0, data(B=3, T=1, seed=7)[:, 0]
    lengths = torch.tensor([5, 3, 4]) if context == "mask" else torch.tensor([5, 5, 5])  # (no padding: V is not copied)
    mask0 = torch.arange(5) < lengths[:, None]
    Vr = V0.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((layer(Vr, mask0) * c).sum(), Vr)
    V, mask = V0.clone().requires_grad_(True), mask0.clone()
    ctx = {"cloning hooks": lambda: torch.autograd.graph.saved_tensors_hooks(lambda x: x.clone(), lambda x: x),
           "allow_mutation_on_saved_tensors": torch.autograd.graph.allow_mutation_on_saved_tensors,
           "mask": contextlib.nullcontext}[context]
    with ctx():
        X = V * 1.0
        loss = (layer(X, mask) * c).sum()
        with torch.no_grad():
            if context == "mask":
                mask.fill_(True)
            else:
                X.mul_(3.0)
        (got,) = torch.autograd.grad(loss, V)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    assert bool((got[~mask0] == 0).all())  # the padded steps of the forward's mask


def test_non_reentrant_checkpoint_runs_the_region_once():
    """Under torch.utils.checkpoint(use_reentrant=False) the checkpointed region runs once in the
    forward (a BatchNorm in it counts one batch; the inner reverse passes used to recompute the
    region, 11 times), also on the layer's first call; output and gradients equal the plain call.
    (The backward's recompute runs it once more, as checkpoint does for any region.)"""
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.pool = nn.BatchNorm1d(3), ArgminLayer(lambda v, u: torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum())

        def forward(self, V):
            return self.pool(self.bn(V.transpose(1, 2)).transpose(1, 2))

    V = torch.randn(2, 4, 3, dtype=DT) + 5.0
    torch.manual_seed(0)
    plain, ckpt = Block().double(), Block().double()
    ckpt.load_state_dict(plain.state_dict())
    X, Y = V.clone().requires_grad_(True), V.clone().requires_grad_(True)
    ref = plain(X)
    out = checkpoint(ckpt, Y, use_reentrant=False)  # the layer's first call, inside the checkpoint
    assert int(ckpt.bn.num_batches_tracked) == 1
    torch.testing.assert_close(ckpt.bn.running_mean, plain.bn.running_mean)
    torch.testing.assert_close(out, ref)
    ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    torch.testing.assert_close(Y.grad, X.grad)
    torch.testing.assert_close(ckpt.bn.weight.grad, plain.bn.weight.grad)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("kind", ["newton", "constrained"])
def test_detect_anomaly_gives_the_plain_result(kind):
    """Under torch.autograd.detect_anomaly (its NaN check reads values, which no batched reverse
    pass can) the dense Hessian and the constraint Jacobian are built one product at a time: the
    same output and gradient as without it (both raised a batching-rule error before)."""
    extra = {"eq": lambda v, u: u.sum() - 1} if kind == "constrained" else {}
    layer = ArgminLayer(lambda v, u: torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum(), **extra)
    X, Y = data().requires_grad_(True), data().requires_grad_(True)
    ref = layer(X)
    (gx,) = torch.autograd.grad(ref.pow(2).sum(), X)
    with torch.autograd.detect_anomaly():
        out = layer(Y)
        (gy,) = torch.autograd.grad(out.pow(2).sum(), Y)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(gy, gx, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["reverse-mode", "forward-mode"])
def test_vectorized_jacobian_is_refused_with_the_alternative(strategy):
    layer = ArgminLayer(weighted_pool)
    w = weights()
    with pytest.raises(RuntimeError, match=r"ArgminLayer: batched products through the layer .* use vectorize=False"):
        torch.autograd.functional.jacobian(lambda a: layer(a, w=w), data(), vectorize=True, strategy=strategy)


def test_vmap_folds_into_the_batch():
    layer = ArgminLayer(weighted_pool)
    V, w = data(B=6).reshape(2, 3, 5, 3), weights(B=6).reshape(2, 3, 5)
    out = torch.func.vmap(lambda a, b: layer(a, w=b))(V, w)
    torch.testing.assert_close(out, layer(V.reshape(6, 5, 3), w=w.reshape(6, 5)).reshape(2, 3, 3))


def test_vmap_over_lengths_is_refused_and_a_mapped_mask_works():
    layer = ArgminLayer(weighted_pool)
    V, w = data(B=6, T=5).reshape(2, 3, 5, 3), weights(B=6, T=5).reshape(2, 3, 5)
    lengths = torch.tensor([[5, 3, 2], [1, 4, 5]])
    with pytest.raises(ValueError, match=r"lengths is mapped by torch.func.vmap.*pass the mask"):
        torch.func.vmap(lambda a, b, n: layer(a, lengths=n, w=b))(V, w, lengths)
    out = torch.func.vmap(lambda a, b, m: layer(a, m, w=b))(V, w, torch.arange(5) < lengths[..., None])
    ref = layer(V.reshape(6, 5, 3), lengths=lengths.reshape(6), w=w.reshape(6, 5))
    torch.testing.assert_close(out, ref.reshape(2, 3, 3))


def test_jacrev_is_refused_with_the_alternative():
    layer = ArgminLayer(weighted_pool)
    w = weights()
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        with pytest.raises(RuntimeError, match=r"ArgminLayer: torch.func derivative transforms .* "
                                               r"torch.autograd.functional.jacobian"):
            transform(lambda a: layer(a, w=w))(data())
    J = torch.autograd.functional.jacobian(lambda a: layer(a, w=weights()), data())
    assert J.shape == (3, 3, 3, 5, 3)


# ------------------------------------------------------------------------ forward mode
def _tangent(fn, primals, tangents):
    import torch.autograd.forward_ad as fwAD

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own, when it loads its jvp decompositions
        with fwAD.dual_level():
            out = fn(*[fwAD.make_dual(x, t) for x, t in zip(primals, tangents)])
            return fwAD.unpack_dual(out).tangent


def test_forward_mode_matches_reverse_mode_for_rank_pooling():
    from poolings import RankPool

    V = data(T=8, p=4)
    T = torch.randn(V.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    for method in ("tspace", "pspace", "cg"):
        pool = RankPool(method=method)
        J = torch.autograd.functional.jacobian(pool, V)  # (B, p, B, T, p), by reverse mode
        torch.testing.assert_close(_tangent(pool, (V,), (T,)), torch.einsum("bpctq,ctq->bp", J, T),
                                   atol=1e-10, rtol=0)


def test_forward_mode_not_converged_samples_get_zero_tangent():
    layer = ArgminLayer(weighted_pool, max_iter=1)
    V, w = 10 * data(), weights()
    with pytest.warns(ConvergenceWarning, match="Those samples get zero gradient"):
        du = _tangent(lambda V: layer(V, w=w), (V,), (torch.ones_like(V),))
    assert du.abs().sum() == 0


class _SquaredPool(Objective):
    """f = ½ Σ_t ‖u − v_t‖², with a closed-form mixed product ∂/∂v_t[wᵀ∇_u f] = −w."""

    def __init__(self, detach=False):
        super().__init__()
        self.detach = detach

    def f(self, v, u, mask):
        return 0.5 * (((u - v) ** 2).sum(-1) * mask).sum()

    def vjp_v(self, V, U, mask, W, state=None):
        W = W.detach() if self.detach else W
        return -W.unsqueeze(1) * mask.unsqueeze(-1).to(W.dtype)


def test_forward_mode_through_a_closed_form_mixed_product():
    V, T = data(), torch.ones_like(data())
    torch.testing.assert_close(_tangent(ArgminLayer(_SquaredPool()), (V,), (T,)), torch.ones(3, 3, dtype=DT))
    with pytest.raises(RuntimeError, match=r"vjp/vjp_v is not differentiable in w"):
        _tangent(ArgminLayer(_SquaredPool(detach=True)), (V,), (T,))


def test_forward_mode_refusals():
    V = data()
    constrained = ArgminLayer(weighted_pool, eq=lambda v, u: u.sum() - 1)
    with pytest.raises(NotImplementedError, match="forward-mode AD through a constrained layer"):
        _tangent(lambda V: constrained(V, w=weights()), (V,), (V,))
    layer = ArgminLayer(ScaledHuber())
    delta = layer.objective.delta.detach()
    with pytest.raises(NotImplementedError, match="tangent on a parameter"):
        _tangent(lambda d: functional_call(layer, {"objective.delta": d}, (V,)), (delta,), (torch.ones_like(delta),))
    with pytest.raises(RuntimeError, match=r"torch.func derivative transforms .* torch.autograd.forward_ad"):
        torch.func.jvp(lambda a: layer(a), (V,), (V,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_solve_in_float32(dtype):
    layer = ArgminLayer(weighted_pool)
    V = data().to(dtype).requires_grad_(True)
    u = layer(V, w=weights().to(dtype))
    assert u.dtype == dtype
    ref = layer(V.detach().float(), w=weights().to(dtype).float())
    torch.testing.assert_close(u.float(), ref.to(dtype).float())
    u.sum().backward()
    assert V.grad.dtype == dtype and torch.isfinite(V.grad.float()).all()


def test_autocast_runs_the_layer_in_float32():
    layer = ArgminLayer(weighted_pool)
    V, w = data().float(), weights().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = layer(V, w=w)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, layer(V, w=w), rtol=0, atol=0)


# ------------------------------------------------------------------------ honest failure
def test_nonconverged_samples_get_zero_gradient_and_the_warning_says_so():
    V = (10 * data()).requires_grad_(True)
    layer = ArgminLayer(weighted_pool, max_iter=1)
    with pytest.warns(ConvergenceWarning, match=r"iteration budget ran out.*Those samples get zero gradient"):
        u = layer(V, w=weights())
    u.sum().backward()
    assert V.grad.abs().sum() == 0


@pytest.mark.parametrize("solver,backward", [("newton", None), ("lbfgs", None), ("newton_cg", None),
                                             ("newton", "diagonal"), ("lbfgs", "dense"), ("lbfgs", "cg")])
def test_a_saddle_in_the_batch_leaves_the_minima_their_gradients(solver, backward):
    """A sample stopped at a saddle gets zero gradient, as the warning says; the others get
    theirs. Only dense Newton's own factor (the identity in a saddle's place) did so: the other
    solvers' backward factorised or checked the saddle's ``H`` and raised SingularHessianError for
    the whole batch, in reverse and in forward mode. Reference: the minimum's gradient alone."""
    f = lambda v, u, c: (u**4).sum() + c * (u**2).sum() - (v * u).sum()  # noqa: E731  (c < 0 at 0: a saddle)
    V = torch.tensor([[1.0, 0.5, -0.3], [0.0, 0.0, 0.0]], dtype=DT, requires_grad=True)
    c = torch.tensor([1.0, -1.0], dtype=DT)
    layer = ArgminLayer(f, solver=solver, backward=backward)
    with pytest.warns(ConvergenceWarning, match=r"samples \[1\].*Those samples get zero gradient"):
        (g,) = torch.autograd.grad(layer(V, c=c).sum(), V)
    V0 = V[:1].detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(ArgminLayer(f, solver=solver, backward=backward)(V0, c=c[:1]).sum(), V0)
    torch.testing.assert_close(g[0], ref[0], rtol=1e-7, atol=1e-10)
    assert (g[1] == 0).all()
    from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

    with dual_level(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        tangent = unpack_dual(layer(make_dual(V.detach(), torch.ones_like(V)), c=c)).tangent
    assert (tangent[1] == 0).all() and tangent[0].abs().sum() > 0


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_an_objective_without_a_minimiser_is_named_in_the_warning(solver):
    """Linear along the constraint (or everywhere): the iterates run away (‖u‖ ~ 1e9), and the
    warning said only to raise max_iter; it now says the objective may be unbounded below."""
    V = torch.tensor([[1.0, 1.0]], dtype=DT)
    f = lambda v, u: -(u * v).sum() + 1e-12 * (u[0] - u[1]) ** 2  # noqa: E731  (flat along u0 = u1)
    with pytest.warns(ConvergenceWarning, match=r"u ran away to ‖u‖ = .*unbounded below on the constraint set"):
        ArgminLayer(f, eq=lambda v, u: (u[0] - u[1]).reshape(1)).solve(V)
    with pytest.warns(ConvergenceWarning, match=r"u ran away to ‖u‖ = .*unbounded below \(no minimiser\)"):
        ArgminLayer(lambda v, u: -(u * v).sum() + torch.exp(-(u * u).sum()), solver=solver).solve(V)


@pytest.mark.parametrize("solver", [None, "newton", "newton_cg", "lbfgs"])
def test_plateau_and_maximum_at_zero_gradient_are_not_minima(solver):
    """∇f = 0 exactly at the start, where conjugate gradient on ``H d = ∇f`` sees nothing of ``H``:
    every solver probes the curvature from another direction, and a genuine minimum with small
    curvature at the same start is still one."""
    def welsch(v, u, mask):
        return ((1 - torch.exp(-0.5 * ((u - v) ** 2).sum(-1))) * mask).sum()

    def double_well(v, u, mask):  # u = 0 is a local maximum
        return (((u**2 - (v**2).sum(0)) ** 2) * 1.0).sum()

    def flat_bowl(v, u, mask):  # u = 0 is the minimum, curvature 2e-6
        return 1e-6 * (u * u).sum() + 0 * v.sum()

    for fn, V in ((welsch, data(p=80) + 20.0), (double_well, data() + 2.0)):
        with pytest.warns(ConvergenceWarning, match=r"samples \[0, 1, 2\].*Hessian is not positive definite"):
            ArgminLayer(fn, solver=solver)(V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArgminLayer(flat_bowl, solver=solver)(data())


@pytest.mark.parametrize("solver", [None, "newton", "newton_cg", "lbfgs"])
def test_accuracy_does_not_depend_on_the_objective_scale(solver):
    """An objective written with small weights (or ``.mean()``) starts with ‖∇f(u₀)‖ < 1: the
    solution is as accurate as at scale 1 (not 400× worse in float32), and a warm start at the
    solution still converges at once."""
    torch.manual_seed(0)
    V = 2 * torch.randn(8, 30, 5, dtype=torch.float64)

    def pseudo_huber(s):
        return lambda v, u: s * torch.sqrt(1 + ((u.unsqueeze(-2) - v) ** 2).sum(-1)).sum(-1)

    ref = ArgminLayer(pseudo_huber(1.0), solver="newton")(V)
    for dtype, atol in ((torch.float32, 3e-5), (torch.float64, 1e-10)):
        for s in (1.0, 1e-3, 1e-5):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                u = ArgminLayer(pseudo_huber(s), solver=solver)(V.to(dtype))
                warm = ArgminLayer(pseudo_huber(s), solver=solver, init=lambda V, mask: ref.to(dtype))(V.to(dtype))
            torch.testing.assert_close(u.double(), ref, rtol=0, atol=atol)
            torch.testing.assert_close(warm.double(), ref, rtol=0, atol=atol)


def test_plateau_is_not_a_minimum():
    def welsch(v, u, mask):
        return ((1 - torch.exp(-0.5 * ((u - v) ** 2).sum(-1))) * mask).sum()

    with pytest.warns(ConvergenceWarning, match=r"samples \[0, 1, 2\].*Hessian is not positive definite"):
        ArgminLayer(welsch)(data() + 20.0)  # u = 0 is far from every frame: a flat plateau
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArgminLayer(welsch, init=lambda V, mask: V.mean(1))(data() + 20.0)  # started well: a minimum


@pytest.mark.parametrize("solver", ["lbfgs", "newton_cg", "newton"])
def test_a_steep_start_converges_and_is_not_called_a_saddle(solver):
    """cosh(10(u − v)) from u₀ = 0 has ‖∇f(u₀)‖ ≈ 5e13, so ‖∇f‖ ≤ tol · ‖∇f(u₀)‖ holds 0.5 from
    u*: L-BFGS stopped there, and its check of the curvature at the end called the point a saddle
    ("the Hessian is not positive definite"). A gradient-only solver now checks the curvature and
    the step to u* where a sample would stop, and goes on while that step is large."""
    f = lambda v, u: torch.cosh(10 * (u - v)).sum()  # noqa: E731
    V = torch.tensor([[3.0, 2.0, -2.5]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = ArgminLayer(f, solver=solver).solve(V)
    assert sol.converged.all()
    torch.testing.assert_close(sol.u, V, rtol=0, atol=1e-6)  # the step test's √tol: 4e-7 (L-BFGS)


def test_saddle_is_not_a_minimum():
    def saddle(v, u, mask):
        return 0.5 * (u[0] - v[0, 0]) ** 2 - 0.5 * (u[1] - v[0, 1]) ** 2

    with pytest.raises(ConvergenceError, match=r"Hessian is not positive definite"):
        ArgminLayer(saddle, on_nonconvergence="raise", init=lambda V, mask: V[:, 0, :2].clone())(data())


def test_nan_objective_is_reported_as_nan():
    with pytest.warns(ConvergenceWarning, match=r"NaN or infinite"):
        ArgminLayer(lambda v, u, mask: (u * float("nan")).sum())(data())


def test_infinite_gradient_at_the_start_is_not_converged():
    def barrier(v, u, mask):  # −Σ log u, started at u = 0
        return (-torch.log(u) + u * v.abs().mean(0)).sum()

    with pytest.raises(ConvergenceError, match=r"NaN or infinite"):
        ArgminLayer(barrier, on_nonconvergence="raise")(data())
    u = ArgminLayer(barrier, init=lambda V, mask: torch.ones(V.shape[0], V.shape[2], dtype=V.dtype))(data())
    torch.testing.assert_close(u, 1 / data().abs().mean(1))


def test_own_solve_that_is_not_stationary_is_reported():
    class ClampedProjection(Objective):  # solve projects onto u ≥ 0: it minimises another problem
        def f(self, v, u, mask):
            return 0.5 * ((u - v[0]) ** 2).sum()

        def solve(self, V, mask):
            return V[:, 0].clamp_min(0)

    V = data().requires_grad_(True)
    with pytest.warns(ConvergenceWarning, match=r"ClampedProjection\(\).*own solve returned a point where ∇f is not small"):
        u = ArgminLayer(ClampedProjection())(V)
    u.sum().backward()
    assert V.grad.abs().sum() == 0


def test_objective_mutating_its_input_is_refused_and_v_untouched():
    def mutating(v, u, mask):
        v.mul_(2)
        return (((u - v) ** 2).sum(-1) * mask).sum()

    V = data()
    before = V.clone()
    with pytest.raises(RuntimeError, match=r"objective mutating modified its arguments .* in place"):
        ArgminLayer(mutating)(V)
    assert torch.equal(V, before)


def test_wrong_init_and_solve_shapes_are_clear():
    with pytest.raises(ValueError, match=r"init returned shape \(2, 3\); it must be \(B, \*q_shape\) with B = 3"):
        ArgminLayer(weighted_pool, init=lambda V, mask, w: V.new_zeros(2, 3))(data(), w=weights())

    class BadSolve(Objective):
        def f(self, v, u, mask):
            return ((u - v) ** 2).sum()

        def solve(self, V, mask):
            return V.new_zeros(V.shape[0] + 1, 3)

    with pytest.raises(ValueError, match=r"BadSolve\(\)\.solve returned shape \(4, 3\)"):
        ArgminLayer(BadSolve())(data())


def test_tensor_attribute_of_an_objective_gets_its_gradient():
    class Scaled(Objective):  # `self.s` is computed upstream: a plain attribute, not a parameter
        def __init__(self, s):
            super().__init__()
            self.s = s

        def f(self, v, u, mask):
            return (self.s * torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum() + 0.5 * (u * u).sum()

    V = data()
    a = torch.tensor(0.3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ArgminLayer(Scaled(a.exp()))(V), (a,))


def test_scan_f_false_skips_the_walk_of_f():
    """``scan_f = False``: an objective that promises that its ``f`` reads only its own attributes
    is not walked for captured tensors (its own attributes still are)."""
    hidden = torch.tensor(1.0, dtype=DT, requires_grad=True)

    class Walked(Objective):
        def f(self, v, u, mask):
            return (hidden * ((u - v) ** 2).sum(-1) * mask).sum()

    class Promised(Walked):
        scan_f = False

    assert list(Walked().captured_tensors()) == ["hidden"]
    promised = Promised()
    assert promised.captured_tensors() == {}
    promised.s = torch.tensor(2.0, dtype=DT, requires_grad=True)  # a plain tensor attribute
    assert list(promised.captured_tensors()) == ["s"]

    class NewF(Promised):  # its own f, no promise of its own: walked again
        def f(self, v, u, mask):
            return (2 * hidden * ((u - v) ** 2).sum(-1) * mask).sum()

    assert NewF.scan_f and list(NewF().captured_tensors()) == ["hidden"]
