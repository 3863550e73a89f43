"""Constrained layers: the KKT backward strategies compared, and the time against cvxpylayers.

**Strategies.** For a constrained layer the backward solves ``[H Jᵀ; J 0][w; z] = [g; 0]``
(:mod:`argminlayers.kkt`): ``dense`` factorises the full ``(q + r)²`` KKT matrix; ``woodbury``,
``cg`` and ``diagonal`` use the Schur complement ``J H⁻¹ Jᵀ`` with their ``H⁻¹`` (``r + 1``
right-hand sides); ``projected_cg`` runs conjugate gradient in the tangent space ``null(J)``.
Each strategy's backward runs on the same stored forward solution
(:meth:`~argminlayers.ArgminLayer.implicit_vjp`, what the autograd backward runs), interleaved
in the same rounds, on

- ``sphere_rank``: :class:`poolings.SphereRankPool` (rank pooling on the unit sphere:
  ``H = (1 + λ) I + C V_Aᵀ V_A``, one equality, ``r = 1``);
- ``simplex``, ``box``: :class:`poolings.ProjectedAvgPool` onto the simplex and onto the box
  ``[−0.05, 0.05]^p`` (``H = n I``; ``r`` = the active bounds, about ``p/2`` or more).

The gradient error is the backward's own: against the ``dense`` KKT gradient computed in float64
at the same solution and active set, for the same upstream gradient (a float32 forward can put a
coordinate that lies within rounding of a bound on the other side of it than a float64 forward
would; such points are reported as weakly active, and the section lists those warnings).

**Against cvxpylayers.** The four problems of ``argminlayers check`` for constrained layers
(:mod:`poolings.reference.cvxpy_constrained`: simplex and L1-ball projections of the mean, a
box-constrained QP and an equality-constrained least squares, the last two solved by our
interior-point solver), forward + backward in float64 against cvxpylayers (SCS at ``eps = 1e-9``,
dense derivative), which solves and differentiates each sample of a batch apart. Reported:
both times, their ratio, output and gradient errors, and the reference's own accuracy.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from argminlayers import Multipliers, Solution
from argminlayers.check import errors

from .common import (
    BenchConfig,
    Stopwatch,
    environment,
    finish_environment,
    fmt_err,
    fmt_ratio,
    fmt_time,
    make_sequences,
    markdown_table,
    module_main,
    output_dir,
    plt_module,
    progress,
    save_figure,
    seeded_like,
    time_interleaved,
    write_json,
    write_markdown,
)

NAME = "constraints"
STRATEGIES = ("dense", "woodbury", "cg", "projected_cg", "diagonal")
COLORS = {"dense": "C3", "woodbury": "C0", "cg": "C2", "projected_cg": "C4", "diagonal": "C1"}
CHECKED = ("simplex", "l1_ball", "box_qp", "eq_lsq")


@dataclass(frozen=True)
class Size:
    B: int
    T: int
    p: int


STRATEGY_SIZES = {
    "full": {"sphere_rank": [Size(16, 50, p) for p in (64, 256, 1024)],
             "simplex": [Size(16, 8, p) for p in (16, 64, 256)],
             "box": [Size(16, 8, p) for p in (16, 64, 256)]},
    "quick": {"sphere_rank": [Size(2, 6, 4)], "simplex": [Size(2, 4, 5)], "box": [Size(2, 4, 5)]},
}
REFERENCE_SIZES = {"full": [Size(B, 8, 16) for B in (1, 16, 128)], "quick": [Size(2, 4, 3)]}
# seconds: a strategy (or cvxpylayers) whose untimed first call takes longer is reported with that call only
CAPS = {"full": {"call": 20.0}, "quick": {"call": 10.0}}


def make_pooling(problem: str, backward: str):
    """The layer of a strategy benchmark."""
    from poolings import ProjectedAvgPool, SphereRankPool

    if problem == "sphere_rank":
        return SphereRankPool(C=1.0, eps=0.1, backward=backward)
    if problem == "simplex":
        return ProjectedAvgPool("simplex", backward=backward)
    if problem == "box":
        return ProjectedAvgPool("box", lower=-0.05, upper=0.05, backward=backward)
    raise ValueError(f"unknown problem {problem!r}")


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Constrained layers: KKT strategies (dense KKT, Schur + woodbury/cg/diagonal, projected CG), and
    the time against cvxpylayers."""
    with cfg.applied():
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    env = environment(cfg)
    mode = "quick" if cfg.quick else "full"
    caps = cfg.caps(CAPS[mode])
    repeats = cfg.n_repeats(5)
    strategies = {}
    for problem, sizes in STRATEGY_SIZES[mode].items():
        strategies[problem] = [_strategies(cfg, problem, size, repeats, caps)
                               for size in progress(sizes, desc=f"{NAME}: {problem}", enabled=cfg.progress)]
    references = {}
    for problem in CHECKED:
        references[problem] = [_against_cvxpylayers(cfg, problem, size, cfg.n_repeats(3), caps)
                               for size in progress(REFERENCE_SIZES[mode], desc=f"{NAME}: {problem} vs cvxpylayers",
                                                    enabled=cfg.progress)]
    env = finish_environment(env, started)
    payload = {
        "benchmark": NAME,
        "command": cfg.command(NAME),
        "environment": env,
        "settings": {"strategies_dtype": cfg.dtype, "references_dtype": "float64", "caps_seconds": caps,
                     "repeats": repeats, "cvxpylayers": "SCS, eps_abs = eps_rel = 1e-9, max_iters 1e5, dense derivative"},
        "results": {"strategies": strategies, "references": references},
    }
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    chart = _chart(payload, out)
    write_markdown(out / f"{NAME}.md", "Constrained layers: KKT strategies and cvxpylayers", payload["command"], env,
                   _markdown(payload, chart))
    return payload


