"""Stage 1: train the per-frame VAE on frames of the training data, measure its latent scale.

    python train_vae.py --config config_vae.yaml [key.sub=value ...]

Writes <runs_dir>/<name>/: config.yaml, log.txt, tensorboard/, latest.pth and, at the end,
vae/ (a diffusers AutoencoderKL directory whose config holds the measured scaling_factor).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch
import tqdm
from einops import rearrange

try:  # TEMPORARY until data/__init__.py and data/loader.py land
    from data import build_dataset
    from data.loader import make_loader
except ImportError:
    from data.builtin import MovingShapes as build_dataset

    def make_loader(dataset, batch_size, *, shuffle, seed, num_workers=0, rank=0, world_size=1,
                    drop_last=True, device_type="cpu"):
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(dataset, batch_size, shuffle=shuffle, generator=g,
                                           num_workers=num_workers, drop_last=drop_last)
from models.vae import FrozenVAE, VAELoss, build_autoencoder, psnr
from utils.checkpoint import atomic_save, capture_rng, load_checkpoint, restore_rng
from utils.cli import parse_args, run_main
from utils.config import VAERunConfig, config_to_dict, dump_config, load_config
from utils.errors import UserError
from utils.logging import RunLogger
from utils.train_utils import (autocast_context, count_parameters, lr_multiplier, make_grad_scaler,
                               resolve_device, resolve_precision, seed_everything, set_tf32)


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
        opt = torch.optim.AdamW(ae.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scaler = make_grad_scaler(device, amp_dtype)
        state = resume(cfg, run_dir, ae, opt, scaler, log)
        log.info(f"run {run_dir}: {count_parameters(ae)[1] / 1e6:.2f}M params on {device} "
                 f"({amp_dtype}), {len(train_set)} training / {len(val_set)} held-out windows")
        train(cfg, ae, opt, scaler, train_set, val_set, state, run_dir, log, device, amp_dtype, started)
        finish(cfg, ae, train_set, val_set, state["step"], run_dir, log, device)
        log.info(f"done in {time.monotonic() - started:.0f} s")
    finally:
        log.close()
    return 0


def resume(cfg: VAERunConfig, run_dir: str, ae, opt, scaler, log: RunLogger) -> dict:
    """Fresh state, or the state of `train.resume` (`auto`: this run's latest.pth if present)."""
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    path = cfg.train.resume
    if path == "auto":
        path = os.path.join(run_dir, "latest.pth")
        if not os.path.isfile(path):
            return state
    if path is None:
        return state
    ckpt = load_checkpoint(path)
    if ckpt.get("config", {}).get("vae") != config_to_dict(cfg)["vae"]:
        raise UserError(f"checkpoint {path} was trained with vae = {ckpt.get('config', {}).get('vae')}, "
                        "not the vae section of this config: resume with the same vae settings or "
                        "start fresh (train.resume=null)")
    ae.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"])
    log.info(f"resumed from {path} at step {ckpt['step']}")
    return {k: ckpt[k] for k in state}


def train(cfg, ae, opt, scaler, train_set, val_set, state, run_dir, log, device, amp_dtype,
          started) -> None:
    tc = cfg.train
    loss_fn = VAELoss(tc.l1_weight, tc.mse_weight, tc.kl_weight)
    steps_per_epoch = len(train_set) // tc.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size = {tc.batch_size} is larger than the {len(train_set)} "
                        "training windows: lower it or add data")
    total_steps = min(tc.max_steps or 10**12, tc.epochs * steps_per_epoch)
    deadline = started + 60 * tc.time_limit_minutes if tc.time_limit_minutes else float("inf")
    preview = torch.stack([val_set[i]["video"] for i in range(min(2, len(val_set)))])  # (2, 3, T, H, W)
    bar = tqdm.tqdm(total=total_steps, initial=state["step"], desc="vae", dynamic_ncols=True)
    ae.train()
    while state["step"] < total_steps and time.monotonic() < deadline:
        loader = make_loader(train_set, tc.batch_size, shuffle=True,
                             seed=cfg.experiment.seed + state["epoch"], num_workers=cfg.data.num_workers,
                             drop_last=True, device_type=device.type)
        for i, batch in enumerate(loader):
            if i < state["batch_in_epoch"]:
                continue  # resuming mid-epoch: the order is the same, skip what was done
            # Forward and backward.
            frames = rearrange(batch["video"].to(device, non_blocking=True),
                               "b c t h w -> (b t) c h w")
            with autocast_context(device, amp_dtype):
                loss, out = loss_fn(ae, frames)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # Step.
            lr = tc.lr * lr_multiplier(state["step"], warmup_steps=tc.warmup_steps,
                                       total_steps=total_steps, schedule=tc.lr_schedule,
                                       min_lr_ratio=tc.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            if tc.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(ae.parameters(), tc.grad_clip)
            scaler.step(opt)
            scaler.update()
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            bar.update(1)
            # Log, preview, checkpoint.
            step = state["step"]
            if step % tc.log_every == 0 or step == total_steps:
                values = {"vae/loss": loss.item(), "vae/psnr": psnr(out["recon"], frames), "vae/lr": lr}
                log.scalars(values, step)
                bar.set_postfix(loss=f"{values['vae/loss']:.4f}", psnr=f"{values['vae/psnr']:.1f}")
            if step % tc.image_every == 0:
                log.image("vae/reconstructions", reconstruction_grid(ae, preview), step)
            done = step >= total_steps or time.monotonic() >= deadline
            if step % tc.checkpoint_every == 0 or done:
                save_checkpoint(cfg, ae, opt, scaler, state, run_dir)
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    stop = "time limit" if time.monotonic() >= deadline and state["step"] < total_steps else "steps"
    log.info(f"stopped at step {state['step']} (epoch {state['epoch']}) by {stop}")


def save_checkpoint(cfg, ae, opt, scaler, state: dict, run_dir: str) -> None:
    atomic_save({"model": ae.state_dict(), "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), **state, "rng": capture_rng(),
                 "config": config_to_dict(cfg)}, os.path.join(run_dir, "latest.pth"))


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


def finish(cfg, ae, train_set, val_set, step: int, run_dir: str, log: RunLogger, device) -> None:
    """Measure scaling_factor = 1 / std(posterior means), save vae/, report held-out PSNR."""
    train_videos = stack_videos(train_set, cfg.train.scale_num_clips)
    mean, _ = FrozenVAE(ae).encode_moments(train_videos)  # (N, C, T, h, w), unscaled
    scale = 1.0 / mean.std().item()
    ae.register_to_config(scaling_factor=scale)
    vae_dir = os.path.join(run_dir, "vae")
    ae.save_pretrained(vae_dir)
    vae = FrozenVAE.from_pretrained(vae_dir, device)  # exactly what stage 2 will load
    latents = vae.encode(train_videos, generator=torch.Generator(device).manual_seed(0))
    val_videos = stack_videos(val_set, len(val_set))
    heldout = psnr(vae.decode(vae.encode(val_videos, sample=False)), val_videos)
    log.scalar("vae/heldout_psnr", heldout, step)
    log.info(f"scaling_factor = {scale:.4f} (1 / std of posterior means over {len(train_videos)} "
             f"training clips); scaled latent std on training data = {latents.std().item():.3f}\n"
             f"held-out PSNR = {heldout:.2f} dB over {len(val_videos)} val clips\n"
             f"saved {vae_dir} (fingerprint {vae.fingerprint})")


if __name__ == "__main__":
    run_main(main)
