"""Captions (data/captions.py, data.captions / data.missing_caption): sidecar, csv, jsonl and json
files, every bad case named, the policy, UTF-8; the built-in clips' captions; and through the
entry script a bad caption file exits 2 before any clip is probed."""
import json
import os
import warnings

import numpy as np
import pytest

from data import build_dataset
from data.builtin import CAPTION_WORDS, MovingShapes
from data.captions import CaptionWarning, attach_captions
from data.videos import VideoFolder
from tests.conftest import smooth_frames, write_frame_folder
from utils.config import BuiltinDataConfig, DataConfig, TrainRunConfig, load_config
from utils.errors import ConfigError, MissingFileError, UserError
from utils.video_io import write_video

RELS = ["a.mp4", "sub/b.webm", "sub/frames"]  # two videos and a frame folder, as find_sources lists them


@pytest.fixture
def root(tmp_path):
    """A folder with RELS as placeholders (captions are matched by path; nothing is decoded)."""
    for rel in RELS[:2]:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    os.makedirs(tmp_path / RELS[2])
    return tmp_path


def _cfg(root, captions, policy="error", **kw) -> DataConfig:
    cfg = DataConfig(path=str(root), captions=captions, missing_caption=policy, **kw)
    cfg.validate()
    return cfg


def _write_table(path, rows, columns=("path", "text")):
    ext = os.path.splitext(str(path))[1]
    if ext == ".csv":
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(columns, r)), ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    else:
        path.write_text(json.dumps([dict(zip(columns, r)) for r in rows], ensure_ascii=False), encoding="utf-8")
    return str(path)


CAPTIONS = {"a.mp4": "a cat on a sofa", "sub/b.webm": "雪の中を走る犬 🐕", "sub/frames": "x" * 5000}


# --------------------------------------------------------------------------- formats


def test_null_keeps_everything_unchanged(root):
    assert attach_captions(_cfg(root, None), RELS) == (RELS, {})


def test_sidecar(root):
    (root / "a.txt").write_text("  a cat on a sofa\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text(CAPTIONS["sub/b.webm"], encoding="utf-8-sig")  # a BOM is dropped
    (root / "sub" / "frames.txt").write_text(CAPTIONS["sub/frames"], encoding="utf-8")
    assert attach_captions(_cfg(root, "sidecar"), RELS) == (RELS, CAPTIONS)


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".json"])
@pytest.mark.parametrize("columns", [("path", "text"), ("file_path", "caption"), ("video", "prompt")])
def test_metadata_files(root, ext, columns):
    rows = [(rel, CAPTIONS[rel]) for rel in RELS]
    rows[1] = ("./sub//b.webm", rows[1][1])  # written loosely: normalised
    path = _write_table(root / f"meta{ext}", rows, columns)
    assert attach_captions(_cfg(root, path), RELS) == (RELS, CAPTIONS)


def test_metadata_extra_columns_absolute_paths_and_name_inside_data_path(root, monkeypatch):
    rows = [(str(root / rel), CAPTIONS[rel], 17) for rel in RELS]
    _write_table(root / "meta.csv", rows, ("path", "text", "num_frames"))
    monkeypatch.chdir(root.parent)  # "meta.csv" is not in the working directory: found in data.path
    assert attach_captions(_cfg(root, "meta.csv"), RELS) == (RELS, CAPTIONS)


# --------------------------------------------------------------------------- bad cases


def _refused(root, captions, *words, policy="error", exc=UserError):
    with pytest.raises(exc) as e:
        attach_captions(_cfg(root, captions, policy), RELS)
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


