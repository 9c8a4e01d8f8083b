"""The built-in moving-shapes dataset: determinism, held-out split, labels, windows, ranges."""
import dataclasses
import os
import re

import numpy as np
import pytest
import torch

from data.builtin import CLASS_NAMES, MovingShapes, _bounce, _coverage, windows_per_clip
from utils.config import BuiltinDataConfig, DataConfig
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(**builtin) -> DataConfig:
    b = dict(num_clips=6, num_val_clips=3)
    b.update(builtin)
    return DataConfig(builtin=BuiltinDataConfig(**b))


def test_items_have_the_documented_layout():
    cfg = make_cfg()
    ds = MovingShapes(cfg)
    item = ds[len(ds) - 1]
    video = item["video"]
    assert video.shape == (3, cfg.num_frames, cfg.resolution, cfg.resolution)
    assert video.dtype == torch.float32
    assert -1 <= video.min() and video.max() <= 1
    assert isinstance(item["label"], int) and 0 <= item["label"] < ds.num_classes
    assert ds.num_classes == len(ds.class_names) == 3


def test_same_seed_same_video_other_seed_other_video():
    cfg = make_cfg()
    a, b, c = MovingShapes(cfg, seed=3), MovingShapes(cfg, seed=3), MovingShapes(cfg, seed=4)
    assert torch.equal(a[7]["video"], b[7]["video"])
    assert not torch.equal(a[7]["video"], c[7]["video"])


def test_val_clips_are_held_out():
    cfg = make_cfg()
    train, val = MovingShapes(cfg, "train"), MovingShapes(cfg, "val")
    assert len(val) == 3 * val.windows
    train_first = [train[c * train.windows]["video"] for c in range(6)]
    for c in range(3):
        v = val[c * val.windows]["video"]
        assert all(not torch.allclose(v, t) for t in train_first)


def test_window_count_and_sliding_windows():
    cfg = dataclasses.replace(make_cfg(clip_frames=24), num_frames=8, frame_stride=2, window_stride=3)
    ds = MovingShapes(cfg)
    span = (8 - 1) * 2 + 1
    assert ds.windows == (24 - span) // 3 + 1 == 4
    assert len(ds) == 6 * 4
    # Window 1 starts 3 source frames later; with frame_stride 1 frames line up exactly.
    cfg1 = dataclasses.replace(cfg, frame_stride=1, window_stride=4)
    ds1 = MovingShapes(cfg1)
    assert torch.equal(ds1[1]["video"][:, 0], ds1[0]["video"][:, 4])
    assert ds1[1]["label"] == ds1[0]["label"]
    assert windows_per_clip(5, 8, 1, 1) == 0


def test_no_window_fits_names_the_keys():
    cfg = dataclasses.replace(make_cfg(clip_frames=6), num_frames=8)
    with pytest.raises(ConfigError, match=r"data\.num_frames.*data\.builtin\.clip_frames"):
        MovingShapes(cfg)


def test_label_is_the_shape_kind():
    # Fill ratio of the shape's bounding box: circle pi/4, square 1, triangle 1/2.
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    cfg = dataclasses.replace(make_cfg(num_clips=30, min_size=0.4, max_size=0.5), resolution=64)
    ds = MovingShapes(cfg)
    seen = set()
    for clip in range(30):
        scene = ds.scene(clip)
        frame = ds.render(scene, 0.0)  # (3, H, W)
        bg, fg = scene["background"][0], scene["colours"][0]
        dist = np.abs(frame - bg[:, None, None]).sum(0) / np.abs(fg - bg).sum()
        mask = dist > 0.5  # (H, W)
        ys, xs = np.nonzero(mask)
        ratio = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        nearest = min(expected, key=lambda k: abs(expected[k] - ratio))
        assert nearest == CLASS_NAMES[scene["kind"]], (clip, ratio)
        seen.add(nearest)
    assert seen == set(CLASS_NAMES)


