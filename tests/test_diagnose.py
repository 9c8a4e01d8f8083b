"""diagnose.py: every check passes on a healthy run, and each planted fault fails its check.

The healthy run is a small DiT trained 150 steps on the latents of the trained VAE fixture,
with an EMA fast enough to follow it. Every broken case below uses that same checkpoint, so
a failure comes from the planted fault, not from an undertrained model. Measured while
writing this (built-in data, 32 px; denoise = x0 error relative to predicting v = 0; seams =
jigsaw score of 8 samples vs 32 real clips, which score 1.05; misplaced = share of the
model's v patches that another position's true v matches better):

    checkpoint    denoise  seams  misplaced | scrambled unpatchify: denoise  seams      misplaced
    10 steps      0.94 W   0.87             |                       0.95 W   0.85
    200 steps     0.29     1.21-1.35        |                       1.12-1.42 F  0.81-1.01
    600 steps     0.21     1.24   4-5%      |                       1.20 F   0.75       99-100% F

A scrambled unpatchify does not make seams in samples: it moves whole v patches at every
sampling step and what survives 20 steps is incoherent blobs. The jigsaw check's placement
measurement sees it directly (the pieces match the positions they came from, the same ones
in every clip); the denoise and patchify checks fail too. Seams (the samples' 8-px cells put together in a wrong order)
score 10-13 against a limit of 2.35.
"""
import contextlib
import io
import os
import re

import pytest
import torch
from einops import rearrange

import diagnose
import models.dit
from models.vae import FrozenVAE
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (random_vae is a fixture)
from training import diagnostics
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
from utils.config import TrainRunConfig, load_config

# TINY at 32 px (4 x 4 patches of 8 px per frame), a model that learns in ~100 steps, and an
# EMA fast enough to follow it (the shipped 0.999 would still be at the zero init).
HEALTHY = [*TINY, "data.resolution=32", "data.builtin.num_clips=16", "model.hidden_size=64",
           "train.batch_size=4", "train.lr=1e-3", "train.max_steps=150", "train.warmup_steps=10",
           "train.ema_decay=0.9", "train.log_every=50", "train.checkpoint_every=1000"]


def _args(runs_dir, vae, extra=()):
    return ["--config", os.path.join(ROOT, "config_advanced.yaml"), *HEALTHY, f"vae.path={vae}",
            f"experiment.runs_dir={runs_dir}", "experiment.name=run", *extra]


@pytest.fixture(scope="module")
def vae_dir(request):
    """The `trained_vae` of tests/conftest.py; these tests mean nothing on a random VAE."""
    try:
        return str(request.getfixturevalue("trained_vae"))
    except pytest.FixtureLookupError:
        pytest.skip("needs the trained_vae fixture (tests/conftest.py)")


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory, vae_dir):
    import train_advanced
    runs = tmp_path_factory.mktemp("runs")
    assert train_advanced.main(_args(runs, vae_dir)) == 0
    return str(runs)


def _diagnose(args, capsys):
    """(exit code, {check name: (status, line)}, whole output) of diagnose.main."""
    code = diagnose.main(args)
    return code, *_parse(capsys.readouterr().out)


def _jigsaw_numbers(line):
    """(samples' seam score, real clips' score, its limit) of a jigsaw line."""
    m = re.search(r"samples ([\d.]+) vs real clips ([\d.]+) \(fail above ([\d.]+)", line)
    return tuple(float(x) for x in m.groups())


def _misplaced_share(line):
    """(misplaced share, its limit) in % of a jigsaw line."""
    m = re.search(r"misplaced pieces ([\d.]+)% of positions \(fail above ([\d.]+)%", line)
    return tuple(float(x) for x in m.groups())


ALL_CHECKS = {"vae_roundtrip", "latent_scale", "patchify", "identities", "gradients",
              "checkpoint", "vae_fingerprint", "condition", "denoise", "jigsaw"}


