"""All diffusion math: the training objectives (one small class each), their noise schedules,
targets and losses, and the samplers.

`VPrediction` (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022; zero terminal SNR, Lin
et al. 2023; min-SNR-gamma, Hang et al. 2023; CogVideoX's SNR shift, Yang et al. 2024). Code
name -> paper symbol:

    betas[t]           beta_t
    alphas_cumprod[t]  alpha_bar_t = prod_{s <= t} (1 - beta_s), then (CogVideoX) shifted
                       alpha_bar / (k + (1 - k) alpha_bar) with k = snr_shift_scale, i.e.
                       SNR / k, before the zero-SNR rescale
    alpha              alpha_t = sqrt(alpha_bar_t)        (signal scale)
    sigma              sigma_t = sqrt(1 - alpha_bar_t)    (noise scale); alpha^2 + sigma^2 = 1
    x_t                x_t = alpha * x0 + sigma * eps     (`add_noise`)
    v                  v = alpha * eps - sigma * x0       (`v_target`, what the network predicts)
    x0                 x0 = alpha * x_t - sigma * v       (`x0_from_v`)
    eps                eps = sigma * x_t + alpha * v      (`eps_from_v`)
    snr                SNR(t) = alpha^2 / sigma^2         (`snr`; exactly 0 at t = T-1 with zero-SNR)

Its model time is an integer schedule index t in [0, num_train_timesteps); t = 0 is the
cleanest.

`FlowMatching` (rectified flow, Liu et al. 2022; flow matching, Lipman et al. 2022; timestep
densities and shift, Esser et al. 2024 "SD3"), in the sign convention of diffusers'
FlowMatchEulerDiscreteScheduler (and of Wan):

    s                  sigma in [0, 1], the noise level (`flow_sigma`); s = t / T
    x_t                x_t = (1 - s) * x0 + s * eps       (`add_noise`)
    u                  u = eps - x0 = dx_t / ds           (`target`, the velocity the network predicts)
    x0                 x0 = x_t - s * u                   (`x0_from_output`)
    eps                eps = x_t + (1 - s) * u            (`eps_from_output`)
    shift              s' = shift * s / (1 + (shift - 1) * s)           (`shift_sigma`, fixed)
    mu                 s' = e^mu / (e^mu + 1 / s - 1), mu linear in the
                       latent positions T * h * w                         (`flow_mu`, dynamic)

The model's time input is t = s * T. In training it is a float. In sampling it is the
scheduler's timestep: the same float s * T with `euler` (FlowMatchEulerDiscrete, as diffusers'
SD3 and LTX-Video pipelines feed it), but s * T rounded down to an integer with `unipc` and
`dpm++`, whose diffusers classes keep their timesteps as int64 (as diffusers' Wan pipeline
feeds them): the model is told a time up to one of the T steps early, while the scheduler
steps with the exact s.

Both are `Objective`s with one interface: sample_timesteps -> model time t, add_noise,
target, loss, x0_from_output, eps_from_output, identity_error, make_scheduler. The training
loop, validation, sampling and diagnose hold an `Objective` and never ask which one it is;
`make_objective(cfg)` is the only place that reads `diffusion.objective`. Every tensor helper
broadcasts with `append_dims`, so the same code serves images and (B, C, T, h, w) video
latents. Sampling runs diffusers' schedulers, built by `Objective.make_scheduler` from the
very config these formulas use (`scheduler_config`); tests check both sides agree. A
pretrained model's own scheduler (its folder's `scheduler/`, e.g. Wan's UniPC or
CogVideoX's DDIM) is its `native` sampler, built from that folder's config exactly as its
diffusers pipeline builds it.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from utils.config import (AUTO_SAMPLER, SAMPLERS_BY_OBJECTIVE, DiffusionConfig, default_sampler,
                          resolve_sampler)
from utils.errors import ConfigError

SAMPLERS = SAMPLERS_BY_OBJECTIVE["v_prediction"]
FLOW_SAMPLERS = SAMPLERS_BY_OBJECTIVE["flow_matching"]
FLOW = "flow_matching"
Generators = Union[torch.Generator, list[torch.Generator], None]
ModelFn = Callable[..., torch.Tensor]  # (x_t, t, **condition) -> output


def append_dims(a: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in all, to broadcast over a sample of any rank.
    A per-frame (B, T) -> (B, 1, T, 1, 1), to broadcast over (B, C, T, h, w) video latents."""
    if a.ndim == 2 and ndim == 5:  # per-frame timesteps (first-frame conditioning)
        return a[:, None, :, None, None]
    if a.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {a.ndim} dims, more than the target {ndim}")
    return a[(...,) + (None,) * (ndim - a.ndim)]


