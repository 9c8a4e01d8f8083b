"""Real footage (issue 11): seeking reads, frame rates by timestamp, the saved parallel index,
and the file kinds phones and cameras produce. Every file is generated here with PyAV, tiny."""
import json
import os
import re
import shutil
import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import utils.video_io as video_io
from data import source_index
from data.videos import DataWarning, VideoFolder, resample_indices
from tests.conftest import smooth_frames, write_frame_folder
from tests.test_stage2 import _predict, _train, random_vae  # noqa: F401 (a fixture)
from utils.checkpoint import load_checkpoint
from utils.config import DataConfig, TrainRunConfig, load_config
from utils.errors import ConfigError
from utils.video_io import iter_frames, probe_video, read_frames, write_video


def write_av(path, frames, fps=30, codec="libx264rgb", pix_fmt="rgb24", times=None, gop=None,
             rotation=None, in_format="rgb24", options=None):
    """(T, H, W, 3) uint8 frames (or (T, H, W) for gray) with PyAV; libx264rgb crf 0 is
    lossless. `times`: seconds per frame (variable frame rate); `gop`: keyframe interval."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec.startswith("libx264"):
            stream.options = {"crf": "0", "preset": "ultrafast"}
        if options:
            stream.options = options
        if gop:
            stream.codec_context.gop_size = gop
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format=in_format)
            if times is not None:
                frame.time_base, frame.pts = Fraction(1, 1000), round(times[i] * 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def numbered(n: int, h: int = 8, w: int = 8) -> np.ndarray:
    """(n, h, w, 3) uint8: frame i holds i in its red (i % 256) and green (i // 256) channels,
    exact through a lossless codec."""
    i = np.arange(n)
    rgb = np.stack([i % 256, i // 256, np.zeros_like(i)], -1).astype(np.uint8)  # (n, 3)
    return np.broadcast_to(rgb[:, None, None, :], (n, h, w, 3)).copy()


def number_of(frame: np.ndarray) -> int:
    return int(frame[..., 0].mean().round()) + 256 * int(frame[..., 1].mean().round())


def motion(times, h=16, w=32) -> np.ndarray:
    """A bar moving right at 40 px per second, drawn at each time (s): (T, h, w, 3) uint8."""
    frames = np.zeros((len(times), h, w, 3), np.uint8)
    for k, t in enumerate(times):
        x = int(round(t * 40)) % w
        frames[k, :, x: x + 3] = (250, 200, 100)
    return frames


def folder_cfg(path, **kw) -> DataConfig:
    kw = {"num_frames": 4, "frame_stride": 1, "window_stride": 4, "resolution": 16,
          "val_fraction": 0.0, "index_workers": 1, **kw}
    return DataConfig(path=str(path), **kw)


def quiet_folder(cfg, **kw) -> VideoFolder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return VideoFolder(cfg, **kw)


def skip_warning(cfg, **kw) -> tuple[VideoFolder, str]:
    """The dataset and the text of its one "skipped" warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolder(cfg, **kw)
    texts = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(texts) == 1, texts
    return ds, texts[0]


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    """Each test probes its own files (the process-wide index memo would hide re-probing)."""
    monkeypatch.setattr(source_index, "_MEMO", {})
    monkeypatch.setattr(video_io, "_TIMELINE_MEMO", {})


# --------------------------------------------------------------------------- seeking


def test_a_late_window_decodes_from_the_keyframe_before_it(tmp_path, monkeypatch):
    path = str(tmp_path / "long.mp4")
    write_av(path, numbered(300), gop=30)
    decoded = []
    real = video_io._decode

    def counting(container, p):
        for frame in real(container, p):
            decoded.append(frame.pts)
            yield frame
    monkeypatch.setattr(video_io, "_decode", counting)
    got = read_frames(path, [287, 280, 281, 287])
    assert [number_of(f) for f in got] == [287, 280, 281, 287]
    assert len(decoded) <= 30 + 8  # from keyframe 270, not from frame 0
    decoded.clear()
    assert [number_of(f) for f in read_frames(path, [3, 5])] == [3, 5]
    assert len(decoded) <= 6


@pytest.mark.parametrize("ext", [".mkv", ".webm"])
def test_seeking_reads_exact_frames_in_other_containers(tmp_path, ext):
    path = str(tmp_path / f"long{ext}")
    if ext == ".webm":
        write_av(path, numbered(120), codec="libvpx-vp9", pix_fmt="gbrp", gop=25,
                 options={"lossless": "1", "deadline": "realtime", "cpu-used": "8"})
    else:
        write_av(path, numbered(120), gop=25)
    assert probe_video(path).frames == 120
    for start in (0, 49, 50, 51, 110):
        got = [number_of(f) for _, f in iter_frames(path, range(start, start + 10, 3))]
        assert got == list(range(start, start + 10, 3))


def test_latent_cache_reader_decodes_each_source_once(tmp_path, monkeypatch):
    write_av(tmp_path / "a.mp4", numbered(40), gop=10)
    ds = quiet_folder(folder_cfg(tmp_path))
    opened = []
    real = video_io._open_video
    monkeypatch.setattr(video_io, "_open_video", lambda p: opened.append(p) or real(p))
    frames = dict(ds.iter_source_frames(0, list(range(40))))
    assert len(opened) == 1 and sorted(frames) == list(range(40))
    direct = ds.source_frames(0, [0, 17, 39])  # (3, 3, R, R)
    for k, i in enumerate([0, 17, 39]):
        assert torch.equal(frames[i], direct[:, k])


# --------------------------------------------------------------------------- frame rate


def test_30_and_60_fps_of_the_same_motion_give_the_same_frames_at_fps_15(tmp_path):
    for fps in (30, 60):
        write_av(tmp_path / f"fps{fps}" / "clip.mp4", motion(np.arange(2 * fps) / fps), fps=fps)
    sets = [quiet_folder(folder_cfg(tmp_path / f"fps{fps}", fps=15)) for fps in (30, 60)]
    assert [ds.sources[0][1] for ds in sets] == [30, 30]  # 2 s at 15 fps
    assert len(sets[0]) == len(sets[1]) == 7
    for i in range(len(sets[0])):
        assert torch.equal(sets[0][i]["video"], sets[1][i]["video"])
    # and they are the motion at 15 fps
    expected = quiet_folder(folder_cfg(tmp_path / "fps30"))  # every frame: 30 fps
    assert torch.equal(sets[0][1]["video"], expected.source_frames(0, [8, 10, 12, 14]))
    assert sets[0].frame_rate == 15 and expected.frame_rate == 30


def test_variable_frame_rate_uses_timestamps(tmp_path):
    times = [0.0, 0.1, 0.15, 0.4, 0.5, 0.55, 0.6, 0.9]
    write_av(tmp_path / "vfr.mkv", numbered(8), times=times)
    info = probe_video(str(tmp_path / "vfr.mkv"))
    assert info.frames == 8 and info.times == pytest.approx(times)
    write_av(tmp_path / "even.mkv", numbered(8), fps=30)  # 33 and 34 ms steps: mkv counts in ms
    assert probe_video(str(tmp_path / "even.mkv"))[:3] == (8, 30.0, None)
    os.remove(tmp_path / "even.mkv")
    ds = quiet_folder(folder_cfg(tmp_path, fps=10, num_frames=2, window_stride=1))
    # on screen at 0, .1, ..., .9 s: frames 0 1 2 2 3 4 6 6 6 7 (the clip ends 0.9 + 1/rate)
    assert ds.source_indices(0, list(range(10))) == [0, 1, 2, 2, 3, 4, 6, 6, 6, 7]
    assert [number_of(f) for f in read_frames(ds.sources[0][0], ds.source_indices(0, [2, 3]))] == [2, 2]


def test_resample_indices_for_even_rates():
    assert resample_indices(8, 24.0, None, 12) == [0, 2, 4, 6]
    assert resample_indices(4, 10.0, None, 20) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resample_indices(25, 25.0, None, 10) == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]


