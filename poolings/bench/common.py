"""The shared harness of the benchmarks: configuration, data, timing, memory, environment, writers.

Timing
    Every measured call is repeated: ``warmup`` untimed runs, then ``repeats`` timed ones.
    Cases that are compared with each other run **interleaved** (round-robin: case a, case b,
    case a, …), so slow drifts of a shared machine hit all of them alike, and ratios are
    formed from the same run. Reported: the median, the minimum and the inter-quartile range
    (IQR). On CUDA every timestamp is taken after ``torch.cuda.synchronize()``.

Memory
    CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
    CPU: the peak of live bytes allocated through PyTorch's CPU allocator during the call,
    from the allocation events of ``torch.profiler`` (``profile_memory=True``), in one extra,
    untimed run. Tensors that existed before the call are not counted. The method is named
    in every result.

Outputs
    Per benchmark ``NAME``: ``NAME.json`` (every number and the environment), ``NAME.md``
    (the tables, with the command and environment) and ``NAME_*.png`` charts, in ``--out``
    (default ``runs/bench``; ``--publish`` writes the repository's ``docs/benchmarks``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DATA_KINDS = ("walk", "iid")
PNG_LIMIT_BYTES = 150_000


# ----------------------------------------------------------------------------- configuration
@dataclass
class BenchConfig:
    """What every benchmark takes from the command line.

    Attributes:
        quick: tiny sizes (seconds), for smoke tests.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"float64"`` (the layers under test; references run in float64).
        out: output folder for JSON, markdown and PNG files (nothing is written outside it,
            except the index ``docs/benchmarks.md`` when ``out`` is ``docs/benchmarks``).
        repeats: timed runs per case; ``None``: the benchmark's default.
        warmup: untimed runs per case before timing.
        threads: ``torch.set_num_threads``; ``None`` keeps PyTorch's default.
        seed: random seed of the data.
        data: synthetic features, ``"walk"`` or ``"iid"`` (see :func:`make_sequences`).
        progress: show tqdm progress bars.
        cap_scale: multiplies every benchmark's caps (time and memory) beyond which a
            configuration is skipped; e.g. 10 to run the slow references at the paper's size.
    """

    quick: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    out: str = "runs/bench"
    repeats: int | None = None
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    data: str = "walk"
    progress: bool = True
    cap_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but torch.cuda.is_available() is False")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"data must be one of {DATA_KINDS}, got {self.data!r}")
        if not (isinstance(self.cap_scale, (int, float)) and math.isfinite(self.cap_scale) and self.cap_scale > 0):
            raise ValueError(f"cap_scale must be a finite number > 0, got {self.cap_scale!r}")

    def caps(self, caps: dict[str, float]) -> dict[str, float]:
        """A benchmark's caps multiplied by ``cap_scale``."""
        return {k: v * self.cap_scale for k, v in caps.items()}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def n_repeats(self, default: int, quick: int = 2) -> int:
        """``repeats`` if given, else the benchmark's default (``quick`` in quick mode)."""
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else default

    def command(self, name: str) -> str:
        """The command line that reproduces this run of benchmark ``name``."""
        parts = ["argminlayers", "bench", name]
        if self.quick:
            parts.append("--quick")
        parts += ["--device", self.device, "--dtype", self.dtype]
        if self.repeats is not None:
            parts += ["--repeats", str(self.repeats)]
        if self.warmup != 1:
            parts += ["--warmup", str(self.warmup)]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        if self.seed != 0:
            parts += ["--seed", str(self.seed)]
        if self.data != "walk":
            parts += ["--data", self.data]
        if self.cap_scale != 1:
            parts += ["--cap-scale", f"{self.cap_scale:g}"]
        from .report import is_published  # report imports nothing of this module

        parts += ["--publish"] if is_published(self.out) else ["--out", self.out]
        return " ".join(shlex.quote(p) for p in parts)

    @contextlib.contextmanager
    def applied(self):
        """Set the process-wide options (threads) for the duration of a benchmark, then restore them.

        ``threads`` limits torch and also the BLAS pools of NumPy and SciPy (OpenBLAS, through
        threadpoolctl), which the layers' small-problem paths and the references call: without
        it those would run on every core while torch runs on one."""
        before = torch.get_num_threads()
        blas = contextlib.nullcontext()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
                pass
            else:
                # a pool is limited only once its library is loaded: load SciPy's now (scikit-learn
                # and cvxpy load it later, during the run)
                with contextlib.suppress(ImportError):
                    import scipy.linalg  # noqa: F401
                blas = threadpool_limits(limits=self.threads, user_api="blas")
        try:
            with blas:
                yield self
        finally:
            torch.set_num_threads(before)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``argminlayers bench`` and ``python -m poolings.bench.NAME``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for smoke tests")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the layers under test (references always run in float64)")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON, markdown and PNG results and their index OUT/benchmarks.md "
                             "(default: runs/bench)")
    parser.add_argument("--publish", action="store_true",
                        help="write into the repository's docs/benchmarks and regenerate docs/benchmarks.md "
                             "(the same as --out docs/benchmarks; not with --quick)")
    parser.add_argument("--overwrite", action="store_true", help="replace results of the same benchmark in OUT")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: per benchmark)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, and the same limit on NumPy's and SciPy's BLAS (default: 1; "
                             "on shared cores more threads make timings scatter by up to an order of magnitude)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--data", choices=DATA_KINDS, default="walk",
                        help="synthetic features: 'walk' (unit-norm random walk, smooth in time) or 'iid'")
    parser.add_argument("--cap-scale", type=float, default=1.0,
                        help="multiply the caps (time, memory) beyond which configurations are skipped")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def parse_sizes(text: str | None) -> list[tuple[int, int, int]] | None:
    """``--sizes``: ``"16x10x64,16x10x512"`` → ``[(16, 10, 64), (16, 10, 512)]`` (``None`` when not given)."""
    if not text:
        return None
    sizes = []
    for part in text.split(","):
        try:
            B, T, p = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes: {part!r} is not BxTxP (e.g. 16x10x64)") from None
        if min(B, T, p) < 1:
            raise ValueError(f"--sizes: {part!r} has a dimension < 1")
        sizes.append((B, T, p))
    return sizes


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from .report import resolve_out

    return BenchConfig(
        quick=args.quick,
        device=args.device,
        dtype=args.dtype,
        out=str(resolve_out(args.out, publish=args.publish, quick=args.quick)),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        seed=args.seed,
        data=args.data,
        progress=args.progress,
        cap_scale=args.cap_scale,
    )


