"""Stage-2 validation: EMA samples (mp4/gif under samples/, a GIF in TensorBoard), the
held-out loss by timestep, the jigsaw score against real clips, val/fvd and,
for a model trained with first-frame conditioning, image-to-video samples (val/image_to_video,
val/first_frame_psnr).

With data.buckets the samples, their jigsaw scores and the held-out loss are per bucket
(samples/step_N/<bucket>/, val/samples_<bucket>, val/loss_<bucket>: the val split's windows of
that bucket); val/loss and val/jigsaw_score are then over all of them. val/fvd and the
image-to-video samples stay at the run's reference shape (data.resolution x data.num_frames).

`validate(s)` runs on every rank with the training state `s` (training.state.Stage2); a
SIGINT/SIGTERM ends it at once (see its docstring). Nothing here changes a training RNG or
weight: the held-out loss and the samples draw from generators seeded by validation.seed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from data import build_dataset
from data.latent_cache import CachedWindows
from training import checkpoints as ckpts
from training.buckets import by_shape
from training.conditioning import SampleConditions
from training.first_frames import psnr
from training.evaluation import clip_batches, fvd_real_clips, generated_geometry, video_batches
from training.sampling import generate_videos, save_videos, side_by_side
from training.state import HeldOut, Stage2
from utils.dist import DistInfo, barrier, gather_dicts
from utils.fvd import FeatureStats, fvd_from_stats, stats_of
from utils.metrics import jigsaw_score
from utils.train_utils import GracefulStop, StopRequested, autocast_context
from utils.video_io import uint8_to_video_tensor, video_tensor_to_uint8


NUM_T_BUCKETS = 10  # loss per timestep bucket (train and val), so learning at high noise is visible
VAL_BATCH_FACTOR = 4  # held-out loss batches: this many training batches (forward only)


def validate(s: Stage2) -> bool:
    """val/fvd (all ranks share the work), then on rank 0: the held-out loss and EMA samples
    -> VAE decode -> mp4/gif under samples/ and a GIF in TensorBoard. The other ranks wait at the barrier:
    rank 0's part must finish within the process group's timeout (torch's default: 10 min
    with nccl, 30 min with gloo), which validation.num_videos samples and a few dozen forward
    passes do by far. Under train.parallel = fsdp no rank holds the whole model: every rank
    runs rank 0's part too, the model's forwards in lockstep (each gathers block by block),
    and rank 0 alone writes and logs.

    SIGINT/SIGTERM ends validation at once (StopRequested) and returns False: all of it with
    one process, rank 0's own part under DDP (val/fvd's collectives must run on every rank);
    under fsdp with several processes a signal waits for the validation's end (a rank that
    left the lockstep alone would leave the others waiting in a collective).
    The caller writes latest.pth first, so that such a stop loses nothing."""
    stop = s.control.stop if s.control is not None else GracefulStop()
    alone, finished = not s.dist.enabled, True
    lockstep = s.parallel.lockstep and not alone
    try:
        with stop.interruptible() if alone else contextlib.nullcontext(), s.vae.on(s.device):  # parked: back
            fvd = _val_fvd(s) if s.detector is not None else None
            if s.dist.is_main or lockstep:
                with contextlib.nullcontext() if alone or lockstep else stop.interruptible():
                    _validate_main(s, fvd)
    except StopRequested:
        finished = False
        s.log.info(f"stop requested during the validation at step {s.pos.step}: the rest of it "
                   f"is skipped ({s.run_dir}/latest.pth holds step {s.saved_step})")
    barrier(s.dist)
    return finished


def _validate_main(s: Stage2, fvd: Optional[float]) -> None:
    """Rank 0's part (every rank's under fsdp: `validate`): the trained weights' held-out loss,
    then everything made with the EMA weights (fsdp: swapped into the trained module meanwhile)."""
    raw = held_out_loss(s, s.model) if s.cfg.validation.loss_clips else None
    with s.ema.applied(s.model) as ema_model:
        _validate_ema(s, fvd, ema_model, raw)


def _validate_ema(s: Stage2, fvd: Optional[float], ema_model: nn.Module,
                  raw: Optional[dict[str, torch.Tensor]]) -> None:
    v = s.cfg.validation
    if v.loss_clips:
        _log_held_out_loss(s, ema_model, raw)
    conditions = validation_conditions(s, v.num_videos)
    cell = s.vae.downsample_factor * s.family.patch[1]  # patch side in pixels
    scores = []
    for name, shape in sample_shapes(s):  # one shape, or each bucket's
        videos = generate_videos(
            ema_model, s.vae, s.diffusion, latent_shape=shape,
            seeds=[v.seed + i for i in range(v.num_videos)], sampler=v.sampler,
            num_steps=v.num_steps, guidance_scale=v.guidance_scale, device=s.device,
            conditions=conditions)
        if not s.dist.is_main:
            continue
        out = os.path.join(s.run_dir, "samples", f"step_{s.pos.step:07d}", *([name] if name else []))
        save_videos(out, videos, v.fps, conditions.prompts)  # + prompts.txt for a text model
        s.log.video("val/samples" + (f"_{name}" if name else ""), side_by_side(videos), s.pos.step, v.fps)
        scores.append(jigsaw_score(torch.stack([uint8_to_video_tensor(x) for x in videos]), cell))
        if name:
            s.log.scalar(f"val/jigsaw_score_{name}", scores[-1], s.pos.step)
    out = os.path.join(s.run_dir, "samples", f"step_{s.pos.step:07d}")
    if s.dist.is_main:
        if any(conditions.prompts):  # TensorBoard's Text tab: each video's prompt, left to right
            s.log.text("val/samples_prompts", "\n\n".join(
                f"{i}: {p}" for i, p in enumerate(conditions.prompts)), s.pos.step)
        score = scores[0] if len(scores) == 1 else float(np.mean(scores))
        s.log.scalars({"val/jigsaw_score": score, "val/jigsaw_score_real": _real_jigsaw(s, cell)},
                      s.pos.step)
    if s.first_frames.enabled:
        _log_image_to_video(s, ema_model)
    if not s.dist.is_main:
        return
    if fvd is not None:
        s.log.scalar("val/fvd", fvd, s.pos.step)
    fvd_text = "" if fvd is None else f"; FVD {fvd:.2f} ({v.fvd.num_videos} generated vs {s.fvd_real.n} real clips)"
    s.log.info(f"validation samples: {out} (jigsaw score {score:.2f}, real clips "
               f"{_real_jigsaw(s, cell):.2f}; well above real means patch seams){fvd_text}")


def _log_image_to_video(s: Stage2, ema_model: nn.Module) -> None:
    """A run trained with model.first_frame_conditioning: frame 0 of held-out clips as the
    image, EMA samples from it side by side in TensorBoard (val/image_to_video), and the PSNR
    of their frame 0 against the image (val/first_frame_psnr; the VAE round trip bounds it).
    A text model is told each image's own clip caption (validation.prompts, when set, instead),
    a class model the clip's class, so image and condition describe one scene."""
    v = s.cfg.validation
    dataset = build_dataset(s.cfg.data, "val", s.cfg.experiment.seed)
    n = min(v.num_videos, len(dataset))
    index = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(int))
    items = [dataset[int(i)] for i in index]
    images = torch.stack([it["video"][:, 0] for it in items])  # (n, 3, H, W)
    # each image's own clip's condition (its class, its caption: in the text cache), or the
    # validation prompts of a text model
    request = {"prompts": v.prompts} if v.prompts else s.cond.clip_conditions(
        [int(it["label"]) for it in items], [it.get("caption") for it in items])
    conditions = s.cond.samples(len(index), **request)
    videos = generate_videos(
        ema_model, s.vae, s.diffusion, latent_shape=ckpts.latent_shape(s.dims),
        seeds=[v.seed + i for i in range(len(index))], sampler=v.sampler, num_steps=v.num_steps,
        guidance_scale=v.guidance_scale, device=s.device,
        conditions=conditions, images=images, condition_frames=s.first_frames.frames)
    s.log.video("val/image_to_video", side_by_side(videos), s.pos.step, v.fps)
    if any(conditions.prompts):  # TensorBoard's Text tab, as for val/samples
        s.log.text("val/image_to_video_prompts", "\n\n".join(
            f"{i}: {p}" for i, p in enumerate(conditions.prompts)), s.pos.step)
    given = [video_tensor_to_uint8(im[:, None])[0] for im in images]  # (H, W, 3) each
    score = float(np.mean([psnr(x[0], g) for x, g in zip(videos, given)]))
    s.log.scalar("val/first_frame_psnr", score, s.pos.step)
    s.log.info(f"image-to-video samples of {len(index)} held-out first frames: frame 0 PSNR {score:.2f} dB")


