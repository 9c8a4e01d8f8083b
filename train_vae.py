"""Stage 1: train the per-frame VAE on frames of the training data, measure its latent scale.

    python train_vae.py --config config_vae.yaml [key.sub=value ...]

Writes <runs_dir>/<name>/: config.yaml, log.txt, tensorboard/, latest.pth and, at the end,
vae/ (a diffusers AutoencoderKL directory whose config holds the measured scaling_factor).
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make CPU training ~15x slower as soon as another
# process shares the cores (measured here: 0.15 vs 2.2 steps/s); passive waiting costs little
# when the machine is quiet. Must be set before torch loads libgomp; an explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tqdm
from diffusers import AutoencoderKL
from einops import rearrange

from data import build_dataset
from data.loader import batches_per_epoch, make_loader, set_epoch
from models.vae import FrozenVAE, VAELoss, build_autoencoder
from utils.checkpoint import atomic_save, capture_rng, load_checkpoint, restore_rng
from utils.cli import parse_args, run_main
from utils.config import VAERunConfig, config_to_dict, dump_config, load_config
from utils.errors import UserError
from utils.logging import RunLogger
from utils.metrics import psnr
from utils.train_utils import (autocast_context, count_parameters, lr_multiplier, make_adamw,
                               make_grad_scaler, resolve_device, resolve_precision, seed_everything,
                               set_tf32, use_fast_adamw)


@dataclass
class Stage1:
    """What the loop and the checkpoints touch."""
    cfg: VAERunConfig
    ae: AutoencoderKL
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: dict  # step (optimizer steps done), epoch, batch_in_epoch (the data position)
    run_dir: str
    log: RunLogger
    device: torch.device
    amp_dtype: torch.dtype  # autocast dtype; float32 = no autocast


def main(argv: Optional[list[str]] = None) -> int:
    started = time.monotonic()  # the time limit counts from here, startup included
    config_path, overrides, _ = parse_args(argv, "Stage 1: train the per-frame VAE.")
    cfg = load_config(VAERunConfig, config_path, overrides)
    run_dir = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name)
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    log = RunLogger(run_dir)
    try:
        seed_everything(cfg.experiment.seed)
        device = resolve_device(cfg.device)
        amp_dtype = resolve_precision(cfg.train.precision, device)
        set_tf32(cfg.train.tf32)
        train_set = build_dataset(cfg.data, "train", cfg.experiment.seed)
        val_set = build_dataset(cfg.data, "val", cfg.experiment.seed)
        ae = build_autoencoder(cfg.vae).to(device)
        opt = make_adamw(ae.parameters(), cfg.train.lr, weight_decay=cfg.train.weight_decay)
        run = Stage1(cfg, ae, opt, make_grad_scaler(device, amp_dtype),
                     {"step": 0, "epoch": 0, "batch_in_epoch": 0}, run_dir, log, device, amp_dtype)
        resume(run)
        log.info(f"run {run_dir}: {count_parameters(ae)[1] / 1e6:.2f}M params on {device} "
                 f"({amp_dtype}), {len(train_set)} training / {len(val_set)} held-out windows")
        deadline = started + 60 * cfg.train.time_limit_minutes if cfg.train.time_limit_minutes \
            else float("inf")
        train(run, train_set, val_set, deadline)
        finish(run, train_set, val_set)
        log.info(f"done in {time.monotonic() - started:.0f} s")
    finally:
        log.close()
    return 0


def resume(run: Stage1) -> None:
    """Load `train.resume` into `run` (`auto`: this run's latest.pth if present; null: fresh)."""
    path = run.cfg.train.resume
    if path == "auto":
        path = os.path.join(run.run_dir, "latest.pth")
        if not os.path.isfile(path):
            return
    if path is None:
        return
    ckpt = load_checkpoint(path)
    saved_vae = ckpt.get("config", {}).get("vae")
    if saved_vae != config_to_dict(run.cfg)["vae"]:
        raise UserError(f"checkpoint {path} was trained with vae = {saved_vae}, not the vae section "
                        "of this config: resume with the same vae settings or start fresh "
                        "(train.resume=null)")
    run.ae.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    use_fast_adamw(run.opt)
    run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    run.state = {k: ckpt[k] for k in run.state}
    run.log.info(f"resumed from {path} at step {ckpt['step']}")


def train(run: Stage1, train_set, val_set, deadline: float) -> None:
    """Optimise until max_steps, epochs or the deadline (time.monotonic() seconds)."""
    tc, state, ae = run.cfg.train, run.state, run.ae
    loss_fn = VAELoss(tc.l1_weight, tc.mse_weight, tc.kl_weight)
    loader = make_loader(train_set, tc.batch_size, shuffle=True, seed=run.cfg.experiment.seed,
                         num_workers=run.cfg.data.num_workers, device_type=run.device.type)
    total_steps = min(tc.max_steps or 10**12, tc.epochs * batches_per_epoch(loader))
    preview = stack_videos(val_set, 4)  # (4, 3, T, H, W) held-out clips for the image grid
    bar = tqdm.tqdm(total=total_steps, initial=state["step"], desc="vae", dynamic_ncols=True)
    since = time.monotonic()
    ae.train()
    while state["step"] < total_steps and time.monotonic() < deadline:
        set_epoch(loader, state["epoch"])
        loader.sampler.set_start(state["batch_in_epoch"] * tc.batch_size)  # resume mid-epoch
        for batch in loader:
            # Forward and backward.
            frames = pick_frames(batch["video"].to(run.device, non_blocking=True), tc.frames_per_clip)
            with autocast_context(run.device, run.amp_dtype):
                loss, out = loss_fn(ae, frames)
            run.opt.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            # Step.
            position = schedule_position(state["step"], total_steps, since, deadline)
            lr = tc.lr * lr_multiplier(position, warmup_steps=tc.warmup_steps,
                                       total_steps=total_steps, schedule=tc.lr_schedule,
                                       min_lr_ratio=tc.min_lr_ratio)
            for group in run.opt.param_groups:
                group["lr"] = lr
            if tc.grad_clip is not None:
                run.scaler.unscale_(run.opt)
                torch.nn.utils.clip_grad_norm_(ae.parameters(), tc.grad_clip)
            run.scaler.step(run.opt)
            run.scaler.update()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            bar.update(1)
            # Log, preview, checkpoint.
            step = state["step"]
            if step % tc.log_every == 0 or step == total_steps:
                values = {"vae/loss": loss.item(), "vae/psnr": psnr(out["recon"], frames), "vae/lr": lr}
                run.log.scalars(values, step)
                bar.set_postfix(loss=f"{values['vae/loss']:.4f}", psnr=f"{values['vae/psnr']:.1f}")
            if step % tc.image_every == 0:
                run.log.image("vae/reconstructions", reconstruction_grid(ae, preview), step)
            done = step >= total_steps or time.monotonic() >= deadline
            if step % tc.checkpoint_every == 0 or done:
                save_checkpoint(run)
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    why = "the step budget (max_steps, epochs)" if state["step"] >= total_steps else "the time limit"
    run.log.info(f"stopped at step {state['step']} (epoch {state['epoch']}) by {why}")


def schedule_position(step: int, total_steps: int, since: float, deadline: float) -> float:
    """The step the LR schedule is at: `step`, or further when the time limit will stop the run
    before `total_steps`, so that a slow machine still anneals the LR before the deadline."""
    if deadline == float("inf"):
        return step
    return max(step, total_steps * (time.monotonic() - since) / max(deadline - since, 1e-9))


def pick_frames(videos: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B*k, 3, H, W): k distinct random frames of each clip (None: all).

    Frames of one clip are near copies; a batch of frames from many clips gives the VAE far
    better gradients for the same compute.
    """
    b, _, t = videos.shape[:3]
    if k is None or k >= t:
        return rearrange(videos, "b c t h w -> (b t) c h w")
    idx = torch.rand(b, t).argsort(dim=1)[:, :k].to(videos.device)  # (B, k)
    picked = videos[torch.arange(b, device=videos.device)[:, None], :, idx]  # (B, k, 3, H, W)
    return rearrange(picked, "b k c h w -> (b k) c h w")


def save_checkpoint(run: Stage1) -> None:
    atomic_save({"model": run.ae.state_dict(), "optimizer": run.opt.state_dict(),
                 "scaler": run.scaler.state_dict(), **run.state, "rng": capture_rng(),
                 "config": config_to_dict(run.cfg)}, os.path.join(run.run_dir, "latest.pth"))


@torch.no_grad()
def reconstruction_grid(ae, videos: torch.Tensor) -> np.ndarray:
    """Originals above reconstructions, one row pair per clip -> (2*B*H, T*W, 3) uint8."""
    was_training = ae.training
    ae.eval()
    device = next(ae.parameters()).device
    frames = rearrange(videos, "b c t h w -> (b t) c h w").to(device)
    recon = ae(frames).sample.clamp(-1, 1).cpu()  # posterior mean, (B*T, 3, H, W)
    ae.train(was_training)
    pairs = torch.stack([frames.cpu(), recon])  # (2, B*T, 3, H, W)
    grid = rearrange(pairs, "two (b t) c h w -> (b two h) (t w) c", b=videos.shape[0])
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def stack_videos(dataset, count: int) -> torch.Tensor:
    """`count` windows evenly spread over the dataset -> (count, 3, T, H, W)."""
    idx = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    return torch.stack([dataset[int(i)]["video"] for i in idx])


def finish(run: Stage1, train_set, val_set) -> None:
    """Measure scaling_factor = 1 / std(posterior means), save vae/, report held-out PSNR."""
    train_videos = stack_videos(train_set, run.cfg.train.scale_num_clips)  # (N, 3, T, H, W)
    mean, _ = FrozenVAE(run.ae).encode_moments(train_videos)  # (N, C, T, h, w), unscaled
    scale = 1.0 / mean.std().item()  # one global std over all channels, as Stable Diffusion
    run.ae.register_to_config(scaling_factor=scale)
    vae_dir = os.path.join(run.run_dir, "vae")
    run.ae.save_pretrained(vae_dir)
    vae = FrozenVAE.from_pretrained(vae_dir, run.device)  # exactly what stage 2 will load
    latents = vae.encode(train_videos, generator=torch.Generator(run.device).manual_seed(0))
    val_videos = stack_videos(val_set, len(val_set))
    heldout = psnr(vae.decode(vae.encode(val_videos, sample=False)).cpu(), val_videos)
    run.log.scalar("vae/heldout_psnr", heldout, run.state["step"])
    run.log.info(f"scaling_factor = {scale:.4f} (1 / std of posterior means over "
                 f"{len(train_videos)} training clips); scaled latent std on training data = "
                 f"{latents.std().item():.3f}\n"
                 f"held-out PSNR = {heldout:.2f} dB over {len(val_videos)} val clips\n"
                 f"saved {vae_dir} (fingerprint {vae.fingerprint})")


if __name__ == "__main__":
    run_main(main)
