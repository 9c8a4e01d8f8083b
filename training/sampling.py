"""Sampling videos: the one path shared by validation (during training) and predict.

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
from utils.config import DiffusionConfig
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
    """Sample one video per seed. Returns uint8 frames (T, H, W, 3) per video.

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
