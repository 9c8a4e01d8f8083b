"""Checkpoints written before the refactors (objectives as classes, the DiT family seam,
sampler `auto`, the text conventions) still load and sample the very frames the code that
wrote them sampled: tests/fixtures/old_checkpoints (made by commit b028d1b; its README says how)."""
import os

import numpy as np
import pytest
import torch

from training.sampling import sample_videos
from utils.config import PredictConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "fixtures", "old_checkpoints")
VAE = os.path.join(ROOT, "tests", "fixtures", "vae")
CASES = {
    "v": ["checkpoint=v.pth", "sampler=ddpm", "num_steps=4", "guidance_scale=2.5", "class_labels=[0,5]", "seed=3"],
    "flow": ["checkpoint=flow_first_frames.pth", "sampler=euler", "num_steps=3", "guidance_scale=2.0",
             "class_labels=[1,2]", "seed=7", "image=first.png", "num_frames=7"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_old_checkpoint_samples_the_frames_it_sampled(name):
    args = ["device=cpu", f"vae.path={VAE}", "num_videos=2"]
    args += [a.replace("=", f"={OLD}/", 1) if a.split("=")[0] in ("checkpoint", "image") else a for a in CASES[name]]
    cfg = load_config(PredictConfig, os.path.join(ROOT, "predict_advanced.yaml"), args)
    videos, _ = sample_videos(cfg, torch.device("cpu"))
    expected = np.load(os.path.join(OLD, "videos.npz"))
    for i, frames in enumerate(videos):
        assert np.array_equal(frames, expected[f"{name}_{i}"]), f"{name} video {i} differs from the old code's"
