"""How close rank pooling runs to its floor: the Gram product ``V Vᵀ``.

The exact forward solve needs one Gram product ``K = V Vᵀ`` (``O(B T² p)``, one batched GEMM)
and a pass ``u = Vᵀβ``; the exact backward two passes over ``V`` and one rank-2 product.
Nothing else touches ``V``. So the time of one Gram product of the same size is the
yardstick (the faster of ``torch.bmm(V, V.transpose(1, 2))`` and BLAS ``syrk``, which RankPool
itself calls on the CPU), and the benchmark reports every time as a multiple of it,
measured interleaved in the same rounds (Gram, exact layer, diagonal layer, Gram, …).

Goals, at the paper's feature size ``p = 4096``, ``B = 16``, ``T ∈ {50, 100, 200}``:

- forward + exact (Woodbury) backward ≤ 4 × Gram;
- exact backward ≤ 1.25 × the diagonal approximation's backward.

Each verdict is printed plainly, met or missed, per ``T``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .common import (
    BenchConfig,
    Stopwatch,
    environment,
    finish_environment,
    fmt_ratio,
    fmt_timing,
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

NAME = "limit"
FULL = {"B": 16, "p": 4096, "T_values": (50, 100, 200)}
QUICK = {"B": 2, "p": 32, "T_values": (8, 16)}
GOAL_LAYER_OVER_GRAM = 4.0
GOAL_EXACT_OVER_DIAGONAL = 1.25
BACKWARD_STEPS = ("hessian", "solve", "vjp")


def _per_round(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``a_i / b_i`` (rounds were interleaved)."""
    r = sorted(x / y for x, y in zip(a, b))
    if len(r) == 1:
        return {"median": r[0], "q1": r[0], "q3": r[0]}
    q1, med, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return {"median": statistics.median(r), "q1": q1, "q3": q3}


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Rank pooling forward + backward as a multiple of one Gram product V Vᵀ."""
    with cfg.applied():
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict[str, Any]:
    from poolings import RankPool
    from poolings.rank.factored import gram as symmetric_gram

    started = time.perf_counter()
    env = environment(cfg)
    sizes = QUICK if cfg.quick else FULL
    repeats = cfg.n_repeats(9, quick=3)
    dtype, device = cfg.torch_dtype, cfg.torch_device
    B, p = sizes["B"], sizes["p"]
    pools = {"woodbury": RankPool(C=1.0, eps=0.1, backward="woodbury"),
             "diagonal": RankPool(C=1.0, eps=0.1, backward="diagonal")}
    results = []
    for T in progress(sizes["T_values"], desc=NAME, enabled=cfg.progress):
        V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=dtype, device=device)
        G = seeded_like((B, p), seed=cfg.seed + 1, dtype=dtype, device=device)
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        sol = pools["woodbury"].layer.solve(V, mask)

        def gram(sw: Stopwatch) -> None:
            sw.start()
            torch.bmm(V, V.transpose(1, 2))
            sw.lap("gram")

        def syrk(sw: Stopwatch) -> None:  # the symmetric product RankPool itself uses on the CPU
            sw.start()
            symmetric_gram(V, outer=True)
            sw.lap("gram")

        def layer_case(pool):
            def case(sw: Stopwatch) -> None:
                X = V.detach().requires_grad_(True)
                sw.start()
                U = pool(X)
                sw.lap("forward")
                U.backward(G)
                sw.lap("backward")

            return case

        def steps_case(pool):
            """The backward's three steps one by one, as ``ArgminLayer.implicit_vjp`` calls them."""
            layer = pool.layer

            def case(sw: Stopwatch) -> None:
                sw.start()
                H = layer.objective.hessian(V, sol.u, mask, sol.state)
                sw.lap("hessian")
                W = layer.strategy.solve(H, G)
                sw.lap("solve")
                layer.objective.vjp_v(V, sol.u, mask, W, sol.state)
                sw.lap("vjp")

            return case

        cases = {"gram": gram, "syrk": syrk, **{name: layer_case(pool) for name, pool in pools.items()},
                 **{f"{name}_steps": steps_case(pool) for name, pool in pools.items()}}
        t = time_interleaved(cases, repeats=repeats, warmup=cfg.warmup, device=device)
        g = min(t["gram"]["gram"], t["syrk"]["gram"], key=lambda s: s.median)  # the faster of the two
        row: dict[str, Any] = {
            "B": B, "T": T, "p": p,
            "forward_iterations_max": int(sol.iterations.max()),
            "forward_iterations_mean": float(sol.iterations.float().mean()),
            "active_fraction": float(sol.state.active.float().mean()) if sol.state is not None else None,
            "converged": bool(sol.converged.all()),
            "gram": g,
        }
        for name in pools:
            ph = t[name]
            row[name] = {
                "forward": ph["forward"], "backward": ph["backward"], "total": ph["total"],
                "total_over_gram": ph["total"].median / g.median,
                "forward_over_gram": ph["forward"].median / g.median,
                "backward_over_gram": ph["backward"].median / g.median,
                "total_over_gram_per_round": _per_round(ph["total"].samples, g.samples),
                "backward_steps": {step: t[f"{name}_steps"][step] for step in BACKWARD_STEPS},
            }
        row["exact_backward_over_diagonal"] = t["woodbury"]["backward"].median / t["diagonal"]["backward"].median
        row["exact_backward_over_diagonal_per_round"] = _per_round(
            t["woodbury"]["backward"].samples, t["diagonal"]["backward"].samples)
        row["goal_layer_met"] = row["woodbury"]["total_over_gram"] <= GOAL_LAYER_OVER_GRAM
        row["goal_backward_met"] = row["exact_backward_over_diagonal"] <= GOAL_EXACT_OVER_DIAGONAL
        results.append(row)

    env = finish_environment(env, started)
    payload = {
        "benchmark": NAME,
        "command": cfg.command(NAME),
        "environment": env,
        "settings": {"repeats": repeats, "warmup": cfg.warmup, "C": 1.0, "eps": 0.1,
                     "goal_layer_over_gram": GOAL_LAYER_OVER_GRAM,
                     "goal_exact_backward_over_diagonal": GOAL_EXACT_OVER_DIAGONAL},
        "results": results,
    }
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    chart = _chart(payload, out)
    write_markdown(out / f"{NAME}.md", "The limit: rank pooling against one Gram product", payload["command"], env,
                   _markdown(payload, chart))
    return payload


