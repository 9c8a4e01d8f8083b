"""All diffusion math: the two training objectives, their noise schedules, targets and
losses, and the samplers.

Objective `v_prediction` (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022; zero
terminal SNR, Lin et al. 2023; min-SNR-gamma, Hang et al. 2023). Code name -> paper symbol:

    betas[t]           beta_t
    alphas_cumprod[t]  alpha_bar_t = prod_{s <= t} (1 - beta_s)
    alpha              alpha_t = sqrt(alpha_bar_t)        (signal scale)
    sigma              sigma_t = sqrt(1 - alpha_bar_t)    (noise scale); alpha^2 + sigma^2 = 1
    x_t                x_t = alpha * x0 + sigma * eps     (`add_noise`)
    v                  v = alpha * eps - sigma * x0       (`v_target`, what the network predicts)
    x0                 x0 = alpha * x_t - sigma * v       (`x0_from_v`)
    eps                eps = sigma * x_t + alpha * v      (`eps_from_v`)
    snr                SNR(t) = alpha^2 / sigma^2         (`snr`; exactly 0 at t = T-1 with zero-SNR)

Timesteps are integers t in [0, num_train_timesteps); t = 0 is the cleanest.

Objective `flow_matching` (rectified flow, Liu et al. 2022; flow matching, Lipman et al. 2022;
timestep densities and shift, Esser et al. 2024 "SD3"), in the sign convention of diffusers'
FlowMatchEulerDiscreteScheduler:

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

Both objectives expose one interface (`Diffusion`): sample_timesteps -> model time t,
add_noise, target, loss, x0_from_output, eps_from_output, so the training loop, validation and
diagnose never ask which objective they run. Every tensor helper broadcasts with
`append_dims`, so the same code serves images and (B, C, T, h, w) video latents. Sampling
runs diffusers' schedulers, built by `make_scheduler` from the very config these formulas use
(`scheduler_config`); tests check both sides agree.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from utils.config import AUTO_SAMPLER, SAMPLERS_BY_OBJECTIVE, DiffusionConfig, resolve_sampler
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
    loss: torch.Tensor  # (B,) weighted MSE to the objective's target: what to back-propagate (after .mean())
    mse: torch.Tensor  # (B,) unweighted MSE: comparable across weightings, for logging
    weight: torch.Tensor  # (B,) the loss weight (min-SNR for v, loss_weighting for flow; ones without)


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


class Diffusion:
    """The training-side math of `cfg.objective`. Holds no parameters.

    Uniform interface (what training, validation and diagnose call): `sample_timesteps`,
    `add_noise`, `target`, `loss`, `loss_weight`, `x0_from_output`, `eps_from_output`. The model
    time `t` is an integer schedule index for v_prediction, and s * T (float; integers are
    accepted too) for flow_matching. The v-specific helpers (`alpha_sigma`, `snr`, `v_target`,
    `x0_from_v`, `eps_from_v`) serve the VP schedule only.
    """

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.objective = cfg.objective
        self.is_flow = cfg.objective == FLOW
        self.num_train_timesteps = cfg.num_train_timesteps
        self.betas = make_betas(cfg)  # (T,) float64 on CPU: the master copy (v_prediction)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,) float64
        self._tables: dict[torch.device, torch.Tensor] = {}

    # ---- per-timestep coefficients (v_prediction)

    def _coefs(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) (or per-frame (B, T)) integer t -> (3, B) (or (3, B, T)) float32 rows alpha,
        sigma, snr on t's device."""
        assert not self.is_flow, "alpha/sigma/snr belong to the VP schedule of v_prediction"
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

    # ---- the v parameterisation

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return sigma * x_t + alpha * v

    # ---- flow matching

    def flow_sigma(self, t: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model time t (float or integer) -> noise level s = t / T: (B,) float32, or shaped
        (B, 1, ..., 1) in `like`'s dtype when `like` is given."""
        s = t.float() / self.num_train_timesteps
        return s if like is None else append_dims(s.to(like.dtype), like.ndim)

    # ---- the objective's interface

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t of clean `x0` at model time `t` with `noise` eps."""
        if self.is_flow:
            s = self.flow_sigma(t, x0)
            return (1 - s) * x0 + s * noise
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: v, or the flow velocity eps - x0."""
        if self.is_flow:
            return noise - x0
        return self.v_target(x0, noise, t)

    def x0_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by the network's output `out` at (x_t, t)."""
        if self.is_flow:
            return x_t - self.flow_sigma(t, x_t) * out
        return self.x0_from_v(x_t, out, t)

    def eps_from_output(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by the network's output `out` at (x_t, t)."""
        if self.is_flow:
            return x_t + (1 - self.flow_sigma(t, x_t)) * out
        return self.eps_from_v(x_t, out, t)

    # ---- training

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weight on the per-sample MSE to `target`.

        v_prediction: min-SNR-gamma on the v-MSE, min(snr, gamma) / (snr + 1). This is
        min(snr, gamma) on the x0-MSE rewritten for v, since x0 - x0_hat = -sigma * (v - v_hat)
        and sigma^2 = 1 / (snr + 1). Finite everywhere: 0 at the zero-SNR step.
        flow_matching: diffusers' compute_loss_weighting_for_sd3 schemes on s. sigma_sqrt is
        1 / s^2 with s floored at 1 / T (the least noise diffusers' discrete schedule trains),
        so the weight stays finite at s = 0.
        """
        if self.is_flow:
            s = self.flow_sigma(t)
            if self.cfg.loss_weighting == "sigma_sqrt":
                return s.clamp(min=1 / self.num_train_timesteps) ** -2
            if self.cfg.loss_weighting == "cosmap":
                return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
            return torch.ones_like(s)
        snr = self.snr(t)
        if self.cfg.min_snr_gamma is None:
            return torch.ones_like(snr)
        return snr.clamp(max=self.cfg.min_snr_gamma) / (snr + 1)

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

    def sample_timesteps(self, batch: int, device: torch.device | str,
                         generator: Optional[torch.Generator] = None, *,
                         latent_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(batch,) model times on `device`: int64 in [0, T) for v, float32 s * T for flow.

        `uniform`: every t equally often. `logit_normal` (as in SD3): t / T = sigmoid(n) with
        n ~ N(logit_mean, logit_std), which spends fewer updates on the nearly clean end of the
        schedule, where the v-MSE is small and easy, and with logit_mean > 0 more on the noisy
        end, where every sampler starts and the layout of a video is decided. `mode`: SD3's
        density with curvature mode_scale. Flow then shifts s (`flow_shift`, or the dynamic shift
        from `latent_shape`, the (B, C, T, h, w) shape of the batch, which it then needs).
        """
        gen_device = generator.device if generator is not None else device
        T = self.num_train_timesteps
        if self.is_flow:
            u = self._density(batch, gen_device, generator)  # (B,) in [0, 1]
            return (self._shift(u, latent_shape) * T).to(device)
        if self.cfg.timestep_sampling == "uniform":
            t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
        else:
            u = self._density(batch, gen_device, generator)
            t = (u * T).long().clamp_(0, T - 1)
        return t.to(device)

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

    def _shift(self, s: torch.Tensor, latent_shape: Optional[Sequence[int]]) -> torch.Tensor:
        """s -> the shifted s the flow objective trains and samples at."""
        if self.cfg.flow_shift_dynamic:
            if latent_shape is None:
                raise ValueError("diffusion.flow_shift_dynamic needs the batch's latent_shape "
                                 "to compute its shift: pass sample_timesteps(..., latent_shape=x0.shape)")
            return time_shift_sigma(s, flow_mu(self.cfg, latent_shape))
        return shift_sigma(s, self.cfg.flow_shift)

    # ---- the diffusers side

    def scheduler_config(self) -> dict:
        return scheduler_config(self.cfg)


# --------------------------------------------------------------------------- samplers


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """The schedule as diffusers scheduler kwargs shared by every sampler of `cfg.objective`.

    v_prediction: `timestep_spacing="trailing"` makes sampling start at t = T-1, the step the
    zero-SNR schedule trains as pure noise (Lin et al. 2023, Table 2); "leading"/"linspace"
    would start below it from an x_T that is not the noise level the model expects.
    flow_matching: the flow-sigma keys of UniPC / DPM-Solver (FlowMatchEuler names the same
    shift differently; `make_scheduler` translates).
    """
    if cfg.objective == FLOW:
        return dict(num_train_timesteps=cfg.num_train_timesteps, prediction_type="flow_prediction",
                    use_flow_sigmas=True, flow_shift=cfg.flow_shift,
                    use_dynamic_shifting=cfg.flow_shift_dynamic, time_shift_type="exponential")
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
                prediction_type="v_prediction", timestep_spacing="trailing")


def make_scheduler(name: str, cfg: DiffusionConfig):
    """A fresh diffusers scheduler for sampler `name` from `cfg`'s objective and schedule.

    `auto` is `default_sampler(cfg.objective)` (utils/config.py). A sampler that cannot serve
    the objective is refused naming those that can (SAMPLERS for v_prediction, FLOW_SAMPLERS
    for flow_matching). A scheduler with a dynamic flow shift needs `mu` in `set_timesteps`:
    `sample(..., mu=flow_mu(cfg, shape))`.
    """
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
    from `make_scheduler` (or one you own) per call. `mu`: the dynamic flow shift
    (`flow_mu(cfg, shape)`), needed exactly when the scheduler was built with one.
    `should_stop() -> bool` is asked before every sampler step (a stop-request flag, e.g.
    predict's): True raises SamplingStopped there; it changes no number otherwise.
    The condition: `cond` / `uncond` keyword dicts (training/conditioning.py's
    `SampleConditions.rows`), or the older class form `y` with `null_class_id`.
    `cond_frames` (B, C, k, h, w): clean latents of the first k latent frames (image-to-video,
    extension; a model trained with model.first_frame_conditioning). At every step the model
    sees them clean with per-frame t = 0 for them (t is then (B, T)), exactly as in training,
    and after every step they are reset, so the returned x0 holds them unchanged (the same
    condition for both halves of guidance).
    """
    if cond is not None and y is not None:
        raise ValueError("give the condition as cond (a dict) or y (class labels), not both")
    dynamic = scheduler.config.get("use_dynamic_shifting", False)
    if dynamic != (mu is not None):
        raise ValueError("a scheduler with a dynamic flow shift needs mu = flow_mu(cfg, shape), "
                         "and only such a scheduler takes one")
    scheduler.set_timesteps(num_steps, device=device, **({"mu": mu} if dynamic else {}))
    # Flow schedulers start at sigma = 1 and need no input scaling; FlowMatchEuler has neither.
    x = initial_noise(shape, generator, device) * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if cond is None:
        cond = None if y is None else y.to(device)
    k = 0 if cond_frames is None else cond_frames.shape[2]
    if k:
        if len(shape) != 5 or tuple(cond_frames.shape) != (shape[0], shape[1], k, *shape[3:]) \
                or k >= shape[2]:
            raise ValueError(f"cond_frames of shape {tuple(cond_frames.shape)} do not fit latents "
                             f"{tuple(shape)}: need (B, C, k, h, w) with k < T")
        cond_frames = cond_frames.to(device, x.dtype)
        x[:, :, :k] = cond_frames
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False):
        if should_stop is not None and should_stop():
            raise SamplingStopped
        x_in = scale_input(x, t)  # identity except for Euler (sigma -> VP scale)
        t_batch = t.to(device).expand(shape[0])  # (B,)
        if k:  # the clean condition frames: model input exactly the clean latents, t = 0
            x_in = x_in.clone()
            x_in[:, :, :k] = cond_frames
            t_batch = t_batch[:, None].repeat(1, shape[2])  # (B, T)
            t_batch[:, :k] = 0
        out = guided_v(model_fn, x_in, t_batch, cond, guidance_scale, null_class_id, uncond)
        x = scheduler.step(out.to(x.dtype), t, x, **step_kwargs).prev_sample
        if k:
            x[:, :, :k] = cond_frames
    return x
