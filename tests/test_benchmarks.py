"""The benchmarks at tiny sizes: they run, and write JSON, markdown and PNG with the expected content.

No timing assertions: benchmarks are not tests. What is checked is the harness (statistics,
interleaving, memory accounting, the backward it times equals autograd's) and the outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from poolings.bench import common
from poolings.bench.report import index_path, write_index

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(tmp_path: Path) -> common.BenchConfig:
    return common.BenchConfig(quick=True, out=str(tmp_path / "bench"), repeats=1, warmup=0, threads=1,
                              progress=False)


def check_outputs(out: Path, name: str, keys: set[str]) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert {"benchmark", "command", "environment", "settings", "results"} <= set(data)
    assert data["benchmark"] == name
    assert data["command"].startswith(f"argminlayers bench {name} --quick")
    assert {"cpu", "cores", "torch", "threads", "dtype", "date", "wall_seconds"} <= set(data["environment"])
    md = (out / f"{name}.md").read_text()
    assert md.startswith("## ")
    assert data["command"] in md and "Environment:" in md and "|---|" in md
    pngs = sorted(out.glob(f"{name}*.png"))
    assert pngs, f"no chart for {name}"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size < common.PNG_LIMIT_BYTES
        assert f"]({png.name})" in md
    flat = json.dumps(data["results"])
    for key in keys:
        assert f'"{key}"' in flat, f"{name}.json lacks {key!r}"
    return data


# ------------------------------------------------------------------------------ harness
def test_summarize_quartiles_and_order():
    t = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.min, t.q1, t.q3, t.n) == (3.0, 1.0, 2.0, 4.0, 5)
    assert t.samples == [5.0, 1.0, 3.0, 2.0, 4.0]  # kept in the order taken
    assert t.iqr == 2.0
    with pytest.raises(ValueError, match="at least one"):
        common.summarize([])


def test_time_interleaved_runs_round_robin_with_phases():
    order = []

    def case(name):
        def run(sw):
            order.append(name)
            sw.start()
            sw.lap("a")
            sw.lap("b")

        return run

    names = [f"c{i}" for i in range(5)]
    res = common.time_interleaved({n: case(n) for n in names}, repeats=6, warmup=1)
    assert order[:10] == names * 2  # the warm-up and the first round in order
    rounds = [order[5 + 5 * k: 10 + 5 * k] for k in range(6)]
    assert all(sorted(r) == names for r in rounds)  # one run of each case per round
    assert len({r[0] for r in rounds}) > 1  # not always the same case first
    follows = {(r[i - 1], r[i]) for r in rounds for i in range(1, 5)}
    assert len(follows) > 4  # nor always after the same neighbour (one fixed order has 4 pairs)
    order.clear()
    common.time_interleaved({n: case(n) for n in names}, repeats=6, warmup=1)
    assert order[5:] == [n for r in rounds for n in r]  # seeded: the same orders on every run
    assert set(res["c0"]) == {"a", "b", "total"} and res["c1"]["total"].n == 6
    with pytest.raises(RuntimeError, match="timed nothing"):
        common.time_interleaved({"z": lambda sw: None}, repeats=1, warmup=0)


def test_peak_memory_counts_live_allocations():
    def work():
        a = torch.empty(1_000_000, dtype=torch.float32)  # 4 MB
        b = torch.empty(2_000_000, dtype=torch.float32)  # 8 MB, alive with a
        del a
        c = torch.empty(500_000, dtype=torch.float32)  # 2 MB, after a is freed
        return b, c

    mem = common.peak_memory(work)
    assert mem.method
    if mem.bytes is not None and "profiler" in mem.method:
        assert 12_000_000 <= mem.bytes < 14_000_000


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="dtype"):
        common.BenchConfig(dtype="float16")
    with pytest.raises(ValueError, match="repeats"):
        common.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="data"):
        common.BenchConfig(data="video")
    with pytest.raises(ValueError, match="cells"):
        common.markdown_table(["a", "b"], [[1]])


def test_make_sequences_walk_is_unit_norm_and_seeded():
    V = common.make_sequences(2, 5, 7, seed=3, dtype=torch.float64)
    assert V.shape == (2, 5, 7)
    torch.testing.assert_close(V.norm(dim=-1), torch.ones(2, 5, dtype=torch.float64))
    torch.testing.assert_close(V, common.make_sequences(2, 5, 7, seed=3, dtype=torch.float64))


@pytest.mark.parametrize("objective", ["rank", "logcosh"])
def test_timed_backward_equals_autograd(objective):
    """The strategies benchmark times ``implicit_vjp`` on a stored solution: it is the autograd backward."""
    from poolings.bench.strategies import make_layer

    V = common.make_sequences(2, 6, 4, dtype=torch.float64)
    G = common.seeded_like((2, 4), seed=1, dtype=torch.float64, device="cpu")
    layer = make_layer(objective, "woodbury")
    mask = torch.ones(2, 6, dtype=torch.bool)
    X = V.clone().requires_grad_(True)
    (dV,) = torch.autograd.grad(layer(X), X, G)
    torch.testing.assert_close(layer.implicit_vjp(V, mask, layer.solve(V, mask), G), dV)


# ---------------------------------------------------------------------------- benchmarks
def test_strategies_quick(tmp_path):
    from poolings.bench import strategies

    cfg = tiny(tmp_path)
    data = strategies.run(cfg)
    check_outputs(Path(cfg.out), "strategies",
                  {"forward", "time", "memory", "grad_rel_err", "grad_cosine", "iterations_max"})
    rows = data["results"]
    assert {r["objective"] for r in rows} == {"rank", "logcosh"}
    for r in rows:
        assert set(r["strategies"]) == set(strategies.STRATEGIES)
        for name, e in r["strategies"].items():
            assert e["status"] == "ok"
            if name != "diagonal":  # exact strategies agree with the float64 gradient
                assert e["grad_cosine"] > 0.9999


def test_strategies_skip_beyond_the_caps(tmp_path, monkeypatch):
    from poolings.bench import strategies

    monkeypatch.setattr(strategies, "QUICK", (strategies.Sweep("rank", B=2, T_values=(4,), p_fixed=40,
                                                               p_values=(), T_fixed=4),))
    monkeypatch.setitem(strategies.CAPS, "quick", {"seconds": 5.0, "forward_seconds": 10.0,
                                                   "bytes": 2 * 40 * 40 * 4})
    data = strategies.run(tiny(tmp_path))
    s = data["results"][0]["strategies"]
    for name in ("dense", "sherman_morrison"):  # both materialise B p² floats
        assert s[name]["status"] == "skipped" and "materialises" in s[name]["reason"]
    assert s["woodbury"]["status"] == "ok"
    assert "skipped" in (Path(tmp_path / "bench") / "strategies.md").read_text()


def test_references_quick(tmp_path):
    from poolings.bench import references

    cfg = tiny(tmp_path)
    data = references.run(cfg)
    check_outputs(Path(cfg.out), "references", {"kkt_residual", "output_rel_err", "forward"})
    methods = data["results"][0]["methods"]
    assert set(methods) == set(references.METHODS)
    assert methods["ours"]["status"] == "ok" and methods["ours"]["kkt_residual"] < 1e-8
    assert methods["sklearn"]["output_rel_err"] < 1e-6
    for name, e in methods.items():
        if e["status"] == "ok" and name not in ("ours", "sklearn"):
            assert {"time_ratio_to_ours", "grad_rel_err", "grad_cosine"} <= set(e)


def test_throughput_quick(tmp_path):
    from poolings.bench import throughput

    cfg = tiny(tmp_path)
    data = throughput.run(cfg)
    check_outputs(Path(cfg.out), "throughput", {"frames_per_second", "step_ratio_to_avg", "full_over_diag"})
    for setting in ("end_to_end", "pooling_only"):
        assert set(data["results"][setting]["poolings"]) == set(throughput.POOLINGS)
        assert data["results"][setting]["poolings"]["avg"]["step_ratio_to_avg"] == 1.0


def test_limit_through_the_command_line(tmp_path):
    from poolings.cli import main

    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    rc = main(["bench", "limit", "--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored after the run
    data = check_outputs(out, "limit", {"total_over_gram", "exact_backward_over_diagonal", "goal_layer_met"})
    md = (out / "limit.md").read_text()
    assert "Layer ≤ 4× Gram" in md and ("met" in md or "missed" in md)
    assert all(r["gram"]["n"] == 1 for r in data["results"])
    index = index_path(out)
    assert index == out / "benchmarks.md" and index.exists()      # inside OUT, nothing written beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    text = index.read_text()
    assert "## The limit" in text and "](limit.png)" in text
    assert "Not run yet: `argminlayers bench strategies`" in text


@pytest.mark.parametrize("published", [False, True])
def test_index_collects_sections_verbatim(tmp_path, monkeypatch, published):
    from poolings.bench import report

    out = tmp_path / "docs" / "benchmarks"
    out.mkdir(parents=True)
    if published:  # as if this folder were the repository's docs/benchmarks
        monkeypatch.setattr(report, "publish_dir", lambda: out)
    (out / "throughput.md").write_text("## Training throughput\n\n| a |\n|---|\n| 1 |\n\n![t](throughput.png)\n")
    index = write_index(out)
    assert index == (tmp_path / "docs" / "benchmarks.md" if published else out / "benchmarks.md")
    text = index.read_text()
    assert "| a |\n|---|\n| 1 |" in text and "[throughput](#training-throughput)" in text
    assert ("![t](benchmarks/throughput.png)" if published else "![t](throughput.png)") in text


def _git_status_docs() -> str:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "status", "--porcelain", "--", "docs"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout


def test_bench_quick_writes_a_run_folder_and_leaves_docs_alone(tmp_path, monkeypatch, capsys):
    from poolings.cli import main

    before = _git_status_docs()
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "limit", "--quick", "--repeats", "1", "--warmup", "0", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "bench" / "limit.json").exists() and (tmp_path / "runs" / "bench" / "benchmarks.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert _git_status_docs() == before
    data = json.loads((tmp_path / "runs" / "bench" / "limit.json").read_text())
    assert data["environment"]["threads"] == 1            # the default of --threads
    capsys.readouterr()
    # a second run does not replace the first one's results without --overwrite
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds results of limit.json" in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    # quick results are never published; --out must be a folder
    assert main([*argv, "--publish"]) == 2
    assert "not published" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main([*argv, "--out", "afile"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "afile is a file, not a folder" in err
    assert _git_status_docs() == before


def test_projection_scales_the_nearest_measured_point_below():
    from poolings.bench.strategies import Projections

    proj = Projections()
    assert proj.project("rank", "dense", 10.0) is None
    proj.add("rank", "dense", 100.0, 1.0)
    proj.add("rank", "dense", 1000.0, 5.0)
    assert proj.project("rank", "dense", 2000.0) == pytest.approx(10.0)  # from the 1000 point
    assert proj.project("rank", "dense", 500.0) == pytest.approx(5.0)  # from the 100 point
    assert proj.project("rank", "dense", 50.0) == pytest.approx(0.5)  # nothing below: the smallest


def test_cap_scale_is_validated_and_recorded():
    with pytest.raises(ValueError, match="cap_scale"):
        common.BenchConfig(cap_scale=0)
    cfg = common.BenchConfig(cap_scale=10, threads=1)
    assert "--cap-scale 10" in cfg.command("references") and "--threads 1" in cfg.command("references")
    assert cfg.caps({"call": 2.0}) == {"call": 20.0}


def test_references_over_the_cap(tmp_path, monkeypatch):
    """Over the cap: theseus is skipped with its projection, cvxpylayers runs its forward alone."""
    from poolings.bench import references

    monkeypatch.setattr(references, "QUICK", (
        references.Problem(1, 6, 4, methods=("ours", "cvxpylayers-SCS", "theseus")),
        references.Problem(1, 6, 64, methods=("ours", "cvxpylayers-SCS", "theseus")),
    ))
    monkeypatch.setitem(references.CAPS, "quick", {"call": 1e-9, "build": 30.0})
    data = references.run(tiny(tmp_path))
    big = data["results"][1]["methods"]
    assert big["theseus"]["status"] == "skipped" and big["theseus"]["projected_seconds"] > 0
    cvx = big["cvxpylayers-SCS"]
    assert cvx["status"] == "ok" and "backward_skipped" in cvx and "backward" not in cvx
    assert "forward_ratio_to_ours" in cvx and cvx["output_rel_err"] < 1e-6
    md = (tmp_path / "bench" / "references.md").read_text()
    assert "not run: forward + backward projected" in md and "skipped: forward + backward projected" in md


def test_time_format_never_prints_1000_of_a_unit():
    assert common.fmt_time(0.000999999) == "1 ms"
    assert common.fmt_time(0.9996) == "1.00 s"
    assert common.fmt_time(0.0123) == "12.3 ms"
    assert common.fmt_time(float("nan")) == "–"
    assert common.fmt_bytes(3 * 1024**2) == "3 MiB"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_limit_and_strategies_on_cuda(tmp_path):
    from poolings.bench import limit, strategies

    cfg = common.BenchConfig(quick=True, device="cuda", out=str(tmp_path / "bench"), repeats=1, warmup=0,
                             progress=False)
    data = limit.run(cfg)
    assert data["environment"]["device"] == "cuda"
    data = strategies.run(cfg)
    assert "max_memory_allocated" in data["settings"]["memory_method"]


def test_threads_limit_numpy_and_scipy_blas_too(tmp_path):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas():
        return {p["filepath"]: p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}

    cfg = common.BenchConfig(quick=True, out=str(tmp_path / "bench"), threads=1, progress=False)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):  # the suite runs with OMP_NUM_THREADS=1
        before = {k: v for k, v in blas().items() if v == 2}  # the pools that take a limit (NumPy's at least)
        assert before
        with cfg.applied():
            inside = blas()
            assert common.environment(cfg)["blas_threads"] == 1
        assert {k: v for k, v in blas().items() if k in before} == before
    assert {inside[k] for k in before} == {1}
    assert any("scipy.libs" in path for path in inside)  # SciPy's own pool is loaded, so limited too
