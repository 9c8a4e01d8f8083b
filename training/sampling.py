"""Sampling videos: the one path shared by validation (during training), predict and the
benchmarks (`sample_videos`: checkpoint -> videos).

Latents come from `models.diffusion.sample` with a diffusers scheduler built from the
checkpoint's schedule, and are decoded by the same frozen VAE the DiT was trained on.

predict streams (`predict_to_folder`): each batch of videos is written as soon as it is
decoded (every file written under a temp name, then renamed), so Ctrl-C or SIGTERM keeps
every finished video and memory does not grow with `num_videos`.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from models.diffusion import flow_mu, make_scheduler, sample
from models.vae import FrozenVAE
from training.checkpoints import (PREDICT_ENTRIES, check_entries, check_format, check_vae,
                                  latent_shape, model_dims, model_from_checkpoint)
from utils.checkpoint import load_checkpoint
from utils.config import (DiffusionConfig, PredictConfig, VAERefConfig, check_num_steps,
                          check_sampler, config_from_dict)
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
    return [v for batch in generate_batches(
        model, vae, diffusion_cfg, latent_shape=latent_shape, seeds=seeds, labels=labels,
        sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
        null_class_id=null_class_id, device=device, batch_size=batch_size, progress=progress)
        for v in batch]


@torch.no_grad()
def generate_batches(model: nn.Module, vae: FrozenVAE, diffusion_cfg: DiffusionConfig, *,
                     latent_shape: Sequence[int], seeds: Sequence[int], labels: Optional[torch.Tensor],
                     sampler: str, num_steps: int, guidance_scale: float, null_class_id: Optional[int],
                     device: torch.device, batch_size: int = 8,
                     progress: bool = False) -> Iterator[list[np.ndarray]]:
    """`generate_videos`, one batch of uint8 videos (T, H, W, 3) at a time, as each is decoded."""
    model.eval()
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        generators = [torch.Generator(device).manual_seed(int(s)) for s in chunk]
        y = labels[start:start + len(chunk)].to(device) if labels is not None else None
        scheduler = make_scheduler(sampler, diffusion_cfg)
        latents = sample(model, (len(chunk), *latent_shape), scheduler=scheduler, num_steps=num_steps,
                         generator=generators, device=device, y=y, guidance_scale=guidance_scale,
                         null_class_id=null_class_id, progress=progress,
                         mu=flow_mu(diffusion_cfg, (len(chunk), *latent_shape)))  # (B, C, T, h, w)
        pixels = vae.decode(latents.float())  # (B, 3, T, H, W) in [-1, 1]
        yield [video_tensor_to_uint8(v) for v in pixels.cpu()]


SAMPLE_EXTS = (".mp4", ".gif")
GRID_FRAMES = 16  # frames per video in grid.png
GRID_MAX_VIDEOS = 64  # rows of grid.png: the first videos (memory stays bounded)
_SAMPLE_NAME = re.compile(r"sample_\d{3,}\.(mp4|gif)$")


class SampleWriter:
    """Writes sample_{i:03d}.mp4/.gif as videos arrive, each under a temp name then renamed (a
    file is whole or absent), and keeps the few frames grid.png needs."""

    def __init__(self, out_dir: str, fps: int):
        self.out_dir, self.fps = out_dir, fps
        self.count, self.paths, self.thumbs = 0, [], []
        os.makedirs(out_dir, exist_ok=True)

    def add(self, frames: np.ndarray) -> None:
        """`frames`: (T, H, W, 3) uint8, written as the next sample (all its files, or none)."""
        names = [f"sample_{self.count:03d}{ext}" for ext in SAMPLE_EXTS]
        paths = [os.path.join(self.out_dir, n) for n in names]
        tmps = [os.path.join(self.out_dir, f".tmp_{n}") for n in names]
        try:
            for tmp in tmps:
                write_video(tmp, frames, self.fps)
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
        except BaseException:  # an interruption mid-write leaves no part of this sample
            for path in tmps + paths:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            raise
        self.paths.extend(paths)
        if len(self.thumbs) < GRID_MAX_VIDEOS:  # the frames save_grid_png would pick
            keep = np.linspace(0, len(frames) - 1, min(GRID_FRAMES, len(frames))).round().astype(int)
            self.thumbs.append(frames[keep])
        self.count += 1

    def write_grid(self) -> Optional[str]:
        if not self.thumbs:
            return None
        grid = os.path.join(self.out_dir, "grid.png")
        save_grid_png(grid, self.thumbs, max_frames=GRID_FRAMES)
        self.paths.append(grid)
        return grid


def save_videos(out_dir: str, videos: Sequence[np.ndarray], fps: int) -> list[str]:
    """Writes sample_000.mp4 / .gif, ... and grid.png; returns the written paths."""
    writer = SampleWriter(out_dir, fps)
    for frames in videos:
        writer.add(frames)
    writer.write_grid()
    return writer.paths


def remove_stale_samples(out_dir: str) -> list[str]:
    """sample_NNN.mp4/.gif files (and temp files) an earlier run left in `out_dir`, removed so
    that the folder holds this run's videos only. Returns the removed names."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*"))):
        name = os.path.basename(path)
        if _SAMPLE_NAME.match(name) or name.startswith(".tmp_sample_"):
            os.remove(path)
            removed.append(name)
    return removed


