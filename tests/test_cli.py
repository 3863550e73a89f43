"""The ``argminlayers`` command as a user meets it: one-line errors (exit status 2), Ctrl-C,
run folders that are never overwritten silently, evaluation, missing extras."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import poolings
from poolings.cli import main

if not hasattr(poolings, "RankPool"):  # pragma: no cover - only while poolings/rank.py is missing
    pytest.skip("poolings.RankPool is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num-videos", "4", "--num-test-videos", "4", "--num-classes", "2", "--min-len", "3", "--max-len", "4",
        "--frame-size", "16", "--feature-dim", "4", "--batch-size", "4", "--pooling", "avg", "--quiet",
        "--no-plot", "--no-tensorboard", "--device", "cpu"]


def run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(rc, err, *phrases):
    """Exit status 2, a single line on stderr, no traceback, and the phrases in it."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("not a folder\n")
    return path


# --------------------------------------------------------------------------- --out pointing at a file


@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "1", *TINY],
    ["table1", "--epochs", "1", *TINY[:-7], "--quiet", "--device", "cpu"],
    ["demo", "--quick", "--quiet"],
    ["bench", "limit", "--quick", "--no-progress"],
])
def test_out_pointing_at_a_file(argv, a_file, capsys):
    rc, _, err = run([*argv, "--out", str(a_file)], capsys)
    one_line_error(rc, err, f"{a_file} is a file, not a folder", "give a folder path")


def test_check_json_pointing_at_a_folder_or_under_a_file(tmp_path, a_file, capsys):
    rc, _, err = run(["check", "--B", "1", "--T", "3", "--p", "2", "--refs", "cvxpylayers", "--json", str(tmp_path)],
                     capsys)
    one_line_error(rc, err, "argminlayers check: error:", "is a folder; give a file path")
    rc, _, err = run(["check", "--json", str(a_file / "out.json")], capsys)
    one_line_error(rc, err, "is a file, not a folder")


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("command", [["demo", "--quick", "--quiet"], ["check", "--T", "3", "--p", "2"],
                                     ["train", "--epochs", "1", *TINY[:-2]]])
