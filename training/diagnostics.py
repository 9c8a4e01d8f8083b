"""Health checks of a stage-2 setup, so a broken run is never silently wrong.

`diagnose.py` runs them in order and prints one line each. Every check returns a `Check`:
a status (PASS / WARN / FAIL / SKIP), the number it measured, and for a failure what to do.
Checks that need a stage-2 checkpoint are SKIPped (never passed) when there is none.

    vae_roundtrip    decode(encode(x)) PSNR on held-out clips of the configured data
    latent_scale     std of scaled latents on training clips (the schedule assumes ~1)
    patchify         models.dit.patchify / unpatchify round trip on the configured latent grid
    identities       x0 and eps recovered from (x_t, target) by `Diffusion`, for the
                     configured objective (v_prediction or flow_matching)
    gradients        one training-style step: every DiT parameter gets a finite nonzero
                     gradient, the VAE none (and is outside the optimizer)
    checkpoint       the checkpoint loads and was made for the configured model
    vae_fingerprint  the checkpoint's VAE is the configured VAE
    condition        the checkpoint was trained with the configured condition (a text model:
                     the configured text encoder, same fingerprint); a text model must read its
                     captions: on held-out clips its loss with each clip's own caption is
                     lower than with the captions shuffled among the clips
    denoise          the checkpoint (EMA) denoises noised held-out latents better than a
                     model that predicts nothing (catches misplaced patches, which sampling
                     turns into incoherent blobs rather than grid seams)
    jigsaw           the checkpoint's (EMA) output patches land where they belong (each
                     piece of its output on noised held-out clips matches the true target
                     at its own position best), and its samples have no patch-grid seams
                     (their seam score is close to that of real clips)
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

import models.dit as dit  # module attribute lookups: a patched unpatchify is what gets checked
from data import build_dataset
from models.diffusion import Objective, make_objective
from models.vae import FrozenVAE
from training import checkpoints as ckpts
from training.conditioning import Conditioning, conditioning_for_training, conditioning_from_checkpoint
from training.sampling import generate_videos
from utils.checkpoint import load_checkpoint
from utils.config import TrainRunConfig, ValidationConfig
from utils.dist import DistInfo
from utils.errors import UserError
from utils.logging import RunLogger
from utils.metrics import jigsaw_score, psnr
from utils.train_utils import resolve_precision
from utils.video_io import uint8_to_video_tensor

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

DEFAULT_MIN_VAE_PSNR = 20.0  # dB on held-out clips (DESIGN.md: ~21 dB after 2 min of stage 1)
LATENT_STD_TOLERANCE = 0.25  # WARN when the scaled latent std is off from 1 by more than this
NUM_VAE_CLIPS = 8  # real clips for the PSNR
# Training clips for the latent statistics: as many as stage 1 measures its scaling factor on
# (train.scale_num_clips). On the demo scene (one background, small shapes) 8 clips gave a
# std of 0.72-0.84 where 64 give ~1.0: one clip's content moves the std too much.
NUM_SCALE_CLIPS = 64
# Real clips for the jigsaw reference: on 8 clips of the built-in data at 32 px the score
# spreads over 0.5-1.5, on 32 it is within ~0.1 of the mean.
NUM_JIGSAW_REAL_CLIPS = 32
NUM_SAMPLES = 8  # videos sampled from the checkpoint for the jigsaw check
V_IDENTITY_TOL = 1e-4  # max abs error of x0 / eps recovered from the target, in latent units (fp32)
DENOISE_NOISE_LEVELS = (0.4, 0.6)  # t / T at which the denoise check noises real latents
# x0 error relative to predicting v = 0. Measured on the tiny test model (tests/test_diagnose.py):
# exactly 1 at init (zero output layer), 0.94 after 10 steps, 0.46 after 100, 0.21-0.30
# after 200-600; 1.12-1.42 with a patch-scrambling unpatchify. PASS below WARN, WARN up to
# FAIL, FAIL above.
DENOISE_WARN_RATIO, DENOISE_FAIL_RATIO = 0.8, 1.0
# Jigsaw: samples FAIL above JIGSAW_RATIO * real + JIGSAW_MARGIN. Measured on the built-in
# data at 32 px, cell 8 px (tests/test_diagnose.py): real clips 1.05 (32 clips); samples of
# the tiny DiT 0.85-0.87 after 10 steps, 1.2-1.35 after 100-600; the same samples with their
# cells put back in a wrong order 10-13, real clips so scrambled 9.5-11.7. A healthy demo
# checkpoint (34/36 coherent videos) scores 0.2-3.0 per sampled video on the one-shape scene
# (a shape's edge on a cell line counts as a seam), so sets of 8 spread over 1.06-1.74 against
# real clips at 0.93: a limit of 1.5 x real + 0.25 (1.64) failed one healthy set in six.
# 2 x real + 0.25 (2.11 there) keeps the scrambled order 4-6x above the limit.
JIGSAW_RATIO, JIGSAW_MARGIN = 2.0, 0.25
# Placement (check_jigsaw): the noise levels of the one-step v predictions, how consistently
# a patch position must come from one other position to count as misplaced, and the share of
# misplaced positions that fails. Measured: the tiny test model after 150 steps and the demo
# checkpoint 0% misplaced, both with a scrambled unpatchify 98-100%; predictions unrelated to
# the truth (an untrained model) under 10% (tests/test_diagnose.py).
PLACEMENT_NOISE_LEVELS = (0.4, 0.6)
PLACEMENT_CONSISTENCY = 0.5
MAX_MISPLACED = 0.25


@dataclass
class Check:
    name: str
    status: str  # PASS, WARN, FAIL or SKIP
    measured: str  # the number(s) the check measured, for the reader
    advice: str = ""  # what to do (for WARN / FAIL), or why it was skipped

    def line(self) -> str:
        text = f"[{self.status}] {self.name:<16} {self.measured}"
        return text + (f"\n       -> {self.advice}" if self.advice else "")


# --------------------------------------------------------------------------- the checks


def check_vae_roundtrip(vae: FrozenVAE, clips: torch.Tensor, min_psnr: float) -> Check:
    """PSNR of decode(encode(clips)) with posterior means; `clips` (B, 3, T, H, W) in [-1, 1]."""
    recon = vae.decode(vae.encode(clips.to(vae.device), sample=False))  # (B, 3, T, H, W)
    value = psnr(recon.cpu(), clips)
    measured = f"PSNR {value:.2f} dB on {clips.shape[0]} held-out clips (min {min_psnr:g} dB)"
    if value >= min_psnr:
        return Check("vae_roundtrip", PASS, measured)
    return Check("vae_roundtrip", FAIL, measured,
                 f"the VAE at {vae.path} reconstructs this data poorly, so no DiT trained on its "
                 "latents can look better. Train the VAE longer on this data (train_vae.py) or "
                 "point vae.path at a better one; --min-vae-psnr sets the threshold")


def check_latent_scale(vae: FrozenVAE, clips: torch.Tensor,
                       tolerance: float = LATENT_STD_TOLERANCE) -> Check:
    """Std of the scaled posterior means (what stage 1 measures its scaling_factor on)."""
    z = vae.encode(clips.to(vae.device), sample=False)  # (B, C, T, h, w), scaled
    std = z.std().item()
    measured = (f"std of scaled latents {std:.3f} on {clips.shape[0]} training clips "
                f"(scaling_factor {vae.scaling_factor:.4f}; want 1 +- {tolerance:g})")
    if abs(std - 1) <= tolerance:
        return Check("latent_scale", PASS, measured)
    return Check("latent_scale", WARN, measured,
                 "the noise schedule assumes unit-variance latents; on this data the VAE's "
                 f"scaling_factor would be about {vae.scaling_factor / std:.4f}. Different data "
                 "than stage 1 saw? Re-measure it with train_vae.py on this data (a new scale is "
                 "a new VAE fingerprint: the DiT then has to be trained again)")


def check_patchify(latent_shape: tuple[int, int, int, int], patch_t: int, patch: int,
                   seed: int = 0) -> Check:
    """models.dit.unpatchify(patchify(x)) == x exactly, and token 0 is the top-left patch."""
    c, t, h, w = latent_shape
    x = torch.randn((2, c, t, h, w), generator=torch.Generator().manual_seed(seed))
    grid = (t // patch_t, h // patch, w // patch)
    tokens = dit.patchify(x, patch_t, patch)  # (2, N, pt * p * p * C)
    back = dit.unpatchify(tokens, grid, patch_t, patch)  # (2, C, T, h, w)
    first = x[:, :, :patch_t, :patch, :patch]  # (2, C, pt, p, p): what token 0 must hold
    layout_ok = torch.equal(tokens[:, 0].sort(dim=1).values, first.flatten(1).sort(dim=1).values)
    err = (back - x).abs().max().item() if back.shape == x.shape else math.inf
    measured = (f"max |unpatchify(patchify(x)) - x| = {err:.3g} on latents {tuple(x.shape)}, "
                f"patch {patch_t}x{patch}x{patch}; token 0 = top-left patch: {layout_ok}")
    if err == 0 and layout_ok:
        return Check("patchify", PASS, measured)
    return Check("patchify", FAIL, measured,
                 "patchify/unpatchify in models/dit.py are not exact inverses on the model's "
                 "patch grid: the DiT writes its output patches to the wrong places, so it "
                 "cannot denoise and samples are garbage. Fix models/dit.py (tests/test_dit.py "
                 "checks it)")


def check_identities(diffusion: Objective, latent_shape: tuple[int, int, int, int],
                     seed: int = 0) -> Check:
    """x0 and eps recovered from (x_t, target) by the objective's inverses, plus the schedule's
    own identity: v: x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1;
    flow: x_t = (1 - s) x0 + s eps, u = eps - x0, x_t = x0 at t = 0."""
    g = torch.Generator().manual_seed(seed)
    T = diffusion.num_train_timesteps
    t = torch.tensor([0, 1, T // 4, T // 2, 3 * T // 4, T - 1])  # both ends of the schedule
    x0 = torch.randn((len(t), *latent_shape), generator=g)
    eps = torch.randn((len(t), *latent_shape), generator=g)
    x_t = diffusion.add_noise(x0, eps, t)
    out = diffusion.target(x0, eps, t)
    err_x0 = (diffusion.x0_from_output(x_t, out, t) - x0).abs().max().item()
    err_eps = (diffusion.eps_from_output(x_t, out, t) - eps).abs().max().item()
    err_unit, unit = diffusion.identity_error(x0, eps, t)  # the schedule's own identity
    measured = (f"{diffusion.objective}: max error x0 {err_x0:.2e}, eps {err_eps:.2e}, {unit} "
                f"{err_unit:.2e} (tolerance {V_IDENTITY_TOL:g})")
    if max(err_x0, err_eps, err_unit) <= V_IDENTITY_TOL:
        return Check("identities", PASS, measured)
    return Check("identities", FAIL, measured,
                 f"the {diffusion.objective} formulas in models/diffusion.py disagree with each other: "
                 "training target and sampler then mean different things. Fix models/diffusion.py")


def check_gradients(cfg: TrainRunConfig, device: torch.device) -> Check:
    """One training-style step, set up exactly as `training.stage2.setup` sets up training.

    Zero-initialised tensors (adaLN-Zero gates, the output layer) are perturbed first: at
    init they block the gradient to everything upstream by design, which says nothing about
    the plumbing this checks.
    """
    from training import stage2  # the real training setup: optimizer, wrappers, loader, latents
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache="off"),  # via vae.encode
                              train=dataclasses.replace(cfg.train, parallel="ddp"))  # one process: whole tensors
    with tempfile.TemporaryDirectory() as run_dir:
        s = stage2.setup(cfg, run_dir, DistInfo(), device,
                         resolve_precision(cfg.train.precision, device), RunLogger(None), None)
    with torch.no_grad():
        for p in s.model.parameters():
            if not p.any():
                p.normal_(std=0.02, generator=torch.Generator(p.device).manual_seed(0))
    s.model.train()
    batch = next(iter(s.loader))
    x0, _ = stage2.batch_latents(s, batch)  # (B, C, T, h, w), as the training loop gets them
    kw = s.cond.train_kwargs(batch, device, None)  # the condition as the loop builds it (no dropout)
    T = s.cfg.diffusion.num_train_timesteps
    # Away from t = T-1, where the zero-SNR min-SNR weight is exactly 0.
    t = torch.linspace(T // 10, 9 * T // 10, x0.shape[0]).long().to(device)
    noise = torch.randn(x0.shape, device=device, generator=s.noise_gen)
    v_pred = s.net(s.diffusion.add_noise(x0, noise, t), t, **kw)  # (B, C, T, h, w)
    s.diffusion.loss(v_pred.float(), x0, noise, t).loss.mean().backward()

    dit_params = [(n, p) for n, p in s.model.named_parameters() if p.requires_grad]  # a LoRA: the adapters
    frozen_grads = [n for n, p in s.model.named_parameters() if not p.requires_grad and p.grad is not None]
    dead = [n for n, p in dit_params if p.grad is None or not p.grad.any()]
    nonfinite = [n for n, p in dit_params if p.grad is not None and not torch.isfinite(p.grad).all()]
    vae_params = list(s.vae.named_parameters())
    vae_grads = [n for n, p in vae_params if p.grad is not None or p.requires_grad]
    in_opt = {id(p) for group in s.optimizer.param_groups for p in group["params"]}
    vae_in_opt = [n for n, p in vae_params if id(p) in in_opt]
    measured = (f"{len(dit_params) - len(dead) - len(nonfinite)}/{len(dit_params)} DiT tensors get "
                f"finite nonzero gradients; {len(vae_grads)}/{len(vae_params)} VAE tensors trainable "
                f"or with a gradient; {len(vae_in_opt)} VAE tensors in the optimizer; latents "
                f"{'carry' if x0.requires_grad else 'carry no'} graph")
    problems = []
    if dead:
        problems.append(f"no gradient reaches DiT {', '.join(dead[:5])}{' ...' if len(dead) > 5 else ''}")
    if nonfinite:
        problems.append(f"non-finite gradient in DiT {', '.join(nonfinite[:5])}")
    if frozen_grads:
        problems.append(f"the frozen pretrained base gets gradients: {', '.join(frozen_grads[:5])}")
    if vae_grads or vae_in_opt or x0.requires_grad:
        problems.append("the VAE is not frozen (a VAE that trains under the DiT moves its latent "
                        f"space: 'jigsaw' samples): {', '.join((vae_grads + vae_in_opt)[:5])}")
    if not problems:
        return Check("gradients", PASS, measured)
    return Check("gradients", FAIL, measured, "; ".join(problems) + ". This is a bug in the "
                 "training code (models/dit.py, training/stage2.py), not in the config")


def check_checkpoint(ckpt: dict, expected_model: dict, path: str) -> Check:
    """The checkpoint is a stage-2 checkpoint made for the configured model."""
    try:
        ckpts.check_format(ckpt, path)
        ckpts.check_model(ckpt, expected_model, path)
    except UserError as e:
        return Check("checkpoint", FAIL, f"{path} (step {ckpt.get('step')})", str(e))
    return Check("checkpoint", PASS, f"{path}: step {ckpt['step']}, epoch {ckpt['epoch']}, "
                 "model matches the config")


def check_vae_fingerprint(ckpt: dict, vae: FrozenVAE, path: str) -> Check:
    recorded = ckpt["vae"]
    measured = f"checkpoint {recorded['fingerprint']} vs configured VAE {vae.fingerprint}"
    if recorded["fingerprint"] == vae.fingerprint:
        return Check("vae_fingerprint", PASS, measured)
    return Check("vae_fingerprint", FAIL, measured,
                 f"{path} was trained with the VAE at {recorded['path']} (fingerprint "
                 f"{recorded['fingerprint']}), but vae.path = {vae.path} is a different VAE "
                 f"(changed weights or scaling factor). {ckpts.VAE_MISMATCH_HELP}")


@torch.no_grad()
def check_denoise(ckpt: dict, vae: FrozenVAE, clips: torch.Tensor, cond: dict,
                  device: torch.device, seed: int, pretrained: Optional[str] = None) -> Check:
    """EMA model's x0 error on noised held-out latents, relative to an output of 0.

    Output 0 gives x0_hat = alpha * x_t for v, x_t for flow (the zero-initialised model's
    answer), so the ratio is ~1 for an untrained model, well below 1 for a trained one, and
    above 1 when the model's output lands in the wrong places (patches), the wrong latent
    space (VAE) or means something else than the objective's target (the checkpoint's).
    """
    model = ckpts.model_from_checkpoint(ckpt, use_ema=True, device=device, pretrained=pretrained, key="--checkpoint")
    diffusion = ckpts.objective_of(ckpt)
    x0 = vae.encode(clips.to(device), sample=False)  # (B, C, T, h, w)
    g = torch.Generator().manual_seed(seed)
    err = base = 0.0
    for frac in DENOISE_NOISE_LEVELS:
        t = torch.full((x0.shape[0],), int(frac * (diffusion.num_train_timesteps - 1)), device=device)
        x_t = diffusion.add_noise(x0, torch.randn(x0.shape, generator=g).to(device), t)
        x0_hat = diffusion.x0_from_output(x_t, model(x_t, t, **cond), t)
        err += (x0_hat - x0).square().mean().item()
        base += (diffusion.x0_from_output(x_t, torch.zeros_like(x_t), t) - x0).square().mean().item()
    ratio = err / base
    measured = (f"x0 error / error of predicting 0: {ratio:.3f} ({diffusion.objective}) on {x0.shape[0]} held-out clips at "
                f"t = {', '.join(f'{f:g}' for f in DENOISE_NOISE_LEVELS)} x T (pass below "
                f"{DENOISE_WARN_RATIO:g}; 1 = no better than an untrained model)")
    if ratio < DENOISE_WARN_RATIO:
        return Check("denoise", PASS, measured)
    if ratio <= DENOISE_FAIL_RATIO:
        return Check("denoise", WARN, measured,
                     f"the model denoises held-out clips hardly better than an untrained one: it "
                     f"has not learned much yet (step {ckpt['step']}). Train longer; if it stays "
                     "here, see the other checks")
    return Check("denoise", FAIL, measured,
                 "the model denoises held-out clips worse than predicting nothing: its output lands in "
                 "the wrong places (patchify), in another latent space (a different VAE or "
                 "scaling factor than it was trained with), or is not its objective's target. "
                 "Check the patchify, identities and vae_fingerprint lines")


@torch.no_grad()
def check_jigsaw(ckpt: dict, vae: FrozenVAE, real_clips: torch.Tensor, cond: dict,
                 device: torch.device, sampling: ValidationConfig, num_videos: int = NUM_SAMPLES,
                 seam: Optional[Conditioning] = None, request: Optional[dict] = None,
                 pretrained: Optional[str] = None) -> Check:
    """Are the DiT's pieces in their places? Two measurements, either can fail:

    - placement: the EMA model's output (v or flow velocity, the checkpoint's objective) for
      noised held-out clips, cut into its patches
      (C x patch_t x patch x patch latent values), each matched to the most similar patch of
      the true target; the target carries the noise of its own position, so a healthy model's
      pieces match where they are, and pieces put back in a wrong order (a broken unpatchify)
      match where they came from, the same place in every clip (`misplaced_pieces`).
    - seams: `num_videos` sampled videos scored for gradient energy across the patch grid
      relative to inside the patches (cell = VAE factor x patch side, in pixels), vs real clips.
      Sampled as validation samples (`sampling`: the config's validation sampler, steps,
      guidance and seed), the way the run's videos are made: a deterministic sampler with
      few steps makes blockier videos from the same model (measured on the demo checkpoint:
      seam score 2.31 with ddim 20 unguided, 1.15 with the demo's ddpm 100 at guidance 2.5,
      real clips 0.93).
    """
    model = ckpts.model_from_checkpoint(ckpt, use_ema=True, device=device, pretrained=pretrained, key="--checkpoint")
    diffusion = ckpts.objective_of(ckpt)
    (patch_t, patch), dims = ckpts.patch_of(ckpt), ckpts.model_dims(ckpt["model"])
    x0 = vae.encode(real_clips.to(device), sample=False)  # (B, C, T, h, w)
    g = torch.Generator().manual_seed(sampling.seed)
    v_pred, v_true = [], []
    for frac in PLACEMENT_NOISE_LEVELS:
        t = torch.full((x0.shape[0],), int(frac * (diffusion.num_train_timesteps - 1)), device=device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        v_pred.append(model(diffusion.add_noise(x0, noise, t), t, **cond))
        v_true.append(diffusion.target(x0, noise, t))
    share = misplaced_pieces(torch.cat(v_pred), torch.cat(v_true), patch_t, patch).float().mean().item()

    seam = seam if seam is not None else conditioning_from_checkpoint(ckpt, "checkpoint", device)
    videos = generate_videos(
        model, vae, diffusion,
        latent_shape=ckpts.latent_shape(dims),
        seeds=[sampling.seed + i for i in range(num_videos)],
        conditions=seam.samples(num_videos, **(request or {})), sampler=sampling.sampler,
        num_steps=sampling.num_steps, guidance_scale=sampling.guidance_scale, device=device)
    cell = vae.downsample_factor * patch  # patch side in pixels
    samples = torch.stack([uint8_to_video_tensor(v) for v in videos])  # (B, 3, T, H, W)
    score, real = jigsaw_score(samples, cell), jigsaw_score(real_clips, cell)
    limit = JIGSAW_RATIO * real + JIGSAW_MARGIN
    measured = (f"misplaced pieces {100 * share:.1f}% of positions (fail above {100 * MAX_MISPLACED:g}%; "
                f"the model's output on {x0.shape[0]} noised held-out clips at t = "
                f"{', '.join(f'{f:g}' for f in PLACEMENT_NOISE_LEVELS)} x T); seams: samples {score:.3f} "
                f"vs real clips {real:.3f} (fail above {limit:.3f}; {num_videos} "
                f"{diffusion.resolve_sampler(sampling.sampler)} samples, "
                f"{sampling.num_steps} steps, guidance {sampling.guidance_scale:g}, EMA, cell {cell} px)")
    if share > MAX_MISPLACED:
        return Check("jigsaw", FAIL, measured,
                     "the model's output patches land in the wrong places ('jigsaw' videos): "
                     "unpatchify does not put the pieces back where patchify took them from. "
                     "Check the patchify line above and models/dit.py (patchify / unpatchify)")
    if score > limit:
        return Check("jigsaw", FAIL, measured,
                     "the samples have edges on the DiT's patch grid ('jigsaw' videos): patches are "
                     "put back in the wrong places or decoded in a latent space the DiT was not "
                     "trained on. Check the patchify and vae_fingerprint lines above; if they pass, "
                     "look at the samples (predict_advanced.py) and the val/jigsaw_score curve")
    return Check("jigsaw", PASS, measured)


@torch.no_grad()
def check_condition(ckpt: dict, configured: Conditioning, seam: Conditioning, vae: FrozenVAE,
                    clips: torch.Tensor, batch: dict, device: torch.device, seed: int, path: str,
                    pretrained: Optional[str] = None) -> Check:
    """The checkpoint's condition is the configured one (`configured.check_checkpoint`: the
    kind, and a text model's encoder fingerprint); a text model reads its captions: the EMA
    model's loss on noised held-out clips with each clip's own caption is below the loss with
    the captions rolled by one clip (same noise, same t)."""
    try:
        configured.check_checkpoint(ckpt, path)
    except UserError as e:
        return Check("condition", FAIL, f"checkpoint {seam.summary()}", str(e))
    matches = f"{seam.summary()} as configured"
    shuffled_batch = seam.rolled(batch)  # each clip given the next clip's condition
    if shuffled_batch is None:  # nothing to compare (an unconditional or class model, one caption)
        return Check("condition", PASS, matches)
    model = ckpts.model_from_checkpoint(ckpt, use_ema=True, device=device, pretrained=pretrained, key="--checkpoint")
    diffusion = ckpts.objective_of(ckpt)
    x0 = vae.encode(clips.to(device), sample=False)  # (B, C, T, h, w)
    own = seam.eval_kwargs(batch, device)
    shuffled = seam.eval_kwargs(shuffled_batch, device)
    g = torch.Generator().manual_seed(seed)
    loss_own = loss_shuffled = 0.0
    for frac in DENOISE_NOISE_LEVELS:
        t = torch.full((x0.shape[0],), int(frac * (diffusion.num_train_timesteps - 1)), device=device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t, target = diffusion.add_noise(x0, noise, t), diffusion.target(x0, noise, t)
        loss_own += (model(x_t, t, **own) - target).square().mean().item()
        loss_shuffled += (model(x_t, t, **shuffled) - target).square().mean().item()
    measured = (f"{matches}; loss with own captions {loss_own / len(DENOISE_NOISE_LEVELS):.4f} vs "
                f"shuffled {loss_shuffled / len(DENOISE_NOISE_LEVELS):.4f} on {x0.shape[0]} held-out clips")
    if loss_own < loss_shuffled:
        return Check("condition", PASS, measured)
    return Check("condition", FAIL, measured,
                 f"the model does not read its captions (step {ckpt['step']}): a wrong caption predicts "
                 "as well as the right one. Train longer; check that the captions describe the clips "
                 "(data.captions) and that model.caption_dropout is well below 1")


def misplaced_pieces(v_pred: torch.Tensor, v_true: torch.Tensor, patch_t: int, patch: int) -> torch.Tensor:
    """(N,) bool: does patch position n of the prediction consistently come from elsewhere?

    Both (B, C, T, h, w), B clips (or noise draws) of one geometry. Patches are cut here, not
    with models.dit.patchify, so that a broken patchify cannot hide itself. For each clip and
    position, the true patch of that clip most similar (cosine) to the predicted one is its
    apparent source. A position is misplaced when one other position is its source in more
    than PLACEMENT_CONSISTENCY of the clips: pieces put back in a fixed wrong order come from
    the same wrong place every time, while an untrained model's chance matches scatter.
    """
    def pieces(x):  # (N, D) unit vectors
        return F.normalize(rearrange(x.float(), "c (t pt) (h p) (w q) -> (t h w) (c pt p q)",
                                     pt=patch_t, p=patch, q=patch), dim=-1)
    n = v_pred[0, 0].numel() // (patch_t * patch * patch)
    counts = torch.zeros(n, n + 1, dtype=torch.long, device=v_pred.device)  # [i, j]: i came from j
    for pred, true in zip(v_pred, v_true):  # one clip at a time: (N, N) similarities, not (B, N, N)
        best, source = (pieces(pred) @ pieces(true).T).max(dim=-1)  # (N,) each
        source = torch.where(best > 0, source, n)  # a zero prediction matches nothing (column n)
        counts += F.one_hot(source, n + 1)
    top, top_source = counts[:, :n].max(dim=-1)  # (N,)
    own = torch.arange(n, device=v_pred.device)
    return (top_source != own) & (top > PLACEMENT_CONSISTENCY * v_pred.shape[0])


# --------------------------------------------------------------------------- running them


def default_checkpoint(cfg: TrainRunConfig) -> str:
    return os.path.join(cfg.experiment.runs_dir, cfg.experiment.name, "latest.pth")


def real_clips(cfg: TrainRunConfig, split: str, n: int) -> tuple[torch.Tensor, dict]:
    """Up to `n` clips spread over the split: videos (n, 3, T, H, W) in [-1, 1] and their batch
    {"label": (n,), "caption": [n strings] or None} (what a condition is made of)."""
    dataset = build_dataset(cfg.data, split, cfg.experiment.seed)
    index = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().long().tolist()
    items = [dataset[i] for i in index]
    batch = {"label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
             "caption": [it["caption"] for it in items] if "caption" in items[0] else None}
    return torch.stack([it["video"] for it in items]), batch


def run_diagnostics(cfg: TrainRunConfig, checkpoint: Optional[str], device: torch.device,
                    min_vae_psnr: float = DEFAULT_MIN_VAE_PSNR) -> Iterator[Check]:
    """Yields the checks one by one (each line can be printed as soon as it is known).

    `checkpoint` None: the checkpoint checks are SKIPped. A check that raises is a FAIL
    naming the exception: a diagnosis must not stop at the first surprise.
    """
    from training.stage2 import _family, latent_dims
    family = _family(cfg, RunLogger(None))  # the DiT family; the schedule, vae and text paths it implies
    vae = FrozenVAE.from_config(cfg.vae, device)
    val, val_batch = real_clips(cfg, "val", NUM_JIGSAW_REAL_CLIPS)
    train, _ = real_clips(cfg, "train", NUM_SCALE_CLIPS)
    train_set = build_dataset(cfg.data, "train", cfg.experiment.seed)
    text_length = family.text_length(cfg.text_encoder.max_length)
    configured = conditioning_for_training(cfg, train_set, device, RunLogger(None), None,
                                           family.text_convention(text_length), text_length,
                                           family.default_text_length)  # text: the encoder
    configured.check_family(family)
    dims = {**latent_dims(cfg, vae, family), **configured.dims()}
    latent_shape = ckpts.latent_shape(dims)
    pretrained = cfg.model.pretrained  # a LoRA checkpoint's base: the configured one (fingerprint checked)

    few_val = _spread(val, NUM_VAE_CLIPS)
    yield _guarded("vae_roundtrip", lambda: check_vae_roundtrip(vae, few_val, min_vae_psnr))
    yield _guarded("latent_scale", lambda: check_latent_scale(vae, train))
    yield _guarded("patchify", lambda: check_patchify(latent_shape, *family.patch))
    yield _guarded("identities", lambda: check_identities(make_objective(cfg.diffusion), latent_shape))
    yield _guarded("gradients", lambda: check_gradients(cfg, device))

    if checkpoint is None:
        why = f"no checkpoint at {default_checkpoint(cfg)}: train first, or pass --checkpoint PATH"
        yield from _skipped(CHECKPOINT_CHECKS, why)
        return
    try:
        ckpt = load_checkpoint(checkpoint, key="--checkpoint")
    except UserError as e:
        yield Check("checkpoint", FAIL, checkpoint, str(e))
        yield from _skipped(CHECKPOINT_CHECKS[1:], "the checkpoint could not be read")
        return
    first = _guarded("checkpoint", lambda: check_checkpoint(
        ckpt, ckpts.model_record(cfg.model, dims, family), checkpoint))
    yield first
    if ckpt.get("format") != ckpts.FORMAT:
        yield from _skipped(CHECKPOINT_CHECKS[1:], "not a stage-2 checkpoint of this repo")
        return
    yield _guarded("vae_fingerprint", lambda: check_vae_fingerprint(ckpt, vae, checkpoint))
    if first.status == FAIL:  # its model does not fit this config's data
        yield from _skipped(CHECKPOINT_CHECKS[2:], "the checkpoint is for another model / data geometry")
        return
    t = cfg.text_encoder
    try:  # the checkpoint's condition; a text model's encoder from the config, checked against it
        seam = conditioning_from_checkpoint(ckpt, checkpoint, device, t.path, t.subfolder, t.dtype)
    except UserError as e:
        yield Check("condition", FAIL, f"model.conditioning = {configured.kind}", str(e))
        yield from _skipped(CHECKPOINT_CHECKS[3:], "the checkpoint's condition cannot be built")
        return
    few_batch = _spread_batch(val_batch, NUM_VAE_CLIPS)
    yield _guarded("condition", lambda: check_condition(ckpt, configured, seam, vae, few_val, few_batch,
                                                        device, cfg.experiment.seed, checkpoint, pretrained))
    yield _guarded("denoise", lambda: check_denoise(ckpt, vae, few_val, seam.eval_kwargs(few_batch, device),
                                                    device, cfg.experiment.seed, pretrained))
    # The samples: validation.prompts (text models), else the held-out clips' own conditions.
    request = {"prompts": cfg.validation.prompts} if cfg.validation.prompts else seam.clip_conditions(
        val_batch["label"][:NUM_SAMPLES].tolist(), (val_batch["caption"] or [None] * NUM_SAMPLES)[:NUM_SAMPLES])
    yield _guarded("jigsaw", lambda: check_jigsaw(ckpt, vae, val, seam.eval_kwargs(val_batch, device),
                                                  device, cfg.validation, seam=seam, request=request,
                                                  pretrained=pretrained))


CHECKPOINT_CHECKS = ("checkpoint", "vae_fingerprint", "condition", "denoise", "jigsaw")
# The checks of the code paths (any model, trained or not, must PASS them); the others judge a
# model's quality. scripts/gpu_check_conditions.py requires these by name.
CODE_PATH_CHECKS = ("patchify", "identities", "gradients", "checkpoint", "vae_fingerprint")


def _skipped(names: tuple[str, ...], why: str) -> Iterator[Check]:
    for name in names:
        yield Check(name, SKIP, "not checked", why)


def _spread(clips: torch.Tensor, n: int) -> torch.Tensor:
    """`n` of `clips` spread over all of them (neighbouring windows overlap)."""
    index = torch.linspace(0, clips.shape[0] - 1, min(n, clips.shape[0])).round().long()
    return clips[index]


def _spread_batch(batch: dict, n: int) -> dict:
    """The batch entries of the clips `_spread` picks."""
    index = torch.linspace(0, len(batch["label"]) - 1, min(n, len(batch["label"]))).round().long()
    return {"label": batch["label"][index],
            "caption": None if batch["caption"] is None else [batch["caption"][i] for i in index.tolist()]}


def _guarded(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except Exception as e:  # reported as a failure with its cause, never swallowed
        return Check(name, FAIL, f"crashed: {type(e).__name__}: {e}",
                     "the check could not run; the error above says where")


def summary(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL, SKIP)}
    return (f"{len(checks)} checks: {counts[PASS]} passed, {counts[WARN]} warnings, "
            f"{counts[FAIL]} failed, {counts[SKIP]} skipped")