def output_fps(fps: Optional[float], ckpt: dict) -> float:
    """Frames per second to write sampled videos at: `fps`, else the rate the checkpoint
    records for its training windows (older checkpoints: their validation.fps)."""
    return fps or ckpt.get("fps") or ckpt["config"]["validation"]["fps"]


def side_by_side(videos: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) next to each other as one (T, H, n*W + gaps, 3) video for TensorBoard."""
    t, h, _, _ = videos[0].shape
    sep = np.full((t, h, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, v in enumerate(videos):
        parts.extend([sep, v] if i else [v])
    return np.concatenate(parts, axis=2)


@dataclass
class Loaded:
    """A checkpoint ready to sample from: checked, with its model, VAE and labels."""
    ckpt: dict
    model: nn.Module
    vae: FrozenVAE
    labels: Optional[torch.Tensor]


def load_for_sampling(cfg: PredictConfig, device: torch.device) -> Loaded:
    """cfg.checkpoint with the VAE it was trained with (fingerprint checked), EMA or raw
    weights, the configured labels; every check made before a video is sampled."""
    ckpt = load_checkpoint(cfg.checkpoint)
    check_format(ckpt, cfg.checkpoint)
    check_entries(ckpt, cfg.checkpoint, PREDICT_ENTRIES)
    check_num_steps(cfg.num_steps, ckpt["diffusion"].get("num_train_timesteps", cfg.num_steps), "num_steps")
    # The objective the checkpoint was trained with (recorded since flow matching; older ones are v).
    objective = config_from_dict(DiffusionConfig, ckpt["diffusion"]).objective
    check_sampler(cfg.sampler, objective, "sampler", f"checkpoint {cfg.checkpoint}, trained with")
    dims = model_dims(ckpt["model"])
    labels = _labels(cfg, dims.get("num_classes", 0), ckpt.get("class_names", []))
    vae = FrozenVAE.from_config(_trained_vae_settings(ckpt), device, cfg.vae.path or ckpt["vae"]["path"])
    check_vae(ckpt, vae, cfg.checkpoint)
    model = model_from_checkpoint(ckpt, cfg.use_ema, device)
    guidance = (f"guidance {cfg.guidance_scale}" if dims["num_classes"] or cfg.guidance_scale == 1
                else f"no guidance (guidance_scale = {cfg.guidance_scale} needs a class-conditional model)")
    print(f"checkpoint {cfg.checkpoint}: step {ckpt['step']}, {'EMA' if cfg.use_ema else 'raw'} weights, "
          f"{objective}; "
          f"VAE {vae.path} (fingerprint {vae.fingerprint} matches); sampler {cfg.sampler}, "
          f"{cfg.num_steps} steps, {guidance}")
    return Loaded(ckpt, model, vae, labels)


def sample_videos(cfg: PredictConfig, device: torch.device) -> tuple[list, dict]:
    """(uint8 videos (T, H, W, 3), checkpoint): every video of `cfg`, held in memory."""
    loaded = load_for_sampling(cfg, device)
    return [v for batch in _batches(cfg, loaded, device) for v in batch], loaded.ckpt


def predict_to_folder(cfg: PredictConfig, device: torch.device) -> SampleWriter:
    """Sample cfg.num_videos into cfg.output_dir, each batch written as it is finished, then
    grid.png. On Ctrl-C or SIGTERM the finished videos (and a grid of them) stay; the
    interruption is re-raised as KeyboardInterrupt."""
    loaded = load_for_sampling(cfg, device)  # refused now, before a file is touched
    removed = remove_stale_samples(cfg.output_dir)
    if removed:
        print(f"removed {len(removed)} sample files of an earlier run from {cfg.output_dir} "
              f"({removed[0]} ... {removed[-1]})")
    writer = SampleWriter(cfg.output_dir, output_fps(cfg.fps, loaded.ckpt))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for batch in _batches(cfg, loaded, device):
            for frames in batch:
                writer.add(frames)
    except KeyboardInterrupt:
        writer.write_grid()
        print(f"interrupted: {writer.count} of {cfg.num_videos} videos were finished and are in "
              f"{cfg.output_dir} (sample_000 ... sample_{max(writer.count - 1, 0):03d}); run again to "
              "make all of them (the same seeds give the same videos)")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    writer.write_grid()
    return writer


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _batches(cfg: PredictConfig, loaded: Loaded, device: torch.device) -> Iterator[list[np.ndarray]]:
    try:
        yield from _generate(cfg, loaded.model, loaded.vae, loaded.ckpt, loaded.labels, device)
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory sampling {cfg.batch_size} videos at once; lower "
                        "batch_size (videos sampled together) or guidance (cfg doubles the batch)") from None


def _trained_vae_settings(ckpt: dict) -> VAERefConfig:
    """The vae.* settings the checkpoint was trained with (dtype, tiling, slicing, frames per
    call): predict decodes exactly as validation did. `subfolder` is dropped: the recorded path
    is the VAE folder itself."""
    recorded = {k: v for k, v in ckpt["config"]["vae"].items() if k in VAERefConfig.__dataclass_fields__}
    return config_from_dict(VAERefConfig, {**recorded, "subfolder": None})


def _generate(cfg: PredictConfig, model, vae, ckpt: dict, labels, device) -> Iterator[list[np.ndarray]]:
    return generate_batches(
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