def test_missing_caption_policy(root):
    (root / "a.txt").write_text("a cat", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("   \n", encoding="utf-8")  # empty once stripped
    msg = _refused(root, "sidecar", "2 of 3 clips have no caption or an empty one", "sub/b.webm: empty caption",
                   "sub/frames: no caption", str(root / "sub" / "b.txt"), "data.missing_caption: skip")
    assert "a.mp4" not in msg
    with pytest.warns(CaptionWarning, match="(?s)left out 2 of 3 clips.*sub/b.webm: empty caption"):
        assert attach_captions(_cfg(root, "sidecar", "skip"), RELS) == (["a.mp4"], {"a.mp4": "a cat"})
    assert attach_captions(_cfg(root, "sidecar", "empty"), RELS) == (
        RELS, {"a.mp4": "a cat", "sub/b.webm": "", "sub/frames": ""})
    (root / "a.txt").unlink()
    _refused(root, "sidecar", "none of the 3 clips has a caption", policy="skip")


def test_metadata_missing_rows_follow_the_policy(root):
    path = _write_table(root / "meta.jsonl", [("a.mp4", "a cat"), ("sub/frames", "")])
    _refused(root, path, "2 of 3 clips", "sub/b.webm: no caption", "sub/frames: empty caption", path)
    with pytest.warns(CaptionWarning):
        assert attach_captions(_cfg(root, path, "skip"), RELS)[0] == ["a.mp4"]


def test_row_naming_no_clip(root):
    path = _write_table(root / "meta.csv", [(r, "x") for r in RELS] + [("sub/c.mp4", "y"), ("a.txt", "z")],
                        (" path", "text "))  # header names as typed, spaces and all
    _refused(root, path, "2 row(s) name no clip found under data.path", "line 5: 'sub/c.mp4'", "line 6: 'a.txt'")
    path = _write_table(root / "meta.json", [(r, "x") for r in RELS] + [("../a.mp4", "y")])
    _refused(root, path, "item 3: '../a.mp4'")


def test_two_rows_for_one_clip(root):
    path = _write_table(root / "meta.jsonl", [(r, "x") for r in RELS] + [("./a.mp4", "again")])
    _refused(root, path, "line 1 and line 4 both caption a.mp4", "keep one row per clip")


@pytest.mark.parametrize("columns, words", [
    (("path", "text", "caption"), ["2 caption columns (text and caption)", "ambiguous"]),
    (("video", "file_path", "text"), ["2 clip path columns (file_path and video)", "ambiguous"]),
    (("clip", "text"), ["no clip path column", "path, file_path, video", "found: clip, text"]),
    (("path", "description"), ["no caption column", "text, caption, prompt", "found: path, description"]),
])
def test_columns(root, columns, words):
    path = _write_table(root / "meta.csv", [tuple([RELS[0]] * len(columns))], columns)
    _refused(root, path, path, *words)


def test_unparseable_files(root):
    def bad(name, text, *words, mode="w"):
        p = root / name
        (p.write_bytes if mode == "wb" else p.write_text)(text)
        return _refused(root, str(p), str(p), *words)

    bad("a.json", '[{"path": "a.mp4", "text": "x"', "not valid JSON")
    bad("b.json", '{"path": "a.mp4"}', "the top level is a dict", "list of objects")
    bad("c.json", '[["a.mp4", "x"]]', "item 0: a list, not an object")
    bad("d.jsonl", '{"path": "a.mp4", "text": "x"}\n{"path": "sub/b.webm", \n', "line 2: not valid JSON")
    bad("e.jsonl", '"a.mp4"\n', "line 1: a str, not a JSON object")
    bad("f.csv", "", "the file is empty", "header row")
    bad("g.csv", "path,text\na.mp4,x,y\n", "line 2: more fields than the header", "quote captions")
    bad("h.csv", "path,text\na.mp4\n", "line 2: fewer fields than the header")
    bad("i.csv", b"path,text\na.mp4,caf\xe9\n", "not UTF-8", mode="wb")
    bad("j.json", "[]", "has no rows")
    bad("k.json", '[{"path": "a.mp4", "text": 42}]', "item 0", "column 'text' is 42 (int), not text")
    bad("l.json", '[{"path": "", "text": "x"}]', "item 0: no clip path in column 'path'")
    _refused(root, str(root / "nope.csv"), "nope.csv: file not found", exc=MissingFileError)
    (root / "sub" / "b.txt").write_bytes(b"\xff\xfe bad")
    _refused(root, "sidecar", str(root / "sub" / "b.txt"), "is not UTF-8 text")


def test_config_is_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="data.captions = 'meta.txt': use null .* sidecar .*.csv, .jsonl, .json"):
        DataConfig(path=str(tmp_path), captions="meta.txt").validate()
    with pytest.raises(ConfigError, match="data.builtin.captions: true"):
        DataConfig(captions="sidecar").validate()
    with pytest.raises(ConfigError, match="data.missing_caption = 'drop'"):
        load_config(TrainRunConfig, None, ["vae.path=x", "data.missing_caption=drop"])
    with pytest.raises(ConfigError, match="text_encoder.max_length = 0"):
        load_config(TrainRunConfig, None, ["vae.path=x", "text_encoder.max_length=0"])
    cfg = load_config(TrainRunConfig, None, ["vae.path=x", "text_encoder.path=enc", "data.builtin.captions=true"])
    assert cfg.text_encoder.path == "enc" and cfg.text_encoder.max_length is None and cfg.data.builtin.captions
    assert TrainRunConfig().text_encoder.path is None  # default: no text encoder