def module_main(name: str, run: Callable[[BenchConfig], dict], argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m poolings.bench.NAME``: parse the common options, run, regenerate the index."""
    from .cli import _check_options, _specific_options, add_specific_arguments, run_benchmarks

    parser = argparse.ArgumentParser(prog=f"python -m poolings.bench.{name}", description=run.__doc__)
    add_common_args(parser)
    add_specific_arguments(parser)  # those the benchmark does not read are refused below
    args = parser.parse_args(argv)
    _check_options(_specific_options(), args, (name,))
    return run_benchmarks(config_from_args(args), (name,), overwrite=args.overwrite, args=args)


# ------------------------------------------------------------------------------------ data
def make_sequences(
    B: int,
    T: int,
    p: int,
    *,
    kind: str = "walk",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: "torch.device | str" = "cpu",
) -> Tensor:
    """Synthetic frame features ``(B, T, p)``, generated in float64 on the CPU, then cast.

    - ``"walk"``: ``v_t = x_t / ‖x_t‖`` with ``x_t = Σ_{τ≤t} n_τ``, ``n_τ ~ N(0, I)``: unit-norm
      frames that drift smoothly in time, as the features of consecutive video frames do.
    - ``"iid"``: ``v_t ~ N(0, I/p)`` independent (norm ≈ 1, no temporal structure).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    if kind == "walk":
        X = X.cumsum(1)
        X = X / X.norm(dim=-1, keepdim=True)
    else:
        X = X / math.sqrt(p)
    return X.to(device=device, dtype=dtype)


def seeded_like(shape: Sequence[int], *, seed: int, dtype: torch.dtype, device: "torch.device | str") -> Tensor:
    """A seeded standard-normal tensor (e.g. an upstream gradient), generated in float64 then cast."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- timing
def synchronize(device: "torch.device | str") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Summary of timed runs, in seconds; ``samples`` in the order they were taken."""

    median: float
    min: float
    q1: float
    q3: float
    n: int
    samples: list[float]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def summarize(samples: Sequence[float]) -> Timing:
    """Median, minimum and quartiles of ``samples`` (seconds)."""
    raw = [float(x) for x in samples]
    if not raw:
        raise ValueError("summarize needs at least one sample")
    xs = sorted(raw)
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return Timing(statistics.median(xs), xs[0], q1, q3, len(xs), raw)


class Stopwatch:
    """Laps of one run: ``sw.start()``, then ``sw.lap("forward")``, ``sw.lap("backward")``, …

    Each lap is the time since the previous mark, taken after a device synchronisation.
    Work done before :meth:`start` (e.g. copying inputs) is not timed.
    """

    def __init__(self, device: "torch.device | str"):
        self.device = device
        self.laps: dict[str, float] = {}
        self._t: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self._t is None:
            raise RuntimeError("Stopwatch.lap called before start")
        synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + (now - self._t)
        self._t = now


Case = Callable[[Stopwatch], Any]


#: how :func:`time_interleaved` orders a round's cases (recorded in each section's environment)
ROUND_ORDER = "the first in order, the others in seeded shuffles"


def time_interleaved(
    cases: dict[str, Case],
    *,
    repeats: int,
    warmup: int = 1,
    device: "torch.device | str" = "cpu",
) -> dict[str, dict[str, Timing]]:
    """Run every case ``warmup`` times untimed, then ``repeats`` rounds, one run of each case per round.

    The first round runs the cases in the given order, every later one in a seeded shuffle of
    it (the same on every run): no case is always the first of a round or always the one after
    the same neighbour, so that what a case leaves behind (a worker process winding down, a
    cold cache) does not fall on one case alone.

    A case is a callable ``case(sw)`` that calls ``sw.start()`` and then ``sw.lap(name)`` after
    each phase it wants timed. Returns ``{case: {phase: Timing}}``; a phase ``"total"`` (the sum
    of the laps of a run) is added when a case has more than one phase.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for case in cases.values():
            case(Stopwatch(device))
    laps: dict[str, dict[str, list[float]]] = {name: {} for name in cases}
    names = list(cases)
    for k in range(repeats):
        order = list(names)
        if k:
            random.Random(k).shuffle(order)
        for name in order:
            case = cases[name]
            sw = Stopwatch(device)
            case(sw)
            if not sw.laps:
                raise RuntimeError(f"case {name!r} timed nothing: call sw.start() and sw.lap(phase)")
            for phase, t in sw.laps.items():
                laps[name].setdefault(phase, []).append(t)
            if len(sw.laps) > 1:
                laps[name].setdefault("total", []).append(sum(sw.laps.values()))
    return {name: {ph: summarize(ts) for ph, ts in phases.items()} for name, phases in laps.items()}


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: "torch.device | str" = "cpu") -> Timing:
    """Time ``fn()`` alone."""

    def case(sw: Stopwatch) -> None:
        sw.start()
        fn()
        sw.lap("call")

    return time_interleaved({"call": case}, repeats=repeats, warmup=warmup, device=device)["call"]["call"]


# ---------------------------------------------------------------------------------- memory
@dataclass
class Memory:
    """Peak bytes of one call and how they were measured (``bytes`` is ``None`` when unavailable)."""

    bytes: int | None
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CPU_MEMORY_METHOD = "peak live bytes of torch's CPU allocator during the call (torch.profiler allocation events)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() minus the allocation before the call"


def peak_memory(fn: Callable[[], Any], device: "torch.device | str" = "cpu") -> Memory:
    """Peak memory allocated by ``fn()`` beyond what was allocated before it (one untimed run)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        synchronize(dev)
        return Memory(int(torch.cuda.max_memory_allocated(dev) - before), CUDA_MEMORY_METHOD)
    try:
        from torch._C._profiler import _EventType
        from torch.autograd.profiler import profile
    except ImportError:  # pragma: no cover - depends on the torch build
        return _maxrss_memory(fn)
    # the autograd profiler directly: torch.profiler.profile would import torch._inductor
    prof = profile(use_cpu=True, profile_memory=True, use_kineto=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _quiet_stderr():  # the profiler's C++ side logs every start and stop
            prof.__enter__()
        try:
            fn()
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
    try:
        events = []
        stack = list(prof.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, int(e.extra_fields.alloc_size)))
            stack.extend(e.children)
    except AttributeError:  # pragma: no cover - the profiler's event tree changed
        return _maxrss_memory(fn)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return Memory(peak, CPU_MEMORY_METHOD)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for the duration of the block."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover - no usable stderr
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _maxrss_memory(fn: Callable[[], Any]) -> Memory:  # pragma: no cover - fallback
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Memory((after - before) * 1024, "increase of the process's peak RSS (ru_maxrss); 0 if below an earlier peak")


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg: BenchConfig) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas_threads": _blas_threads(),
        "round_order": ROUND_ORDER,
        "python": platform.python_version(),
        "device": cfg.device,
        "device_name": torch.cuda.get_device_name() if cfg.device == "cuda" else cpu_model(),
        "dtype": cfg.dtype,
        "data": cfg.data,
        "seed": cfg.seed,
        "quick": cfg.quick,
        "compiled": compiled_parts(),
    }
    try:
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return env