# --------------------------------------------------------------------------------- strategies
def _strategies(cfg: BenchConfig, problem: str, size: Size, repeats: int, caps: dict) -> dict[str, Any]:
    B, T, p = size.B, size.T, size.p
    dtype = cfg.torch_dtype
    V64 = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=torch.float64)
    G64 = seeded_like((B, p), seed=cfg.seed + 1, dtype=torch.float64, device="cpu")
    mask = torch.ones(B, T, dtype=torch.bool)
    V, G = V64.to(dtype), G64.to(dtype)
    layers = {s: make_pooling(problem, s).layer for s in STRATEGIES}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = layers["woodbury"].solve(V, mask)
    mult = sol.multipliers
    # the exact gradient of the backward: dense KKT in float64 at the same solution (same active set)
    sol64 = Solution(sol.u.double(), converged=sol.converged, multipliers=Multipliers(
        *(x.double() if x is not None and x.is_floating_point() else x for x in
          (mult.eq, mult.ineq, mult.active, mult.weakly_active, mult.kkt_residual, mult.violation))))
    ref = make_pooling(problem, "dense").layer.implicit_vjp(V64, mask, sol64, G64)
    active = int(mult.active.sum(-1).max()) if mult.active is not None and mult.active.shape[1] else 0
    row: dict[str, Any] = {"B": B, "T": T, "p": p, "active_rows": mult.eq.shape[1] + active,
                           "converged": bool(sol.converged.all()), "strategies": {},
                           "forward_warnings": sorted({str(w.message)[:200] for w in caught})}
    cases: dict[str, Callable[[Stopwatch], None]] = {}

    def forward(sw: Stopwatch) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recorded once above
            sw.start()
            layers["woodbury"].solve(V, mask)
            sw.lap("forward")

    cases["forward"] = forward
    for s, layer in layers.items():
        entry: dict[str, Any] = {}
        row["strategies"][s] = entry
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dV = layer.implicit_vjp(V, mask, sol, G)
        except Exception as exc:  # a strategy that fails is reported, not hidden
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
            continue
        first = time.perf_counter() - t0
        entry.update(status="ok", first_call_seconds=first, warnings=sorted({str(w.message)[:160] for w in caught}))
        entry["grad_rel_err"], _, entry["grad_cosine"] = errors(dV, ref)
        if first > caps["call"]:
            entry["note"] = f"first call {fmt_time(first)} > cap {fmt_time(caps['call'])}: not repeated"
            continue

        def case(sw: Stopwatch, layer=layer) -> None:
            sw.start()
            layer.implicit_vjp(V, mask, sol, G)
            sw.lap("backward")

        cases[s] = case
    timings = time_interleaved(cases, repeats=repeats, warmup=cfg.warmup)
    row["forward"] = timings.pop("forward")["forward"]
    for s, t in timings.items():
        row["strategies"][s]["backward"] = t["backward"]
    return row


