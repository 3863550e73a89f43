"""Unreadable videos and feature files are left out, never replaced by another item.

A folder of real encoded videos (h264 in .mp4, mjpeg in .avi, mpeg4 in .mkv; 64×48 and 80×60;
6–10 frames) holds, beside them, a text file, an empty file, an audio-only file and an MP4 cut
in half (all found by the probe at scan time), a zero-frame AVI and an MKV cut after its header
(both open fine and fail at their first decode). Every frame of good video ``v`` has the grey
level ``20 + 10 v``, so a model that records what it is fed can tell which video it saw.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from poolings.video.data import (
    CacheWriteWarning,
    FeatureDataset,
    UnreadableItemError,
    UnreadableVideoWarning,
    VideoFolder,
    describe,
    format_summary,
    make_loader,
)
from poolings.video.train import TrainConfig, build_model, train

av = pytest.importorskip("av")

CODECS = [("libx264", ".mp4", "yuv420p"), ("mjpeg", ".avi", "yuvj420p"), ("mpeg4", ".mkv", "yuv420p")]
GOOD_PER_CLASS = 4
CLASSES = ["jump", "run", "walk"]


def write_video(path, num_frames, level, codec="mpeg4", pix_fmt="yuv420p", size=(48, 64)):
    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if num_frames == 0:
            container.start_encoding()
        for _ in range(num_frames):
            img = np.full((h, w, 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def signature(frames: torch.Tensor) -> int:
    """Which good video ``frames`` (T, 3, H, W) come from."""
    return int(round((float(frames.mean()) * 255 - 20) / 10))


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("badvideos")
    v = 0
    for k, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(GOOD_PER_CLASS):
            codec, ext, fmt = CODECS[(k + j) % 3]
            write_video(root / name / f"v{v:02d}{ext}", 6 + (v % 5), 20 + 10 * v, codec, fmt,
                        size=(48, 64) if v % 2 else (60, 80))
            v += 1
    (root / "jump" / "notes.mp4").write_text("this is text, not a video\n" * 10)
    (root / "jump" / "empty.avi").write_bytes(b"")
    write_audio_only(root / "run" / "audio_only.mp4")
    write_video(root / "run" / "whole.mp4", 8, 200, "libx264")
    data = (root / "run" / "whole.mp4").read_bytes()
    (root / "run" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "run" / "whole.mp4").unlink()
    write_video(root / "walk" / "zero_frames.avi", 0, 0, "mjpeg", "yuvj420p")
    write_video(root / "walk" / "whole.mkv", 8, 200, "mpeg4")
    data = (root / "walk" / "whole.mkv").read_bytes()
    cluster = data.index(b"\x1f\x43\xb6\x75")  # the first Matroska cluster: the header ends before it
    (root / "walk" / "cut_after_header.mkv").write_bytes(data[: cluster + 12])
    (root / "walk" / "whole.mkv").unlink()
    return root


SCAN_BAD = {"notes.mp4", "empty.avi", "audio_only.mp4", "truncated.mp4"}
LAZY_BAD = {"zero_frames.avi", "cut_after_header.mkv"}
GOOD = set(range(len(CLASSES) * GOOD_PER_CLASS))


def test_the_probe_drops_what_it_can_see_and_first_reads_name_the_rest(bad_folder):
    with pytest.warns(UnreadableVideoWarning, match="4 of 18 files") as record:
        ds = VideoFolder(bad_folder, frame_size=16)
    assert len(record) == 1                               # one warning, listing the files
    assert {p.rsplit("/", 1)[-1] for p in ds.unreadable} == SCAN_BAD and ds.skipped == 4
    assert len(ds) == len(GOOD) + len(LAZY_BAD)
    seen = set()
    for i in range(len(ds)):
        name = ds.samples[i][0].rsplit("/", 1)[-1]
        if name in LAZY_BAD:
            with pytest.raises(UnreadableItemError, match=name):
                ds[i]
        else:
            frames, label = ds[i]
            assert frames.shape[1:] == (3, 16, 16) and CLASSES[label] == ds.samples[i][0].split("/")[-2]
            seen.add(signature(frames))
    assert seen == GOOD
    assert {p.rsplit("/", 1)[-1] for p in ds.unreadable} == SCAN_BAD | LAZY_BAD and len(ds) == 14


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_drops_bad_items_and_reports_them_from_workers(bad_folder, num_workers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        ds = VideoFolder(bad_folder, frame_size=16, num_frames=4)
    loader = make_loader(ds, batch_size=3, shuffle=True, seed=1, num_workers=num_workers)
    sigs = [signature(f[:n]) for frames, lengths, _ in loader for f, n in zip(frames, lengths)]
    assert sorted(sigs) == sorted(GOOD)                   # each good video once, nothing in place of a bad one
    assert {s.path.rsplit("/", 1)[-1] for s in loader.skipped} == LAZY_BAD
    excluded = {s.index for s in loader.skipped}
    again = make_loader(ds, batch_size=3, shuffle=True, seed=2, num_workers=num_workers, exclude=excluded)
    assert len(again.dataset) == len(GOOD) and sum(len(b[2]) for b in again) == len(GOOD) and not again.skipped


class Recorder(nn.Module):
    """The model of a run, recording which videos each training step and each evaluation sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, list[int]]] = []

    def forward(self, frames, lengths):
        self.seen.append((self.training, [signature(f[:n]) for f, n in zip(frames, lengths)]))
        return self.inner(frames, lengths)


