"""Any aspect ratio: `data.resolution: [height, width]` from the config through the crop, the
built-in data, the DiT's patch grid, the checkpoint and the videos written (issue 11, item 2).

End to end (the acceptance): stage 1, stage 2 and predict at [32, 64] on real mp4s of assorted
sizes and frame rates; the videos they write read back 32 high and 64 wide.
"""
import glob
import json
import os
import re
import warnings

import av
import numpy as np
import pytest
import torch

import predict_advanced
import train_advanced
import train_vae
from data.builtin import MovingShapes
from data.videos import DataWarning, VideoFolder, cover_crop_box
from models.dit import VideoDiT, patchify, unpatchify
from models.vae import FrozenVAE
from tests.conftest import smooth_frames, write_frame_folder
from tests.test_bad_input import _assert_user_error_exit, _cli
from tests.test_diagnose import _diagnose
from tests.test_evaluate import _evaluate, detector  # noqa: F401 (detector is a fixture)
from tests.test_dit import randomize_zero_init, tiny_cfg
from tests.test_stage2 import ROOT, TINY, _predict, _train, random_vae  # noqa: F401 (a fixture)
from tests.test_vae import TINY_OVERRIDES as VAE_TINY
from utils.checkpoint import load_checkpoint
from utils.config import (BuiltinDataConfig, DataConfig, EvaluateConfig, VAERunConfig, dump_config,
                          load_config)
from utils.errors import ConfigError
from utils.video_io import write_video

WIDE = ["data.resolution=[32,64]", "data.num_frames=4", "data.window_stride=4"]
SOURCES = {"wide.mp4": (48, 80, 24), "hd.mp4": (72, 128, 30), "portrait.mp4": (100, 60, 25)}  # h, w, fps


def read_video(path: str) -> np.ndarray:
    """Every frame of a written mp4 / gif, decoded with PyAV: (T, H, W, 3) uint8."""
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# --------------------------------------------------------------------------- crop


@pytest.mark.parametrize("h, w, box", [
    (48, 80, (4, 0, 40, 80)),  # 5:3 is taller than 1:2: full width, rows cropped
    (72, 128, (4, 0, 64, 128)),  # 16:9
    (100, 60, (35, 0, 30, 60)),  # portrait: a band across the middle
    (32, 128, (0, 32, 32, 64)),  # 4:1 is wider than 1:2: full height, columns cropped
    (32, 64, (0, 0, 32, 64)),  # the target's own shape: nothing cropped
])
def test_cover_crop_box_for_landscape_and_portrait_sources(h, w, box):
    assert cover_crop_box(h, w, 32, 64) == box
    top, left, box_h, box_w = box
    assert abs(box_w / box_h - 2) <= 1 / box_h  # the target's aspect ratio, to a pixel
    assert cover_crop_box(h, w, 16, 16)[2:] == (min(h, w),) * 2  # square: the largest square


def test_random_crop_moves_only_along_the_cropped_side():
    boxes = {cover_crop_box(100, 60, 32, 64, torch.Generator().manual_seed(s)) for s in range(40)}
    assert {(left, bh, bw) for _, left, bh, bw in boxes} == {(0, 30, 60)}
    tops = sorted(top for top, *_ in boxes)
    assert tops[0] >= 0 and tops[-1] <= 70 and len(set(tops)) > 10


