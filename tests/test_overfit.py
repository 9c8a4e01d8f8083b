"""End to end: memorise one clip, then predict it back through the same frozen VAE.

This is the test the project was born for: it passes only if the v-prediction conversion,
the latent scale, the frozen VAE and unpatchify all agree between training and predict.
Uses the small trained VAE shipped in tests/fixtures/vae (made by train_vae.py; see
tests/fixtures/README.md).
"""
import os

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import predict_advanced
import train_advanced
from data.builtin import MovingShapes
from utils.config import TrainRunConfig, load_config
from utils.metrics import psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.conftest import FIXTURE_VAE

ONE_CLIP = ["device=cpu", f"vae.path={FIXTURE_VAE}", "data.builtin.num_clips=1",
            "data.builtin.clip_frames=8", "data.num_frames=8", "data.resolution=32",
            "vae.sample_posterior=false", "model.hidden_size=128", "model.depth=4",
            "model.num_heads=4", "model.class_dropout=0.0", "train.batch_size=1",
            "train.lr=1e-3", "train.warmup_steps=20", "train.lr_schedule=constant",
            "train.ema_decay=0.995", "train.ema_warmup_steps=100", "train.log_every=50",
            "train.max_steps=1000", "train.epochs=100000", "validation.every_epochs=0"]


@pytest.mark.slow
def test_overfit_one_clip_then_predict_it(tmp_path):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *ONE_CLIP,
            f"experiment.runs_dir={tmp_path}", "experiment.name=overfit"]
    assert train_advanced.main(args) == 0
    out = tmp_path / "predict"
    assert predict_advanced.main([
        "--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
        f"checkpoint={tmp_path}/overfit/latest.pth", f"output_dir={out}", "num_videos=1",
        "sampler=ddim", "num_steps=50", "fps=8"]) == 0

    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), ONE_CLIP)
    clip = MovingShapes(cfg.data, "train", cfg.experiment.seed)[0]["video"]  # (3, T, H, W)
    frames = iio.imread(out / "sample_000.gif", index=None)[..., :3]  # (T, H, W, 3), lossless-ish
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert video.shape == clip.shape
    score = psnr(video, clip)
    print(f"overfit PSNR of the predicted video vs the clip: {score:.1f} dB")
    assert score >= 20.0
