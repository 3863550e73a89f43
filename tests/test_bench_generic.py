"""The generic-objective benchmark at tiny sizes: it runs, checks every gradient, writes its outputs.

No timing assertions. The peers (torchopt, jax + jaxopt, theseus) are optional: a peer that is
not installed must come out as ``unavailable``, one that is installed must run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from poolings.bench import common, generic
from poolings.bench import generic_methods as gm

from test_benchmarks import check_outputs, tiny

HAVE = {name: importlib.util.find_spec(mod) is not None
        for name, mod in (("torchopt", "torchopt"), ("jaxopt", "jaxopt"), ("theseus", "theseus"))}


def _expect(entry: dict, peer: str) -> None:
    if HAVE[peer]:
        assert entry["status"] == "ok", entry
    else:
        assert entry["status"] == "unavailable", entry


def test_generic_quick_both_objectives(tmp_path):
    cfg = tiny(tmp_path)
    only = ["ours:defaults", "hand", "bare", "unrolled", "torchopt:lbfgs", "jaxopt", "theseus"]
    data = generic.run(cfg, dtypes=["float64"], only=only, first_call=False)
    check_outputs(Path(cfg.out), "generic", {"grad_rel_err", "reference_fd_error", "over_hand", "grad_norm_max"})
    assert {r["objective"] for r in data["results"]} == set(gm.OBJECTIVES)
    for r in data["results"]:
        assert r["reference_fd_error"] < 1e-6  # the exact reference agrees with finite differences
        m = r["methods"]
        assert m["hand"]["status"] == "ok" and m["hand"]["gradient_ok"]
        # the bare autograd Newton loop runs where the defaults take dense Newton (every tiny size)
        assert m["bare"]["status"] == "ok" and m["bare"]["gradient_ok"] and "total" in m["bare"]
        assert r["summary"]["bare_over_hand"] > 0
        ours = m["ours:defaults"]
        if r["objective"] == "pseudo_huber":
            assert ours["status"] == "ok" and ours["gradient_ok"] and ours["memory"] is not None
            der = ours["derivatives"]  # the instrumented call: its derivative work is a part of it
            assert 0 < der["seconds"] < der["total"] and 0 < der["share"] < 1
        else:  # the keyword input: measured once the layer takes it, recorded as such until then
            assert ours["status"] in ("ok", "unsupported"), ours
            assert ours["status"] != "ok" or ("grad_w_rel_err" in ours and ours["gradient_ok"])
        if r["role"] == "hand":
            assert set(m) == {"ours:defaults", "hand", "bare"}
            continue
        assert m["unrolled"]["gradient_ok"]
        _expect(m["torchopt:lbfgs"], "torchopt")
        _expect(m["jaxopt"], "jaxopt")
        if HAVE["jaxopt"]:
            assert m["jaxopt"]["gradient_ok"] and m["jaxopt"]["compile_seconds"] > 0
            assert "total" in m["jaxopt"]
        _expect(m["theseus"], "theseus")
        if HAVE["theseus"]:  # Gauss–Newton's JᵀJ is not this objective's Hessian: flagged, never ranked
            assert not m["theseus"]["gradient_ok"] and "total" not in m["theseus"]
        if r["objective"] == "weighted":
            for name, e in m.items():
                if e["status"] == "ok":
                    assert "grad_w_rel_err" in e, name
    assert data["verdict"] and any("hand-written" in line for line in data["verdict"])
    assert any("Where the defaults' time goes" in line and "× the hand-written call" in line for line in data["verdict"])
    assert any("The floor: Newton on the same autograd derivatives" in line for line in data["verdict"])
    md = (Path(cfg.out) / "generic.md").read_text()
    assert "### Verdict" in md and "⚠ wrong gradient" not in md.split("### Verdict")[0]


@pytest.mark.slow
def test_first_call_in_a_fresh_process(tmp_path):
    e = generic._first_call(tiny(tmp_path), "ours:defaults", "pseudo_huber", "float64", 2, 5, 3, False)
    assert e["status"] == "ok", e
    assert e["first_call_seconds"] > 0 and e["steady_seconds"] > 0 and e["first_over_steady"] > 0
    assert isinstance(e["warnings"], list) and e["import_seconds"] >= 0


def test_generic_subset_through_the_command_line(tmp_path):
    from poolings.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "generic", "--quick", "--dtype", "float32", "--sizes", "2x4x3", "--only", "ours:defaults,hand",
               "--objectives", "pseudo_huber", "--no-first-call", "--repeats", "1", "--warmup", "0", "--threads", "1",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "generic.json").read_text())
    assert data["settings"]["dtypes"] == ["float32"] and data["first_call"] == []
    assert "--dtype float32 " in data["command"] and "--sizes 2x4x3 --only ours:defaults,hand" in data["command"]
    (row,) = data["results"]
    assert (row["B"], row["T"], row["p"], row["objective"]) == (2, 4, 3, "pseudo_huber")
    assert set(row["methods"]) == {"ours:defaults", "hand"}
    assert row["summary"]["over_hand"] > 0
    assert "## Generic objectives against the peers" in (out / "benchmarks.md").read_text()
    md = (out / "generic.md").read_text()
    generic.render(out)  # the report is a function of the JSON alone
    assert (out / "generic.md").read_text() == md


def test_generic_skips_beyond_the_memory_cap(tmp_path, monkeypatch):
    monkeypatch.setitem(generic.CAPS, "quick", {"call": 5.0, "seconds": 20.0, "bytes": 1000})
    data = generic.run(tiny(tmp_path), dtypes=["float64"], sizes=[(2, 4, 3)], only=["unrolled", "hand"],
                       objectives=["pseudo_huber"], first_call=False)
    m = data["results"][0]["methods"]
    assert m["unrolled"]["status"] == "skipped" and "memory holds" in m["unrolled"]["reason"]
    assert m["hand"]["status"] == "ok"
    assert "skipped (memory holds" in (tmp_path / "bench" / "generic.md").read_text()


def test_generic_option_errors_name_the_option():
    with pytest.raises(ValueError, match="--sizes"):
        common.parse_sizes("16x10")
    with pytest.raises(ValueError, match="--objectives"):
        generic._parse_list("huber", gm.OBJECTIVES, "objectives")


def test_hand_written_layer_matches_finite_differences():
    """The reference every gradient is measured against: float64 gradcheck, both objectives."""
    V = common.make_sequences(2, 5, 3, dtype=torch.float64).requires_grad_(True)
    W = (0.5 + torch.rand(2, 5, dtype=torch.float64)).requires_grad_(True)
    torch.autograd.gradcheck(lambda v: gm.make_hand("pseudo_huber", 1e-14)(v, None), (V,))
    torch.autograd.gradcheck(lambda v, w: gm.make_hand("weighted", 1e-14)(v, w), (V, W))


def test_bare_loop_runs_only_where_the_defaults_take_dense_newton():
    assert generic._bare_runs(1, 5, 3) and generic._bare_runs(16, 10, 8)
    assert not generic._bare_runs(256, 20, 16)  # B·T·p·q beyond DENSE_MAX_WORK: the defaults take L-BFGS
    assert not generic._bare_runs(16, 20, 256)  # q beyond DENSE_MAX_Q
    assert "bare" in generic._methods("hand", None, (1, 5, 3))
    assert "bare" not in generic._methods("hand", None, (256, 20, 16))
    assert "bare" not in generic._methods("sweep", None, (16, 10, 64))


@pytest.mark.parametrize("objective", gm.OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bare_loop_matches_the_hand_written_layer(objective, dtype):
    """The floor is the same Newton method with autograd derivatives: same output and gradients."""
    g = torch.Generator().manual_seed(3)
    V = torch.randn(4, 6, 3, generator=g, dtype=dtype).requires_grad_(True)
    W = (torch.rand(4, 6, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    G = torch.randn(4, 3, generator=g, dtype=dtype)
    wrt = (V,) if objective == "pseudo_huber" else (V, W)
    out = []
    for method in ("bare", "hand"):
        U = gm.make(method, objective, dtype)(V, W)
        out.append((U, *torch.autograd.grad((U * G).sum(), wrt)))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, **tol)
