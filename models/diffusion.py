"""All diffusion math: the noise schedule, the v-prediction target and loss, and the sampler.

Code name -> paper symbol (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022;
zero terminal SNR, Lin et al. 2023; min-SNR-gamma, Hang et al. 2023):

    betas[t]           beta_t
    alphas_cumprod[t]  alpha_bar_t = prod_{s <= t} (1 - beta_s)
    alpha              alpha_t = sqrt(alpha_bar_t)        (signal scale)
    sigma              sigma_t = sqrt(1 - alpha_bar_t)    (noise scale); alpha^2 + sigma^2 = 1
    x_t                x_t = alpha * x0 + sigma * eps     (`add_noise`)
    v                  v = alpha * eps - sigma * x0       (`v_target`, what the network predicts)
    x0                 x0 = alpha * x_t - sigma * v       (`x0_from_v`)
    eps                eps = sigma * x_t + alpha * v      (`eps_from_v`)
    snr                SNR(t) = alpha^2 / sigma^2         (`snr`; exactly 0 at t = T-1 with zero-SNR)

Timesteps are integers t in [0, num_train_timesteps); t = 0 is the cleanest. Every tensor
helper broadcasts with `append_dims`, so the same code serves images and (B, C, T, h, w)
video latents. Sampling runs diffusers' schedulers, built by `make_scheduler` from the very
config these formulas use (`scheduler_config`); tests check both sides agree.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from tqdm.auto import tqdm

from utils.config import DiffusionConfig
from utils.errors import ConfigError

SAMPLERS = ("ddim", "dpm++", "euler", "ddpm")
Generators = Union[torch.Generator, list[torch.Generator], None]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in all, to broadcast over a sample of any rank."""
    if a.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {a.ndim} dims, more than the target {ndim}")
    return a[(...,) + (None,) * (ndim - a.ndim)]


# --------------------------------------------------------------------------- schedule


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """beta_t for t = 0 .. T-1 in float64, with the names and formulas diffusers uses."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    elif cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta) (Stable Diffusion)
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":  # cosine (Nichol & Dhariwal 2021), beta <= 0.999
        betas = _cosine_betas(n)
    else:
        raise ConfigError(f"diffusion.beta_schedule = {cfg.beta_schedule!r}: use linear, "
                          "scaled_linear or squaredcos_cap_v2")
    return rescale_zero_terminal_snr(betas) if cfg.rescale_betas_zero_snr else betas


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                         for i in range(n)], dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that it is exactly 0
    at t = T-1 (pure noise, SNR = 0) while keeping its value at t = 0."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class LossOutput(NamedTuple):
    loss: torch.Tensor  # (B,) weighted v-MSE: what to back-propagate (after .mean())
    mse: torch.Tensor  # (B,) unweighted v-MSE: comparable across weightings, for logging
    weight: torch.Tensor  # (B,) the min-SNR weight (ones without weighting)


class Diffusion:
    """The training-side schedule and v-prediction math. Holds no parameters."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_train_timesteps = cfg.num_train_timesteps
        self.betas = make_betas(cfg)  # (T,) float64 on CPU: the master copy
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,) float64
        self._tables: dict[torch.device, torch.Tensor] = {}

    # ---- per-timestep coefficients

    def _coefs(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) integer t -> (3, B) float32 rows alpha, sigma, snr on t's device."""
        assert not t.is_floating_point(), "timesteps index the schedule: pass an integer tensor"
        table = self._tables.get(t.device)
        if table is None:  # built once per device, so CUDA gets it by construction
            ab = self.alphas_cumprod
            table = torch.stack([ab.sqrt(), (1 - ab).sqrt(), ab / (1 - ab)]).float().to(t.device)
            self._tables[t.device] = table  # (3, T)
        return table[:, t.long()]  # (3, B)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t shaped (B, 1, ..., 1) in `like`'s dtype, ready to broadcast."""
        alpha, sigma, _ = self._coefs(t).to(like.dtype)
        return append_dims(alpha, like.ndim), append_dims(sigma, like.ndim)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float32 alpha^2 / sigma^2."""
        return self._coefs(t)[2]

    # ---- the v parameterisation

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return sigma * x_t + alpha * v

    # ---- training

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) min-SNR-gamma weight on the v-MSE: min(snr, gamma) / (snr + 1).

        This is min(snr, gamma) on the x0-MSE rewritten for v, since x0 - x0_hat = -sigma *
        (v - v_hat) and sigma^2 = 1 / (snr + 1). Finite everywhere: 0 at the zero-SNR step.
        """
        snr = self.snr(t)
        if self.cfg.min_snr_gamma is None:
            return torch.ones_like(snr)
        return snr.clamp(max=self.cfg.min_snr_gamma) / (snr + 1)

    def loss(self, model_out_v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> LossOutput:
        """Per-sample v-prediction MSE (mean over all but the batch dim), weighted."""
        target = self.v_target(x0.float(), noise.float(), t)
        mse = (model_out_v.float() - target).square().flatten(1).mean(dim=1)  # (B,)
        weight = self.loss_weight(t)
        return LossOutput(loss=mse * weight, mse=mse, weight=weight)

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(batch,) int64 timesteps in [0, T), on `device`.

        `uniform`: every t equally often. `logit_normal` (as in SD3): t / T = sigmoid(n) with
        n ~ N(logit_mean, logit_std), which spends fewer updates on the nearly clean end of the
        schedule, where the v-MSE is small and easy, and with logit_mean > 0 more on the noisy
        end, where every sampler starts and the layout of a video is decided.
        """
        gen_device = generator.device if generator is not None else device
        T = self.num_train_timesteps
        if self.cfg.timestep_sampling == "uniform":
            t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
        else:
            n = torch.randn(batch, generator=generator, device=gen_device)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * n)
            t = (u * T).long().clamp_(0, T - 1)
        return t.to(device)

    # ---- the diffusers side

    def scheduler_config(self) -> dict:
        return scheduler_config(self.cfg)


# --------------------------------------------------------------------------- samplers


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """The schedule as diffusers scheduler kwargs (accepted by all four samplers).

    `timestep_spacing="trailing"` makes sampling start at t = T-1, the step the zero-SNR
    schedule trains as pure noise (Lin et al. 2023, Table 2); "leading"/"linspace" would start
    below it from an x_T that is not the noise level the model expects.
    """
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                prediction_type="v_prediction", timestep_spacing="trailing")


def make_scheduler(name: str, cfg: DiffusionConfig):
    """A fresh diffusers scheduler for sampler `name` (one of SAMPLERS), from `cfg`'s schedule."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           EulerDiscreteScheduler)
    base = scheduler_config(cfg)
    if name == "ddim":  # eta = 0; the last step lands on alpha_bar = 1 (a clean x0)
        return DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True)
    if name == "ddpm":  # ancestral; clip_sample would clamp latents to [-1, 1]
        return DDPMScheduler(**base, clip_sample=False, variance_type="fixed_small")
    if name == "dpm++":  # 2nd-order multistep; final sigma 0 returns the denoised sample
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero", lower_order_final=True)
    if name == "euler":  # with zero SNR diffusers sets alpha_bar[T-1] = 2**-24 (sigma ~ 4096)
        return EulerDiscreteScheduler(**base, final_sigmas_type="zero")
    raise ConfigError(f"sampler = {name!r}: use one of {', '.join(SAMPLERS)}")


