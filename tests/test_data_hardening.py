"""Data input that used to end in a traceback or a misleading message (issue 18, defects 19
and 20, the data items): a foreign or malformed data.index_cache, huge resolution / fps, a
symlink to / inside data.path, data.fps above a source's rate or far below it, torch's
"not writable" warning, a long experiment.name."""
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from data import source_index
from data.latent_cache import LatentCache, cache_key
from data.videos import DataWarning, VideoFolder, find_sources
from tests.conftest import smooth_frames, write_frame_folder
from utils.config import TrainRunConfig, load_config
from utils.errors import ConfigError, UserError
from utils.video_io import iter_frames, read_frames, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(path, **kw):
    from utils.config import DataConfig
    kw = {"num_frames": 4, "window_stride": 4, "resolution": 16, "val_fraction": 0.0,
          "index_workers": 1, **kw}
    return DataConfig(path=str(path), **kw)


def caught(fn):
    """(fn's result, the text of every warning it gave)."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, "\n".join(str(w.message) for w in got)


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(source_index, "_MEMO", {})


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "clips"
    write_video(str(folder / "a.mp4"), smooth_frames(16, 16, 16), fps=8)
    return folder


# --------------------------------------------------------------------------- data.index_cache


@pytest.mark.parametrize("content", [
    '{"sources": [1, 2, 3], "format": 1}',  # sources a list: AttributeError before
    '["a", "list"]',
    '{"experiment": "my own notes"}',
    "not json at all",
    "\x89PNG\r\n\x1a\n binary",
])
def test_a_foreign_index_cache_is_named_and_left_alone(clips, tmp_path, content):
    index = tmp_path / "mine.json"
    index.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError) as e:
        VideoFolder(cfg_for(clips, index_cache=str(index)))
    assert str(index) in str(e.value) and "not a data index written by this repo" in str(e.value)
    assert "data.index_cache" in str(e.value) and index.read_bytes() == content.encode("latin-1")  # not overwritten


def test_malformed_entries_of_an_index_are_probed_again(clips, tmp_path):
    index = tmp_path / "index.json"
    VideoFolder(cfg_for(clips, index_cache=str(index)))
    saved = json.loads(index.read_text())
    path = next(iter(saved["sources"]))
    for broken in (["x"], [1, 2, 3, 4, 5, 6, 7], "entry", [0, 0, 16.5, [], 8.0, None],
                   [0, 0, 16, [[1]], 8.0, None], [0, 0, 16, [], -1, None]):  # TypeError before
        saved["sources"][path] = broken
        index.write_text(json.dumps(saved))
        source_index._MEMO.clear()
        ds, text = caught(lambda: VideoFolder(cfg_for(clips, index_cache=str(index))))
        assert ds.sources[0][1] == 16 and "1 malformed entry" in text, broken
        assert json.loads(index.read_text())["sources"][path][2] == 16  # rewritten


def test_an_empty_index_file_is_a_new_index(clips, tmp_path):
    index = tmp_path / "index.json"
    index.write_text("")
    VideoFolder(cfg_for(clips, index_cache=str(index)))
    assert len(json.loads(index.read_text())["sources"]) == 1


# --------------------------------------------------------------------------- bounds at load


@pytest.mark.parametrize("override, words", [
    ("data.resolution=[65536,65536]", ["data.resolution", "height 65536", "8192"]),
    ("data.resolution=100000", ["data.resolution = 100000", "8192"]),
    ("data.fps=1e9", ["data.fps = 1e+09", "at most 1000"]),
    ("data.frame_folder_fps=1e7", ["data.frame_folder_fps", "at most 1000"]),
    ("experiment.name=" + "x" * 300, ["experiment.name is 300 bytes", "shorten experiment.name"]),
])
def test_values_that_would_exhaust_memory_are_refused_at_load(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, None, ["vae.path=x", override])
    for w in words:
        assert w in str(e.value)
    assert "runs_dir" not in str(e.value).split("(")[0]  # the name is blamed, not runs_dir


def test_a_long_experiment_name_exits_2_naming_it(tmp_path):
    r = subprocess.run([sys.executable, "train_advanced.py", "--config", "config_advanced.yaml",
                        "vae.path=x", f"experiment.runs_dir={tmp_path}", "experiment.name=" + "n" * 300],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "experiment.name is 300 bytes" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- symlinks


def test_a_symlink_to_the_root_is_not_walked(clips):
    os.symlink("/", clips / "everything")
    os.symlink("..", clips / "up")
    os.symlink(str(clips), clips / "self")
    os.symlink("/proc/self", clips / "proc")
    start = time.monotonic()
    links = []
    assert find_sources(str(clips), links) == ["a.mp4"]
    assert time.monotonic() - start < 5
    assert sorted(line.split(" ->")[0] for line in links) == ["everything", "proc", "self", "up"]
    ds, text = caught(lambda: VideoFolder(cfg_for(clips)))
    assert len(ds.sources) == 1 and "4 folder symlink(s) not followed" in text
    assert "everything -> /: a folder that contains the link itself" in text


def test_a_symlink_to_a_folder_elsewhere_is_followed(clips, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_video(str(elsewhere / "b.mp4"), smooth_frames(8, 16, 16), fps=8)
    os.symlink(str(elsewhere), clips / "more")
    assert find_sources(str(clips)) == ["a.mp4", "more/b.mp4"]


# --------------------------------------------------------------------------- frame rates


def test_data_fps_above_a_sources_rate_warns_naming_it(clips):
    write_video(str(clips / "fast.mp4"), smooth_frames(32, 16, 16), fps=30)
    ds, text = caught(lambda: VideoFolder(cfg_for(clips, fps=24)))
    assert "data.fps = 24 is above the frame rate of 1 source(s)" in text
    assert "a.mp4: 8 fps" in text and "fast.mp4" not in text
    _, text = caught(lambda: VideoFolder(cfg_for(clips, fps=8)))
    assert "above the frame rate" not in text


def test_a_tiny_data_fps_names_data_fps_in_its_advice(clips):
    with pytest.raises(UserError) as e:
        caught(lambda: VideoFolder(cfg_for(clips, fps=0.001)))
    text = str(e.value)
    assert "At data.fps = 0.001" in text and "raise data.fps (to at least 2" in text
    assert "a.mp4, 2 s" in text


def test_reads_give_writable_arrays_and_torch_never_warns(tmp_path):
    write_frame_folder(str(tmp_path / "clips" / "frames"), smooth_frames(8, 16, 16))
    write_video(str(tmp_path / "clips" / "b.mp4"), smooth_frames(8, 16, 16), fps=8)
    folder = str(tmp_path / "clips" / "frames")
    assert all(f.flags.writeable for _, f in iter_frames(folder, [0, 3]))
    assert read_frames(folder, [1]).flags.writeable
    cfg = cfg_for(tmp_path / "clips", frame_folder_fps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = VideoFolder(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The given NumPy array is not writable" would raise
        _ = [ds[i] for i in range(len(ds))]
        cache = LatentCache(ds, str(tmp_path / "cache"), cache_key(ds, "x"))
        encode = lambda p: (p[:, :2, :, ::4, ::4], p[:, :2, :, ::4, ::4].abs() + 0.1)  # noqa: E731
        cache.write_manifest(cache.build_part(encode, progress=False))
        assert torch.is_tensor(cache.load()[0]["mean"])
    assert np.asarray(ds[0]["video"]).shape == (3, 4, 16, 16)


# --------------------------------------------------------------------------- defect 11: the crop


@pytest.mark.parametrize("size, target, same", [((1080, 1920), (144, 256), True),
                                               ((64, 64), (32, 32), True),
                                               ((480, 640), (32, 32), False)])
def test_crop_then_resize_equals_resize_then_crop_only_at_the_same_aspect(size, target, same):
    """What the README and `transform` say: the pixels are those of 'resize to cover, then
    crop' only when no crop is needed; otherwise close (a few grey levels on smooth content)."""
    import math
    import torch.nn.functional as F
    from utils.config import DataConfig
    (h, w), (H, W) = size, target
    frames = smooth_frames(1, h, w)
    ds = VideoFolder.__new__(VideoFolder)
    ds.cfg = DataConfig(resolution=[H, W])
    ours = ((ds.transform(frames)[:, 0] + 1) * 127.5).round()  # (3, H, W)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    scale = max(H / h, W / w)
    ch, cw = max(H, math.ceil(h * scale - 1e-9)), max(W, math.ceil(w * scale - 1e-9))
    cover = F.interpolate(x, size=(ch, cw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (ch - H) // 2, (cw - W) // 2
    theirs = cover[0, :, top: top + H, left: left + W].float()
    diff = (ours - theirs).abs().max().item()
    assert (diff == 0) == same and diff <= 4
