"""Rank pooling at any video length: the three exact methods over a T × p sweep.

For every size ``B × T × p`` of the sweep, interleaved in the same rounds:

- each method of :class:`poolings.RankPool` (``tspace``, ``pspace``, ``cg``), forward + its exact
  backward (``backward="auto"``: Woodbury with the forward's factor, or preconditioned CG after
  ``cg``), in the benchmark's dtype (float32 by default), with a random upstream gradient;
- scikit-learn's ``LinearSVR`` (liblinear, forward only, one fit per sequence, float64), the
  solver of the original rank-pooling code;
- the cheaper Gram product of the same data, ``VᵀV`` when ``p < T``, else ``VVᵀ``: the floor of
  any direct method.

Also per size: each method's peak memory (one extra, untimed run), the method ``"auto"`` picks
and how its time compares with the fastest method measured, and every method's **agreement
with liblinear in float64** (the forward run again in float64 on the same data, relative error
of every sequence, once with all sequences of full length and once with lengths
``T, 3T/4, T/2, T/4``), plus the methods' agreement with each other.

Then the goals: forward + exact backward ≥ 5× faster than liblinear's forward at 4 × 4000 × 512
and 16 × 300 × 64, ≥ 2× at 4 × 1000 × 4096 and 2 × 50 × 64, each within 4× the cheaper Gram
product; peak memory below 4 GiB at 16 × 4000 × 2048 (float32). Each verdict is stated plainly.

A method whose predicted time (:func:`poolings.rank.method_costs`) or buffers exceed the caps is
not run at that size; the table says so, with the prediction.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from argminlayers import ConvergenceWarning

from .common import (
    BenchConfig,
    Stopwatch,
    environment,
    finish_environment,
    fmt_bytes,
    fmt_err,
    fmt_ratio,
    fmt_time,
    make_sequences,
    markdown_table,
    module_main,
    output_dir,
    parse_sizes,
    peak_memory,
    plt_module,
    progress,
    save_figure,
    seeded_like,
    time_interleaved,
    write_json,
    write_markdown,
)
from .references import C, EPS, _sklearn_forward
from .report import is_published

NAME = "rank_length"
OPTIONS = ("sizes",)  # of the benchmark-specific options (defined in generic.add_arguments), what run_from_args reads
METHODS = ("tspace", "pspace", "cg")


@dataclass(frozen=True)
class Goal:
    B: int
    T: int
    p: int
    lib_speedup: float  # forward + exact backward at least this much faster than liblinear's forward
    gram_ratio: float = 4.0  # and within this multiple of the cheaper Gram product


FULL = {
    "B": 4,
    "T": (25, 100, 250, 1000, 2000, 4000, 8000),
    "p": (64, 256, 512, 1024, 2048, 4096),
    "goals": (Goal(4, 4000, 512, 5.0), Goal(16, 300, 64, 5.0), Goal(4, 1000, 4096, 2.0), Goal(2, 50, 64, 2.0)),
    "memory": (16, 4000, 2048, 4 * 2**30),
}
QUICK = {
    "B": 2,
    "T": (8, 30),
    "p": (4, 16),
    "goals": (Goal(2, 12, 6, 2.0),),
    "memory": (2, 40, 16, 2**30),
}
# a method (or liblinear) predicted slower than "call" seconds, or needing more than "bytes", is not run
CAPS = {"full": {"call": 30.0, "lib": 60.0, "bytes": 6 * 2**30}, "quick": {"call": 5.0, "lib": 5.0, "bytes": 2**30}}
LIB_SECONDS = (1.5e-7, 5e-4)  # liblinear ≈ a · B T p + b · B seconds (measured on this machine)


def _lib_predicted(B: int, T: int, p: int) -> float:
    return LIB_SECONDS[0] * B * T * p + LIB_SECONDS[1] * B


def _variable_lengths(B: int, T: int) -> list[int]:
    return [max(1, math.ceil(T * (1 - j / 4))) for j in range(B)] if B > 1 else [T]


def run(cfg: BenchConfig, *, sizes: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Rank pooling's three exact methods over a T × p sweep, against liblinear and the Gram product.

    ``sizes``: run these ``(B, T, p)`` instead of the sweep, the goals among them, and no memory
    goal (a partial run: it cannot be published)."""
    if sizes is not None and is_published(cfg.out):
        raise ValueError("--sizes runs part of the rank_length sweep, which cannot replace the published one; "
                         "give --out instead of --publish")
    with cfg.applied():
        return _sweep(cfg, sizes)


