"""Stage 1: train the per-frame VAE on frames of the training data, measure its latent scale.

Runs on the machinery stage 2 uses (`training/common.py`): the same resume rules, time limit,
LR schedule, non-finite guard, fp16 loss scaling, SIGINT/SIGTERM handling, per-rank RNG in
the checkpoint, and DDP under torchrun (each rank takes its share of the clips; rank 0 logs,
checkpoints and writes vae/). `setup()` builds the parts, `train()` is the loop, `finish()`
measures the scaling factor, saves vae/ and reports the held-out PSNR.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import build_dataset
from data.loader import ResumableSampler, make_loader
from data.source_index import RUN_INDEX_FILE
from models.vae import FrozenVAE, VAELoss, build_autoencoder, vae_fingerprint
from training import checkpoints as ckpts
from training.common import (Deadline, LoopHooks, LRPlan, Position, StepControl, StepOutcome,
                             StopReason, capture_rank_rng, check_epoch, checkpoint_note,
                             make_lr_schedule, now, optimizer_step, out_of_memory,
                             restore_position, restore_rank_rng, run_epochs, seed_rank, total_steps)
from utils.checkpoint import atomic_save, load_checkpoint
from utils.config import VAERunConfig, config_to_dict
from utils.dist import DistInfo, all_reduce_mean, barrier
from utils.errors import UserError
from utils.logging import RunLogger
from utils.run_guard import save_before_fail, weights_finite
from utils.train_utils import (GracefulStop, autocast_context, count_parameters, make_adamw,
                               make_grad_scaler, use_fast_adamw)

PREVIEW_CLIPS = 4  # held-out clips in the TensorBoard reconstruction grid


class VAEObjective(nn.Module):
    """The autoencoder and its loss as one module: DDP syncs the gradients of what its forward
    computes, and the loss calls `encode` and `decode`, not the autoencoder's forward."""

    def __init__(self, ae: AutoencoderKL, loss_fn: VAELoss):
        super().__init__()
        self.ae, self.loss_fn = ae, loss_fn

    def forward(self, frames: torch.Tensor, generator: Optional[torch.Generator] = None):
        """`frames` (N, 3, H, W) -> (loss, {"recon": (N, 3, H, W), ...})."""
        return self.loss_fn(self.ae, frames, generator)


