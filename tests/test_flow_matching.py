"""Flow matching beside v-prediction: the math against diffusers' flow schedulers, the samplers
each objective may use, and flow runs end to end (train, resume, predict, diagnose)."""
import contextlib
import glob
import io
import math
import os
import re
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       UniPCMultistepScheduler)

import diagnose
import predict_advanced
from models.diffusion import (FLOW_SAMPLERS, SAMPLERS, Diffusion, flow_mu, latent_seq_len,
                              make_scheduler, sample, shift_sigma, time_shift_sigma)
from tests.test_stage2 import ROOT, TINY, _predict, _train, random_vae  # noqa: F401  (fixture)
from training import diagnostics
from training.checkpoints import recorded_diffusion
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
from utils.config import (DiffusionConfig, EvaluateConfig, PredictConfig, TrainRunConfig,
                          default_sampler, load_config, resolve_sampler)
from utils.errors import ConfigError, UserError

SHAPE = (3, 4, 5, 4, 4)  # (B, C, T, h, w) with an odd frame count
T = 1000
FLOW = dict(objective="flow_matching")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def flow_cfg(**kw) -> DiffusionConfig:
    cfg = DiffusionConfig(**FLOW, **kw)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- identities


def test_flow_noising_target_and_inverses():
    diff = Diffusion(flow_cfg())
    x0, eps = randn(*SHAPE, seed=1), randn(*SHAPE, seed=2)
    t = torch.tensor([0.0, 437.5, 1000.0])  # s = 0 (clean), a fraction, 1 (pure noise)
    s = (t / T).view(-1, 1, 1, 1, 1)
    x_t = diff.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    u = diff.target(x0, eps, t)
    assert torch.equal(u, eps - x0)  # diffusers' sign: the velocity dx_t / ds
    torch.testing.assert_close(diff.x0_from_output(x_t, u, t), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(diff.eps_from_output(x_t, u, t), eps, atol=1e-6, rtol=0)
    # Integer model times (held-out loss buckets, diagnose) mean the same s.
    assert torch.equal(diff.add_noise(x0, eps, torch.tensor([0, 437, 1000])),
                       diff.add_noise(x0, eps, torch.tensor([0.0, 437.0, 1000.0])))


def test_forward_process_matches_diffusers_scale_noise():
    """Our x_t at the scheduler's own (shifted) timesteps is FlowMatchEuler's scale_noise."""
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    diff = Diffusion(flow_cfg(flow_shift=3.0))
    x0, eps = randn(*SHAPE, seed=3), randn(*SHAPE, seed=4)
    t = ref.timesteps[torch.tensor([0, 500, 999])]
    torch.testing.assert_close(diff.add_noise(x0, eps, t), ref.scale_noise(x0, t, eps), atol=1e-6, rtol=0)


def test_euler_step_is_the_objective_x0_and_eps_renoised():
    """diffusers' FlowMatchEuler step x + (s' - s) out equals (1 - s') x0_hat + s' eps_hat with
    our inverses, and its stochastic variant's x0 is ours: the sampler reads the model output
    exactly as training defines it."""
    diff = Diffusion(flow_cfg(flow_shift=3.0))
    x, out = randn(*SHAPE, seed=5), randn(*SHAPE, seed=6)
    sched = make_scheduler("euler", diff.cfg)
    sched.set_timesteps(10)
    for i in (0, 4, 9):
        t, s_next = sched.timesteps[i], sched.sigmas[i + 1]
        sched._step_index = i
        prev = sched.step(out, t, x).prev_sample
        t_b = t.expand(SHAPE[0])
        ours = (1 - s_next) * diff.x0_from_output(x, out, t_b) + s_next * diff.eps_from_output(x, out, t_b)
        torch.testing.assert_close(prev, ours, atol=2e-6, rtol=0)
    stochastic = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0, stochastic_sampling=True)
    stochastic.set_timesteps(10)
    stochastic._step_index = 9  # next sigma 0: the step returns its x0 itself
    t = stochastic.timesteps[9]
    torch.testing.assert_close(stochastic.step(out, t, x).prev_sample,
                               diff.x0_from_output(x, out, t.expand(SHAPE[0])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_higher_order_samplers_read_the_output_as_we_do(name):
    """UniPC / DPM-Solver++ with flow sigmas: their x0 from the model output is ours."""
    diff = Diffusion(flow_cfg(flow_shift=3.0))
    x, out = randn(*SHAPE, seed=7), randn(*SHAPE, seed=8)
    sched = make_scheduler(name, diff.cfg)
    sched.set_timesteps(8)
    for i in (0, 3, 7):
        sched._step_index = i
        t_exact = (sched.sigmas[i] * T).expand(SHAPE[0])  # their timesteps round s * T down
        torch.testing.assert_close(sched.convert_model_output(out, sample=x),
                                   diff.x0_from_output(x, out, t_exact), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- shift


def test_shift_formulas():
    s = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigma(s, 1.0), s)
    shifted = shift_sigma(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > s[1:-1]).all()
    assert shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2
    # The exponential time shift is the fixed shift with shift = e^mu.
    torch.testing.assert_close(time_shift_sigma(s, 0.7), shift_sigma(s, math.exp(0.7)))
    # mu: linear in the latent positions T * h * w, base_shift / max_shift at the two ends.
    cfg = flow_cfg(flow_shift_dynamic=True, flow_base_shift=0.5, flow_max_shift=1.15,
                   flow_base_seq_len=256, flow_max_seq_len=4096)
    assert latent_seq_len((2, 4, 16, 8, 8)) == 1024 and latent_seq_len((2, 4, 16, 16)) == 256
    assert flow_mu(cfg, (1, 4, 4, 8, 8)) == pytest.approx(0.5)
    assert flow_mu(cfg, (1, 4, 16, 16, 16)) == pytest.approx(1.15)
    assert flow_mu(cfg, (1, 4, 8, 16, 16)) == pytest.approx(0.5 + 0.65 * (2048 - 256) / 3840)
    assert flow_mu(flow_cfg(), (1, 4, 4, 8, 8)) is None and flow_mu(DiffusionConfig(), (1, 4, 4, 8, 8)) is None


def test_flow_mu_is_calculate_shift_of_the_latent_positions_before_patching():
    """flow_mu's docstring: diffusers' calculate_shift, extrapolated (no clamp), of T * h * w
    latent positions whatever the DiT's patch size (Flux's pipeline would pass its 2x2-patched
    token count, 4x fewer: a smaller mu for the same latents)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    cfg = flow_cfg(flow_shift_dynamic=True)
    keys = dict(base_seq_len=cfg.flow_base_seq_len, max_seq_len=cfg.flow_max_seq_len,
                base_shift=cfg.flow_base_shift, max_shift=cfg.flow_max_shift)
    for shape in [(1, 4, 1, 8, 8), (2, 4, 4, 16, 16), (1, 16, 33, 64, 64)]:  # the last beyond max_seq_len
        positions = shape[2] * shape[3] * shape[4]
        assert flow_mu(cfg, shape) == pytest.approx(calculate_shift(positions, **keys))
        assert flow_mu(cfg, shape) > calculate_shift(positions // 4, **keys)  # Flux's count of 2x2 tokens
    assert flow_mu(cfg, (1, 16, 33, 64, 64)) > cfg.flow_max_shift  # extrapolated
    doc = " ".join(flow_mu.__doc__.split())  # says what it does, not "as diffusers' pipelines do"
    assert "extrapolated" in doc and "before the DiT's patching" in doc and "after 2x2 patching" in doc


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_the_time_input_each_flow_sampler_gives_the_model(name):
    """The module docstring: training feeds the float s * T; euler feeds the same float, unipc
    and dpm++ feed s * T rounded down to an integer (less than one step early)."""
    sched = make_scheduler(name, flow_cfg(flow_shift=3.0))
    seen = []

    def model_fn(x, t, y):
        seen.append((t[0].clone(), sched.sigmas[sched.step_index or 0].item()))
        return torch.zeros_like(x)
    sample(model_fn, SHAPE, scheduler=sched, num_steps=6, generator=torch.Generator().manual_seed(0), device="cpu")
    assert len(seen) == 6
    for t, s in seen:
        if name == "euler":
            assert t.is_floating_point() and t.item() == pytest.approx(s * T, rel=1e-6)
        else:
            assert not t.is_floating_point() and 0 <= s * T - t.item() < 1
    import models.diffusion
    doc = " ".join(models.diffusion.__doc__.split())  # the docstring says so (it claimed a float always)
    assert "the same float s * T with `euler`" in doc and "rounded down to an integer with `unipc` and `dpm++`" in doc


def test_training_shift_matches_diffusers_sampling_shift():
    """The shift training applies to s is the one diffusers' flow schedulers apply to their
    sigmas, fixed and dynamic (set_timesteps(sigmas=..., mu=...))."""
    s = np.linspace(1, 1 / T, 12)
    fixed = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    fixed.set_timesteps(sigmas=s.tolist())
    torch.testing.assert_close(fixed.sigmas[:-1], shift_sigma(torch.tensor(s, dtype=torch.float32), 3.0))
    cfg = flow_cfg(flow_shift_dynamic=True)
    mu = flow_mu(cfg, SHAPE)
    dynamic = make_scheduler("euler", cfg)
    dynamic.set_timesteps(sigmas=s.tolist(), mu=mu)
    torch.testing.assert_close(dynamic.sigmas[:-1], time_shift_sigma(torch.tensor(s, dtype=torch.float32), mu))


@pytest.mark.parametrize("dynamic", [False, True])
def test_higher_order_sampler_sigmas_follow_the_config(dynamic):
    """UniPC: sigmas = shift(linspace(1, 1/T, n + 1)[:-1]); DPM-Solver++: shift of its flipped
    grid. The same shift (fixed, or e^mu from the latent size) as training."""
    cfg = flow_cfg(flow_shift_dynamic=True) if dynamic else flow_cfg(flow_shift=3.0)
    shift = math.exp(flow_mu(cfg, SHAPE)) if dynamic else 3.0
    n = 10
    for name, grid in (("unipc", np.linspace(1, 1 / T, n + 1)[:-1]),
                       ("dpm++", np.flip(1 - np.linspace(1, 1 / T, n + 1))[:-1])):
        sched = make_scheduler(name, cfg)
        sched.set_timesteps(n, **({"mu": flow_mu(cfg, SHAPE)} if dynamic else {}))
        expected = shift_sigma(torch.tensor(grid.copy(), dtype=torch.float64), shift).float()
        expected[0] -= 1e-6 if name == "unipc" else 0  # UniPC keeps log(1 - s) finite at s = 1
        torch.testing.assert_close(sched.sigmas[:-1], expected, atol=2e-6, rtol=0)
        assert sched.sigmas[-1] == 0 and sched.config.prediction_type == "flow_prediction"


# --------------------------------------------------------------------------- timesteps and loss


def test_flow_timesteps_are_float_in_range_shifted_and_seeded():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    uniform = Diffusion(flow_cfg()).sample_timesteps(20000, "cpu", g())
    assert uniform.dtype == torch.float32 and 0 <= uniform.min() and uniform.max() < T
    assert abs(uniform.median().item() - T / 2) < 15
    assert torch.equal(uniform, Diffusion(flow_cfg()).sample_timesteps(20000, "cpu", g()))
    shifted = Diffusion(flow_cfg(flow_shift=3.0)).sample_timesteps(20000, "cpu", g())
    torch.testing.assert_close(shifted, shift_sigma(uniform / T, 3.0) * T)  # same draws, shifted
    assert abs(shifted.median().item() - 0.75 * T) < 15
    logit = Diffusion(flow_cfg(timestep_sampling="logit_normal", logit_mean=1.0)).sample_timesteps(
        20000, "cpu", g())
    assert 0 < logit.min() and logit.max() < T
    assert abs(logit.median().item() - torch.sigmoid(torch.tensor(1.0)).item() * T) < 15
    mode = Diffusion(flow_cfg(timestep_sampling="mode", mode_scale=1.29)).sample_timesteps(20000, "cpu", g())
    assert 0 <= mode.min() and mode.max() <= T
    # The mode density puts more mass in the middle than uniform does.
    middle = lambda t: ((t > 0.3 * T) & (t < 0.7 * T)).float().mean().item()  # noqa: E731
    assert middle(mode) > middle(uniform) + 0.05


def test_dynamic_shift_needs_the_latent_shape_and_grows_with_it():
    diff = Diffusion(flow_cfg(flow_shift_dynamic=True))
    with pytest.raises(ValueError, match="latent_shape"):
        diff.sample_timesteps(4, "cpu", torch.Generator().manual_seed(0))
    small = diff.sample_timesteps(5000, "cpu", torch.Generator().manual_seed(0), latent_shape=(1, 4, 4, 8, 8))
    large = diff.sample_timesteps(5000, "cpu", torch.Generator().manual_seed(0), latent_shape=(1, 4, 16, 32, 32))
    assert (large >= small).all() and large.median() > small.median() + 100


def test_flow_loss_weightings_match_diffusers_names():
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0])
    s = t / T
    assert torch.equal(Diffusion(flow_cfg()).loss_weight(t), torch.ones(5))
    torch.testing.assert_close(Diffusion(flow_cfg(loss_weighting="cosmap")).loss_weight(t),
                               compute_loss_weighting_for_sd3("cosmap", s))
    sqrt = Diffusion(flow_cfg(loss_weighting="sigma_sqrt")).loss_weight(t)
    torch.testing.assert_close(sqrt[1:], compute_loss_weighting_for_sd3("sigma_sqrt", s[1:]))
    assert sqrt[0].item() == pytest.approx(T ** 2)  # s floored at 1 / T: finite at the clean end
    diff = Diffusion(flow_cfg(loss_weighting="cosmap"))
    x0, eps, out = randn(5, 2, 3, 4, 4, seed=9), randn(5, 2, 3, 4, 4, seed=10), randn(5, 2, 3, 4, 4, seed=11)
    loss = diff.loss(out, x0, eps, t)
    torch.testing.assert_close(loss.mse, (out - (eps - x0)).square().mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(loss.loss, loss.mse * loss.weight)


# --------------------------------------------------------------------------- samplers


def _exact_flow_oracle(x0, sched):
    """model_fn returning the exact velocity for a known x0 at the scheduler's current sigma."""
    def model_fn(x_t, t, y):
        s = sched.sigmas[sched.step_index or 0]
        return (x_t - x0) / s
    return model_fn


def _gaussian_flow_oracle(mean: float, std: float):
    """model_fn with the exact E[eps - x0 | x_t] for x0 ~ N(mean, std^2), reading s = t / T from
    its time input the way the DiT does: checks the model-time convention of every sampler."""
    def model_fn(x_t, t, y):
        s = (t.float() / T).view(-1, 1, 1, 1, 1)
        a = 1 - s  # x_t = a x0 + s eps
        x0_hat = mean + a * std ** 2 / (a ** 2 * std ** 2 + s ** 2) * (x_t - a * mean)
        return (x_t - x0_hat) / s  # u = eps - x0 = (x_t - x0) / s
    return model_fn


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_flow_sampler_with_exact_oracle_returns_x0(name, dynamic):
    cfg = flow_cfg(flow_shift_dynamic=True) if dynamic else flow_cfg(flow_shift=3.0)
    x0 = randn(*SHAPE, seed=12)
    sched = make_scheduler(name, cfg)
    out = sample(_exact_flow_oracle(x0, sched), SHAPE, scheduler=sched, num_steps=10,
                 generator=torch.Generator().manual_seed(0), device="cpu", mu=flow_mu(cfg, SHAPE))
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
def test_flow_sampler_matches_gaussian_data(name):
    cfg = flow_cfg(flow_shift=3.0)
    shape = (4, 4, 8, 16, 16)
    out = sample(_gaussian_flow_oracle(0.5, 0.5), shape, scheduler=make_scheduler(name, cfg),
                 num_steps={"euler": 100, "dpm++": 25, "unipc": 25}[name],
                 generator=torch.Generator().manual_seed(0), device="cpu")
    assert abs(out.mean().item() - 0.5) < 0.015 and abs(out.std().item() - 0.5) < 0.02


def test_samplers_refused_for_the_other_objective():
    with pytest.raises(ConfigError, match=r"sampler = 'ddim' cannot sample .*flow_matching; use one of "
                                          r"euler, dpm\+\+, unipc"):
        make_scheduler("ddim", flow_cfg())
    with pytest.raises(ConfigError, match=r"sampler = 'unipc' cannot sample .*v_prediction; use one of "
                                          r"ddim, dpm\+\+, euler, ddpm"):
        make_scheduler("unipc", DiffusionConfig())
    assert type(make_scheduler("euler", DiffusionConfig())).__name__ == "EulerDiscreteScheduler"
    assert isinstance(make_scheduler("euler", flow_cfg()), FlowMatchEulerDiscreteScheduler)
    assert isinstance(make_scheduler("unipc", flow_cfg()), UniPCMultistepScheduler)
    assert isinstance(make_scheduler("dpm++", flow_cfg()), DPMSolverMultistepScheduler)
    assert set(SAMPLERS) & set(FLOW_SAMPLERS) == {"euler", "dpm++"}


def test_sample_wants_mu_exactly_for_a_dynamic_shift():
    cfg = flow_cfg(flow_shift_dynamic=True)
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="mu = flow_mu"):
        sample(model, SHAPE, scheduler=make_scheduler("euler", cfg), num_steps=2, generator=None, device="cpu")
    with pytest.raises(ValueError, match="mu = flow_mu"):
        sample(model, SHAPE, scheduler=make_scheduler("euler", flow_cfg()), num_steps=2, generator=None,
               device="cpu", mu=0.5)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, words", [
    (["diffusion.objective=flow_matching", "validation.sampler=ddpm"],
     ["validation.sampler = 'ddpm'", "euler, dpm++, unipc", "auto: euler"]),
    (["diffusion.flow_shift=3"], ["diffusion.flow_shift = 3.0", "flow matching only",
                                  "diffusion.objective=flow_matching"]),
    (["diffusion.loss_weighting=cosmap"], ["diffusion.loss_weighting", "flow matching only"]),
    (["diffusion.objective=flow_matching", "validation.sampler=euler", "diffusion.min_snr_gamma=5"],
     ["diffusion.min_snr_gamma = 5.0", "diffusion.loss_weighting"]),
    (["diffusion.objective=flow_matching", "validation.sampler=euler", "diffusion.flow_shift=3",
      "diffusion.flow_shift_dynamic=true"], ["diffusion.flow_shift = 3.0", "flow_shift_dynamic"]),
    (["diffusion.objective=rectified_flow"], ["diffusion.objective", "rectified_flow"]),
    (["diffusion.flow_shift=0"], ["diffusion.flow_shift = 0", "between 0.01 and 100"]),
    (["diffusion.mode_scale=3"], ["diffusion.mode_scale = 3.0"]),
])
def test_config_refuses_flow_keys_that_do_not_fit(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                    ["vae.path=/nowhere", *overrides])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_config_accepts_a_flow_run():
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      ["vae.path=/nowhere", "diffusion.objective=flow_matching", "validation.sampler=unipc",
                       "diffusion.flow_shift=3", "diffusion.timestep_sampling=logit_normal"])
    assert cfg.diffusion.objective == "flow_matching" and cfg.validation.sampler == "unipc"


