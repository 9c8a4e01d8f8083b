"""Frame rates from timestamps (issue 18, defect 5) and probing that is deterministic,
versioned and never aborts indexing (defect 6, and defect 20's stale index entry, with the latent
cache on too: issue 27, item 9)."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

import utils.video_io as video_io
from data import source_index
from data.videos import DataWarning, VideoFolder
from tests.conftest import smooth_frames
from utils.video_io import gif_bytes, probe_video, read_frames


def pillow_gif(path, n: int, durations) -> None:
    """n frames, frame i filled with grey level 15 * i; `durations`: ms per frame (pillow
    stores them in 1/100 s ticks)."""
    frames = [Image.fromarray(np.full((16, 16, 3), 15 * i, np.uint8)) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   optimize=False)


def grey_of(frame) -> int:
    return int(round(frame.mean() / 15))


def folder_cfg(path, **kw):
    from utils.config import DataConfig
    kw = {"num_frames": 16, "window_stride": 16, "resolution": 16, "val_fraction": 0.0,
          "index_workers": 1, **kw}
    return DataConfig(path=str(path), **kw)


def quiet(cfg, **kw) -> VideoFolder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return VideoFolder(cfg, **kw)


@pytest.fixture(autouse=True)
def fresh_memo(monkeypatch):
    monkeypatch.setattr(source_index, "_MEMO", {})
    monkeypatch.setattr(video_io, "_TIMELINE_MEMO", {})


# --------------------------------------------------------------------------- defect 5


def test_gif_alternating_130_120_ms_is_8_fps(tmp_path):
    """13 and 12 ticks alternate: 8 fps on average, and on a grid. FFmpeg's own rate for this
    file is 25/3 (8.33 fps), which the old tolerance (two 1/100 s ticks per frame) accepted."""
    path = str(tmp_path / "alt.gif")
    pillow_gif(path, 16, [130, 120] * 8)
    info = probe_video(path)
    assert info.frames == 16 and info.rate == 8.0 and info.times is None


@pytest.mark.parametrize("fps", [8, 24, 30, 12, 7])
def test_gifs_written_by_this_repo_read_at_their_rate(tmp_path, fps):
    """The GIF muxer rounds each frame's time to 1/100 s: 24 fps is stored as 4 and 5 ticks."""
    path = tmp_path / "clip.gif"
    path.write_bytes(gif_bytes(smooth_frames(16, 16, 16), fps))
    assert probe_video(str(path)).rate == fps


def test_exactly_even_ticks_are_taken_literally(tmp_path):
    """pillow stores 125 ms as 12 ticks: such a GIF does play at 8.33 fps."""
    path = str(tmp_path / "even.gif")
    pillow_gif(path, 16, 125)
    assert probe_video(path).rate == pytest.approx(100 / 12)


@pytest.mark.parametrize("fps, expected", [
    (8, list(range(16))),  # its own rate: every frame once
    (30, [int(k * 8 / 30 + 1e-3 * 8 / 30) for k in range(60)])])  # each frame 3 or 4 times, none lost
def test_data_fps_keeps_every_frame_of_a_gif(tmp_path, fps, expected):
    pillow_gif(str(tmp_path / "alt.gif"), 16, [130, 120] * 8)
    ds = quiet(folder_cfg(tmp_path, fps=fps, num_frames=16 if fps == 8 else 60, window_stride=1))
    assert ds.sources[0][1] == len(expected)  # 2 s of video
    assert ds.source_indices(0, list(range(len(expected)))) == expected
    assert sorted(set(expected)) == list(range(16))
    got = read_frames(ds.sources[0][0], ds.source_indices(0, list(range(len(expected)))))
    assert [grey_of(f) for f in got] == expected


def test_probing_reads_no_stream_after_its_file_is_closed(tmp_path, monkeypatch):
    """The root of defect 6: the rate was computed from the PyAV stream after `with av.open()`
    had closed its file (the stream then answers None or another number: a TypeError once in
    ~60 probes, another rate once in ~150). What is needed is copied out while the file is
    open; the rate computation never sees a stream."""
    path = str(tmp_path / "alt.gif")
    pillow_gif(path, 16, [130, 120] * 8)
    seen = []
    real = video_io._info
    monkeypatch.setattr(video_io, "_info", lambda facts, n, pts: seen.append(type(facts)) or real(facts, n, pts))
    answers = {probe_video(path) for _ in range(30)}
    assert answers == {video_io.VideoInfo(16, 8.0, None, (16, 16))}
    assert set(seen) == {video_io._StreamFacts}