@pytest.fixture(scope="module")
def healthy_report(healthy_run, vae_dir):
    """diagnose on the healthy run, once: (exit code, {check: (status, line)}, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # module fixtures cannot use capsys
        code = diagnose.main(_args(healthy_run, vae_dir))
    return code, *_parse(out.getvalue())


def _parse(out):
    checks = {m.group(2): (m.group(1), m.group(0))
              for m in re.finditer(r"^\[(PASS|WARN|FAIL|SKIP)\] (\w+) +(.*)$", out, re.M)}
    return checks, out


@pytest.mark.slow
def test_healthy_run_passes_every_check(healthy_report):
    code, checks, out = healthy_report
    assert code == 0 and set(checks) == ALL_CHECKS, out
    assert all(status == "PASS" for status, _ in checks.values()), out
    score, real, limit = _jigsaw_numbers(checks["jigsaw"][1])
    assert score < limit
    misplaced, max_misplaced = _misplaced_share(checks["jigsaw"][1])
    assert misplaced < 15 < max_misplaced


@pytest.mark.slow
def test_altered_vae_fails_the_fingerprint_check(healthy_run, vae_dir, tmp_path, capsys):
    ae = FrozenVAE.from_pretrained(vae_dir).ae
    with torch.no_grad():
        ae.decoder.conv_out.bias.add_(1e-3)  # "the same VAE after a little more training"
    altered = str(tmp_path / "vae")
    ae.save_pretrained(altered)
    ckpt = os.path.join(healthy_run, "run", "latest.pth")
    code, checks, out = _diagnose(_args(healthy_run, altered, ["--checkpoint", ckpt]), capsys)
    assert code == 1
    assert checks["vae_fingerprint"][0] == "FAIL", out
    assert "Use the VAE directory the checkpoint was trained with, or train the DiT again" in out
    assert checks["vae_roundtrip"][0] == "PASS"  # the altered VAE still works: only the id tells


def _scrambled(unpatchify):
    """unpatchify that puts each frame's patches back in a fixed wrong order."""
    def wrong(tokens, grid, patch_t, patch):
        t, h, w = grid
        perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))
        frames = rearrange(tokens, "b (t s) d -> b t s d", t=t)[:, :, perm]  # (B, T', S, D)
        return unpatchify(rearrange(frames, "b t s d -> b (t s) d"), grid, patch_t, patch)
    return wrong


@pytest.mark.slow
def test_scrambled_unpatchify_fails_jigsaw_patchify_and_denoise(healthy_run, vae_dir, healthy_report,
                                                                capsys, monkeypatch):
    """The same checkpoint passes healthy: the failures come from the scramble alone.

    Sampling through a scrambled DiT gives incoherent blobs, not patch-grid seams; the
    jigsaw check's placement measurement sees the pieces in the wrong places at once.
    """
    monkeypatch.setattr(models.dit, "unpatchify", _scrambled(models.dit.unpatchify))
    code, checks, out = _diagnose(_args(healthy_run, vae_dir), capsys)
    assert code == 1
    for name in ("jigsaw", "patchify", "denoise"):
        assert checks[name][0] == "FAIL", out
    for name in ("vae_roundtrip", "vae_fingerprint", "checkpoint", "identities"):
        assert checks[name][0] == "PASS", out
    healthy = healthy_report[1]
    assert _denoise_ratio(checks["denoise"][1]) > 1 > 0.8 > _denoise_ratio(healthy["denoise"][1])
    misplaced, max_misplaced = _misplaced_share(checks["jigsaw"][1])
    assert misplaced > 90 > max_misplaced > _misplaced_share(healthy["jigsaw"][1])[0]
    assert "unpatchify does not put the pieces back where patchify took them from" in out
    print("scrambled unpatchify:", checks["denoise"][1], checks["jigsaw"][1], sep="\n")


