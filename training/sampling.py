"""Sampling videos: the one path shared by validation (during training), predict and the
benchmarks (`sample_videos`: checkpoint -> videos).

Latents come from `models.diffusion.sample` with a diffusers scheduler built from the
checkpoint's schedule, and are decoded by the same frozen VAE the DiT was trained on.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from models.diffusion import make_scheduler, sample
from models.vae import FrozenVAE
from training.checkpoints import check_format, check_vae, latent_shape, model_dims, model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.config import DiffusionConfig, PredictConfig, VAERefConfig, config_from_dict
from utils.errors import UserError
from utils.video_io import save_grid_png, video_tensor_to_uint8, write_video


def default_labels(num_videos: int, num_classes: int,
                   class_labels: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """One label per video: the given ones cycled, else 0, 1, 2, ... over the classes."""
    if num_classes == 0:
        return None
    labels = list(class_labels) if class_labels else list(range(num_classes))
    return torch.tensor([labels[i % len(labels)] for i in range(num_videos)], dtype=torch.long)


@torch.no_grad()
def generate_videos(model: nn.Module, vae: FrozenVAE, diffusion_cfg: DiffusionConfig, *,
                    latent_shape: Sequence[int], seeds: Sequence[int], labels: Optional[torch.Tensor],
                    sampler: str, num_steps: int, guidance_scale: float, null_class_id: Optional[int],
                    device: torch.device, batch_size: int = 8, progress: bool = False) -> list[np.ndarray]:
    """Sample one video per seed. Returns uint8 frames (T, H, W, 3) per video, H x W the VAE's
    decode of `latent_shape`'s (h, w): data.resolution of the training run, square or not.

    Each video has its own generator seeded with its seed, so video i is the same whatever
    the batch size or the other videos.
    """
    model.eval()
    videos = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        generators = [torch.Generator(device).manual_seed(int(s)) for s in chunk]
        y = labels[start:start + len(chunk)].to(device) if labels is not None else None
        scheduler = make_scheduler(sampler, diffusion_cfg)
        latents = sample(model, (len(chunk), *latent_shape), scheduler=scheduler, num_steps=num_steps,
                         generator=generators, device=device, y=y, guidance_scale=guidance_scale,
                         null_class_id=null_class_id, progress=progress)  # (B, C, T, h, w)
        pixels = vae.decode(latents.float())  # (B, 3, T, H, W) in [-1, 1]
        videos.extend(video_tensor_to_uint8(v) for v in pixels.cpu())
    return videos


def save_videos(out_dir: str, videos: Sequence[np.ndarray], fps: int) -> list[str]:
    """Writes sample_000.mp4 / .gif, ... and grid.png; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, frames in enumerate(videos):
        for ext in (".mp4", ".gif"):
            path = os.path.join(out_dir, f"sample_{i:03d}{ext}")
            write_video(path, frames, fps)
            paths.append(path)
    grid = os.path.join(out_dir, "grid.png")
    save_grid_png(grid, list(videos))
    paths.append(grid)
    return paths


def side_by_side(videos: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) next to each other as one (T, H, n*W + gaps, 3) video for TensorBoard."""
    t, h, _, _ = videos[0].shape
    sep = np.full((t, h, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, v in enumerate(videos):
        parts.extend([sep, v] if i else [v])
    return np.concatenate(parts, axis=2)


def sample_videos(cfg: PredictConfig, device: torch.device) -> tuple[list, dict]:
    """(uint8 videos (T, H, W, 3), checkpoint) from cfg.checkpoint with the VAE it was trained
    with (fingerprint checked), EMA or raw weights, the configured sampler and labels."""
    ckpt = load_checkpoint(cfg.checkpoint)
    check_format(ckpt, cfg.checkpoint)
    vae = FrozenVAE.from_config(_trained_vae_settings(ckpt), device, cfg.vae.path or ckpt["vae"]["path"])
    check_vae(ckpt, vae, cfg.checkpoint)
    model = model_from_checkpoint(ckpt, cfg.use_ema, device)
    dims = model_dims(ckpt["model"])
    labels = _labels(cfg, dims["num_classes"], ckpt.get("class_names", []))
    guidance = (f"guidance {cfg.guidance_scale}" if dims["num_classes"] or cfg.guidance_scale == 1
                else f"no guidance (guidance_scale = {cfg.guidance_scale} needs a class-conditional model)")
    print(f"checkpoint {cfg.checkpoint}: step {ckpt['step']}, {'EMA' if cfg.use_ema else 'raw'} weights; "
          f"VAE {vae.path} (fingerprint {vae.fingerprint} matches); sampler {cfg.sampler}, "
          f"{cfg.num_steps} steps, {guidance}")
    try:
        return _generate(cfg, model, vae, ckpt, labels, device), ckpt
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory sampling {cfg.batch_size} videos at once; lower "
                        "batch_size (videos sampled together) or guidance (cfg doubles the batch)") from None


def _trained_vae_settings(ckpt: dict) -> VAERefConfig:
    """The vae.* settings the checkpoint was trained with (dtype, tiling, slicing, frames per
    call): predict decodes exactly as validation did. `subfolder` is dropped: the recorded path
    is the VAE folder itself."""
    recorded = {k: v for k, v in ckpt["config"]["vae"].items() if k in VAERefConfig.__dataclass_fields__}
    return config_from_dict(VAERefConfig, {**recorded, "subfolder": None})


def _generate(cfg: PredictConfig, model, vae, ckpt: dict, labels, device) -> list:
    return generate_videos(
        model, vae, config_from_dict(DiffusionConfig, ckpt["diffusion"]),
        latent_shape=latent_shape(model_dims(ckpt["model"])),
        seeds=[cfg.seed + i for i in range(cfg.num_videos)], labels=labels, sampler=cfg.sampler,
        num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, null_class_id=model.null_class_id,
        device=device, batch_size=cfg.batch_size, progress=True)


def _labels(cfg: PredictConfig, num_classes: int, class_names: list):
    if cfg.class_labels and num_classes == 0:
        raise UserError("class_labels is set but this checkpoint's model is unconditional; "
                        "remove class_labels")
    for label in cfg.class_labels or []:
        if not 0 <= label < num_classes:
            names = ", ".join(f"{i}={n}" for i, n in enumerate(class_names)) or f"0..{num_classes - 1}"
            raise UserError(f"class_labels contains {label}: this model knows classes {names}")
    return default_labels(cfg.num_videos, num_classes, cfg.class_labels)
