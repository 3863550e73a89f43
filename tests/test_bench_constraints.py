"""The constraints benchmark at tiny sizes: it runs and writes JSON, markdown and PNG (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from poolings.bench import common
from poolings.bench.constraints import CHECKED, STRATEGIES, run

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_quick_run_writes_its_section(tmp_path):
    cfg = common.BenchConfig(quick=True, out=str(tmp_path / "bench"), repeats=1, warmup=0, threads=1, progress=False)
    run(cfg)
    out = tmp_path / "bench"
    data = json.loads((out / "constraints.json").read_text())
    assert data["benchmark"] == "constraints" and data["command"].startswith("argminlayers bench constraints --quick")
    strategies = data["results"]["strategies"]
    assert set(strategies) == {"sphere_rank", "simplex", "box"}
    for rows in strategies.values():
        for row in rows:
            assert row["converged"]
            for s in STRATEGIES:
                e = row["strategies"][s]
                assert e["status"] == "ok" and "backward" in e
                if s != "diagonal":  # the exact ones agree with the dense KKT gradient
                    assert e["grad_rel_err"] < 1e-4, (s, e["grad_rel_err"])  # float32 (cg: to its tol 1e-5)
    refs = data["results"]["references"]
    assert set(refs) == set(CHECKED)
    for rows in refs.values():
        for row in rows:
            assert row["grad_rel_err"] < 1e-6 and row["time_ratio"] > 0
    md = (out / "constraints.md").read_text()
    assert md.startswith("## Constrained layers") and "![constraints.png](constraints.png)" in md
    assert (out / "constraints.png").stat().st_size < common.PNG_LIMIT_BYTES
