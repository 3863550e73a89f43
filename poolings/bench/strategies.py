"""Backward strategies compared: time, peak memory and gradient error, swept over ``T`` and ``p``.

For each objective and size ``(B, T, p)`` the forward solve runs once per round, and each
strategy's backward pass runs on the stored solution, interleaved in the same rounds.
The backward of a strategy is exactly what the autograd backward of
:class:`~argminlayers.ArgminLayer` runs, :meth:`~argminlayers.ArgminLayer.implicit_vjp`:
the Hessian operator at ``u*``, ``w = H⁻¹ g`` by the strategy, then one reverse pass
``dL/dV = −∂/∂V [wᵀ ∇_u f]``. The gradient error is measured against the exact gradient
computed in float64 (Woodbury on a float64 forward solve), for the same upstream gradient
``g``: relative error ``‖dV − dV*‖ / ‖dV*‖`` and cosine.

Objectives:

- ``rank``: :class:`poolings.RankPool` (``f = ½‖u‖² + C/2 Σ_t [|t − uᵀv_t| − ε]₊²``, its own
  T-space active-set forward solve; ``H = I + C V_Aᵀ V_A``).
- ``logcosh``: :class:`argminlayers.objectives.LogCoshRegression`, the smooth analogue
  (``H = I + C Σ_t sech²(r_t) v_t v_tᵀ``), solved by the generic ``newton_cg`` solver.

A strategy whose projected time or memory at a size exceeds the caps is not run; the result
says ``skipped`` with the reason and the projection: time from the strategy's cost model
(table below) scaled from the nearest measured size, memory from the matrices it
materialises. A strategy whose first (warm-up) run takes longer than the cap is reported
with that one run and not repeated.

=================  ===============================  ===========================
strategy           cost model (per batch)            materialises
=================  ===============================  ===========================
dense              ``B (T p² + p³/3)``               ``H``: ``B p²``
diagonal           ``B T p``                         ``B T p``
sherman_morrison   ``4 B T p²``                      ``H⁻¹``: ``B p²``
woodbury           ``B T p`` (+ ``B T² p`` w/o       ``B T p`` (+ ``B T²``)
                   the forward's factor)
cg                 ``k B T p``                        ``B T p``
=================  ===============================  ===========================
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from argminlayers import ArgminLayer
from argminlayers.check import errors
from argminlayers.objectives import LogCoshRegression

from .common import (
    BenchConfig,
    Stopwatch,
    environment,
    finish_environment,
    fmt_bytes,
    fmt_err,
    fmt_time,
    make_sequences,
    markdown_table,
    module_main,
    output_dir,
    peak_memory,
    plt_module,
    progress,
    save_figure,
    seeded_like,
    summarize,
    time_interleaved,
    write_json,
    write_markdown,
)

NAME = "strategies"
STRATEGIES = ("dense", "diagonal", "sherman_morrison", "woodbury", "cg")
COLORS = {"dense": "C3", "diagonal": "C1", "sherman_morrison": "C4", "woodbury": "C0", "cg": "C2"}


@dataclass(frozen=True)
class Sweep:
    """One objective's sizes: ``T`` swept at ``p_fixed``, ``p`` swept at ``T_fixed``, batch ``B``."""

    objective: str
    B: int
    T_values: tuple[int, ...]
    p_fixed: int
    p_values: tuple[int, ...]
    T_fixed: int

    def sizes(self) -> list[tuple[str, int, int, int]]:
        out = [("T", self.B, T, self.p_fixed) for T in self.T_values]
        out += [("p", self.B, self.T_fixed, p) for p in self.p_values]
        return out


FULL = (
    Sweep("rank", B=16, T_values=(25, 50, 100, 200, 500, 1000), p_fixed=1024, p_values=(64, 256, 1024, 4096),
          T_fixed=100),
    Sweep("logcosh", B=2, T_values=(25, 50, 100, 200, 500, 1000), p_fixed=256, p_values=(64, 256, 1024, 4096),
          T_fixed=100),
)
QUICK = (
    Sweep("rank", B=3, T_values=(6, 12), p_fixed=8, p_values=(16,), T_fixed=6),
    Sweep("logcosh", B=2, T_values=(6, 12), p_fixed=8, p_values=(16,), T_fixed=6),
)