def test_a_portrait_frame_is_resized_to_cover_and_center_cropped(tmp_path):
    rows = np.repeat((2 * np.arange(100)).astype(np.uint8)[:, None], 60, axis=1)  # row y has value 2y
    write_frame_folder(str(tmp_path / "portrait"), np.repeat(rows[None, :, :, None], 3, -1)[[0, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # one clip: val reuses train
        ds = VideoFolder(DataConfig(path=str(tmp_path), num_frames=3, resolution=[32, 64]), "val")
    video = (ds[0]["video"][0, 0] + 1) * 127.5  # (32, 64): red channel of frame 0
    assert ds[0]["video"].shape == (3, 3, 32, 64)
    assert torch.allclose(video, video[:, :1].expand(-1, 64), atol=0.5)  # columns alike: no squeeze
    column = video[:, 0]
    assert (column.diff() > 0).all()  # top to bottom, as in the source
    assert 2 * 35 - 1 <= column[0] <= 2 * 37 and 2 * 63 <= column[-1] <= 2 * 65 + 1  # rows 35..64


# --------------------------------------------------------------------------- built-in data


def test_builtin_shapes_render_at_height_x_width_with_their_form():
    cfg = DataConfig(resolution=[32, 64], builtin=BuiltinDataConfig(num_clips=30, min_size=0.4,
                                                                    max_size=0.5))
    ds = MovingShapes(cfg)
    assert ds[0]["video"].shape == (3, cfg.num_frames, 32, 64)
    for clip in range(30):
        scene = ds.scene(clip)
        for t in range(0, 200, 7):  # centres stay inside the wide frame after many bounces
            x, y = ds.render_positions(scene, t)[0]
            half = scene["half"][0]
            assert half - 1e-9 <= x <= 2 - half + 1e-9 and half - 1e-9 <= y <= 1 - half + 1e-9
        if scene["kind"] == 2:  # a triangle's box is not square
            continue
        frame = ds.render(scene, 0.0)  # (3, 32, 64)
        dist = np.abs(frame - scene["background"][0][:, None, None]).sum(0)
        ys, xs = np.nonzero(dist > 0.5 * np.abs(scene["colours"][0] - scene["background"][0]).sum())
        assert abs((np.ptp(xs) + 1) - (np.ptp(ys) + 1)) <= 2, clip  # round, not stretched 2:1


def test_an_int_and_its_square_list_are_the_same_data_and_cache():
    square, listed, wide = (MovingShapes(DataConfig(resolution=r, builtin=BuiltinDataConfig(num_clips=2)))
                            for r in (16, [16, 16], [16, 32]))
    assert torch.equal(square[3]["video"], listed[3]["video"])
    assert square.cache_key() == listed.cache_key() != wide.cache_key()
    assert wide.cache_key()["resolution"] == [16, 32]


# --------------------------------------------------------------------------- DiT


def test_dit_forward_and_exact_patch_round_trip_at_h_ne_w():
    x = torch.randn(2, 4, 3, 4, 8, generator=torch.Generator().manual_seed(0))  # (B, C, T, h=4, w=8)
    tokens = patchify(x, 1, 2)  # (B, 3 * 2 * 4, 2 * 2 * C)
    assert tokens.shape == (2, 24, 16)
    assert torch.equal(unpatchify(tokens, (3, 2, 4), 1, 2), x)
    # token n = t * S + row * 4 + col holds latent rows 2 row.., columns 2 col..
    assert torch.equal(tokens[0, 8 + 1 * 4 + 3].reshape(2, 2, 4), x[0, :, 1, 2:4, 6:8].permute(1, 2, 0))
    model = VideoDiT(tiny_cfg(), 4, 3, 4, 8)
    randomize_zero_init(model)
    assert model.grid == (3, 2, 4)
    assert model(x, torch.tensor([3, 999])).shape == x.shape
    pos = model.pos_embed[0, :8]  # (S, D): the 2 x 4 positions of one frame all differ
    assert torch.cdist(pos, pos).add(torch.eye(8) * 1e3).min() > 1e-3
    tall = VideoDiT(tiny_cfg(), 4, 3, 8, 4)  # 8 x 4 is another geometry: taken (buckets)
    tall.load_state_dict(model.state_dict())
    x = x.transpose(-1, -2)
    assert torch.equal(model(x, torch.tensor([3, 999])), tall(x, torch.tensor([3, 999])))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("value, words", [
    ("[30,64]", ["data.resolution = [30, 64]: height 30 is not divisible", "factor 4", "28 or 32"]),
    ("[32,66]", ["data.resolution = [32, 66]: width 66 is not divisible", "64 or 68"]),
    ("30", ["data.resolution = 30 is not divisible"]),
    ("[32]", ["data.resolution = [32]: give one side", "[height, width]"]),
    ("[32,64,3]", ["data.resolution = [32, 64, 3]"]),
    ("[32,0]", ["data.resolution = [32, 0]: width 0 must be >= 1"]),
    ("[32,wide]", ["data.resolution[1] = 'wide': expected an integer"]),
    ("wide", ["data.resolution = 'wide': expected an integer, or a list"]),
])
def test_config_errors_name_the_side(value, words):
    with pytest.raises(ConfigError) as e:
        load_config(VAERunConfig, os.path.join(ROOT, "config_vae.yaml"), [f"data.resolution={value}"])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_stage2_refuses_a_side_the_patch_grid_does_not_divide(tmp_path, random_vae, capsys):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={random_vae}",
            f"experiment.runs_dir={tmp_path}", "data.resolution=[32,60]"]
    code, _, err = _cli(train_advanced, args, capsys)
    _assert_user_error_exit(code, err, "data.resolution = [32, 60]: width 60 is not divisible by "
                                       "VAE factor 4 x model.patch_size 2 = 8", "56 or 64")
    assert not glob.glob(str(tmp_path / "*" / "config.yaml"))  # refused before anything is written


def test_evaluate_reads_height_and_width_and_dumps_them_on_one_line(tmp_path):
    path = os.path.join(ROOT, "evaluate.yaml")
    cfg = load_config(EvaluateConfig, path, ["checkpoint=x.pth", "data.resolution=[32,64]"])
    real = cfg.data.resolved(None)
    assert (real.height, real.width) == (32, 64)
    with pytest.raises(ConfigError, match=r"data.resolution = \[32, -4\]: width -4 must be >= 1"):
        load_config(EvaluateConfig, path, ["checkpoint=x.pth", "data.resolution=[32,-4]"])
    dump_config(load_config(VAERunConfig, None, WIDE), str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "  resolution: [32, 64]\n" in text
    assert load_config(VAERunConfig, str(tmp_path / "config.yaml")).data.resolution == [32, 64]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    """Real mp4s of assorted sizes and frame rates: 16:10-ish, 16:9 and portrait."""
    root = tmp_path_factory.mktemp("clips")
    for name, (h, w, fps) in SOURCES.items():
        write_video(str(root / name), smooth_frames(16, h, w), fps=fps)
    return str(root)


@pytest.fixture(scope="module")
def wide_runs(tmp_path_factory, clips) -> dict:
    """Stage 1, stage 2 (2 steps, validation samples, latent cache) and predict at [32, 64]."""
    runs = str(tmp_path_factory.mktemp("runs"))
    assert train_vae.main(["--config", os.path.join(ROOT, "config_vae.yaml"), *VAE_TINY, *WIDE,
                           f"data.path={clips}", f"experiment.runs_dir={runs}", "experiment.name=vae",
                           "train.max_steps=2", "train.scale_num_clips=2"]) == 0
    vae = os.path.join(runs, "vae", "vae")
    stage2 = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, *WIDE, f"data.path={clips}",
              f"vae.path={vae}", f"experiment.runs_dir={runs}", "experiment.name=dit"]
    assert train_advanced.main(stage2 + ["train.max_steps=2", "validation.every_epochs=1"]) == 0
    dit = os.path.join(runs, "dit")
    out = os.path.join(runs, "predict")
    assert _predict(os.path.join(dit, "latest.pth"), out) == 0
    return {"vae": vae, "dit": dit, "predict": out, "stage2": stage2}


def test_stage1_trains_a_vae_on_wide_frames(wide_runs, clips):
    vae = FrozenVAE.from_pretrained(wide_runs["vae"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = VideoFolder(load_config(VAERunConfig, None, WIDE + [f"data.path={clips}"]).data, "val")
    video = ds[0]["video"][None]  # (1, 3, 4, 32, 64)
    assert video.shape == (1, 3, 4, 32, 64)
    assert vae.encode(video, sample=False).shape == (1, 4, 4, 8, 16)
    assert vae.decode(vae.encode(video, sample=False)).shape == video.shape


def test_stage2_records_both_sides_and_writes_32_x_64_samples(wide_runs):
    ckpt = load_checkpoint(os.path.join(wide_runs["dit"], "latest.pth"))
    dims = ckpt["model"]["dims"]
    assert (dims["latent_height"], dims["latent_width"]) == (8, 16) and "latent_size" not in dims
    assert ckpt["config"]["data"]["resolution"] == [32, 64]
    with open(os.path.join(wide_runs["dit"], "latent_cache", "manifest.json")) as f:
        assert json.load(f)["key"]["resolution"] == [32, 64]
    samples = glob.glob(os.path.join(wide_runs["dit"], "samples", "step_*", "sample_000.*"))
    assert len(samples) == 2  # mp4 and gif
    for path in samples:
        assert read_video(path).shape == (4, 32, 64, 3), path


def test_predict_writes_32_high_64_wide_videos(wide_runs):
    out = wide_runs["predict"]
    for name in ("sample_000.mp4", "sample_001.mp4", "sample_000.gif", "sample_001.gif"):
        assert read_video(os.path.join(out, name)).shape == (4, 32, 64, 3), name
    from PIL import Image
    assert Image.open(os.path.join(out, "grid.png")).size == (4 * 66 - 2, 2 * 34 - 2)  # (W, H)


def test_diagnose_runs_every_check_at_h_ne_w(wide_runs, capsys):
    """Patch checks, the checkpoint's geometry and the jigsaw measurements at 8 x 16 latents."""
    code, checks, out = _diagnose(wide_runs["stage2"] + ["--min-vae-psnr", "0"], capsys)
    assert code in (0, 1) and "crashed" not in out, out  # a 2-step model may fail jigsaw, not crash
    assert checks["patchify"][0] == checks["checkpoint"][0] == "PASS", out
    assert checks["jigsaw"][0] in ("PASS", "FAIL") and "misplaced pieces" in checks["jigsaw"][1], out


def test_evaluate_compares_height_x_width_samples_with_real_clips_cropped_alike(wide_runs, detector,
                                                                              tmp_path, capsys):
    """evaluate.py's real side takes the checkpoint's [32, 64] and its clips (data.* null)."""
    result = _evaluate([f"checkpoint={os.path.join(wide_runs['dit'], 'latest.pth')}", "num_videos=2",
                        "num_steps=2", f"fvd.detector_path={detector}"], tmp_path)  # real: all 3 videos
    assert result["protocol"]["real"]["resolution"] == [32, 64] and result["num_real"] == 2
    assert re.search(r"^FVD [\d.]+ \(2 generated vs 2 real clips of 4 frames, frame stride 1, 32x64 px;",
                     capsys.readouterr().out, re.M)


def test_a_square_checkpoint_of_the_old_format_still_loads(tmp_path, random_vae):
    """Checkpoints written before [height, width] record one `latent_size`: predict and resume
    still take them."""
    run = _train(tmp_path, random_vae, "old", ["train.max_steps=1"])
    path = os.path.join(run, "latest.pth")
    ckpt = load_checkpoint(path)
    dims = ckpt["model"]["dims"]
    side = dims.pop("latent_height")
    assert dims.pop("latent_width") == side
    dims["latent_size"] = side
    torch.save(ckpt, path)
    assert _predict(path, str(tmp_path / "predict")) == 0
    assert read_video(str(tmp_path / "predict" / "sample_000.mp4")).shape == (4, 16, 16, 3)
    _train(tmp_path, random_vae, "old", ["train.max_steps=2", "train.resume=auto"])
    assert load_checkpoint(path)["step"] == 2
