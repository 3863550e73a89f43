"""Constrained poolings (rank pooling on the sphere, projected average pooling) and the cvxpylayers
cross-checks of constrained problems."""

from __future__ import annotations

import pytest
import torch

import cvxpylayers  # noqa: F401  (installed by the set-up; never skipped)
from argminlayers import ArgminLayer, ConvergenceWarning
from argminlayers.objective import NOT_MINIMUM
from argminlayers.projections import PROJECTIONS
from poolings import ProjectedAvgPool, RankPoolObjective, SphereRankPool, get_pooling
from poolings.cli import main
from poolings.constrained import SphereRankObjective
from poolings.crosscheck import crosscheck
from poolings.reference.cvxpy_constrained import CHECKS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DT = torch.float64
LENGTHS = torch.tensor([8, 5, 3])


def frames(B=3, T=8, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, p, generator=g, dtype=DT)


# ------------------------------------------------------------------------------ sphere rank pooling
def test_sphere_rank_pool_is_on_the_sphere_and_a_kkt_point():
    pool = SphereRankPool(C=1.0, eps=0.1, radius=1.5)
    sol = pool.layer.solve(frames(), LENGTHS)
    assert bool(sol.converged.all())
    torch.testing.assert_close(sol.u.norm(dim=-1), torch.full((3,), 1.5, dtype=DT))
    assert float(sol.multipliers.kkt_residual.max()) < 1e-10


def test_sphere_rank_pool_matches_the_interior_point_solver():
    V = frames()
    own = SphereRankPool().layer.solve(V, LENGTHS)

    def start(V, mask):  # plain rank pooling, normalised
        u = RankPoolObjective().solve(V, mask).u
        return u / u.norm(dim=-1, keepdim=True)

    ipm = ArgminLayer(SphereRankObjective(), solver="interior_point", init=start).solve(V, LENGTHS)
    assert bool(ipm.converged.all())
    torch.testing.assert_close(ipm.u, own.u, atol=1e-9, rtol=0)
    torch.testing.assert_close(ipm.multipliers.eq, own.multipliers.eq, atol=1e-8, rtol=0)


@pytest.mark.parametrize("backward", ["woodbury", "dense", "projected_cg"])
def test_sphere_rank_pool_gradcheck(backward):
    pool = SphereRankPool(backward=backward)
    V = frames(T=6, p=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda V: pool(V, torch.tensor([6, 4, 3])), (V,), fast_mode=True)


def test_sphere_rank_pool_strategies_agree():
    V = frames()
    G = torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(1))
    grads = {}
    for backward in ["woodbury", "dense", "cg", "projected_cg", "diagonal"]:
        X = V.clone().requires_grad_(True)
        grads[backward] = torch.autograd.grad(SphereRankPool(backward=backward)(X, LENGTHS), X, G)[0]
    for backward in ["dense", "cg", "projected_cg"]:
        torch.testing.assert_close(grads[backward], grads["woodbury"], rtol=1e-7, atol=1e-9)
    err = (grads["diagonal"] - grads["woodbury"]).norm() / grads["woodbury"].norm()
    assert err > 1e-3  # the diagonal approximation inside the Schur complement is not exact


def test_sphere_beyond_the_unregularised_fit_is_not_a_minimum():
    # a radius far above the norm of the exact fit: u on the sphere is not unique (reported, no gradient)
    pool = SphereRankPool(C=1.0, eps=0.5, radius=1e4)
    V = frames(B=2, T=3, p=6).requires_grad_(True)  # T < p: the ranking fits exactly
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        sol = pool.layer.solve(V.detach())
    assert bool((sol.status == NOT_MINIMUM).all())
    with pytest.warns(ConvergenceWarning):
        pool(V).sum().backward()
    assert bool((V.grad == 0).all())


def test_sphere_rank_pool_trains_in_a_video_classifier():
    from poolings.video.models import VideoClassifier

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6))
    model = VideoClassifier(backbone, SphereRankPool(), num_classes=2, feature_dim=6).double()
    frames_ = torch.randn(4, 5, 1, 4, 4, dtype=DT)
    labels = torch.tensor([0, 1, 0, 1])
    loss = torch.nn.functional.cross_entropy(model(frames_, torch.tensor([5, 4, 3, 5])), labels)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())
    assert float(backbone[1].weight.grad.abs().sum()) > 0


def test_get_pooling_names():
    assert isinstance(get_pooling("sphere_rank", C=2.0), SphereRankPool)
    assert isinstance(get_pooling("projected_avg", projection="l2_ball", radius=0.5), ProjectedAvgPool)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_sphere_radius_must_be_positive(bad):
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        SphereRankPool(radius=bad)


# ------------------------------------------------------------------------------ projected average
@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_projected_avg_pool_is_the_projection_of_the_mean(name):
    V = frames()
    mask = torch.arange(8) < LENGTHS.unsqueeze(1)
    mean = (V * mask.unsqueeze(-1)).sum(1) / LENGTHS.unsqueeze(1).to(DT)
    U = ProjectedAvgPool(name)(V, LENGTHS)
    torch.testing.assert_close(U, PROJECTIONS[name]().project(mean)[0])
    X = V.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda X: ProjectedAvgPool(name, backward="dense")(X, LENGTHS), (X,),
                                    fast_mode=True)


def test_projected_avg_pool_errors():
    with pytest.raises(ValueError, match="projection='cube' is not known"):
        ProjectedAvgPool("cube")
    with pytest.raises(TypeError, match="configure a named projection"):
        ProjectedAvgPool(PROJECTIONS["simplex"](), radius=2.0)


# ---------------------------------------------------------------------------- against cvxpylayers
@pytest.mark.parametrize("size", [(3, 8, 6), (2, 12, 10)], ids=["3x8x6", "2x12x10"])
@pytest.mark.parametrize("problem", sorted(CHECKS))
def test_agrees_with_cvxpylayers_within_its_accuracy(problem, size):
    B, T, p = size
    result = crosscheck(problem, B=B, T=T, p=p, variable_lengths=True, refs=["cvxpylayers"])
    (ref,) = result["references"]
    own = ref["ref_kkt_residual"]  # the reference's own error (distance to the exact solution, or KKT)
    assert own < 1e-8
    assert result["ours"]["kkt_residual"] < 1e-12
    assert ref["out_rel_err"] <= 10 * own + 1e-12
    assert ref["grad_rel_err"] < 1e-7 and ref["grad_cosine"] > 1 - 1e-12
    assert ref["ours_padded_grad_max"] == 0 and ref["ref_padded_grad_max"] == 0


def test_check_command_runs_a_constrained_problem(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["check", "--pooling", "simplex", "--B", "2", "--T", "5", "--p", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pooling=simplex" in text and "cvxpylayers" in text


@pytest.mark.parametrize("projection", sorted(PROJECTIONS))
def test_projected_avg_pool_survives_torch_save(projection):
    """A whole ProjectedAvgPool pickles (torch.save of the module, not only its state_dict) and
    the loaded one gives the same output: its constraint functions were lambdas before."""
    import io

    pool = ProjectedAvgPool(projection)
    V = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.save(pool, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(V), pool(V), rtol=0, atol=0)