def test_a_refused_samplers_advice_works():
    """The refusal names the samplers that serve the objective and `auto`: each of them loads."""
    args = ["vae.path=/nowhere", "diffusion.objective=flow_matching"]
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [*args, "validation.sampler=ddim"])
    advised = re.search(r"use one of ([\w+, ]+) \(or (\w+): euler\)", str(e.value))
    assert advised, str(e.value)
    for name in [*advised.group(1).split(", "), advised.group(2)]:
        cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [*args, f"validation.sampler={name}"])
        make_scheduler(cfg.validation.sampler, cfg.diffusion)
    with pytest.raises(ConfigError, match=r"use one of euler, dpm\+\+, unipc or auto"):
        make_scheduler("heun", flow_cfg())


def test_auto_sampler_follows_the_objective():
    """`auto` (every default) is default_sampler(objective), the one mapping: ddpm for v (what
    every shipped config named before, so their numbers stay), euler for flow; an explicit
    sampler is kept when it serves the objective."""
    assert (default_sampler("v_prediction"), default_sampler("flow_matching")) == ("ddpm", "euler")
    assert resolve_sampler("auto", "flow_matching") == "euler" and resolve_sampler("unipc", "flow_matching") == "unipc"
    for cls in (PredictConfig, EvaluateConfig, TrainRunConfig):
        assert getattr(cls(), "validation", cls()).sampler == "auto"
    assert isinstance(make_scheduler("auto", flow_cfg()), FlowMatchEulerDiscreteScheduler)
    assert type(make_scheduler("auto", DiffusionConfig())).__name__ == "DDPMScheduler"


