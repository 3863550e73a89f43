"""The generic mechanism: gradients, strategies, solvers, masks."""

from __future__ import annotations

import pytest
import torch

from argminlayers import ArgminLayer, ConvergenceWarning, Objective, check
from argminlayers.objectives import LogCoshRegression, PseudoHuber, SquaredDistance

DT = torch.float64

EXACT = ["dense", "sherman_morrison", "woodbury", "cg"]


def tight(backward):
    """Exact strategies; cg at a tolerance far below gradcheck's."""
    from argminlayers import CG

    return CG(tol=1e-13, max_iter=200) if backward == "cg" else backward


OBJECTIVES = {
    "quadratic": SquaredDistance,
    "pseudo_huber": lambda: PseudoHuber(delta=0.7),
    "logcosh": lambda: LogCoshRegression(C=0.3),
}


def data(B=2, T=4, p=3, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, p, generator=g, dtype=DT)


LENGTHS = {"full": None, "masked": torch.tensor([4, 2])}


@pytest.mark.parametrize("masking", sorted(LENGTHS))
@pytest.mark.parametrize("backward", EXACT)
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck_exact_strategies(name, backward, masking):
    layer = ArgminLayer(OBJECTIVES[name](), backward=tight(backward))
    args = () if LENGTHS[masking] is None else (LENGTHS[masking],)
    assert check.gradcheck(layer, data(), *args)