# --------------------------------------------------------------------------- datasets


def test_video_folder_items_carry_captions(tmp_path):
    """A real folder: captions reach the items of both splits, per source, via a csv."""
    root = tmp_path / "clips"
    write_frame_folder(str(root / "f1"), smooth_frames(6, 16, 16))
    write_frame_folder(str(root / "f2"), smooth_frames(6, 16, 16))
    write_video(str(root / "v.mp4"), smooth_frames(6, 16, 16), fps=8)
    path = _write_table(tmp_path / "meta.csv", [("f1", "first"), ("f2", "second"), ("v.mp4", "third")])
    cfg = _cfg(root, path, num_frames=4, resolution=16, val_fraction=0.0, window_stride=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # val reuses train: said by a DataWarning
        ds = build_dataset(cfg, "train", 0, index_file=str(tmp_path / "index.json"))
    assert isinstance(ds, VideoFolder) and ds.has_captions
    by_source = {os.path.basename(p): c for (p, _), c in zip(ds.sources, ds.captions)}
    assert by_source == {"f1": "first", "f2": "second", "v.mp4": "third"}
    assert ds.distinct_captions() == ["first", "second", "third"]
    for i in range(len(ds)):
        src = ds.window(i)[0]
        assert ds[i]["caption"] == ds.caption(i) == by_source[os.path.basename(ds.sources[src][0])]
    plain = VideoFolder(_cfg(root, None, num_frames=4, resolution=16, val_fraction=0.0),
                        index_file=str(tmp_path / "index.json"))
    assert "caption" not in plain[0] and not plain.has_captions and plain.distinct_captions() == []


def test_bad_caption_file_exits_2_before_probing(tmp_path, capsys, monkeypatch):
    """Through train_advanced: the message names the file and row, exit 2, no clip probed."""
    import train_advanced
    from tests.test_stage2 import ROOT, TINY
    from utils.cli import run_main
    root = tmp_path / "clips"
    write_frame_folder(str(root / "f1"), smooth_frames(6, 16, 16))
    path = _write_table(tmp_path / "meta.csv", [("f1", "first"), ("f9", "nothing")])
    probed = []
    monkeypatch.setattr("data.videos.index_sources", lambda *a, **k: probed.append(a) or [])
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY,
            f"vae.path={os.path.join(ROOT, 'tests', 'fixtures', 'vae')}", f"data.path={root}",
            f"data.captions={path}", f"experiment.runs_dir={tmp_path / 'runs'}", "experiment.name=run",
            "model.conditioning=text", "model.class_conditional=null",  # captions are read by text models
            f"text_encoder.path={tmp_path / 'encoder'}"]  # the captions are refused before it is loaded
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: train_advanced.main(args))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"data.captions = {path}" in err and "line 3: 'f9'" in err and "Traceback" not in err
    assert probed == []


