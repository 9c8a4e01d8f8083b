"""Every supported VAE family, as tiny random instances (tests/vae_families.py): loading (plain
and pipeline folder), measured geometry, frame rule, normalisation as each pipeline defines it,
the per-window latent cache, stage 2 + predict, resume, and refusal of another VAE."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import predict_advanced
import train_advanced
from data import build_dataset
from data.latent_cache import LatentCache
from models.vae import FAMILIES, FrozenVAE
from tests.vae_families import EXPECTED, RESOLUTION, pipeline_normalise
from training.stage2 import _log_latent_rms
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
from utils.config import DataConfig
from utils.errors import ConfigError, UserError
from utils.video_io import count_frames, read_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_NAMES = list(EXPECTED)
TINY = ["device=cpu", "data.builtin.num_clips=2", "data.builtin.num_val_clips=1", "data.window_stride=4",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2",
        "train.warmup_steps=1", "train.log_every=1", "train.ema_warmup_steps=1",
        "validation.every_epochs=0", "train.max_steps=2"]


def frames_for(name: str) -> int:
    """data.num_frames each family accepts: 1 + 4k for the causal video VAEs (1 + 8k: CogVideoX)."""
    return {"sd3": 4, "cogvideox": 9}.get(name, 5)


def _train(runs, vae_path, name, family, extra=()):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae_path}",
            f"data.num_frames={frames_for(family)}", f"data.builtin.clip_frames={frames_for(family) + 4}",
            f"data.resolution={RESOLUTION[family]}", f"experiment.runs_dir={runs}",
            f"experiment.name={name}", *extra]
    assert train_advanced.main(args) == 0
    return os.path.join(runs, name)


def _predict(ckpt, out, extra=()):
    return predict_advanced.main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                  f"checkpoint={ckpt}", f"output_dir={out}", "num_videos=1",
                                  "num_steps=2", "sampler=ddim", *extra])


def _exit_code(fn, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: fn())
    return e.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------- loading, geometry


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_each_family_loads_with_measured_geometry(vae_families, name):
    vae = FrozenVAE.from_pretrained(vae_families[name])
    g = vae.geometry
    assert (g.spatial, g.temporal, g.channels) == EXPECTED[name]
    assert vae.class_name == type(vae.ae).__name__ and vae.class_name in FAMILIES
    assert vae.fingerprint == FrozenVAE.from_pretrained(vae_families[name]).fingerprint
    assert vae.describe()["normalisation"]["formula"] in vae.summary()
    t = frames_for(name)
    c, lt, h, w = vae.latent_shape(t, RESOLUTION[name], RESOLUTION[name])
    assert (c, lt, h, w) == (g.channels, 1 + (t - 1) // g.temporal, RESOLUTION[name] // g.spatial,
                             RESOLUTION[name] // g.spatial)


def test_pipeline_folder_uses_its_vae_subfolder(vae_families):
    pipe = FrozenVAE.from_pretrained(vae_families["pipeline"])
    assert pipe.path == os.path.join(vae_families["pipeline"], "vae")
    assert "vae/ subfolder of pipeline folder" in pipe.summary()
    assert pipe.fingerprint == FrozenVAE.from_pretrained(vae_families["wan"]).fingerprint
    chosen = FrozenVAE.from_pretrained(vae_families["pipeline"], subfolder="vae")
    assert chosen.fingerprint == pipe.fingerprint and "vae.subfolder" in chosen.summary()
    with pytest.raises(UserError, match="vae.subfolder = 'transformer'"):
        FrozenVAE.from_pretrained(vae_families["pipeline"], subfolder="transformer")


def test_unsupported_or_non_vae_folders_name_the_class(vae_families, tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="UNet2DConditionModel.*AutoencoderKLWan") as e:
        FrozenVAE.from_pretrained(str(unet))
    assert "AutoencoderKLLTXVideo" in str(e.value) and "corrupt" not in str(e.value)
    (unet / "config.json").write_text(json.dumps({"hidden_size": 4}))  # e.g. a transformers config
    with pytest.raises(UserError, match="no _class_name"):
        FrozenVAE.from_pretrained(str(unet))
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="pipeline folder.*vae.subfolder"):
        FrozenVAE.from_pretrained(str(pipe))
    ltx = tmp_path / "ltx091"
    shutil.copytree(vae_families["ltx"], ltx)
    config = json.loads((ltx / "config.json").read_text())
    (ltx / "config.json").write_text(json.dumps({**config, "timestep_conditioning": True}))
    with pytest.raises(UserError, match="timestep_conditioning.*0.9.0"):
        FrozenVAE.from_pretrained(str(ltx))


def test_config_that_does_not_match_the_weights_is_refused(vae_families, tmp_path):
    wan = tmp_path / "wan"
    shutil.copytree(vae_families["wan"], wan)
    config = json.loads((wan / "config.json").read_text())
    (wan / "config.json").write_text(json.dumps({**config, "scale_factor_temporal": 8}))
    with pytest.raises(UserError, match=r"declares 4x spatial and 8x temporal.*\(C, t, h, w\) = \(4, 5, 2, 2\)"):
        FrozenVAE.from_pretrained(str(wan))


def test_frame_rule_names_the_key_and_the_nearest_values(vae_families):
    vae = FrozenVAE.from_pretrained(vae_families["hunyuan"])
    with pytest.raises(ConfigError, match=r"data.num_frames = 8 .*1 \+ 4k frames.*Use 5 or 9"):
        vae.check_num_frames(8)
    with pytest.raises(ConfigError, match="Use 17 or 21"):
        vae.check_num_frames(19)
    vae.check_num_frames(17)
    assert vae.latent_shape(17, 32, 16) == (4, 5, 8, 4)
    assert vae.geometry.frame_step == 4
    FrozenVAE.from_pretrained(vae_families["sd3"]).check_num_frames(8)  # per frame: any count
    # CogVideoX decodes 1 + 4k frames only from an odd number of latent frames: measured, 1 + 8k
    cog = FrozenVAE.from_pretrained(vae_families["cogvideox"])
    assert (cog.geometry.temporal, cog.geometry.frame_step) == (4, 8)
    with pytest.raises(ConfigError, match=r"1 \+ 8k frames.*Use 9 or 17"):
        cog.check_num_frames(13)
    with pytest.raises(ConfigError, match=r"Use 9$"):
        cog.check_num_frames(5)


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_normalisation_matches_the_family_pipeline_and_inverts(vae_families, name):
    vae = FrozenVAE.from_pretrained(vae_families[name])
    config = json.loads(open(os.path.join(vae_families[name], "config.json")).read())
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, frames_for(name), RESOLUTION[name], RESOLUTION[name], generator=g) * 2 - 1
    mean, std = vae.encode_moments(pixels)  # raw posterior (B, C, t, h, w)
    z = vae.encode(pixels, sample=False)
    torch.testing.assert_close(z, pipeline_normalise(name, mean, config), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vae.denormalize(z), mean, rtol=1e-5, atol=1e-5)
    out = vae.decode(z)  # decode inverts the normalisation, then the family's decoder
    assert out.shape == pixels.shape
    decoder = vae.ae.decode(mean if vae.family.video else mean[:, :, 0]).sample.clamp(-1, 1)
    torch.testing.assert_close(out if vae.family.video else out[:, :, 0], decoder, rtol=1e-4, atol=1e-4)


def test_latent_rms_is_printed_and_warns_outside_range(vae_families):
    vae = FrozenVAE.from_pretrained(vae_families["cogvideox"])
    clips = [{"video": torch.rand(3, 9, 16, 16) * 2 - 1, "label": 0} for _ in range(3)]
    lines = []

    class Log:
        info = staticmethod(lines.append)

    _log_latent_rms(vae, clips, Log)
    rms = float(lines[0].split("RMS ")[1].split()[0])
    expected = vae.encode(torch.stack([c["video"] for c in clips]), sample=False).pow(2).mean().sqrt()
    assert rms == pytest.approx(expected.item(), abs=1e-3)
    vae.normalisation = type(vae.normalisation)(**{**vae.normalisation.__dict__, "scaling_factor": 100 / rms})
    vae._stats.clear()
    lines.clear()
    _log_latent_rms(vae, clips, Log)
    assert "warning: latent RMS" in lines[-1] and "outside [0.5, 2.0]" in lines[-1]


# --------------------------------------------------------------------------- latent cache


def test_cached_window_latents_equal_encoding_the_window(vae_families, tmp_path):
    """A causal VAE: each overlapping window is cached as its own clip's encoding."""
    vae = FrozenVAE.from_pretrained(vae_families["wan"], encode_batch_frames=10)
    cfg = DataConfig(num_frames=5, resolution=16, window_stride=2)
    cfg.builtin.num_clips, cfg.builtin.clip_frames = 2, 9
    dataset = build_dataset(cfg, "train", 0)  # 3 windows per clip, overlapping by 3 frames
    cache = LatentCache(dataset, str(tmp_path / "cache"), {"k": 1}, per_window=True,
                        vae_record=vae.describe())
    cache.write_manifest(cache.build_part(vae.encode_moments, progress=False))
    cached = cache.load()
    assert len(cached) == len(dataset) == 6
    for i in range(len(dataset)):
        direct_mean, direct_std = vae.encode_moments(dataset[i]["video"][None])  # (1, C, t, h, w)
        torch.testing.assert_close(cached[i]["mean"], direct_mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached[i]["std"], direct_std[0], rtol=1e-5, atol=1e-5)
    manifest = json.load(open(tmp_path / "cache" / "manifest.json"))
    assert manifest["layout"] == "window"
    assert manifest["vae"]["normalisation"]["mean"] == pytest.approx([0.1, -0.2, 0.3, 0.0])