def test_frame_folders_take_frame_folder_fps(tmp_path):
    write_frame_folder(str(tmp_path / "frames"), numbered(12))
    ds = quiet_folder(folder_cfg(tmp_path, fps=15, frame_folder_fps=30, num_frames=3))
    assert ds.sources[0][1] == 6 and ds.source_indices(0, [0, 1, 5]) == [0, 2, 10]
    write_av(tmp_path / "clip.mp4", numbered(12), fps=15)
    ds, text = skip_warning(folder_cfg(tmp_path, fps=15, num_frames=3))
    assert "frames: a frame folder has no frame rate: set data.frame_folder_fps" in text
    assert [os.path.basename(p) for p, _ in ds.sources] == ["clip.mp4"]


@pytest.mark.parametrize("overrides, message", [
    (["data.fps=0"], "data.fps = 0.0: must be > 0"),
    (["data.frame_folder_fps=-24"], "data.frame_folder_fps = -24.0: must be > 0"),
    (["data.index_workers=0"], "data.index_workers = 0: must be >= 1 or null"),
    (["data.fps=15"], "data.fps = 15.0: the built-in clips have no timestamps")])
def test_bad_frame_rate_and_index_keys_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainRunConfig, None, ["vae.path=x", *overrides])


def test_fps_is_recorded_written_and_part_of_the_cache_key(tmp_path, random_vae, capsys):  # noqa: F811
    for fps in (30, 60):
        write_av(tmp_path / "clips" / f"c{fps}.mp4", motion(np.arange(fps) / fps), fps=fps)
    data = [f"data.path={tmp_path / 'clips'}", "data.val_fraction=0.0", "data.cache=auto",
            "data.index_workers=1"]
    run = _train(tmp_path, random_vae, "run", data + ["data.fps=8", "train.max_steps=1"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    assert ckpt["fps"] == 8 and os.path.isfile(os.path.join(run, "data_index.json"))
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "out")) == 0
    with av.open(str(tmp_path / "out" / "sample_000.mp4")) as c:
        assert c.streams.video[0].average_rate == 8
    shutil.copytree(os.path.join(run, "latent_cache"), tmp_path / "other" / "latent_cache")
    capsys.readouterr()
    _train(tmp_path, random_vae, "other", data + ["data.fps=4", "train.max_steps=1"])
    assert "(data setting 'fps' changed)" in capsys.readouterr().out