def _config(folder, out, seed, **kw) -> TrainConfig:
    base = dict(data="folder", data_path=str(folder), num_frames=4, frame_size=16, feature_dim=4, pooling="avg",
                epochs=2, batch_size=3, lr=0.01, val_fraction=0.34, seed=seed, out=str(out), quiet=True,
                plot=False, tensorboard=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _run(folder, out, seed, num_workers=0):
    cfg = _config(folder, out, seed, num_workers=num_workers)
    torch.manual_seed(seed)
    model = Recorder(build_model(cfg, len(CLASSES), (3, 16, 16)))
    result = train(cfg, model=model)
    epochs_seen: list[tuple[list, list]] = []    # per epoch: (videos trained on, videos evaluated)
    previous = None
    for training, sigs in model.seen:             # each epoch: training steps, then one evaluation
        if training and previous is not True:
            epochs_seen.append(([], []))
        (epochs_seen[-1][0] if training else epochs_seen[-1][1]).extend(sigs)
        previous = training
    return result, epochs_seen, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_never_duplicates_a_video_nor_mixes_the_splits(bad_folder, tmp_path, seed):
    result, epochs, metrics = _run(bad_folder, tmp_path / "run", seed)
    assert len(epochs) == 2
    train_items, test_items = set(epochs[0][0]), set(epochs[0][1])
    for trained, evaluated in epochs:
        assert len(trained) == len(set(trained)), "a video was trained on twice in one epoch"
        assert len(evaluated) == len(set(evaluated)), "a video was evaluated twice"
        assert set(trained) == train_items and set(evaluated) == test_items    # the same split every epoch
    assert not train_items & test_items, "a video is in both the training and the test split"
    assert train_items | test_items == GOOD                                   # and every good video is used
    data = metrics["data"]
    assert data["skipped"] == 6 == len(result.unreadable)
    found = {r["path"].rsplit("/", 1)[-1]: r for r in data["unreadable"]}
    assert set(found) == SCAN_BAD | LAZY_BAD
    assert {n for n, r in found.items() if r["found"] == "scan"} == SCAN_BAD
    assert {n for n, r in found.items() if r["found"] == "epoch 1"} == LAZY_BAD  # found once, in the first epoch
    assert all(r["reason"] for r in found.values())
    h = metrics["history"]
    assert h[0]["unreadable_found"] == 2 and h[1]["unreadable_found"] == 0
    assert h[0]["train_items"] == h[1]["train_items"] == len(train_items)
    assert h[1]["test_items"] == len(test_items)


def test_bad_files_found_in_worker_processes_reach_the_run(bad_folder, tmp_path):
    result, epochs, metrics = _run(bad_folder, tmp_path / "run", seed=0, num_workers=2)
    for trained, evaluated in epochs:
        assert len(trained) == len(set(trained)) and not set(trained) & set(evaluated)
        assert set(trained) | set(evaluated) == GOOD
    found = {r["path"].rsplit("/", 1)[-1]: r["found"] for r in metrics["data"]["unreadable"]}
    assert {n for n, f in found.items() if f == "epoch 1"} == LAZY_BAD
    assert metrics["history"][1]["unreadable_found"] == 0     # excluded in the workers of epoch 2 as well


def test_resume_keeps_the_exclusions(bad_folder, tmp_path):
    train(_config(bad_folder, tmp_path / "run", 0, epochs=1))
    result = train(_config(bad_folder, tmp_path / "run", 0, epochs=2, resume=True))
    assert [e["unreadable_found"] for e in result.history] == [2, 0] and len(result.unreadable) == 6


def test_decoded_frame_cache_gives_the_same_frames(bad_folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        plain = VideoFolder(bad_folder, frame_size=16, num_frames=5)
        cached = VideoFolder(bad_folder, frame_size=16, num_frames=5, cache=tmp_path / "cache")
    good = [i for i, (p, _) in enumerate(plain.samples) if p.rsplit("/", 1)[-1] not in LAZY_BAD]
    for i in good:
        first = cached[i][0]                              # decodes and stores
        assert torch.equal(first, plain[i][0])
    entries = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(entries) == len(good)
    rgb = np.load(entries[0])
    assert rgb.dtype == np.uint8 and rgb.shape[1:] == (16, 16, 3)
    for i in good:                                        # read back without decoding
        assert torch.equal(cached[i][0], plain[i][0])
    with pytest.raises(NotADirectoryError, match="is a file"):
        VideoFolder(bad_folder, frame_size=16, cache=entries[0])


def test_start_of_run_summary(bad_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        ds = VideoFolder(bad_folder, frame_size=16)
    train_part = torch.utils.data.Subset(ds, [0, 1, 2, 5, 6, 9])
    test_part = torch.utils.data.Subset(ds, [3, 4])
    info = {"train": describe(train_part), "test": describe(test_part)}
    assert info["train"]["items"] == 6 and sum(info["train"]["per_class"].values()) == 6
    lines = format_summary(info, frame_shape=(3, 16, 16), source="folder")
    text = "\n".join(lines)
    assert "train 6 items, test 2 items, 3 classes; frames 3×16×16" in text
    assert "unreadable, left out: 4 files" in text and "notes.mp4" in text
    assert "frames per item" in text and not any(line.startswith("warning") for line in lines)
    one = torch.utils.data.Subset(ds, [0, 1])               # both from the first class
    lines = format_summary({"train": describe(one), "test": describe(test_part)})
    assert lines[-1].startswith("warning: the training split holds a single class (jump)")


# ------------------------------------------------------------------------------------ feature folders


def test_feature_folders_follow_the_same_policy(tmp_path):
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "feats"
    for k, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for j in range(4):
            drift = torch.linspace(-1, 1, 5)[:, None] * (1 if k else -1)
            torch.save(drift * torch.ones(1, 6) + 0.1 * torch.randn(5, 6, generator=g), root / name / f"g{j}.pt")
    np.save(root / "a" / "ok.npy", np.ones((4, 6), np.float32))
    (root / "a" / "empty.npy").write_bytes(b"")
    (root / "a" / "random.pt").write_bytes(np.random.default_rng(0).bytes(500))
    np.save(root / "b" / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(root / "b" / "wrong_p.npy", np.ones((4, 3), np.float32))
    bad = torch.ones(5, 6)
    bad[2, 1] = float("nan")
    torch.save(bad, root / "b" / "nan.pt")                 # passes the probe; found when read

    with pytest.warns(UserWarning, match="4 of 14 feature files") as record:
        ds = FeatureDataset(str(root))
    assert len(record) == 1 and len(ds) == 10 and ds.feature_dim == 6
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ds.unreadable.items()}
    assert set(reasons) == {"empty.npy", "random.pt", "pickled.npy", "wrong_p.npy"}
    assert "p = 3" in reasons["wrong_p.npy"] and "Python objects" in reasons["pickled.npy"]
    nan_index = next(i for i, p in enumerate(ds.items) if str(p).endswith("nan.pt"))
    with pytest.raises(UnreadableItemError, match="nan.pt: holds NaN"):
        ds[nan_index]

    cfg = TrainConfig(data="features", data_path=str(root), backbone="identity", pooling="avg", epochs=2,
                      batch_size=2, val_fraction=0.3, out=str(tmp_path / "run"), quiet=True, plot=False,
                      tensorboard=False, device="cpu")
    result = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["skipped"] == 5 and len(result.unreadable) == 5
    names = {r["path"].rsplit("/", 1)[-1] for r in metrics["data"]["unreadable"]}
    assert names == {"empty.npy", "random.pt", "pickled.npy", "wrong_p.npy", "nan.pt"}
    assert sum(e["train_items"] for e in result.history[:1]) + result.history[0]["test_items"] == 9


# ------------------------------------------------------------------------------------ reports and limits


def _split_folder(root, *, bad_train=0, bad_test=0, good=2):
    """``root/{train,test}/{a,b}``: ``good`` videos of 4–8 frames per class and split, plus zero-frame AVIs."""
    v = 0
    for split, bad in (("train", bad_train), ("test", bad_test)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for _ in range(good):
                write_video(root / split / name / f"v{v:02d}.mp4", 8, 20 + 10 * v, size=(32, 32))
                v += 1
        for j in range(bad):
            write_video(root / split / "ab"[j % 2] / f"zero{j}.avi", 0, 0, "mjpeg", "yuvj420p", size=(32, 32))
    return root


def test_eval_reports_a_file_found_at_first_read_once(tmp_path):
    from poolings.video.evaluate import evaluate_checkpoint
    from poolings.video.train import _split

    root = _split_folder(tmp_path / "data", bad_test=1)
    train(_config(root, tmp_path / "run", 0, epochs=1))
    found = [(r["path"].rsplit("/", 1)[-1], r["found"]) for r in
             json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["unreadable"]]
    assert found == [("zero0.avi", "epoch 1")]
    report = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", device="cpu")
    assert [(r["path"].rsplit("/", 1)[-1], r["found"]) for r in report["data"]["unreadable"]] == \
        [("zero0.avi", "first read")]
    assert report["data"]["skipped"] == 1 and "(1 unreadable left out)" in report["summary"]

    # one folder split at random: a bad item read for the training split is not in the test report
    flat = tmp_path / "flat"
    for name in ("a", "b"):
        (flat / name).mkdir(parents=True)
        for j in range(3):
            write_video(flat / name / f"v{j}.mp4", 6, 40 + 10 * j, size=(32, 32))
    write_video(flat / "a" / "0zero.avi", 0, 0, "mjpeg", "yuvj420p", size=(32, 32))   # item 0
    seed = next(s for s in range(50) if 0 in _split(list(range(7)), 0.34, s)[0].indices)
    train(_config(flat, tmp_path / "flat_run", seed, epochs=1))
    records = json.loads((tmp_path / "flat_run" / "metrics.json").read_text())["data"]["unreadable"]
    assert [(r["path"].rsplit("/", 1)[-1], r["split"], r["found"]) for r in records] == \
        [("0zero.avi", "train", "epoch 1")]                  # found once, not also as "scan"
    report = evaluate_checkpoint(tmp_path / "flat_run" / "checkpoint.pt", device="cpu")
    assert report["data"]["unreadable"] == [] and "unreadable" not in report["summary"]


def test_a_failed_cache_write_is_not_blamed_on_the_video(bad_folder, tmp_path, monkeypatch, capsys):
    from poolings.cli import main
    from poolings.video.data import FrameCache

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FrameCache, "store", disk_full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        ds = VideoFolder(bad_folder, frame_size=16, num_frames=4, cache=tmp_path / "cache")
    good = [i for i, (p, _) in enumerate(ds.samples) if p.rsplit("/", 1)[-1] not in LAZY_BAD]
    with pytest.warns(UserWarning) as record:
        seen = {signature(ds[i][0]) for i in good}
    assert seen == GOOD and set(ds.unreadable) == set(ds.left_out)       # no readable video dropped
    cache_warnings = [w for w in record if "--cache" in str(w.message)]
    assert len(cache_warnings) == 1 and "No space left on device" in str(cache_warnings[0].message)

    # DataLoader workers: one warning in the main process for the whole run, not one per worker and epoch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        ds = VideoFolder(bad_folder, frame_size=16, num_frames=4, cache=tmp_path / "cache2")
    ds.cache.root = tmp_path / "cache2" / "removed"              # every write now fails, in any process
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch in range(2):
            seen = set()
            for frames, lengths, _ in make_loader(ds, batch_size=2, shuffle=False, num_workers=2):
                seen |= {signature(f[:n]) for f, n in zip(frames, lengths)}
            assert seen == GOOD
    cache_warnings = [w for w in record if issubclass(w.category, CacheWriteWarning)]
    assert len(cache_warnings) == 1 and "removed" in str(cache_warnings[0].message)

    # a cache folder that cannot be used at all stops the command at once, naming --cache
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"an earlier run")
    rc = main(["train", "--data", "folder", str(bad_folder), "--cache", str(tmp_path / "a_file" / "sub"),
               "--frame-size", "16", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--cache" in err and "a_file" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"an earlier run"   # not cleared


def test_no_readable_training_item_names_the_files(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
    for j in range(6):
        write_video(root / "train" / "ab"[j % 2] / f"zero{j}.avi", 0, 0, "mjpeg", "yuvj420p", size=(32, 32))
    for j, name in enumerate("ab"):
        write_video(root / "test" / name / f"v{j}.mp4", 6, 50, size=(32, 32))
    with pytest.raises(ValueError) as info:
        train(_config(root, tmp_path / "run", 0, epochs=1))
    text = str(info.value)
    assert "none of the 6 items of the training split" in text and str(root / "train") in text
    assert text.count("zero") == 5 and "no decodable video frame" in text and "and 1 more" in text


def test_an_unreadable_test_split_is_refused_before_training(tmp_path):
    root = _split_folder(tmp_path / "data", good=0)
    for split, name in (("train", "a"), ("train", "b")):
        write_video(root / split / name / f"v_{name}.mp4", 6, 50, size=(32, 32))
    for j in range(2):
        write_video(root / "test" / "ab"[j] / f"zero{j}.avi", 0, 0, "mjpeg", "yuvj420p", size=(32, 32))
    with pytest.raises(ValueError) as info:
        train(_config(root, tmp_path / "run", 0, epochs=1))
    text = str(info.value)
    assert "test split" in text and "zero0.avi" in text and "zero1.avi" in text and "no decodable" in text
    assert not (tmp_path / "run" / "checkpoint.pt").exists()              # refused before training
    good = _split_folder(tmp_path / "good")
    train(_config(good, tmp_path / "old", 0, epochs=1))
    before = (tmp_path / "old" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="test split"):                   # --overwrite of an earlier run
        train(_config(root, tmp_path / "old", 0, epochs=1, overwrite=True))
    assert (tmp_path / "old" / "checkpoint.pt").read_bytes() == before    # is not cleared by a refused one

    # a test split that turns unreadable after the check: the trained epoch is saved all the same
    class Fading(torch.utils.data.Dataset):
        classes, num_classes = ["a", "b"], 2

        def __init__(self):
            self.reads = 0

        def __len__(self):
            return 2

        def __getitem__(self, i):
            self.reads += 1
            if self.reads > 1:
                raise UnreadableItemError(f"gone{i}.avi", "vanished")
            return torch.rand(3, 3, 16, 16), i

    class Steady(Fading):
        def __getitem__(self, i):
            return torch.rand(3, 3, 16, 16), i

    cfg = _config(root, tmp_path / "run2", 0, epochs=2)
    with pytest.raises(ValueError) as info:
        train(cfg, datasets=(Steady(), Fading()))
    text = str(info.value)
    assert "gone0.avi (vanished)" in text and "checkpoint.pt" in text and "--resume" in text
    saved = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1 and saved["unreadable_items"]["test"] == {}   # the files are read again

    # once the files are back, --resume evaluates the saved epoch first, then goes on
    result = train(dataclasses.replace(cfg, resume=True), datasets=(Steady(), Steady()))
    assert [e["epoch"] for e in result.history] == [1, 2]
    assert all("test_accuracy" in e and e["test_items"] == 2 and "evaluation_pending" not in e
               for e in result.history)

    # an item excluded in an earlier epoch is counted in the message too
    gone: set = set()        # item 0 vanishes once training starts, item 1 after the first epoch

    class Starting(Steady):
        def __getitem__(self, i):
            gone.add(0)
            return super().__getitem__(i)

    class Dwindling(Steady):
        def __getitem__(self, i):
            if i in gone:
                raise UnreadableItemError(f"gone{i}.avi", "vanished")
            return super().__getitem__(i)

    with pytest.raises(ValueError) as info:
        train(_config(root, tmp_path / "run4", 0, epochs=2), datasets=(Starting(), Dwindling()),
              on_epoch_end=lambda epoch, entry: gone.add(1))
    assert "none of the 2 items of the test split" in str(info.value)
    assert "gone1.avi (vanished); and 1 found unreadable in earlier epochs" in str(info.value)
    assert torch.load(tmp_path / "run4" / "checkpoint.pt", weights_only=False)["epoch"] == 2

    # stopped at the last epoch: --resume only evaluates it; the curves and the final figures are drawn
    class OneBad(Steady):
        def __getitem__(self, i):
            if i == 1:
                raise UnreadableItemError("bad1.avi", "cut")
            return super().__getitem__(i)

    cfg = _config(root, tmp_path / "run3", 0, epochs=1, plot=True)
    with pytest.raises(ValueError, match="vanished"):
        train(cfg, datasets=(OneBad(), Fading()))
    result = train(dataclasses.replace(cfg, resume=True), datasets=(OneBad(), Steady()))
    assert len(result.history) == 1 and set(result.final) >= {"loss", "accuracy", "items"}
    assert result.history[0]["unreadable_found"] == 1 and [r["path"] for r in result.unreadable] == ["bad1.avi"]
    assert (tmp_path / "run3" / "curves.png").is_file()
    metrics = json.loads((tmp_path / "run3" / "metrics.json").read_text())
    assert metrics["final"]["items"] == 2


def test_the_message_counts_files_left_out_at_scan_time():
    from poolings.video.train import _none_readable

    class Scanned(list):
        root, left_out = "/videos/test", {"x.avi": "not a video"}

    text = _none_readable(Scanned([0, 1]), "test", [("a.avi", "cut"), ("b.avi", "cut")])
    assert text.startswith("none of the 2 items of the test split (under /videos/test) can be read: a.avi (cut)")
    assert "1 more file was left out when the folder was scanned" in text
    Scanned.left_out = {"x.avi": "not a video", "y.avi": "empty"}
    text = _none_readable(torch.utils.data.Subset(Scanned([0, 1, 2]), [2]), "test", [("a", "r")])   # a split
    assert text.startswith("the only item of the test split (under /videos/test) cannot be read: a (r)")
    assert "2 more files were left out" in text


def test_the_summary_reports_the_frames_the_model_sees(bad_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableVideoWarning)
        ds = VideoFolder(bad_folder, frame_size=16, num_frames=4)
    known = [c for c in ds.frame_counts if c is not None]
    assert known and min(known) > 4                           # every file holds more than 4 frames
    info = describe(ds)
    assert info["lengths"]["max"] == 4 and info["lengths"]["min"] == 4
    text = "\n".join(format_summary({"train": info, "test": info}, frame_shape=(3, 16, 16)))
    assert "train 4–4" in text and f"{min(known)}–{max(known)} in the files" in text