def robust_fn(v, u, mask):  # plain function, no declared structure
    return (torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()


@pytest.mark.parametrize("backward", ["dense", "cg"])
def test_gradcheck_plain_function(backward):
    layer = ArgminLayer(robust_fn, backward=tight(backward))
    assert check.gradcheck(layer, data(), torch.tensor([3, 4]))
    assert check.finite_difference(layer, data(seed=1), torch.tensor([3, 4])) < 1e-6


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_exact_strategies_agree(name):
    V = data(B=4, T=12, p=6, seed=3)
    lengths = torch.tensor([12, 7, 3, 1])
    ref = ArgminLayer(OBJECTIVES[name](), backward="dense")
    for backward in EXACT[1:]:
        c = check.compare(ArgminLayer(OBJECTIVES[name](), backward=tight(backward)), ref, V, lengths)
        assert c.output_rel_err == 0.0  # same forward solve
        assert c.grad_rel_err < 1e-8, (backward, c)


@pytest.mark.parametrize("name", ["pseudo_huber", "logcosh"])
def test_diagonal_is_an_approximation(name):
    """The diagonal strategy's error is measured, not hidden: it differs from exact."""
    V = data(B=4, T=12, p=6, seed=3)
    exact = ArgminLayer(OBJECTIVES[name](), backward="dense")
    c = check.compare(ArgminLayer(OBJECTIVES[name](), backward="diagonal"), exact, V)
    assert c.output_rel_err == 0.0
    assert 1e-6 < c.grad_rel_err < 1.0
    assert 0.0 < c.grad_cosine < 1 - 1e-9


def test_diagonal_exact_for_isotropic_hessian():
    V = data(B=3, T=5, p=4)
    c = check.compare(ArgminLayer(SquaredDistance(), backward="diagonal"), ArgminLayer(SquaredDistance()), V)
    assert c.grad_rel_err < 1e-14


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_declared_structure_matches_autodiff(name):
    obj = OBJECTIVES[name]()
    V = data(B=3, T=6, p=4, seed=5)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.bool)
    V = V * mask.unsqueeze(-1)
    U = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    declared = obj.hessian(V, U, mask)
    generic = Objective.hessian(obj, V, U, mask)
    torch.testing.assert_close(declared.dense(), generic.dense(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(declared.diagonal(), generic.diagonal(), rtol=1e-12, atol=1e-12)
    X = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    torch.testing.assert_close(declared.matvec(X), generic.matvec(X), rtol=1e-12, atol=1e-12)
    W = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    # closed forms, where the objective has them, against torch.func
    if type(obj).vjp_v is not Objective.vjp_v:
        torch.testing.assert_close(obj.vjp_v(V, U, mask, W), Objective.vjp_v(obj, V, U, mask, W))
    if type(obj).grad is not Objective.grad:
        torch.testing.assert_close(obj.grad(V, U, mask), Objective.grad(obj, V, U, mask))


@pytest.mark.parametrize("solver", ["newton", "lbfgs", "newton_cg"])
@pytest.mark.parametrize("name", ["pseudo_huber", "logcosh"])
def test_solvers_agree_and_converge(name, solver):
    V = data(B=5, T=9, p=4, seed=7)
    lengths = torch.tensor([9, 8, 5, 2, 1])
    layer = ArgminLayer(OBJECTIVES[name](), solver=solver)
    mask = torch.arange(9).unsqueeze(0) < lengths.unsqueeze(1)
    sol = layer.solve(V * mask.unsqueeze(-1), mask)
    assert bool(sol.converged.all())
    ref = ArgminLayer(OBJECTIVES[name](), solver="newton")(V, lengths)
    torch.testing.assert_close(layer(V, lengths), ref, rtol=1e-8, atol=1e-9)
    g = layer.objective.grad(V * mask.unsqueeze(-1), ref, mask)
    assert float(g.norm(dim=-1).max()) < 1e-8


def test_lbfgs_checks_the_curvature_of_a_batch_in_one_run(monkeypatch):
    """L-BFGS's curvature check (Hessian products over the whole batch) runs once for samples
    that reach a small gradient at different iterations, and still tells each one's ending: a
    minimum, a maximum met at the start (∇f = 0), and a minimum so flat that its gradient is small
    long before its step is (the check sends it on, and it still reaches u*)."""
    from argminlayers import solvers
    from argminlayers.objective import CONVERGED, NOT_MINIMUM

    runs = []
    curvature = solvers._curvature
    monkeypatch.setattr(solvers, "_curvature", lambda lin, g, check: runs.append(int(check.sum()))
                        or curvature(lin, g, check))

    def f(v, u, w):  # minimum at m = mean(v) + 1 (w > 0); w < 0 makes m a maximum
        x = u - v.mean(0) - 1
        return w * (x**2).sum() + w.abs() * (x**4).sum()

    V = data(B=4, T=5, p=3, seed=3)
    w = torch.tensor([1.0, 1.0, -1.0, 1e-13], dtype=DT)
    offset = torch.tensor([1.0, 30.0, 0.0, 1.0], dtype=DT)  # sample 1 starts far out, sample 2 at m
    step = torch.tensor([0.3, -0.2, 0.1], dtype=DT)
    layer = ArgminLayer(f, solver="lbfgs", init=lambda V, mask, w: V.mean(1) + 1 + offset[:len(V), None] * step)
    with pytest.warns(ConvergenceWarning, match=r"samples \[2\] .*not positive definite"):
        sol = layer.solve(V, w=w)
    assert sol.status.tolist() == [CONVERGED, CONVERGED, NOT_MINIMUM, CONVERGED]
    assert sol.iterations[0] < sol.iterations[1]
    m = V.mean(1) + 1
    torch.testing.assert_close(sol.u[[0, 1, 3]], m[[0, 1, 3]], rtol=0, atol=1e-4)
    assert len(runs) < int(sol.iterations.max())  # not a run at every iteration of the tail
    clean = ArgminLayer(f, solver="lbfgs", init=layer.init).solve(V[:2], w=w[:2])
    assert runs[-1] == 2 and bool(clean.converged.all())  # the two minima: checked together


def test_lbfgs_steps_its_last_samples_on_their_rows_alone(monkeypatch):
    """Once at most half the batch is still descending, L-BFGS evaluates f on those rows alone:
    the same minimisers, statuses and gradients as stepping the whole batch (float64 gradcheck
    through the layer too), with a keyword input picked by row."""
    from argminlayers import solvers
    from argminlayers.problem import Problem

    def f(v, u, w):
        return (w * torch.sqrt(1 + ((u - v) ** 2).sum(-1))).sum()

    V = data(B=8, T=4, p=3, seed=5)
    V[::3] *= 20  # far from the start: these samples take more iterations
    w = torch.linspace(0.5, 1.5, 8 * 4, dtype=DT).reshape(8, 4)
    picked = []
    rows = Problem.rows
    monkeypatch.setattr(Problem, "rows", lambda self, index: picked.append(index.numel()) or rows(self, index))
    layer = ArgminLayer(f, solver="lbfgs", backward="cg")
    sol = layer.solve(V, w=w)
    assert picked and max(picked) <= 4 and bool(sol.converged.all())
    monkeypatch.setattr(solvers, "_COMPACT_MIN", 10**9)  # the whole batch at every step
    whole = layer.solve(V, w=w)
    assert bool(whole.converged.all()) and sol.status.tolist() == whole.status.tolist()
    torch.testing.assert_close(sol.u, whole.u, rtol=0, atol=1e-9)
    monkeypatch.setattr(solvers, "_COMPACT_MIN", 8)
    n = len(picked)
    Vg, wg = V.clone().requires_grad_(True), w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda V, w: layer(V, w=w), (Vg, wg), atol=1e-6, rtol=1e-5)
    assert len(picked) > n  # the gradcheck's solves stepped rows alone too


def test_line_search_interpolates_an_overshooting_step():
    """A full step that overshoots a quadratic's minimum k = 8 times along d is cut to 1/8 by one
    more evaluation (halving took three); the interpolated step stays within [α/10, α/2], and
    where f(u + α d) is not finite it halves."""
    from argminlayers.solvers import _interpolate, armijo

    class Bowl:  # f(u) = 4 ‖u‖²
        calls = 0

        def value(self, U):
            Bowl.calls += 1
            return 4 * (U**2).sum(-1)

    U = torch.ones(3, 2, dtype=DT)
    f, g = 4 * (U**2).sum(-1), 8 * U
    d = -g  # the minimiser along d is at α = 1/8
    U_new, f_new, ok, full = armijo(Bowl(), U, f, g, d, torch.ones(3, dtype=torch.bool))
    assert bool(ok.all()) and not full and Bowl.calls == 2
    torch.testing.assert_close(U_new, torch.zeros_like(U), rtol=0, atol=1e-12)
    one, f0, slope = torch.ones(4, dtype=DT), torch.zeros(4, dtype=DT), -torch.ones(4, dtype=DT)
    # f(u + d): a parabola with its minimiser at ¼; one with it at 5 (capped at α/2); no parabola (twice)
    fc = torch.tensor([1.0, -0.9, float("nan"), float("inf")], dtype=DT)
    torch.testing.assert_close(_interpolate(one, fc, f0, slope, 0.5), torch.tensor([0.25, 0.5, 0.5, 0.5], dtype=DT))
    torch.testing.assert_close(_interpolate(one, torch.full((4,), 1e3, dtype=DT), f0, slope, 0.5),
                               torch.full((4,), 0.1, dtype=DT))  # never below α/10


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_line_search_refuses_a_non_finite_value(value):
    """A trial value that is not finite is never accepted, even where the bound f(u) + allowance
    overflows to inf (f at the largest float)."""
    from argminlayers.solvers import armijo

    class Constant:  # every backtracking step sees the same non-finite value
        def value(self, U):
            return torch.full((U.shape[0],), value, dtype=U.dtype)

    U, g = torch.zeros(2, 3), torch.ones(2, 3)
    f = torch.tensor([torch.finfo(torch.float32).max, 1.0])
    first = torch.full((2,), value)
    U_new, f_new, ok, full = armijo(Constant(), U, f, g, -g, torch.ones(2, dtype=torch.bool), first=first)
    assert not bool(ok.any()) and not full
    assert torch.equal(U_new, U) and torch.equal(f_new, f)


def test_per_sample_convergence_counts():
    """Samples stop on their own: an easy sample uses fewer Newton iterations."""
    V = data(B=2, T=6, p=3, seed=2)
    V[1] *= 20  # far from the start point: more iterations
    layer = ArgminLayer(PseudoHuber(), solver="newton")
    mask = torch.ones(2, 6, dtype=torch.bool)
    layer.objective.init = lambda V, mask: V.new_zeros(V.shape[0], V.shape[2])
    sol = layer.solve(V, mask)
    assert bool(sol.converged.all())
    assert sol.iterations[0] < sol.iterations[1]


@pytest.mark.parametrize("solver", [None, "newton", "newton_cg", "lbfgs"])
def test_pseudo_huber_of_frames_close_together_converges(solver):
    """‖u − v_t‖ ≪ δ: f = Σ δ²(s_t − 1) written as such cancels to T·ε absolutely, far above the
    decrease of a Newton step, so the line search stalled (MAX_ITER at ‖∇f‖ ~ 1e-8)."""
    import warnings

    V = 1e-3 * torch.randn(8, 200, 64, dtype=DT, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = ArgminLayer(PseudoHuber(), solver=solver).solve(V)
    assert bool(sol.converged.all()) and float(sol.grad_norm.max()) <= 1e-11


def test_padded_steps_have_no_influence_and_zero_gradient():
    V = data(B=3, T=6, p=4, seed=11).requires_grad_(True)
    lengths = torch.tensor([6, 3, 1])
    layer = ArgminLayer(PseudoHuber(), backward="woodbury")
    u = layer(V, lengths)
    u.pow(2).sum().backward()
    assert V.grad[1, 3:].abs().sum() == 0 and V.grad[2, 1:].abs().sum() == 0
    assert V.grad[1, :3].abs().sum() > 0
    W = V.detach().clone()
    W[1, 3:] = 1e6
    W[2, 1:] = float("nan")  # never read: padded
    torch.testing.assert_close(layer(W, lengths), u.detach(), rtol=0, atol=0)


def test_mask_equals_lengths():
    V = data(B=2, T=5, p=3)
    layer = ArgminLayer(LogCoshRegression())
    lengths = torch.tensor([5, 2])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    torch.testing.assert_close(layer(V, mask), layer(V, lengths=lengths), rtol=0, atol=0)
    torch.testing.assert_close(layer(V, mask), layer(V, lengths), rtol=0, atol=0)


@pytest.mark.parametrize("backward", ["cg", "woodbury", "dense"])
def test_float32_matches_float64(backward):
    V64 = data(B=3, T=8, p=5).requires_grad_(True)
    u64 = ArgminLayer(PseudoHuber(), backward=backward)(V64)
    u64.sum().backward()
    V32 = V64.detach().float().requires_grad_(True)
    u32 = ArgminLayer(PseudoHuber(), backward=backward)(V32)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u64.detach(), rtol=1e-4, atol=1e-5)
    u32.sum().backward()
    assert V32.grad.dtype == torch.float32
    torch.testing.assert_close(V32.grad.double(), V64.grad, rtol=1e-3, atol=1e-4)


def test_q_set_by_init():
    class TwoMoments(Objective):
        """u = (mean of first feature, mean of squares of first feature): q = 2 ≠ p."""

        def f(self, v, u, mask):
            x = v[:, 0]
            return 0.5 * (((u[0] - x) ** 2 + (u[1] - x**2) ** 2) * mask).sum()

        def init(self, V, mask):
            return V.new_zeros(V.shape[0], 2)

    V = data(B=2, T=5, p=3)
    u = ArgminLayer(TwoMoments())(V)
    assert u.shape == (2, 2)
    torch.testing.assert_close(u[:, 0], V[:, :, 0].mean(1))
    torch.testing.assert_close(u[:, 1], (V[:, :, 0] ** 2).mean(1))
    assert check.gradcheck(ArgminLayer(TwoMoments()), V)


def test_damping_regularises_the_backward():
    V = data(B=2, T=4, p=3)
    exact = ArgminLayer(PseudoHuber())
    damped = ArgminLayer(PseudoHuber(), damping=1e3)
    c = check.compare(damped, exact, V)
    assert c.output_rel_err == 0
    assert c.grad_rel_err > 0.5  # (H + λI)⁻¹ with a large λ is far from H⁻¹


def test_custom_strategy_object():
    from argminlayers import Strategy, register_strategy, available_strategies

    @register_strategy("jacobi_sweeps_test")
    class JacobiSweeps(Strategy):
        exact = False

        def solve(self, hessian, g):
            d = hessian.diagonal()
            w = g / d
            for _ in range(60):
                w = w + (g - hessian.matvec(w)) / d
            return w

    assert "jacobi_sweeps_test" in available_strategies()
    V = data(B=2, T=6, p=3) * 0.2  # near-diagonal Hessian: Jacobi sweeps converge
    c = check.compare(ArgminLayer(SquaredDistance(), backward="jacobi_sweeps_test"), ArgminLayer(SquaredDistance()), V)
    assert c.grad_rel_err < 1e-12
    c = check.compare(ArgminLayer(PseudoHuber(), backward=JacobiSweeps()), ArgminLayer(PseudoHuber()), V)
    assert c.grad_rel_err < 1e-8


def test_check_compare_reports_difference():
    V = data()
    c = check.compare(lambda x: x.sum(1), lambda x: 2 * x.sum(1), V)
    assert abs(c.output_rel_err - 0.5) < 1e-12 and abs(c.grad_rel_err - 0.5) < 1e-12
    assert abs(c.grad_cosine - 1) < 1e-12
    assert "grad" in str(c)


def test_finite_difference_detects_a_wrong_gradient():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum(1)

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g.unsqueeze(1).expand(-1, 4, -1)

    assert check.finite_difference(lambda x: WrongGrad.apply(x), data()) > 0.1
    with pytest.raises(Exception):
        check.gradcheck(lambda x: WrongGrad.apply(x), data())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    V = data(B=3, T=6, p=4)
    lengths = torch.tensor([6, 3, 1])
    for obj, backward in [(PseudoHuber(), "woodbury"), (LogCoshRegression(), "cg"), (robust_fn, "dense")]:
        cpu = ArgminLayer(obj, backward=backward)
        Vc = V.cuda().requires_grad_(True)
        u = cpu(Vc, lengths.cuda())
        assert u.device.type == "cuda"
        u.sum().backward()
        Vh = V.clone().requires_grad_(True)
        uh = cpu(Vh, lengths)
        uh.sum().backward()
        torch.testing.assert_close(u.cpu(), uh)
        torch.testing.assert_close(Vc.grad.cpu(), Vh.grad)


def test_low_rank_row_scale_equals_scaled_rows():
    """A LowRankHessian with a row scale behaves exactly as one built from the scaled rows."""
    from argminlayers import LowRankHessian
    from argminlayers.strategies import ShermanMorrison, Woodbury

    g = torch.Generator().manual_seed(4)
    d = 1 + torch.rand(3, 5, generator=g, dtype=DT)
    A = torch.randn(3, 4, 5, generator=g, dtype=DT)
    Bm = torch.randn(3, 4, 5, generator=g, dtype=DT) * 0.1
    s = torch.rand(3, 4, generator=g, dtype=DT)
    x = torch.randn(3, 5, generator=g, dtype=DT)
    for right in (None, Bm):
        scaled = LowRankHessian(d, A, right, row_scale=s)
        plain = LowRankHessian(d, A * s[..., None], None if right is None else right * s[..., None])
        torch.testing.assert_close(scaled.dense(), plain.dense())
        torch.testing.assert_close(scaled.diagonal(), plain.diagonal())
        torch.testing.assert_close(scaled.matvec(x), plain.matvec(x))
        torch.testing.assert_close(scaled.matmat(x[..., None]), plain.matmat(x[..., None]))
        torch.testing.assert_close(scaled.capacitance(), plain.capacitance())
        for strategy in (Woodbury(), ShermanMorrison()):
            torch.testing.assert_close(strategy.solve(scaled, x), torch.linalg.solve(plain.dense(), x))


def test_lengths_as_a_list():
    V = data(B=2, T=5, p=3)
    layer = ArgminLayer(PseudoHuber())
    expected = layer(V, torch.tensor([5, 2]))
    torch.testing.assert_close(layer(V, [5, 2]), expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(V, lengths=[5, 2]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("B, T, p, solver, backward", [
    (1, 10, 64, "newton", "dense"),  # q = 64, B·T·p·q = 4.1e4: the dense Hessian is cheap
    (4, 10, 64, "newton", "dense"),  # 1.6e5
    (16, 10, 64, "lbfgs", "cg"),  # 6.6e5: beyond the work bound
    (1, 2, 65, "lbfgs", "cg"),  # q above the cap, however small the work
])
def test_default_rule_picks_by_q_and_work(B, T, p, solver, backward):
    from argminlayers import Problem

    layer = ArgminLayer(lambda v, u: ((u - v) ** 2).sum())
    V = torch.zeros(B, T, p, dtype=DT)
    problem = Problem(layer.objective, V, torch.ones(B, T, dtype=torch.bool), {}, (p,))
    assert layer._pick_solver(problem).name == solver
    sol = layer.solve(V[:, :1])  # a solution object without a dense Hessian in its state
    sol.state = None
    assert layer.pick_strategy(problem, sol).name == backward


def test_all_finite():
    """One reduction decides; an overflowing sum of finite entries falls back to the exact test."""
    from argminlayers.linalg import all_finite

    x = torch.randn(3, 4, dtype=torch.float32)
    assert all_finite(x) and all_finite(x.requires_grad_(True)) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.detach().clone()
        y[1, 2] = bad
        assert not all_finite(y)
    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries whose float32 sum overflows
    assert not torch.isfinite(big.sum()) and all_finite(big)
    both = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN: still refused
    assert not all_finite(both)


def test_dense_hessian_in_chunks_equals_one_pass(monkeypatch):
    """The dense Hessian of a recorded gradient, built a few rows a reverse pass (as for data
    past the cache), equals the one-pass build, also with its graph kept (a double backward
    through the chunks), and ``rows_per_pass`` sizes the chunks by bytes."""
    from argminlayers import hessian as hessian_module
    from argminlayers.linalg import PASS_BYTES, batched_vjp, rows_per_pass

    assert rows_per_pass(10, 8) == PASS_BYTES // 80 and rows_per_pass(10**9, 8) == 1
    V = data(B=3, T=5, p=7)
    U = V.mean(1).requires_grad_(True)
    G = torch.autograd.grad(torch.sqrt(1 + ((U.unsqueeze(1) - V) ** 2).sum(-1)).sum(), U, create_graph=True)[0]
    E = torch.eye(7, dtype=DT).unsqueeze(1).expand(7, 3, 7).contiguous()
    whole = batched_vjp(G, U, E)
    for rows in (1, 3, 6, 7, 50):
        torch.testing.assert_close(batched_vjp(G, U, E, rows=rows), whole, rtol=0, atol=0)
    seen = []
    monkeypatch.setattr(hessian_module, "rows_per_pass", lambda n, size: seen.append((n, size)) or 3)
    layer = ArgminLayer(lambda v, u: torch.sqrt(1 + ((u - v) ** 2).sum(-1)).sum(), solver="newton", backward="dense")
    X = V.clone().requires_grad_(True)
    u = layer(X)
    assert seen and seen[0] == (V.numel(), 8)  # sized by the data f reads, in its dtype's bytes
    (gx,) = torch.autograd.grad(u.pow(2).sum(), X, create_graph=True)
    monkeypatch.undo()
    X1 = V.clone().requires_grad_(True)
    u1 = layer(X1)
    (gx1,) = torch.autograd.grad(u1.pow(2).sum(), X1, create_graph=True)
    torch.testing.assert_close(u, u1, rtol=0, atol=1e-15)
    torch.testing.assert_close(gx, gx1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(gx.sum(), X)[0], torch.autograd.grad(gx1.sum(), X1)[0],
                               rtol=1e-10, atol=1e-12)


def _pair_sequence(B, q, steps, dtype, seed=0):
    """Steps ``(s, y, stepped)`` with every case of the pair update: stored pairs, samples that
    did not step, pairs refused for ``sᵀy ≤ 0`` or a NaN, and more steps than the ring holds."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        s = torch.randn(B, q, generator=g, dtype=torch.float64)
        A = torch.randn(B, q, q, generator=g, dtype=torch.float64)
        y = (A @ A.transpose(1, 2) + torch.eye(q, dtype=torch.float64)) @ s.unsqueeze(-1)
        y = y.squeeze(-1)
        if k % 3 == 1:
            y[0] = -s[0]  # sᵀy < 0: refused
        if k == 4:
            y[-1, 0] = float("nan")  # refused, no NaN stored
        stepped = torch.rand(B, generator=g) > 0.2
        stepped[1 % B] = k != 0  # one sample has no pair after the first step
        out.append((s.to(dtype), y.to(dtype), stepped))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_lbfgs_pairs_match_torch(dtype):
    """The compiled two-loop recursion and pair store (CPU) give the torch form's directions and
    state through a ring that wraps, zero pairs, refused pairs and samples with no pair yet."""
    from argminlayers import solvers

    if solvers._lbfgs_kernel() is None:
        pytest.skip("argminlayers._lbfgs is not built")
    B, q, m = 5, 4, 3
    U0 = torch.zeros(B, q, dtype=dtype)
    ours, ref = solvers._CompiledPairs(U0, m), solvers._TorchPairs(U0, m)

    class Lin:
        grad: torch.Tensor

    lin, tol = Lin(), (1e-5 if dtype == torch.float32 else 1e-12)
    g = torch.Generator().manual_seed(3)
    for s, y, stepped in _pair_sequence(B, q, 8, dtype) + [(None, None, None)]:
        lin.grad = torch.randn(B, q, generator=g, dtype=torch.float64).to(dtype)
        gnorm = lin.grad.norm(dim=-1)
        d, d_ref = ours.direction(lin, U0, gnorm, None)[0], ref.direction(lin, U0, gnorm, None)[0]
        torch.testing.assert_close(d, d_ref, rtol=tol, atol=tol)
        assert torch.equal(ours.has_pair(), ref.has_pair())
        if s is not None:
            ours.store(s, y, stepped)
            ref.store(s, y, stepped)
            torch.testing.assert_close(ours.gamma, ref.gamma.squeeze(-1), rtol=tol, atol=0)
    assert bool(ours.has_pair()[1]) and not bool(torch.isnan(ours.S).any() or torch.isnan(ours.Y).any())


def test_lbfgs_layer_is_the_same_compiled_or_not(monkeypatch):
    """L-BFGS with and without its compiled steps: the same minimiser, iterations and gradients."""
    from argminlayers import solvers

    if solvers._lbfgs_kernel() is None:
        pytest.skip("argminlayers._lbfgs is not built")
    layer = ArgminLayer(PseudoHuber(delta=0.7), solver="lbfgs", backward="cg")
    V = data(B=4, T=6, p=5, seed=2)
    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(solvers, "COMPILED", compiled)
        X = V.clone().requires_grad_(True)
        sol = layer.solve(X)
        u = layer(X)
        (gx,) = torch.autograd.grad(u.pow(2).sum(), X)
        runs.append((sol, u, gx))
    (a, ua, ga), (b, ub, gb) = runs
    assert bool(a.converged.all()) and torch.equal(a.iterations, b.iterations)
    torch.testing.assert_close(ua, ub, rtol=0, atol=1e-14)
    torch.testing.assert_close(ga, gb, rtol=0, atol=1e-13)


def test_positive_diagonal_declared():
    """``positive_diagonal=True`` skips the strategies' check of d, gives the same solve, and
    survives damping (λ > 0 keeps d positive); undeclared, a zero d is refused."""
    from argminlayers import LowRankHessian, SingularHessianError
    from argminlayers.strategies import ShermanMorrison, Woodbury

    g = torch.Generator().manual_seed(5)
    A = torch.randn(2, 3, 4, generator=g, dtype=DT)
    x = torch.randn(2, 4, generator=g, dtype=DT)
    d = torch.ones(2, 4, dtype=DT)
    declared, plain = LowRankHessian(d, A, positive_diagonal=True), LowRankHessian(d, A)
    assert not plain.positive_diagonal
    for strategy in (Woodbury(), ShermanMorrison()):
        torch.testing.assert_close(strategy.solve(declared, x), strategy.solve(plain, x), rtol=0, atol=0)
    assert declared.shifted(0.5).positive_diagonal and declared.shifted(0) is declared
    zero = d.clone()
    zero[1, 0] = 0
    with pytest.raises(SingularHessianError, match="non-zero diagonal"):
        Woodbury().solve(LowRankHessian(zero, A), x)


def test_damped_newton_crosses_a_double_well():
    """Where ``H`` is indefinite, Newton damps it by ``λI`` from a ×10 ladder; a rung just above
    ``−λ_min(H)`` factorised into a nearly singular factor (pivots² [1.3, 0.23, 2e-16]) whose step
    (1e15) the line search could not shorten: 181 of these 200 double wells ended NO_DESCENT. A
    damped factor must be well conditioned too; every sample then reaches a minimum (a zero
    gradient and a positive definite Hessian), as L-BFGS and Newton-CG do."""
    g = torch.Generator().manual_seed(0)
    V = torch.randn(200, 3, generator=g, dtype=DT)
    f = lambda v, u: (u**4).sum() - (u**2).sum() - (v * u).sum()  # noqa: E731
    sol = ArgminLayer(f, solver="newton").solve(V)
    assert sol.converged.all(), torch.bincount(sol.status).tolist()
    U = sol.u
    torch.testing.assert_close(4 * U**3 - 2 * U - V, torch.zeros_like(V), rtol=0, atol=1e-9)  # ∇f = 0
    assert (12 * U**2 - 2 > 0).all()  # H = diag(12u² − 2) positive definite: minima, not saddles


def test_a_batched_plain_function():
    """``batched=True``: the function takes whole batches (``V (B, T, p)``, ``U (B, p)``, ``mask
    (B, T)``) and returns ``(B,)`` values; the layer equals the per-sample form (forward and
    gradient, float64 gradcheck), and a function that returns one number for the batch is refused
    with the per-sample shape it should have."""
    def per_sample(v, u, mask):
        return (torch.sqrt(1 + ((u - v) ** 2).sum(-1)) * mask).sum()

    def whole(V, U, mask):
        return (torch.sqrt(1 + ((U[:, None] - V) ** 2).sum(-1)) * mask).sum(-1)

    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 5, 4, generator=g, dtype=DT, requires_grad=True)
    lengths = torch.tensor([5, 3, 4])
    a, b = ArgminLayer(per_sample), ArgminLayer(whole, batched=True)
    torch.testing.assert_close(b(V, lengths=lengths), a(V, lengths=lengths), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda V: b(V, lengths=lengths), (V,))
    with pytest.raises(ValueError, match=r"declared batched=True and must return one value per sample"):
        ArgminLayer(lambda V, U, mask: ((U[:, None] - V) ** 2).sum(), batched=True)(V)