# ----------------------------------------------------------------------------- held-out loss


def sample_shapes(s: Stage2) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(name, latent shape (C, T, h, w)) of each shape validation samples: the run's one shape
    (name ""), or every bucket's (its name, e.g. "32x64x8")."""
    if s.buckets is None:
        return [("", ckpts.latent_shape(s.dims))]
    return list(zip(s.buckets.names, s.buckets.latent_shapes))


def _held_out(s: Stage2) -> list[HeldOut]:
    """`validation.loss_clips` windows spread evenly over the val split (over each bucket's
    windows, with buckets), encoded once."""
    if s.held_out is None:
        rules = s.buckets.rules if s.buckets is not None else None
        dataset = build_dataset(s.cfg.data, "val", s.cfg.experiment.seed, rules=rules)  # no augmentation
        s.held_out = [_encoded_windows(s, dataset, index, name) for name, index in _val_windows(s, dataset)]
    return s.held_out


def _val_windows(s: Stage2, dataset) -> list[tuple[str, np.ndarray]]:
    """(bucket name, the windows of the val split it holds out): one group without buckets."""
    def spread(windows: np.ndarray) -> np.ndarray:
        n = min(s.cfg.validation.loss_clips, len(windows))
        return windows[np.unique(np.linspace(0, len(windows) - 1, n).round().astype(int))]
    plan = getattr(dataset, "plan", None)
    if plan is None:
        return [("", spread(np.arange(len(dataset))))]
    of_window = np.repeat(plan.bucket_of, dataset.counts)  # (N,) the bucket of each window
    return [(b.name, spread(np.flatnonzero(of_window == k))) for k, b in enumerate(plan.buckets)
            if b.name in s.buckets.names and (of_window == k).any()]