COMPILED_PARTS = ("poolings.rank._small_kernel", "argminlayers._lbfgs")


def compiled_parts() -> dict[str, bool]:
    """Whether each compiled extension is built and current (a build older than its ``.pyx``, as
    after a checkout that touched the source, is not used: its fallback runs instead)."""
    import warnings

    from argminlayers._compiled import load_compiled

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: load_compiled(name, "") is not None for name in COMPILED_PARTS}


def check_compiled_for_publishing() -> None:
    """Published figures are of the full build: refuse (naming the parts) where one is missing or stale."""
    missing = [name for name, ok in compiled_parts().items() if not ok]
    if missing:
        raise RuntimeError(f"--publish: the compiled part{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                           "are not built or older than their sources, so the slower fallbacks would be measured; "
                           "rebuild with `make env` (or `pip install -e .`), or use --out for a run of this build")


def _blas_threads() -> int | None:
    """The largest thread count of the BLAS pools loaded (NumPy's, SciPy's), or ``None`` if unknown."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return None
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else None


def finish_environment(env: dict[str, Any], started: float) -> dict[str, Any]:
    """Add the wall time and the load average at the end (a measure of how shared the machine was)."""
    env["wall_seconds"] = round(time.perf_counter() - started, 1)
    try:
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return env


def environment_markdown(env: dict[str, Any]) -> str:
    dev = env["device_name"] if env["device"] == "cuda" else f"CPU ({env['cpu']})"
    load = ""
    if "load_average_start" in env:
        load = (f"; 1/5/15-min load average {env['load_average_start']} at the start"
                f"{', ' + str(env['load_average_end']) + ' at the end' if 'load_average_end' in env else ''}")
    return (
        f"Environment: {dev}, {env['cores']} cores ({env['cores_usable']} usable), torch threads: {env['threads']}"
        f"{', NumPy/SciPy BLAS threads: ' + str(env['blas_threads']) if env.get('blas_threads') else ''}, "
        f"torch {env['torch']}, Python {env['python']}, dtype {env['dtype']}, data `{env['data']}` "
        f"(seed {env['seed']}), {env['date']}; wall time {env.get('wall_seconds', '?')} s{load}"
        f"{'; rounds: ' + env['round_order'] if env.get('round_order') else ''}"
        f"{_compiled_markdown(env.get('compiled'))}."
    )


def _compiled_markdown(parts: dict[str, bool] | None) -> str:
    if not parts:
        return ""
    missing = [name for name, ok in parts.items() if not ok]
    return ("; compiled parts: all built" if not missing
            else f"; **compiled parts not used: {', '.join(missing)}** (their fallbacks ran)")


# --------------------------------------------------------------------------------- writers
def output_dir(cfg: BenchConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _json_default(x: Any) -> Any:
    if isinstance(x, (Timing, Memory)):
        return x.as_dict()
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=_json_default))), indent=1, allow_nan=False)
    path.write_text(text + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|") for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, the table {len(headers)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, command: str, env: dict[str, Any], body: str) -> Path:
    """``NAME.md``: a section (``## title``), the command, the environment, then ``body``."""
    text = (
        f"## {title}\n\n"
        f"Command: `{command}`\n\n"
        f"{environment_markdown(env)}\n\n"
        f"{body.strip()}\n"
    )
    path.write_text(text)
    return path


def plt_module():
    """matplotlib's pyplot on the Agg backend (imported here: matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark charts need matplotlib: pip install matplotlib") from exc
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save a small PNG (≤ 150 kB: fewer dots per inch until it fits) and close the figure."""
    plt = plt_module()
    fig.tight_layout()
    for dpi in (90, 72, 60, 48):
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        if path.stat().st_size <= PNG_LIMIT_BYTES:
            break
    plt.close(fig)
    return path


def progress(iterable: Iterable[Any], *, desc: str, enabled: bool, total: int | None = None) -> Iterable[Any]:
    """tqdm progress bar on stderr (a plain iterable when disabled or tqdm is missing)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------ formatting
def fmt_time(seconds: float | None) -> str:
    """``12.3 ms``, ``1.23 s``, ``456 µs``."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    for scale, unit in ((1e-6, "µs"), (1e-3, "ms")):
        text = f"{seconds / scale:.3g}"
        if float(text) < 1000:
            return f"{text} {unit}"
    return f"{seconds:.2f} s"


def fmt_timing(t: Timing | None) -> str:
    """Median with the IQR: ``12.3 ms ±0.4``."""
    if t is None:
        return "–"
    return f"{fmt_time(t.median)} (IQR {fmt_time(t.iqr)})"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.3g}×"


def fmt_err(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2e}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b