def test_misplaced_pieces_finds_positions_that_come_from_elsewhere():
    """The placement measure on known tensors: the right order 0, a scrambled order ~all, a
    zero or an unrelated prediction (an untrained model) ~0, one swapped pair exactly it."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(32, 4, 3, 8, 8, generator=g)  # (B, C, T, h, w): 3 x 4 x 4 = 48 positions
    assert not diagnostics.misplaced_pieces(v, v, 1, 2).any()
    assert not diagnostics.misplaced_pieces(torch.zeros_like(v), v, 1, 2).any()
    assert diagnostics.misplaced_pieces(torch.randn(v.shape, generator=g), v, 1, 2).float().mean() < 0.1
    scrambled = _scrambled(models.dit.unpatchify)(models.dit.patchify(v, 1, 2), (3, 4, 4), 1, 2)
    assert diagnostics.misplaced_pieces(scrambled + 0.5 * torch.randn(v.shape, generator=g), v, 1, 2
                                        ).float().mean() > 0.9
    swapped = v.clone()
    swapped[..., 0:2, 0:2], swapped[..., 0:2, 2:4] = v[..., 0:2, 2:4], v[..., 0:2, 0:2]
    misplaced = diagnostics.misplaced_pieces(swapped, v, 1, 2)
    assert misplaced.nonzero().flatten().tolist() == [0, 1, 16, 17, 32, 33]  # the pair in each frame


def _denoise_ratio(line):
    return float(re.search(r"error of predicting 0: ([\d.]+)", line).group(1))


def _misplaced(generate_videos, cell):
    """generate_videos whose frames come back with their patch cells in a fixed wrong order."""
    def wrong(*args, **kwargs):
        out = []
        for v in generate_videos(*args, **kwargs):  # (T, H, W, 3) uint8 each
            h = v.shape[1] // cell
            perm = torch.randperm(h * h, generator=torch.Generator().manual_seed(0))
            cells = rearrange(torch.from_numpy(v), "t (h p) (w q) c -> t (h w) p q c", p=cell, q=cell)
            out.append(rearrange(cells[:, perm], "t (h w) p q c -> t (h p) (w q) c", h=h).numpy())
        return out
    return wrong


@pytest.mark.slow
def test_misplaced_patches_in_samples_fail_jigsaw(healthy_run, vae_dir, healthy_report,
                                                  monkeypatch):
    """Samples whose patches are put together in the wrong order: the jigsaw check fails,
    while the same samples in the right order pass (healthy_report)."""
    ckpt = load_checkpoint(os.path.join(healthy_run, "run", "latest.pth"))
    vae = FrozenVAE.from_pretrained(vae_dir)
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                      _args(healthy_run, vae_dir)[2:])
    real, batch = diagnostics.real_clips(cfg, "val", diagnostics.NUM_JIGSAW_REAL_CLIPS)
    cell = vae.downsample_factor * ckpt["model"]["config"]["patch_size"]
    monkeypatch.setattr(diagnostics, "generate_videos", _misplaced(diagnostics.generate_videos, cell))
    result = diagnostics.check_jigsaw(ckpt, vae, real, {"y": batch["label"]}, torch.device("cpu"), cfg.validation)
    assert result.status == "FAIL" and "patch grid" in result.advice
    score, real_score, limit = _jigsaw_numbers(result.line())
    healthy_score, healthy_real, _ = _jigsaw_numbers(healthy_report[1]["jigsaw"][1])
    assert real_score == healthy_real and score > limit > healthy_score
    print(f"jigsaw: misplaced {score:.3f}, healthy {healthy_score:.3f}, real {real_score:.3f}, "
          f"limit {limit:.3f}")


def test_no_checkpoint_is_skipped_not_passed(vae_dir, tmp_path, capsys):
    code, checks, out = _diagnose(_args(tmp_path, vae_dir), capsys)
    for name in ("checkpoint", "vae_fingerprint", "condition", "denoise", "jigsaw"):
        assert checks[name][0] == "SKIP", out
    assert f"no checkpoint at {tmp_path}/run/latest.pth" in out
    assert code == 0 and "0 failed, 5 skipped" in out


def test_corrupt_checkpoint_is_a_failed_check(vae_dir, tmp_path, capsys):
    ckpt = tmp_path / "run" / "latest.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"\x80\x02not a checkpoint")
    code, checks, out = _diagnose(_args(tmp_path, vae_dir), capsys)
    assert code == 1 and checks["checkpoint"][0] == "FAIL" and "corrupt or truncated" in out
    assert checks["denoise"][0] == checks["jigsaw"][0] == "SKIP"


def test_low_vae_psnr_fails_and_user_errors_exit_2(random_vae, tmp_path, capsys):
    """A random VAE reconstructs nothing: the round trip fails and says what to do."""
    code, checks, out = _diagnose(_args(tmp_path, random_vae), capsys)
    assert code == 1 and checks["vae_roundtrip"][0] == "FAIL", out
    assert "--min-vae-psnr" in out and "train_vae.py" in out
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: diagnose.main(_args(tmp_path, tmp_path / "nowhere")))
    assert e.value.code == 2 and "VAE directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: diagnose.main(_args(tmp_path, random_vae, ["--min-vae-psnr", "x"])))
    assert e.value.code == 2 and "--min-vae-psnr 'x'" in capsys.readouterr().err


# --------------------------------------------------------------------------- single checks


def _tiny_cfg(vae):
    return load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"),
                       [*TINY, f"vae.path={vae}"])


def test_gradient_check_names_dead_dit_parameters(random_vae, monkeypatch):
    cfg = _tiny_cfg(random_vae)
    assert diagnostics.check_gradients(cfg, torch.device("cpu")).status == "PASS"
    original = models.dit.VideoDiT.condition
    monkeypatch.setattr(models.dit.VideoDiT, "condition",
                        lambda self, *args: original(self, *args).detach())
    result = diagnostics.check_gradients(cfg, torch.device("cpu"))
    assert result.status == "FAIL" and "no gradient reaches DiT t_embed.mlp.0.weight" in result.advice


def test_gradient_check_catches_a_trainable_vae(random_vae, monkeypatch):
    original = FrozenVAE.__init__

    def thawed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.ae.requires_grad_(True)

    monkeypatch.setattr(FrozenVAE, "__init__", thawed)
    result = diagnostics.check_gradients(_tiny_cfg(random_vae), torch.device("cpu"))
    assert result.status == "FAIL" and "the VAE is not frozen" in result.advice


def test_v_identity_check_catches_a_wrong_formula(monkeypatch):
    from models.diffusion import Diffusion, VPrediction
    from utils.config import DiffusionConfig
    d = Diffusion(DiffusionConfig())
    assert diagnostics.check_identities(d, (4, 3, 4, 4)).status == "PASS"
    monkeypatch.setattr(VPrediction, "eps_from_v", lambda self, x_t, v, t: x_t + v)
    assert diagnostics.check_identities(d, (4, 3, 4, 4)).status == "FAIL"


def test_class_checkpoint_on_captioned_data_samples_its_classes(random_vae, tmp_path, capsys):
    """A class model trained on clips that also carry captions (data.builtin.captions): the
    jigsaw check samples it with its classes, never with the captions as prompts (which a class
    model refuses, so the check crashed)."""
    import train_advanced
    captioned = ["data.builtin.captions=true", "train.max_steps=2"]
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={random_vae}",
            f"experiment.runs_dir={tmp_path}", "experiment.name=run", *captioned]
    assert train_advanced.main(args) == 0
    code, checks, out = _diagnose(args, capsys)
    assert checks["condition"][0] == "PASS", out
    assert "crashed" not in checks["jigsaw"][1] and "prompts are set" not in out, out