def run_from_args(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """``run`` with ``--sizes`` from the command line."""
    return run(cfg, sizes=parse_sizes(getattr(args, "sizes", None)))


def _sweep(cfg: BenchConfig, chosen: list[tuple[int, int, int]] | None) -> dict[str, Any]:
    """The sweep with its goals' sizes; or the ``chosen`` sizes and the goals among them."""
    from poolings.rank import choose_method, method_costs

    started = time.perf_counter()
    env = environment(cfg)
    spec = QUICK if cfg.quick else FULL
    caps = cfg.caps(CAPS["quick" if cfg.quick else "full"])
    sizes = [(spec["B"], T, p) for p in spec["p"] for T in spec["T"]]
    for g in spec["goals"]:
        if (g.B, g.T, g.p) not in sizes:
            sizes.append((g.B, g.T, g.p))
    goals = spec["goals"]
    if chosen is not None:
        sizes = list(dict.fromkeys(chosen))
        goals = [g for g in goals if (g.B, g.T, g.p) in sizes]
    results, caught = [], []
    for B, T, p in progress(sizes, desc=NAME, enabled=cfg.progress):
        costs = method_costs(B, T, p, cfg.torch_dtype, cfg.device)
        row = _measure(cfg, B, T, p, costs, choose_method(B, T, p, cfg.torch_dtype, cfg.device), caps, caught,
                       explain=any((g.B, g.T, g.p) == (B, T, p) for g in goals))
        results.append(row)
    memory = _memory_goal(cfg, spec["memory"]) if chosen is None else None
    env = finish_environment(env, started)
    command = cfg.command(NAME)
    if chosen is not None:
        command += " --sizes " + ",".join(f"{B}x{T}x{p}" for B, T, p in sizes)
    payload = {
        "benchmark": NAME,
        "command": command,
        "environment": env,
        "settings": {"C": C, "eps": EPS, "methods": list(METHODS), "caps": caps, "liblinear_model": LIB_SECONDS,
                     "backward": "auto (exact)", "agreement_dtype": "float64"},
        "results": results,
        "goals": [_goal(g, results) for g in goals],
        "memory_goal": memory,
        "warnings": sorted(set(caught))[:20],
    }
    payload["verdict"] = _verdict(payload)
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    chart = _chart(payload, out)
    write_markdown(out / f"{NAME}.md", "Rank pooling at any length: T-space, p-space and Newton-CG", payload["command"],
                   env, _markdown(payload, chart))
    return payload


# ------------------------------------------------------------------------------- one size
def _measure(cfg: BenchConfig, B: int, T: int, p: int, costs: dict, auto: str, caps: dict, caught: list,
             explain: bool = False) -> dict:
    """One size: every method the caps allow, liblinear and the Gram product, interleaved; with
    ``explain`` (a goal's size) also the forward solve of ``auto`` alone (``rank_pool_solve``,
    no layer around it), which splits its time into the solve and the rest (the layer's
    validation and autograd bridge, and the exact backward)."""
    from poolings import RankPool
    from poolings.rank import rank_pool_solve
    from poolings.rank.factored import gram

    dev, dt = cfg.torch_device, cfg.torch_dtype
    V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=dt, device=dev)
    V64 = V.double()
    G = seeded_like((B, p), seed=cfg.seed + 1, dtype=dt, device=dev)
    row: dict[str, Any] = {"B": B, "T": T, "p": p, "auto": auto, "methods": {}}
    run_methods = []
    for m in METHODS:
        c = costs[m]
        info = {"predicted_seconds": c.seconds, "predicted_bytes": c.bytes}
        if c.seconds > caps["call"] or c.bytes > caps["bytes"]:
            info["skipped"] = (f"predicted {fmt_time(c.seconds)} and {fmt_bytes(c.bytes)} "
                               f"(caps {fmt_time(caps['call'])}, {fmt_bytes(caps['bytes'])})")
        else:
            run_methods.append(m)
        row["methods"][m] = info
    lib_pred = _lib_predicted(B, T, p)
    run_lib = lib_pred <= caps["lib"]
    if not run_lib:
        row["liblinear_skipped"] = f"predicted {fmt_time(lib_pred)} (cap {fmt_time(caps['lib'])})"
    slowest = max([costs[m].seconds for m in run_methods] + ([lib_pred] if run_lib else []) + [0.0])
    # millisecond calls on a shared machine vary by tens of percent from round to round: 25 rounds
    # where they are that short (a few seconds in all)
    repeats = cfg.n_repeats(25 if slowest < 0.1 else 5 if slowest < 1 else (3 if slowest < 10 else 1), quick=2)
    warmup = cfg.warmup if slowest < 10 else 0
    pools = {m: RankPool(C, EPS, method=m) for m in run_methods}
    lib_out: dict[str, Tensor] = {}

    def method_case(pool):
        def case(sw: Stopwatch) -> None:
            X = V.detach().requires_grad_(True)
            sw.start()
            U = pool(X)
            sw.lap("forward")
            U.backward(G)
            sw.lap("backward")

        return case

    def lib_case(sw: Stopwatch) -> None:
        sw.start()
        lib_out["fixed"] = _sklearn_forward(V64, caught)
        sw.lap("forward")

    def gram_case(sw: Stopwatch) -> None:
        sw.start()
        torch.bmm(V.transpose(1, 2), V) if p < T else torch.bmm(V, V.transpose(1, 2))
        sw.lap("gram")

    def syrk_case(sw: Stopwatch) -> None:  # the symmetric product RankPool itself uses on the CPU
        sw.start()
        gram(V, outer=p >= T)
        sw.lap("gram")

    for m, pool in pools.items():  # the memory run doubles as a warm-up of the big sizes
        def layer(pool=pool):
            X = V.detach().requires_grad_(True)
            pool(X).backward(G)

        with warnings.catch_warnings(record=True) as ws:  # a timed solve that did not converge is said
            warnings.simplefilter("always", ConvergenceWarning)
            row["methods"][m]["memory"] = peak_memory(layer, dev).as_dict()
        row["methods"][m]["timed_run_warnings"] = sorted({str(w.message)[:160] for w in ws
                                                          if issubclass(w.category, ConvergenceWarning)})
    cases = {"gram": gram_case, "syrk": syrk_case, **{m: method_case(pool) for m, pool in pools.items()}}
    if run_lib:
        cases["liblinear"] = lib_case
    if explain and auto in pools:
        full_mask = torch.ones(B, T, dtype=torch.bool, device=dev)

        def solve_case(sw: Stopwatch) -> None:
            sw.start()
            rank_pool_solve(V, full_mask, C, EPS, method=auto)
            sw.lap("solve")

        cases["solve"] = solve_case
    t = time_interleaved(cases, repeats=repeats, warmup=warmup, device=dev)
    # the floor is the faster of torch.bmm and BLAS syrk (one triangle: half the flops)
    gram = min(t["gram"]["gram"], t["syrk"]["gram"], key=lambda s: s.median)
    row.update(gram=gram, gram_bmm=t["gram"]["gram"], gram_syrk=t["syrk"]["gram"], repeats=repeats,
               warmup=warmup, gram_kind="VᵀV" if p < T else "VVᵀ")
    if run_lib:
        row["liblinear"] = t["liblinear"]["forward"]
    if "solve" in t:
        row["solve"] = t["solve"]["solve"]  # the forward solve of auto alone
    for m in run_methods:
        info = row["methods"][m]
        info.update(forward=t[m]["forward"], backward=t[m]["backward"], total=t[m]["total"],
                    over_gram=t[m]["total"].median / gram.median)
        if run_lib:
            info["liblinear_over"] = t["liblinear"]["forward"].median / t[m]["total"].median
    # agreement in float64, with full and with variable lengths
    lengths = _variable_lengths(B, T)
    mask = torch.arange(T, device=dev).unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1)
    V64v = V64 * mask.unsqueeze(-1)
    if run_lib:
        lib_out["variable"] = torch.cat([_sklearn_forward(V64v[b:b + 1, :n], caught) for b, n in enumerate(lengths)])
    full = torch.ones(B, T, dtype=torch.bool, device=dev)
    sols = {}
    for m in run_methods:
        for kind, (X, msk) in {"fixed": (V64, full), "variable": (V64v, mask)}.items():
            sol = rank_pool_solve(X, msk, C, EPS, method=m)
            sols[m, kind] = sol.u
            info = row["methods"][m]
            info.setdefault("converged", True)
            info["converged"] = info["converged"] and bool(sol.converged.all())
            info.setdefault("iterations_max", 0)
            info["iterations_max"] = max(info["iterations_max"], int(sol.iterations.max()))
            if kind in lib_out:
                ref = lib_out[kind]
                err = float(((sol.u - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)).max())
                info[f"liblinear_error_{kind}"] = err
    if len(run_methods) > 1:
        first = run_methods[0]
        row["methods_agree"] = max(float(((sols[m, k] - sols[first, k]).norm(dim=-1)
                                          / sols[first, k].norm(dim=-1).clamp_min(1e-300)).max())
                                   for m in run_methods[1:] for k in ("fixed", "variable"))
    timed = {m: row["methods"][m]["total"].median for m in run_methods}
    if timed:
        best = min(timed, key=timed.get)
        row["best"] = best
        row["auto_over_best"] = timed[auto] / timed[best] if auto in timed else None
    return row