# --------------------------------------------------------------------------- end to end

FLOW_RUN = ["diffusion.objective=flow_matching", "diffusion.timestep_sampling=logit_normal",
            "diffusion.flow_shift_dynamic=true", "diffusion.loss_weighting=cosmap",
            "validation.sampler=unipc"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, random_vae):
    """A tiny flow run of 3 steps with a validation video (sampled by UniPC) at the end."""
    runs = tmp_path_factory.mktemp("flow_runs")
    return _train(runs, random_vae, "flow", [*FLOW_RUN, "train.max_steps=3", "validation.every_epochs=1"])


@pytest.fixture(scope="module")
def v_run(tmp_path_factory, random_vae):
    runs = tmp_path_factory.mktemp("v_runs")
    return _train(runs, random_vae, "v", ["train.max_steps=2"])


def test_flow_checkpoint_records_its_objective(flow_run):
    ckpt = load_checkpoint(os.path.join(flow_run, "latest.pth"))
    assert ckpt["diffusion"]["objective"] == "flow_matching"
    assert ckpt["diffusion"]["flow_shift_dynamic"] is True
    assert ckpt["config"]["diffusion"]["objective"] == "flow_matching"
    assert glob.glob(os.path.join(flow_run, "samples", "*", "sample_000.mp4"))  # validation: UniPC


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_flow_checkpoint_samples_with_each_flow_sampler(flow_run, tmp_path, sampler, capsys):
    out = tmp_path / sampler
    assert _predict(os.path.join(flow_run, "latest.pth"), str(out), [f"sampler={sampler}"]) == 0
    assert "flow_matching" in capsys.readouterr().out
    for name in ("sample_000.mp4", "sample_001.gif", "grid.png"):
        assert (out / name).is_file(), name
    frames = iio.imread(out / "sample_000.gif", index=None)
    assert frames.shape[0] == 4 and frames.std() > 0  # data.num_frames, not a blank video