def _markdown(payload: dict[str, Any], chart: str) -> str:
    s = payload["settings"]
    rs = payload["results"]
    parts = [
        f"`RankPool(C=1, eps=0.1)` forward + backward (autograd, upstream gradient random) against one "
        "Gram product `V Vᵀ` of the same size (the faster of `torch.bmm` and BLAS `syrk`, whose triangle RankPool "
        f"computes on the CPU), all interleaved: medians of {s['repeats']} rounds "
        f"after {s['warmup']} warm-up. Ratios are ratios of medians; the per-round column gives the median and "
        "quartiles of the ratios formed within each round.",
    ]
    head = ["B × T × p", "Gram", "forward", "exact backward", "diagonal backward", "forward iters (max/mean)",
            "active"]
    body = [[f"{r['B']} × {r['T']} × {r['p']}", fmt_timing(r["gram"]), fmt_timing(r["woodbury"]["forward"]),
             fmt_timing(r["woodbury"]["backward"]), fmt_timing(r["diagonal"]["backward"]),
             f"{r['forward_iterations_max']} / {r['forward_iterations_mean']:.1f}",
             f"{100 * r['active_fraction']:.0f} %" if r["active_fraction"] is not None else "–"] for r in rs]
    parts.append(markdown_table(head, body))
    head = ["T", "exact layer / Gram", "per round", "forward / Gram", "exact backward / Gram",
            "diagonal layer / Gram", f"goal ≤ {s['goal_layer_over_gram']:g}×"]
    body = []
    for r in rs:
        pr = r["woodbury"]["total_over_gram_per_round"]
        body.append([r["T"], fmt_ratio(r["woodbury"]["total_over_gram"]),
                     f"{pr['median']:.2f} [{pr['q1']:.2f}, {pr['q3']:.2f}]",
                     fmt_ratio(r["woodbury"]["forward_over_gram"]), fmt_ratio(r["woodbury"]["backward_over_gram"]),
                     fmt_ratio(r["diagonal"]["total_over_gram"]), "met" if r["goal_layer_met"] else "**missed**"])
    parts.append(markdown_table(head, body))
    head = ["T", "exact backward / diagonal backward", "per round", f"goal ≤ {s['goal_exact_backward_over_diagonal']:g}×"]
    body = []
    for r in rs:
        pr = r["exact_backward_over_diagonal_per_round"]
        body.append([r["T"], fmt_ratio(r["exact_backward_over_diagonal"]),
                     f"{pr['median']:.2f} [{pr['q1']:.2f}, {pr['q3']:.2f}]",
                     "met" if r["goal_backward_met"] else "**missed**"])
    parts.append(markdown_table(head, body))
    parts.append(
        "Where the backward's time goes: the three steps `ArgminLayer.implicit_vjp` calls (`objective.hessian` → "
        "`strategy.solve` → `objective.vjp_v`), timed one by one on the stored solution in the same rounds, in Gram "
        "products; \"rest\" is the autograd backward's median minus the steps' medians (sign, padding mask, "
        "autograd; noise can make it negative):"
    )
    head = ["T", "strategy", "Hessian operator", "w = H⁻¹g", "vjp through ∇f", "rest", "autograd backward"]
    body = []
    for r in rs:
        gm = r["gram"].median if hasattr(r["gram"], "median") else r["gram"]["median"]
        for name in ("woodbury", "diagonal"):
            med = {k: (v.median if hasattr(v, "median") else v["median"]) for k, v in r[name]["backward_steps"].items()}
            rest = r[name]["backward_over_gram"] - sum(med.values()) / gm
            body.append([r["T"], name] + [fmt_ratio(med[k] / gm) for k in BACKWARD_STEPS]
                        + [f"{rest:.3g}×", fmt_ratio(r[name]["backward_over_gram"])])
    parts.append(markdown_table(head, body))
    parts.append(_verdict(payload))
    parts.append(f"![{chart}]({chart})")
    return "\n\n".join(parts)


