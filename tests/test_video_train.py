"""Video models, training loop, checkpoint/resume, losses, and the Table 1 protocol (tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import poolings  # noqa: E402
if not hasattr(poolings, "RankPool"):  # pragma: no cover - only while poolings/rank.py is missing
    pytest.skip("poolings.RankPool is not available", allow_module_level=True)

from poolings.video.models import (  # noqa: E402
    SmallCNN,
    VideoClassifier,
    average_frame_scores,
    build_backbone,
    build_pooling,
)
from poolings.video.train import (  # noqa: E402
    TrainConfig,
    check_finite,
    mean_average_precision,
    train,
    video_loss,
)

POOLING_NAMES = ["avg", "max", "rank-diag", "rank-full", "approx-rank"]


def tiny_model(pooling: str = "rank-full", num_classes: int = 3, seed: int = 0, **kw) -> VideoClassifier:
    torch.manual_seed(seed)
    backbone, p = build_backbone("smallcnn", in_channels=1, feature_dim=8, frame_size=16)
    return VideoClassifier(backbone, build_pooling(pooling), num_classes, p, **kw)


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(data="moving-digits", num_videos=8, num_test_videos=4, num_classes=4, min_len=4, max_len=6,
                frame_size=16, feature_dim=8, epochs=2, batch_size=4, lr=0.05, lr_final=0.01,
                pooling="rank-full", head_norm="layernorm", out=str(tmp_path / "run"), quiet=True, plot=False,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("pooling", POOLING_NAMES)
def test_training_steps_reduce_the_loss_on_a_fixed_batch(pooling):
    model = tiny_model(pooling, head_norm="layernorm")
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(4, 6, 1, 16, 16, generator=g)
    lengths = torch.tensor([6, 4, 5, 3])
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = video_loss(model(frames, lengths), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    grads = [p.grad for p in model.backbone.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"


def test_variable_lengths_and_padding_has_no_influence():
    model = tiny_model("rank-full")
    lengths = torch.tensor([7, 3, 5])
    frames = torch.rand(3, 7, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    changed = frames.clone()
    changed[1, 3:] = float("nan")                     # padded frames: garbage, even NaN
    changed[2, 5:] = 100.0
    for mode in ("train", "eval"):                    # batch-norm sees only valid frames in both
        model.train(mode == "train")
        torch.manual_seed(0)
        a = model(frames, lengths)
        torch.manual_seed(0)
        b = model(changed, lengths)
        assert a.shape == (3, 3)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # each video alone (its own length, no padding) gives the same logits in eval mode
    model.eval()
    together = model(frames, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model(frames[i:i + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_backbone_runs_once_per_batch_on_the_valid_frames_only():
    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls, self.rows = inner, 0, []

        def forward(self, x):
            self.calls += 1
            self.rows.append(x.shape[0])
            return self.inner(x)

    backbone = Counting(SmallCNN(1, 8, frame_size=16))
    model = VideoClassifier(backbone, build_pooling("rank-diag"), 2, 8)
    lengths = torch.tensor([5, 2, 4, 1])
    logits = model(torch.rand(4, 5, 1, 16, 16), lengths)
    logits.sum().backward()
    assert backbone.calls == 1
    assert backbone.rows == [int(lengths.sum())]


def test_average_frame_scores_is_the_mean_of_per_frame_probabilities():
    model = tiny_model("avg").eval()
    frames = torch.rand(2, 4, 1, 16, 16)
    lengths = torch.tensor([4, 2])
    scores = average_frame_scores(model, frames, lengths)
    expected = model.classifier(model.backbone(frames[1, :2])).softmax(-1).mean(0)
    torch.testing.assert_close(scores[1], expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))


def test_model_input_errors():
    model = tiny_model("avg")
    with pytest.raises(ValueError, match="lengths"):
        model(torch.rand(2, 4, 1, 16, 16), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.rand(2, 4, 1, 16, 16), torch.tensor([3]))
    with pytest.raises(TypeError, match="lengths"):
        model(torch.rand(2, 4, 1, 16, 16), torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="SmallCNN"):
        model(torch.rand(2, 4, 1, 8, 8), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="head_norm"):
        VideoClassifier(nn.Identity(), build_pooling("avg"), 2, 4, head_norm="group")
    with pytest.raises(ValueError, match="pooling"):
        build_pooling("median")


def test_build_backbone_torchvision_and_smallcnn():
    net, p = build_backbone("resnet18", weights=None, in_channels=1)
    assert p == 512
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 512)
    net, p = build_backbone("smallcnn", in_channels=3, feature_dim=16, frame_size=32)
    assert p == 16 and net(torch.rand(5, 3, 32, 32)).shape == (5, 16)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("not_a_model")
    with pytest.raises(ValueError, match="weights"):
        build_backbone("smallcnn", weights="DEFAULT")


# --------------------------------------------------------------------------- losses


def test_hinge_losses_and_map():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    # sample 0: margins max(0, 1 - 2) + max(0, 1 - 1) = 0; sample 1: 1 + 1 = 2
    assert float(video_loss(logits, labels, "hinge")) == pytest.approx(1.0)
    assert float(video_loss(logits, labels, "sqhinge")) == pytest.approx(1.0)
    multi = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert float(video_loss(logits, multi, "hinge")) == pytest.approx((2.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="ce"):
        video_loss(logits, multi, "ce")
    import numpy as np

    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    perfect = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.6]])
    assert mean_average_precision(perfect, targets) == pytest.approx(1.0)
    assert mean_average_precision(-perfect, targets) < 0.75


def test_hinge_training_reports_map(tmp_path):
    result = train(tiny_config(tmp_path, loss="hinge", epochs=1, pooling="rank-diag"))
    assert 0.0 <= result.final["map"] <= 1.0
    assert "accuracy" in result.final                 # single-label data: accuracy as well
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["map"] == pytest.approx(result.final["map"])


def test_non_finite_loss_raises_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="epoch 3, batch 7"):
        check_finite(torch.tensor(float("nan")), epoch=2, batch=7)
    check_finite(torch.tensor(1.0), epoch=0, batch=0)
    model = tiny_model("avg", num_classes=4)
    with torch.no_grad():
        model.classifier.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite training loss.*epoch 1, batch 0"):
        train(tiny_config(tmp_path, epochs=1), model=model)


# --------------------------------------------------------------------------- checkpoints


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    straight = train(tiny_config(tmp_path / "a", plot=True, dropout=0.3))
    out = tmp_path / "a" / "run"
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").exists()
    assert not list(out.glob("*.tmp"))

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch, entry):
        if epoch == 0:
            raise Killed

    cfg = tiny_config(tmp_path / "b", dropout=0.3)
    with pytest.raises(Killed):
        train(cfg, on_epoch_end=kill_after_first_epoch)
    ckpt = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    resumed = train(dataclasses.replace(cfg, resume=True))

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = {"frames_per_second", "train_step_seconds"}
    assert [{k: v for k, v in e.items() if k not in drop} for e in straight.history] == \
           [{k: v for k, v in e.items() if k not in drop} for e in resumed.history]
    assert len(resumed.history) == 2 and resumed.frames_per_second > 0

    # a checkpoint from another configuration is refused
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(cfg, resume=True, lr=0.5))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="pooling"):
        TrainConfig(pooling="median").validate()
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l2").validate()
    with pytest.raises(ValueError, match="data_path"):
        TrainConfig(data="folder").validate()
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0).validate()
    for clip in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_clip"):
            TrainConfig(grad_clip=clip).validate()


def test_batchnorm_head_survives_a_last_batch_of_one(tmp_path):
    """9 videos in batches of 4 leave one video over: it is dropped rather than crash BatchNorm."""
    result = train(tiny_config(tmp_path, num_videos=9, epochs=1, head_norm="batchnorm"))
    assert result.history and math.isfinite(result.history[-1]["train_loss"])


def test_train_and_test_folders_must_hold_the_same_classes(tmp_path):
    from poolings.video.data import FeatureDataset
    from poolings.video.train import build_datasets

    g = torch.Generator().manual_seed(0)
    FeatureDataset([torch.randn(5, 3, generator=g) for _ in range(3)], [0, 1, 2],
                   classes=["a", "b", "c"]).save(tmp_path / "feats" / "train")
    FeatureDataset([torch.randn(5, 3, generator=g) for _ in range(2)], [0, 1],
                   classes=["a", "c"]).save(tmp_path / "feats" / "test")
    cfg = TrainConfig(data="features", data_path=str(tmp_path / "feats"), backbone="identity")
    with pytest.raises(ValueError, match="must hold the same classes"):
        build_datasets(cfg)


# --------------------------------------------------------------------------- table 1 and CLI


def test_table1_writes_the_nine_methods(tmp_path):
    from poolings.video.table1 import METHODS, Table1Config, run_table1

    base = tiny_config(tmp_path, epochs=1, num_videos=8, num_test_videos=4)
    cfg = Table1Config(base=base, out=str(tmp_path / "t1"), pretrain_epochs=1, frame_epochs=1,
                       frame_batch_size=16, quiet=True)
    rows = run_table1(cfg)
    saved = json.loads((tmp_path / "t1" / "results.json").read_text())
    assert [r["method"] for r in saved] == list(METHODS) == [r["method"] for r in rows]
    trained = {"frame-ft", "avg-e2e", "max-e2e", "rank-e2e-diag", "rank-e2e-full"}
    for row in saved:
        assert 0.0 <= row["accuracy"] <= 1.0
        if row["method"] in trained:
            assert row["frames_per_second"] > 0
        else:
            assert row["frames_per_second"] is None
    assert (tmp_path / "t1" / "results.png").stat().st_size > 0
    assert "rank-e2e-full" in (tmp_path / "t1" / "results.md").read_text()


def test_cli_train_runs_one_configuration(tmp_path):
    from poolings.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--pooling", "approx-rank", "--epochs", "1", "--num-videos", "4", "--num-test-videos", "4",
                 "--min-len", "3", "--max-len", "4", "--frame-size", "16", "--feature-dim", "4", "--batch-size", "4",
                 "--out", str(out), "--quiet", "--no-plot", "--device", "cpu"])
    assert code == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["pooling"] == "approx-rank" and len(saved["history"]) == 1
    assert main(["train", "--data", "folder"]) == 2      # one-line error, no traceback


def test_feature_data_trains_and_runs_table1(tmp_path):
    from poolings.video.data import FeatureDataset
    from poolings.video.table1 import Table1Config, run_table1

    g = torch.Generator().manual_seed(3)
    feats, labels = [], []
    for i in range(12):                               # class = direction of a drift in feature space
        T = 4 + i % 3
        drift = torch.linspace(-1, 1, T)[:, None] * (1 if i % 2 else -1)
        feats.append(drift * torch.ones(1, 5) + 0.1 * torch.randn(T, 5, generator=g))
        labels.append(i % 2)
    FeatureDataset(feats, labels, classes=["a", "b"]).save(tmp_path / "feats")

    cfg = tiny_config(tmp_path, data="features", data_path=str(tmp_path / "feats"), epochs=1, val_fraction=0.5)
    result = train(cfg)
    assert result.model.feature_dim == 5 and 0.0 <= result.final["accuracy"] <= 1.0

    rows = run_table1(Table1Config(base=cfg, out=str(tmp_path / "t1f"), methods=("rank+svm", "frame-ft+rank",
                                                                                    "rank-e2e-full"), quiet=True))
    by = {r["method"]: r for r in rows}
    assert by["frame-ft+rank"]["accuracy"] is None and "skipped" in by["frame-ft+rank"]
    assert 0.0 <= by["rank+svm"]["accuracy"] <= 1.0 and by["rank-e2e-full"]["frames_per_second"] > 0


# --------------------------------------------------------------------------- run folder, logs, precision


def test_a_run_folder_is_refused_without_resume_or_overwrite(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    train(cfg)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg)
    result = train(dataclasses.replace(cfg, overwrite=True))
    assert len(result.history) == 1
    with pytest.raises(ValueError, match="exclude each other"):
        train(dataclasses.replace(cfg, overwrite=True, resume=True))


def test_amp_runs_the_pooling_in_float32(tmp_path):
    model = tiny_model("rank-full", num_classes=4, head_norm="layernorm")
    seen = []
    model.pooling.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    backbone_out = []
    model.backbone.register_forward_hook(lambda module, args, out: backbone_out.append(out.dtype))
    result = train(tiny_config(tmp_path, epochs=1, amp=True), model=model)
    assert backbone_out and set(backbone_out) == {torch.bfloat16}     # the CNN under CPU autocast
    assert seen and set(seen) == {torch.float32}                      # the argmin layer in float32
    assert math.isfinite(result.history[-1]["train_loss"])


def test_convergence_warnings_are_summarised_per_epoch(tmp_path, capsys):
    import warnings

    from argminlayers import ConvergenceWarning
    from poolings.video.train import ConvergenceLog, solver_tolerances

    log = ConvergenceLog()
    with log:
        warnings.warn("the forward solve of X did not converge for samples [0, 3] (‖∇f‖ = ['2.00e-07', "
                      "'5.00e-08']); raise max_iter", ConvergenceWarning)
        warnings.warn("did not converge for samples [0, 1, 2, 3, 4, 5, 6, 7] ...", ConvergenceWarning)
    assert log.entry() == {"nonconverged_solves": 2, "nonconverged_samples": 10,
                           "nonconverged_samples_lower_bound": True, "worst_grad_norm": 2e-7}
    model = tiny_model("rank-full")
    assert solver_tolerances(model) == "RankPoolObjective tol 1e-10, check_tol 1e-06"
    assert "tol 0.001" in solver_tolerances(VideoClassifier(nn.Identity(), build_pooling("rank", tol=1e-3), 2, 4))

    class Unconverged(nn.Module):
        """Average pooling that reports, as the argmin layer does, two samples not converged per call."""

        def forward(self, V, lengths):
            warnings.warn("the forward solve of RankPoolObjective(C=1, eps=0.1) did not converge for samples "
                          "[0, 1] (‖∇f‖ = ['3.00e-04', '1.00e-05']); raise max_iter, loosen tol (default 1e-05)",
                          ConvergenceWarning, stacklevel=2)
            return V.sum(1) / lengths[:, None]

    model = tiny_model("avg", num_classes=4)
    model.pooling = Unconverged()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)       # none may reach the user
        result = train(tiny_config(tmp_path, epochs=2, quiet=False), model=model)
    err = capsys.readouterr().err
    for entry in result.history:                                   # 2 training batches + 1 evaluation batch
        assert entry["nonconverged_solves"] == 3 and entry["nonconverged_samples"] == 6
        assert entry["worst_grad_norm"] == pytest.approx(3e-4)
    lines = [line for line in err.splitlines() if "did not converge" in line]
    assert len(lines) == 2 and lines[0].startswith("epoch 1: the pooling's solver did not converge for 6 samples "
                                                   "in 3 solves, worst ‖∇f‖ 3.00e-04")


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_config(tmp_path, epochs=2, tensorboard=True))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_sync_bn_needs_cuda_under_ddp():
    from poolings.video.train import TrainConfig as Config

    assert Config(sync_bn=True).validate().sync_bn        # accepted; checked where the processes are known


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_uses_float16_and_a_gradient_scaler(tmp_path):
    model = tiny_model("rank-full", num_classes=4, head_norm="layernorm")
    seen = []
    model.pooling.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    result = train(tiny_config(tmp_path, epochs=1, amp=True, device="cuda"), model=model)
    assert set(seen) == {torch.float32} and math.isfinite(result.history[-1]["train_loss"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["scaler"]                                  # the scaler's state is saved for resuming


def test_min_len_has_one_limit_named_by_its_argument():
    from poolings.video.data import MovingDigits

    for lengths in ({"min_len": 0}, {"min_len": 1, "max_len": 1}, {"min_len": 1}):
        with pytest.raises(ValueError, match=r"--min-len.*>= 2"):
            TrainConfig(**lengths).validate()
    with pytest.raises(ValueError, match=r"min_len must be an int >= 2"):
        MovingDigits("train", num_videos=2, num_classes=2, min_len=1, max_len=1)
    TrainConfig(min_len=2, max_len=2).validate()
    assert len(MovingDigits("train", num_videos=2, num_classes=2, min_len=2, max_len=2)[0][0]) == 2


def test_threads_limits_torch_and_scipys_blas():
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_info

    from poolings.runtime import set_threads

    before = torch.get_num_threads()
    blas_before = {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=2, user_api="blas")
        if not any(p["num_threads"] == 2 for p in threadpool_info() if p["user_api"] == "blas"):
            pytest.skip("no BLAS here takes two threads")
        set_threads(1)
        blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert torch.get_num_threads() == 1 and blas and all(p["num_threads"] == 1 for p in blas)
        with pytest.raises(ValueError, match="threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
        from threadpoolctl import ThreadpoolController

        for lib in ThreadpoolController().lib_controllers:
            if lib.filepath in blas_before:
                lib.set_num_threads(blas_before[lib.filepath])