# caps: seconds of one backward call (projected, or its first run), of one forward call, and
# bytes of one materialised p × p (or T × T) batch
CAPS = {
    "full": {"seconds": 3.0, "forward_seconds": 10.0, "bytes": 1 << 30},
    "quick": {"seconds": 5.0, "forward_seconds": 10.0, "bytes": 1 << 28},
}

OBJECTIVE_LABELS = {
    "rank": "RankPool (C = 1, ε = 0.1; T-space active-set forward)",
    "logcosh": "LogCoshRegression (C = 1; generic newton_cg forward)",
}


# ----------------------------------------------------------------------------- the layers
def make_layer(objective: str, strategy: str) -> ArgminLayer:
    """The :class:`~argminlayers.ArgminLayer` of ``objective`` with backward ``strategy``."""
    if objective == "rank":
        try:
            from poolings import RankPool
        except ImportError as exc:
            raise RuntimeError(f"poolings.RankPool is not available: {exc}") from exc
        return RankPool(C=1.0, eps=0.1, backward=strategy).layer
    if objective == "logcosh":
        return ArgminLayer(LogCoshRegression(C=1.0), solver="newton_cg", backward=strategy)
    raise ValueError(f"objective must be 'rank' or 'logcosh', got {objective!r}")


# ----------------------------------------------------------------------------- cost model
def backward_cost(strategy: str, objective: str, B: int, T: int, p: int, itemsize: int) -> tuple[float, float]:
    """``(work, bytes)``: the cost model of a strategy's backward (arbitrary units of work) and
    the bytes of the largest array it materialises."""
    if strategy == "dense":
        return B * (T * p * p + p**3 / 3), B * p * p * itemsize
    if strategy == "sherman_morrison":
        return 4.0 * B * T * p * p, B * p * p * itemsize
    if strategy == "woodbury":
        if objective == "rank":  # the forward's T × T factor is reused
            return B * T * (p + T), B * T * p * itemsize
        return B * (T * T * p + T**3 / 3), B * max(T * p, T * T) * itemsize
    if strategy in ("diagonal", "cg"):
        return float(B * T * p), B * T * p * itemsize
    raise ValueError(f"unknown strategy {strategy!r}")


def forward_cost(objective: str, B: int, T: int, p: int) -> float:
    """Cost model of the forward solve: Gram product + T-space iterations (rank), k HVPs (logcosh)."""
    if objective == "rank":
        return B * (T * T * p + T**3)
    return B * T * p + 2e5 * B  # generic solver: per-iteration Python overhead dominates small sizes


class Projections:
    """Measured ``(work, seconds)`` points per ``(objective, strategy)``, and projections from them.

    A projection scales the measured point nearest below in work (else the smallest above)
    linearly in the cost model: ``seconds × work / work_measured``.
    """

    def __init__(self) -> None:
        self.points: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def add(self, objective: str, what: str, work: float, seconds: float) -> None:
        self.points.setdefault((objective, what), []).append((work, seconds))

    def project(self, objective: str, what: str, work: float) -> float | None:
        pts = self.points.get((objective, what))
        if not pts:
            return None
        below = [pt for pt in pts if pt[0] <= work]
        w, t = max(below) if below else min(pts)
        return t * work / w