def _verdict(payload: dict[str, Any]) -> str:
    s, rs = payload["settings"], payload["results"]
    lines = ["**Verdict of this run:**"]
    met = [r["T"] for r in rs if r["goal_layer_met"]]
    missed = [r for r in rs if not r["goal_layer_met"]]
    g = s["goal_layer_over_gram"]
    if not missed:
        lines.append(f"- Layer ≤ {g:g}× Gram: **met** at every T ({', '.join(str(t) for t in met)}).")
    else:
        lines.append(
            f"- Layer ≤ {g:g}× Gram: **missed** at T = "
            + ", ".join(f"{r['T']} ({r['woodbury']['total_over_gram']:.2f}×)" for r in missed)
            + (f"; met at T = {', '.join(str(t) for t in met)}." if met else ".")
        )
        worst = max(missed, key=lambda r: r["woodbury"]["total_over_gram"])
        lines.append(
            f"  At T = {worst['T']} the forward alone takes {worst['woodbury']['forward_over_gram']:.2f}× Gram "
            f"({worst['forward_iterations_max']} active-set iterations at most) and the exact backward "
            f"{worst['woodbury']['backward_over_gram']:.2f}×."
        )
    b = s["goal_exact_backward_over_diagonal"]
    missed = [r for r in rs if not r["goal_backward_met"]]
    if not missed:
        ratios = ", ".join(f"{r['exact_backward_over_diagonal']:.2f}×" for r in rs)
        lines.append(f"- Exact backward ≤ {b:g}× diagonal backward: **met** at every T ({ratios}).")
    else:
        lines.append(f"- Exact backward ≤ {b:g}× diagonal backward: **missed** at T = "
                     + ", ".join(f"{r['T']} ({r['exact_backward_over_diagonal']:.2f}×)" for r in missed) + ".")
    return "\n".join(lines)


def _chart(payload: dict[str, Any], out) -> str:
    plt = plt_module()
    rs = payload["results"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.38
    for i, r in enumerate(rs):
        for j, (name, color) in enumerate((("woodbury", "C0"), ("diagonal", "C1"))):
            x = i + (j - 0.5) * width
            f, b = r[name]["forward_over_gram"], r[name]["backward_over_gram"]
            ax.bar(x, f, width, color=color, alpha=0.55, label=f"{name}: forward" if i == 0 else None)
            ax.bar(x, b, width, bottom=f, color=color, label=f"{name}: backward" if i == 0 else None)
    ax.axhline(payload["settings"]["goal_layer_over_gram"], color="k", ls="--", lw=1, label="goal: 4× Gram")
    ax.set_xticks(range(len(rs)), [f"T = {r['T']}" for r in rs])
    ax.set_ylabel("time / Gram product time")
    B, p = (rs[0]["B"], rs[0]["p"]) if rs else ("?", "?")
    ax.set_title(f"RankPool forward + backward in Gram products (B = {B}, p = {p}, "
                 f"{payload['environment']['dtype']})", fontsize=9)
    top = max([r[n]["total_over_gram"] for r in rs for n in ("woodbury", "diagonal")] + [GOAL_LAYER_OVER_GRAM])
    ax.set_ylim(0, 1.45 * top)
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(True, axis="y", alpha=0.3)
    name = f"{NAME}.png"
    save_figure(fig, out / name)
    return name


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