# --------------------------------------------------------------------------- defect 6


def test_a_probe_that_raises_any_exception_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    for i in range(3):
        pillow_gif(str(tmp_path / f"c{i}.gif"), 16, 125)
    real = source_index.probe_video

    def flaky(path):
        if path.endswith("c1.gif"):
            raise TypeError("float() argument must be a string or a real number, not 'NoneType'")
        return real(path)
    monkeypatch.setattr(source_index, "probe_video", flaky)
    index = tmp_path / "index.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = VideoFolder(folder_cfg(tmp_path, index_cache=str(index)))
    assert sorted(os.path.basename(p) for p, _ in ds.sources) == ["c0.gif", "c2.gif"]
    text = "\n".join(str(w.message) for w in caught)
    assert "c1.gif: probing failed (TypeError: float() argument" in text
    # not saved: the next run probes it again (and finds it good)
    saved = json.loads(index.read_text())["sources"]
    assert sorted(os.path.basename(p) for p in saved) == ["c0.gif", "c2.gif"]
    monkeypatch.setattr(source_index, "probe_video", real)
    monkeypatch.setattr(source_index, "_MEMO", {})
    again = quiet(folder_cfg(tmp_path, index_cache=str(index)))
    assert len(again.sources) == 3


def test_a_probe_raising_in_a_worker_process_does_not_stop_indexing(tmp_path, monkeypatch):
    for i in range(4):
        pillow_gif(str(tmp_path / f"c{i}.gif"), 4, 125)
    monkeypatch.setattr(source_index, "PARALLEL_MIN_SOURCES", 2)
    monkeypatch.setattr(source_index, "probe_video", lambda p: 1 / 0 if p.endswith("c2.gif") else probe_video(p))
    infos = source_index.index_sources(sorted(str(p) for p in tmp_path.iterdir()), workers=2)
    assert [i.frames for i in infos][:2] == [4, 4] and infos[3].frames == 4
    assert infos[2].frames.startswith("probing failed (ZeroDivisionError") and infos[2].transient


def test_an_index_written_under_other_probing_rules_is_probed_again(tmp_path, monkeypatch):
    pillow_gif(str(tmp_path / "alt.gif"), 16, [130, 120] * 8)
    index = tmp_path / "index.json"
    quiet(folder_cfg(tmp_path, index_cache=str(index)))
    saved = json.loads(index.read_text())
    assert saved["probe_rules"] == source_index.probe_rules()
    # what the old rules saved for this file: 8.33 fps, kept for good
    (entry,) = saved["sources"].values()
    entry[4] = 25 / 3
    del saved["probe_rules"]  # an index written before the rules were recorded
    index.write_text(json.dumps(saved))
    monkeypatch.setattr(source_index, "_MEMO", {})
    with pytest.warns(DataWarning, match="other probing rules"):
        ds = VideoFolder(folder_cfg(tmp_path, index_cache=str(index), fps=8))
    assert ds.sources[0][1] == 16
    assert list(json.loads(index.read_text())["sources"].values())[0][4] == 8.0


def test_probe_rules_follow_the_code_not_its_comments(monkeypatch):
    before = source_index.probe_rules()
    source_index.probe_rules.cache_clear()
    assert source_index.probe_rules() == before  # deterministic

    def _grid_rate(facts, ticks):
        """A changed docstring alone."""
        return None
    monkeypatch.setattr(video_io, "PROBE_FUNCTIONS", video_io.PROBE_FUNCTIONS + (_grid_rate,))
    source_index.probe_rules.cache_clear()
    try:
        assert source_index.probe_rules() != before  # new code: new rules
    finally:
        source_index.probe_rules.cache_clear()


# --------------------------------------------------------------------------- defect 20: stale entry


