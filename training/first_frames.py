"""First-frame conditioning: image-to-video and videos longer than the training window.

The fourth condition aspect, orthogonal to the seam's none / class / text
(training/conditioning.py): any of those may also be given its first `model.condition_frames`
latent frames clean. Training, the sampler, predict and evaluate ask a `FirstFrames` object.

Design (per-token timesteps, a clean prefix, a loss mask): with probability
`model.first_frame_conditioning` a training clip keeps its first k = `model.condition_frames`
latent frames CLEAN (x_t = x0 there, exactly), the DiT is told t = 0 for them through its
per-frame timesteps ((B, T) t, models/dit.py), and they carry NO loss (`Diffusion.loss`'s
`frame_mask`: the MSE averages over the generated frames only). This is LTX-Video's trainer
(`noisy = where(cond, x0, noisy)`, per-token timesteps `where(cond, 0, t)`, `loss * ~cond /
mean(~cond)`: LTX-Video-Trainer@31b1273 training_strategies.py:127-145,195-287) and Open-Sora
1.2's masks (`x_t = where(mask, x_t, x_t0)`, `mean_flat(..., mask)`: Open-Sora@v1.2.0
rectified_flow.py:89-102), see shared/research/conditioning.md section 4 (a), (e). Why this one
and not Wan / CogVideoX's channel concat (a mask + the clean latents as extra input channels,
loss on all frames, conditioning.md 4 (b), (c)):
- extension comes free: a clean prefix of k frames is the same mechanism as one clean image
  frame, which is why the anchors that extend videos (Open-Sora 1.2's loop, LTX's condition
  pipeline, diffusion forcing's per-frame noise levels, conditioning.md section 5) use it;
- no new input channels, so the DiT's architecture and every unconditioned step are the same
  (a fraction 1 - p of the clips trains exactly as before), and a model without the condition
  runs op for op as before (t of shape (B,), no mask);
- with flow matching t = 0 is s = 0, exactly the clean sample; with v_prediction t = 0 is the
  schedule's least noisy step (alpha_bar_0 = 1 - beta_0), and the frames are the clean latents
  anyway (no noise is added), so the model learns "t = 0 = given".
A pretrained model trained the channel way keeps it: CogVideoX-I2V gets the image's latent on
its extra input channels (`FirstFrames.image_input`, models/backbones.py `first_frames_as`), as
its pipeline gives it, since fine-tuning it on another form would unlearn it.
Which latents are the condition: the posterior MEANS, in training and at predict alike.
Predict encodes the image (or the decoded previous window) with `vae.encode(..., sample=False)`;
training takes the condition frames of x_t from the posterior means of the clip too
(`training/stage2.py` `batch_latents`, also from cached moments), while x0 of the generated
frames, the loss target, stays a posterior sample with `vae.sample_posterior: true`. A posterior
sample differs from the mean by the VAE's std (5.5% of the latent RMS on the demo VAE), so
training on samples would condition on latents predict never gives.
No noise on the condition (as the LTX trainer and Open-Sora 1.2, which train on the clean
prefix; LTX's condition pipeline adds 0.15 t^2 noise only at inference and CogVideoX noises
the image of a channel-concat design). Noise augmentation against drift is the obvious
follow-up (conditioning.md 5, item 2); it is not an option here because no measurement shows
it helps yet: drift is measured (evaluate's per-window numbers, benchmarks/drift.py) before an
option is added, not guessed.

VAEs: with a per-frame VAE each latent frame is one pixel frame; with a causal video VAE
latent frame 0 encodes pixel frame 0 alone, so the image condition is exact, and k latent
frames are `Geometry.pixel_frames(k)` = 1 + (k - 1) * f_t pixel frames. Extension re-encodes the
last such pixel frames of the decoded video with a causal VAE (its later latent frames depend on
every frame before them, so a suffix cut from a longer latent is not what training saw at a
clip start); with a per-frame VAE the last k latent frames are reused as they are.

The random choice per clip is drawn from the run's checkpointed noise generator, so a resumed
run conditions the same clips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from utils.errors import ConfigError, UserError
from utils.paths import refuse_folder

KEY = "model.first_frame_conditioning"


@dataclass(frozen=True)
class FirstFrames:
    """The first-frame condition of one model: probability p per training clip, k latent frames."""
    probability: float = 0.0
    frames: int = 1

    @classmethod
    def of(cls, model_cfg) -> "FirstFrames":
        """From a ModelConfig (training) or a checkpoint's model config dict (predict)."""
        get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d: getattr(model_cfg, k, d)
        return cls(float(get("first_frame_conditioning", 0.0) or 0.0), int(get("condition_frames", 1) or 1))

    @property
    def enabled(self) -> bool:
        return self.probability > 0

    def summary(self) -> str:
        if not self.enabled:
            return "no first-frame conditioning"
        return f"first {self.frames} latent frame(s) given with p = {self.probability:g}"

    def check_vae(self, geometry, latent_frames: int, patch_t: int = 1, vae_name: str = "the VAE") -> None:
        """Refuse (ConfigError), before training, condition frames the VAE cannot encode alone:
        image-to-video, extension and val/image_to_video encode the `geometry.pixel_frames(k)`
        pixel frames behind k latent frames, so that count must follow the VAE's frame rule
        (CogVideoX decodes and encodes 1 + 8j frames: an odd k). Names the counts that work:
        below `latent_frames` (the clip's), multiples of model.patch_t, fitting the rule.
        `geometry`: models/vae.py Geometry (measured)."""
        if not self.enabled or geometry.frames_ok(geometry.pixel_frames(self.frames)):
            return
        ok = [k for k in range(1, latent_frames)
              if k % patch_t == 0 and geometry.frames_ok(geometry.pixel_frames(k))]
        # k = 1 always fits (one pixel frame); with patch_t > 1 no multiple of it may fit
        shown = ", ".join(map(str, ok[:4])) + (", ..." if len(ok) > 4 else "")
        advice = (f"use model.condition_frames = {ok[0]}" + (f" (or {shown})" if len(ok) > 1 else "")
                  if ok else f"no count below the clip's {latent_frames} latent frames fits it")
        raise ConfigError(
            f"model.condition_frames = {self.frames}: image-to-video and extension encode the "
            f"{geometry.pixel_frames(self.frames)} pixel frames behind {self.frames} latent frames "
            f"on their own, but {vae_name} takes clips of {geometry.frame_rule()}; {advice}")

    def require(self, what: str, where: str) -> None:
        """Refuse `what` (image-to-video, extension) for a model trained without the condition."""
        if not self.enabled:
            raise UserError(f"{what} needs a model trained with first-frame conditioning, but {where} "
                            f"was trained with {KEY} = 0; train with {KEY} > 0 (e.g. 0.5), or drop "
                            f"{what.split(' (')[0]}")

    # ---- training

    def draw(self, batch: int, device: torch.device, gen: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """(B,) bool: which clips get the condition, from `gen` (checkpointed: a resume draws the
        same); None when the condition is off (nothing drawn, so older runs are unchanged)."""
        if not self.enabled:
            return None
        gen_device = gen.device if gen is not None else device
        return (torch.rand(batch, generator=gen, device=gen_device) < self.probability).to(device)

    def noised(self, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, given: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(x_t, t, frame_mask) for the training step. clean, x_t (B, C, T, h, w); t (B,).
        `clean`: the latents the condition is given as, the clip's posterior means (see the
        module docstring: what predict gives).

        With `given` (B,) bool: x_t's first k frames of the given clips are `clean` exactly, t
        becomes (B, T) with 0 there, and frame_mask (B, T) is False there (no loss). Without:
        unchanged."""
        if given is None:
            return x_t, t, None
        batch, frames = clean.shape[0], clean.shape[2]
        cond = torch.zeros(batch, frames, dtype=torch.bool, device=clean.device)  # (B, T)
        cond[:, :self.frames] = given[:, None]
        x_t = torch.where(cond[:, None, :, None, None], clean.to(x_t.dtype), x_t)
        t_frames = torch.where(cond, torch.zeros((), dtype=t.dtype, device=t.device),
                               t[:, None].expand(batch, frames))  # (B, T)
        return x_t, t_frames, ~cond

    def image_input(self, clean: torch.Tensor, given: Optional[torch.Tensor]) -> torch.Tensor:
        """The channel form of the condition (CogVideoX-I2V, models/backbones.py): (B, C, T, h, w)
        with the first k latent frames of `clean` for the `given` (B,) clips, zeros elsewhere
        (None: zeros for every clip). Noise and t are left as they are; every frame has loss."""
        image = torch.zeros_like(clean)
        if given is not None:
            image[:, :, :self.frames] = torch.where(given[:, None, None, None, None],
                                                    clean[:, :, :self.frames], image[:, :, :self.frames])
        return image


# --------------------------------------------------------------------------- predict


def load_image(path: str, height: int, width: int, key: str = "image") -> torch.Tensor:
    """A PNG/JPG as (3, H, W) float in [-1, 1], center-cropped to H:W and resized to H x W exactly
    as training clips are (data/videos.py `cover_crop_box` + `crop_resize`)."""
    import os

    from data.videos import cover_crop_box, crop_resize
    from utils.video_io import VideoReadError, _read_image
    path = os.path.expanduser(path)
    refuse_folder(path, key, "a PNG or JPG image")
    if not os.path.isfile(path):
        raise UserError(f"{key} = {path}: no such file; give a PNG or JPG image")
    try:
        frame = _read_image(path)  # (h, w, 3) uint8
    except VideoReadError as e:
        raise UserError(f"{key} = {e}") from None
    x = torch.from_numpy(frame).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
    x = crop_resize(x, height, width, cover_crop_box(x.shape[2], x.shape[3], height, width))
    return (x[0].float() / 127.5 - 1).clamp(-1, 1)  # (3, H, W)


def window_plan(num_frames: int, window: int, overlap: int) -> list[int]:
    """New pixel frames each window adds: the first window all `window` frames, every later one
    window - overlap (its first `overlap` frames are the previous window's last, the condition);
    the last cut so that the total is exactly `num_frames`. Linear in the number of windows."""
    if num_frames <= window:
        return [num_frames]
    step = window - overlap
    if step < 1:
        raise ValueError(f"a window of {window} frames sharing {overlap} adds no frame")
    full, rest = divmod(num_frames - window, step)
    return [window] + [step] * full + ([rest] if rest else [])


@torch.no_grad()
def generate_long(sample_window, vae, *, batch: int, latent_shape: Sequence[int], frames: int,
                  num_frames: int, images: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(B, 3, num_frames, H, W) pixels in [-1, 1]: window by window.

    `sample_window(shape, cond_frames)` -> latents (B, C, T, h, w) of one window (the sampler,
    its generators, conditions and guidance bound by the caller); `latent_shape` (C, T, h, w)
    the training window; `frames` k the condition latent frames; `images` (B, 3, H, W) or None
    (the first window is then unconditioned). Each later window is conditioned on the last k
    latent frames of the one before and adds only its new pixel frames, so the joined video
    repeats no frame."""
    geometry = vae.geometry
    window_px = geometry.pixel_frames(latent_shape[1])
    overlap = geometry.pixel_frames(frames)  # pixel frames behind k latent frames
    causal = geometry.temporal > 1
    shape = (batch, *latent_shape)
    cond = None
    if images is not None:  # a still prefix: k latent frames of the image (1 frame when k = 1)
        still = images.to(device)[:, :, None].expand(-1, -1, overlap, -1, -1)  # (B, 3, overlap, H, W)
        cond = vae.encode(still, sample=False)[:, :, :frames]  # (B, C, k, h, w)
    pieces: list[torch.Tensor] = []
    for i, new in enumerate(window_plan(num_frames, window_px, overlap)):
        latents = sample_window(shape, cond)  # (B, C, T, h, w)
        pixels = vae.decode(latents.float()).clamp(-1, 1)  # (B, 3, window_px, H, W)
        pieces.append(pixels[:, :, :new] if i == 0 else pixels[:, :, overlap:overlap + new])
        if causal:  # re-encode the last pixel frames: latent frame 0 of them is one frame alone
            tail = torch.cat(pieces, dim=2)[:, :, -overlap:]
            cond = vae.encode(tail, sample=False)[:, :, :frames]
        else:
            cond = latents[:, :, -frames:]
    return torch.cat(pieces, dim=2)


def windows_of(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) pixel frames of each window of a video made by `generate_long` (window i
    starts `overlap` frames before the frames it added), for per-window drift numbers."""
    spans, start = [], 0
    for i, new in enumerate(window_plan(num_frames, window, overlap)):
        begin = start if i == 0 else start - overlap
        spans.append((begin, start + new))
        start += new
    return spans


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (or stacks) of one shape."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