def _encoded_windows(s: Stage2, dataset, index: np.ndarray, name: str) -> HeldOut:
    items = [dataset[int(i)] for i in index]
    pixels = torch.stack([it["video"] for it in items])  # (N, 3, T, H, W)
    latents = torch.cat([s.vae.encode(p.to(s.device), sample=False)  # the posterior mean
                         for p in pixels.split(s.cfg.train.batch_size)])  # (N, C, T, h, w)
    batch = {"label": torch.tensor([it["label"] for it in items]),
             "caption": [it.get("caption") for it in items]}
    return HeldOut(latents, s.cond.eval_kwargs(batch, s.device), name)


@torch.no_grad()
def held_out_loss(s: Stage2, model: nn.Module) -> dict[str, torch.Tensor]:
    """{bucket name ("" without buckets): (NUM_T_BUCKETS,) mean loss of `model` on its held-out
    windows at each bucket's central timestep}, with noise drawn from `validation.seed`: the
    same inputs at every validation, so the curve moves only when the model does. Touches no
    training RNG."""
    return {held.name: _group_loss(s, model, held) for held in _held_out(s)}


def _group_loss(s: Stage2, model: nn.Module, held: HeldOut) -> torch.Tensor:
    n, T = held.latents.shape[0], s.cfg.diffusion.num_train_timesteps
    width = T // NUM_T_BUCKETS
    gen = torch.Generator().manual_seed(s.cfg.validation.seed)  # CPU: same noise on any device
    noise = torch.randn((NUM_T_BUCKETS, *held.latents.shape), generator=gen)  # (K, N, C, T, h, w)
    t_all = (torch.arange(NUM_T_BUCKETS) * width + width // 2).repeat_interleave(n)  # (K*N,)
    x0_all = held.latents.repeat(NUM_T_BUCKETS, 1, 1, 1, 1)  # (K*N, C, T, h, w), bucket-major
    cond_all = {k: v.repeat(NUM_T_BUCKETS, *[1] * (v.ndim - 1)) for k, v in held.cond.items()}  # bucket-major
    chunk = VAL_BATCH_FACTOR * s.cfg.train.batch_size  # no activations kept: larger batches fit
    was_training = model.training
    model.eval()  # no label dropout (it would also draw from the global RNG)
    losses = []
    for i in range(0, x0_all.shape[0], chunk):
        x0 = x0_all[i:i + chunk]
        eps = noise.flatten(0, 1)[i:i + chunk].to(s.device)
        t = t_all[i:i + chunk].to(s.device)
        kw = {k: v[i:i + chunk] for k, v in cond_all.items()}
        with autocast_context(s.device, s.dtype):
            v = model(s.diffusion.add_noise(x0, eps, t), t, **kw)  # (B, C, T, h, w)
        losses.append(s.diffusion.loss(v.float(), x0, eps, t).loss.double().cpu())
    model.train(was_training)
    return torch.cat(losses).reshape(NUM_T_BUCKETS, n).mean(1)


def _log_held_out_loss(s: Stage2, ema_model: nn.Module, by_raw: dict[str, torch.Tensor]) -> None:
    """val/loss (EMA weights: what is sampled), val/loss_raw (the trained weights, like
    train/loss: `by_raw`, measured before the EMA weights were applied), and val_loss_by_t/... (EMA)
    to TensorBoard and log.txt; with buckets also val/loss_<bucket> (EMA), and the others over every
    bucket's windows."""
    by_ema = held_out_loss(s, ema_model)
    ema, raw = _pooled(s, by_ema), _pooled(s, by_raw)
    width = s.cfg.diffusion.num_train_timesteps // NUM_T_BUCKETS
    values = {"val/loss": ema.mean().item(), "val/loss_raw": raw.mean().item()}
    values.update({f"val/loss_{name}": x.mean().item() for name, x in by_ema.items() if name})
    s.val_losses.append(values["val/loss"])  # for the outcome line (training/outcome.py)
    for b in range(NUM_T_BUCKETS):
        values[f"val_loss_by_t/t{b * width:04d}-{(b + 1) * width - 1:04d}"] = ema[b].item()
    s.log.scalars(values, s.pos.step)
    buckets = "".join(f"; {name} {x.mean().item():.4f}" for name, x in by_ema.items() if name)
    s.log.info(f"step {s.pos.step} val/loss {values['val/loss']:.4f} (EMA) val/loss_raw "
               f"{values['val/loss_raw']:.4f} on {sum(h.latents.shape[0] for h in s.held_out)} held-out clips; by t: "
               + " ".join(f"{x:.4f}" for x in ema.tolist()) + buckets)


def _pooled(s: Stage2, by_bucket: dict[str, torch.Tensor]) -> torch.Tensor:
    """(NUM_T_BUCKETS,) losses over every group's windows (the one group's, without buckets)."""
    if len(by_bucket) == 1:
        return next(iter(by_bucket.values()))
    counts = torch.tensor([h.latents.shape[0] for h in s.held_out], dtype=torch.float64)  # (G,)
    return (torch.stack(list(by_bucket.values())) * counts[:, None]).sum(0) / counts.sum()


# ----------------------------------------------------------------------------- val/fvd


def _val_fvd(s: Stage2) -> float:
    """FVD of validation.fvd.num_videos EMA samples (seeds validation.seed + i, the validation
    sampler) against as many training clips (evaluate.py's windows, seed validation.seed).
    Every rank takes videos rank, rank + W, ...; the feature sums are gathered, so no rank
    waits on another's share. Unconditional and class models: evaluate.py's number with
    real.split=train and these settings. Text models: not that number, since video i is told
    validation_conditions' prompt i (validation.prompts, or held-out captions), where evaluate
    tells it real clip i's caption."""
    f, v, r, w = s.cfg.validation.fvd, s.cfg.validation, s.dist.rank, s.dist.world_size
    if s.fvd_real is None:
        real = fvd_real_clips(s.cfg.data, generated_geometry(s.dims, s.vae.describe()), "the model",
                              "train", s.cfg.experiment.seed, f.num_videos, v.seed)
        s.fvd_real = _gather_stats(stats_of(s.detector, clip_batches(real.dataset, real.plan[r::w],
                                                                     f.batch_size), s.device), s.dist)
    mine = fvd_share(f.num_videos, r, w, s.parallel.lockstep)
    with s.ema.applied(s.model) as ema_model:
        videos = generate_videos(
            ema_model, s.vae, s.diffusion, latent_shape=ckpts.latent_shape(s.dims),
            seeds=[v.seed + i for i in mine], conditions=validation_conditions(s, f.num_videos).select(mine),
            sampler=v.sampler, num_steps=v.num_steps, guidance_scale=v.guidance_scale,
            device=s.device, batch_size=f.batch_size)
    videos = videos[:len(range(r, f.num_videos, w))]  # lockstep's filler videos are not counted
    generated = _gather_stats(stats_of(s.detector, video_batches(videos, f.batch_size), s.device), s.dist)
    return fvd_from_stats(s.fvd_real, generated)


def fvd_share(n: int, rank: int, world: int, lockstep: bool) -> list[int]:
    """The val/fvd videos rank `rank` generates: rank, rank + world, ... Under fsdp (`lockstep`)
    every rank must run as many forwards, so the short shares are filled up with video 0 again
    (generated, not counted)."""
    mine = list(range(rank, n, world))
    return mine + [0] * (-(-n // world) - len(mine)) if lockstep else mine


def validation_conditions(s: Stage2, n: int) -> SampleConditions:
    """What validation video i is conditioned on, from the seam: validation.prompts (null: the
    captions of held-out clips, spread over the val split's distinct captions) for a text
    model; classes 0, 1, 2, ... for a class model; nothing for an unconditional one."""
    prompts = s.cfg.validation.prompts
    if prompts is None and s.val_captions:
        pick = np.linspace(0, len(s.val_captions) - 1, min(n, len(s.val_captions))).round().astype(int)
        prompts = [s.val_captions[i] for i in pick]
    return s.cond.samples(n, prompts=prompts)


def _gather_stats(part: FeatureStats, dist: DistInfo) -> FeatureStats:
    """The union of every rank's feature statistics (a rank may hold none)."""
    parts = gather_dicts({dist.rank: (part.packed(), part.sum.shape[0]) if part.n else None}, dist)
    packed = [p for p in parts.values() if p is not None]
    dim = packed[0][1]
    return FeatureStats.from_packed(sum(p for p, _ in packed), dim)


def _real_jigsaw(s: Stage2, cell: int) -> float:
    """The jigsaw score of real training clips: the reference a healthy sample should match."""
    if s.real_jigsaw is None:
        pixels = s.loader.dataset
        pixels = pixels.dataset if isinstance(pixels, CachedWindows) else pixels  # the clips themselves
        n = min(len(pixels), 16)
        clips = by_shape([pixels[i]["video"] for i in range(n)])  # (3, T, H, W) each, grouped by shape
        scores = [(jigsaw_score(torch.stack(group), cell), len(group)) for group in clips]
        s.real_jigsaw = scores[0][0] if len(scores) == 1 else sum(x * k for x, k in scores) / n
    return s.real_jigsaw