def _refused(ckpt: str, out, sampler: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: _predict(ckpt, str(out), [f"sampler={sampler}"]))
    assert e.value.code == 2
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return capsys.readouterr().err


def test_predict_refuses_a_sampler_of_the_other_objective(flow_run, v_run, tmp_path, capsys):
    err = _refused(os.path.join(flow_run, "latest.pth"), tmp_path / "a", "ddim", capsys)
    assert "sampler = 'ddim' cannot sample checkpoint" in err and "flow_matching" in err
    assert "use one of euler, dpm++, unipc" in err and "Traceback" not in err
    err = _refused(os.path.join(v_run, "latest.pth"), tmp_path / "b", "unipc", capsys)
    assert "sampler = 'unipc'" in err and "diffusion.objective = v_prediction" in err
    assert "use one of ddim, dpm++, euler, ddpm" in err


def _strip_flow_keys(src: str, dst: str) -> None:
    """A checkpoint as written before flow matching: no objective or flow key recorded."""
    ckpt = torch.load(src, weights_only=True)
    new = {"objective", "mode_scale", "flow_shift", "flow_shift_dynamic", "flow_base_shift",
           "flow_max_shift", "flow_base_seq_len", "flow_max_seq_len", "loss_weighting"}
    for d in (ckpt["diffusion"], ckpt["config"]["diffusion"]):
        for key in new:
            d.pop(key)
    torch.save(ckpt, dst)


