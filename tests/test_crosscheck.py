"""``argminlayers check`` end to end, at tiny sizes."""

from __future__ import annotations

import json

import pytest

from poolings import crosscheck
from poolings.cli import build_parser, main
from poolings.reference import TheseusRankPool

import cvxpylayers  # noqa: E402,F401  (installed by the set-up; never skipped)
import theseus  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = ["--B", "3", "--T", "8", "--p", "4", "--variable-lengths"]


def run_check(argv, tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = main(["check", *argv, "--json", str(out)])
    text = capsys.readouterr().out
    return rc, text, json.loads(out.read_text())


def test_parser_defaults():
    args = build_parser(["check"]).parse_args(["check"])
    assert (args.pooling, args.B, args.T, args.p, args.C, args.eps) == ("rank", 2, 50, 64, 1.0, 0.1)
    assert (args.backward, args.dtype, args.refs, args.seed, args.variable_lengths) == (
        "woodbury", "float64", None, 0, False,
    )
    assert args.func is crosscheck.run


def test_check_with_an_exact_stand_in(monkeypatch, tmp_path, capsys):
    """The command's plumbing, with theseus as the layer under test."""
    monkeypatch.setattr(crosscheck, "make_pooling", lambda pooling, C, eps, backward: TheseusRankPool(C=C, eps=eps))
    rc, text, result = run_check(SMALL, tmp_path, capsys)
    assert rc == 0
    assert "pooling=rank" in text and "ref KKT" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("cvxpylayers", "theseus"))}
    assert set(rows) == {"cvxpylayers", "theseus"}
    lengths = result["config"]["lengths"]
    assert lengths[0] == 8 and min(lengths) < 8  # a padded batch
    refs = {r["name"]: r for r in result["references"]}
    assert refs["theseus"]["out_rel_err"] == 0 and refs["theseus"]["grad_rel_err"] == 0
    assert refs["theseus"]["build_seconds"] is None
    cv = refs["cvxpylayers"]
    assert cv["solver"] == "SCS" and cv["build_seconds"] > 0
    assert cv["out_rel_err"] < 1e-6 and cv["grad_rel_err"] < 1e-6 and cv["grad_cosine"] > 1 - 1e-9
    for r in refs.values():
        assert r["ref_kkt_residual"] < 1e-7
        assert r["ref_padded_grad_max"] == 0 and r["ours_padded_grad_max"] == 0
    assert result["ours"]["kkt_residual"] < 1e-12


def test_check_detects_a_wrong_layer(monkeypatch, tmp_path, capsys):
    """A layer solving another problem (C doubled) is reported as far off, not hidden."""
    monkeypatch.setattr(
        crosscheck, "make_pooling", lambda pooling, C, eps, backward: TheseusRankPool(C=2 * C, eps=eps)
    )
    rc, _, result = run_check(SMALL + ["--refs", "theseus"], tmp_path, capsys)
    assert rc == 0
    (ref,) = result["references"]
    assert ref["out_rel_err"] > 1e-3 and ref["grad_rel_err"] > 1e-3
    assert result["ours"]["kkt_residual"] > 1e-3  # measured against the C the command was given


@pytest.mark.parametrize("backward", ["woodbury", "dense"])
def test_check_rank_pool(backward, tmp_path, capsys):
    rc, text, result = run_check(SMALL + ["--backward", backward, "--repeat", "2"], tmp_path, capsys)
    assert rc == 0 and f"backward={backward}" in text
    for r in result["references"]:
        assert r["out_rel_err"] < 1e-6, r
        assert r["grad_rel_err"] < 1e-6, r
        assert r["ours_padded_grad_max"] == 0
    assert result["ours"]["kkt_residual"] < 1e-9


def test_check_avg_pool_float32(tmp_path, capsys):
    rc, text, result = run_check(["--pooling", "avg", "--dtype", "float32", *SMALL], tmp_path, capsys)
    assert rc == 0 and "dtype=float32" in text
    (ref,) = result["references"]
    assert ref["name"] == "cvxpylayers"
    assert ref["out_rel_err"] < 1e-5 and ref["grad_rel_err"] < 1e-5
    assert ref["ref_kkt_residual"] < 1e-8


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pooling", "avg", "--refs", "theseus"], "no 'theseus' reference for pooling 'avg'"),
        (["--refs", "cvxpy"], "no 'cvxpy' reference"),
        (["--refs", ","], "refs must name at least one reference"),
        (["--B", "0"], "B must be an int >= 1"),
        (["--T", "0"], "T must be an int >= 1"),
        (["--C", "-1"], "C must be > 0"),
        (["--eps", "-0.5"], "eps must be >= 0"),
        (["--repeat", "0"], "repeat must be an int >= 1"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(["check", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--dtype", "float16"])
    assert "float16" in capsys.readouterr().err
