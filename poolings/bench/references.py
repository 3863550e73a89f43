"""RankPool against independent references on the same problems, in the same run.

Every method solves the same float64 problems ``V: (B, T, p)`` (rank pooling, ``C = 1``,
``ε = 0.1``) and back-propagates the same seeded upstream gradient ``g = dL/dU``:

- **ours**: :class:`poolings.RankPool`, T-space active-set forward + exact (Woodbury) backward;
- **cvxpylayers** (:class:`poolings.reference.CvxpyRankPool`) with Clarabel and with SCS, each at
  the reference's accurate settings (tight tolerances, dense derivative); the time to build
  the layer (canonicalisation) is reported apart;
- **theseus** (:class:`poolings.reference.TheseusRankPool`), Gauss–Newton + implicit backward;
- **scikit-learn** ``LinearSVR`` (liblinear's L2-loss SVR, the original rank-pooling solver) for
  the forward solve only: ``C_lib = C/2``, ``loss="squared_epsilon_insensitive"``,
  ``fit_intercept=False``, ``dual=True``, ``tol=1e-10``; one fit per sequence.

Reported per method: forward, backward and total time (medians, interleaved rounds), the ratio
of its time to ours, its output and gradient error against ours, and its **own** accuracy,
the KKT residual ``‖∇_u f(U)‖ / ‖U‖`` of the output it returns, so that a difference can be
told apart from the reference's own error. A reference whose projected time exceeds the cap
is skipped, with the projection; for cvxpylayers, whose time goes into the derivative, the
forward alone (no derivative) still runs and is compared with our forward.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

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

NAME = "references"
C, EPS = 1.0, 0.1
METHODS = ("ours", "cvxpylayers-Clarabel", "cvxpylayers-SCS", "theseus", "sklearn")
LABELS = {
    "ours": "ours: RankPool (woodbury)",
    "cvxpylayers-Clarabel": "cvxpylayers, Clarabel",
    "cvxpylayers-SCS": "cvxpylayers, SCS",
    "theseus": "theseus (Gauss–Newton)",
    "sklearn": "sklearn LinearSVR (forward only)",
}


@dataclass(frozen=True)
class Problem:
    B: int
    T: int
    p: int
    methods: tuple[str, ...] = METHODS
    repeats: int | None = None  # None: the benchmark's default


FULL = (
    Problem(2, 50, 64),
    Problem(2, 100, 512),
    Problem(1, 10, 1024, repeats=1),
    Problem(1, 10, 4096, repeats=1),  # the paper's feature size; the caps decide what runs
)
QUICK = (Problem(2, 8, 6),)

# seconds: cap on one projected call of a reference, and on building a cvxpylayers layer
CAPS = {"full": {"call": 60.0, "build": 120.0}, "quick": {"call": 20.0, "build": 30.0}}


def cost_model(method: str, B: int, T: int, p: int) -> float:
    """Relative cost of one forward + backward of a method (for projections from a measured size)."""
    if method.startswith("cvxpylayers"):
        n = p + 2 * T  # cone-program variables and constraints; the derivative factorises densely
        return B * n**3
    if method == "theseus":
        return B * p**3  # dense p × p Cholesky per Gauss–Newton iteration
    if method == "sklearn":
        return B * T * p
    return B * (T * T * p + T**3)


def build_cost(T: int, p: int) -> float:
    """Relative cost of building a cvxpylayers layer: the size of its parameter ``V``."""
    return float(T * p)


# --------------------------------------------------------------------------- the methods
def _sklearn_forward(V: Tensor, caught: list[str]) -> Tensor:
    """LinearSVR per sequence: ``(B, T, p)`` float64 → ``(B, p)``."""
    try:
        from sklearn.svm import LinearSVR
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the sklearn reference needs scikit-learn: pip install scikit-learn") from exc
    X = V.detach().cpu().numpy()
    B, T, _ = X.shape
    y = torch.arange(1, T + 1, dtype=torch.float64).numpy()
    out = []
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        for b in range(B):
            svr = LinearSVR(C=C / 2, epsilon=EPS, loss="squared_epsilon_insensitive", fit_intercept=False,
                            dual=True, tol=1e-10, max_iter=100_000)
            svr.fit(X[b], y)
            out.append(torch.from_numpy(svr.coef_.copy()))
    caught.extend(str(w.message)[:200] for w in ws)
    return torch.stack(out).to(V)


def _build(method: str) -> Any:
    """The module of a method (heavy imports happen here, outside any timing)."""
    if method == "ours":
        from poolings import RankPool

        return RankPool(C=C, eps=EPS, backward="woodbury")
    if method.startswith("cvxpylayers"):
        from poolings.reference import CvxpyRankPool

        return CvxpyRankPool(C=C, eps=EPS, solve_method=method.split("-", 1)[1])
    if method == "theseus":
        from poolings.reference import TheseusRankPool

        return TheseusRankPool(C=C, eps=EPS)
    if method == "sklearn":
        return None
    raise ValueError(f"unknown method {method!r}")


def _kkt(V: Tensor, U: Tensor) -> float:
    """Largest ``‖∇_u f(U)‖ / ‖U‖`` over the batch (float64)."""
    from poolings.reference import rank_pool_grad_u, relative_kkt_residual

    return float(relative_kkt_residual(rank_pool_grad_u(V, U, None, C, EPS), U).max())


# ----------------------------------------------------------------------------------- run
def run(cfg: BenchConfig) -> dict[str, Any]:
    """RankPool vs cvxpylayers, theseus and scikit-learn: time ratios and accuracy."""
    with cfg.applied():
        return _run(cfg)


def _run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    env = environment(cfg)
    # every method runs in float64 on the CPU here (the references solve on the CPU), whatever
    # --dtype and --device say
    env.update(dtype="float64", device="cpu", device_name=env["cpu"])
    problems = QUICK if cfg.quick else FULL
    caps = cfg.caps(CAPS["quick" if cfg.quick else "full"])
    default_repeats = cfg.n_repeats(3)
    measured: dict[str, dict[str, float]] = {}  # method -> {"work", "seconds"} of its largest run
    measured_build: dict[str, dict[str, float]] = {}
    results = []
    notes = []
    try:
        import poolings.reference  # noqa: F401
    except ImportError as exc:
        notes.append(f"poolings.reference cannot be imported ({exc}): only 'ours' and 'sklearn' ran.")
    for prob in progress(problems, desc=NAME, enabled=cfg.progress):
        results.append(_one_problem(cfg, prob, default_repeats, caps, measured, measured_build, notes))

    env = finish_environment(env, started)
    payload = {
        "benchmark": NAME,
        "command": cfg.command(NAME),
        "environment": env,
        "settings": {"C": C, "eps": EPS, "caps_seconds": caps, "dtype": "float64",
                     "sklearn": "LinearSVR(C=C/2, epsilon=eps, loss='squared_epsilon_insensitive', "
                                "fit_intercept=False, dual=True, tol=1e-10, max_iter=100000)"},
        "notes": notes,
        "results": results,
    }
    out = output_dir(cfg)
    write_json(out / f"{NAME}.json", payload)
    chart = _chart(payload, out)
    write_markdown(out / f"{NAME}.md", "RankPool against the references", payload["command"], env,
                   _markdown(payload, chart))
    return payload


def _one_problem(cfg, prob: Problem, default_repeats, caps, measured, measured_build, notes) -> dict[str, Any]:
    B, T, p = prob.B, prob.T, prob.p
    V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=torch.float64)
    G = seeded_like((B, p), seed=cfg.seed + 1, dtype=torch.float64, device="cpu")
    row: dict[str, Any] = {"B": B, "T": T, "p": p, "methods": {}}
    repeats = prob.repeats if prob.repeats is not None and cfg.repeats is None else default_repeats

    runners: dict[str, Callable[[Stopwatch], None]] = {}
    outputs: dict[str, tuple[Tensor, Tensor | None]] = {}
    for method in prob.methods:
        entry: dict[str, Any] = {}
        row["methods"][method] = entry
        work = cost_model(method, B, T, p)
        prev = measured.get(method)
        proj = prev["seconds"] * work / prev["work"] if prev else None
        forward_only = method == "sklearn"
        if method != "ours" and proj is not None and proj > caps["call"]:
            over = f"forward + backward projected {fmt_time(proj)} > cap {fmt_time(caps['call'])}"
            if not method.startswith("cvxpylayers"):
                entry.update(status="skipped", reason=over, projected_seconds=proj)
                continue
            # cvxpylayers spends its time on the derivative: its forward alone stays cheap
            forward_only = True
            entry.update(backward_skipped=f"{over}; the forward alone (no derivative) ran instead",
                         projected_seconds=proj)
        try:
            module = _build(method)
        except ImportError as exc:
            entry.update(status="unavailable", reason=str(exc))
            notes.append(f"{method} is unavailable: {exc}")
            continue
        if method.startswith("cvxpylayers"):
            bprev = measured_build.get(method)
            bproj = bprev["seconds"] * build_cost(T, p) / bprev["work"] if bprev else None
            if bproj is not None and bproj > caps["build"]:
                entry.update(status="skipped",
                             reason=f"layer build projected {fmt_time(bproj)} > cap {fmt_time(caps['build'])}",
                             projected_build_seconds=bproj)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                entry["build_seconds"] = module.prepare([T], p)
            measured_build[method] = {"work": build_cost(T, p), "seconds": entry["build_seconds"]}
        caught: list[str] = []
        runner = _runner(method, module, V, G, caught, forward_only)
        # the untimed first run: accuracy, and the warm-up of the timed rounds
        t0 = time.perf_counter()
        try:
            U, dV = runner(None)
        except Exception as exc:  # a reference that fails is reported, not hidden
            entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
            continue
        entry["first_call_seconds"] = time.perf_counter() - t0
        outputs[method] = (U, dV)
        entry.update(status="ok", kkt_residual=_kkt(V, U), warnings=caught)
        runners[method] = lambda sw, r=runner: r(sw)
        entry["_work"] = None if forward_only and method != "sklearn" else work

    timings = time_interleaved(runners, repeats=repeats, warmup=0) if runners else {}
    U0, dV0 = outputs.get("ours", (None, None))
    for method, t in timings.items():
        entry = row["methods"][method]
        entry["forward"] = t["forward"]
        if "backward" in t:
            entry["backward"] = t["backward"]
            entry["total"] = t["total"]
        work = entry.pop("_work")
        if work is not None:  # a projection point: the same kind of call as the cost model's
            measured[method] = {"work": work, "seconds": (t.get("total") or t["forward"]).median}
        U, dV = outputs[method]
        if U0 is not None and method != "ours":
            entry["output_rel_err"], _, _ = errors(U, U0)
            if dV is not None:
                entry["grad_rel_err"], _, entry["grad_cosine"] = errors(dV, dV0)
    ours = row["methods"].get("ours", {})
    for method, entry in row["methods"].items():
        if entry.get("status") != "ok" or method == "ours" or ours.get("status") != "ok":
            continue
        if "total" in entry:
            entry["time_ratio_to_ours"] = entry["total"].median / ours["total"].median
        else:
            entry["forward_ratio_to_ours"] = entry["forward"].median / ours["forward"].median
    row["repeats"] = repeats
    return row


def _runner(method: str, module: Any, V: Tensor, G: Tensor, caught: list[str], forward_only: bool = False):
    """``run(sw) -> (U, dV)`` (``dV`` ``None`` when ``forward_only``); ``sw`` ``None`` for the untimed run."""

    def run_once(sw: Stopwatch | None):
        if forward_only:
            if sw:
                sw.start()
            if method == "sklearn":
                U = _sklearn_forward(V, caught)
            else:
                with torch.no_grad():
                    U = module(V)
            if sw:
                sw.lap("forward")
            return U, None
        X = V.detach().clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            if sw:
                sw.start()
            U = module(X)
            if sw:
                sw.lap("forward")
            (dV,) = torch.autograd.grad(U, X, G)
            if sw:
                sw.lap("backward")
        if sw is None:
            caught.extend(sorted({str(w.message)[:200] for w in ws
                                  if not issubclass(w.category, (DeprecationWarning, FutureWarning))}))
        return U.detach(), dV

    return run_once


# ------------------------------------------------------------------------------ reporting
def _t(entry: dict[str, Any], key: str) -> str:
    t = entry.get(key)
    if t is None:
        return "–"
    return fmt_time(t.median if hasattr(t, "median") else t["median"])


def _markdown(payload: dict[str, Any], chart: str) -> str:
    parts = [
        "All methods in float64 on the same data and upstream gradient; times are medians of interleaved rounds "
        "(the first, untimed call of each method gives the accuracy figures and serves as warm-up). "
        "\"ratio\" is the method's forward + backward time over ours (forward over our forward where only the "
        "forward ran: scikit-learn always, cvxpylayers where its derivative is over the cap). "
        "Errors are relative to our output and gradient; the KKT residual ‖∇f(U)‖/‖U‖ is each method's own "
        f"accuracy. scikit-learn: `{payload['settings']['sklearn']}`.",
    ]
    parts += [f"Note: {n}" for n in payload["notes"]]
    head = ["method", "forward", "backward", "ratio to ours", "layer build", "output error", "gradient error",
            "gradient cosine", "own KKT residual"]
    for r in payload["results"]:
        parts.append(f"**B = {r['B']}, T = {r['T']}, p = {r['p']}** ({r['repeats']} timed rounds)")
        body = []
        for method, e in r["methods"].items():
            if e["status"] != "ok":
                body.append([LABELS[method], f"{e['status']}: {e['reason']}"] + ["–"] * 7)
                continue
            if "time_ratio_to_ours" in e:
                ratio = fmt_ratio(e["time_ratio_to_ours"])
            else:
                ratio = "1" if method == "ours" else f"{fmt_ratio(e.get('forward_ratio_to_ours'))} (forward)"
            backward = _t(e, "backward") if "backward_skipped" not in e else f"not run: {e['backward_skipped']}"
            body.append([
                LABELS[method], _t(e, "forward"), backward, ratio,
                fmt_time(e["build_seconds"]) if "build_seconds" in e else "–",
                fmt_err(e.get("output_rel_err")) if method != "ours" else "–",
                fmt_err(e.get("grad_rel_err")) if method != "ours" else "–",
                f"{e['grad_cosine']:.9f}" if "grad_cosine" in e else "–",
                fmt_err(e["kkt_residual"]),
            ])
        parts.append(markdown_table(head, body))
        warned = sorted({f"{m}: {w}" for m, e in r["methods"].items() for w in e.get("warnings", [])})
        if warned:
            parts.append("Warnings raised by the methods:\n\n" + "\n".join(f"- {w}" for w in warned))
    parts.append(_summary(payload))
    parts.append(f"![{chart}]({chart})")
    return "\n\n".join(parts)


def _summary(payload: dict[str, Any]) -> str:
    lines = ["**In this run:**"]
    for r in payload["results"]:
        bits = []
        for method, e in r["methods"].items():
            if method == "ours":
                continue
            if e["status"] != "ok":
                bits.append(f"{method} {e['status']}")
                continue
            if "time_ratio_to_ours" in e:
                bits.append(f"{method} {e['time_ratio_to_ours']:.3g}× our time (gradient error "
                            f"{fmt_err(e.get('grad_rel_err'))}, own KKT {fmt_err(e['kkt_residual'])})")
            else:
                only = "" if method == "sklearn" else " (backward not run: over the cap)"
                bits.append(f"{method} forward {e['forward_ratio_to_ours']:.3g}× ours{only} (output error "
                            f"{fmt_err(e.get('output_rel_err'))}, own KKT {fmt_err(e['kkt_residual'])})")
        ours = r["methods"].get("ours", {})
        own = f"; our own KKT residual {fmt_err(ours['kkt_residual'])}" if ours.get("status") == "ok" else ""
        lines.append(f"- B = {r['B']}, T = {r['T']}, p = {r['p']}: " + "; ".join(bits) + own + ".")
    return "\n".join(lines)


def _chart(payload: dict[str, Any], out) -> str:
    plt = plt_module()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    results = payload["results"]
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        xs, ys, ks = [], [], []
        for i, r in enumerate(results):
            e = r["methods"].get(method)
            if not e or e["status"] != "ok":
                continue
            t = e.get("total") or e["forward"]
            xs.append(i + (j - (len(METHODS) - 1) / 2) * width)
            ys.append(t.median if hasattr(t, "median") else t["median"])
            ks.append(max(e["kkt_residual"], 1e-17))
        ax1.bar(xs, ys, width, label=LABELS[method], color=f"C{j}")
        ax2.bar(xs, ks, width, color=f"C{j}")
    labels = [f"B={r['B']}\nT={r['T']}\np={r['p']}" for r in results]
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(results)), labels, fontsize=7)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    ax1.set_ylabel("forward + backward (s)")
    ax1.set_title("time (scikit-learn: forward only)", fontsize=9)
    ax2.set_ylabel("‖∇f(U)‖ / ‖U‖")
    ax2.set_title("each method's own KKT residual", fontsize=9)
    ax1.legend(fontsize=6, loc="upper left")
    name = f"{NAME}.png"
    save_figure(fig, out / name)
    return name


def main(argv: list[str] | None = None) -> int:
    return module_main(NAME, run, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
