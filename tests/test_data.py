import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from data import build_dataset
from data.loader import ResumableSampler, batches_per_epoch, make_loader, set_epoch
from data.videos import DataWarning, VideoFolder, window_span, windows_per_clip
from tests.conftest import frame_index, index_frames, smooth_frames, write_frame_folder
from utils.config import DataConfig
from utils.errors import MissingFileError, UserError
from utils.video_io import write_video


def cfg_for(path, **kw) -> DataConfig:
    kw = {"num_frames": 3, "frame_stride": 2, "window_stride": 3, "resolution": 16, **kw}
    return DataConfig(path=str(path), **kw)


def both_splits(cfg: DataConfig, seed: int = 0) -> list[VideoFolder]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return [VideoFolder(cfg, split, seed) for split in ("train", "val")]


def video_index(video: torch.Tensor) -> list[int]:
    """Source frame indices encoded in a (3, T, H, W) item in [-1, 1]."""
    return [frame_index(((video[:, t] + 1) * 127.5).numpy()) for t in range(video.shape[1])]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An mp4, a gif and a frame folder (unpadded numbers) of index clips: lengths 14, 11, 12."""
    root = tmp_path_factory.mktemp("mixed")
    write_video(str(root / "a.mp4"), index_frames(14), fps=8)
    write_video(str(root / "deep" / "b.GIF"), index_frames(11), fps=8)
    write_frame_folder(str(root / "c"), index_frames(12))
    return root


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("length, num_frames, frame_stride, window_stride, expected", [
    (16, 16, 1, 1, 1), (15, 16, 1, 1, 0), (20, 8, 1, 4, 4), (20, 8, 2, 1, 6),
    (20, 4, 3, 5, 3), (19, 4, 3, 5, 2), (10, 1, 1, 1, 10), (9, 3, 4, 2, 1), (0, 2, 1, 1, 0)])
def test_windows_per_clip(length, num_frames, frame_stride, window_stride, expected):
    assert windows_per_clip(length, num_frames, frame_stride, window_stride) == expected
    last_frames = [s + (num_frames - 1) * frame_stride for s in range(0, length, window_stride)]
    assert sum(f < length for f in last_frames) == expected  # by enumeration
    assert window_span(num_frames, frame_stride) == (num_frames - 1) * frame_stride + 1


def test_dataset_counts_windows_over_both_splits(tmp_path):
    for i, n in enumerate([5, 7, 10, 12]):  # span 5, window_stride 3 -> 1, 1, 2, 3 windows
        write_frame_folder(str(tmp_path / f"clip{i}"), index_frames(n, 4, 4))
    train, val = both_splits(cfg_for(tmp_path))
    assert len(train) + len(val) == 7
    assert sorted(train.sources + val.sources) == [(str(tmp_path / f"clip{i}"), n)
                                                   for i, n in enumerate([5, 7, 10, 12])]
    assert len(val.sources) == 1  # val_fraction 0.1 of 4 sources: at least one


def test_windows_keep_frame_order_for_mp4_gif_and_frame_folder(mixed):
    datasets = both_splits(cfg_for(mixed))
    lengths = {}
    for ds in datasets:
        for path, windows in ds.source_windows():
            lengths[os.path.basename(path)] = dict(ds.sources)[path]
            assert windows == [[s, s + 2, s + 4] for s in range(0, dict(ds.sources)[path] - 4, 3)]
        for i in range(len(ds)):
            src, frames = ds.window(i)
            assert video_index(ds[i]["video"]) == frames
    assert lengths == {"a.mp4": 14, "b.GIF": 11, "c": 12}
    assert sum(len(ds) for ds in datasets) == 4 + 3 + 3


def test_items_have_the_documented_shape_and_range(mixed):
    for ds in both_splits(cfg_for(mixed, num_frames=4, frame_stride=1, resolution=8)):
        item = ds[len(ds) - 1]
        assert item["video"].shape == (3, 4, 8, 8) and item["video"].dtype == torch.float32
        assert -1 <= item["video"].min() <= item["video"].max() <= 1
        assert item["label"] == 0 and ds.num_classes == 0 and ds.class_names == []


def test_frame_folder_with_gap_warns_and_loads_in_order(tmp_path):
    numbers = [0, 1, 2, 3, 6, 7, 8, 9]
    write_frame_folder(str(tmp_path / "gappy"), index_frames(8), numbers=numbers)
    with pytest.warns(DataWarning, match=r"gappy \(missing 4-5\)"):
        ds = VideoFolder(cfg_for(tmp_path, num_frames=8, frame_stride=1))
    assert ds.sources == [(str(tmp_path / "gappy"), 8)]
    assert video_index(ds[0]["video"]) == list(range(8))


def test_bad_files_are_skipped_with_one_warning(tmp_path):
    write_video(str(tmp_path / "good.mp4"), index_frames(12), fps=8)
    write_frame_folder(str(tmp_path / "good_frames"), index_frames(6))
    write_frame_folder(str(tmp_path), index_frames(1), pattern="thumb_{}.png")  # beside videos
    write_video(str(tmp_path / "short.mp4"), index_frames(4), fps=8)
    big = str(tmp_path / "big.mp4")
    write_video(big, smooth_frames(20, 64, 64), fps=8)
    with open(big, "rb") as f:
        data = f.read()
    (tmp_path / "corrupt.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is lost
    os.remove(big)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolder(cfg_for(tmp_path, val_fraction=0.0))
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)
                and "skipped" in str(w.message)]
    assert len(messages) == 1
    assert "skipped 4 of 6 sources" in messages[0]
    for name in ("corrupt.mp4", "empty.mp4", "text.mp4", "short.mp4: too short: 4 frames"):
        assert name in messages[0]
    assert sorted(r for r, _ in ds.skipped) == ["corrupt.mp4", "empty.mp4", "short.mp4", "text.mp4"]
    assert dict(ds.skipped)["empty.mp4"] == "empty file (0 bytes)"
    assert [os.path.basename(p) for p, _ in ds.sources] == ["good.mp4", "good_frames"]


def test_missing_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nowhere.*folder not found"):
        VideoFolder(cfg_for(tmp_path / "nowhere"))
    (tmp_path / "readme.txt").write_text("no videos here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match=r"no videos \(\.mp4 .*\.gif\).*\.png \.jpg \.jpeg"):
        VideoFolder(cfg_for(tmp_path))


def test_all_clips_too_short_says_what_to_change(tmp_path):
    for name, n in [("a", 3), ("b", 5)]:
        write_frame_folder(str(tmp_path / name), index_frames(n, 4, 4))
    with pytest.raises(UserError, match="longest has 5 frames.*spans 8.*data.num_frames"), \
            pytest.warns(DataWarning, match="skipped 2 of 2"):
        VideoFolder(cfg_for(tmp_path, num_frames=8, frame_stride=1))


def test_resize_and_center_crop_of_a_wide_source(tmp_path):
    frames = np.zeros((3, 24, 40, 3), np.uint8)  # h 24, w 40: the center square is x 8..31
    frames[..., 1] = 200
    frames[:, :, :8, 0], frames[:, :, 32:, 2] = 255, 255  # red left, blue right of it
    write_frame_folder(str(tmp_path / "wide"), frames)
    with pytest.warns(DataWarning, match="only one usable clip"):
        ds = VideoFolder(cfg_for(tmp_path, num_frames=3, frame_stride=1), split="val")
    video = ds[0]["video"]
    assert video.shape == (3, 3, 16, 16)
    assert torch.allclose(video[1], torch.tensor(200 / 127.5 - 1)) and video[[0, 2]].eq(-1).all()


def test_augmentation_is_per_seed_epoch_and_index_and_train_only(tmp_path):
    x = np.linspace(0, 255, 40).astype(np.uint8)  # a horizontal ramp: flips and crops show
    write_frame_folder(str(tmp_path / "ramp"), np.broadcast_to(x[None, None, :, None], (4, 24, 40, 3)))
    cfg = cfg_for(tmp_path, num_frames=4, frame_stride=1, random_crop=True, hflip=True)
    train, val = both_splits(cfg, seed=1)
    first = [train[0]["video"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    views = set()
    for epoch in range(8):
        train.set_epoch(epoch)
        v = train[0]["video"]
        assert torch.equal(v[:, 0], v[:, -1])  # one crop and flip for the whole window
        views.add(tuple(v[0, 0, 0].tolist()))
    assert len(views) > 2
    assert torch.equal(val[0]["video"], val[0]["video"])
    assert (val[0]["video"][0, 0, 0].diff() > 0).all()  # not flipped


def test_subfolder_labels(tmp_path):
    for rel in ["dog/x", "cat/y", "dog/z/w", "bird"]:
        write_frame_folder(str(tmp_path / rel), index_frames(5, 4, 4))
    datasets = both_splits(cfg_for(tmp_path, labels="subfolder"))
    assert all(ds.class_names == ["bird", "cat", "dog"] and ds.num_classes == 3 for ds in datasets)
    labels = {os.path.relpath(p, tmp_path): ds[i]["label"] for ds in datasets
              for i, (p, _) in enumerate(ds.sources)}  # one window per source here
    assert labels == {"bird": 0, "cat/y": 1, "dog/x": 2, "dog/z/w": 2}


def test_build_dataset_dispatches(tmp_path, monkeypatch):
    write_frame_folder(str(tmp_path / "a"), index_frames(5, 4, 4))
    write_frame_folder(str(tmp_path / "b"), index_frames(5, 4, 4))
    assert isinstance(build_dataset(cfg_for(tmp_path), "train", 0), VideoFolder)
    fake = types.ModuleType("data.builtin")
    fake.MovingShapes = lambda cfg, split, seed, rules=None: ("shapes", split, seed)
    monkeypatch.setitem(sys.modules, "data.builtin", fake)
    assert build_dataset(DataConfig(), "val", 3) == ("shapes", "val", 3)


# --------------------------------------------------------------------------- sampler, loader


def test_sampler_is_deterministic_and_changes_per_epoch():
    a, b = (ResumableSampler(50, shuffle=True, seed=7) for _ in range(2))
    assert list(a) == list(b) and sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(5, shuffle=False, seed=7)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last, per_rank", [(True, 3), (False, 4)])
def test_sampler_ranks_are_disjoint_and_cover(drop_last, per_rank):
    ranks = [list(ResumableSampler(10, shuffle=True, seed=3, rank=r, world_size=3,
                                   drop_last=drop_last)) for r in range(3)]
    assert [len(r) for r in ranks] == [per_rank] * 3
    flat = sum(ranks, [])
    if drop_last:
        assert len(set(flat)) == 9  # disjoint; one item dropped
    else:
        assert set(flat) == set(range(10)) and len(flat) == 12  # covering; 2 wrapped around


def test_sampler_set_start_yields_the_tail_and_resets_on_a_new_epoch():
    full = ResumableSampler(20, shuffle=True, seed=0, rank=1, world_size=2)
    full.set_epoch(4)
    order = list(full)
    resumed = ResumableSampler(20, shuffle=True, seed=0, rank=1, world_size=2)
    resumed.set_epoch(4)
    resumed.set_start(6)
    assert list(resumed) == order[6:] and len(resumed) == 4
    resumed.set_epoch(4)  # same epoch: still resuming
    assert len(resumed) == 4
    resumed.set_epoch(5)
    assert len(resumed) == 10 and sorted(resumed) == sorted(set(resumed))


def test_make_loader_batches_and_refuses_too_few_items(mixed):
    ds = both_splits(cfg_for(mixed))[0]
    loader = make_loader(ds, 2, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 3, 3, 16, 16) and batch["label"].shape == (2,)
    assert batches_per_epoch(loader) == len(ds) // 2
    with pytest.raises(UserError, match=f"has {len(ds)} items.*train.batch_size"):
        make_loader(ds, len(ds) + 1, shuffle=True, seed=0)


def test_workers_see_the_epoch_and_match_the_main_process(tmp_path):
    x = np.linspace(0, 255, 12).astype(np.uint8)
    for i in range(4):
        write_frame_folder(str(tmp_path / f"r{i}"), np.broadcast_to(x[None, None, :, None], (6, 8, 12, 3)))
    ds = both_splits(cfg_for(tmp_path, num_frames=2, frame_stride=1, window_stride=1,
                             resolution=8, random_crop=True, hflip=True))[0]
    loader = make_loader(ds, 4, shuffle=True, seed=0, num_workers=2)
    for epoch in (0, 3):
        set_epoch(loader, epoch)
        got = torch.cat([b["video"] for b in loader])
        order = loader.sampler.epoch_order()[: len(got)]
        assert torch.equal(got, torch.stack([ds[i]["video"] for i in order]))