def _memory_goal(cfg: BenchConfig, spec: tuple) -> dict[str, Any]:
    """Forward + exact backward of ``"auto"`` at the memory goal's size: peak bytes, and its time once."""
    from poolings import RankPool
    from poolings.rank import choose_method

    B, T, p, limit = spec
    V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=cfg.torch_dtype, device=cfg.torch_device)
    G = seeded_like((B, p), seed=cfg.seed + 1, dtype=cfg.torch_dtype, device=cfg.torch_device)
    pool = RankPool(C, EPS)
    seconds = []

    def layer() -> None:
        X = V.detach().requires_grad_(True)
        t0 = time.perf_counter()
        pool(X).backward(G)
        seconds.append(time.perf_counter() - t0)

    mem = peak_memory(layer, cfg.torch_device).as_dict()
    return {"B": B, "T": T, "p": p, "limit_bytes": limit, "method": pool.last_method,
            "auto": choose_method(B, T, p, cfg.torch_dtype, cfg.device), "memory": mem,
            "input_bytes": V.numel() * V.element_size(), "seconds_profiled": seconds[0],
            "met": mem["bytes"] is not None and mem["bytes"] < limit}


def _goal(g: Goal, results: list[dict]) -> dict[str, Any]:
    row = next(r for r in results if (r["B"], r["T"], r["p"]) == (g.B, g.T, g.p))
    auto = row["methods"][row["auto"]]
    out: dict[str, Any] = {"B": g.B, "T": g.T, "p": g.p, "method": row["auto"], "lib_speedup_goal": g.lib_speedup,
                           "gram_ratio_goal": g.gram_ratio}
    if "total" not in auto:
        out["missing"] = f"'{row['auto']}' did not run: {auto.get('skipped')}"
        return out
    out["total"] = auto["total"].median
    out["over_gram"] = auto["over_gram"]
    out["gram_met"] = auto["over_gram"] <= g.gram_ratio
    if "liblinear" in row:
        out["lib_speedup"] = auto["liblinear_over"]
        out["lib_met"] = auto["liblinear_over"] >= g.lib_speedup
        out["lib_budget"] = row["liblinear"].median / g.lib_speedup  # the total the goal allows
    if "solve" in row:
        out["solve"] = row["solve"].median
        out["iterations_max"] = auto.get("iterations_max")
    return out