# ------------------------------------------------------------------------------ cvxpylayers
def _against_cvxpylayers(cfg: BenchConfig, problem: str, size: Size, repeats: int, caps: dict) -> dict[str, Any]:
    from poolings.reference.cvxpy_constrained import CHECKS

    B, T, p = size.B, size.T, size.p
    check = CHECKS[problem]
    gen = torch.Generator().manual_seed(cfg.seed)
    V = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    G = torch.randn(B, p, generator=gen, dtype=torch.float64)
    lengths = torch.full((B,), T, dtype=torch.long)
    row: dict[str, Any] = {"B": B, "T": T, "p": p}
    ours, ref = check.layer("woodbury"), check.reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["build_seconds"] = ref.prepare(lengths, p)

    def runner(module):
        def run_once(sw: Stopwatch | None):
            X = V.clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if sw:
                    sw.start()
                U = module(X, lengths)
                if sw:
                    sw.lap("forward")
                (dV,) = torch.autograd.grad(U, X, G)
                if sw:
                    sw.lap("backward")
            return U.detach(), dV

        return run_once

    runs = {"ours": runner(ours), "cvxpylayers": runner(ref)}
    outputs, firsts = {}, {}
    for name, r in runs.items():
        t0 = time.perf_counter()
        outputs[name] = r(None)
        firsts[name] = time.perf_counter() - t0
    cases = {name: r for name, r in runs.items() if firsts[name] <= caps["call"]}
    timings = time_interleaved(cases, repeats=repeats, warmup=0) if cases else {}
    for name in runs:
        t = timings.get(name)
        row[name] = {"first_call_seconds": firsts[name], "total": None if t is None else t["total"],
                     "forward": None if t is None else t["forward"], "backward": None if t is None else t["backward"]}
    (U, dV), (U_ref, dV_ref) = outputs["ours"], outputs["cvxpylayers"]
    row["output_rel_err"], _, _ = errors(U, U_ref)
    row["grad_rel_err"], _, row["grad_cosine"] = errors(dV, dV_ref)
    row["ours_accuracy"] = float(check.accuracy(V, U, lengths).max())
    row["ref_accuracy"] = float(ref.kkt_residual(V, U_ref, lengths).max())
    t_ours, t_ref = (_med(row[n]["total"]) or firsts[n] for n in ("ours", "cvxpylayers"))
    row["time_ratio"] = t_ref / t_ours
    return row


# --------------------------------------------------------------------------------- reporting
def _med(t: Any) -> float | None:
    if t is None:
        return None
    return t.median if hasattr(t, "median") else t["median"]