def test_old_checkpoint_without_objective_loads_as_v_prediction(v_run, tmp_path, random_vae, capsys):
    old = str(tmp_path / "old.pth")
    _strip_flow_keys(os.path.join(v_run, "latest.pth"), old)
    assert recorded_diffusion(load_checkpoint(old)).objective == "v_prediction"
    # Same videos as the checkpoint it came from: sampled as v.
    assert _predict(old, str(tmp_path / "old"), ["sampler=euler"]) == 0
    assert _predict(os.path.join(v_run, "latest.pth"), str(tmp_path / "new"), ["sampler=euler"]) == 0
    assert (tmp_path / "old" / "sample_000.gif").read_bytes() == (tmp_path / "new" / "sample_000.gif").read_bytes()
    capsys.readouterr()
    assert "diffusion.objective = v_prediction" in _refused(old, tmp_path / "c", "unipc", capsys)
    # It resumes under today's config (whose diffusion section has the new keys)...
    run = _train(tmp_path, random_vae, "resumed", ["train.max_steps=3", f"train.resume={old}"])
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 3
    # ... but not as a flow run: the objective is part of what the model learnt.
    with pytest.raises(UserError, match=r"diffusion.objective is 'v_prediction' in the checkpoint but "
                                        r"'flow_matching' now"):
        _train(tmp_path, random_vae, "as_flow", [*FLOW_RUN, "train.max_steps=3", f"train.resume={old}"])


