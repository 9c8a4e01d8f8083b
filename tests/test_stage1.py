"""Stage 1 on the shared machinery: SIGTERM, resume, refusal to overwrite, streamed held-out
PSNR, and the pieces of training/common.py both stages step through (fp16 skipped steps)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_vae
from tests.test_vae import TINY_OVERRIDES
from training.common import StepOutcome, optimizer_step
from utils.checkpoint import load_checkpoint
from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT = 240  # seconds for the subprocess to write its first checkpoint (a busy box)


def _args(runs, name, extra=()):
    return ["--config", os.path.join(ROOT, "config_vae.yaml"), *TINY_OVERRIDES,
            "train.time_limit_minutes=null", f"experiment.runs_dir={runs}",
            f"experiment.name={name}", *extra]


@pytest.mark.slow  # a real process: ~25 s on a quiet 2-core machine
def test_sigterm_saves_then_resume_auto_finishes_and_writes_vae(tmp_path):
    run = tmp_path / "run"
    out_path = tmp_path / "run.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "train_vae.py", *_args(tmp_path, "run", [
            "train.max_steps=100000", "train.checkpoint_every=1", "train.resume=null"])],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not (run / "latest.pth").exists():  # inside the loop, a few steps done
                assert proc.poll() is None, f"exited early: {out_path.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint within the timeout"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = out_path.read_text()
    assert code == 0 and "Traceback" not in text, text[-3000:]
    match = re.search(r"stopped by signal at step (\d+); saved .*latest.pth", text)
    assert match, text[-3000:]
    stopped_at = int(match.group(1))
    assert load_checkpoint(str(run / "latest.pth"))["step"] == stopped_at >= 1
    assert not (run / "vae").exists()  # vae/ only when training ends by its budget

    # train.resume=auto continues from there and, at the end of its budget, writes vae/.
    assert train_vae.main(_args(tmp_path, "run", [f"train.max_steps={stopped_at + 2}",
                                                   "train.resume=auto"])) == 0
    ckpt = load_checkpoint(str(run / "latest.pth"))
    assert ckpt["step"] == stopped_at + 2 and ckpt["format"] == "video-ldm-stage1/1"
    assert len(ckpt["rng"]) == 1 and "noise_gen" in ckpt["rng"][0]  # one entry per rank
    assert (run / "vae" / "config.json").is_file()
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'latest.pth'} at step {stopped_at}" in log
    assert "held-out PSNR" in log


def test_fresh_start_over_an_existing_run_is_refused(tmp_path, capsys):
    assert train_vae.main(_args(tmp_path, "run", ["train.max_steps=1", "train.resume=null"])) == 0
    run = tmp_path / "run"
    kept = {name: (run / name).read_bytes() for name in ("latest.pth", "config.yaml")}
    with pytest.raises(SystemExit) as e:  # as on the command line: message, exit 2
        run_main(lambda argv: train_vae.main(_args(tmp_path, "run", [
            "train.max_steps=5", "train.lr=0.5", "train.resume=null"])))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "already exists and train.resume is null" in err and "train.resume=auto" in err, err
    assert {name: (run / name).read_bytes() for name in kept} == kept  # config.yaml untouched


def test_nan_losses_stop_stage1_with_the_batch_saved(tmp_path, monkeypatch):
    """The non-finite guard of stage 2, in stage 1: K NaN losses in a row stop with a message."""
    import training.stage1 as stage1
    from utils.errors import UserError
    original = stage1.VAEObjective.forward

    def nan_loss(self, frames, generator=None):
        loss, out = original(self, frames, generator)
        return loss * float("nan"), out  # with its graph: backward runs, the update must not

    monkeypatch.setattr(stage1.VAEObjective, "forward", nan_loss)
    with pytest.raises(UserError, match="2 non-finite losses in a row at step 1: stopped") as e:
        train_vae.main(_args(tmp_path, "run", ["train.max_steps=5", "train.max_nonfinite_steps=2"]))
    assert "no checkpoint was written yet" in str(e.value)
    assert (tmp_path / "run" / "nonfinite_batch_rank0.pt").is_file()
    assert not (tmp_path / "run" / "vae").exists()


def test_out_of_memory_in_stage1_names_what_to_lower(tmp_path, monkeypatch):
    import training.stage1 as stage1
    from utils.errors import UserError

    def oom(self, frames, generator=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(stage1.VAEObjective, "forward", oom)
    with pytest.raises(UserError, match=r"out of GPU memory at train.batch_size = 2 on cpu\. Lower "
                                        r"train.batch_size \(clips per batch\) or train.frames_per_clip"):
        train_vae.main(_args(tmp_path, "run", ["train.max_steps=5"]))


def test_heldout_psnr_streams_and_matches_the_whole_set():
    """Batches of 3 over 7 windows give the PSNR of all 7 at once (the old, all-in-memory way)."""
    from models.vae import FrozenVAE, build_autoencoder
    from tests.test_vae import TINY_ARCH
    from training.stage1 import heldout_psnr
    from utils.metrics import psnr
    torch.manual_seed(0)
    vae = FrozenVAE(build_autoencoder(TINY_ARCH))
    clips = torch.rand(7, 3, 2, 16, 16) * 2 - 1
    dataset = [{"video": c} for c in clips]
    whole = psnr(vae.decode(vae.encode(clips, sample=False)), clips)
    assert heldout_psnr(vae, dataset, batch=3) == pytest.approx(whole, abs=1e-6)


# --------------------------------------------------------------------------- the shared step


def _tiny_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_fp16_step_the_scaler_skips_is_not_a_step():
    """An inf gradient under loss scaling: the GradScaler skips the update and lowers its scale;
    optimizer_step reports it (so neither stage counts it), and the next good step steps."""
    model, opt = _tiny_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.ones(3, 4)).sum()
    scaler.scale(loss).backward()
    model.weight.grad[0, 0] = float("inf")  # finite loss, overflowing gradient
    outcome, _ = optimizer_step(opt, scaler, loss, grad_clip=1.0)
    assert outcome is StepOutcome.SCALER_SKIPPED and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.weight.grad is None  # cleared for the next step
    loss = model(torch.ones(3, 4)).sum()
    scaler.scale(loss).backward()
    outcome, _ = optimizer_step(opt, scaler, loss, grad_clip=1.0)
    assert outcome is StepOutcome.STEPPED
    assert not torch.equal(model.weight, before["weight"])


def test_nan_loss_with_a_scaler_skips_and_the_scaler_keeps_working():
    model, opt = _tiny_optimizer()
    scaler = torch.amp.GradScaler("cpu")
    for loss_factor, expected in ((float("nan"), StepOutcome.NONFINITE), (1.0, StepOutcome.STEPPED)):
        loss = model(torch.ones(3, 4)).sum() * loss_factor
        scaler.scale(loss).backward()
        assert optimizer_step(opt, scaler, loss, grad_clip=None)[0] is expected


def test_stage2_fp16_skipped_steps_do_not_advance_step_lr_or_ema(tmp_path, monkeypatch):
    """Stage 2 with an enabled GradScaler (fp16's) and an inf gradient injected into the 2nd
    update: 3 steps take 4 updates; the skipped one moved no weight, EMA, LR or step count."""
    import training.stage2 as stage2
    from tests.test_stage2 import TINY
    from models.vae import build_autoencoder
    from utils.config import VAEArchConfig
    import train_advanced
    torch.manual_seed(0)
    ae = build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8))
    ae.register_to_config(scaling_factor=0.8)
    ae.save_pretrained(str(tmp_path / "vae"))
    monkeypatch.setattr(stage2, "make_grad_scaler", lambda device, dtype: torch.amp.GradScaler("cpu"))
    calls, seen = [0], []
    original = stage2._optimizer_step

    def inject_inf(s, stats, per_sample):
        calls[0] += 1
        if calls[0] == 2:
            next(s.model.parameters()).grad.view(-1)[0] = float("inf")
        ema = [p.clone() for p in s.ema.model.parameters()]
        outcome = original(s, stats, per_sample)
        seen.append((outcome, s.lr_sched.last_epoch, s.pos.step, ema))
        return outcome

    monkeypatch.setattr(stage2, "_optimizer_step", inject_inf)
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={tmp_path}/vae",
            f"experiment.runs_dir={tmp_path}", "experiment.name=run", "train.max_steps=3",
            "train.ema_warmup_steps=0", "train.ema_decay=0.5"]
    assert train_advanced.main(args) == 0
    assert [o for o, *_ in seen] == [StepOutcome.STEPPED, StepOutcome.SCALER_SKIPPED,
                                     StepOutcome.STEPPED, StepOutcome.STEPPED]
    assert [lr_steps for _, lr_steps, _, _ in seen] == [1, 1, 2, 3]  # the LR schedule skipped it too
    ckpt = load_checkpoint(str(tmp_path / "run" / "latest.pth"))
    assert ckpt["step"] == 3 and ckpt["lr_sched"]["last_epoch"] == 3
    # EMA: moved by a step, unchanged across the skipped update (before call 3 == before call 2).
    assert any(not torch.equal(a, b) for a, b in zip(seen[0][3], seen[1][3]))
    assert all(torch.equal(a, b) for a, b in zip(seen[1][3], seen[2][3]))
    assert "non-finite" not in (tmp_path / "run" / "log.txt").read_text()  # not a NaN/Inf loss


def test_channels_last_computes_the_same_loss_and_gradients_and_saves_vae(tmp_path):
    """train.channels_last changes the memory order, not the math: the same loss and gradients
    (to float tolerance; Adam then amplifies rounding in near-zero gradients, so whole runs are
    compared no further), and vae/ (safetensors: contiguous tensors only) is still written."""
    from models.vae import VAELoss, build_autoencoder
    from training.stage1 import VAEObjective
    from utils.config import VAEArchConfig
    frames = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grads = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        ae = build_autoencoder(VAEArchConfig(block_out_channels=[8, 16, 16], norm_num_groups=8))
        objective = VAEObjective(ae.to(memory_format=layout), VAELoss(), layout)
        loss, _ = objective(frames, torch.Generator().manual_seed(1))
        loss.backward()
        grads[layout] = (loss.detach(), {k: p.grad for k, p in ae.named_parameters()})
    (loss_a, ga), (loss_b, gb) = grads.values()
    torch.testing.assert_close(loss_a, loss_b)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert train_vae.main(_args(tmp_path, "cl", ["train.max_steps=2", "train.resume=null",
                                                 "train.channels_last=true"])) == 0
    assert (tmp_path / "cl" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