# --------------------------------------------------------------------------- VP schedule


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """beta_t for t = 0 .. T-1 in float64, with the names and formulas diffusers uses (before
    any SNR shift: `vp_alphas_cumprod` applies that)."""
    cfg = cfg.resolved()
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
    if cfg.snr_shift_scale != 1.0:  # the shift acts on alpha_bar: vp_alphas_cumprod rescales after it
        return betas
    return rescale_zero_terminal_snr(betas) if cfg.rescale_betas_zero_snr else betas


def vp_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """alpha_bar_t (T,) float64: cumprod(1 - beta), then CogVideoX's SNR shift and the zero-SNR
    rescale, in the order of diffusers' CogVideoXDDIMScheduler. Without a shift, the plain
    cumprod of `make_betas` (which already carries the rescale), as every VP scheduler has it."""
    cfg = cfg.resolved()
    ab = torch.cumprod(1 - make_betas(cfg), dim=0)
    if cfg.snr_shift_scale == 1.0:
        return ab
    k = cfg.snr_shift_scale
    ab = ab / (k + (1 - k) * ab)  # SNR / k
    return _rescale_alphas_cumprod(ab) if cfg.rescale_betas_zero_snr else ab


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                         for i in range(n)], dtype=torch.float64)


def _rescale_alphas_cumprod(alphas_bar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 on alpha_bar: shift and scale sqrt(alpha_bar) so that it is
    exactly 0 at t = T-1 (pure noise, SNR = 0) while keeping its value at t = 0."""
    sqrt_ab = alphas_bar.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    return ((sqrt_ab - last) * first / (first - last)) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """`_rescale_alphas_cumprod` written on betas, as diffusers' DDPM/DDIM schedulers apply it."""
    alphas_bar = _rescale_alphas_cumprod(torch.cumprod(1 - betas, dim=0))
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class LossOutput(NamedTuple):
    loss: torch.Tensor  # (B,) weighted MSE to the objective's target: what to back-propagate (after .mean())
    mse: torch.Tensor  # (B,) unweighted MSE: comparable across weightings, for logging
    weight: torch.Tensor  # (B,) the loss weight (min-SNR for v, loss_weighting for flow; ones without)


# --------------------------------------------------------------------------- flow shift


def latent_seq_len(latent_shape: Sequence[int]) -> int:
    """Sequence length for the dynamic flow shift: latent positions T * h * w of a (B, C, T, h, w)
    (or (B, C, h, w)) shape, before patching, so the DiT's patch size does not enter."""
    return math.prod(latent_shape[2:])


def flow_mu(cfg: DiffusionConfig, latent_shape: Sequence[int]) -> Optional[float]:
    """mu of the dynamic flow shift for latents of `latent_shape`; None when the shift is fixed
    (or the objective is v). The formula of diffusers' `calculate_shift`: linear in the
    sequence length through (base_seq_len, base_shift) and (max_seq_len, max_shift),
    extrapolated beyond them (no clamp). What counts as the sequence length is this repo's
    choice, not every pipeline's: the latent positions T * h * w before the DiT's patching
    (`latent_seq_len`), as diffusers' LTX-Video pipeline counts them. Its Flux and SD3
    pipelines count the transformer's tokens after 2x2 patching, 4x fewer for the same
    latents, so with their base / max values (the defaults here are Flux's 256 / 4096) the same
    latents get a larger mu here than in those pipelines."""
    cfg = cfg.resolved()
    if cfg.objective != FLOW or not cfg.flow_shift_dynamic:
        return None
    slope = (cfg.flow_max_shift - cfg.flow_base_shift) / (cfg.flow_max_seq_len - cfg.flow_base_seq_len)
    return cfg.flow_base_shift + slope * (latent_seq_len(latent_shape) - cfg.flow_base_seq_len)


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift s' = shift s / (1 + (shift - 1) s): 0 and 1 stay, the middle moves noisier."""
    return shift * s / (1 + (shift - 1) * s)


def time_shift_sigma(s: torch.Tensor, mu: float) -> torch.Tensor:
    """The exponential time shift s' = e^mu / (e^mu + (1/s - 1)); the same as `shift_sigma`
    with shift = e^mu (finite at s = 0: 1/0 = inf gives s' = 0)."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


# --------------------------------------------------------------------------- objectives


class Objective:
    """The training-side math of one objective, and the samplers that serve it. Holds no
    parameters.

    Interface (what training, validation, sampling and diagnose call): `sample_timesteps`,
    `add_noise`, `target`, `loss`, `loss_weight`, `x0_from_output`, `eps_from_output`,
    `identity_error`, `scheduler_config`, `make_scheduler`, `mu`. `native`: a pretrained
    model's own scheduler, {"sampler": name, "class_name": ..., "config": {...}} (its folder's
    scheduler config), built when that sampler is asked for.
    """
    objective: str = ""

    def __new__(cls, cfg: DiffusionConfig, native: Optional[dict] = None):
        """`Objective(cfg)` (alias `Diffusion(cfg)`) builds the class of `cfg.objective`."""
        if cls is Objective:
            cls = OBJECTIVES[cfg.resolved().objective]
        return super().__new__(cls)

    def __init__(self, cfg: DiffusionConfig, native: Optional[dict] = None):
        self.cfg = cfg.resolved()
        self.num_train_timesteps = self.cfg.num_train_timesteps
        self.native = native

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS_BY_OBJECTIVE[self.objective]

    # ---- the objective's formulas (each subclass)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of clean `x0` at model time `t` with `noise` eps."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        raise NotImplementedError

    def x0_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by the network's output `out` at (x_t, t)."""
        raise NotImplementedError

    def eps_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by the network's output `out` at (x_t, t)."""
        raise NotImplementedError

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) (or per-frame (B, T)) weight on the per-sample MSE to `target`."""
        raise NotImplementedError

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: Optional[torch.Generator] = None, *,
                         latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(batch,) model times on `device`, drawn from `diffusion.timestep_sampling`."""
        raise NotImplementedError

    def identity_error(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[float, str]:
        """The largest error of the schedule's own identity at times `t`, and its name (diagnose)."""
        raise NotImplementedError

    def scheduler_config(self) -> dict:
        return scheduler_config(self.cfg)

    def mu(self, latent_shape: Sequence[int]) -> Optional[float]:
        """The dynamic flow shift of a batch of `latent_shape` (None: a fixed schedule)."""
        return flow_mu(self.cfg, latent_shape)

    # ---- shared

    @property
    def default_sampler(self) -> str:
        """What `sampler: auto` is for this objective: a pretrained model's own sampler (Wan
        unipc, CogVideoX ddim), else `default_sampler(objective)` (utils/config_common.py)."""
        return self.native["sampler"] if self.native is not None else default_sampler(self.objective)

    def resolve_sampler(self, name: str, key: str = "sampler", whose: str = "") -> str:
        """`auto` -> `default_sampler`; any other name returned when it can serve the objective,
        else refused naming those that can."""
        if name == AUTO_SAMPLER:
            return self.default_sampler
        return resolve_sampler(name, self.objective, key, whose)

    def make_scheduler(self, name: str):
        """A fresh diffusers scheduler for sampler `name` (`auto` resolved): the native one (a
        pretrained model's own scheduler class and config) when `name` is its sampler, else built
        from this objective's schedule. A sampler that cannot serve the objective is refused
        naming those that can."""
        name = self.resolve_sampler(name)
        if self.native is not None and name == self.native["sampler"]:
            return _native_scheduler(self.native)
        return make_scheduler(name, self.cfg)

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> LossOutput:
        """Per-sample MSE to the objective's target (mean over all but the batch dim), weighted.

        Per-frame form (first-frame conditioning): `t` (B, T) one model time per latent frame of
        (B, C, T, h, w) latents, `frame_mask` (B, T) bool, True = the frame carries loss (False:
        a clean condition frame). Each frame's MSE is weighted by its own t's weight and the
        sample's loss, mse and weight are means over its loss-carrying frames only (LTX-Video's
        loss mask, Open-Sora 1.2's `mean_flat(mask)`), so a condition frame contributes nothing
        and a sample's loss keeps the scale of an unconditioned one.
        """
        target = self.target(x0.float(), noise.float(), t)
        if t.ndim == 1 and frame_mask is None:
            mse = (model_out.float() - target).square().flatten(1).mean(dim=1)  # (B,)
            weight = self.loss_weight(t)
            return LossOutput(loss=mse * weight, mse=mse, weight=weight)
        batch, frames = x0.shape[0], x0.shape[2]
        t_frames = t if t.ndim == 2 else t[:, None].expand(batch, frames)  # (B, T)
        keep = (torch.ones(batch, frames, dtype=torch.bool, device=x0.device) if frame_mask is None
                else frame_mask.to(x0.device, torch.bool))  # (B, T)
        # Checked on the device (no host sync in the training step; on CPU it raises here):
        # FirstFrames never masks every frame, so a failure is a bug in the caller.
        torch._assert_async(keep.any(dim=1).all(), "frame_mask leaves a sample with no frame to carry loss")
        per_frame = (model_out.float() - target).square().mean(dim=(1, 3, 4))  # (B, T)
        w_frame = self.loss_weight(t_frames)  # (B, T)
        kept = keep.float()
        count = kept.sum(dim=1)  # (B,)
        mse = (per_frame * kept).sum(dim=1) / count
        loss = (per_frame * w_frame * kept).sum(dim=1) / count
        weight = (w_frame * kept).sum(dim=1) / count
        return LossOutput(loss=loss, mse=mse, weight=weight)

    def _density(self, batch: int, device: torch.device | str,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
        """(batch,) float32 u in [0, 1] drawn from `timestep_sampling`, as diffusers'
        compute_density_for_timestep_sampling."""
        kind = self.cfg.timestep_sampling
        if kind == "logit_normal":
            n = torch.randn(batch, generator=generator, device=device)
            return torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * n)
        u = torch.rand(batch, generator=generator, device=device)
        if kind == "mode":
            u = 1 - u - self.cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u


class VPrediction(Objective):
    """v-prediction on a VP schedule (the repo's default; CogVideoX's with snr_shift_scale).
    Model time: the integer schedule index t."""
    objective = "v_prediction"

    def __init__(self, cfg: DiffusionConfig, native: Optional[dict] = None):
        super().__init__(cfg, native)
        self.alphas_cumprod = vp_alphas_cumprod(self.cfg)  # (T,) float64 on CPU: the master copy
        self.betas = torch.cat([1 - self.alphas_cumprod[:1],
                                1 - self.alphas_cumprod[1:] / self.alphas_cumprod[:-1]])  # (T,) float64
        self._tables: dict[torch.device, torch.Tensor] = {}

    def _coefs(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) (or per-frame (B, T)) integer t -> (3, B) (or (3, B, T)) float32 rows alpha,
        sigma, snr on t's device."""
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
        """(B,) (or per-frame (B, T)) float32 alpha^2 / sigma^2."""
        return self._coefs(t)[2]

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return sigma * x_t + alpha * v

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.v_target(x0, noise, t)

    def x0_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.x0_from_v(x_t, out, t)

    def eps_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_from_v(x_t, out, t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma on the v-MSE, min(snr, gamma) / (snr + 1). This is min(snr, gamma) on
        the x0-MSE rewritten for v, since x0 - x0_hat = -sigma * (v - v_hat) and sigma^2 =
        1 / (snr + 1). Finite everywhere: 0 at the zero-SNR step. Without gamma: plain v-MSE
        (which is also CogVideoX's 1 / (1 - alpha_bar)-weighted x0-MSE, exactly)."""
        snr = self.snr(t)
        if self.cfg.min_snr_gamma is None:
            return torch.ones_like(snr)
        return snr.clamp(max=self.cfg.min_snr_gamma) / (snr + 1)

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: Optional[torch.Generator] = None, *,
                         latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(batch,) int64 t in [0, T). `uniform`: every t equally often. `logit_normal` (as in
        SD3): t / T = sigmoid(n) with n ~ N(logit_mean, logit_std), which spends fewer updates on
        the nearly clean end of the schedule, where the v-MSE is small and easy, and with
        logit_mean > 0 more on the noisy end, where every sampler starts and the layout of a
        video is decided. `mode`: SD3's density with curvature mode_scale."""
        gen_device = generator.device if generator is not None else device
        T = self.num_train_timesteps
        if self.cfg.timestep_sampling == "uniform":
            t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
        else:
            u = self._density(batch, gen_device, generator)
            t = (u * T).long().clamp_(0, T - 1)
        return t.to(device)

    def identity_error(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[float, str]:
        alpha, sigma = self.alpha_sigma(t, x0)
        return (alpha ** 2 + sigma ** 2 - 1).abs().max().item(), "alpha^2 + sigma^2 - 1"


class FlowMatching(Objective):
    """Rectified-flow velocity (Wan's objective). Model time: s * T, a float."""
    objective = FLOW

    def flow_sigma(self, t: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model time t (float or integer) -> noise level s = t / T: (B,) float32, or shaped
        (B, 1, ..., 1) in `like`'s dtype when `like` is given."""
        s = t.float() / self.num_train_timesteps
        return s if like is None else append_dims(s.to(like.dtype), like.ndim)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.flow_sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def x0_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - self.flow_sigma(t, x_t) * out

    def eps_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t + (1 - self.flow_sigma(t, x_t)) * out

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """diffusers' compute_loss_weighting_for_sd3 schemes on s. sigma_sqrt is 1 / s^2 with s
        floored at 1 / T (the least noise diffusers' discrete schedule trains), so the weight
        stays finite at s = 0."""
        s = self.flow_sigma(t)
        if self.cfg.loss_weighting == "sigma_sqrt":
            return s.clamp(min=1 / self.num_train_timesteps) ** -2
        if self.cfg.loss_weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
        return torch.ones_like(s)

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: Optional[torch.Generator] = None, *,
                         latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(batch,) float32 s * T: s drawn from `timestep_sampling` (uniform, logit_normal,
        mode), then shifted (`flow_shift`, or the dynamic shift from `latent_shape`, the
        (B, C, T, h, w) shape of the batch, which it then needs)."""
        gen_device = generator.device if generator is not None else device
        u = self._density(batch, gen_device, generator)  # (B,) in [0, 1]
        return (self._shift(u, latent_shape) * self.num_train_timesteps).to(device)

    def _shift(self, s: torch.Tensor, latent_shape: Optional[Sequence[int]]) -> torch.Tensor:
        """s -> the shifted s the flow objective trains and samples at."""
        if self.cfg.flow_shift_dynamic:
            if latent_shape is None:
                raise ValueError("diffusion.flow_shift_dynamic needs the batch's latent_shape "
                                 "to compute its shift: pass sample_timesteps(..., latent_shape=x0.shape)")
            return time_shift_sigma(s, flow_mu(self.cfg, latent_shape))
        return shift_sigma(s, self.cfg.flow_shift)

    def identity_error(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[float, str]:
        zero = torch.zeros_like(t[:1])
        return (self.add_noise(x0[:1], eps[:1], zero) - x0[:1]).abs().max().item(), "x_t - x0 at t = 0"


OBJECTIVES: dict[str, type[Objective]] = {"v_prediction": VPrediction, FLOW: FlowMatching}


def make_objective(cfg: DiffusionConfig, native: Optional[dict] = None) -> Objective:
    """The Objective of `cfg.objective` (null: the default, v_prediction)."""
    return Objective(cfg, native)


Diffusion = Objective  # the name callers knew before objectives became classes


# --------------------------------------------------------------------------- samplers


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """The schedule as diffusers scheduler kwargs shared by every sampler of `cfg.objective`.

    v_prediction: `timestep_spacing` (default "trailing") makes sampling start at t = T-1, the
    step the zero-SNR schedule trains as pure noise (Lin et al. 2023, Table 2); "leading" /
    "linspace" would start below it from an x_T that is not the noise level the model expects.
    With an SNR shift (CogVideoX) the generic schedulers take the shifted betas
    (`trained_betas`): they have no shift of their own.
    flow_matching: the flow-sigma keys of UniPC / DPM-Solver (FlowMatchEuler names the same
    shift differently; `make_scheduler` translates).
    """
    cfg = cfg.resolved()
    if cfg.objective == FLOW:
        return dict(num_train_timesteps=cfg.num_train_timesteps, prediction_type="flow_prediction",
                    use_flow_sigmas=True, flow_shift=cfg.flow_shift,
                    use_dynamic_shifting=cfg.flow_shift_dynamic, time_shift_type="exponential")
    base = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                prediction_type="v_prediction", timestep_spacing=cfg.timestep_spacing)
    if cfg.snr_shift_scale != 1.0:  # the rescale is then a no-op on betas that already have it
        ab = vp_alphas_cumprod(cfg)
        base["trained_betas"] = torch.cat([1 - ab[:1], 1 - ab[1:] / ab[:-1]]).tolist()
    return base


def make_scheduler(name: str, cfg: DiffusionConfig):
    """A fresh diffusers scheduler for sampler `name` from `cfg`'s objective and schedule.

    `auto` is `default_sampler(cfg.objective)` (utils/config_common.py). A sampler that cannot serve
    the objective is refused naming those that can (SAMPLERS for v_prediction, FLOW_SAMPLERS
    for flow_matching). A scheduler with a dynamic flow shift needs `mu` in `set_timesteps`:
    `sample(..., mu=flow_mu(cfg, shape))`.
    """
    cfg = cfg.resolved()
    if name != AUTO_SAMPLER and name not in SAMPLERS + FLOW_SAMPLERS:
        raise ConfigError(f"sampler = {name!r}: use one of {', '.join(SAMPLERS_BY_OBJECTIVE[cfg.objective])} "
                          f"or {AUTO_SAMPLER}")
    name = resolve_sampler(name, cfg.objective)
    return _make_flow_scheduler(name, cfg) if cfg.objective == FLOW else _make_v_scheduler(name, cfg)


def _make_v_scheduler(name: str, cfg: DiffusionConfig):
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
    assert name == "euler"  # with zero SNR diffusers sets alpha_bar[T-1] = 2**-24 (sigma ~ 4096)
    return EulerDiscreteScheduler(**base, final_sigmas_type="zero")


def _make_flow_scheduler(name: str, cfg: DiffusionConfig):
    """Flow samplers start at s = 1 (pure noise) and end at s = 0; the model output is taken as
    the velocity eps - x0 (`flow_prediction`), x0 = x_t - s * out, as in training."""
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           UniPCMultistepScheduler)
    if name == "euler":  # first order: x_{s'} = x_s + (s' - s) * out
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=cfg.num_train_timesteps, shift=cfg.flow_shift,
            use_dynamic_shifting=cfg.flow_shift_dynamic, base_shift=cfg.flow_base_shift,
            max_shift=cfg.flow_max_shift, base_image_seq_len=cfg.flow_base_seq_len,
            max_image_seq_len=cfg.flow_max_seq_len, time_shift_type="exponential")
    base = scheduler_config(cfg)
    if name == "unipc":  # 2nd-order predictor-corrector, as Wan samples
        return UniPCMultistepScheduler(**base, solver_order=2, final_sigmas_type="zero",
                                       lower_order_final=True)
    assert name == "dpm++"  # 2nd-order multistep; final sigma 0 returns the denoised sample
    return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                       final_sigmas_type="zero", lower_order_final=True)


def _native_scheduler(native: dict):
    """A pretrained folder's own scheduler (diffusers class by name, its saved config)."""
    import diffusers
    cls = getattr(diffusers, native["class_name"])
    return cls.from_config(native["config"])


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


def guided_v(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond,
             guidance_scale: float, null_class_id: Optional[int] = None,
             uncond: Optional[dict] = None) -> torch.Tensor:
    """The model's output (v or flow velocity), with classifier-free guidance by one batched
    cond + uncond pass (guidance is linear in the output, so it is the same for both).

    `cond`: the model's keyword conditions (a dict of batch-first tensors, e.g. from
    training/conditioning.py), with `uncond` the same keys for the unconditional half; or the
    older form, a (B,) class tensor `y` (None: unconditional) whose uncond is `null_class_id`."""
    if cond is None or isinstance(cond, torch.Tensor):  # class labels (or nothing): model_fn(x, t, y)
        y = cond
        if guidance_scale == 1.0 or y is None:
            return model_fn(x, t, y)
        if null_class_id is None:
            raise ValueError("guidance_scale != 1 needs null_class_id (the model's unconditional label)")
        v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]),
                                    torch.cat([y, torch.full_like(y, null_class_id)])).chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    if guidance_scale == 1.0 or uncond is None:
        return model_fn(x, t, **cond)
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond name different conditions: {sorted(cond)} vs {sorted(uncond)}")
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # each (B, C, T, h, w)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


class CleanPrefix:
    """A model call whose first k latent frames are given: the model always sees the clean
    latents `frames` (B, C, k, h, w) there, with per-frame t = 0 for them (t becomes (B, T)),
    exactly as in training (training/first_frames.py); the other frames are the sampler's.
    Under guidance the batch is [cond | uncond], so `frames` are tiled to the call's batch: both
    halves see the same condition. What the sampler writes into the prefix is never read, and
    `apply` puts the clean frames back into the result."""

    def __init__(self, model_fn: ModelFn, frames: torch.Tensor):
        self.model_fn, self.frames, self.k = model_fn, frames, frames.shape[2]
        self._tiled: dict = {}  # (batch, dtype, device) -> frames tiled to that batch

    def tiled(self, x: torch.Tensor) -> torch.Tensor:
        """`frames` tiled to x's batch (twice under guidance) in x's dtype: made once per call
        shape, not at every sampler step."""
        key = (x.shape[0], x.dtype, x.device)
        if key not in self._tiled:
            self._tiled[key] = self.frames.repeat(x.shape[0] // self.frames.shape[0], 1, 1, 1, 1).to(x.dtype)
        return self._tiled[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args, **cond) -> torch.Tensor:
        x = x.clone()
        x[:, :, :self.k] = self.tiled(x)
        t = t[:, None].repeat(1, x.shape[2])  # (B, T)
        t[:, :self.k] = 0
        return self.model_fn(x, t, *args, **cond)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x[:, :, :self.k] = self.frames.to(x.dtype)
        return x


class GivenImage(CleanPrefix):
    """The channel form of given first frames (a module whose `first_frames_as` is "channels":
    CogVideoX-I2V): every call gets `image` (B, C, T, h, w), the clean latents `frames` (B, C, k,
    h, w) followed by zeros, tiled to the call's batch (both halves of guidance see it, as
    CogVideoXImageToVideoPipeline gives it); x and t are the sampler's, and nothing is put back
    into the result: the model generates the first frames too."""

    def __init__(self, model_fn: ModelFn, frames: torch.Tensor):
        super().__init__(model_fn, frames)
        self._image: Optional[torch.Tensor] = None  # the image input of the last call shape

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args, **cond) -> torch.Tensor:
        image = self._image
        if image is None or (image.shape, image.dtype, image.device) != (x.shape, x.dtype, x.device):
            image = torch.zeros_like(x)  # built once per call shape, not at every step
            image[:, :, :self.k] = self.tiled(x)
            self._image = image
        return self.model_fn(x, t, *args, image=image, **cond)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x


def first_frames_as(model_fn) -> Optional[str]:
    """How a model takes given first frames: its `first_frames_as` ("prefix", "channels"), or
    "prefix" for a plain function (the repo's DiT, tests' stand-ins)."""
    return getattr(model_fn, "first_frames_as", "prefix")


class SamplingStopped(Exception):
    """`sample` ended early because its `should_stop()` said so (raised between steps, never
    from a signal handler)."""


@torch.no_grad()
def sample(model_fn: ModelFn, shape: tuple[int, ...], *, scheduler, num_steps: int,
           generator: Generators, device: torch.device | str, y: Optional[torch.Tensor] = None,
           guidance_scale: float = 1.0, null_class_id: Optional[int] = None,
           progress: bool = False, mu: Optional[float] = None, cond: Optional[dict] = None,
           uncond: Optional[dict] = None, cond_frames: Optional[torch.Tensor] = None,
           should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """Run `scheduler` from pure noise to x0 latents of `shape`, e.g. (B, C, T, h, w).

    `model_fn(x_t, t, **cond) -> output` (v, or the flow velocity) with t a (B,) tensor of the
    scheduler's timesteps (integers, or floats s * T for FlowMatchEuler). The one sampler of
    this repo: validation and predict both call it. `scheduler` is stateful: pass a fresh one
    from `Objective.make_scheduler` (or one you own) per call. `mu`: the dynamic flow shift
    (`Objective.mu(shape)`), needed exactly when the scheduler was built with one.
    `should_stop() -> bool` is asked before every sampler step (a stop-request flag, e.g.
    predict's): True raises SamplingStopped there; it changes no number otherwise.
    The condition: `cond` / `uncond` keyword dicts (training/conditioning.py's
    `SampleConditions.rows`), or the older class form `y` with `null_class_id`.
    `cond_frames` (B, C, k, h, w): clean latents of the first k latent frames (image-to-video,
    extension; a model trained with model.first_frame_conditioning): the model call is wrapped
    in a `CleanPrefix`, and the returned x0 holds them unchanged; or, for a model that takes
    them on its channels (`first_frames_as` "channels"), in a `GivenImage`.
    """
    if cond is not None and y is not None:
        raise ValueError("give the condition as cond (a dict) or y (class labels), not both")
    dynamic = scheduler.config.get("use_dynamic_shifting", False)
    if dynamic != (mu is not None):
        raise ValueError("a scheduler with a dynamic flow shift needs mu = flow_mu(cfg, shape), "
                         "and only such a scheduler takes one")
    prefix = None
    if cond_frames is not None:
        k = cond_frames.shape[2]
        if len(shape) != 5 or tuple(cond_frames.shape) != (shape[0], shape[1], k, *shape[3:]) \
                or k >= shape[2]:
            raise ValueError(f"cond_frames of shape {tuple(cond_frames.shape)} do not fit latents "
                             f"{tuple(shape)}: need (B, C, k, h, w) with k < T")
        wrap = GivenImage if first_frames_as(model_fn) == "channels" else CleanPrefix
        model_fn = prefix = wrap(model_fn, cond_frames.to(device))
    scheduler.set_timesteps(num_steps, device=device, **({"mu": mu} if dynamic else {}))
    # Flow schedulers start at sigma = 1 and need no input scaling; FlowMatchEuler has neither.
    x = initial_noise(shape, generator, device) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if cond is None:
        cond = None if y is None else y.to(device)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
        if should_stop is not None and should_stop():
            raise SamplingStopped
        x_in = scale_input(x, t)  # identity except for Euler (sigma -> VP scale)
        t_batch = t.to(device).expand(shape[0])  # (B,)
        out = guided_v(model_fn, x_in, t_batch, cond, guidance_scale, null_class_id, uncond)
        x = scheduler.step(out.to(x.dtype), t, x, **step_kwargs).prev_sample
    return x if prefix is None else prefix.apply(x)