# --------------------------------------------------------------------------- stage 2 + predict


@pytest.mark.parametrize("name", ["sd3", "pipeline", "cogvideox", "hunyuan", "ltx"])
def test_stage2_and_predict_with_each_family(vae_families, tmp_path, name):
    family = "wan" if name == "pipeline" else name
    run = _train(tmp_path, vae_families[name], "run", family)
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    spatial, temporal, channels = EXPECTED[family]
    t = frames_for(family)
    assert ckpt["step"] == 2
    assert ckpt["model"]["dims"]["num_frames"] == 1 + (t - 1) // temporal  # latent frames
    assert ckpt["vae"]["class_name"] == type(FrozenVAE.from_pretrained(vae_families[name]).ae).__name__
    assert (ckpt["vae"]["spatial_factor"], ckpt["vae"]["temporal_factor"]) == (spatial, temporal)
    assert len(ckpt["vae"]["normalisation"]["std"]) == channels
    manifest = json.load(open(os.path.join(run, "latent_cache", "manifest.json")))
    assert manifest["vae"]["normalisation"] == ckpt["vae"]["normalisation"]
    assert manifest["layout"] == ("window" if temporal > 1 else "frame")
    log = open(os.path.join(run, "log.txt")).read()
    assert "normalised training latents: RMS" in log and "tokens per clip" in log
    out = str(tmp_path / "predict")
    assert _predict(os.path.join(run, "latest.pth"), out) == 0
    mp4 = os.path.join(out, "sample_000.mp4")
    assert count_frames(mp4) == t  # data.num_frames pixel frames, not latent frames
    assert read_frames(mp4, [0]).shape[1:3] == (RESOLUTION[family],) * 2