def test_a_stale_index_entry_is_probed_again_before_the_file_is_blamed(tmp_path, monkeypatch):
    """A shared index says 40 frames for a file of 16 (its size and mtime unchanged): the first
    short read probes it again, corrects the entry, and the file keeps serving its windows."""
    clips = tmp_path / "clips"
    clips.mkdir()
    pillow_gif(str(clips / "a.gif"), 16, 125)
    pillow_gif(str(clips / "b.gif"), 16, 125)
    index = tmp_path / "index.json"
    quiet(folder_cfg(clips, index_cache=str(index), num_frames=8, window_stride=8))
    saved = json.loads(index.read_text())
    stale = str(clips / "a.gif")
    saved["sources"][stale][2] = 40
    index.write_text(json.dumps(saved))
    monkeypatch.setattr(source_index, "_MEMO", {})
    ds = quiet(folder_cfg(clips, index_cache=str(index), num_frames=8, window_stride=8))
    assert [n for _, n in ds.sources] == [40, 16] and len(ds) == 5 + 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        late = ds[4]  # frames 32-39 of a.gif: past its end
    text = "\n".join(str(w.message) for w in caught)
    assert "stale entry" in text and "40 frames; the file has 16" in text
    assert "could not be read" not in text  # the file is not blamed
    assert late["video"].shape == (3, 8, 16, 16)
    first = ds[0]  # a.gif still serves the windows it has
    assert grey_of(((first["video"][:, 0] + 1) * 127.5).numpy()) == 0
    assert json.loads(index.read_text())["sources"][stale][2] == 16


@pytest.mark.parametrize("layout", ["frame", "window"])
def test_a_stale_index_entry_with_the_latent_cache_on_keeps_the_clip(tmp_path, monkeypatch, layout):
    """issue 27, item 9: the same stale entry (40 frames for a file of 16) with the latent
    cache on. Building the cache read past the end, skipped the good clip, blamed the file
    and left the index as it was. Now the entry is corrected as with the cache off, the clip's
    frames (windows) are cached and serve its windows, and the windows past its end are served
    by the other clip; the next run (the corrected index) uses the cache as it is."""
    import torch

    from data.latent_cache import LatentCache
    from tests.test_cache_keys import causal_encode, frame_encode
    clips = tmp_path / "clips"
    clips.mkdir()
    pillow_gif(str(clips / "a.gif"), 17, 125)
    pillow_gif(str(clips / "b.gif"), 17, 125)
    index = tmp_path / "index.json"
    cfg = folder_cfg(clips, index_cache=str(index), num_frames=9, window_stride=8)
    quiet(cfg)
    saved = json.loads(index.read_text())
    stale = str(clips / "a.gif")
    saved["sources"][stale][2] = 41
    index.write_text(json.dumps(saved))
    monkeypatch.setattr(source_index, "_MEMO", {})
    ds = quiet(cfg)
    assert [n for _, n in ds.sources] == [41, 17] and len(ds) == 5 + 2
    encode = causal_encode if layout == "window" else frame_encode
    cache = LatentCache(ds, str(tmp_path / "cache"), {"k": 1}, per_window=layout == "window")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.write_manifest(cache.build_part(encode, progress=False))
        cached = cache.load()
    text = "\n".join(str(w.message) for w in caught)
    assert "stale entry" in text and "41 frames; the file has 17" in text
    assert "could not be read" not in text and "skipped" not in text  # the file is not blamed
    corrected = index.read_text()
    assert json.loads(corrected)["sources"][stale][2] == 17
    for i in range(len(ds)):
        src, frames = ds.window(i)
        item = cached[i]  # every window is served
        if src == 0 and frames[-1] < 17:  # a.gif's own windows: its own latents
            direct, _ = encode(ds.source_frames(0, frames)[None])
            torch.testing.assert_close(item["mean"], direct[0])
        elif src == 0:  # past its end: the other clip's first window
            torch.testing.assert_close(item["mean"], cached[5]["mean"])
    index.write_text(json.dumps(saved))  # another process (a DDP rank) still holding the stale entry
    monkeypatch.setattr(source_index, "_MEMO", {})
    other = quiet(cfg)
    with pytest.warns(DataWarning, match="ended before their data index entry said"):
        served = LatentCache(other, str(tmp_path / "cache"), {"k": 1}, per_window=layout == "window").load()
    assert [served[i]["mean"].shape for i in range(len(other))] == [cached[i]["mean"].shape for i in range(len(ds))]
    torch.testing.assert_close(served[4]["mean"], cached[5]["mean"])  # a.gif past its end: b.gif's first
    index.write_text(corrected)
    monkeypatch.setattr(source_index, "_MEMO", {})
    again = quiet(cfg)  # the next run reads the corrected index
    assert [n for _, n in again.sources] == [17, 17]
    if layout == "frame":  # the frames cached are the file's: the cache serves as it is
        reloaded = LatentCache(again, str(tmp_path / "cache"), {"k": 1}).load()
        torch.testing.assert_close(reloaded[1]["mean"], cached[1]["mean"])