@dataclass
class Stage1:
    """Everything the loop and the checkpoints touch, built once by `setup()`."""
    cfg: VAERunConfig
    run_dir: str
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    log: RunLogger
    ae: AutoencoderKL  # the bare autoencoder: checkpoints and vae/ hold this
    net: nn.Module  # what the loop calls: the objective, maybe DDP-wrapped
    ddp: Optional[DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    loader: torch.utils.data.DataLoader
    sampler: ResumableSampler
    noise_gen: torch.Generator  # posterior samples: its state is checkpointed per rank
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    pos: Position
    total_steps: int
    deadline: Deadline  # train.time_limit_minutes: a hard stop
    plan: LRPlan  # the step the LR anneals to (and training ends at) under the time limit
    saved_step: int = 0  # the step latest.pth holds (a failing run saves only what is newer)
    control: Optional[StepControl] = None  # the loop's agreed stop decisions (set by train())


# ----------------------------------------------------------------------------- setup


def setup(cfg: VAERunConfig, run_dir: str, dist: DistInfo, device: torch.device, dtype: torch.dtype,
          log: RunLogger, resume_path: Optional[str], started: Optional[float] = None) -> Stage1:
    """`started`: time.monotonic() at launch, from which train.time_limit_minutes counts."""
    tcfg = cfg.train
    train_set = build_dataset(cfg.data, "train", cfg.experiment.seed,
                              index_file=os.path.join(run_dir, RUN_INDEX_FILE))
    val_set = build_dataset(cfg.data, "val", cfg.experiment.seed)
    steps_per_epoch = check_epoch(len(train_set), tcfg, dist)  # before the model: an epoch holds a batch
    ckpt = _checked_checkpoint(cfg, resume_path) if resume_path else None
    loader = make_loader(train_set, tcfg.batch_size, shuffle=True, seed=cfg.experiment.seed,
                         num_workers=cfg.data.num_workers, rank=dist.rank,
                         world_size=dist.world_size, device_type=device.type)
    ae = build_autoencoder(cfg.vae).to(device)
    objective = VAEObjective(ae, VAELoss(tcfg.l1_weight, tcfg.mse_weight, tcfg.kl_weight))
    ddp = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else None
    optimizer = make_adamw(ae.parameters(), tcfg.lr, weight_decay=tcfg.weight_decay)
    total = total_steps(tcfg, steps_per_epoch)
    deadline = Deadline(now() if started is None else started, tcfg.time_limit_minutes)
    plan = LRPlan(tcfg, total, deadline)
    s = Stage1(cfg, run_dir, dist, device, dtype, log, ae, ddp if ddp is not None else objective, ddp,
               optimizer, make_grad_scaler(device, dtype), make_lr_schedule(optimizer, plan), loader,
               loader.sampler, seed_rank(cfg.experiment.seed, dist, device), train_set, val_set,
               Position(), total, deadline, plan)
    if ckpt is not None:
        _resume(s, ckpt, resume_path)
    log.info(f"run {run_dir}: {count_parameters(ae)[1] / 1e6:.2f}M params on {device} ({dtype}), "
             f"world size {dist.world_size}, {len(train_set)} training / {len(val_set)} held-out "
             f"windows, {total} steps")
    return s


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dict(s: Stage1, gather: bool = True) -> dict:
    """Called on every rank (the RNG states are gathered); rank 0 writes it. `gather=False`: a
    failing run, whose other ranks may not answer, records rank 0's RNG states alone."""
    return {"format": ckpts.STAGE1_FORMAT,
            "step": s.pos.step, "epoch": s.pos.epoch, "micro": s.pos.micro,
            "world_size": s.dist.world_size, "batch_size": s.cfg.train.batch_size,
            "num_items": len(s.train_set),  # a resume on other data starts a new epoch
            "model_state": s.ae.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scaler": s.scaler.state_dict(), "lr_sched": s.lr_sched.state_dict(),
            "lr_plan": s.plan.state_dict(),
            "rng": capture_rank_rng(s.noise_gen, s.dist, gather),  # index = rank
            "config": config_to_dict(s.cfg)}


def save(s: Stage1, collective: bool = True) -> None:
    """Rank 0 writes latest.pth (atomically); everyone waits for it. `collective=False` (a
    failing run): no collective call, rank 0 alone writes."""
    ckpt = checkpoint_dict(s, gather=collective)
    if s.dist.is_main:
        atomic_save(ckpt, os.path.join(s.run_dir, "latest.pth"))
    s.saved_step = s.pos.step
    if collective:
        barrier(s.dist)


def _checked_checkpoint(cfg: VAERunConfig, path: str) -> dict:
    """The checkpoint to resume from, refused now if it does not fit this config."""
    ckpt = load_checkpoint(path, map_location="cpu")
    ckpts.check_format(ckpt, path, ckpts.STAGE1_FORMAT)
    ckpts.check_entries(ckpt, path, ckpts.STAGE1_ENTRIES)
    saved_vae = ckpt["config"].get("vae")
    if saved_vae != config_to_dict(cfg)["vae"]:
        raise UserError(f"checkpoint {path} was trained with vae = {saved_vae}, not the vae section "
                        "of this config: resume with the same vae settings or start fresh "
                        "(another experiment.name)")
    return ckpt


def _resume(s: Stage1, ckpt: dict, path: str) -> None:
    for entry, load in (("model_state", s.ae.load_state_dict), ("optimizer", s.optimizer.load_state_dict),
                        ("scaler", s.scaler.load_state_dict), ("lr_sched", s.lr_sched.load_state_dict)):
        ckpts.load_entry(path, entry, load, ckpt[entry])
    use_fast_adamw(s.optimizer)  # the checkpoint may carry another implementation's flags
    restore_rank_rng(ckpt["rng"], s.noise_gen, s.cfg.experiment.seed, s.dist, s.log)
    s.pos = restore_position(ckpt, s.dist, s.cfg.train.batch_size, len(s.train_set), s.log)
    s.saved_step = s.pos.step
    s.log.info(f"resumed from {path} at step {s.pos.step}")
    s.plan.load_state_dict(ckpt.get("lr_plan"), s.log)


# ----------------------------------------------------------------------------- the loop


def train(s: Stage1) -> bool:
    """Runs the loop; True when it ended by a signal (latest.pth saved, no vae/ yet). A CUDA
    out-of-memory error becomes a message saying what to change. Any error saves latest.pth
    first (when there is a sound, newer state) and is recorded in log.txt."""
    try:
        with save_before_fail(lambda: save(s, collective=False), lambda: s.pos.step,
                              lambda: s.saved_step, lambda: weights_finite(s.ae.parameters()),
                              s.log, os.path.join(s.run_dir, "latest.pth")):
            return _train_loop(s)
    except torch.OutOfMemoryError:
        raise out_of_memory(s.cfg.train.batch_size, s.device,
                            " (clips per batch) or train.frames_per_clip (frames per clip), or "
                            "use fewer vae.block_out_channels",
                            checkpoint_note(s.run_dir, s.cfg.train.checkpoint_every)) from None


def _train_loop(s: Stage1) -> bool:
    tcfg = s.cfg.train
    preview = stack_videos(s.val_set, PREVIEW_CLIPS) if s.dist.is_main else None  # (4, 3, T, H, W)
    bar = tqdm(total=s.total_steps, initial=s.pos.step, desc="vae", dynamic_ncols=True,
               disable=not s.dist.is_main)
    s.ae.train()
    meter = {"frames": 0, "steps": 0, "since": time.perf_counter()}  # since the last log step
    last = {}  # the step's tensors, read at log steps only

    def train_step(batch: dict) -> StepOutcome:
        # Forward and backward.
        frames = pick_frames(batch["video"].to(s.device, non_blocking=True), tcfg.frames_per_clip)
        with autocast_context(s.device, s.dtype):
            loss, out = s.net(frames, s.noise_gen)
        s.scaler.scale(loss).backward()
        # Step.
        outcome, grad_norm = optimizer_step(s.optimizer, s.scaler, loss, tcfg.grad_clip, s.control.agree)
        last.update(loss=loss, recon=out["recon"], frames=frames, grad_norm=grad_norm)
        return outcome

    def after_step() -> None:
        s.lr_sched.step()
        meter["frames"], meter["steps"] = meter["frames"] + last["frames"].shape[0], meter["steps"] + 1
        bar.update(1)
        # Log, preview, checkpoint.
        if s.pos.step % tcfg.log_every == 0 or s.pos.step == s.plan.end_step:
            _log_step(s, last["loss"], last["recon"], last["frames"], last["grad_norm"],
                      (meter["frames"], meter["steps"], meter["since"]), bar)
            meter.update(frames=0, steps=0, since=time.perf_counter())
        if s.pos.step % tcfg.image_every == 0 and s.dist.is_main:
            s.log.image("val/reconstructions", reconstruction_grid(s.ae, preview), s.pos.step)
        if s.pos.step % tcfg.checkpoint_every == 0:
            save(s)

    with GracefulStop() as stop:
        s.control = StepControl(s.dist, s.device, s.deadline, s.plan, s.pos, stop, s.log)
        reason = run_epochs(s, LoopHooks(train_step, after_step))
    bar.close()
    save(s)
    if reason is StopReason.SIGNAL:
        s.log.info(f"stopped by signal at step {s.pos.step}; saved {s.run_dir}/latest.pth "
                   "(continue with train.resume=auto; vae/ is written when training ends)")
        return True
    s.log.info(f"stopped at step {s.pos.step} (epoch {s.pos.epoch}) by {reason.value}")
    return False


def _log_step(s: Stage1, loss: torch.Tensor, recon: torch.Tensor, frames: torch.Tensor,
              grad_norm: torch.Tensor, interval: tuple[int, int, float], bar: tqdm) -> None:
    """Averaged over ranks; the only host syncs of an ordinary log interval. `interval`:
    (frames, steps, perf_counter start) since the last log."""
    frames_seen, steps_seen, since = interval
    mse = torch.mean((recon.detach().double() - frames.double()) ** 2)
    loss_mse_norm = all_reduce_mean(torch.stack([loss.detach().double(), mse, grad_norm.double()]), s.dist)
    elapsed = time.perf_counter() - since
    values = {"train/loss": loss_mse_norm[0].item(),
              "train/psnr": 10 * math.log10(4.0 / max(loss_mse_norm[1].item(), 1e-20)),  # range [-1, 1]
              "train/grad_norm": loss_mse_norm[2].item(),
              "train/lr": s.lr_sched.get_last_lr()[0],
              "perf/frames_per_sec": frames_seen * s.dist.world_size / elapsed,
              "perf/sec_per_step": elapsed / max(1, steps_seen)}
    s.log.scalars(values, s.pos.step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", psnr=f"{values['train/psnr']:.1f}", refresh=False)
    s.log.info(f"step {s.pos.step}/{s.total_steps} loss {values['train/loss']:.4f} psnr "
               f"{values['train/psnr']:.2f} lr {values['train/lr']:.2e}", echo=False)


def pick_frames(videos: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B*k, 3, H, W): k distinct random frames of each clip (None: all).

    Frames of one clip are near copies; a batch of frames from many clips gives the VAE far
    better gradients for the same compute. The pick draws from this rank's global RNG.
    """
    b, _, t = videos.shape[:3]
    if k is None or k >= t:
        return rearrange(videos, "b c t h w -> (b t) c h w")
    idx = torch.rand(b, t).argsort(dim=1)[:, :k].to(videos.device)  # (B, k)
    picked = videos[torch.arange(b, device=videos.device)[:, None], :, idx]  # (B, k, 3, H, W)
    return rearrange(picked, "b k c h w -> (b k) c h w")


@torch.no_grad()
def reconstruction_grid(ae: AutoencoderKL, videos: torch.Tensor) -> np.ndarray:
    """Originals above reconstructions, one row pair per clip -> (2*B*H, T*W, 3) uint8."""
    was_training = ae.training
    ae.eval()
    device = next(ae.parameters()).device
    frames = rearrange(videos, "b c t h w -> (b t) c h w").to(device)
    recon = ae(frames).sample.clamp(-1, 1)  # posterior mean, (B*T, 3, H, W)
    ae.train(was_training)
    pairs = torch.stack([frames, recon]).cpu()  # (2, B*T, 3, H, W)
    grid = rearrange(pairs, "two (b t) c h w -> (b two h) (t w) c", b=videos.shape[0])
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- the end


def spread_indices(dataset, count: int) -> list[int]:
    """`count` item indices evenly spread over the dataset (all of them if it is smaller)."""
    return [int(i) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()]


def stack_videos(dataset, count: int) -> torch.Tensor:
    """`count` windows evenly spread over the dataset -> (count, 3, T, H, W)."""
    return torch.stack([dataset[i]["video"] for i in spread_indices(dataset, count)])


def window_batches(dataset, indices: list[int], batch: int) -> Iterator[torch.Tensor]:
    """The windows at `indices`, `batch` at a time, each (b, 3, T, H, W) on the CPU: memory
    stays bounded however many windows are measured."""
    for start in range(0, len(indices), batch):
        yield torch.stack([dataset[i]["video"] for i in indices[start:start + batch]])


def finish(s: Stage1) -> None:
    """Rank 0: scaling_factor = 1 / std(posterior means), save vae/, report held-out PSNR."""
    if s.dist.is_main:
        _finish_main(s)
    barrier(s.dist)


def _finish_main(s: Stage1) -> None:
    tcfg = s.cfg.train
    train_idx = spread_indices(s.train_set, tcfg.scale_num_clips)
    moments = FrozenVAE(s.ae)  # eval, no grads, the same encode stage 2 uses
    means = (moments.encode_moments(v)[0] for v in window_batches(s.train_set, train_idx, tcfg.batch_size))
    scale = 1.0 / global_std(means)  # unscaled posterior means; one std over all channels, as SD
    s.ae.register_to_config(scaling_factor=scale)
    vae_dir = os.path.join(s.run_dir, "vae")
    _write_vae(s.ae, vae_dir, s.log)
    vae = FrozenVAE.from_pretrained(vae_dir, s.device)  # exactly what stage 2 will load
    generator = torch.Generator(s.device).manual_seed(0)
    scaled_std = global_std(vae.encode(v, generator=generator)
                            for v in window_batches(s.train_set, train_idx, tcfg.batch_size))
    heldout = heldout_psnr(vae, s.val_set, tcfg.batch_size)
    s.log.scalar("val/heldout_psnr", heldout, s.pos.step)
    s.log.info(f"scaling_factor = {scale:.4f} (1 / std of posterior means over {len(train_idx)} "
               f"training clips); scaled latent std on training data = {scaled_std:.3f}\n"
               f"held-out PSNR = {heldout:.2f} dB over {len(s.val_set)} val clips\n"
               f"saved {vae_dir} (fingerprint {vae.fingerprint})")


def _write_vae(ae: AutoencoderKL, vae_dir: str, log: RunLogger) -> None:
    """Write `vae_dir`. A different VAE already there (an earlier end of this run, continued
    with more steps) may be the one stage-2 runs were trained on, and they refuse any other:
    it is kept as `<vae_dir>.<its fingerprint>/` (the fingerprint stage 2 names), never lost."""
    tmp = f"{vae_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ae.save_pretrained(tmp)
    if os.path.exists(vae_dir):
        old = _fingerprint_or_none(vae_dir)
        if old != vae_fingerprint(ae):
            kept = f"{vae_dir}.{old or 'unreadable-' + time.strftime('%Y%m%d-%H%M%S')}"
            if os.path.exists(kept):  # the same VAE was kept before
                shutil.rmtree(vae_dir)
            else:
                os.replace(vae_dir, kept)
            log.info(f"kept the previous {vae_dir} (fingerprint {old}) as {kept}: stage-2 runs "
                     f"trained on it need it (point their vae.path there)")
        else:
            shutil.rmtree(vae_dir)
    os.replace(tmp, vae_dir)


def _fingerprint_or_none(vae_dir: str) -> Optional[str]:
    try:
        return FrozenVAE.from_pretrained(vae_dir).fingerprint
    except (UserError, OSError, ValueError):
        return None


def global_std(tensors: Iterator[torch.Tensor]) -> float:
    """Sample std (n - 1) over every element of a stream of tensors, without holding them all."""
    n, total, squares = 0, 0.0, 0.0
    for t in tensors:
        t = t.double()
        n, total, squares = n + t.numel(), total + t.sum().item(), squares + (t ** 2).sum().item()
    return math.sqrt(max(squares - total ** 2 / n, 0.0) / (n - 1))


@torch.no_grad()
def heldout_psnr(vae: FrozenVAE, val_set, batch: int) -> float:
    """PSNR of posterior-mean round trips over every held-out window, streamed in batches."""
    squared, count = torch.zeros((), dtype=torch.float64, device=vae.device), 0
    for videos in window_batches(val_set, list(range(len(val_set))), batch):
        videos = videos.to(vae.device)  # (b, 3, T, H, W): compared where the reconstruction is
        recon = vae.decode(vae.encode(videos, sample=False))
        squared += ((recon.double() - videos.double()) ** 2).sum()
        count += videos.numel()
    mse = squared.item() / count
    return math.inf if mse == 0 else 10 * math.log10(2.0 ** 2 / mse)  # data range 2: pixels in [-1, 1]
