"""evaluate.py's protocol is StyleGAN-V's fvd2048_16f, and every deviation is recorded (issue 18:
defects 3, 4, 12, 13 and the detector / output checks of 19 and 20). Each test here failed on
the code before: a folder predict wrote counted twice, a training split and cycled videos for
the real set, the span (n-1)s+1 as the short-video threshold, float input and TF32 for the
detector, generated folders resampled to data.fps (frame folders skipped), the latent frame
count of causal-VAE checkpoints, mixed resolutions, detectors of another call or width found
only mid-run, `output` checked after the work."""
import hashlib
import os
import re
import sys

import numpy as np
import pytest
import torch

import evaluate
import train_advanced
from tests.test_evaluate import (StandInI3D, _evaluate, clip_folders, detector,  # noqa: F401 (fixtures)
                                 inception, random_vae, tiny_checkpoint)
from tests.test_stage2 import ROOT, TINY
from utils.cli import run_main
from utils.config import DataConfig, EvaluateConfig
from utils.errors import UserError
from utils.fvd import detector_features
from utils.video_io import write_video

EVAL_YAML = os.path.join(ROOT, "evaluate.yaml")


def _shapes(n, frames=8, size=32, seed=0):
    """n smooth videos (built-in moving shapes) as (T, H, W, 3) uint8."""
    from data import build_dataset
    from utils.video_io import video_tensor_to_uint8
    cfg = DataConfig(num_frames=frames, resolution=size, window_stride=frames)
    cfg.builtin.num_clips, cfg.builtin.clip_frames = n, frames
    ds = build_dataset(cfg, "train", seed)
    return [video_tensor_to_uint8(ds[i * ds.windows]["video"]) for i in range(n)]


