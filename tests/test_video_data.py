"""Tests for poolings.video.data: the embedded moving digits, batching, video folders, features."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from poolings.video import data as vd
from poolings.video.data import moving_digits as md
from poolings.video.data import (
    MOTIONS,
    FeatureDataset,
    FrameDigits,
    MovingDigits,
    UnreadableVideoWarning,
    VideoFolder,
    collate_videos,
    extract_features,
    make_loader,
    pack_padded,
    pad_packed,
    render_moving_digits,
    sample_frame_indices,
    sample_motions,
)

# ---------------------------------------------------------------------------------------------
# MovingDigits
# ---------------------------------------------------------------------------------------------


def test_moving_digits_items_and_attributes():
    ds = MovingDigits("train", num_videos=24, num_classes=6, min_len=5, max_len=9, size=24, seed=3)
    assert len(ds) == 24 and ds.num_classes == 6 and ds.classes == list(MOTIONS)[:6]
    assert ds.reversal_pairs == [(0, 1), (2, 3), (4, 5)]
    assert [ds.reverse_class(k) for k in range(6)] == [1, 0, 3, 2, 5, 4]
    lengths = set()
    for i in range(len(ds)):
        frames, label = ds[i]
        assert frames.dtype == torch.float32 and frames.shape[1:] == (1, 24, 24)
        assert 5 <= frames.shape[0] <= 9 and isinstance(label, int) and 0 <= label < 6
        assert 0 <= ds.digit_of(i) <= 9
        lengths.add(frames.shape[0])
    assert len(lengths) > 1  # lengths vary
    assert torch.bincount(ds.labels, minlength=6).tolist() == [4] * 6  # balanced
    assert ds[-1][0].shape == ds[23][0].shape
    with pytest.raises(IndexError):
        ds[24]
    with pytest.raises(ValueError, match="k must be"):
        ds.reverse_class(6)


def test_moving_digits_determinism():
    a = MovingDigits("train", num_videos=16, num_classes=4, seed=7)
    b = MovingDigits("train", num_videos=16, num_classes=4, seed=7)
    c = MovingDigits("train", num_videos=16, num_classes=4, seed=8)
    d = MovingDigits("val", num_videos=16, num_classes=4, seed=7)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.digits, b.digits)
    for other in (c, d):
        same_shape = other.frames.shape == a.frames.shape
        assert not (same_shape and torch.equal(other.frames, a.frames))
        assert not torch.equal(other.params["mid"], a.params["mid"])


def test_splits_use_disjoint_digit_images():
    pools = {s: md._digit_pool(s)[0].flatten(1) for s in ("train", "val", "test")}
    assert sum(p.shape[0] for p in pools.values()) == 1797
    train_rows = {tuple(r.tolist()) for r in pools["train"]}
    # load_digits has a few exact duplicate images; the splits partition the image indices.
    overlap = sum(tuple(r.tolist()) in train_rows for r in pools["test"])
    assert overlap <= 5


@pytest.mark.parametrize("size", [32, 20])
def test_reversed_video_is_exactly_a_sample_of_the_reverse_class(size):
    """Same random draws, labels k vs k ^ 1: identical parameters with delta negated, and the
    rendered class-(k ^ 1) video is exactly the frame-reversed class-k video."""
    labels = np.arange(24) % 12
    p = sample_motions(labels, num_images=50, min_len=3, max_len=11, size=size, rng=np.random.default_rng(5))
    q = sample_motions(labels ^ 1, num_images=50, min_len=3, max_len=11, size=size, rng=np.random.default_rng(5))
    for key in ("image", "length", "mid"):
        assert np.array_equal(p[key], q[key])
    assert np.array_equal(q["delta"], -p["delta"])
    images = torch.rand(50, 8, 8)
    fp = render_moving_digits(images, **md._as_tensors(p), size=size)
    fq = render_moving_digits(images, **md._as_tensors(q), size=size)
    offsets = np.concatenate([[0], np.cumsum(p["length"])])
    for i in range(len(labels)):
        vp, vq = fp[offsets[i] : offsets[i + 1]], fq[offsets[i] : offsets[i + 1]]
        assert torch.equal(vq, vp.flip(0))
        assert not torch.equal(vp, vp.flip(0))  # the video does move


def test_digit_stays_on_canvas_and_motion_has_the_named_direction():
    ds = MovingDigits("train", num_videos=48, num_classes=12, size=32, seed=1, noise=0.0)
    images, _ = md._digit_pool("train")
    grid = torch.arange(32.0)
    for i in range(len(ds)):
        frames, label = ds[i]
        x = frames[:, 0]  # (T, H, W)
        t_len = x.shape[0]
        # ink is conserved (nothing clipped): mass(t) ~ scale(t)^2 * ink of the 8 x 8 image
        tau = (2 * torch.arange(t_len) - (t_len - 1)) / (2 * (t_len - 1))
        scale = (ds.params["mid"][i, 2] + tau * ds.params["delta"][i, 2]).exp()
        mass = x.sum((1, 2))
        ratio = mass / (scale.float() ** 2 * images[ds.params["image"][i]].sum())
        assert float((ratio - 1).abs().max()) < 0.08, (ds.classes[label], ratio)
        cx = (x.sum(1) * grid).sum(1) / mass  # (T,) centre of ink
        cy = (x.sum(2) * grid).sum(1) / mass
        dx, dy, dscale, _ = MOTIONS[ds.classes[label]]
        if dx:
            assert np.sign(float(cx[-1] - cx[0])) == dx
        if dy:
            assert np.sign(float(cy[-1] - cy[0])) == dy
        if dscale:
            assert np.sign(float(mass[-1] - mass[0])) == dscale


def _pooled_features(ds):
    frames, lengths, labels = collate_videos([ds[i] for i in range(len(ds))])
    x = frames.flatten(2)  # (B, Tmax, D)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).to(x.dtype)  # (B, Tmax)
    avg = (x * mask[..., None]).sum(1) / lengths[:, None]
    mx = x.masked_fill(mask[..., None] == 0, -torch.inf).amax(1)
    t = torch.arange(x.shape[1], dtype=x.dtype)[None]
    w = (t - (lengths[:, None] - 1) / 2) * mask  # centred time: an order-aware linear pooling
    order = (x * w[..., None]).sum(1) / lengths[:, None] ** 2
    return {"avg": avg, "max": mx, "order": order}, labels


def test_order_blind_pooling_is_at_chance_within_each_pair():
    from sklearn.linear_model import LogisticRegression

    # translation and scale pairs; the rotation pairs are covered by the exact reversal test
    # (a linear probe on raw pixels is a weak detector of rotation direction).
    train = MovingDigits("train", num_videos=600, num_classes=6, size=16, seed=0)
    test = MovingDigits("test", num_videos=300, num_classes=6, size=16, seed=0)
    ftr, ytr = _pooled_features(train)
    fte, yte = _pooled_features(test)
    for a, b in train.reversal_pairs:
        itr = (ytr == a) | (ytr == b)
        ite = (yte == a) | (yte == b)
        acc = {}
        for name in ftr:
            clf = LogisticRegression(max_iter=2000).fit(ftr[name][itr].numpy(), ytr[itr].numpy())
            acc[name] = clf.score(fte[name][ite].numpy(), yte[ite].numpy())
        pair = (train.classes[a], train.classes[b])
        assert acc["avg"] < 0.65 and acc["max"] < 0.65, (pair, acc)  # 100 test videos: chance 0.5
        assert acc["order"] > 0.75 and acc["order"] > acc["avg"] + 0.2, (pair, acc)


def test_frame_digits():
    videos = MovingDigits("val", num_videos=10, num_classes=2, min_len=4, max_len=7, seed=2)
    every = FrameDigits(videos)
    assert len(every) == int(videos.lengths.sum()) and every.num_classes == 10
    frame, digit = every[0]
    assert torch.equal(frame, videos[0][0][0]) and digit == videos.digit_of(0)
    some = FrameDigits(videos, frames_per_video=5)
    assert len(some) == int(videos.lengths.clamp(max=5).sum())
    # last video: its frames are in `some`, in order, with its digit
    t_last = int(videos.lengths[-1])
    m = min(5, t_last)
    want_t = [(2 * j + 1) * t_last // (2 * m) for j in range(m)]
    for j, t in enumerate(want_t):
        frame, digit = some[len(some) - m + j]
        assert torch.equal(frame, videos[9][0][t]) and digit == videos.digit_of(9)
    with pytest.raises(TypeError, match="videos"):
        FrameDigits([1, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 3}, "num_classes"),
        ({"num_classes": 14}, "num_classes"),
        ({"min_len": 1}, "min_len"),
        ({"min_len": 9, "max_len": 8}, "max_len"),
        ({"noise": float("nan")}, "noise"),
        ({"size": 4}, "size"),
        ({"num_videos": 0}, "num_videos"),
    ],
)
def test_moving_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MovingDigits("train", **kwargs)
    with pytest.raises(ValueError, match="split"):
        MovingDigits("dev")


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def test_collate_pads_with_zeros_and_reports_lengths():
    ds = MovingDigits("test", num_videos=6, num_classes=2, min_len=3, max_len=9, size=16, seed=4)
    batch = [ds[i] for i in range(6)]
    frames, lengths, labels = collate_videos(batch)
    tmax = max(x.shape[0] for x, _ in batch)
    assert frames.shape == (6, tmax, 1, 16, 16) and lengths.dtype == torch.long
    assert lengths.tolist() == [x.shape[0] for x, _ in batch]
    assert labels.dtype == torch.long and labels.tolist() == [y for _, y in batch]
    for b, (x, _) in enumerate(batch):
        assert torch.equal(frames[b, : x.shape[0]], x)
        assert frames[b, x.shape[0] :].abs().sum() == 0
    packed = pack_padded(frames, lengths)
    assert packed.shape == (int(lengths.sum()), 1, 16, 16)
    assert torch.equal(pad_packed(packed, lengths), frames)


def test_collate_multilabel_and_errors():
    x = [torch.randn(3, 5), torch.randn(1, 5)]
    y = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])]
    frames, lengths, labels = collate_videos(list(zip(x, y)))
    assert frames.shape == (2, 3, 5) and lengths.tolist() == [3, 1]
    assert labels.dtype == torch.float32 and labels.shape == (2, 3)
    with pytest.raises(ValueError, match="empty"):
        collate_videos([])
    with pytest.raises(ValueError, match="item 1 has frame shape"):
        collate_videos([(torch.zeros(2, 5), 0), (torch.zeros(2, 4), 1)])
    with pytest.raises(ValueError, match="no frames"):
        collate_videos([(torch.zeros(0, 5), 0)])
    with pytest.raises(TypeError, match="label"):
        collate_videos([(torch.zeros(2, 5), 0), (torch.zeros(2, 5), y[0])])


def test_make_loader_seeded_shuffle():
    ds = FeatureDataset([torch.randn(t, 3) for t in range(1, 11)], list(range(10)))
    order = lambda seed: [y.tolist() for _, _, y in make_loader(ds, 4, True, seed)]  # noqa: E731
    assert order(0) == order(0) and order(0) != order(1)
    flat = sorted(v for batch in order(0) for v in batch)
    assert flat == list(range(10))
    frames, lengths, _ = next(iter(make_loader(ds, 3, shuffle=False, seed=0)))
    assert frames.shape == (3, 3, 3) and lengths.tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loader(ds, 2, True, 0, distributed=True)


def test_make_loader_uses_a_distributed_sampler_when_initialised(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialised")
    ds = FeatureDataset([torch.randn(2, 3) for _ in range(6)], [0, 1] * 3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = make_loader(ds, 2, True, 5)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        assert loader.sampler.seed == 5 and len(list(loader)) == 3
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# VideoFolder (files written with PyAV)
# ---------------------------------------------------------------------------------------------


def _write_video(path, num_frames, codec="mpeg4", size=(48, 64)):
    """Frame t is a flat grey level 20 t: the decoded level identifies the frame."""
    import av
    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(num_frames):
            img = np.full((h, w, 3), 20 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "jump").mkdir()
    (root / "walk").mkdir()
    _write_video(root / "jump" / "a.mp4", 12, "mpeg4")
    _write_video(root / "jump" / "b.avi", 7, "mpeg4")
    _write_video(root / "walk" / "c.mp4", 10, "libx264")
    (root / "walk" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "walk" / "notes.txt").write_text("not a video")
    return root


def test_video_folder_decodes_and_skips_a_corrupt_file(video_root):
    with pytest.warns(UnreadableVideoWarning, match="broken.mp4"):
        ds = VideoFolder(video_root, frame_size=(24, 32))
    assert ds.classes == ["jump", "walk"] and ds.num_classes == 2
    assert ds.skipped == 1 and ds.bad_paths == [str(video_root / "walk" / "broken.mp4")]
    assert len(ds) == 3
    lengths = []
    for i in range(len(ds)):
        frames, label = ds[i]
        assert frames.dtype == torch.float32 and frames.shape[1:] == (3, 24, 32)
        assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
        levels = frames.mean((1, 2, 3))
        assert bool((levels[1:] > levels[:-1]).all())  # frames come in temporal order
        lengths.append(frames.shape[0])
        assert label == (0 if i < 2 else 1)
    assert lengths == [12, 7, 10]
    batch = collate_videos([ds[i] for i in range(3)])
    assert batch[0].shape == (3, 12, 3, 24, 32) and batch[1].tolist() == [12, 7, 10]


def test_video_folder_samples_num_frames(video_root):
    with pytest.warns(UnreadableVideoWarning):
        full = VideoFolder(video_root, frame_size=(16, 16))
    with pytest.warns(UnreadableVideoWarning):
        uniform = VideoFolder(video_root, num_frames=4, frame_size=(16, 16))
    frames, _ = uniform[0]
    want = sample_frame_indices(12, 4, "uniform")
    assert want.tolist() == [1, 4, 7, 10]
    assert torch.allclose(frames, full[0][0][want])
    assert uniform[1][0].shape[0] == 4 and uniform[2][0].shape[0] == 4
    with pytest.warns(UnreadableVideoWarning):
        longer = VideoFolder(video_root, num_frames=50, frame_size=(16, 16))
    assert longer[1][0].shape[0] == 7  # never padded with repeated frames
    with pytest.warns(UnreadableVideoWarning):
        rand = VideoFolder(video_root, num_frames=5, sample="random", frame_size=(16, 16))
    torch.manual_seed(0)
    x, _ = rand[0]
    assert x.shape[0] == 5
    levels = x.mean((1, 2, 3))
    assert bool((levels[1:] > levels[:-1]).all())  # a sorted subset
    g = torch.Generator().manual_seed(1)
    idx = sample_frame_indices(20, 6, "random", g)
    assert idx.shape == (6,) and bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < 20


def test_video_folder_lazy_failure_names_the_file_and_is_never_replaced(video_root, tmp_path):
    root = tmp_path / "lazy"
    (root / "x").mkdir(parents=True)
    _write_video(root / "x" / "good.mp4", 5)
    (root / "x" / "a_bad.mp4").write_bytes(b"\x00" * 500)
    ds = VideoFolder(root, probe="none", frame_size=(8, 8))
    assert len(ds) == 2 and ds.skipped == 0
    for _ in range(2):  # the same error at every access; never the next item in its place
        with pytest.raises(vd.UnreadableItemError, match="a_bad.mp4") as info:
            ds[0]
        assert info.value.path == str(root / "x" / "a_bad.mp4")
    assert ds.skipped == 1 and len(ds) == 2
    frames, label = ds[1]
    assert frames.shape == (5, 3, 8, 8) and label == 0


def test_video_folder_subset_and_errors(video_root, tmp_path):
    ds = VideoFolder(video_root, subset=["jump/b.avi", "walk/c.mp4"], frame_size=(8, 8))
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.samples] == ["b.avi", "c.mp4"] and ds.skipped == 0
    with pytest.raises(ValueError, match="root"):
        VideoFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable video"):
        VideoFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="sample"):
        VideoFolder(video_root, sample="every")
    with pytest.raises(ValueError, match="num_frames"):
        VideoFolder(video_root, num_frames=0)
    with pytest.raises(ValueError, match="probe"):
        VideoFolder(video_root, probe="deep")
    with pytest.raises(ValueError, match="frame_size"):
        VideoFolder(video_root, frame_size=(0, 8))
    square = VideoFolder(video_root, subset=["jump/b.avi"], frame_size=10)  # an int S means (S, S)
    assert square[0][0].shape == (7, 3, 10, 10)


def test_split_files(tmp_path):
    (tmp_path / "trainlist01.txt").write_text("Jump/v_Jump_g01_c01.avi 1\nWalk/v_Walk_g02_c01.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("Jump/v_Jump_g09_c01.avi\n")
    assert vd.ucf101_files(tmp_path) == ["Jump/v_Jump_g01_c01.avi", "Walk/v_Walk_g02_c01.avi"]
    assert vd.ucf101_files(tmp_path, train=False) == ["Jump/v_Jump_g09_c01.avi"]
    (tmp_path / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    assert vd.hmdb51_files(tmp_path) == ["brush_hair/a.avi"]
    assert vd.hmdb51_files(tmp_path, train=False) == ["brush_hair/b.avi"]
    with pytest.raises(ValueError, match="fold"):
        vd.ucf101_files(tmp_path, fold=4)


@pytest.mark.parametrize("builder, name", [(vd.ucf101, "UCF101"), (vd.hmdb51, "HMDB51")])
def test_torchvision_wrappers_clear_error_without_torchcodec(builder, name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # import torchcodec -> ImportError
    with pytest.raises(RuntimeError, match="pip install torchcodec") as info:
        builder(tmp_path, tmp_path)
    message = str(info.value)
    assert "FFmpeg" in message and "VideoFolder" in message and name in message


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_feature_dataset_round_trip(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(t, 6, generator=g) for t in (3, 5, 2, 4)]
    labels = [2, 0, 2, 1]
    ds = FeatureDataset(feats, labels, classes=["walk", "run", "jump"])
    if suffix == ".pt":
        ds.save(tmp_path)
        back = FeatureDataset.from_dir(tmp_path)
        same = FeatureDataset(str(tmp_path))  # a directory path as the only argument
        assert same.classes == back.classes and torch.equal(same.labels, back.labels)
    else:  # flat directory with a labels file naming the classes
        lines = []
        for i, (x, y) in enumerate(zip(feats, labels)):
            np.save(tmp_path / f"v{i}.npy", x.numpy())
            lines.append(f"v{i}.npy,{ds.classes[y]}")
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        (tmp_path / "classes.txt").write_text("walk\nrun\njump\n")
        back = FeatureDataset.from_dir(tmp_path, labels_file=tmp_path / "labels.csv")
    assert back.classes == ds.classes and back.num_classes == 3 and len(back) == 4
    got = sorted((y, x.shape[0], x.sum().item()) for x, y in (back[i] for i in range(4)))
    want = sorted((y, x.shape[0], x.sum().item()) for x, y in zip(feats, labels))
    assert got == want
    assert back.feature_dim == 6
    frames, lengths, y = collate_videos([back[i] for i in range(4)])
    assert frames.shape == (4, 5, 6) and y.dtype == torch.long


def test_feature_dataset_errors_and_multilabel(tmp_path):
    with pytest.raises(ValueError, match="features\\[1\\]"):
        FeatureDataset([torch.zeros(2, 3), torch.zeros(3)], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        FeatureDataset([torch.zeros(2, 3)], [0, 1])
    with pytest.raises(ValueError, match="different dimensions"):
        FeatureDataset([torch.zeros(2, 3), torch.zeros(2, 4)], [0, 1])
    with pytest.raises(ValueError, match="classes"):
        FeatureDataset([torch.zeros(2, 3)], [3], classes=["a", "b"])
    ml = FeatureDataset([torch.zeros(2, 3), torch.ones(1, 3)], torch.tensor([[1, 0, 1], [0, 1, 0]]))
    x, y = ml[1]
    assert ml.multi_label and y.dtype == torch.float32 and y.tolist() == [0.0, 1.0, 0.0]
    assert collate_videos([ml[0], ml[1]])[2].shape == (2, 3)
    with pytest.raises(ValueError, match="multi-label"):
        ml.save(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no readable feature entries"), pytest.warns(UserWarning, match="bad.pt"):
        FeatureDataset([tmp_path / "bad.pt"], [0])


def test_extract_features_packs_valid_frames_in_one_call():
    videos = MovingDigits("train", num_videos=7, num_classes=2, min_len=3, max_len=8, size=16, seed=9)
    calls = []
    proj = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 5))
    proj.train()

    def backbone(x):  # (N, 1, 16, 16) -> (N, 5)
        calls.append(x.shape[0])
        assert x.ndim == 4
        return proj(x)

    feats = extract_features(backbone, videos, batch_size=3)
    lengths = videos.lengths.tolist()
    assert calls == [sum(lengths[0:3]), sum(lengths[3:6]), sum(lengths[6:7])]  # one call per batch
    assert len(feats) == 7 and feats.classes == videos.classes and feats.feature_dim == 5
    for i in range(7):
        x, y = feats[i]
        assert x.shape == (lengths[i], 5) and y == videos[i][1]
        assert torch.allclose(x, proj(videos[i][0]).detach(), atol=1e-6)
        assert not x.requires_grad
    # an nn.Module backbone runs in eval mode and gets its mode back
    drop = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(256, 4))
    drop.train()
    a = extract_features(drop, videos, batch_size=4)
    b = extract_features(drop, videos, batch_size=2)
    assert drop.training and torch.equal(a[3][0], b[3][0])
    with pytest.raises(ValueError, match="backbone"):
        extract_features(lambda x: x, videos)