def initial_noise(shape: tuple[int, ...], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """randn of `shape`; with a list of generators sample i comes from generator i alone.

    Noise is drawn on the generator's device and then moved, so a CPU seed gives the same
    video on CPU and CUDA.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device)
                            for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def guided_v(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
             guidance_scale: float, null_class_id: Optional[int]) -> torch.Tensor:
    """The model's v, with classifier-free guidance by one batched cond + uncond pass."""
    if guidance_scale == 1.0 or y is None:
        return model_fn(x, t, y)
    if null_class_id is None:
        raise ValueError("guidance_scale != 1 needs null_class_id (the model's unconditional label)")
    y_null = torch.full_like(y, null_class_id)
    v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]),
                                torch.cat([y, y_null])).chunk(2)  # each (B, C, T, h, w)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample(model_fn: ModelFn, shape: tuple[int, ...], *, scheduler, num_steps: int,
           generator: Generators, device: torch.device | str, y: Optional[torch.Tensor] = None,
           guidance_scale: float = 1.0, null_class_id: Optional[int] = None,
           progress: bool = False) -> torch.Tensor:
    """Run `scheduler` from pure noise to x0 latents of `shape`, e.g. (B, C, T, h, w).

    `model_fn(x_t, t, y) -> v` with t a (B,) tensor of the scheduler's timesteps. The one
    sampler of this repo: validation and predict both call it. `scheduler` is stateful: pass
    a fresh one from `make_scheduler` (or one you own) per call.
    """
    scheduler.set_timesteps(num_steps, device=device)
    x = initial_noise(shape, generator, device) * scheduler.init_noise_sigma
    y = None if y is None else y.to(device)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
        x_in = scheduler.scale_model_input(x, t)  # identity except for Euler (sigma -> VP scale)
        t_batch = t.to(device).expand(shape[0])  # (B,)
        v = guided_v(model_fn, x_in, t_batch, y, guidance_scale, null_class_id)
        x = scheduler.step(v.to(x.dtype), t, x, generator=generator).prev_sample
    return x
