"""Generate videos from a stage-2 checkpoint with the VAE and schedule it was trained with.

    python predict_advanced.py --config predict_advanced.yaml [key=value ...]
"""
from __future__ import annotations

from typing import Optional

import torch

from models.vae import FrozenVAE
from training.checkpoints import (check_format, check_vae, ensure_writable_dir,
                                  model_from_checkpoint)
from training.sampling import default_labels, generate_videos, save_videos
from utils.checkpoint import load_checkpoint
from utils.cli import parse_args, run_main
from utils.config import DiffusionConfig, PredictConfig, VAERefConfig, config_from_dict, load_config
from utils.errors import UserError
from utils.train_utils import resolve_device


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, _ = parse_args(argv, __doc__)
    cfg = load_config(PredictConfig, config_path, overrides)
    device = resolve_device(cfg.device)
    ensure_writable_dir(cfg.output_dir, "output_dir")
    videos, _ = sample_videos(cfg, device)
    paths = save_videos(cfg.output_dir, videos, cfg.fps)
    print(f"wrote {len(videos)} videos ({len(paths)} files) to {cfg.output_dir}: "
          f"sample_000.mp4/.gif ... grid.png")
    return 0


def sample_videos(cfg: PredictConfig, device: torch.device) -> tuple[list, dict]:
    """(uint8 videos (T, H, W, 3), checkpoint) from cfg.checkpoint with the VAE it was trained
    with (fingerprint checked), EMA or raw weights, the configured sampler and labels."""
    ckpt = load_checkpoint(cfg.checkpoint)
    check_format(ckpt, cfg.checkpoint)
    vae = FrozenVAE.from_config(_trained_vae_settings(ckpt), device, cfg.vae.path or ckpt["vae"]["path"])
    check_vae(ckpt, vae, cfg.checkpoint)
    model = model_from_checkpoint(ckpt, cfg.use_ema, device)
    dims = ckpt["model"]["dims"]
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
    dims = ckpt["model"]["dims"]
    return generate_videos(
        model, vae, config_from_dict(DiffusionConfig, ckpt["diffusion"]),
        latent_shape=(dims["in_channels"], dims["num_frames"], dims["latent_size"], dims["latent_size"]),
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


if __name__ == "__main__":
    run_main(main)