def test_resume_and_refusal_of_another_vae_with_a_temporal_vae(vae_families, tmp_path, capsys):
    run = _train(tmp_path, vae_families["wan"], "run", "wan")
    _train(tmp_path, vae_families["wan"], "run", "wan", ["train.max_steps=3", "train.resume=auto"])
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 3
    ckpt = os.path.join(run, "latest.pth")
    code, err = _exit_code(lambda: _predict(ckpt, str(tmp_path / "p"), [f"vae.path={vae_families['hunyuan']}"]),
                           capsys)
    assert code == 2 and "VAE mismatch" in err
    with pytest.raises(UserError, match="VAE mismatch"):
        _train(tmp_path, vae_families["hunyuan"], "run", "wan", ["train.max_steps=4", "train.resume=auto"])


def test_num_frames_breaking_the_frame_rule_exits_2_and_writes_nothing(vae_families, tmp_path, capsys):
    code, err = _exit_code(lambda: _train(tmp_path, vae_families["wan"], "run", "wan",
                                          ["data.num_frames=8"]), capsys)
    assert code == 2 and "Traceback" not in err
    assert "data.num_frames = 8" in err and "1 + 4k frames" in err and "Use 5 or 9" in err
    run = tmp_path / "run"
    assert not (run / "latest.pth").exists() and not (run / "latent_cache").exists()
    assert not (run / "config.yaml").exists()
