"""Assemble ``docs/benchmarks.md`` from the sections the benchmarks wrote.

Each benchmark writes its own section ``OUT/NAME.md`` (tables, command, environment, charts)
from its run. :func:`write_index` puts the sections, unedited, after a fixed introduction
into ``OUT.md`` (``docs/benchmarks.md`` for the default ``--out docs/benchmarks``); only the
chart links are prefixed with the folder name so that they resolve from the index.
"""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = ("strategies", "references", "limit", "throughput", "constraints")

INTRO = """\
# Benchmarks

This page is generated: every table, chart and verdict below comes unedited from the run whose
command and environment head its section. `argminlayers bench all` reruns everything and rewrites
this page (`argminlayers bench NAME` reruns one section). From the repository root,
`python -m poolings.bench.cli NAME` is the same command, and each benchmark is also runnable as
`python -m poolings.bench.NAME`, with the same options; `--quick` runs tiny sizes in seconds.
The raw numbers (every timing sample, quartiles, memory, errors, environment) are in
`docs/benchmarks/NAME.json`.

How the numbers are taken:

- **Times** are medians over repeated runs after a warm-up, with the inter-quartile range (IQR)
  where it matters. Cases that are compared run **interleaved** (one run of each case per round),
  so that the load of a shared machine hits them alike, and every ratio is formed from the same run.
  The development machine has 2 cores shared with other work: absolute times drift between runs
  by tens of percent (the load average at the start and end of each run is recorded), while the
  ratios within one run are far steadier. Compare ratios, not absolute times across sections.
- **Threads.** Each section records the number of torch threads. On a machine whose cores are
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


def index_path(out: "str | Path") -> Path:
    """``docs/benchmarks`` → ``docs/benchmarks.md``."""
    out = Path(out)
    return out.parent / f"{out.name}.md"


def _relink(text: str, folder: str) -> str:
    """Prefix relative image links ``![..](x.png)`` with ``folder/``."""
    return re.sub(r"(!\[[^\]]*\]\()(?![a-z]+://|/)([^)]+\.png\))", rf"\g<1>{folder}/\g<2>", text)


def write_index(out: "str | Path") -> Path:
    """Write ``OUT.md`` from the intro and the sections ``OUT/NAME.md`` present; returns its path."""
    out = Path(out)
    found, missing = [], []
    for name in BENCHMARKS:
        section = out / f"{name}.md"
        (found if section.exists() else missing).append(name)
    sections = ", ".join(f"[{n}](#{_anchor(out / f'{n}.md')})" for n in found) or "none yet"
    parts = [INTRO.format(sections=sections)]
    for name in found:
        parts.append(_relink((out / f"{name}.md").read_text().strip(), out.name))
    for name in missing:
        parts.append(f"## {name}\n\nNot run yet: `argminlayers bench {name}`.")
    path = index_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    return path


def _anchor(section: Path) -> str:
    """GitHub's anchor of the first heading of a section file."""
    first = section.read_text().splitlines()[0].lstrip("#").strip().lower()
    return re.sub(r"[^a-z0-9 -]", "", first).replace(" ", "-")