# ----------------------------------------------------------------------------------- run
def run(cfg: BenchConfig) -> dict[str, Any]:
    """Backward strategies: time, memory and gradient error over T and p."""
    with cfg.applied():
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    env = environment(cfg)
    sweeps = QUICK if cfg.quick else FULL
    caps = cfg.caps(CAPS["quick" if cfg.quick else "full"])
    repeats = cfg.n_repeats(3)

    results: list[dict[str, Any]] = []
    notes: list[str] = []
    todo = [(sw.objective, *size) for sw in sweeps for size in sw.sizes()]
    proj = Projections()
    done: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for objective, sweep, B, T, p in progress(todo, desc=NAME, enabled=cfg.progress):
        key = (objective, B, T, p)
        if key in done:  # the same size in the other sweep: the same measurement
            row = {**copy.deepcopy(done[key]), "sweep": sweep, "same_as_sweep": done[key]["sweep"]}
        else:
            row = _one_size(cfg, objective, sweep, B, T, p, repeats, caps, proj)
            done[key] = row
        results.append(row)

    env = finish_environment(env, started)
    first = next((r for r in results if r["forward"]["status"] == "ok"), None)
    payload = {
        "benchmark": NAME,
        "command": cfg.command(NAME),
        "environment": env,
        "settings": {
            "strategies": list(STRATEGIES),
            "sweeps": [sw.__dict__ for sw in sweeps],
            "repeats": repeats,
            "warmup": max(cfg.warmup, 1),  # the first warm-up run measures memory
            "caps": caps,
            "gradient_reference": "woodbury on a float64 forward solve of the same data (exact)",
            "memory_method": first["forward"]["memory"].method if first else None,
        },
        "notes": notes,
        "results": results,
    }
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    charts = _charts(payload, out)
    write_markdown(out / f"{NAME}.md", "Backward strategies", payload["command"], env, _markdown(payload, charts))
    return payload


def _skip(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, **extra}