def _markdown(payload: dict[str, Any], chart: str) -> str:
    res = payload["results"]
    parts = [
        f"Backward of each KKT strategy on one stored forward solution ({payload['settings']['strategies_dtype']}, "
        f"medians of {payload['settings']['repeats']} interleaved rounds); the gradient error is against the dense "
        "KKT gradient in float64 at the same solution and active set. `r` is the largest number of active "
        "constraint rows in the batch. "
        "`woodbury`, `cg` and `diagonal` solve the KKT system by the Schur complement; `dense` factorises the "
        "full KKT matrix; `projected_cg` works in the tangent space.",
    ]
    head = ["B × T × p", "r", "forward", *[f"{s}" for s in STRATEGIES]]
    for problem, rows in res["strategies"].items():
        parts.append(f"**{problem}** (backward time; gradient error)")
        body = []
        for r in rows:
            cells = []
            for s in STRATEGIES:
                e = r["strategies"][s]
                if e["status"] != "ok":
                    cells.append(f"{e['status']}: {e['reason'][:80]}")
                    continue
                t = _med(e.get("backward"))
                t_txt = fmt_time(t) if t is not None else f"{fmt_time(e['first_call_seconds'])} (1 run)"
                cells.append(f"{t_txt}; {fmt_err(e['grad_rel_err'])}")
            body.append([f"{r['B']} × {r['T']} × {r['p']}", r["active_rows"], fmt_time(_med(r["forward"])), *cells])
        parts.append(markdown_table(head, body))
        warned = sorted({w for r in rows for w in r.get("forward_warnings", [])})
        if warned:
            parts.append("Warnings of the forward solves:\n\n" + "\n".join(f"- {w}" for w in warned))
    parts.append(
        "Forward + backward against cvxpylayers (float64, the problems of `argminlayers check`; ours with "
        "`backward='woodbury'`). cvxpylayers solves and differentiates the samples of a batch one by one; its layer "
        "build (canonicalisation) is apart. \"ratio\" is cvxpylayers' time over ours; errors are relative, between "
        "the two; \"own accuracy\" is each side's distance to the exact solution (projections) or KKT residual.")
    head = ["problem", "B × T × p", "ours", "cvxpylayers", "ratio", "build", "output error", "gradient error",
            "ours: own accuracy", "cvxpylayers: own accuracy"]
    body = []
    for problem, rows in res["references"].items():
        for r in rows:
            def cell(name):
                t = _med(r[name]["total"])
                return fmt_time(t) if t is not None else f"{fmt_time(r[name]['first_call_seconds'])} (1 run)"

            body.append([problem, f"{r['B']} × {r['T']} × {r['p']}", cell("ours"), cell("cvxpylayers"),
                         fmt_ratio(r["time_ratio"]), fmt_time(r["build_seconds"]), fmt_err(r["output_rel_err"]),
                         fmt_err(r["grad_rel_err"]), fmt_err(r["ours_accuracy"]), fmt_err(r["ref_accuracy"])])
    parts.append(markdown_table(head, body))
    parts.append(_summary(payload))
    parts.append(f"![{chart}]({chart})")
    return "\n\n".join(parts)


def _summary(payload: dict[str, Any]) -> str:
    res = payload["results"]
    lines = ["**In this run:**"]
    for problem, rows in res["strategies"].items():
        r = rows[-1]
        times = {s: _med(e.get("backward")) for s, e in r["strategies"].items()
                 if e["status"] == "ok" and s != "diagonal"}  # diagonal: an approximation unless H is diagonal
        times = {s: t for s, t in times.items() if t is not None}
        if times:
            best = min(times, key=times.get)
            dense = times.get("dense")
            extra = f", dense KKT {fmt_ratio(dense / times[best])} its time" if dense and best != "dense" else ""
            lines.append(f"- {problem} at {r['B']} × {r['T']} × {r['p']}: fastest exact backward `{best}` "
                         f"({fmt_time(times[best])}, gradient error {fmt_err(r['strategies'][best]['grad_rel_err'])})"
                         f"{extra}.")
    for problem, rows in res["references"].items():
        ratios = ", ".join(f"B = {r['B']}: {fmt_ratio(r['time_ratio'])}" for r in rows)
        worst = max(r["grad_rel_err"] for r in rows)
        lines.append(f"- {problem}: cvxpylayers' time over ours {ratios}; gradients agree to {fmt_err(worst)}.")
    return "\n".join(lines)


def _chart(payload: dict[str, Any], out) -> str:
    plt = plt_module()
    res = payload["results"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, problem in zip(axes[:2], ("sphere_rank", "simplex")):
        rows = res["strategies"].get(problem, [])
        for s in STRATEGIES:
            xs, ys = [], []
            for r in rows:
                e = r["strategies"][s]
                t = _med(e.get("backward")) if e["status"] == "ok" else None
                if t is None and e["status"] == "ok":
                    t = e["first_call_seconds"]
                if t is not None:
                    xs.append(r["p"])
                    ys.append(t)
            ax.plot(xs, ys, marker="o", label=s, color=COLORS[s])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("p")
        ax.set_ylabel("backward (s)")
        ax.set_title(f"{problem}: KKT strategies", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    for j, (problem, rows) in enumerate(res["references"].items()):
        ax.plot([r["B"] for r in rows], [r["time_ratio"] for r in rows], marker="o", label=problem, color=f"C{j}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("cvxpylayers time / ours")
    ax.set_title("forward + backward, float64", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    name = f"{NAME}.png"
    save_figure(fig, out / name)
    return name


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
