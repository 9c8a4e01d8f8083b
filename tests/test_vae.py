"""The per-frame VAE: fingerprint, FrozenVAE (shapes, freezing, errors) and train_vae.py end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from data.builtin import MovingShapes
from models.vae import FrozenVAE, VAELoss, build_autoencoder, vae_fingerprint
from utils.config import BuiltinDataConfig, DataConfig, VAEArchConfig, VAERunConfig, load_config
from utils.errors import MissingFileError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARCH = VAEArchConfig(block_out_channels=[8, 16, 16], latent_channels=4, norm_num_groups=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    ae = build_autoencoder(TINY_ARCH)
    ae.register_to_config(scaling_factor=0.7, shift_factor=0.1)
    path = str(tmp_path_factory.mktemp("vae") / "vae")
    ae.save_pretrained(path)
    return path


def test_fingerprint_is_stable_and_sees_one_weight_and_the_scale(tiny_dir):
    ae = AutoencoderKL.from_pretrained(tiny_dir, low_cpu_mem_usage=False)
    fp = vae_fingerprint(ae)
    assert fp == vae_fingerprint(ae) == FrozenVAE.from_pretrained(tiny_dir).fingerprint
    with torch.no_grad():
        ae.decoder.conv_out.weight[0, 0, 0, 0] += 1e-3
    assert vae_fingerprint(ae) != fp
    with torch.no_grad():
        ae.decoder.conv_out.weight[0, 0, 0, 0] -= 1e-3
    assert vae_fingerprint(ae) == fp
    ae.register_to_config(scaling_factor=0.8)
    assert vae_fingerprint(ae) != fp


def test_encode_decode_shapes_with_odd_frame_count(tiny_dir):
    vae = FrozenVAE.from_pretrained(tiny_dir, "cpu", encode_batch_frames=3)  # chunks of 3 frames
    assert (vae.scaling_factor, vae.shift_factor) == (0.7, 0.1)
    assert (vae.latent_channels, vae.downsample_factor, vae.path) == (4, 4, tiny_dir)
    pixels = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, 3, T, H, W), T odd
    latents = vae.encode(pixels)
    assert latents.shape == (2, 4, 5, 4, 4)
    out = vae.decode(latents)
    assert out.shape == (2, 3, 5, 16, 16)
    assert out.min() >= -1 and out.max() <= 1
    mean, std = vae.encode_moments(pixels)
    assert mean.shape == std.shape == (2, 4, 5, 4, 4)
    # sample=False is the scaled posterior mean; chunking does not change anything.
    torch.testing.assert_close(vae.encode(pixels, sample=False), (mean - 0.1) * 0.7)
    whole = FrozenVAE.from_pretrained(tiny_dir, "cpu", encode_batch_frames=64)
    torch.testing.assert_close(whole.encode(pixels, sample=False), vae.encode(pixels, sample=False),
                               rtol=1e-4, atol=1e-5)
    # Frame order survives the (b t) fold: frame 3 of clip 1 alone gives the same latent.
    alone = vae.encode(pixels[1:2, :, 3:4], sample=False)
    torch.testing.assert_close(alone[0, :, 0], vae.encode(pixels, sample=False)[1, :, 3],
                               rtol=1e-4, atol=1e-5)
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(vae.encode(pixels, generator=g()), vae.encode(pixels, generator=g()))


def test_frozen_vae_has_no_grads_and_stays_in_eval(tiny_dir):
    vae = FrozenVAE.from_pretrained(tiny_dir)
    assert not any(p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training and not vae.ae.training
    pixels = (torch.rand(1, 3, 2, 16, 16) * 2 - 1).requires_grad_(True)
    assert not vae.encode(pixels).requires_grad
    assert not vae.decode(torch.randn(1, 4, 2, 4, 4)).requires_grad


def test_missing_and_corrupt_dirs_name_the_path(tmp_path, tiny_dir):
    missing = str(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="nope.*train_vae.py"):
        FrozenVAE.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match=f"{empty}.*config.json"):
        FrozenVAE.from_pretrained(str(empty))
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=f"{bad_json}.*train_vae.py"):
        FrozenVAE.from_pretrained(str(bad_json))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in os.listdir(tiny_dir):
        data = open(os.path.join(tiny_dir, name), "rb").read()
        if name.endswith(".safetensors"):
            data = data[: len(data) // 2]
        (truncated / name).write_bytes(data)
    with pytest.raises(UserError, match=f"{truncated}.*vae.path"):
        FrozenVAE.from_pretrained(str(truncated))


def test_vae_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    ae = build_autoencoder(TINY_ARCH)
    shapes = MovingShapes(DataConfig(resolution=16, builtin=BuiltinDataConfig(num_clips=4)))
    frames = torch.stack([shapes[i * shapes.windows]["video"][:, 0] for i in range(4)])  # (4, 3, H, W)
    loss_fn, opt = VAELoss(), torch.optim.AdamW(ae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, parts = loss_fn(ae, frames)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert parts["recon"].shape == frames.shape
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- train_vae.py

TINY_OVERRIDES = [
    "device=cpu", "data.resolution=16", "data.builtin.num_clips=4", "data.builtin.num_val_clips=2",
    "vae.block_out_channels=[8,16,16]", "vae.norm_num_groups=8", "vae.mid_block_attention=false",
    "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1", "train.image_every=2",
    "train.checkpoint_every=100", "train.scale_num_clips=4",
]


def run_train_vae(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_vae.py", "--config", "config_vae.yaml",
                           *TINY_OVERRIDES, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    runs = tmp_path_factory.mktemp("runs")
    proc = run_train_vae(f"experiment.runs_dir={runs}", "experiment.name=tiny", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    return str(runs / "tiny")


def test_train_vae_writes_a_loadable_run(tiny_run):
    for name in ("config.yaml", "log.txt", "latest.pth", "vae/config.json"):
        assert os.path.isfile(os.path.join(tiny_run, name)), name
    assert os.listdir(os.path.join(tiny_run, "tensorboard"))
    cfg = load_config(VAERunConfig, os.path.join(tiny_run, "config.yaml"))  # resolved and valid
    assert cfg.train.max_steps == 3 and cfg.data.resolution == 16
    ckpt = torch.load(os.path.join(tiny_run, "latest.pth"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["train"]["max_steps"] == 3
    # The saved scale is 1 / std of the posterior means over the same training clips.
    ae = AutoencoderKL.from_pretrained(os.path.join(tiny_run, "vae"), low_cpu_mem_usage=False)
    train_set = MovingShapes(cfg.data, "train", cfg.experiment.seed)
    idx = np.linspace(0, len(train_set) - 1, min(4, len(train_set))).round().astype(int)
    videos = torch.stack([train_set[int(i)]["video"] for i in idx])
    mean, _ = FrozenVAE(ae).encode_moments(videos)
    assert ae.config.scaling_factor == pytest.approx(1 / mean.std().item(), rel=1e-4)
    log = open(os.path.join(tiny_run, "log.txt")).read()
    assert "held-out PSNR" in log and "scaling_factor" in log


def test_train_vae_resumes_from_latest(tiny_run):
    runs, name = os.path.split(tiny_run)
    proc = run_train_vae(f"experiment.runs_dir={runs}", f"experiment.name={name}",
                         "train.max_steps=4", "train.resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in open(os.path.join(tiny_run, "log.txt")).read()
    assert torch.load(os.path.join(tiny_run, "latest.pth"), weights_only=True)["step"] == 4


def test_train_vae_bad_override_exits_with_the_key_and_no_traceback(tmp_path):
    proc = run_train_vae(f"experiment.runs_dir={tmp_path}", "train.max_stepz=3")
    assert proc.returncode != 0
    assert "train.max_stepz" in proc.stderr and "Traceback" not in proc.stderr
