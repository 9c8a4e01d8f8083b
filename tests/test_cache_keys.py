"""The latent cache's key holds everything that decides what is cached (issue 18, defect 7),
and a source that cannot be decoded while building is skipped, not the end of the build
(defect 20)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from data import build_dataset
from data.latent_cache import CacheCorruptError, LatentCache, cache_key
from data.videos import DataWarning, VideoFolder
from tests.conftest import smooth_frames, write_frame_folder
from utils.config import DataConfig
from utils.video_io import write_video


def causal_encode(pixels):
    """(B, 3, T, H, W) -> moments (B, 2, 1 + (T - 1) // 4, H / 4, W / 4), like a causal video
    VAE: latent frame 0 sees frame 0, latent frame k the 4 frames before it."""
    x = torch.nn.functional.avg_pool3d(pixels[:, :2], (1, 4, 4))  # (B, 2, T, h, w)
    first, rest = x[:, :, :1], x[:, :, 1:]
    rest = rest.unflatten(2, (-1, 4)).mean(3)  # (B, 2, (T - 1) // 4, h, w)
    mean = torch.cat([first, rest], dim=2)
    return mean, mean.abs() + 0.1


def frame_encode(pixels):
    """An image VAE: each frame on its own, (B, 3, T, H, W) -> (B, 2, T, H / 4, W / 4)."""
    mean = torch.nn.functional.avg_pool3d(pixels[:, :2], (1, 4, 4))
    return mean, mean.abs() + 0.1


def builtin(window_stride: int, num_frames: int = 5, frame_stride: int = 1):
    cfg = DataConfig(num_frames=num_frames, resolution=16, window_stride=window_stride,
                     frame_stride=frame_stride)
    cfg.builtin.num_clips, cfg.builtin.clip_frames = 2, 13
    return build_dataset(cfg, "train", 0)


def per_window(dataset, folder):
    return LatentCache(dataset, str(folder), cache_key(dataset, "vae-x", {"layout": "window"}),
                       per_window=True)


def built(dataset, folder):
    cache = per_window(dataset, folder)
    cache.write_manifest(cache.build_part(causal_encode, progress=False))
    return cache


@pytest.mark.parametrize("change, word", [({"window_stride": 2}, "window_stride"),
                                          ({"frame_stride": 2}, "frame_stride"),
                                          ({"num_frames": 9}, "num_frames")])
def test_a_per_window_cache_of_other_windows_is_rebuilt_not_served(tmp_path, change, word):
    """Resumed with another window geometry, the cache said 'usable' and CachedWindows raised
    KeyError((source, frames)) inside a DataLoader worker."""
    built(builtin(4), tmp_path / "cache")
    other = builtin(**{"window_stride": 4, **change})
    usable, why = per_window(other, tmp_path / "cache").status()
    assert not usable and f"data setting '{word}' changed" in why
    rebuilt = built(other, tmp_path / "cache").load()
    for i in range(len(other)):  # every window is served, each its own encoding
        direct, _ = causal_encode(other[i]["video"][None])
        torch.testing.assert_close(rebuilt[i]["mean"], direct[0])


def test_cached_windows_that_are_not_the_datasets_are_refused_at_load(tmp_path):
    """A manifest whose key matches but whose windows do not (an older cache without the
    window key): `load` says so, so the cache is rebuilt instead of a KeyError in a worker."""
    built(builtin(4), tmp_path / "cache")
    other = builtin(2)
    cache = per_window(other, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["key"] = cache.key  # as if the key had not held the windows
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    assert cache.status() == (True, "")
    with pytest.raises(CacheCorruptError, match="cached windows of source 0 are not the dataset's"):
        cache.load()


def test_the_frame_layout_does_not_depend_on_the_windows(tmp_path):
    """Per frame, every frame is cached and windows are slices: another stride reuses it."""
    a, b = builtin(4), builtin(2)
    first = LatentCache(a, str(tmp_path / "c"), cache_key(a, "vae-x"))
    first.write_manifest(first.build_part(frame_encode, progress=False))
    again = LatentCache(b, str(tmp_path / "c"), cache_key(b, "vae-x"))
    assert again.status() == (True, "") and len(again.load()) == len(b)


@pytest.mark.parametrize("layout", ["frame", "window"])
def test_a_frame_folder_of_mixed_sizes_is_skipped_not_the_end_of_the_build(tmp_path, layout):
    clips = tmp_path / "clips"
    write_video(str(clips / "good.mp4"), smooth_frames(12, 16, 16), fps=8)
    frames = smooth_frames(12, 16, 16)
    write_frame_folder(str(clips / "mixed"), frames)
    from PIL import Image
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(str(clips / "mixed" / "frame_7.png"))
    cfg = DataConfig(path=str(clips), num_frames=5, resolution=16, window_stride=4,
                     val_fraction=0.0, index_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = VideoFolder(cfg)
    assert sorted(os.path.basename(p) for p, _ in ds.sources) == ["good.mp4", "mixed"]
    cache = LatentCache(ds, str(tmp_path / "cache"), cache_key(ds, "vae-x"), per_window=layout == "window")
    encode = causal_encode if layout == "window" else frame_encode
    with pytest.warns(DataWarning, match=r"source 1: .*mixed: frames differ in size"):
        cache.write_manifest(cache.build_part(encode, progress=False))
    with pytest.warns(DataWarning, match="could not be read in the latent cache"):
        cached = cache.load()
    good = [i for i in range(len(ds)) if ds.window(i)[0] == 0]
    for i in range(len(ds)):  # the mixed folder's windows are served by good.mp4's first one
        item = cached[i]
        want = cached[i] if i in good else cached[good[0]]
        assert item["label"] == 0 and torch.equal(item["mean"], want["mean"])


def test_stage2_with_a_causal_vae_resumed_with_another_window_stride(vae_families, tmp_path):
    """The reported run: a causal video VAE (per-window cache), resumed with another
    data.window_stride, DataLoader workers on. It rebuilt nothing and raised KeyError."""
    from tests.test_vae_families import _train
    run = _train(tmp_path, vae_families["wan"], "run", "wan", ["data.builtin.clip_frames=13"])
    _train(tmp_path, vae_families["wan"], "run", "wan",
           ["data.builtin.clip_frames=13", "data.window_stride=2", "data.num_workers=1",
            "train.max_steps=3", "train.resume=auto"])
    log = open(os.path.join(run, "log.txt")).read()
    assert "data setting 'window_stride' changed" in log
    manifest = json.loads(open(os.path.join(run, "latent_cache", "manifest.json")).read())
    assert manifest["key"]["window_stride"] == 2 and manifest["layout"] == "window"
