"""Generic objectives against the peers: a plain-function ``ArgminLayer`` beside torchopt, jaxopt,
a hand-written layer, unrolled Newton and theseus, on the same data, in one interleaved run.

Objectives (:mod:`poolings.bench.generic_methods` has the formulas and every method):

- ``pseudo_huber``: pseudo-Huber pooling ``f(v, u) = Σ_t sqrt(1 + ‖u − v_t‖²)``;
- ``weighted``: ``f(v, u, w) = Σ_t w_t sqrt(1 + ‖u − v_t‖²)`` with per-frame weights
  ``W: (B, T)`` as a keyword input (``ArgminLayer(f)(V, w=W)``), which also get gradients.

Methods, side by side at each size: ``ours:defaults`` (``ArgminLayer(f)``, nothing named) and
``ours:SOLVER+BACKWARD`` for every named setting; ``hand`` (batched Newton, closed-form
derivatives, Cholesky, one-step implicit gradient); ``bare`` (the same Newton method on our
layer's autograd derivatives with nothing else: no line search, no checks; the floor under the
defaults, run where they take dense Newton); ``unrolled`` (20 Newton steps by
``torch.func``, autograd through them); ``torchopt:newton`` / ``torchopt:lbfgs``
(``torchopt.diff.implicit.custom_root`` + CG, with a batched inner solve in torch; the faster of
the two is "torchopt"); ``jaxopt`` (jitted, vmapped ``LBFGS``, ``implicit_diff``, jax CPU, in a
worker process: :mod:`poolings.bench.generic_jax`); ``theseus`` (Gauss–Newton, implicit mode:
its gradient error only, as its ``JᵀJ`` is not this objective's Hessian).

Fairness: every method starts at the mean of the frames, stops at the same test on
``‖∇_u f‖`` (the layer's default tolerance) and solves its backward linear system (where it
iterates) to the layer's default CG tolerance; each one's achieved ``‖∇_u f‖`` is reported.

Measured: forward + backward (``torch.autograd.grad`` of ``⟨U, G⟩`` for a seeded ``G``), medians
of interleaved rounds, one thread; the first, untimed call of each method gives its output and
gradient, compared with a float64 exact reference (the closed-form Newton layer solved to
``‖∇f‖ ≤ 1e-14``), which is itself checked by central finite differences at every size. A
method whose gradient error exceeds the threshold of its dtype is flagged and not ranked.
Peak memory is measured for our layer. First-call latency is measured apart, in a fresh
process per method; jaxopt's compile time is reported apart from its run time.

Beyond the caps a method is not run at a size (projected time or memory, with the figure), or
run once and not repeated (its first call over the per-call cap): the output says which.

The peers are optional (``bash scripts/setup_peers.sh``, or the ``peers`` extra); a missing one
is reported as unavailable. To rerun a subset while tuning, e.g.::

    python -m poolings.cli bench generic --only ours:defaults,hand,jaxopt --sizes 16x10x64,16x10x512 \
        --objectives pseudo_huber --dtype float64 --no-first-call --out /tmp/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import generic_methods as gm
from .common import (
    BenchConfig,
    Stopwatch,
    add_common_args,
    config_from_args,
    environment,
    finish_environment,
    fmt_bytes,
    fmt_err,
    fmt_ratio,
    fmt_time,
    make_sequences,
    markdown_table,
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

NAME = "generic"
TITLE = "Generic objectives against the peers"
DTYPES = ("float32", "float64")

SWEEP = tuple((B, T, p) for B in (1, 16, 128) for T in (10, 100) for p in (8, 64, 512))
HAND_SIZES = ((1, 5, 3), (256, 20, 16), (16, 20, 256))  # the hand-written layer's goal sizes
FIRST_CALL_SIZE = (16, 10, 64)
QUICK_SWEEP = ((2, 5, 3),)
QUICK_HAND = ((1, 5, 3),)
QUICK_FIRST_CALL_SIZE = (2, 5, 3)

PEERS = ("hand", "unrolled", "torchopt:newton", "torchopt:lbfgs", "jaxopt")
CHECK_ONLY = ("theseus",)  # gradient error only, never ranked
FIRST_CALL_METHODS = ("ours:defaults", "hand", "unrolled", "torchopt:newton", "torchopt:lbfgs", "jaxopt")
QUICK_FIRST_CALL_METHODS = ("ours:defaults", "jaxopt")  # one torch path, and the jax one
LABELS = {
    "ours:defaults": "ours, defaults",
    "best_named": "ours, best named",
    "hand": "hand-written Newton",
    "bare": "bare autograd Newton",
    "unrolled": "unrolled Newton (20 steps)",
    "torchopt": "torchopt (best inner solve)",
    "torchopt:newton": "torchopt + Newton",
    "torchopt:lbfgs": "torchopt + L-BFGS",
    "jaxopt": "jaxopt LBFGS (jit)",
    "theseus": "theseus (Gauss–Newton)",
}

# a gradient whose relative error against the exact float64 one exceeds this is wrong
GRAD_THRESHOLD = {"float32": 1e-3, "float64": 1e-6}
# theseus runs where B·T·p² (its dense (B, T·p, p) Jacobian) stays below this
THESEUS_MAX_BTP2 = 2**24
JAXOPT_MAXITER = 500
# seconds / bytes: a first call over "call" is not repeated; a projection over "seconds" or
# "bytes" is not run
CAPS = {
    "full": {"call": 1.5, "seconds": 4.0, "bytes": 6 * 2**30},
    "quick": {"call": 5.0, "seconds": 20.0, "bytes": 2**30},
}
DEFAULTS_CAP_FACTOR = 3.0  # the defaults are what the goals are about: their time caps are wider
ROUND_BUDGET = 10.0  # seconds of timed rounds per size: fewer rounds (never < 3) where a round is slow
MIN_REPEATS = 3
FAST_BUDGET = 2.0  # where the default rounds take less, more of them (up to MAX_REPEATS): millisecond
MAX_REPEATS = 25  # calls on a shared machine vary by tens of percent from round to round
GOALS = {"torchopt": 1.0, "jaxopt": 3.0, "hand": 3.0, "named": 1.5, "first_call": 10.0}


def _bare_runs(B: int, T: int, p: int) -> bool:
    """Whether the bare autograd Newton loop (the floor under the defaults) runs at a hand-written
    layer's size: where the defaults' own rule picks dense Newton (``argminlayers.layer``'s
    ``DENSE_MAX_Q`` and ``DENSE_MAX_WORK``). Elsewhere the defaults take L-BFGS, and dense Newton's
    ``q`` batched products over ``(B, T, p)`` are work they avoid, no floor of theirs."""
    from argminlayers.layer import DENSE_MAX_Q, DENSE_MAX_WORK

    return p <= DENSE_MAX_Q and B * T * p * p <= DENSE_MAX_WORK


# -------------------------------------------------------------------------- options
OPTIONS = ("sizes", "only", "objectives", "first_call")  # what run_from_args reads (the CLI refuses the others)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark alone (``--dtype`` is the common one: both when not given)."""
    parser.add_argument("--sizes", default=None,
                        help="generic, rank_length: comma-separated BxTxP sizes to run instead of the whole "
                             "sweep (generic's default: the sweep and the hand-written layer's sizes), e.g. "
                             "16x10x64,16x10x512")
    parser.add_argument("--only", default=None,
                        help="generic: comma-separated methods or families to run, e.g. 'ours' (every "
                             "setting), 'ours:defaults,hand', 'jaxopt'; the exact reference always runs")
    parser.add_argument("--objectives", default=None,
                        help=f"generic: comma-separated objectives, of {','.join(gm.OBJECTIVES)}")
    parser.add_argument("--no-first-call", dest="first_call", action="store_false",
                        help="generic: skip the first-call latencies (fresh processes)")