def test_flow_resume_matches_uninterrupted_run(tmp_path, random_vae, monkeypatch):
    """tests/test_stage2.py's exact-resume check, with flow matching (dynamic shift, logit-normal
    timesteps, cosmap weighting): 7 steps straight == 4 steps, checkpoint, resume to 7."""
    import training.stage2 as stage2
    ck4 = os.path.join(tmp_path, "step4.pth")
    original_save = stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original_save(s, name, **kw)
        if s.pos.step == 4 and name == "latest.pth":
            shutil.copy(os.path.join(s.run_dir, name), ck4)

    monkeypatch.setattr(stage2, "save", spy_save)
    steps = [*FLOW_RUN, "train.max_steps=7", "train.checkpoint_every=4"]
    straight = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "straight", steps), "latest.pth"))
    monkeypatch.setattr(stage2, "save", original_save)
    assert load_checkpoint(ck4)["step"] == 4
    torch.manual_seed(999)  # resume must not depend on the process's RNG state
    resumed = load_checkpoint(os.path.join(
        _train(tmp_path, random_vae, "resumed", steps + [f"train.resume={ck4}"]), "latest.pth"))
    assert resumed["step"] == straight["step"] == 7
    for key in ("model_state", "ema_state"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"


def test_identity_check_serves_both_objectives(monkeypatch):
    flow = Diffusion(flow_cfg())
    check = diagnostics.check_identities(flow, (4, 3, 4, 4))
    assert check.status == "PASS" and "flow_matching" in check.measured
    assert diagnostics.check_identities(Diffusion(DiffusionConfig()), (4, 3, 4, 4)).status == "PASS"
    monkeypatch.setattr(type(flow), "x0_from_output", lambda self, x_t, out, t: x_t - out)
    check = diagnostics.check_identities(flow, (4, 3, 4, 4))
    assert check.status == "FAIL" and "flow_matching formulas" in check.advice


# --------------------------------------------------------------------------- memorise one clip

from tests.test_overfit import ONE_CLIP  # noqa: E402

# Steps, not the shipped config's wall-time limit, end the run: a busy machine must not cut it short.
FLOW_CLIP = [*ONE_CLIP, "diffusion.objective=flow_matching", "validation.sampler=euler",
             "validation.num_steps=20", "train.max_steps=600", "train.time_limit_minutes=null"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_flow_overfit_one_clip_then_predict_and_diagnose_it(tmp_path):
    """tests/test_overfit.py for flow matching: memorise one clip, predict it back with the flow
    Euler sampler through the same frozen VAE, then diagnose the checkpoint. Measured: 30.1 dB
    after 600 steps (about a minute on one thread); diagnose 8 PASS, denoise WARN (one clip)."""
    import train_advanced
    from data.builtin import MovingShapes
    from utils.metrics import psnr
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *FLOW_CLIP,
            f"experiment.runs_dir={tmp_path}", "experiment.name=overfit"]
    assert train_advanced.main(args) == 0
    ckpt = f"{tmp_path}/overfit/latest.pth"
    out = tmp_path / "predict"
    assert predict_advanced.main([
        "--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu", f"checkpoint={ckpt}",
        f"output_dir={out}", "num_videos=1", "sampler=euler", "num_steps=50", "fps=8"]) == 0
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), FLOW_CLIP)
    clip = MovingShapes(cfg.data, "train", cfg.experiment.seed)[0]["video"]  # (3, T, H, W)
    frames = iio.imread(out / "sample_000.gif", index=None)[..., :3]  # (T, H, W, 3)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1
    score = psnr(video, clip)
    print(f"flow overfit PSNR of the predicted video vs the clip: {score:.1f} dB")
    assert score >= 20.0

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        diagnose.main(args + ["--checkpoint", ckpt])
    lines = {m.group(2): m.group(1) for m in
             re.finditer(r"^\[(PASS|WARN|FAIL|SKIP)\] (\w+) +(.*)$", report.getvalue(), re.M)}
    print(report.getvalue())
    assert lines["identities"] == "PASS" and lines["jigsaw"] == "PASS", report.getvalue()
    # A model of one clip denoises the held-out clips only a little (measured: 0.81 at 600 steps).
    ratio = float(re.search(r"error of predicting 0: ([\d.]+)", report.getvalue()).group(1))
    assert lines["denoise"] in ("PASS", "WARN") and ratio < 0.95, report.getvalue()
    assert "flow_matching" in report.getvalue() and "crashed" not in report.getvalue()