def _write(folder, videos, ext=".mp4", fps=8, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, frames in enumerate(videos):
        write_video(os.path.join(folder, (names[i] if names else f"sample_{i:03d}") + ext), frames, fps)
    return str(folder)


def _frame_folders(folder, videos):
    from PIL import Image
    for i, frames in enumerate(videos):
        d = os.path.join(folder, f"sample_{i:03d}")
        os.makedirs(d, exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(os.path.join(d, f"frame_{t:03d}.png"))
    return str(folder)


def _args(real, generated, det, *extra):
    return [f"data.path={real}", f"generated.path={generated}", f"fvd.detector_path={det}",
            "fvd.batch_size=5", *extra]


def _exit_2(argv, monkeypatch, capsys, main=evaluate.main, script="evaluate.py"):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        run_main(main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 3: one video per sample


def test_a_folder_predict_wrote_counts_each_sample_once(detector, clip_folders, tmp_path):
    """predict writes sample_NNN.mp4 and sample_NNN.gif: evaluate reads one video per name,
    the mp4 (not the palette-quantised GIF), and gives the number of the mp4-only folder."""
    real, _ = clip_folders
    videos = _shapes(6, seed=3)
    both = _write(tmp_path / "both", videos)
    _write(tmp_path / "both", videos, ".gif")
    mp4 = _write(tmp_path / "mp4", videos)
    common = ["num_videos=6", "data.num_frames=8"]
    a = _evaluate(_args(real, both, detector, *common), tmp_path, "both.json")
    b = _evaluate(_args(real, mp4, detector, *common), tmp_path, "mp4.json")
    assert a["num_generated"] == 6 and a["fvd"] == pytest.approx(b["fvd"], rel=1e-3)  # same files: to round-off
    g = a["protocol"]["generated"]
    assert (g["found"], g["left_out_same_name"], g["first"], g["last"]) == \
        (6, 6, "sample_000.mp4", "sample_005.mp4")


def test_one_video_per_name_prefers_frame_folders_and_videos_over_gifs(tmp_path):
    v = _shapes(1, frames=4)
    _write(tmp_path, v * 2, ".gif", names=["a", "b"])
    _write(tmp_path, v, ".mkv", names=["b"])
    _frame_folders(str(tmp_path), v)  # sample_000/ with 4 png frames
    _write(tmp_path, v, ".mp4", names=["sample_000"])
    from data.videos import find_sources
    from training.evaluation import one_video_per_name
    chosen, left = one_video_per_name(str(tmp_path), find_sources(str(tmp_path)))
    assert chosen == ["a.gif", "b.mkv", "sample_000"]
    assert sorted(left) == ["b.gif", "sample_000.mp4"]


def test_generated_frame_folders_count_once_each_and_are_read_with_data_fps_set(detector, tmp_path):
    """A generated folder of frame folders (StyleGAN-V's own format): one video per folder,
    never skipped for having no frame rate, even when data.fps resamples the real clips."""
    videos = _shapes(5, seed=4)
    real = _write(tmp_path / "real", videos)  # 8 fps: data.fps=8 keeps every frame
    gen = _frame_folders(str(tmp_path / "gen"), videos)
    out = _evaluate(_args(real, gen, detector, "num_videos=5", "data.num_frames=8", "data.fps=8"),
                    tmp_path)
    assert out["num_generated"] == out["num_real"] == 5
    assert out["protocol"]["generated"]["found"] == 5
    assert any("data.fps" in d for d in out["protocol"]["deviations"])


def test_generated_videos_are_read_as_stored_not_resampled_to_data_fps(detector, tmp_path):
    """Generated 16 fps videos whose first 8 frames are the real 8 fps clips and whose last 8
    are noise: with data.fps=8 the real clips are read at 8 fps, the generated ones as stored
    (frames 0..7). Resampling them too would take frames 0, 2, ..., 14, half noise."""
    clips = _shapes(6, seed=5)
    rng = np.random.default_rng(0)
    noisy = [np.concatenate([c, rng.integers(0, 256, c.shape, dtype=np.uint8)]) for c in clips]
    real = _write(tmp_path / "real", clips, ".mkv", fps=8)
    gen = _write(tmp_path / "gen", noisy, ".mkv", fps=16)
    noise = _write(tmp_path / "noise", [n[8:] for n in noisy], ".mkv", fps=8)
    common = ["num_videos=6", "data.num_frames=8", "data.fps=8"]
    same = _evaluate(_args(real, gen, detector, *common), tmp_path, "gen.json")["fvd"]
    far = _evaluate(_args(real, noise, detector, *common), tmp_path, "noise.json")["fvd"]
    assert same < 0.05 * far, (same, far)


# --------------------------------------------------------------------------- 4: StyleGAN-V's selection


def test_real_set_is_the_first_videos_of_the_folder_each_once_and_counts_are_true(
        detector, clip_folders, tmp_path, capsys):
    """Every video of data.path (no train/val split, whatever data.val_fraction), in sorted
    order; more clips asked than videos: each video once, and the record and stdout say 10."""
    real, _ = clip_folders  # 10 videos of 8 frames
    out = _evaluate(_args(real, real, detector, "num_videos=10", "data.num_frames=8", "data.val_fraction=0.3",
                          "real.num_clips=12"), tmp_path)
    assert out["num_real"] == 10 and abs(out["fvd"]) < 1e-6  # each generated video is its own real clip
    r = out["protocol"]["real"]
    assert (r["split"], r["num_videos"], r["num_clips_requested"], r["num_clips"]) == ("all", 10, 12, 10)
    assert any(d.startswith("10 real clips (real.num_clips / num_videos asked for 12")
               for d in out["protocol"]["deviations"])
    text = capsys.readouterr().out
    assert "FVD" in text and "12 real clips were asked for" in text and "FVD uses 10 real clips" in text
    assert re.search(r"^FVD [\d.-]+ \(10 generated vs 10 real clips of 8 frames", text, re.M)
    assert "vs 12" not in text


def test_short_video_threshold_is_num_frames_times_stride(detector, tmp_path):
    """StyleGAN-V drops videos with fewer than n*s frames (n = 4, s = 2: 8), not (n-1)s+1 = 7:
    the 7-frame noise videos v0-v2 sort first but are not real clips; the 8-frame shape
    videos v3-v5 are."""
    rng = np.random.default_rng(1)
    noise7 = [rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    shapes8 = _shapes(3, frames=8, seed=7)
    real = _write(tmp_path / "real", noise7 + shapes8, ".mkv", names=[f"v{i}" for i in range(6)])
    common = ["num_videos=3", "data.num_frames=4", "data.frame_stride=2"]
    out = _evaluate(_args(real, _write(tmp_path / "gen", shapes8), detector, *common), tmp_path)
    far = _evaluate(_args(real, _write(tmp_path / "noise", [np.concatenate([n, n[:1]]) for n in noise7]),
                          detector, *common), tmp_path, "noise.json")
    assert out["num_real"] == 3 and out["fvd"] < 0.2 * far["fvd"], (out["fvd"], far["fvd"])
    r = out["protocol"]["real"]
    assert (r["num_videos"], r["num_videos_long_enough"], r["min_frames"], r["num_clips"]) == (6, 3, 8, 3)
    # a generated video shorter than n*s is refused (StyleGAN-V asserts), naming it
    _write(tmp_path / "g7", noise7)
    with pytest.raises(UserError, match=r"sample_000.mp4 has 7 frames, fewer than the 8"):
        evaluate.main(["--config", EVAL_YAML, "device=cpu", *_args(real, tmp_path / "g7", detector, *common)])


def test_the_record_is_complete(detector, clip_folders, tmp_path):
    real, _ = clip_folders
    out = _evaluate(_args(real, real, detector, "num_videos=10", "data.num_frames=8"), tmp_path)
    p = out["protocol"]
    d = p["detector"]
    assert d["sha256"] == hashlib.sha256(open(detector, "rb").read()).hexdigest()
    assert (d["tf32"], d["matmul_fp32_precision"], d["cudnn_conv_fp32_precision"]) == (False, "ieee", "ieee")
    assert d["input"].startswith("uint8") and d["kwargs"] == {"rescale": True, "resize": True,
                                                              "return_features": True}
    assert p["device"] == "cpu" and p["torch"] == torch.__version__
    r, g = p["real"], p["generated"]
    assert (r["num_frames"], r["frame_stride"], r["resolution"], r["seed"], r["num_clips"]) == (8, 1, 32, 0, 10)
    assert (g["num_videos"], g["num_frames"], g["frame_stride"], g["resolution"]) == (10, 8, 1, [32, 32])
    assert p["name"] == "deviates from fvd2048_16f"
    assert p["deviations"] == ["10 generated videos (num_videos; fvd2048_16f: 2048)",
                               "10 real clips (real.num_clips / num_videos; fvd2048_16f: 2048)",
                               "clips of 8 frames (data.num_frames; fvd2048_16f: 16)"]


def test_defaults_are_fvd2048_16f_with_no_deviation():
    from training.evaluation import RealClips, deviations
    cfg = EvaluateConfig(checkpoint="x.pth")
    assert (cfg.num_videos, cfg.real.split, cfg.real.num_clips) == (2048, "all", None)
    data = cfg.data.resolved(None, {"num_frames": 16, "frame_stride": 1, "resolution": 256})
    real = RealClips(None, [], {"num_clips": 2048, "num_clips_requested": 2048,
                                "num_videos_long_enough": 9000, "min_frames": 16})
    assert deviations(cfg, data, real, 2048) == []
    cfg.real.split = "train"
    assert deviations(cfg, data, real, 2048)[0].startswith("real videos of the train split only")


def test_detector_gets_uint8_with_tf32_off_and_the_flags_come_back():
    seen = {}

    def spy(videos, rescale, resize, return_features):
        seen.update(dtype=videos.dtype, matmul=torch.backends.cuda.matmul.fp32_precision,
                    conv=torch.backends.cudnn.conv.fp32_precision)
        return torch.zeros(videos.shape[0], 400)

    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    detector_features(spy, torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8))
    assert seen == {"dtype": torch.uint8, "matmul": "ieee", "conv": "ieee"}
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before


# --------------------------------------------------------------------------- 12, 13: geometry


@pytest.mark.slow
def test_a_causal_video_vae_checkpoint_is_evaluated_in_pixel_frames(vae_families, detector, tmp_path):
    """Wan (4x temporal): 5 pixel frames are 2 latent frames. evaluate compares 5-frame clips,
    and gives the val/fvd number training logged (one code path)."""
    run = str(tmp_path / "wan")
    assert train_advanced.main([
        "--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae_families['wan']}",
        "data.num_frames=5", "data.builtin.clip_frames=9", f"experiment.runs_dir={tmp_path}",
        "experiment.name=wan", "train.max_steps=2", "validation.every_epochs=1",
        f"validation.fvd.detector_path={detector}", "validation.fvd.num_videos=3",
        "validation.loss_clips=0", "validation.num_videos=1"]) == 0
    from tests.test_evaluate import _scalars
    (step, in_loop), = _scalars(run, "val/fvd")
    import yaml
    v = yaml.safe_load(open(os.path.join(run, "config.yaml")))["validation"]
    out = _evaluate([f"checkpoint={run}/latest.pth", "num_videos=3", f"sampler={v['sampler']}",
                     f"num_steps={v['num_steps']}", f"guidance_scale={v['guidance_scale']}",
                     f"seed={v['seed']}", f"real.seed={v['seed']}", f"fvd.detector_path={detector}"],
                    tmp_path)
    g, r = out["protocol"]["generated"], out["protocol"]["real"]
    assert (g["num_frames"], g["latent_frames"], r["num_frames"], g["resolution"]) == (5, 2, 5, [16, 16])
    assert out["fvd"] == pytest.approx(in_loop, rel=1e-4)
    with pytest.raises(UserError, match=r"data.num_frames = 2 but .*decodes 2 latent frames.*"
                                        r"generates 5 frames"):
        evaluate.main(["--config", EVAL_YAML, "device=cpu", f"checkpoint={run}/latest.pth",
                       f"fvd.detector_path={detector}", "data.num_frames=2"])


def test_real_clips_of_another_resolution_are_refused(detector, tiny_checkpoint, clip_folders, tmp_path):
    with pytest.raises(UserError, match=r"data.resolution = 32 \(real clips of 32x32 px\) but .* "
                                        r"generates 16x16 px videos.*data.resolution=16"):
        evaluate.main(["--config", EVAL_YAML, "device=cpu", f"checkpoint={tiny_checkpoint}",
                       f"fvd.detector_path={detector}", "data.resolution=32", "num_videos=2"])
    real, _ = clip_folders  # 32 x 32 videos
    with pytest.raises(UserError, match=r"data.resolution = 64 .* generates 32x32 px.*data.resolution=32"):
        evaluate.main(["--config", EVAL_YAML, "device=cpu",
                       *_args(real, real, detector, "num_videos=10", "data.num_frames=8",
                              "data.resolution=64")])
    mixed = _write(tmp_path / "mixed", _shapes(2, size=32) + _shapes(1, size=16), names=["a", "b", "c"])
    with pytest.raises(UserError, match=r"c.mp4 is 16x16 px but a.mp4 is 32x32 px"):
        evaluate.main(["--config", EVAL_YAML, "device=cpu",
                       *_args(real, mixed, detector, "num_videos=3", "data.num_frames=8")])
    # null data.resolution: the generated videos' size
    out = _evaluate(_args(real, real, detector, "num_videos=10", "data.num_frames=8"), tmp_path)
    assert out["protocol"]["real"]["resolution"] == 32


# --------------------------------------------------------------------------- 19, 20: detectors, output


class OtherSignature(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 400)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.fc(videos.float().mean((2, 3, 4)))


class Width512(StandInI3D):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8 * 8, 512)


@pytest.fixture(scope="module")
def bad_detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    paths = {}
    for name, module in [("signature", OtherSignature()), ("width", Width512())]:
        paths[name] = str(root / f"{name}.pt")
        torch.jit.save(torch.jit.script(module), paths[name])
    return paths


def test_a_detector_of_another_call_or_width_is_refused_at_load(bad_detectors, detector, clip_folders,
                                                                 monkeypatch, capsys):
    import training.evaluation as ev
    monkeypatch.setattr(ev.ClipFeatures, "add", lambda *a: pytest.fail("features were computed"))
    real, _ = clip_folders
    common = ["--config", EVAL_YAML, "device=cpu", "num_videos=10", "data.num_frames=8"]
    err = _exit_2(common + _args(real, real, bad_detectors["signature"]), monkeypatch, capsys)
    assert "fvd.detector_path" in err and "signature.pt" in err and "rescale=True" in err
    err = _exit_2(common + _args(real, real, bad_detectors["width"]), monkeypatch, capsys)
    assert "shape (1, 512)" in err and "expected (1, 400)" in err and "FVD" in err
    # an I3D given as the FID detector: refused for its call and width
    err = _exit_2(common + _args(real, real, detector, f"fid.detector_path={detector}"), monkeypatch, capsys)
    assert "fid.detector_path" in err and "inception-2015-12-05.pt" in err


def test_training_refuses_a_bad_val_fvd_detector_before_step_one(bad_detectors, random_vae, tmp_path,
                                                                 monkeypatch, capsys):
    err = _exit_2(["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={random_vae}",
                   f"experiment.runs_dir={tmp_path}", "experiment.name=bad", "train.max_steps=2",
                   "validation.every_epochs=1", f"validation.fvd.detector_path={bad_detectors['width']}"],
                  monkeypatch, capsys, train_advanced.main, "train_advanced.py")
    assert "validation.fvd.detector_path" in err and "expected (1, 400)" in err
    assert not os.path.exists(tmp_path / "bad" / "latest.pth")


def test_an_unwritable_output_is_refused_before_any_work(detector, clip_folders, tmp_path, monkeypatch,
                                                         capsys):
    import training.evaluation as ev
    monkeypatch.setattr(ev.ClipFeatures, "add", lambda *a: pytest.fail("features were computed"))
    real, _ = clip_folders
    (tmp_path / "a_file").write_text("x")
    common = ["--config", EVAL_YAML, "device=cpu", "num_videos=10", "data.num_frames=8",
              *_args(real, real, detector)]
    err = _exit_2(common + [f"output={tmp_path}/a_file/fvd.json"], monkeypatch, capsys)
    assert "output = " in err and "is a file, not a folder" in err
    err = _exit_2(common + [f"output={tmp_path}"], monkeypatch, capsys)
    assert "is a folder; give a file name" in err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing written or created