def _one_size(cfg, objective, sweep, B, T, p, repeats, caps, proj: Projections) -> dict[str, Any]:
    """Forward once per round, every strategy's backward on its solution, interleaved."""
    dtype, device = cfg.torch_dtype, cfg.torch_device
    itemsize = torch.finfo(dtype).bits // 8
    row: dict[str, Any] = {"objective": objective, "sweep": sweep, "B": B, "T": T, "p": p}
    fwork = forward_cost(objective, B, T, p)
    fproj = proj.project(objective, "forward", fwork)
    if fproj is not None and fproj > caps["forward_seconds"]:
        row["forward"] = _skip(f"forward projected {fmt_time(fproj)} > cap {fmt_time(caps['forward_seconds'])}",
                               projected_seconds=fproj)
        row["strategies"] = {s: _skip("forward skipped") for s in STRATEGIES}
        return row

    V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=dtype, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    G = seeded_like((B, p), seed=cfg.seed + 1, dtype=dtype, device=device)
    base = make_layer(objective, "woodbury")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        sol = base.solve(V, mask)
        first_forward = time.perf_counter() - t0
    forward: dict[str, Any] = {
        "status": "ok",
        "iterations_max": int(sol.iterations.max()) if sol.iterations is not None else None,
        "iterations_mean": float(sol.iterations.float().mean()) if sol.iterations is not None else None,
        "converged": bool(sol.converged.all()) if sol.converged is not None else True,
        "warnings": sorted({str(w.message)[:200] for w in caught}),
    }
    if first_forward > caps["forward_seconds"]:
        proj.add(objective, "forward", fwork, first_forward)
        row["forward"] = _skip(f"one forward solve took {fmt_time(first_forward)} > cap "
                               f"{fmt_time(caps['forward_seconds'])}", projected_seconds=first_forward)
        row["strategies"] = {s: _skip("forward over the cap") for s in STRATEGIES}
        return row

    # the exact gradient in float64: the reference of every error
    V64, G64 = V.double(), G.double()
    ref = make_layer(objective, "woodbury")
    sol64 = sol if dtype == torch.float64 else ref.solve(V64, mask)
    dV_ref = ref.implicit_vjp(V64, mask, sol64, G64)
    dV_same = base.implicit_vjp(V, mask, sol, G)  # woodbury at the benchmark's dtype

    layers: dict[str, ArgminLayer] = {}
    strategies: dict[str, dict[str, Any]] = {}
    for s in STRATEGIES:
        work, nbytes = backward_cost(s, objective, B, T, p, itemsize)
        projected = proj.project(objective, s, work)
        if nbytes >= caps["bytes"]:
            strategies[s] = _skip(f"materialises {fmt_bytes(nbytes)} ≥ cap {fmt_bytes(caps['bytes'])}",
                                  projected_seconds=projected, projected_bytes=nbytes)
        elif projected is not None and projected > caps["seconds"]:
            strategies[s] = _skip(f"projected {fmt_time(projected)} > cap {fmt_time(caps['seconds'])}",
                                  projected_seconds=projected, projected_bytes=nbytes)
        else:
            layers[s] = make_layer(objective, s)
            strategies[s] = {"status": "ok", "work": work}

    outputs: dict[str, torch.Tensor] = {}
    raised: dict[str, set[str]] = {s: set() for s in layers}

    def forward_case(sw: Stopwatch) -> None:
        sw.start()
        base(V, mask)
        sw.lap("forward")

    def backward_case(s: str) -> Callable[[Stopwatch], None]:
        layer = layers[s]

        def case(sw: Stopwatch) -> None:
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                sw.start()
                outputs[s] = layer.implicit_vjp(V, mask, sol, G)
                sw.lap("backward")
            raised[s].update(str(w.message)[:200] for w in ws)

        return case

    cases = {"forward": forward_case, **{s: backward_case(s) for s in layers}}
    memory, first_call = {}, {}
    for name, case in cases.items():
        # the first warm-up run of each case measures its memory; a case whose first run is
        # over the cap is not repeated
        t0 = time.perf_counter()
        memory[name] = peak_memory(lambda c=case: c(Stopwatch(device)), device)
        first_call[name] = time.perf_counter() - t0
    over = {s for s in layers if first_call[s] > caps["seconds"]}
    timed = {name: case for name, case in cases.items() if name not in over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = time_interleaved(timed, repeats=repeats, warmup=max(cfg.warmup - 1, 0), device=device)
    forward["time"] = timings["forward"]["forward"]
    forward["memory"] = memory["forward"]
    proj.add(objective, "forward", fwork, forward["time"].median)
    row["forward"] = forward

    for s in layers:
        rel, _, cos = errors(outputs[s], dV_ref)
        rel_same, _, cos_same = errors(outputs[s], dV_same)
        entry = strategies[s]
        if s in over:
            entry.update(time=summarize([first_call[s]]), single_run_over_cap=True,
                         note=f"one run (with memory profiling) took {fmt_time(first_call[s])} > cap "
                              f"{fmt_time(caps['seconds'])}; not repeated")
        else:
            entry["time"] = timings[s]["backward"]
        entry.update(memory=memory[s], grad_rel_err=rel, grad_cosine=cos, grad_rel_err_same_dtype=rel_same,
                     grad_cosine_same_dtype=cos_same, warnings=sorted(raised[s]))
        proj.add(objective, s, entry["work"], entry["time"].median)
    row["strategies"] = strategies
    return row


# ------------------------------------------------------------------------------ reporting
def _cell_time(entry: dict[str, Any]) -> str:
    if entry["status"] == "ok":
        t = fmt_time(_get(entry["time"], "median"))
        return f"{t} (1 run, over the cap)" if entry.get("single_run_over_cap") else t
    return f"skipped ({entry['reason']})"


def _get(t: Any, key: str) -> Any:
    return getattr(t, key) if hasattr(t, key) else t[key]


def _markdown(payload: dict[str, Any], charts: list[str]) -> str:
    s = payload["settings"]
    parts = [
        "Backward pass (the layer's `implicit_vjp`: Hessian operator, `w = H⁻¹g`, one reverse pass) of each "
        "strategy on the same forward solution; medians of "
        f"{s['repeats']} interleaved runs after {s['warmup']} warm-up run(s), the first of which measures memory. Gradient error: against the exact gradient "
        "computed in float64 (Woodbury on a float64 forward solve), as relative error / cosine. "
        f"Memory: {s['memory_method']}. Caps: a backward call over {fmt_time(s['caps']['seconds'])} (projected from "
        "the nearest measured size by the strategy's cost model, or its first run) or materialising "
        f"{fmt_bytes(s['caps']['bytes'])} is skipped (or not repeated), and so is a size whose forward solve is "
        f"over {fmt_time(s['caps']['forward_seconds'])}; the tables give the reason and the projection.",
    ]
    parts += [f"Note: {n}" for n in payload["notes"]]
    for objective in ("rank", "logcosh"):
        rows = [r for r in payload["results"] if r["objective"] == objective]
        if not rows:
            continue
        parts.append(f"### {OBJECTIVE_LABELS[objective]}")
        for sweep in ("T", "p"):
            rs = [r for r in rows if r["sweep"] == sweep]
            if not rs:
                continue
            fixed = f"p = {rs[0]['p']}" if sweep == "T" else f"T = {rs[0]['T']}"
            parts.append(f"**Sweep over {sweep}** (B = {rs[0]['B']}, {fixed}). Backward time (median):")
            head = [sweep, "forward (iters)"] + list(STRATEGIES)
            body = []
            for r in rs:
                f = r["forward"]
                fcell = (f"{fmt_time(_get(f['time'], 'median'))} ({f['iterations_max']})" if f["status"] == "ok"
                         else f"skipped ({f['reason']})")
                body.append([r[sweep], fcell] + [_cell_time(r["strategies"][st]) for st in STRATEGIES])
            parts.append(markdown_table(head, body))
            parts.append("Peak memory of the backward (forward in the second column):")
            body = []
            for r in rs:
                f = r["forward"]
                fcell = fmt_bytes(_get(f["memory"], "bytes")) if f["status"] == "ok" else "–"
                cells = []
                for st in STRATEGIES:
                    e = r["strategies"][st]
                    cells.append(fmt_bytes(_get(e["memory"], "bytes")) if e["status"] == "ok"
                                 else (f"≥ {fmt_bytes(e['projected_bytes'])} (skipped)" if e.get("projected_bytes")
                                       else "skipped"))
                body.append([r[sweep], fcell] + cells)
            parts.append(markdown_table([sweep, "forward"] + list(STRATEGIES), body))
            parts.append("Gradient error against the exact float64 gradient (relative error / cosine):")
            body = []
            for r in rs:
                cells = []
                for st in STRATEGIES:
                    e = r["strategies"][st]
                    cells.append(f"{fmt_err(e['grad_rel_err'])} / {e['grad_cosine']:.4f}" if e["status"] == "ok"
                                 else "–")
                body.append([r[sweep]] + cells)
            parts.append(markdown_table([sweep] + list(STRATEGIES), body))
            warned = sorted({f"{st} at {sweep} = {r[sweep]}: {w}" for r in rs for st in STRATEGIES
                             for w in r["strategies"][st].get("warnings", [])})
            if warned:
                parts.append("Warnings raised during the runs:\n\n" + "\n".join(f"- {w}" for w in warned))
    parts.append(_verdicts(payload))
    parts += [f"![{c}]({c})" for c in charts]
    return "\n\n".join(parts)


def _verdicts(payload: dict[str, Any]) -> str:
    """Plain sentences from the numbers: where each strategy stops being usable, the diagonal's error."""
    lines = ["**Where each strategy stops being usable in this run** (the first size over a cap):"]
    for objective in ("rank", "logcosh"):
        for sweep in ("T", "p"):
            rs = [r for r in payload["results"] if r["objective"] == objective and r["sweep"] == sweep]
            if not rs:
                continue
            usable, stops = [], []
            for st in STRATEGIES:
                first = next((r for r in rs if r["strategies"][st]["status"] != "ok"
                              or r["strategies"][st].get("single_run_over_cap")), None)
                if first is None:
                    usable.append(st)
                else:
                    e = first["strategies"][st]
                    why = e["note"] if e["status"] == "ok" else e["reason"]
                    stops.append(f"{st} from {sweep} = {first[sweep]} ({why})")
            sizes = ", ".join(str(r[sweep]) for r in rs)
            text = f"- {objective}, {sweep} ∈ {{{sizes}}}: within the caps at every size: {', '.join(usable) or 'none'}"
            lines.append(text + (f"; over a cap: {'; '.join(stops)}." if stops else "."))
    diag = [(r["objective"], r["strategies"]["diagonal"]) for r in payload["results"]
            if r["strategies"]["diagonal"]["status"] == "ok"]
    if diag:
        for objective in ("rank", "logcosh"):
            es = [e for o, e in diag if o == objective]
            if es:
                cos = [e["grad_cosine"] for e in es]
                rel = [e["grad_rel_err"] for e in es]
                lines.append(
                    f"- The diagonal approximation's gradient ({objective}) has cosine {min(cos):.3f}–{max(cos):.3f} "
                    f"with the exact one and relative error {min(rel):.2f}–{max(rel):.2f}: it is an approximation, "
                    "not the gradient."
                )
    return "\n".join(lines)


def _charts(payload: dict[str, Any], out) -> list[str]:
    plt = plt_module()
    names = []
    for objective in ("rank", "logcosh"):
        rows = [r for r in payload["results"] if r["objective"] == objective]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, sweep in zip(axes, ("T", "p")):
            rs = [r for r in rows if r["sweep"] == sweep]
            if not rs:
                continue
            for st in STRATEGIES:
                xs = [r[sweep] for r in rs if r["strategies"][st]["status"] == "ok"]
                ys = [_get(r["strategies"][st]["time"], "median") for r in rs if r["strategies"][st]["status"] == "ok"]
                ax.plot(xs, ys, "o-", color=COLORS[st], label=st, ms=4)
                px = [r[sweep] for r in rs if r["strategies"][st].get("projected_seconds")]
                py = [r["strategies"][st]["projected_seconds"] for r in rs if r["strategies"][st].get("projected_seconds")]
                if px:
                    ax.plot(([xs[-1]] if xs else []) + px, ([ys[-1]] if ys else []) + py, "x:", color=COLORS[st], ms=6)
            fx = [r[sweep] for r in rs if r["forward"]["status"] == "ok"]
            fy = [_get(r["forward"]["time"], "median") for r in rs if r["forward"]["status"] == "ok"]
            ax.plot(fx, fy, "k--", lw=1, label="forward")
            ax.set_xscale("log")
            ax.set_yscale("log")
            fixed = f"p = {rs[0]['p']}" if sweep == "T" else f"T = {rs[0]['T']}"
            ax.set_xlabel(sweep)
            ax.set_ylabel("backward time (s)")
            ax.set_title(f"{objective}: B = {rs[0]['B']}, {fixed}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7, loc="upper left")
        fig.suptitle(f"Backward time per strategy ({payload['environment']['dtype']}; x: projected, skipped)",
                     fontsize=10)
        name = f"{NAME}_{objective}_time.png"
        save_figure(fig, out / name)
        names.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, sweep in zip(axes, ("T", "p")):
        for objective, marker in (("rank", "o-"), ("logcosh", "s--")):
            rs = [r for r in payload["results"] if r["objective"] == objective and r["sweep"] == sweep
                  and r["strategies"]["diagonal"]["status"] == "ok"]
            if rs:
                ax.plot([r[sweep] for r in rs], [r["strategies"]["diagonal"]["grad_rel_err"] for r in rs], marker,
                        color="C1", label=f"{objective}: relative error")
                ax.plot([r[sweep] for r in rs], [1 - r["strategies"]["diagonal"]["grad_cosine"] for r in rs], marker,
                        color="C2", label=f"{objective}: 1 − cosine")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel("error of the diagonal gradient")
        ax.set_title(f"diagonal vs exact gradient, sweep over {sweep}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    name = f"{NAME}_diagonal_error.png"
    save_figure(fig, out / name)
    names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