# --------------------------------------------------------------------------- the index


def test_index_is_saved_and_reused_and_a_changed_file_is_probed_again(tmp_path, monkeypatch):
    clips, index = tmp_path / "clips", str(tmp_path / "shared" / "index.json")
    for i in range(3):
        write_video(str(clips / f"c{i}.mp4"), smooth_frames(8 + i, 16, 16), fps=8)
    first = quiet_folder(folder_cfg(clips, index_cache=index))
    saved = json.load(open(index))["sources"]
    assert sorted(os.path.basename(p) for p in saved) == ["c0.mp4", "c1.mp4", "c2.mp4"]

    probed = []
    real = source_index.probe_source
    monkeypatch.setattr(source_index, "probe_source", lambda p: probed.append(p) or real(p))
    monkeypatch.setattr(source_index, "_MEMO", {})  # a new process: only the file knows
    again = quiet_folder(folder_cfg(clips, index_cache=index))
    assert probed == [] and again.sources == first.sources

    write_video(str(clips / "c1.mp4"), smooth_frames(12, 16, 16), fps=8)  # size and mtime change
    monkeypatch.setattr(source_index, "_MEMO", {})
    changed = quiet_folder(folder_cfg(clips, index_cache=index))
    assert [os.path.basename(p) for p in probed] == ["c1.mp4"]
    assert dict(changed.sources)[str(clips / "c1.mp4")] == 12


def test_index_probes_in_worker_processes_like_in_one(tmp_path, monkeypatch):
    for i in range(6):
        write_video(str(tmp_path / f"c{i}.mp4"), smooth_frames(6 + i, 16, 16), fps=8)
    (tmp_path / "broken.mp4").write_text("not a video")
    monkeypatch.setattr(source_index, "PARALLEL_MIN_SOURCES", 2)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    parallel = source_index.index_sources(paths, workers=2)
    monkeypatch.setattr(source_index, "_MEMO", {})
    serial = source_index.index_sources(paths, workers=1)
    assert parallel == serial
    assert [i.frames for i in serial][1:] == [6, 7, 8, 9, 10, 11]
    assert "not a readable video" in serial[0].frames


