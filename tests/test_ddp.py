"""Data-parallel training: two CPU processes (gloo) launched by torchrun end with equal parameters,
and stop together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import poolings  # noqa: E402
if not hasattr(poolings, "RankPool"):  # pragma: no cover - only while poolings/rank.py is missing
    pytest.skip("poolings.RankPool is not available", allow_module_level=True)
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    from poolings.video.train import TrainConfig, train

    out = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "fading":   # a test split that turns unreadable after the check
        from poolings.video.data import UnreadableItemError

        class Steady(torch.utils.data.Dataset):
            classes, num_classes = ["a", "b"], 2

            def __len__(self):
                return 4

            def __getitem__(self, i):
                return torch.rand(3, 1, 16, 16), i % 2

        class Fading(Steady):
            reads = 0

            def __getitem__(self, i):
                self.reads += 1
                if self.reads > 1:
                    raise UnreadableItemError(f"gone{i}.avi", "vanished")
                return super().__getitem__(i)

        cfg = TrainConfig(frame_size=16, feature_dim=8, pooling="avg", epochs=2, batch_size=2, out=out, quiet=True,
                          plot=False, device="cpu")
        try:
            train(cfg, datasets=(Steady(), Fading()))
        except ValueError as exc:
            with open(os.path.join(out, f"stopped_rank{os.environ['RANK']}.txt"), "w") as f:
                f.write(str(exc))
        sys.exit(0)
    cfg = TrainConfig(data="moving-digits", num_videos=8, num_test_videos=4, num_classes=4, min_len=3, max_len=5,
                      frame_size=16, feature_dim=8, pooling="rank-full", head_norm="layernorm", epochs=1,
                      batch_size=2, lr=0.05, out=out, quiet=True, plot=False, device="cpu")
    result = train(cfg)
    rank = int(os.environ["RANK"])
    params = {k: v.detach().clone() for k, v in result.model.named_parameters()}
    torch.save({"params": params, "world": int(os.environ["WORLD_SIZE"]),
                "frames": result.history[-1]["train_frames"]}, os.path.join(out, f"params_rank{rank}.pt"))
    """
)


def _torchrun(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_two_process_gloo_training_keeps_the_replicas_equal(tmp_path):
    out = _torchrun(tmp_path)

    r0 = torch.load(out / "params_rank0.pt", weights_only=False)
    r1 = torch.load(out / "params_rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    # the frames of both shards are counted: 8 videos of 3-5 frames
    assert 8 * 3 <= r0["frames"] == r1["frames"] <= 8 * 5

    # training moved the parameters away from their (seeded) initialisation
    from poolings.video.train import TrainConfig, build_model

    torch.manual_seed(0)
    init = build_model(TrainConfig(feature_dim=8, pooling="rank-full", head_norm="layernorm"), 4, (1, 16, 16))
    moved = [not torch.equal(p.detach(), r0["params"][n]) for n, p in init.named_parameters()]
    assert any(moved)
    # only rank 0 wrote the run's files
    assert (out / "checkpoint.pt").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["history"]) == 1 and "test_accuracy" in saved["history"][0]


def test_every_process_stops_when_the_test_split_turns_unreadable(tmp_path):
    out = _torchrun(tmp_path, "fading")
    stops = [(out / f"stopped_rank{r}.txt").read_text() for r in (0, 1)]   # neither process was left waiting
    assert "gone0.avi (vanished)" in stops[0] and "--resume" in stops[0]
    assert "rank 0" in stops[1] and "--resume" in stops[1]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
