"""Diffusion math: parity with diffusers, v identities, min-SNR weights, and every sampler
driven by an exact oracle (so the scheduler configs provably match the training math)."""
import pytest
import torch
from diffusers import DDPMScheduler

from models.diffusion import (SAMPLERS, Diffusion, append_dims, guided_v, initial_noise,
                              make_scheduler, sample)
from utils.config import DiffusionConfig, config_from_dict
from utils.errors import ConfigError

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]
SHAPE = (3, 4, 5, 4, 4)  # (B, C, T, h, w) with an odd frame count


def cfg_of(schedule: dict, zero_snr: bool, **kw) -> DiffusionConfig:
    return DiffusionConfig(**schedule, rescale_betas_zero_snr=zero_snr, **kw)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_append_dims():
    assert append_dims(torch.ones(3), 5).shape == (3, 1, 1, 1, 1)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_parity_with_diffusers_ddpm(schedule, zero_snr):
    diff = Diffusion(cfg_of(schedule, zero_snr))
    ref = DDPMScheduler(**diff.scheduler_config())
    torch.testing.assert_close(diff.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=0)
    if zero_snr:
        assert diff.alphas_cumprod[-1] == 0 and diff.snr(torch.tensor([999])).item() == 0
    x0, noise = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    for t in (torch.tensor([100, 457, 999]), torch.tensor([0, 1, 2])):
        # Near t = 0, 1 - alpha_bar is ~4e-5: diffusers' float32 alpha_bar (checked above to
        # 1e-6) keeps few of its digits, and sigma = sqrt(1 - alpha_bar) inherits that. Allow
        # exactly the sigma difference that the two alpha_bar tables imply, times the largest |x|.
        ours, theirs = diff.alphas_cumprod[t], ref.alphas_cumprod[t].double()
        sigma_gap = ((1 - ours).sqrt() - (1 - theirs).clamp(min=0).sqrt()).abs().max().item()
        alpha_gap = (ours.sqrt() - theirs.sqrt()).abs().max().item()
        scale = max(x0.abs().max().item(), noise.abs().max().item())
        atol = 3e-6 + 2 * (sigma_gap + alpha_gap) * scale
        close = dict(atol=atol, rtol=0)
        torch.testing.assert_close(diff.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), **close)
        torch.testing.assert_close(diff.v_target(x0, noise, t), ref.get_velocity(x0, noise, t), **close)