def test_builtin_captions_describe_each_window():
    cfg = DataConfig(builtin=BuiltinDataConfig(captions=True, num_clips=12, labels="shape_colour"))
    ds = MovingShapes(cfg)
    for i in range(len(ds)):
        text = ds.caption(i)
        clip, frames = ds.window(i)
        scene = ds.scene(clip)
        colour, kind = ds.class_names[scene["label"]].split()
        assert text.startswith(f"a {colour} {kind} moving ") and text.endswith(" background"), text
        assert set(text.split()) <= set(CAPTION_WORDS)
        dx, dy = (ds.render_positions(scene, frames[-1]) - ds.render_positions(scene, frames[0]))[0]
        expected = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("up" if dy < 0 else "down")
        assert f" moving {expected} on " in text
    assert ds[0]["caption"] == ds.caption(0)
    assert len(ds.distinct_captions()) == len(set(ds.distinct_captions())) > 5
    assert "caption" not in MovingShapes(DataConfig(builtin=BuiltinDataConfig(num_clips=2)))[0]


def test_builtin_caption_direction_matches_the_pixels():
    """The direction a caption names is where the shape's centre of mass goes on screen."""
    cfg = DataConfig(resolution=32, num_frames=4, window_stride=4,
                     builtin=BuiltinDataConfig(captions=True, num_clips=16, clip_frames=8, min_speed=0.05))
    ds = MovingShapes(cfg)
    checked = 0
    for i in range(len(ds)):
        clip, frames = ds.window(i)
        scene = ds.scene(clip)
        video = ds[i]["video"].numpy()  # (3, T, H, W)
        background = scene["background"][0] * 2 - 1  # (3,)
        cover = np.abs(video - background[:, None, None, None]).sum(0) > 0.3  # (T, H, W) shape pixels
        ys, xs = np.mgrid[0:32, 0:32]
        centre = [(xs[c].mean(), ys[c].mean()) for c in cover[[0, -1]]]
        dx, dy = np.subtract(centre[1], centre[0])
        if max(abs(dx), abs(dy)) < 1.5 or abs(abs(dx) - abs(dy)) < 1.0:
            continue  # too little motion, or diagonal: no clear answer from pixels
        word = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("up" if dy < 0 else "down")
        assert f"moving {word} " in ds.caption(i), (i, ds.caption(i), dx, dy)
        checked += 1
    assert checked >= 8


def test_builtin_several_shapes_and_gradients():
    cfg = DataConfig(builtin=BuiltinDataConfig(captions=True, num_clips=4, num_shapes=2, background="gradient"))
    text = MovingShapes(cfg).caption(0)
    assert text.count(" moving ") == 2 and " and a " in text and text.endswith(" gradient background")


def test_cached_latent_windows_carry_captions(tmp_path):
    """With the latent cache on, items are served from latents and still carry their window's caption."""
    import torch
    from data.latent_cache import LatentCache
    ds = MovingShapes(DataConfig(num_frames=4, resolution=16,
                                 builtin=BuiltinDataConfig(captions=True, num_clips=3, clip_frames=8)))

    def encode(pixels):  # (B, 3, T, H, W) -> mean, std (B, 1, T, 2, 2): the cache's contract
        b, _, t = pixels.shape[:3]
        return torch.zeros(b, 1, t, 2, 2), torch.ones(b, 1, t, 2, 2)
    cache = LatentCache(ds, str(tmp_path), {"k": 1})
    cache.write_manifest(cache.build_part(encode, progress=False))
    windows = cache.load()
    assert [windows[i]["caption"] for i in range(len(ds))] == [ds.caption(i) for i in range(len(ds))]
    plain = MovingShapes(DataConfig(num_frames=4, resolution=16,
                                    builtin=BuiltinDataConfig(num_clips=3, clip_frames=8)))
    cache = LatentCache(plain, str(tmp_path / "plain"), {"k": 1})
    cache.write_manifest(cache.build_part(encode, progress=False))
    assert "caption" not in cache.load()[0]


def test_prompts_file(tmp_path):
    from data.captions import read_prompts_file
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa red square moving left\n\n  雪の中を走る犬 \r\na blue circle\n", encoding="utf-8")
    assert read_prompts_file(str(path)) == ["a red square moving left", "雪の中を走る犬", "a blue circle"]
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match=f"prompts_file = {path}: has no prompts"):
        read_prompts_file(str(path))
    path.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        read_prompts_file(str(path))
    with pytest.raises(MissingFileError, match="validation.prompts_file = .*nope.txt: file not found"):
        read_prompts_file(str(tmp_path / "nope.txt"), key="validation.prompts_file")