def _parse_list(text: str | None, allowed: tuple[str, ...] | None, what: str) -> list[str] | None:
    if not text:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise ValueError(f"--{what}: {bad} not among {list(allowed)}")
    return items


def _selected(method: str, only: list[str] | None) -> bool:
    if only is None:
        return True
    return any(method == o or method.startswith(o + ":") for o in only)


def run_from_args(cfg: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    """``run`` with this benchmark's own options from the command line."""
    return run(
        cfg,
        dtypes=[args.dtype] if getattr(args, "dtype", None) else None,
        sizes=parse_sizes(getattr(args, "sizes", None)),
        only=_parse_list(getattr(args, "only", None), None, "only"),
        objectives=_parse_list(getattr(args, "objectives", None), gm.OBJECTIVES, "objectives"),
        first_call=getattr(args, "first_call", True),
    )


# ---------------------------------------------------------------------- jax worker
def _jax_python() -> str:
    return os.environ.get("JAX_PYTHON") or sys.executable


def _load_by_path_command(module: str, call: str) -> list[str]:
    """``python -c`` that loads ``poolings/bench/MODULE.py`` by its path (no package import) and runs ``call``."""
    path = str(Path(__file__).with_name(f"{module}.py"))
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location({module!r}, {path!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"{call}\n"
    )
    return ["-c", code]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class JaxWorker:
    """The jaxopt side in its own process (:mod:`poolings.bench.generic_jax`): it times each run
    itself, so the pipe is not in the figure. ``JAX_PYTHON`` names another interpreter."""

    def __init__(self) -> None:
        # stderr to a file: a pipe nobody reads would block the worker once XLA's logging fills it
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [_jax_python(), *_load_by_path_command("generic_jax", "m.serve()")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=_subprocess_env(),
        )
        self.info = self._read()
        if not self.info.get("ok"):
            raise ImportError(f"the jax worker did not start: {self.info.get('error')}")

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self.stderr.seek(0)
            err = self.stderr.read()[-600:]
            return {"ok": False, "error": f"no answer from {_jax_python()} (jax, jaxopt installed?) {err}".strip()}
        return json.loads(line)

    def ask(self, **msg: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", "jax worker failed"))
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
                self.proc.kill()
        self.stderr.close()


def _save_npy(d: str, **arrays: Tensor) -> None:
    for name, t in arrays.items():
        np.save(os.path.join(d, f"{name}.npy"), t.detach().cpu().numpy())


def _record(sw: Stopwatch, phase: str, seconds: float) -> None:
    """A lap measured elsewhere (the jax worker times its own runs): ``time_interleaved`` reads
    ``sw.laps`` only, so the round-robin order and the statistics stay the harness's."""
    sw.laps[phase] = sw.laps.get(phase, 0.0) + seconds


# ---------------------------------------------------------------------- cost models
def _dense_method(method: str) -> bool:
    """Methods whose cost grows as B·T·p² (a dense Hessian per iteration)."""
    if method in ("hand", "bare", "unrolled", "torchopt:newton", "theseus"):
        return True
    if method.startswith("ours:"):
        setting = method.split(":", 1)[1]
        return setting == gm.DEFAULTS or setting.startswith("newton+") or setting.endswith("dense") \
            or setting.endswith("jacobi")
    return False


def work(method: str, B: int, T: int, p: int) -> float:
    """Relative cost of one forward + backward, for projections from a measured size."""
    return float(B * T * p * p + B * p**3) if _dense_method(method) else float(B * T * p)


def static_bytes(method: str, B: int, T: int, p: int, itemsize: int) -> int | None:
    """Bytes a peer is known to hold: the unrolled graph keeps 20 steps of ``(B, T, p, p)``
    Hessian intermediates, torchopt's inner Newton ``p`` batched backward passes of
    ``(B, T, p)``, theseus a ``(B, T·p, p)`` Jacobian."""
    if method == "unrolled":
        return 2 * gm.UNROLL_STEPS * B * T * p * p * itemsize
    if method in ("torchopt:newton", "theseus"):
        return 2 * B * T * p * p * itemsize
    return None


class Measured:
    """Measured ``(work, seconds, bytes)`` per ``(objective, dtype, method)``; projections scale the
    point nearest below in work (time linearly in :func:`work`, memory in ``B·T·p²``: an upper bound)."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, str, str], list[tuple[float, float, float, int | None]]] = {}

    def add(self, key, B, T, p, seconds: float, nbytes: int | None) -> None:
        self.points.setdefault(key, []).append((work(key[2], B, T, p), float(B * T * p * p), seconds, nbytes))

    def project(self, key, B, T, p) -> tuple[float | None, float | None]:
        pts = self.points.get(key)
        if not pts:
            return None, None
        w, m = work(key[2], B, T, p), float(B * T * p * p)
        below = [pt for pt in pts if pt[0] <= w]
        w0, _, t0, _ = max(below) if below else min(pts)
        with_bytes = [pt for pt in pts if pt[3] is not None]
        below = [pt for pt in with_bytes if pt[1] <= m]
        ref = max(below, key=lambda pt: pt[1]) if below else (min(with_bytes, key=lambda pt: pt[1])
                                                              if with_bytes else None)
        return t0 * w / w0, (ref[3] * m / ref[1] if ref is not None else None)


# ------------------------------------------------------------------------------ run
def run(
    cfg: BenchConfig,
    *,
    dtypes: list[str] | None = None,
    sizes: list[tuple[int, int, int]] | None = None,
    only: list[str] | None = None,
    objectives: list[str] | None = None,
    first_call: bool = True,
) -> dict[str, Any]:
    """Generic objectives: our layer against torchopt, jaxopt, hand-written and unrolled Newton."""
    with cfg.applied():
        if cfg.threads is None:
            torch.set_num_threads(1)  # one thread unless asked otherwise: the jax side has one
        return _run(cfg, dtypes, sizes, only, objectives, first_call)


def _plan(cfg: BenchConfig, sizes) -> list[tuple[tuple[int, int, int], str]]:
    """``[(size, role)]``: role ``"sweep"`` (every method) or ``"hand"`` (defaults and hand-written)."""
    sweep = QUICK_SWEEP if cfg.quick else SWEEP
    hand = QUICK_HAND if cfg.quick else HAND_SIZES
    if sizes is None:
        plan = [(s, "sweep") for s in sweep] + [(s, "hand") for s in hand if s not in sweep]
    else:
        plan = [(s, "hand" if s in hand and s not in sweep else "sweep") for s in sizes]
    return sorted(plan, key=lambda x: (x[0][0] * x[0][1] * x[0][2] ** 2, x[0]))


def _methods(role: str, only: list[str] | None, size: tuple[int, int, int] | None = None) -> list[str]:
    bare = ["bare"] if size is None or _bare_runs(*size) else []
    if role == "hand":
        names = ["ours:defaults", "hand", *bare]
    else:
        names = ([f"ours:{s}" for s in gm.ours_settings()] + ["hand", *bare] + [m for m in PEERS if m != "hand"]
                 + list(CHECK_ONLY))
    return [m for m in names if _selected(m, only)]


def _run(cfg, dtypes, sizes, only, objectives, first_call) -> dict[str, Any]:
    started = time.perf_counter()
    env = environment(cfg)
    dtypes = dtypes or list(DTYPES)
    objectives = objectives or list(gm.OBJECTIVES)
    env["dtype"] = ",".join(dtypes)
    caps = cfg.caps(CAPS["quick" if cfg.quick else "full"])
    repeats = cfg.n_repeats(5)
    plan = _plan(cfg, sizes)
    notes: list[str] = []
    versions = _versions()
    env["versions"] = versions

    worker = None
    if any(_selected("jaxopt", only) and role == "sweep" for _, role in plan) or (
            first_call and _selected("jaxopt", only)):
        try:
            worker = JaxWorker()
            versions.update({k: worker.info[k] for k in ("jax", "jaxlib", "jaxopt")})
            env["jax_worker"] = {k: worker.info.get(k) for k in ("import_seconds", "xla_flags", "cpu_affinity")}
            env["jax_worker"]["python"] = _jax_python()
        except (ImportError, OSError) as exc:
            notes.append(f"jaxopt is unavailable: {exc} (bash scripts/setup_peers.sh installs it; JAX_PYTHON names "
                         "another interpreter that has it)")

    _warm_process(objectives, dtypes, only)
    measured = Measured()
    results = []
    todo = [(o, d, s, r) for o in objectives for d in dtypes for s, r in plan]
    try:
        for objective, dtype, size, role in progress(todo, desc=NAME, enabled=cfg.progress):
            t0 = time.perf_counter()
            try:
                results.append(_one(cfg, objective, dtype, size, role, only, repeats, caps, measured, worker, notes))
            except Exception as exc:  # one size that fails is reported; the sweep goes on
                results.append(_failed_row(objective, dtype, size, role, repeats, exc))
                notes.append(f"{objective} {dtype} {size}: {type(exc).__name__}: {exc}"[:300])
            results[-1]["wall_seconds"] = time.perf_counter() - t0
            if cfg.progress:
                print(f"{NAME}: {objective} {dtype} {_size(results[-1])}: {results[-1]['wall_seconds']:.1f} s",
                      file=sys.stderr, flush=True)
        first = []
        if first_call:
            B, T, p = QUICK_FIRST_CALL_SIZE if cfg.quick else FIRST_CALL_SIZE
            for dtype in dtypes:
                for objective in objectives:
                    for method in QUICK_FIRST_CALL_METHODS if cfg.quick else FIRST_CALL_METHODS:
                        if not _selected(method, only) or (objective == "weighted" and method != "ours:defaults"):
                            continue
                        first.append(_first_call(cfg, method, objective, dtype, B, T, p, worker is not None))
    finally:
        if worker is not None:
            worker.close()

    env = finish_environment(env, started)
    payload = {
        "benchmark": NAME,
        "command": _command(cfg, dtypes, sizes, only, objectives, first_call),
        "environment": env,
        "settings": {
            "objectives": objectives,
            "dtypes": dtypes,
            "sizes": [list(s) + [r] for s, r in plan],
            "repeats": repeats,
            "caps": caps,
            "tolerances": {d: dict(zip(("forward_grad_norm", "backward_cg"),
                                       gm.default_tolerances(getattr(torch, d)))) for d in dtypes},
            "stopping_rule": "‖∇_u f‖ ≤ tol · max(1, ‖∇_u f(u₀)‖) per sample (jaxopt: absolute tol times the "
                             "smallest max(1, ‖∇_u f(u₀)‖) of the batch; our layer, where ‖∇_u f(u₀)‖ < 1, "
                             "also ‖∇_u f‖ ≤ tol · ‖∇_u f(u₀)‖ or a step to u* ≤ tol · max(1, ‖u‖)), "
                             "u₀ = mean of the frames",
            "grad_threshold": GRAD_THRESHOLD,
            "gradient_reference": "closed-form Newton in float64 to ‖∇f‖ ≤ 1e-14, checked by central "
                                  "finite differences (2 random directions, ε = 1e-6)",
            "memory_method": peak_memory(lambda: None).method,
            "theseus": {**gm.THESEUS_SETTINGS, "max_B_T_p2": THESEUS_MAX_BTP2},
            "jaxopt_maxiter": JAXOPT_MAXITER,
            "unroll_steps": gm.UNROLL_STEPS,
            "goals": GOALS,
        },
        "notes": notes,
        "results": results,
        "first_call": first,
    }
    return _write(payload, output_dir(cfg))


def _write(payload: dict[str, Any], out: Path) -> dict[str, Any]:
    payload["verdict"] = verdict(payload)
    write_json(out / f"{NAME}.json", payload)
    charts = _charts(payload, out)
    write_markdown(out / f"{NAME}.md", TITLE, payload["command"], payload["environment"], _markdown(payload, charts))
    return payload


def render(out: "str | Path") -> dict[str, Any]:
    """Rewrite ``OUT/generic.md``, its chart and its verdict from ``OUT/generic.json`` (no new
    measurement: the tables of a run, regenerated after a change of the report)."""
    out = Path(out)
    return _write(json.loads((out / f"{NAME}.json").read_text()), out)


def _command(cfg, dtypes, sizes, only, objectives, first_call) -> str:
    cmd = cfg.command(NAME)
    # the common --dtype means "only this one" here: name what ran
    cmd = cmd.replace(f" --dtype {cfg.dtype}", "" if dtypes == list(DTYPES) else f" --dtype {dtypes[0]}")
    if sizes:
        cmd += " --sizes " + ",".join(f"{B}x{T}x{p}" for B, T, p in sizes)
    if only:
        cmd += " --only " + ",".join(only)
    if objectives and objectives != list(gm.OBJECTIVES):
        cmd += " --objectives " + ",".join(objectives)
    if not first_call:
        cmd += " --no-first-call"
    return cmd


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchopt", "optree", "theseus-ai", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _data(cfg, B, T, p, dtype):
    dt = getattr(torch, dtype)
    V = make_sequences(B, T, p, kind=cfg.data, seed=cfg.seed, dtype=dt)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    W = (0.5 + torch.rand(B, T, generator=gen, dtype=torch.float64)).to(dt)  # weights in [0.5, 1.5)
    G = seeded_like((B, p), seed=cfg.seed + 1, dtype=dt, device="cpu")
    return V, W, G


def _one(cfg, objective, dtype, size, role, only, repeats, caps, measured: Measured, worker, notes) -> dict:
    B, T, p = size
    dt = getattr(torch, dtype)
    itemsize = torch.finfo(dt).bits // 8
    weighted = objective != "pseudo_huber"
    V, W, G = _data(cfg, B, T, p, dtype)
    row: dict[str, Any] = {"objective": objective, "dtype": dtype, "B": B, "T": T, "p": p, "role": role,
                           "repeats": repeats, "methods": {}}

    # the exact reference, and its own finite-difference check (float64)
    U_ref, dV_ref, dW_ref = gm.reference(objective, V, W, G)
    row["reference_fd_error"] = gm.finite_difference_error(objective, V, W, G, dV_ref, dW_ref)
    tol, cg_tol = gm.default_tolerances(dt)
    gn0 = gm.grad_norm(objective, V.double(), gm.mean_init(V.double()), W.double())
    row["grad_norm_at_init_max"] = float(gn0.max())

    runners: dict[str, Callable[[Stopwatch], None]] = {}
    round_s = 0.0  # one round of the timed cases, from their first calls
    for method in _methods(role, only, size):
        entry: dict[str, Any] = {}
        row["methods"][method] = entry
        key = (objective, dtype, method)
        mcaps = dict(caps)
        if method == "ours:defaults":
            mcaps.update(call=caps["call"] * DEFAULTS_CAP_FACTOR, seconds=caps["seconds"] * DEFAULTS_CAP_FACTOR)
        # (the bare loop runs only at the hand-written layer's small sizes (_bare_runs), where it takes
        # milliseconds: a projection from one of them would scale overhead as work)
        t_proj, b_proj = measured.project(key, B, T, p) if method != "bare" else (None, None)
        b_static = static_bytes(method, B, T, p, itemsize)
        b_limit = b_static if b_static is not None else b_proj
        if method == "theseus" and (B * T * p * p > THESEUS_MAX_BTP2 or dtype != "float64"):
            entry.update(status="not run", reason=("float64 only" if dtype != "float64" else
                                                  f"B·T·p² > {THESEUS_MAX_BTP2} (its dense Jacobian)"))
            continue
        if b_limit is not None and b_limit > caps["bytes"]:
            how = "holds" if b_static is not None else "projected (scaled as B·T·p² from a measured size)"
            entry.update(status="skipped", reason=f"memory {how} {fmt_bytes(b_limit)} > cap {fmt_bytes(caps['bytes'])}",
                         projected_bytes=b_limit, projected_seconds=t_proj)
            continue
        if t_proj is not None and t_proj > mcaps["seconds"]:
            entry.update(status="skipped", reason=f"projected {fmt_time(t_proj)} > cap {fmt_time(mcaps['seconds'])}",
                         projected_seconds=t_proj)
            continue
        if method == "jaxopt":
            runner = _jaxopt_runner(worker, entry, objective, V, W, G, tol, cg_tol, gn0)
            if runner is None:
                continue
            U, dV, dW = entry.pop("_outputs")
            first_s = entry["first_run_seconds"]
        else:
            try:
                fn = gm.make(method, objective, dt)
            except ImportError as exc:
                entry.update(status="unavailable", reason=f"{exc} (bash scripts/setup_peers.sh installs the peers)"[:300])
                continue
            runner = _torch_runner(fn, V, W, G, weighted)
            caught: list[str] = []
            try:
                t0 = time.perf_counter()
                U, dV, dW = runner(None, caught)
                first_s = time.perf_counter() - t0
                # our memory, in a second untimed call (the profiler slows what it watches); for a
                # named setting only where it is cheap
                if method == "ours:defaults" or (method.startswith("ours:") and first_s <= mcaps["call"]):
                    entry["memory"] = peak_memory(lambda: runner(None, None)).bytes
            except TypeError as exc:
                if method.startswith("ours:") and weighted and "'w'" in str(exc):
                    entry.update(status="unsupported", reason=f"not supported by this version: {exc}"[:300])
                else:
                    entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
                continue
            except Exception as exc:  # a method that fails is reported, not hidden
                entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:300])
                continue
            entry["warnings"] = sorted(set(caught))
        entry.update(status="ok", first_run_seconds=first_s)
        _accuracy(entry, objective, dtype, V, W, U, dV, dW, U_ref, dV_ref, dW_ref)
        measured.add(key, B, T, p, first_s, entry.get("memory"))
        if method in CHECK_ONLY:
            continue
        if first_s > mcaps["call"]:
            entry["over_cap"] = f"first call {fmt_time(first_s)} > {fmt_time(mcaps['call'])}: that one run is its time"
            continue
        runners[method] = runner if method == "jaxopt" else (lambda sw, r=runner: r(sw, None))
        round_s += first_s

    if cfg.repeats is None and round_s * repeats > ROUND_BUDGET:
        repeats = max(MIN_REPEATS, int(ROUND_BUDGET / max(round_s, 1e-9)))
    elif cfg.repeats is None and not cfg.quick and round_s * repeats < FAST_BUDGET:
        repeats = max(repeats, min(MAX_REPEATS, int(FAST_BUDGET / max(round_s, 1e-9))))
    row["repeats"] = repeats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = time_interleaved(runners, repeats=repeats, warmup=0) if runners else {}
    for method, t in timings.items():
        entry = row["methods"][method]
        entry["total"] = t["total"]
        for phase in ("forward", "backward"):
            if phase in t:
                entry[phase] = t[phase]
        measured.points[(objective, dtype, method)][-1] = (
            *measured.points[(objective, dtype, method)][-1][:2], t["total"].median, entry.get("memory"))
    if "ours:defaults" in timings:  # where the defaults' time goes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["methods"]["ours:defaults"]["derivatives"] = _derivative_share(runners["ours:defaults"])
    if worker is not None and "jaxopt" in row["methods"]:
        try:
            worker.ask(op="drop", key="case")
        except RuntimeError:  # pragma: no cover
            pass
    _summarise_row(row, dtype)
    return row


def _warm_process(objectives, dtypes, only) -> None:
    """One untimed call of every torch method at a tiny size, so that the one-off costs of a
    process (lazy imports, torch.func's first trace) land on no measured size: they are the
    first-call latency, measured apart."""
    methods = [m for m in [f"ours:{s}" for s in gm.ours_settings()] + ["hand", "bare", "unrolled", "torchopt:newton",
                                                                           "torchopt:lbfgs"] if _selected(m, only)]
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            V = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).to(dt)
            W = torch.ones(2, 5, dtype=dt)
            G = torch.ones(2, 3, dtype=dt)
            for objective in objectives:
                for method in methods:
                    try:
                        _torch_runner(gm.make(method, objective, dt), V, W, G, objective != "pseudo_huber")(None, None)
                    except Exception:  # noqa: BLE001 - a method that fails is reported at the measured sizes
                        pass


def _failed_row(objective, dtype, size, role, repeats, exc) -> dict[str, Any]:
    B, T, p = size
    row = {"objective": objective, "dtype": dtype, "B": B, "T": T, "p": p, "role": role, "repeats": repeats,
           "reference_fd_error": None, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300],
           "methods": {}}
    _summarise_row(row, dtype)
    return row


def _torch_runner(fn, V, W, G, weighted):
    """``run(sw, caught) -> (U, dV, dW)``; ``sw`` ``None`` for the untimed first call."""

    def run_once(sw: Stopwatch | None, caught: list[str] | None):
        Vr = V.detach().requires_grad_(True)
        Wr = W.detach().requires_grad_(True)
        with warnings.catch_warnings(record=caught is not None) as ws:
            if caught is not None:
                warnings.simplefilter("always")
            if sw:
                sw.start()
            U = fn(Vr, Wr)
            if sw:
                sw.lap("forward")
            grads = torch.autograd.grad(U, (Vr, Wr) if weighted else (Vr,), G)
            if sw:
                sw.lap("backward")
        if caught is not None:
            caught.extend(f"{w.category.__name__}: {str(w.message)[:160]}" for w in ws)
        return U.detach(), grads[0], (grads[1] if weighted else None)

    return run_once


def _jaxopt_runner(worker, entry, objective, V, W, G, tol, cg_tol, gn0):
    if worker is None:
        entry.update(status="unavailable", reason="jax/jaxopt could not be started (see the notes)")
        return None
    d = tempfile.mkdtemp(prefix="generic-jax-")
    _save_npy(d, V=V, W=W, G=G)
    abs_tol = tol * float(gn0.clamp_min(1.0).min())
    try:
        info = worker.ask(op="setup", key="case", objective=objective, dir=d, tol=abs_tol, cg_tol=cg_tol,
                          maxiter=JAXOPT_MAXITER)
    except RuntimeError as exc:
        entry.update(status="failed", reason=str(exc)[:300])
        return None
    load = lambda n: torch.from_numpy(np.load(os.path.join(d, f"{n}.npy")))  # noqa: E731
    U, dV = load("U"), load("dV")
    dW = load("dW") if objective != "pseudo_huber" else None
    for n in os.listdir(d):
        os.remove(os.path.join(d, n))
    os.rmdir(d)
    entry.update(compile_seconds=info["compile_seconds"], first_run_seconds=info["first_run_seconds"],
                 iterations_max=info["iterations_max"], jaxopt_tol=abs_tol,
                 maxiter_reached=info["iterations_max"] >= JAXOPT_MAXITER)
    entry["_outputs"] = (U, dV, dW)

    def case(sw: Stopwatch) -> None:
        _record(sw, "total", worker.ask(op="run", key="case")["seconds"])

    return case


@contextlib.contextmanager
def _derivative_clock():
    """``[seconds]``: the wall time spent, while the block runs, evaluating the objective's plain
    function and in autograd's reverse passes through it (the layer's gradient records,
    Hessian products, batched Hessians and mixed products: ``vjp`` and ``batched_vjp``), i.e.
    the derivative work that a closed form would replace. None of these calls another."""
    import argminlayers.hessian as hessian_module
    import argminlayers.objective as objective_module

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        return wrapper

    sites = [(objective_module, "vjp"), (hessian_module, "vjp"), (hessian_module, "batched_vjp"),
             (objective_module.FunctionObjective, "_raw_f")]
    saved = [getattr(owner, name) for owner, name in sites]
    for (owner, name), fn in zip(sites, saved):
        setattr(owner, name, timed(fn))
    try:
        yield spent
    finally:
        for (owner, name), fn in zip(sites, saved):
            setattr(owner, name, fn)


def _derivative_share(run: Callable[[Stopwatch | None], Any], calls: int = 3) -> dict[str, float]:
    """Medians over ``calls`` untimed, instrumented forward + backward calls of the defaults: the
    call's time, the part of it in derivative work (:func:`_derivative_clock`), and the share."""
    totals, spent = [], []
    for _ in range(calls):
        with _derivative_clock() as clock:
            t0 = time.perf_counter()
            run(None)
            totals.append(time.perf_counter() - t0)
        spent.append(clock[0])
    shares = sorted(d / t for d, t in zip(spent, totals))
    return {"total": float(np.median(totals)), "seconds": float(np.median(spent)), "share": shares[len(shares) // 2]}


def _accuracy(entry, objective, dtype, V, W, U, dV, dW, U_ref, dV_ref, dW_ref) -> None:
    from argminlayers.check import errors

    entry["grad_norm_max"] = float(gm.grad_norm(objective, V.double(), U.double(), W.double()).max())
    entry["output_rel_err"] = errors(U, U_ref)[0]
    entry["grad_rel_err"], _, entry["grad_cosine"] = errors(dV, dV_ref)
    if dW_ref is not None:
        entry["grad_w_rel_err"] = errors(dW, dW_ref)[0]
    worst = max(entry["grad_rel_err"], entry.get("grad_w_rel_err", 0.0))
    entry["gradient_ok"] = bool(math.isfinite(worst) and worst <= GRAD_THRESHOLD[dtype])


def _median(entry: dict | None) -> float | None:
    """Forward + backward seconds of a method: the interleaved median, or its one run over the cap."""
    if not entry or entry.get("status") != "ok":
        return None
    t = entry.get("total")
    if t is not None:
        return t.median if hasattr(t, "median") else t["median"]
    return entry.get("first_run_seconds") if "over_cap" in entry else None


def _ranked(entry: dict | None) -> float | None:
    """The time of a method whose gradient is right (a wrong one is not ranked)."""
    t = _median(entry)
    return t if t is not None and entry.get("gradient_ok") else None


def _summarise_row(row: dict, dtype: str) -> None:
    """Best named setting, best torchopt variant, and the ratios of the defaults to each peer."""
    m = row["methods"]
    named = {k: _ranked(e) for k, e in m.items() if k.startswith("ours:") and k != "ours:defaults"}
    named = {k: v for k, v in named.items() if v is not None}
    s: dict[str, Any] = {}
    if named:
        best = min(named, key=named.get)
        s["best_named"], s["best_named_seconds"] = best, named[best]
    tor = {k: _ranked(m.get(k)) for k in ("torchopt:newton", "torchopt:lbfgs")}
    tor = {k: v for k, v in tor.items() if v is not None}
    if tor:
        best = min(tor, key=tor.get)
        s["torchopt"], s["torchopt_seconds"] = best, tor[best]
    d = _ranked(m.get("ours:defaults"))
    s["defaults_seconds"] = d
    s["over_torchopt"] = _ratio(d, s.get("torchopt_seconds"))
    s["over_jaxopt"] = _ratio(d, _ranked(m.get("jaxopt")))
    s["over_hand"] = _ratio(d, _ranked(m.get("hand")))
    s["bare_over_hand"] = _ratio(_ranked(m.get("bare")), _ranked(m.get("hand")))  # the floor, against the goal
    s["over_bare"] = _ratio(d, _ranked(m.get("bare")))
    s["bare_over_jaxopt"] = _ratio(_ranked(m.get("bare")), _ranked(m.get("jaxopt")))
    s["over_best_named"] = _ratio(d, s.get("best_named_seconds"))
    der = (m.get("ours:defaults") or {}).get("derivatives")
    s["derivative_share"] = der["share"] if der else None
    mem = (m.get("ours:defaults") or {}).get("memory")
    itemsize = 4 if dtype == "float32" else 8
    btq2 = row["B"] * row["T"] * row["p"] ** 2 * itemsize
    s["defaults_memory"] = mem
    s["B_T_q2_bytes"] = btq2
    s["memory_over_B_T_q2"] = mem / btq2 if mem is not None else None
    row["summary"] = s


def _ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


# ---------------------------------------------------------------------- first call
def _first_call(cfg, method, objective, dtype, B, T, p, jax_ok: bool) -> dict[str, Any]:
    """One fresh process per method: import, first forward + backward, then steady calls."""
    entry: dict[str, Any] = {"method": method, "objective": objective, "dtype": dtype, "B": B, "T": T, "p": p}
    V, W, G = _data(cfg, B, T, p, dtype)
    tol, cg_tol = gm.default_tolerances(getattr(torch, dtype))
    with tempfile.TemporaryDirectory(prefix="generic-first-") as d:
        if method == "jaxopt":
            if not jax_ok:
                entry.update(status="unavailable")
                return entry
            _save_npy(d, V=V, W=W, G=G)
            gn0 = gm.grad_norm(objective, V.double(), gm.mean_init(V.double()), W.double())
            abs_tol = tol * float(gn0.clamp_min(1.0).min())
            cmd = [_jax_python(), *_load_by_path_command(
                "generic_jax", f"import json; print(json.dumps(m.first_call({objective!r}, {d!r}, {abs_tol!r}, "
                               f"{cg_tol!r}, {JAXOPT_MAXITER})))")]
        else:
            path = os.path.join(d, "data.pt")
            torch.save({"V": V, "W": W, "G": G}, path)
            cmd = [sys.executable, *_load_by_path_command(
                "generic_methods", f"import json; print(json.dumps(m.first_call({method!r}, {objective!r}, {path!r})))")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=600)
        entry["process_seconds"] = time.perf_counter() - t0
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        msg = err[-1] if err else f"exit {proc.returncode}"
        entry.update(status="unsupported" if "unexpected keyword argument 'w'" in msg else "failed", reason=msg[:300])
        return entry
    entry.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
    entry["first_over_steady"] = entry["first_call_seconds"] / entry["steady_seconds"]
    entry["stderr_lines"] = [ln[:200] for ln in proc.stderr.strip().splitlines() if ln.strip()][:6]
    return entry


# ------------------------------------------------------------------------- verdict
def verdict(payload: dict[str, Any]) -> list[str]:
    """Plain sentences from the numbers: which goals hold where, and by how much the rest miss."""
    lines = []
    rows = payload["results"]
    for objective in payload["settings"]["objectives"]:
        for dtype in payload["settings"]["dtypes"]:
            rs = [r for r in rows if r["objective"] == objective and r["dtype"] == dtype]
            if not rs:
                continue
            head = f"**{objective}, {dtype}.**"
            d = (rs[0]["methods"].get("ours:defaults") or {})
            if all((r["methods"].get("ours:defaults") or {}).get("status") == "unsupported" for r in rs):
                lines.append(f"{head} The layer does not take the keyword input yet (\"{d.get('reason', '')[:90]}\"): "
                             "none of the goals can be assessed; the peers' figures stand as the target.")
                continue
            sweep = [r for r in rs if r["role"] == "sweep"]
            parts = [head]
            for key, label, goal in (("over_torchopt", "at least as fast as torchopt", GOALS["torchopt"]),
                                     ("over_jaxopt", "within 3× of jaxopt", GOALS["jaxopt"]),
                                     ("over_best_named", "within 1.5× of the best named setting", GOALS["named"])):
                parts.append(_goal_sentence(sweep, key, label, goal))
            hand = [r for r in rs if (r["B"], r["T"], r["p"]) in HAND_SIZES or r["role"] == "hand"]
            if hand:
                parts.append(_goal_sentence(hand, "over_hand", "within 3× of the hand-written layer "
                                            "(at its sizes)", GOALS["hand"]))
                parts.append(_floor_sentence(hand))
            parts.append(_jax_floor_sentence(sweep))
            parts.append(_derivative_sentence(rs))
            parts.append(_memory_sentence(sweep))
            wrong = sorted({f"{m} ({_size(r)})" for r in rs for m, e in r["methods"].items()
                            if e.get("status") == "ok" and not e.get("gradient_ok")})
            if wrong:
                parts.append(f"Gradients flagged as wrong (not ranked): {', '.join(wrong[:8])}"
                             f"{' …' if len(wrong) > 8 else ''}.")
            lines.append(" ".join(p for p in parts if p))
    fc = [e for e in payload.get("first_call", []) if e["method"] == "ours:defaults"]
    for e in fc:
        if e.get("status") != "ok":
            lines.append(f"First call ({e['objective']}, {e['dtype']}): {e.get('status')}"
                         f"{': ' + e['reason'][:100] if e.get('reason') else ''}.")
            continue
        fw = [w for w in e.get("warnings", []) if w.startswith("FutureWarning")]
        ratio = e["first_over_steady"]
        ok = ratio <= GOALS["first_call"] and not fw
        by = f" ({ratio / GOALS['first_call']:.3g}× the allowed 10 calls)" if ratio > GOALS["first_call"] else ""
        lines.append(
            f"First call in a fresh process ({e['objective']}, {e['dtype']}, {e['B']} × {e['T']} × {e['p']}): "
            f"{fmt_time(e['first_call_seconds'])} = {ratio:.3g} steady calls ({fmt_time(e['steady_seconds'])}), "
            f"plus {fmt_time(e['import_seconds'])} to import argminlayers; "
            f"{'a FutureWarning is printed' if fw else 'no FutureWarning'}; goal (≤ 10 steady calls, no "
            f"FutureWarning) {'met' if ok else 'missed'}{by}.")
    comp = [e["compile_seconds"] for r in rows for k, e in r["methods"].items()
            if k == "jaxopt" and e.get("status") == "ok"]
    if comp:
        lines.append(f"jaxopt's compile time (excluded from its times): {fmt_time(min(comp))} – {fmt_time(max(comp))} "
                     f"per size.")
    return lines


def _size(r: dict) -> str:
    return f"{r['B']}×{r['T']}×{r['p']}"


def _goal_sentence(rows, key, label, goal) -> str:
    vals = [(r["summary"].get(key), r) for r in rows]
    have = [(v, r) for v, r in vals if v is not None]
    if not have:
        return f"{label[0].upper() + label[1:]}: not measured at any size."
    met = [r for v, r in have if v <= goal]
    missed = sorted([(v, r) for v, r in have if v > goal], key=lambda x: -x[0])
    text = f"Defaults {label}: at {len(met)} of {len(have)} measured sizes"
    if missed:
        worst = ", ".join(f"{_size(r)} {v:.3g}×" for v, r in missed[:3])
        text += f"; missed at {len(missed)} (worst: {worst}, i.e. up to {missed[0][0] / goal:.3g}× over the goal)"
    absent = len(vals) - len(have)
    if absent:
        text += f"; {absent} size(s) without both figures (skipped, over a cap, or a gradient flagged)"
    return text + "."


def _floor_sentence(rows) -> str:
    """The bare autograd Newton loop against the hand-written layer and the defaults: how much of the
    gap to the hand-written layer is the derivatives' own (autograd instead of closed forms)."""
    have = [r for r in rows if r["summary"].get("bare_over_hand") is not None]
    if not have:
        return ""
    parts = [f"{_size(r)}: {r['summary']['bare_over_hand']:.3g}× the hand-written call"
             + (f", the defaults {r['summary']['over_bare']:.3g}× the bare loop" if r["summary"].get("over_bare") else "")
             for r in have]
    under = [r for r in have if r["summary"]["bare_over_hand"] > GOALS["hand"]]
    text = ("The floor: Newton on the same autograd derivatives with nothing else (no line search, no checks; "
            "'bare autograd Newton') takes " + "; ".join(parts))
    if under:
        text += (f". Where that floor alone exceeds {GOALS['hand']:g}× ({', '.join(_size(r) for r in under)}), "
                 "no Newton loop on autograd-derived derivatives can meet the goal on this CPU")
    return text + "."


def _jax_floor_sentence(rows) -> str:
    """The bare loop against jitted jaxopt, at the sweep's sizes where the defaults take dense Newton."""
    have = sorted((r for r in rows if r["summary"].get("bare_over_jaxopt") is not None),
                  key=lambda r: (r["B"], r["T"], r["p"]))
    if not have:
        return ""
    over = [r for r in have if r["summary"]["bare_over_jaxopt"] > GOALS["jaxopt"]]
    parts = [f"{_size(r)} {r['summary']['bare_over_jaxopt']:.3g}×" for r in have]
    text = (f"Against jitted jaxopt, where the defaults take dense Newton, that bare loop takes {', '.join(parts)} "
            f"its time")
    if over:
        text += f" (over {GOALS['jaxopt']:g}× by itself at {len(over)} of {len(have)})"
    return text + "."


def _derivative_sentence(rows) -> str:
    """Where the defaults' time goes: the share in derivative work, and at the hand-written layer's
    sizes that work's time against the hand-written call (closed forms instead of autograd)."""
    have = [r for r in rows if r["summary"].get("derivative_share") is not None]
    if not have:
        return ""
    shares = sorted(r["summary"]["derivative_share"] for r in have)
    text = (f"Where the defaults' time goes (one instrumented call per size): evaluating f and autograd's reverse "
            f"passes through it take {100 * shares[0]:.0f}–{100 * shares[-1]:.0f} % of it (median "
            f"{100 * shares[len(shares) // 2]:.0f} %); the rest is the solver loop (per-sample bookkeeping, line "
            f"search, checks) and the layer around it (validation, the autograd Function, the backward solve)")
    hand = []
    for r in have:
        h = _ranked(r["methods"].get("hand"))
        if (r["B"], r["T"], r["p"]) in HAND_SIZES and h:
            der = r["methods"]["ours:defaults"]["derivatives"]
            hand.append(f"{_size(r)}: {fmt_time(der['seconds'])} of {fmt_time(der['total'])}, "
                        f"{der['seconds'] / h:.2g}× the hand-written call")
    if hand:
        text += "; at the hand-written layer's sizes, that derivative work alone took " + ", ".join(hand)
    return text + "."


def _memory_sentence(rows) -> str:
    skipped = [r for r in rows if (r["methods"].get("ours:defaults") or {}).get("status") == "skipped"]
    text = ""
    if skipped:
        text = (f"The defaults were not run at {len(skipped)} size(s): "
                + "; ".join(f"{_size(r)}: {r['methods']['ours:defaults']['reason']}" for r in skipped[:4])
                + (" …" if len(skipped) > 4 else "") + ". ")
    return text + _memory_share(rows)


def _memory_share(rows) -> str:
    big = [r for r in rows if r["summary"].get("memory_over_B_T_q2") is not None
           and r["summary"]["B_T_q2_bytes"] >= 64 * 2**20]
    if not big:
        return ""
    bad = [r for r in big if r["summary"]["memory_over_B_T_q2"] >= 0.5]
    if not bad:
        return (f"Memory: at every size where B·T·q² reaches 64 MiB ({len(big)}), the defaults' peak stays below "
                f"half of it (largest share {max(r['summary']['memory_over_B_T_q2'] for r in big):.2g}).")
    worst = max(bad, key=lambda r: r["summary"]["memory_over_B_T_q2"])
    return (f"Memory grows as B·T·q² at the defaults: at {len(bad)} of {len(big)} sizes where B·T·q² ≥ 64 MiB the "
            f"peak is ≥ half of it (worst {_size(worst)}: {fmt_bytes(worst['summary']['defaults_memory'])}, "
            f"{worst['summary']['memory_over_B_T_q2']:.2g}× B·T·q²).")


# ------------------------------------------------------------------------ markdown
def _cell(entry: dict | None, with_err: bool = False) -> str:
    if not entry:
        return "–"
    st = entry.get("status")
    if st != "ok":
        return {"unsupported": "not supported by this version", "skipped": f"skipped ({entry['reason']})",
                "not run": "not run"}.get(st, f"{st}: {entry.get('reason', '')[:60]}")
    t = _median(entry)
    text = fmt_time(t)
    if "over_cap" in entry:
        text += " (1 run)"
    if not entry.get("gradient_ok"):
        text += " ⚠ wrong gradient"
    return text


def _markdown(payload: dict[str, Any], charts: list[str]) -> str:
    s = payload["settings"]
    tols = "; ".join(f"{d}: ‖∇f‖ tol {v['forward_grad_norm']:g}, CG tol {v['backward_cg']:g}"
                     for d, v in s["tolerances"].items())
    parts = [
        "Forward + backward of each method on the same data (`walk` frames; weights in [0.5, 1.5)) and the same "
        "upstream gradient, one thread, medians of "
        "interleaved rounds after an untimed first call (our layer's memory: one more untimed call, under the "
        "profiler); every method starts at the mean of the "
        f"frames and stops at `{s['stopping_rule']}` ({tols}). Gradients are compared with {s['gradient_reference']}; "
        f"a relative error above {s['grad_threshold']['float32']:g} (float32) or {s['grad_threshold']['float64']:g} "
        "(float64) on dL/dV (or dL/dW) flags the method (⚠) and it is not ranked. jaxopt runs in its own process "
        "(XLA on one thread), timed there with `block_until_ready`; its compile time is apart. "
        f"Caps: a first call over {fmt_time(s['caps']['call'])} is not repeated (1 run); a method projected over "
        f"{fmt_time(s['caps']['seconds'])} or {fmt_bytes(s['caps']['bytes'])} is skipped, with the figure "
        f"(the defaults' time caps are {DEFAULTS_CAP_FACTOR:g}× wider); a projection scales the method's nearest "
        "measured size below by B·T·p² + B·p³ (dense-Hessian methods) or B·T·p (time), and by B·T·p² (our memory). "
        f"Rounds: {s['repeats']}, fewer (never below {MIN_REPEATS}) where a round is over {ROUND_BUDGET:g} s, "
        f"more (up to {MAX_REPEATS}) where {s['repeats']} take under {FAST_BUDGET:g} s; "
        "each table gives the count. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in payload['environment'].get('versions', {}).items())}.",
    ]
    parts += [f"Note: {n}" for n in payload["notes"]]
    parts.append("### Verdict\n\n" + "\n\n".join(payload["verdict"]))
    for objective in s["objectives"]:
        for dtype in s["dtypes"]:
            rs = [r for r in payload["results"] if r["objective"] == objective and r["dtype"] == dtype]
            if rs:
                parts.append(_tables(objective, dtype, rs))
    if payload.get("first_call"):
        parts.append(_first_call_table(payload["first_call"]))
    parts += [f"![{c}]({c})" for c in charts]
    return "\n\n".join(parts)


def _tables(objective: str, dtype: str, rs: list[dict]) -> str:
    out = [f"### {objective}, {dtype}"]
    head = ["B × T × p", "rounds", LABELS["ours:defaults"], LABELS["best_named"], LABELS["hand"], LABELS["bare"],
            LABELS["torchopt"],
            LABELS["jaxopt"] + " (compile)", LABELS["unrolled"], "defaults / torchopt", "defaults / jaxopt",
            "defaults / hand", "defaults / best named", "defaults: share in f and its derivatives"]
    body = []
    for r in rs:
        m, sm = r["methods"], r["summary"]
        jx = m.get("jaxopt")
        jtext = _cell(jx) + (f" ({fmt_time(jx['compile_seconds'])})" if jx and "compile_seconds" in jx else "")
        best = sm.get("best_named")
        tor = sm.get("torchopt")
        body.append([
            _size(r) + (" (hand size)" if r["role"] == "hand" else ""), r["repeats"],
            _cell(m.get("ours:defaults")),
            f"{fmt_time(sm['best_named_seconds'])} ({best.split(':', 1)[1]})" if best else "–",
            _cell(m.get("hand")), _cell(m.get("bare")),
            f"{fmt_time(sm['torchopt_seconds'])} ({tor.split(':', 1)[1]})" if tor else _cell(m.get("torchopt:lbfgs")),
            jtext, _cell(m.get("unrolled")),
            fmt_ratio(sm["over_torchopt"]), fmt_ratio(sm["over_jaxopt"]), fmt_ratio(sm["over_hand"]),
            fmt_ratio(sm["over_best_named"]),
            f"{100 * sm['derivative_share']:.0f} %" if sm.get("derivative_share") is not None else "–",
        ])
    out.append("Forward + backward (median):\n\n" + markdown_table(head, body))

    named = [f"ours:{x}" for x in gm.ours_settings()[1:]]
    statuses = {(r["methods"].get(k) or {}).get("status") for r in rs for k in named} - {None}
    if statuses == {"unsupported"}:
        out.append("Our layer at every named setting: not supported by this version (the keyword input).")
    elif statuses:
        body = [[_size(r), fmt_bytes((r["methods"].get("ours:defaults") or {}).get("memory"))]
                + [_cell(r["methods"].get(k)) for k in named] for r in rs if r["role"] == "sweep"]
        out.append("Our layer at every named setting (and the defaults' peak memory):\n\n"
                   + markdown_table(["B × T × p", "defaults' memory"] + [k.split(":", 1)[1] for k in named], body))

    cols = ["ours:defaults", "best_named", "hand", "bare", "torchopt:newton", "torchopt:lbfgs", "jaxopt", "unrolled", "theseus"]
    body = []
    for r in rs:
        cells = [_size(r), fmt_err(r["reference_fd_error"])]
        for c in cols:
            e = r["methods"].get(r["summary"].get("best_named")) if c == "best_named" else r["methods"].get(c)
            if not e or e.get("status") != "ok":
                cells.append("–")
                continue
            err = fmt_err(e["grad_rel_err"]) + (f" / {fmt_err(e['grad_w_rel_err'])}" if "grad_w_rel_err" in e else "")
            cells.append(err + ("" if e["gradient_ok"] else " ⚠") + f" (‖∇f‖ {fmt_err(e['grad_norm_max'])})")
        body.append(cells)
    out.append("Gradient error against the exact float64 gradient (dL/dV" + (" / dL/dW" if objective != "pseudo_huber"
               else "") + ") and each method's achieved max ‖∇f‖; the reference's own finite-difference error in the "
               "second column:\n\n" + markdown_table(["B × T × p", "reference vs FD"] + [LABELS.get(c, c) for c in cols],
                                                     body))
    return "\n\n".join(out)


def _first_call_table(entries: list[dict]) -> str:
    body = []
    for e in entries:
        if e.get("status") != "ok":
            body.append([e["method"], e["objective"], e["dtype"], f"{e.get('status')}: {e.get('reason', '')[:80]}"]
                        + ["–"] * 5)
            continue
        fw = [w for w in e.get("warnings", []) if "Warning" in w]
        body.append([LABELS.get(e["method"], e["method"]), e["objective"], e["dtype"], fmt_time(e["import_seconds"]),
                     fmt_time(e.get("compile_seconds")) if "compile_seconds" in e else "–",
                     fmt_time(e["first_call_seconds"]), fmt_time(e["steady_seconds"]),
                     f"{e['first_over_steady']:.3g}", "; ".join(fw)[:160] or "none"])
    B, T, p = entries[0]["B"], entries[0]["T"], entries[0]["p"]
    return (f"### First call in a fresh process ({B} × {T} × {p})\n\n"
            "One new process per method; torch is imported before the clock starts, the method's own library "
            "(argminlayers, torchopt, jax + jaxopt) is the import column. The first call is the first forward + "
            "backward (for jaxopt: trace, compile and run); steady is the median of the next 5 in the same process.\n\n"
            + markdown_table(["method", "objective", "dtype", "import", "compile", "first call", "steady",
                              "first / steady", "warnings"], body))


# -------------------------------------------------------------------------- charts
def _charts(payload: dict[str, Any], out: Path) -> list[str]:
    """One chart per objective (``generic_OBJECTIVE.png``): a row per dtype, times and ratios."""
    names = []
    for objective in payload["settings"]["objectives"]:
        combos = [(objective, d) for d in payload["settings"]["dtypes"]
                  if any(r["objective"] == objective and r["dtype"] == d for r in payload["results"])]
        if combos:
            names.append(_chart(payload, out, objective, combos))
    return names


def _chart(payload: dict[str, Any], out: Path, objective: str, combos) -> str:
    plt = plt_module()
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.2 * len(combos)), squeeze=False)
    series = [("ours:defaults", "C0"), ("best_named", "C9"), ("hand", "C2"), ("bare", "C5"), ("torchopt", "C1"),
              ("jaxopt", "C3"), ("unrolled", "C7")]
    for (objective, dtype), (ax, axr) in zip(combos, axes):
        rs = [r for r in payload["results"] if r["objective"] == objective and r["dtype"] == dtype]
        xs = range(len(rs))
        for name, color in series:
            ys = []
            for r in rs:
                if name == "best_named":
                    ys.append(r["summary"].get("best_named_seconds"))
                elif name == "torchopt":
                    ys.append(r["summary"].get("torchopt_seconds"))
                else:
                    ys.append(_ranked(r["methods"].get(name)))
            if any(y is not None for y in ys):
                ax.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", ms=3, color=color,
                        label=LABELS[name])
        for key, label, goal, color in (("over_torchopt", "defaults / torchopt", GOALS["torchopt"], "C1"),
                                        ("over_jaxopt", "defaults / jaxopt", GOALS["jaxopt"], "C3"),
                                        ("over_best_named", "defaults / best named", GOALS["named"], "C9"),
                                        ("over_hand", "defaults / hand", GOALS["hand"], "C2")):
            ys = [r["summary"].get(key) for r in rs]
            if any(y is not None for y in ys):
                axr.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", ms=3, color=color, label=label)
                axr.axhline(goal, color=color, ls=":", lw=0.8)
        labels = [_size(r) for r in rs]
        for a in (ax, axr):
            a.set_xticks(list(xs), labels, rotation=70, fontsize=6)
            a.set_yscale("log")
            a.grid(True, alpha=0.3)
        ax.set_ylabel("forward + backward (s)")
        ax.set_title(f"{objective}, {dtype}: time", fontsize=9)
        axr.set_ylabel("ratio (dotted: goal)")
        axr.set_title(f"{objective}, {dtype}: our defaults over each", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
        if axr.get_lines():
            axr.legend(fontsize=6, loc="upper left")
    name = f"{NAME}_{objective}.png"
    save_figure(fig, out / name)
    return name


# ------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m poolings.bench.generic [options]``."""
    parser = argparse.ArgumentParser(prog="python -m poolings.bench.generic", description=run.__doc__)
    add_common_args(parser)
    parser.set_defaults(dtype=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "dtype": args.dtype or "float32"}))
    run_from_args(cfg, args)
    from .report import write_index

    print(f"wrote {write_index(cfg.out)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