def test_shape_colour_labels_name_the_colour_drawn():
    """labels = shape_colour: 18 classes; a clip's shapes are drawn in its label's colour."""
    from data.builtin import COLOUR_NAMES, SHAPE_COLOURS
    ds = MovingShapes(make_cfg(num_clips=40, labels="shape_colour", num_shapes=2))
    assert ds.num_classes == len(ds.class_names) == 18 and ds.class_names[7] == "green square"
    seen = set()
    for clip in range(40):
        scene = ds.scene(clip)
        kind, colour = divmod(scene["label"], len(COLOUR_NAMES))
        assert scene["kind"] == kind and ds.source_label(clip) == scene["label"]
        assert ds.class_names[scene["label"]] == f"{COLOUR_NAMES[colour]} {CLASS_NAMES[kind]}"
        np.testing.assert_array_equal(scene["colours"], SHAPE_COLOURS[[colour, colour]])
        frame = ds.render(scene, 0.0)  # (3, H, W): the brightest pixels are the shape's colour
        centre = _pixel_at(frame, *ds.render_positions(scene, 0.0)[0])
        np.testing.assert_allclose(centre, SHAPE_COLOURS[colour], atol=1e-6)
        seen.add(scene["label"])
    assert len(seen) > 10


def _pixel_at(frame, x, y):
    r = frame.shape[-1]
    return frame[:, min(int(y * r), r - 1), min(int(x * r), r - 1)]


def test_num_backgrounds_limits_the_background_colours():
    from data.builtin import BACKGROUNDS
    one = MovingShapes(make_cfg(num_clips=20, num_backgrounds=1))
    assert all(np.array_equal(one.scene(c)["background"][0], BACKGROUNDS[0]) for c in range(20))
    two = MovingShapes(make_cfg(num_clips=40, num_backgrounds=2))
    used = {tuple(two.scene(c)["background"][0]) for c in range(40)}
    assert used == {tuple(BACKGROUNDS[0]), tuple(BACKGROUNDS[1])}
    with pytest.raises(ConfigError, match="data.builtin.num_backgrounds = 5: must be 1 to 4"):
        DataConfig(builtin=BuiltinDataConfig(num_backgrounds=5)).validate()


def test_shapes_move_and_stay_inside():
    cfg = make_cfg()
    ds = MovingShapes(cfg)
    video = ds[0]["video"]  # (3, T, H, W)
    assert not torch.equal(video[:, 0], video[:, -1])
    scene = ds.scene(0)
    for t in range(0, 200, 7):  # long after many bounces the centre is still in the frame
        lo = scene["half"][:, None]
        pos = _bounce(scene["pos0"] + t * scene["vel"], lo, 1 - lo)
        assert np.all(pos >= lo - 1e-9) and np.all(pos <= 1 - lo + 1e-9)