# ----------------------------------------------------------------------------- reporting
def _t(x: Any) -> float | None:
    if x is None:
        return None
    return x.median if hasattr(x, "median") else x["median"]


def _verdict(payload: dict) -> list[str]:
    lines = []
    for g in payload["goals"]:
        size = f"{g['B']} × {g['T']} × {g['p']}"
        if "missing" in g:
            lines.append(f"{size}: **not measured** ({g['missing']}).")
            continue
        lib = (f"{g['lib_speedup']:.2f}× faster than liblinear (goal ≥ {g['lib_speedup_goal']:g}×: "
               f"{'met' if g['lib_met'] else '**missed**'})" if "lib_speedup" in g else "liblinear not run")
        gram = (f"{g['over_gram']:.2f}× the Gram product (goal ≤ {g['gram_ratio_goal']:g}×: "
                f"{'met' if g['gram_met'] else '**missed**'})")
        why = ""
        if "solve" in g and not (g.get("lib_met", True) and g["gram_met"]):
            budget = f"; the liblinear goal allows {fmt_time(g['lib_budget'])} in all" if not g.get("lib_met", True) else ""
            its = f", {g['iterations_max']} iterations at most" if g.get("iterations_max") else ""
            why = (f" Where the time goes: the forward solve alone (`rank_pool_solve`{its}) "
                   f"{fmt_time(g['solve'])}, the layer around it and the exact backward "
                   f"{fmt_time(max(g['total'] - g['solve'], 0.0))}{budget}.")
        lines.append(f"{size} (`{g['method']}`): {fmt_time(g['total'])}, {lib}; {gram}.{why}")
    m = payload["memory_goal"]
    if m is None:
        lines.append("Memory goal: not run (--sizes).")
    else:
        lines.append(f"{m['B']} × {m['T']} × {m['p']} ({payload['environment']['dtype']}, `{m['method']}`): peak "
                     f"{fmt_bytes(m['memory']['bytes'])} (input {fmt_bytes(m['input_bytes'])}), goal < "
                     f"{fmt_bytes(m['limit_bytes'])}: {'met' if m['met'] else '**missed**'}; one forward + "
                     f"backward took {fmt_time(m['seconds_profiled'])} under the memory profiler.")
    errs = [(r, mth, r["methods"][mth].get(f"liblinear_error_{k}"), k) for r in payload["results"]
            for mth in METHODS for k in ("fixed", "variable")]
    errs = [e for e in errs if e[2] is not None]
    if errs:
        worst = max(errs, key=lambda e: e[2])
        bad = [e for e in errs if e[2] > 1e-6]
        r = worst[0]
        lines.append(
            f"Agreement with liblinear (float64, {len(errs)} method × size × length runs): worst "
            f"{worst[2]:.1e} (`{worst[1]}` at {r['B']} × {r['T']} × {r['p']}, {worst[3]} lengths); "
            + ("every run within 1e-6." if not bad else f"**{len(bad)} runs above 1e-6**.")
        )
    unconverged = [f"`{m}` at {r['B']} × {r['T']} × {r['p']}" for r in payload["results"] for m in METHODS
                   if r["methods"][m].get("timed_run_warnings") or r["methods"][m].get("converged") is False]
    lines.append("Every solve converged." if not unconverged
                 else f"**Solves that did not converge:** {', '.join(unconverged)}.")
    agree = [r["methods_agree"] for r in payload["results"] if "methods_agree" in r]
    if agree:
        lines.append(f"Methods against each other (float64): worst {max(agree):.1e} "
                     f"({'within' if max(agree) <= 1e-8 else '**above**'} 1e-8).")
    ab = [r["auto_over_best"] for r in payload["results"] if r.get("auto_over_best") is not None]
    if ab:
        fastest = sum(1 for x in ab if x <= 1.0)
        lines.append(f"\"auto\" picked the fastest measured method at {fastest} of {len(ab)} sizes; where it did not, "
                     f"its time was at most {max(ab):.2f}× the fastest (median {sorted(ab)[len(ab) // 2]:.2f}×).")
    return lines


