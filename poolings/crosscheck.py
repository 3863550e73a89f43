"""``argminlayers check``: cross-check a pooling layer against independent references.

For random inputs ``V`` ``(B, T, p)`` (optionally with variable lengths) and a random
upstream gradient ``G = dL/dU`` ``(B, p)``, both seeded, the command runs the layer and
each reference forward and backward and compares

- the outputs ``U`` (relative error ``‖U_ref − U‖ / ‖U_ref‖``),
- the input gradients ``dL/dV = (dU/dV)ᵀ G`` (relative error and cosine),

and reports the time of each side (the cvxpylayers build time apart), together with each
reference's **own** accuracy: its KKT residual ``max_i ‖∇_u f(U_ref,i)‖ / ‖U_ref,i‖``. A
difference is only meaningful down to the reference's own error.

The references always run in float64 (the layer runs in ``--dtype``)::

    argminlayers check --pooling rank --B 2 --T 50 --p 64 --backward woodbury
    argminlayers check --pooling avg --refs cvxpylayers --variable-lengths --json out.json

From Python, :func:`crosscheck` returns the same numbers as a dict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from argminlayers.check import errors

REFERENCES: dict[str, tuple[str, ...]] = {"rank": ("cvxpylayers", "theseus"), "avg": ("cvxpylayers",)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# Constrained problems (simplex, l1_ball, box_qp, eq_lsq): their layers, cvxpylayers programs and
# accuracy measures live in poolings.reference.cvxpy_constrained.
from poolings.reference.cvxpy_constrained import CHECKS as CONSTRAINED  # noqa: E402

REFERENCES.update({name: ("cvxpylayers",) for name in CONSTRAINED})


# ----------------------------------------------------------------------------- factories


def make_pooling(pooling: str, *, C: float, eps: float, backward: str) -> nn.Module:
    """The layer under test: ``poolings.RankPool`` or ``poolings.AvgPool``."""
    from poolings import AvgPool, RankPool

    if pooling in CONSTRAINED:
        return CONSTRAINED[pooling].layer(backward)
    if pooling == "rank":
        return RankPool(C=C, eps=eps, backward=backward)
    if pooling == "avg":
        return AvgPool(backward=backward)
    raise ValueError(f"pooling must be one of {sorted(REFERENCES)}, got {pooling!r}")


def make_reference(name: str, pooling: str, *, C: float, eps: float) -> nn.Module:
    """A reference module for ``pooling``; its heavy package is imported here, outside any timing."""
    from poolings import reference

    if name not in REFERENCES.get(pooling, ()):
        raise ValueError(
            f"refs: no {name!r} reference for pooling {pooling!r}; available: {', '.join(REFERENCES[pooling])}"
        )
    if name == "cvxpylayers":
        from poolings.reference.cvxpy_ref import _import_cvxpy

        _import_cvxpy()
        if pooling in CONSTRAINED:
            return CONSTRAINED[pooling].reference()
        return reference.CvxpyRankPool(C=C, eps=eps) if pooling == "rank" else reference.CvxpyAvgPool()
    from poolings.reference.theseus_ref import _import_theseus

    _import_theseus()
    return reference.TheseusRankPool(C=C, eps=eps)


# ----------------------------------------------------------------------------- core


def make_inputs(
    B: int, T: int, p: int, *, seed: int = 0, variable_lengths: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded float64 CPU inputs: ``V`` ``(B, T, p)`` standard normal, ``lengths`` ``(B,)``, ``G`` ``(B, p)``.

    With ``variable_lengths`` the first length is ``T`` and the others are uniform in
    ``max(1, T//2)..T−1`` (``T`` when ``T = 1``); otherwise every length is ``T``.
    """
    for name, value in (("B", B), ("T", T), ("p", p)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    G = torch.randn(B, p, generator=gen, dtype=torch.float64)
    if variable_lengths:
        # the first sequence is full, the others are shorter (when T > 1): the batch is padded
        lengths = torch.randint(max(1, T // 2), max(T, 2), (B,), generator=gen).clamp(max=T)
        lengths[0] = T
    else:
        lengths = torch.full((B,), T, dtype=torch.int64)
    return V, lengths, G


def forward_backward(
    layer: Callable[..., Tensor], V: Tensor, lengths: Tensor, G: Tensor
) -> tuple[Tensor, Tensor, float]:
    """Run ``U = layer(V, lengths)`` and ``dL/dV`` for ``L = ⟨G, U⟩``; returns ``(U, dL/dV, seconds)``."""
    V = V.detach().clone().requires_grad_(True)
    if V.is_cuda:
        torch.cuda.synchronize(V.device)
    start = time.perf_counter()
    U = layer(V, lengths)
    (gV,) = torch.autograd.grad(U, V, grad_outputs=G.to(U.dtype))
    if V.is_cuda:
        torch.cuda.synchronize(V.device)
    return U.detach(), gV.detach(), time.perf_counter() - start


def crosscheck(
    pooling: str = "rank",
    *,
    B: int = 2,
    T: int = 50,
    p: int = 64,
    C: float = 1.0,
    eps: float = 0.1,
    backward: str = "woodbury",
    dtype: str = "float64",
    refs: list[str] | None = None,
    seed: int = 0,
    variable_lengths: bool = False,
    device: str = "cpu",
    repeat: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compare the layer with each reference; returns a JSON-ready dict (see the module docstring).

    Times are the best of ``repeat`` forward+backward runs, the layer's after one warm-up
    run and a cvxpylayers reference's after its layers are built. ``threads`` sets
    ``torch.set_num_threads`` (``None`` keeps the process's setting); it is recorded.
    """
    if pooling not in REFERENCES:
        raise ValueError(f"pooling must be one of {sorted(REFERENCES)}, got {pooling!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    refs = list(REFERENCES[pooling]) if refs is None else list(refs)
    if not refs:
        raise ValueError("refs must name at least one reference")
    for name in refs:
        if name not in REFERENCES[pooling]:
            raise ValueError(
                f"refs: no {name!r} reference for pooling {pooling!r}; available: {', '.join(REFERENCES[pooling])}"
            )
    if pooling == "rank":
        from poolings.reference import check_rank_params

        check_rank_params(C, eps)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    from poolings.runtime import resolve_device, set_threads

    dev = resolve_device(device)
    set_threads(threads)
    V, lengths, G = make_inputs(B, T, p, seed=seed, variable_lengths=variable_lengths)
    V, lengths, G = V.to(dev), lengths.to(dev), G.to(dev)

    layer = make_pooling(pooling, C=C, eps=eps, backward=backward)
    layer = layer.to(dev) if isinstance(layer, nn.Module) else layer
    Vx = V.to(DTYPES[dtype])
    forward_backward(layer, Vx, lengths, G)  # warm-up (lazy set-up, kernels)
    U, gV, ours_s = _best_of(repeat, layer, Vx, lengths, G)
    kkt_of = _kkt_function(pooling, C, eps)
    result: dict[str, Any] = {
        "config": {
            "pooling": pooling, "B": B, "T": T, "p": p, "C": C, "eps": eps, "backward": backward,
            "dtype": dtype, "seed": seed, "variable_lengths": variable_lengths, "device": str(dev),
            "lengths": lengths.tolist(), "repeat": repeat, "threads": torch.get_num_threads(),
        },
        "ours": {"seconds": ours_s, "kkt_residual": kkt_of(V, U, lengths).max().item()},
        "references": [],
    }
    for name in refs:
        ref = make_reference(name, pooling, C=C, eps=eps).to(dev)
        build_s = ref.prepare(lengths, p) if hasattr(ref, "prepare") else None
        U_ref, g_ref, ref_s = _best_of(repeat, ref, V, lengths, G)
        out_rel, _, _ = errors(U, U_ref)
        grad_rel, _, grad_cos = errors(gV, g_ref)
        padded = ~_mask(lengths, T)
        result["references"].append(
            {
                "name": name,
                "solver": getattr(ref, "solve_method", "GaussNewton"),
                "out_rel_err": out_rel,
                "grad_rel_err": grad_rel,
                "grad_cosine": grad_cos,
                "ours_seconds": ours_s,
                "ref_seconds": ref_s,
                "build_seconds": build_s,
                "ref_kkt_residual": ref.kkt_residual(V, U_ref, lengths).max().item(),
                "ref_padded_grad_max": g_ref[padded].abs().max().item() if padded.any() else 0.0,
                "ours_padded_grad_max": gV[padded].abs().max().item() if padded.any() else 0.0,
            }
        )
    return result


def _best_of(repeat: int, layer: Callable[..., Tensor], V: Tensor, lengths: Tensor, G: Tensor):
    runs = [forward_backward(layer, V, lengths, G) for _ in range(repeat)]
    return min(runs, key=lambda run: run[2])


def _mask(lengths: Tensor, T: int) -> Tensor:
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _kkt_function(pooling: str, C: float, eps: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    from poolings.reference import avg_pool_grad_u, prepare_sequences, rank_pool_grad_u, relative_kkt_residual

    if pooling in CONSTRAINED:
        return CONSTRAINED[pooling].accuracy
    if pooling == "rank":
        return lambda V, U, n: relative_kkt_residual(rank_pool_grad_u(V, U, n, C, eps), U)
    return lambda V, U, n: relative_kkt_residual(avg_pool_grad_u(V, U, n), U, scale=prepare_sequences(V, n)[2])


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: a header, then one row per reference."""
    c = result["config"]
    lengths = "variable " + str(c["lengths"]) if c["variable_lengths"] else f"all {c['T']}"
    lines = [
        f"argminlayers check: pooling={c['pooling']} backward={c['backward']} dtype={c['dtype']} "
        f"B={c['B']} T={c['T']} p={c['p']}" + (f" C={c['C']} eps={c['eps']}" if c["pooling"] == "rank" else "")
        + f" seed={c['seed']} device={c['device']}" + (f" threads={c['threads']}" if "threads" in c else ""),
        f"lengths: {lengths}",
        f"ours: forward+backward {result['ours']['seconds']:.4f} s, "
        f"KKT residual {result['ours']['kkt_residual']:.2e}",
        "",
    ]
    header = ["reference", "solver", "out rel err", "grad rel err", "grad cosine",
              "ours (s)", "ref (s)", "build (s)", "ref KKT", "ref pad grad"]
    rows = [header]
    for r in result["references"]:
        rows.append([
            r["name"], r["solver"], _fmt(r["out_rel_err"]), _fmt(r["grad_rel_err"]),
            _fmt(r["grad_cosine"], ".9f"), _fmt(r["ours_seconds"], ".4f"), _fmt(r["ref_seconds"], ".4f"),
            _fmt(r["build_seconds"], ".3f"), _fmt(r["ref_kkt_residual"]), _fmt(r["ref_padded_grad_max"], ".1e"),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines += [
        "",
        "ref KKT: the reference's own accuracy, max_i ‖∇_u f(U_ref,i)‖/‖U_ref,i‖; "
        "errors below it say nothing. build: cvxpylayers layer construction, not in ref (s).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``check`` subcommand."""
    p = subparsers.add_parser(
        "check",
        help="cross-check a pooling's output and gradients against cvxpylayers/theseus",
        description=(
            "Run a pooling layer and independent references (cvxpylayers, theseus) on the same "
            "seeded input and upstream gradient; compare outputs and input gradients dL/dV, time "
            "both sides, and report each reference's own accuracy (its KKT residual). "
            "See docs/crosscheck.md."
        ),
    )
    p.add_argument("--pooling", choices=sorted(REFERENCES), default="rank", help="layer to check (default rank)")
    p.add_argument("--B", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--T", type=int, default=50, help="sequence length (default 50)")
    p.add_argument("--p", type=int, default=64, help="feature dimension (default 64)")
    p.add_argument("--C", type=float, default=1.0, help="rank-pool C (default 1.0)")
    p.add_argument("--eps", type=float, default=0.1, help="rank-pool epsilon (default 0.1)")
    p.add_argument("--backward", default="woodbury", help="the layer's backward strategy (default woodbury)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="the layer's dtype (default float64)")
    p.add_argument(
        "--refs", default=None,
        help="comma-separated references (default: all for the pooling; rank: cvxpylayers,theseus; avg: cvxpylayers)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of V, the lengths and the upstream gradient")
    p.add_argument(
        "--variable-lengths", action="store_true",
        help="first length T, the others random in T//2..T-1 (a padded batch)",
    )
    p.add_argument("--device", default="cpu", help="device of the layer and the inputs: cpu, cuda or cuda:N "
                                                   "(default cpu)")
    p.add_argument("--repeat", type=int, default=1, help="report the best time of this many runs (default 1)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op CPU threads (default 1: on shared cores more threads made the layer's "
                        "timings 8-17x slower; see docs/video.md)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def _check_json_path(path: Path) -> None:
    """Refuse, before any work, a --json path that is a folder or lies under a file."""
    from poolings.runtime import check_out_dir

    if path.is_dir():
        raise IsADirectoryError(f"--json: {path} is a folder; give a file path such as {path / 'check.json'}")
    check_out_dir(path.parent, "--json")


def run(args: argparse.Namespace) -> int:
    """Run the cross-check, print the table, write the JSON; exit status 2 on bad arguments.

    A failure of a solver during the run (``ConvergenceError``, ``SingularHessianError``) propagates.
    """
    refs = None if args.refs is None else [r.strip() for r in args.refs.split(",") if r.strip()]
    if args.json is not None:
        _check_json_path(args.json)
    try:
        result = crosscheck(
            args.pooling, B=args.B, T=args.T, p=args.p, C=args.C, eps=args.eps, backward=args.backward,
            dtype=args.dtype, refs=refs, seed=args.seed, variable_lengths=args.variable_lengths,
            device=args.device, repeat=args.repeat, threads=args.threads,
        )
    except TypeError as exc:  # a bad argument found by the layer
        print(f"argminlayers check: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