# --------------------------------------------------------------------------- v identities


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_round_trip(zero_snr):
    diff = Diffusion(cfg_of(SCHEDULES[2], zero_snr))
    x0, eps = randn(*SHAPE, seed=3), randn(*SHAPE, seed=4)
    random_t = torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(5))
    for t in (torch.tensor([0, 1, 999]), random_t):
        x_t, v = diff.add_noise(x0, eps, t), diff.v_target(x0, eps, t)
        torch.testing.assert_close(diff.x0_from_v(x_t, v, t), x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(diff.eps_from_v(x_t, v, t), eps, atol=1e-5, rtol=0)


def test_schedule_follows_input_dtype_and_device():
    diff = Diffusion(DiffusionConfig())
    x = torch.ones(2, 3, dtype=torch.float64)
    out = diff.add_noise(x, x, torch.tensor([1, 2]))
    assert out.dtype == torch.float64 and out.shape == (2, 3)


# --------------------------------------------------------------------------- loss


def test_min_snr_weights_by_hand():
    # betas (0.1, 0.5) -> alpha_bar (0.9, 0.45) -> snr (9, 0.8181..)
    cfg = DiffusionConfig(num_train_timesteps=2, beta_schedule="linear", beta_start=0.1, beta_end=0.5,
                          rescale_betas_zero_snr=False, min_snr_gamma=5.0)
    diff = Diffusion(cfg)
    t = torch.tensor([0, 1])
    torch.testing.assert_close(diff.snr(t), torch.tensor([9.0, 0.45 / 0.55]))
    # min(9, 5) / 10 = 0.5; snr < gamma: snr / (snr + 1) = alpha_bar = 0.45
    torch.testing.assert_close(diff.loss_weight(t), torch.tensor([0.5, 0.45]))
    cfg.min_snr_gamma = None
    torch.testing.assert_close(Diffusion(cfg).loss_weight(t), torch.ones(2))


def test_loss_values_and_no_nan_at_zero_snr():
    diff = Diffusion(DiffusionConfig(rescale_betas_zero_snr=True, min_snr_gamma=5.0))
    x0, noise = randn(*SHAPE, seed=6), randn(*SHAPE, seed=7)
    t = torch.tensor([999, 500, 0])
    pred = torch.zeros(SHAPE, requires_grad=True)
    out = diff.loss(pred, x0, noise, t)
    target = diff.v_target(x0, noise, t)
    torch.testing.assert_close(out.mse, target.square().mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(out.loss, out.mse * out.weight)
    assert out.weight[0] == 0  # zero SNR: the terminal step carries no min-SNR weight
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(pred.grad).all()


def test_sample_timesteps_range_and_seed():
    diff = Diffusion(DiffusionConfig(num_train_timesteps=10))
    t = diff.sample_timesteps(5000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 9
    assert torch.equal(t, diff.sample_timesteps(5000, "cpu", torch.Generator().manual_seed(0)))


def test_logit_normal_timesteps_follow_the_configured_distribution():
    """t / T = sigmoid(N(mean, std)): the median sits at sigmoid(mean) * T, the ends are rare."""
    T = 1000
    g = torch.Generator().manual_seed(0)
    for mean in (0.0, 1.0):
        diff = Diffusion(DiffusionConfig(num_train_timesteps=T, timestep_sampling="logit_normal",
                                         logit_mean=mean, logit_std=1.0))
        t = diff.sample_timesteps(20000, "cpu", g)
        assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= T - 1
        expected_median = torch.sigmoid(torch.tensor(mean)).item() * T
        assert abs(t.float().median().item() - expected_median) < 10
        # P(n < -2) ~ 2.3%: with mean 0 about 2.3% of draws fall below sigmoid(-2) * T = 119
        share = (t < int(torch.sigmoid(torch.tensor(mean - 2.0)).item() * T)).float().mean().item()
        assert 0.015 < share < 0.03
    uniform = Diffusion(DiffusionConfig(num_train_timesteps=T)).sample_timesteps(20000, "cpu", g)
    assert 0.09 < (uniform < 100).float().mean().item() < 0.11


def test_logit_std_must_be_positive():
    with pytest.raises(ConfigError, match="diffusion.logit_std = 0"):
        config_from_dict(DiffusionConfig, {"logit_std": 0})


# --------------------------------------------------------------------------- samplers


def oracle(diff: Diffusion, x0: torch.Tensor):
    """model_fn returning the exact v for a known x0 at the scheduler's timestep."""
    def model_fn(x_t, t, y):
        t = t.round().long()  # Euler's timesteps are floats holding whole numbers
        alpha, sigma = diff.alpha_sigma(t, x_t)
        eps = (x_t - alpha * x0) / sigma
        return diff.v_target(x0, eps, t)
    return model_fn


def gaussian_oracle(diff: Diffusion, mean: float, std: float):
    """model_fn with the exact E[v | x_t] for data x0 ~ N(mean, std^2) per element."""
    def model_fn(x_t, t, y):
        alpha, sigma = diff.alpha_sigma(t.round().long(), x_t)
        x0_hat = mean + alpha * std ** 2 / (alpha ** 2 * std ** 2 + sigma ** 2) * (x_t - alpha * mean)
        return (alpha * x_t - x0_hat) / sigma  # v = (alpha x_t - x0) / sigma, linear in x0
    return model_fn


STEPS = {"ddim": 10, "dpm++": 10, "euler": 10, "ddpm": 50}
# Enough steps for the Gaussian's std to come within 0.02 (at 10 steps first-order samplers
# under-disperse: std 0.43 for DDIM = Euler, 0.39 for DDPM; all converge as steps grow).
GAUSS_STEPS = {"ddim": 100, "dpm++": 25, "euler": 100, "ddpm": 250}
CONFIGS = {"cosine_zero_snr": cfg_of(SCHEDULES[2], True), "linear": cfg_of(SCHEDULES[0], False)}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_with_exact_oracle_returns_x0(name, config):
    cfg = CONFIGS[config]
    diff = Diffusion(cfg)
    x0 = randn(*SHAPE, seed=8)
    out = sample(oracle(diff, x0), SHAPE, scheduler=make_scheduler(name, cfg), num_steps=STEPS[name],
                 generator=torch.Generator().manual_seed(0), device="cpu")
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_matches_gaussian_data(name):
    cfg = CONFIGS["cosine_zero_snr"]
    diff = Diffusion(cfg)
    shape = (4, 4, 8, 16, 16)  # 32k samples of the per-element Gaussian
    out = sample(gaussian_oracle(diff, 0.5, 0.5), shape, scheduler=make_scheduler(name, cfg),
                 num_steps=GAUSS_STEPS[name], generator=torch.Generator().manual_seed(0), device="cpu")
    assert abs(out.mean().item() - 0.5) < 0.015 and abs(out.std().item() - 0.5) < 0.02


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_same_seed_same_samples_and_batch_independence(name):
    cfg = CONFIGS["cosine_zero_snr"]
    diff = Diffusion(cfg)
    fn = gaussian_oracle(diff, 0.0, 1.0)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(fn, (len(seeds), 2, 3, 4, 4), scheduler=make_scheduler(name, cfg), num_steps=8,
                      generator=gens, device="cpu")
    batch = run([10, 11, 12])
    assert torch.equal(batch, run([10, 11, 12]))
    assert torch.equal(batch[1:2], run([11]))
    assert not torch.equal(batch[0], batch[1])


def test_schedulers_share_the_schedule_and_start_at_pure_noise():
    cfg = DiffusionConfig(rescale_betas_zero_snr=True)
    ours = Diffusion(cfg).alphas_cumprod.float()
    for name in SAMPLERS:
        s = make_scheduler(name, cfg)
        assert s.config.prediction_type == "v_prediction" and s.config.timestep_spacing == "trailing"
        s.set_timesteps(10)
        assert int(s.timesteps[0]) == 999
        # Euler and DPM-Solver clamp alpha_bar[T-1] to 2**-24 to keep sigma = sqrt(1/ab - 1) finite
        torch.testing.assert_close(s.alphas_cumprod[:-1], ours[:-1], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="sampler"):
        make_scheduler("heun", cfg)


def test_classifier_free_guidance_is_one_batched_pass():
    calls = []

    def model_fn(x, t, y):
        calls.append(x.shape[0])
        return append_dims(y.float(), x.ndim).expand_as(x)  # v = the label, to see the mix
    x, t, y = torch.zeros(2, 1, 1, 1, 1), torch.tensor([5, 5]), torch.tensor([1, 2])
    v = guided_v(model_fn, x, t, y, guidance_scale=3.0, null_class_id=7)
    assert calls == [4]
    torch.testing.assert_close(v.flatten(), 7 + 3.0 * (torch.tensor([1.0, 2.0]) - 7))
    assert torch.equal(guided_v(model_fn, x, t, y, 1.0, None).flatten(), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="null_class_id"):
        guided_v(model_fn, x, t, y, 2.0, None)


def test_initial_noise_per_sample_generators():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    noise = initial_noise((2, 3, 4), gens, "cpu")
    torch.testing.assert_close(noise[1], torch.randn(3, 4, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="generators"):
        initial_noise((3, 3, 4), gens, "cpu")