def _markdown(payload: dict, chart: str) -> str:
    s = payload["settings"]
    parts = [
        f"Every method is forward + exact backward (`RankPool(C={s['C']:g}, eps={s['eps']:g}, method=…)`, "
        f"`backward=\"auto\"`) in {payload['environment']['dtype']}; liblinear (scikit-learn `LinearSVR`, "
        "float64, one fit per sequence) is the forward only; \"Gram\" is the cheaper of `VᵀV` and `VVᵀ`, "
        "timed as the faster of `torch.bmm` and BLAS `syrk` (one triangle, as RankPool computes it on the CPU). "
        "All cases of a size run interleaved; times are medians. \"err\" is the largest relative error "
        "against liblinear of the same forward in float64, over full-length and variable-length batches. "
        "Memory is the peak of one forward + backward. A method the caps exclude shows its prediction.",
        "**Verdict of this run:**\n\n" + "\n".join(f"- {line}" for line in payload["verdict"]),
    ]
    head = ["B × T × p", "Gram", "liblinear", "tspace", "pspace", "cg", "auto", "auto ÷ fastest",
            "liblinear ÷ auto", "auto ÷ Gram", "auto memory", "err (max of methods)"]
    body = []
    for r in payload["results"]:
        cells = [f"{r['B']} × {r['T']} × {r['p']}", fmt_time(_t(r["gram"])),
                 fmt_time(_t(r.get("liblinear"))) if "liblinear" in r else "capped"]
        for m in METHODS:
            info = r["methods"][m]
            cells.append(fmt_time(_t(info["total"])) if "total" in info else f"capped ({fmt_time(info['predicted_seconds'])})")
        a = r["methods"][r["auto"]]
        cells.append(f"`{r['auto']}`")
        cells.append(fmt_ratio(r.get("auto_over_best")))
        cells.append(fmt_ratio(a.get("liblinear_over")))
        cells.append(fmt_ratio(a.get("over_gram")))
        cells.append(fmt_bytes(a["memory"]["bytes"]) if "memory" in a else "–")
        errs = [r["methods"][m].get(f"liblinear_error_{k}") for m in METHODS for k in ("fixed", "variable")]
        errs = [e for e in errs if e is not None]
        cells.append(fmt_err(max(errs)) if errs else "–")
        body.append(cells)
    parts.append(markdown_table(head, body))
    head = ["B × T × p", "method", "forward", "backward", "peak memory", "iterations (max)", "converged",
            "err, full lengths", "err, variable lengths"]
    body = []
    for r in payload["results"]:
        for m in METHODS:
            info = r["methods"][m]
            if "total" not in info:
                continue
            body.append([f"{r['B']} × {r['T']} × {r['p']}", m, fmt_time(_t(info["forward"])),
                         fmt_time(_t(info["backward"])), fmt_bytes(info["memory"]["bytes"]),
                         info.get("iterations_max", "–"),
                         "yes" if info.get("converged") and not info.get("timed_run_warnings") else "**no**",
                         fmt_err(info.get("liblinear_error_fixed")), fmt_err(info.get("liblinear_error_variable"))])
    parts.append("<details><summary>Every method at every size</summary>\n\n" + markdown_table(head, body)
                 + "\n\n</details>")
    skipped = [f"{r['B']} × {r['T']} × {r['p']} `{m}`: {r['methods'][m]['skipped']}" for r in payload["results"]
               for m in METHODS if "skipped" in r["methods"][m]]
    skipped += [f"{r['B']} × {r['T']} × {r['p']} liblinear: {r['liblinear_skipped']}" for r in payload["results"]
                if "liblinear_skipped" in r]
    if skipped:
        parts.append("Not run (caps):\n\n" + "\n".join(f"- {x}" for x in skipped))
    if payload["warnings"]:
        parts.append("Warnings raised during the run:\n\n" + "\n".join(f"- `{w}`" for w in payload["warnings"]))
    parts.append(f"![{chart}]({chart})")
    return "\n\n".join(parts)