def test_gradient_background_is_not_flat():
    cfg = make_cfg(background="gradient")
    frame = MovingShapes(cfg).render(MovingShapes(cfg).scene(0), 0.0)  # (3, H, W)
    corners = frame[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.std(axis=1).max() > 0.01


@pytest.mark.parametrize("builtin, resolution", [({}, 32), ({"num_shapes": 3, "background": "gradient"}, [32, 48]),
                                                 ({"labels": "shape_colour", "num_shapes": 2}, [40, 24])])
def test_a_window_renders_bitwise_as_frame_by_frame(builtin, resolution):
    """The window is drawn in one array pass per shape (stage 1's speed); each frame must be
    bitwise what drawing it alone, shape after shape, gives (so the data did not change)."""
    cfg = dataclasses.replace(make_cfg(**builtin), resolution=resolution, num_frames=6)
    cfg.validate()
    ds = MovingShapes(cfg)
    for index in (0, len(ds) - 1):
        clip, frames = ds.window(index)
        scene = ds.scene(clip)
        video = ds[index]["video"]  # (3, T, H, W)
        for i, t in enumerate(frames):  # the frame-by-frame reference
            img = ds._background(scene)
            lo = scene["half"][:, None]
            pos = _bounce(scene["pos0"] + t * scene["vel"], lo, scene["extent"] - lo)  # (n, 2)
            side, _, x, y = ds._grid(*scene["size"])  # the frame's pixel centres
            for (cx, cy), h, colour in zip(pos, scene["half"], scene["colours"]):
                cover = _coverage(ds._sdf(scene["kind"], x - cx, y - cy, h), 1.0 / side)
                img = img + cover * (colour[:, None, None] - img)
            assert torch.equal(video[:, i], torch.from_numpy(img.astype(np.float32) * 2 - 1)), (index, t)


HELD_OUT = ["red triangle", "Blue  circle", "green square"]  # case and spacing are free


@pytest.mark.parametrize("builtin", [dict(labels="shape_colour"), dict(labels="shape", num_shapes=2)])
def test_held_out_combinations_never_train_but_stay_in_val(builtin):
    """No training clip shows a held-out (shape, colour) pair, not in its pixels' colours, its
    label or its caption; the validation split, which is unchanged, still shows each of them."""
    from data.builtin import COLOUR_NAMES, SHAPE_COLOURS
    held = {("red", "triangle"), ("blue", "circle"), ("green", "square")}
    cfg = make_cfg(num_clips=300, num_val_clips=300, captions=True, held_out_combinations=HELD_OUT, **builtin)
    cfg.validate()
    train, val = MovingShapes(cfg, "train"), MovingShapes(cfg, "val")
    plain = MovingShapes(make_cfg(num_clips=300, num_val_clips=300, captions=True, **builtin), "train")
    recoloured = 0
    for clip in range(300):
        scene, before = train.scene(clip), plain.scene(clip)
        kind = CLASS_NAMES[scene["kind"]]
        pairs = {(COLOUR_NAMES[c], kind) for c in scene["colour_ids"]}
        assert not pairs & held, (clip, pairs)
        np.testing.assert_array_equal(scene["colours"], SHAPE_COLOURS[scene["colour_ids"]])
        caption = train.source_caption(clip, [0, 7])
        assert not any(f"{c} {k}" in caption for c, k in held), caption
        if builtin["labels"] == "shape_colour":
            assert train.class_names[scene["label"]] in {f"{c} {kind}" for c, _ in pairs}
        # The clip is the one drawn without the option: same geometry, only a held-out colour changed.
        for key in ("pos0", "vel", "half", "kind"):
            np.testing.assert_array_equal(scene[key], before[key])
        changed = scene["colour_ids"] != before["colour_ids"]
        recoloured += changed
        if not changed:
            assert scene["label"] == before["label"]
        elif builtin.get("num_shapes") == 2:
            assert len(set(scene["colour_ids"])) == 2  # another colour than the clip's other shape
    assert recoloured > 20  # ~1 clip in 6 drew a held-out pair
    in_val = {(COLOUR_NAMES[c], CLASS_NAMES[val.scene(v)["kind"]])
              for v in range(300) for c in val.scene(v)["colour_ids"]}
    assert held <= in_val
    unchanged = MovingShapes(make_cfg(num_clips=300, num_val_clips=300, captions=True, **builtin), "val")
    assert all(torch.equal(val[i]["video"], unchanged[i]["video"]) for i in range(0, len(val), 97))
    assert val.cache_key() == unchanged.cache_key() and train.cache_key() != plain.cache_key()


@pytest.mark.parametrize("value, words", [
    ("[red hexagon]", r"data\.builtin\.held_out_combinations\[0\] = 'red hexagon': 'hexagon' is not a built-in "
                      r"shape; use one of circle, square, triangle"),
    ("[square, orange circle]", r"held_out_combinations\[0\] = 'square': write a colour and a shape"),
    ("[blue square, orange circle]", r"\[1\] = 'orange circle': 'orange' is not a colour of the built-in shapes; "
                                     r"use one of red, green, blue, yellow, white, violet"),
    ("[red circle, green circle, blue circle, yellow circle, white circle, violet circle]",
     "holds out every colour of the circle"),
])
def test_a_bad_held_out_combination_is_refused(value, words, capsys):
    import train_advanced
    from utils.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: train_advanced.main(["--config", os.path.join(ROOT, "config_t2v_demo.yaml"), "device=cpu",
                                                   f"data.builtin.held_out_combinations={value}"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(words, err) and "Traceback" not in err, err


def test_the_t2v_demo_holds_out_one_colour_per_shape():
    from utils.config import TrainRunConfig, load_config
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_t2v_demo.yaml"), [])
    pairs = cfg.data.builtin.held_out_pairs()
    assert len(pairs) == 3 and {s for _, s in pairs} == set(CLASS_NAMES) and len({c for c, _ in pairs}) == 3
    assert cfg.train.time_limit_minutes is None  # the demo stops on steps (as config_advanced.yaml)
    for prompt in cfg.validation.prompts:  # the validation samples show seen combinations
        assert not any(f"{c} {s}" in prompt for c, s in pairs), prompt
