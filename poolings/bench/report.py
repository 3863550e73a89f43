"""Assemble the benchmarks' index page from the sections the benchmarks wrote.

Each benchmark writes its own section ``OUT/NAME.md`` (tables, command, environment, charts)
from its run. :func:`write_index` puts the sections, unedited, after a fixed introduction into
the index: ``OUT/benchmarks.md`` inside the run folder, or ``docs/benchmarks.md`` when ``OUT``
is the repository's ``docs/benchmarks`` (``--publish``); only the chart links are prefixed with
the folder name there, so that they resolve from the index.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BENCHMARKS = ("strategies", "references", "limit", "throughput", "rank_length", "generic", "constraints")

INTRO = """\
# Benchmarks

This page is generated: every table, chart and verdict below comes unedited from the run whose
command and environment head its section. `argminlayers bench all --publish` reruns everything
and rewrites this page (`argminlayers bench NAME --publish` reruns one section); without
`--publish` the results go to a run folder (`runs/bench/` by default) and docs/ is left alone.
From the repository root, `python -m poolings.bench.cli NAME` is the same command, and each
benchmark is also runnable as `python -m poolings.bench.NAME`, with the same options; `--quick`
runs tiny sizes in seconds (and cannot be published).
The raw numbers (every timing sample, quartiles, memory, errors, environment) are in
`docs/benchmarks/NAME.json`.

How the numbers are taken:

- **Times** are medians over repeated runs after a warm-up, with the inter-quartile range (IQR)
  where it matters. Cases that are compared run **interleaved** (one run of each case per round),
  so that the load of a shared machine hits them alike, and every ratio is formed from the same run.
  From the second round on, the order within a round is a seeded shuffle, so that no case always
  runs first or right after the same neighbour (the environment line says "rounds: …"; sections
  written before that ran every round in one fixed order).
  The development machine has 2 cores shared with other work: absolute times drift between runs
  by tens of percent (the load average at the start and end of each run is recorded), while the
  ratios within one run are far steadier. Compare ratios, not absolute times across sections.
- **Threads.** Each section records the number of torch threads, and `--threads` limits the BLAS
  pools of NumPy and SciPy (OpenBLAS, which the small-problem paths and the references call) to the
  same count (recorded as "NumPy/SciPy BLAS threads"; sections written before that limit existed
  do not show it). On a machine whose cores are
  shared with other processes, a second torch thread often waits for its core, every parallel
  region waits for it, and timings scatter by up to an order of magnitude; one thread
  (`--threads 1`) then gives far steadier numbers, and that is how runs on shared machines
  should be made.
- **Memory** on the CPU is the peak of live bytes allocated through PyTorch's CPU allocator during
  the call (allocation events of `torch.profiler`, one extra untimed run); on CUDA it is
  `torch.cuda.max_memory_allocated()` beyond what was allocated before the call.
- **Gradient errors** are measured against the exact gradient computed in float64.
- **Data** is synthetic (`--data walk`, the default): unit-norm frame features that drift as a
  random walk, so consecutive frames are correlated as in video. `--data iid` uses independent
  Gaussian frames.
- A configuration whose projected time or memory exceeds a cap is **skipped, not run**; the
  section says so, with the projection and the reason.

Sections: {sections}
"""


def publish_dir() -> Path | None:
    """The repository's ``docs/benchmarks`` beside the ``poolings`` package, or ``None`` in an installed copy."""
    root = Path(__file__).resolve().parents[2]
    docs = root / "docs"
    return docs / "benchmarks" if docs.is_dir() and (root / "pyproject.toml").is_file() else None


def is_published(out: "str | Path") -> bool:
    """Whether ``out`` is the repository's ``docs/benchmarks``."""
    target = publish_dir()
    return target is not None and Path(out).resolve() == target.resolve()


def resolve_out(out: "str | None", *, publish: bool, quick: bool) -> Path:
    """The output folder of ``--out OUT`` / ``--publish`` (default ``runs/bench``); refuses to publish ``--quick`` runs."""
    if publish:
        target = publish_dir()
        if target is None:
            raise ValueError("--publish writes the repository's docs/benchmarks, and this copy of argminlayers has "
                             "none: run it from a clone (pip install -e .), or give --out")
        if out is not None and Path(out).resolve() != target.resolve():
            raise ValueError(f"--publish writes {target}; it cannot go with --out {out}")
        out = str(target)
    path = Path(out if out is not None else "runs/bench")
    if quick and is_published(path):
        raise ValueError("--quick results are smoke tests and are not published: leave out --publish "
                         "(or --out docs/benchmarks)")
    return path


def index_path(out: "str | Path") -> Path:
    """``docs/benchmarks`` → ``docs/benchmarks.md``; any other ``OUT`` → ``OUT/benchmarks.md``."""
    out = Path(out)
    return out.parent / f"{out.name}.md" if is_published(out) else out / "benchmarks.md"


def _relink(text: str, folder: str) -> str:
    """Prefix relative image links ``![..](x.png)`` with ``folder/``."""
    return re.sub(r"(!\[[^\]]*\]\()(?![a-z]+://|/)([^)]+\.png\))", rf"\g<1>{folder}/\g<2>", text)


def write_index(out: "str | Path") -> Path:
    """Write the index (:func:`index_path`) from the intro and the sections ``OUT/NAME.md`` present; returns its path."""
    out = Path(out)
    found, missing = [], []
    for name in BENCHMARKS:
        section = out / f"{name}.md"
        (found if section.exists() else missing).append(name)
    sections = ", ".join(f"[{n}](#{_anchor(out / f'{n}.md')})" for n in found) or "none yet"
    parts = [INTRO.format(sections=sections)]
    path = index_path(out)
    folder = os.path.relpath(out, path.parent)
    for name in found:
        text = (out / f"{name}.md").read_text().strip()
        parts.append(text if folder == "." else _relink(text, Path(folder).as_posix()))
    for name in missing:
        parts.append(f"## {name}\n\nNot run yet: `argminlayers bench {name}`.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    return path


def _anchor(section: Path) -> str:
    """GitHub's anchor of the first heading of a section file."""
    first = section.read_text().splitlines()[0].lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 -]", "", first).replace(" ", "-")