def test_device_tpu(command, tmp_path, capsys):
    rc, _, err = run([*command, "--device", "tpu", *(["--out", str(tmp_path / "o")] if command[0] != "check" else [])],
                     capsys)
    one_line_error(rc, err, "'tpu'", "use auto, cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["demo", "--quick", "--quiet"], ["check", "--T", "3", "--p", "2"]])
def test_device_cuda_without_a_gpu(command, tmp_path, capsys):
    rc, _, err = run([*command, "--device", "cuda", *(["--out", str(tmp_path / "o")] if command[0] == "demo" else [])],
                     capsys)
    one_line_error(rc, err, "CUDA is not available", "--device cpu")


# --------------------------------------------------------------------------- backbones


def test_offline_pretrained_weights(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # no cached weights
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    rc, _, err = run(["train", "--epochs", "1", *TINY, "--backbone", "resnet18", "--weights", "DEFAULT",
                      "--out", str(tmp_path / "run")], capsys)
    one_line_error(rc, err, "could not download the torchvision weights 'DEFAULT' of resnet18", "URLError",
                   "leave --weights out")


def test_alexnet_at_a_frame_size_too_small(tmp_path, capsys):
    rc, _, err = run(["train", "--epochs", "1", *TINY, "--backbone", "alexnet", "--frame-size", "32",
                      "--out", str(tmp_path / "run")], capsys)
    one_line_error(rc, err, "alexnet cannot take frames of 32×32 pixels", "use a larger --frame-size")


# --------------------------------------------------------------------------- checkpoints and run folders


def test_a_run_folder_is_not_overwritten_without_a_flag(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", *TINY, "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    first = (out / "checkpoint.pt").read_bytes()
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, "already holds a run", "--resume", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == first          # untouched
    (out / "notes.txt").write_text("mine")
    assert run([*argv, "--overwrite", "--seed", "3"], capsys)[0] == 0
    assert (out / "checkpoint.pt").read_bytes() != first and (out / "notes.txt").read_text() == "mine"
    # demo and table1 run folders alike
    demo = ["demo", "--quick", "--quiet", "--out", str(tmp_path / "demo")]
    assert run(demo, capsys)[0] == 0
    rc, _, err = run(demo, capsys)
    one_line_error(rc, err, "already holds a run", "--overwrite")


def test_resume_extends_a_finished_run_and_keeps_the_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", *TINY, "--out", str(out), "--lr", "0.05", "--lr-final", "0.005"]
    assert run([*base, "--epochs", "2"], capsys)[0] == 0
    rc, _, err = run([*base, "--epochs", "4", "--resume"], capsys)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["history"]] == [1, 2, 3, 4]
    lrs = [e["lr"] for e in metrics["history"]]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == lrs[2] == lrs[3] == pytest.approx(0.005)
    best = torch.load(out / "best.pt", weights_only=False)
    key = metrics["best"]["metric"]
    assert key == "test_accuracy" and best["best"] == metrics["best"]
    assert metrics["best"]["value"] == max(e[key] for e in metrics["history"])
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 5
    rc, _, err = run([*base, "--epochs", "3", "--resume"], capsys)
    one_line_error(rc, err, "has already done 4 epochs", "--epochs 4 or more")


def test_truncated_and_random_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", *TINY, "--out", str(out)]
    assert run([*base, "--epochs", "1"], capsys)[0] == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    rc, _, err = run([*base, "--epochs", "2", "--resume"], capsys)
    one_line_error(rc, err, "checkpoint.pt cannot be read; it is truncated or not a checkpoint", "--overwrite")
    rc, _, err = run(["eval", "--checkpoint", str(out / "checkpoint.pt")], capsys)
    one_line_error(rc, err, "argminlayers eval: error:", "truncated or not a checkpoint")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    rc, _, err = run([*base, "--epochs", "1", "--overwrite", "--backbone-init", str(tmp_path / "random.pt")], capsys)
    one_line_error(rc, err, "random.pt cannot be read")


# --------------------------------------------------------------------------- feature files


def test_feature_files_empty_npy_and_random_pt(tmp_path, capsys):
    root = tmp_path / "feats"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    (root / "a" / "empty.npy").write_bytes(b"")
    (root / "b" / "random.pt").write_bytes(np.random.default_rng(1).bytes(800))
    argv = ["train", "--data", "features", str(root), "--backbone", "identity", "--epochs", "1", "--quiet",
            "--no-plot", "--no-tensorboard", "--device", "cpu", "--out", str(tmp_path / "run")]
    rc, _, err = run(argv, capsys)
    one_line_error(rc, err, "no readable feature entries", "2 unreadable files", "empty.npy (EOFError",
                   "random.pt (UnpicklingError")
    # with readable files beside them, the bad ones are left out and training goes on
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(("a", "b")):
        for j in range(3):
            torch.save(torch.randn(4, 5, generator=g) + k, root / name / f"ok{j}.pt")
    rc, out, err = run(argv[:-2] + ["--out", str(tmp_path / "run2")], capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["data"]["skipped"] == 2
    assert {Path(r["path"]).name for r in metrics["data"]["unreadable"]} == {"empty.npy", "random.pt"}


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from poolings.video import train as vtrain

    real = vtrain._train_epoch

    def interrupted_in_epoch_two(net, loader, optimizer, scaler, cfg, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(net, loader, optimizer, scaler, cfg, epoch, *args)

    monkeypatch.setattr(vtrain, "_train_epoch", interrupted_in_epoch_two)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "3", "--out", str(out)]
    rc, _, err = run(argv, capsys)
    assert rc == 130 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert f"interrupted after epoch 1 of 3, saved in {out}/checkpoint.pt" in line and "--resume" in line
    monkeypatch.setattr(vtrain, "_train_epoch", real)
    assert run([*argv, "--resume"], capsys)[0] == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


def test_ctrl_c_from_the_terminal(tmp_path):
    """A real SIGINT to the command in a subprocess."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    # a shell that starts a job in the background (CI runners, `cmd &`) leaves SIGINT ignored, and a
    # Python started with SIGINT ignored never raises KeyboardInterrupt: restore the terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "poolings.cli", "train", *TINY, "--epochs", "100000", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists(), proc.communicate()[1] if proc.poll() is not None else "no epoch"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "saved in" in lines[0] and "rerun the same command with --resume to continue" in lines[0]


# --------------------------------------------------------------------------- --debug and missing extras


def test_debug_shows_the_traceback(tmp_path, a_file):
    with pytest.raises(NotADirectoryError, match="is a file"):
        main(["--debug", "train", "--epochs", "1", *TINY, "--out", str(a_file)])
    with pytest.raises(NotADirectoryError):
        main(["train", "--epochs", "1", *TINY, "--out", str(a_file), "--debug"])


@pytest.mark.parametrize("command, module, extra", [
    (["demo", "--quick"], "sklearn", "video"),
    (["train", "--epochs", "1"], "matplotlib", "video"),
    (["eval", "--checkpoint", "x.pt"], "sklearn", "video"),
    (["bench", "limit", "--quick"], "matplotlib", "bench"),
])
def test_a_missing_extra_is_named_with_its_pip_command(command, module, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)        # as if it were not installed: import fails
    rc, _, err = run([*command, "--out", str(tmp_path / "o")], capsys)
    package = {"sklearn": "scikit-learn"}.get(module, module)
    one_line_error(rc, err, f"{package} is not installed", f"pip install 'argminlayers[{extra}]'")


def test_missing_package_met_during_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)
    (tmp_path / "videos" / "a").mkdir(parents=True)
    (tmp_path / "videos" / "a" / "x.mp4").write_bytes(b"0" * 10)
    rc, _, err = run(["train", "--data", "folder", str(tmp_path / "videos"), "--epochs", "1", "--quiet",
                      "--out", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, "av is not installed", "pip install 'argminlayers[video]'")


# --------------------------------------------------------------------------- eval


def test_eval_on_a_trained_demo_checkpoint_writes_the_confusion_matrix(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert run(["demo", "--quick", "--quiet", "--out", str(demo)], capsys)[0] == 0
    ckpt = demo / "rank-e2e-full" / "checkpoint.pt"
    assert ckpt.exists() and (demo / "rank-e2e-full" / "best.pt").exists()
    rc, out, err = run(["eval", "--checkpoint", str(ckpt)], capsys)
    assert rc == 0, err
    folder = demo / "rank-e2e-full" / "eval-test"
    report = json.loads((folder / "eval.json").read_text())
    confusion = json.loads((folder / "confusion.json").read_text())
    assert (folder / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    matrix = np.array(confusion["matrix"])
    assert matrix.shape == (4, 4) and matrix.sum() == report["items"] == 12
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert confusion["classes"] == ["right", "left", "down", "up"]
    results = json.loads((demo / "results.json").read_text())
    row = next(r for r in results if r["method"] == "rank-e2e-full")
    assert report["accuracy"] == pytest.approx(row["accuracy"])     # the demo's own figure
    assert "top5_accuracy" not in report                             # 4 classes: top-5 says nothing
    assert "eval: accuracy" in out and "confusion.png" in out
    # again: refused without --overwrite; on the train split with --out
    rc, _, err = run(["eval", "--checkpoint", str(ckpt)], capsys)
    one_line_error(rc, err, "already holds a run", "--overwrite")
    rc, out, err = run(["eval", "--checkpoint", str(demo / "rank-e2e-full" / "best.pt"), "--split", "train",
                        "--out", str(tmp_path / "ev")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["items"] == 24


def test_top5_and_confusion_matrix_helpers():
    from poolings.video.evaluate import confusion_matrix, top_k_accuracy

    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 2])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == 1.0
    m = confusion_matrix(scores.argmax(1), labels, 3)
    assert m.tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 1]]