def _chart(payload: dict, out) -> str:
    plt = plt_module()
    rs = payload["results"]
    B = rs[0]["B"] if rs else 0
    ps = sorted({r["p"] for r in rs if r["B"] == B})
    cols = min(3, len(ps)) or 1
    rows = math.ceil(len(ps) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False, sharey=True)
    styles = {"tspace": ("C0", "o"), "pspace": ("C1", "s"), "cg": ("C2", "^")}
    labelled = False
    for ax, p in zip(axes.flat, ps):
        sub = sorted((r for r in rs if r["B"] == B and r["p"] == p), key=lambda r: r["T"])
        Ts = [r["T"] for r in sub]
        for m, (color, marker) in styles.items():
            pts = [(r["T"], _t(r["methods"][m]["total"])) for r in sub if "total" in r["methods"][m]]
            if pts:
                ax.plot(*zip(*pts), marker=marker, ms=3, color=color, lw=1, label=m)
            auto = [(r["T"], _t(r["methods"][m]["total"])) for r in sub if r["auto"] == m and "total" in r["methods"][m]]
            if auto:
                ax.plot(*zip(*auto), ls="none", marker="o", ms=8, mfc="none", mec="k", mew=0.8,
                        label=None if labelled else "auto's pick")
                labelled = True
        lib = [(r["T"], _t(r["liblinear"])) for r in sub if "liblinear" in r]
        if lib:
            ax.plot(*zip(*lib), color="C3", ls="--", lw=1, label="liblinear (fwd)")
        ax.plot(Ts, [_t(r["gram"]) for r in sub], color="0.5", ls=":", lw=1, label="Gram")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"p = {p}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("T", fontsize=7)
    for ax in axes.flat[len(ps):]:
        ax.axis("off")
    axes[0][0].set_ylabel("seconds (forward + backward)", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(seen.values(), seen.keys(), fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, 1.04))
    fig.suptitle(f"RankPool methods, B = {B}, {payload['environment']['dtype']}", fontsize=9, y=1.08)
    name = f"{NAME}.png"
    save_figure(fig, out / name)
    return name


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