def test_the_shipped_config_trains_flow_matching_with_one_override(tmp_path, random_vae, capsys):
    """`diffusion.objective=flow_matching` on config_advanced.yaml (validation.sampler: auto)
    trains and validates with euler, and predict (sampler: auto) samples the checkpoint with it."""
    run = _train(tmp_path, random_vae, "flow_auto", ["diffusion.objective=flow_matching", "train.max_steps=2",
                                                     "validation.every_epochs=1"])
    assert glob.glob(os.path.join(run, "samples", "*", "sample_000.mp4"))
    capsys.readouterr()
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "p"), ["sampler=auto"]) == 0
    assert "sampler euler (auto for flow_matching)" in capsys.readouterr().out


def test_auto_keeps_the_v_prediction_videos_of_ddpm(v_run, tmp_path):
    """For a v checkpoint `auto` is ddpm: the same videos, byte for byte, as the shipped configs'
    former explicit `sampler: ddpm`."""
    ckpt = os.path.join(v_run, "latest.pth")
    for sampler in ("auto", "ddpm"):
        assert _predict(ckpt, str(tmp_path / sampler), [f"sampler={sampler}"]) == 0
    for name in ("sample_000.mp4", "sample_001.mp4"):
        assert open(tmp_path / "auto" / name, "rb").read() == open(tmp_path / "ddpm" / name, "rb").read()