def test_a_damaged_index_file_is_rebuilt(tmp_path):
    write_video(str(tmp_path / "clips" / "c.mp4"), smooth_frames(8, 16, 16), fps=8)
    index = tmp_path / "index.json"
    index.write_text('{"format": 1, "sources": {')  # a crash mid-write
    ds = quiet_folder(folder_cfg(tmp_path / "clips", index_cache=str(index)))
    assert ds.sources[0][1] == 8 and json.loads(index.read_text())["format"] == source_index.INDEX_FORMAT


# --------------------------------------------------------------------------- real-world files


def test_rotated_phone_video_is_shown_upright(tmp_path):
    frames = np.zeros((4, 16, 32, 3), np.uint8)  # landscape as stored, red top row
    frames[:, 0] = (255, 0, 0)
    write_av(tmp_path / "phone.mp4", frames, rotation=90)
    got = read_frames(str(tmp_path / "phone.mp4"), [0])[0]
    assert got.shape == (32, 16, 3)  # portrait, as the phone showed it
    assert got[:, 0, 0].min() > 200 and got[:, -1, 0].max() < 50  # a 90 degree CCW turn: red left


@pytest.mark.parametrize("name, pix_fmt, codec", [
    ("ten_bit.mkv", "yuv420p10le", "ffv1"), ("full_chroma.mp4", "yuv444p", "libx264"),
    ("odd_size.mkv", "yuv444p", "ffv1")])
def test_pixel_formats_and_odd_sizes_read(tmp_path, name, pix_fmt, codec):
    h, w = (15, 23) if "odd" in name else (16, 24)
    frames = smooth_frames(6, h, w)
    write_av(tmp_path / name, frames, codec=codec, pix_fmt=pix_fmt)
    ds = quiet_folder(folder_cfg(tmp_path, num_frames=3, window_stride=3))
    assert len(ds) == 2 and ds[1]["video"].shape == (3, 3, 16, 16)
    got = read_frames(str(tmp_path / name), range(6))
    assert got.shape == (6, h, w, 3) and np.abs(got.astype(int) - frames).mean() < 3


def test_grayscale_video_reads_as_gray_rgb(tmp_path):
    gray = smooth_frames(5, 16, 16)[..., 0]  # (T, H, W)
    write_av(tmp_path / "gray.mkv", gray, codec="ffv1", pix_fmt="gray", in_format="gray")
    got = read_frames(str(tmp_path / "gray.mkv"), range(5))
    assert got.shape == (5, 16, 16, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0].astype(int) - gray).max() <= 1


def test_unusable_files_are_skipped_with_their_reasons_in_one_warning(tmp_path):
    write_av(tmp_path / "good.mp4", numbered(12))
    with av.open(str(tmp_path / "voice_memo.mp4"), "w") as c:  # audio only
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode())
    write_av(tmp_path / "whole.mkv", smooth_frames(40, 32, 32), codec="ffv1", pix_fmt="yuv444p")
    data = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "broken_tail.mkv").write_bytes(data[: int(len(data) * 0.6)])
    os.remove(tmp_path / "whole.mkv")
    (tmp_path / "notes.txt").write_text("shot list")  # not a video: never a source
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "fake.mov").write_text("not a video either")
    ds, text = skip_warning(folder_cfg(tmp_path))
    assert "voice_memo.mp4: has no video stream" in text and "fake.mov: not a readable video" in text
    names = [os.path.basename(p) for p, _ in ds.sources]
    assert "notes.txt" not in text and "meta.json" not in text and "good.mp4" in names
    # the broken tail: the frames before the break are used, the last one reads
    n = dict(ds.sources)[str(tmp_path / "broken_tail.mkv")]
    assert 4 < n < 40 and "broken_tail" not in text
    assert read_frames(str(tmp_path / "broken_tail.mkv"), [n - 1]).shape == (1, 32, 32, 3)
    for i in range(len(ds)):  # every indexed window reads
        assert ds[i]["video"].shape == (3, 4, 16, 16)
