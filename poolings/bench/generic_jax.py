"""The jaxopt side of the generic-objective benchmark, run as a worker process.

It imports only numpy, jax and jaxopt (not torch, not this package), so that it can run from
another Python environment than the benchmark's (``JAX_PYTHON``). The benchmark starts it with
``python generic_jax.py`` and talks to it in JSON lines over stdin/stdout:

- ``{"op": "setup", "key", "objective", "dir", "tol", "cg_tol", "maxiter"}``: load
  ``V.npy`` (and ``W.npy``, ``G.npy``) from ``dir``, build the jitted forward + backward, compile it
  (timed apart: ``lower().compile()``), run it once and write ``U.npy``, ``dV.npy`` (``dW.npy``)
  to ``dir``; answers the compile time, the first run's time, the largest ``‖∇_u f‖`` at the
  solution and the largest iteration count;
- ``{"op": "run", "key"}``: one timed run (``block_until_ready`` inside the timing); answers
  ``{"seconds": t}``: the time is taken here, so the pipe to the benchmark is not in it;
- ``{"op": "drop", "key"}``, ``{"op": "quit"}``.

``python generic_jax.py --first-call OBJECTIVE DIR TOL CG_TOL MAXITER`` instead measures a fresh
process: the import of jax and jaxopt, the compile, the first run and steady runs, and prints them
as one JSON line.

The method: ``jaxopt.LBFGS`` on the per-sample objective (``implicit_diff=True``, the linear
system of the implicit gradient solved by ``jaxopt.linear_solve.solve_cg`` with relative
tolerance ``cg_tol``; jaxopt's default ``solve_normal_cg`` would square the condition number),
``vmap`` over the batch, started at the mean of the frames, stopping at ``‖∇_u f‖ ≤ tol``;
forward and backward are one ``jit(value_and_grad)`` of ``⟨U(V, w), G⟩``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _configure() -> None:
    """One core, as the torch side: XLA's CPU client would otherwise run on every core (it keeps
    a few threads whatever its flags say, so the process is pinned to one core as well)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def build(objective: str, tol: float, cg_tol: float, maxiter: int):
    """``step(V, W, G) -> ((loss, (U, grad_norm, iterations)), (dV, dW))``, jitted."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import jaxopt

    def f(u, v, w):  # u: (p,), v: (T, p), w: (T,)
        s = jnp.sqrt(1 + jnp.sum((u - v) ** 2, axis=-1))
        return jnp.sum(s if objective == "pseudo_huber" else w * s)

    solver = jaxopt.LBFGS(
        fun=f, tol=tol, maxiter=maxiter, implicit_diff=True,
        implicit_diff_solve=partial(jaxopt.linear_solve.solve_cg, tol=cg_tol),
    )

    def one(v, w):
        res = solver.run(jnp.mean(v, axis=0), v, w)
        return res.params, res.state.error, res.state.iter_num

    def loss(V, W, G):
        U, err, its = jax.vmap(one)(V, W)
        return jnp.sum(U * G), (U, jnp.max(err), jnp.max(its))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _load(d: str, objective: str):
    import jax.numpy as jnp
    import numpy as np

    V = jnp.asarray(np.load(os.path.join(d, "V.npy")))
    G = jnp.asarray(np.load(os.path.join(d, "G.npy")))
    wpath = os.path.join(d, "W.npy")
    W = jnp.asarray(np.load(wpath)) if objective != "pseudo_huber" else jnp.ones(V.shape[:2], V.dtype)
    if objective != "pseudo_huber" and not os.path.exists(wpath):  # pragma: no cover - protocol error
        raise FileNotFoundError(wpath)
    return V, W, G


def _block(out):
    import jax

    return jax.block_until_ready(out)


def _setup(msg: dict, cases: dict) -> dict:
    import numpy as np

    objective, d = msg["objective"], msg["dir"]
    V, W, G = _load(d, objective)
    step = build(objective, msg["tol"], msg["cg_tol"], msg["maxiter"])
    t0 = time.perf_counter()
    compiled = step.lower(V, W, G).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = _block(compiled(V, W, G))
    first = time.perf_counter() - t0
    (_, (U, err, its)), (dV, dW) = out
    np.save(os.path.join(d, "U.npy"), np.asarray(U))
    np.save(os.path.join(d, "dV.npy"), np.asarray(dV))
    if objective != "pseudo_huber":
        np.save(os.path.join(d, "dW.npy"), np.asarray(dW))
    cases[msg["key"]] = (compiled, (V, W, G))
    return {"compile_seconds": compile_s, "first_run_seconds": first, "grad_norm_max": float(err),
            "iterations_max": int(its)}


def _run(msg: dict, cases: dict) -> dict:
    compiled, args = cases[msg["key"]]
    t0 = time.perf_counter()
    _block(compiled(*args))
    return {"seconds": time.perf_counter() - t0}


def serve() -> None:
    _configure()
    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 inputs stay float64; float32 stays float32
    import jaxopt  # noqa: F401
    from importlib.metadata import version

    hello = {"ok": True, "jax": jax.__version__, "jaxlib": version("jaxlib"), "jaxopt": version("jaxopt"),
             "import_seconds": time.perf_counter() - t0, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    print(json.dumps(hello), flush=True)
    cases: dict = {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "setup":
                reply = _setup(msg, cases)
            elif msg["op"] == "run":
                reply = _run(msg, cases)
            elif msg["op"] == "drop":
                cases.pop(msg["key"], None)
                reply = {}
            elif msg["op"] == "quit":
                break
            else:
                raise ValueError(f"unknown op {msg['op']!r}")
            reply["ok"] = True
        except Exception as exc:  # reported to the benchmark, which records the failure
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(reply), flush=True)


def first_call(objective: str, d: str, tol: float, cg_tol: float, maxiter: int, steady: int = 5) -> dict:
    """A fresh process: import, compile, first run, then the median of ``steady`` runs."""
    _configure()
    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)
    import jaxopt  # noqa: F401

    t_import = time.perf_counter() - t0
    V, W, G = _load(d, objective)
    step = build(objective, tol, cg_tol, maxiter)
    t0 = time.perf_counter()
    _block(step(V, W, G))  # what a user's first call costs: trace + compile + run
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(steady):
        t0 = time.perf_counter()
        _block(step(V, W, G))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"import_seconds": t_import, "first_call_seconds": t_first, "steady_seconds": times[len(times) // 2]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--first-call":
        objective, d, tol, cg_tol, maxiter = sys.argv[2:7]
        print(json.dumps(first_call(objective, d, float(tol), float(cg_tol), int(maxiter))), flush=True)
    else:
        serve()
