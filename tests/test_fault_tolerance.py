"""Fault tolerance of stage 2: kill -9, SIGTERM/SIGINT, NaN losses, a full disk.

The kill and SIGTERM tests run a real `train_advanced.py` process; the others run the
training in-process with one function monkeypatched to misbehave.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch

import train_advanced
import training.stage2 as stage2
import utils.train_utils as train_utils
from models.diffusion import Diffusion
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (random_vae is a fixture)
from utils.checkpoint import load_checkpoint
from utils.errors import UserError

STARTUP_TIMEOUT = 240  # seconds for a subprocess to write its first checkpoint (a busy CI box)


def _args(tmp_path, vae, name, extra=()):
    return ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={tmp_path}", f"experiment.name={name}", *extra]


def _train(tmp_path, vae, name, extra=()):
    assert train_advanced.main(_args(tmp_path, vae, name, extra)) == 0
    return os.path.join(tmp_path, name)


def _start(tmp_path, vae, name, extra):
    """A real training process; its stdout and stderr go to <tmp>/<name>.out."""
    out = open(os.path.join(tmp_path, f"{name}.out"), "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train_advanced.py", *_args(tmp_path, vae, name, extra)],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, out


def _wait_for_checkpoint(proc, path):
    """Poll until the training process has written `path` (it is then inside the loop)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not os.path.exists(path):
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.02)


def _read(path):
    with open(path) as f:
        return f.read()


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path, random_vae):
    steps = ["train.max_steps=40", "train.checkpoint_every=1"]  # a checkpoint write every step
    proc, out = _start(tmp_path, random_vae, "run", steps)
    latest = os.path.join(tmp_path, "run", "latest.pth")
    try:
        _wait_for_checkpoint(proc, latest)
        time.sleep(0.3)  # a few more checkpoint writes: the kill may land in the middle of one
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        out.close()
    killed_at = load_checkpoint(latest)["step"]  # loads: the atomic write held
    assert 1 <= killed_at < 40, "the kill should land mid-run"
    resumed = _train(tmp_path, random_vae, "run", steps + ["train.resume=auto"])
    ckpt = load_checkpoint(os.path.join(resumed, "latest.pth"))
    assert ckpt["step"] == 40
    assert f"resumed from {latest} (step {killed_at}," in _read(os.path.join(resumed, "log.txt"))


def test_sigterm_saves_and_exits_cleanly(tmp_path, random_vae):
    proc, out = _start(tmp_path, random_vae, "run", ["train.max_steps=100000",
                                                      "train.checkpoint_every=1"])
    latest = os.path.join(tmp_path, "run", "latest.pth")
    try:
        _wait_for_checkpoint(proc, latest)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
        out.close()
    text = _read(os.path.join(tmp_path, "run.out"))
    assert code == 0, text
    match = re.search(r"stopped by signal at step (\d+); saved .*latest.pth", text)
    assert match, text
    assert load_checkpoint(latest)["step"] == int(match.group(1)) >= 1
    assert "Traceback" not in text


def test_sigint_in_process_saves_at_the_step_reached(tmp_path, random_vae, monkeypatch):
    """Ctrl-C at step 3 of 50: the loop finishes that step, saves it and returns normally."""
    original = train_utils.EMA.update

    def update_then_interrupt(self, model, step):
        original(self, model, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_utils.EMA, "update", update_then_interrupt)
    # The handler the run must put back: Python's default_int_handler, or SIG_IGN when this
    # process was started in the background by a non-interactive shell (`cmd &` ignores SIGINT).
    before = signal.getsignal(signal.SIGINT)
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=50", "train.checkpoint_every=100"])
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 3
    assert "stopped by signal at step 3" in _read(os.path.join(run, "log.txt"))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def _nan_loss_on(calls_to_poison):
    """A Diffusion.loss that returns NaN (with a graph, so backward runs) on the given calls."""
    original, calls = Diffusion.loss, [0]

    def loss(self, v, x0, noise, t, frame_mask=None):
        out = original(self, v, x0, noise, t, frame_mask)
        calls[0] += 1
        return out._replace(loss=out.loss * float("nan")) if calls[0] in calls_to_poison else out
    return loss


def test_one_nan_step_is_skipped_with_a_warning(tmp_path, random_vae, monkeypatch):
    """Loss call 2 is NaN: its update is skipped and is not a step (no LR, EMA or count), so
    4 steps take 5 loss calls, and the weights after the skip equal those before it."""
    weights = []
    original_step = stage2._optimizer_step
    stepped = stage2.StepOutcome.STEPPED

    def spy_step(s, stats, per_sample):
        outcome = original_step(s, stats, per_sample)
        weights.append((outcome is stepped, {k: v.clone() for k, v in s.model.state_dict().items()}))
        return outcome

    monkeypatch.setattr(stage2, "_optimizer_step", spy_step)
    monkeypatch.setattr(Diffusion, "loss", _nan_loss_on({2}))
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=4"])
    log = _read(os.path.join(run, "log.txt"))
    assert "warning: non-finite loss or gradient at step 2; update skipped (1 in a row" in log
    assert [ok for ok, _ in weights] == [True, False, True, True, True]
    for name, w in weights[1][1].items():  # the skipped call changed nothing
        assert torch.equal(w, weights[0][1][name]), name
    assert any(not torch.equal(w, weights[1][1][n]) for n, w in weights[2][1].items())
    final = load_checkpoint(os.path.join(run, "latest.pth"))
    assert final["step"] == 4
    assert all(torch.isfinite(w).all() for w in final["model_state"].values())


def test_nan_losses_in_a_row_stop_with_the_batch_saved(tmp_path, random_vae, monkeypatch):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    latest = os.path.join(run, "latest.pth")
    before = open(latest, "rb").read()
    monkeypatch.setattr(Diffusion, "loss", _nan_loss_on(set(range(1, 100))))
    with pytest.raises(UserError) as e:
        _train(tmp_path, random_vae, "run", ["train.max_steps=20", "train.resume=auto",
                                             "train.max_nonfinite_steps=3"])
    batch_path = os.path.join(run, "nonfinite_batch_rank0.pt")
    msg = str(e.value)
    assert "3 non-finite losses in a row at step 3" in msg and batch_path in msg  # skips are not steps
    assert f"{latest} holds the last checkpoint" in msg
    batch = torch.load(batch_path, weights_only=True)  # pixels, or latent moments when cached
    assert batch["label"].shape == (2,) and len(batch) >= 2
    assert all(v.shape[0] == 2 for v in batch.values())
    assert open(latest, "rb").read() == before  # the last good state is untouched
    log = _read(os.path.join(run, "log.txt"))
    assert log.count("non-finite loss or gradient") == 3


def test_full_disk_refuses_to_write_and_keeps_the_checkpoint(tmp_path, random_vae, monkeypatch):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    latest = os.path.join(run, "latest.pth")
    before = open(latest, "rb").read()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 1000, 1000))
    with pytest.raises(UserError, match=rf"not enough free disk space to write {re.escape(latest)}: "
                                        r"0 MiB free.*previous checkpoint is intact"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=4", "train.resume=auto",
                                             "train.checkpoint_every=1"])
    assert open(latest, "rb").read() == before
    assert not [f for f in os.listdir(run) if ".tmp" in f]


def test_disk_full_while_writing_is_a_user_error(tmp_path, random_vae, monkeypatch):
    """No previous checkpoint to size the free-space check by: the write itself fails (ENOSPC)."""
    import errno

    def no_space(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match=r"could not write .*latest.pth \(No space left on device\)"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=2", "data.cache='off'"])
    assert not [f for f in os.listdir(os.path.join(tmp_path, "run")) if ".pth" in f]  # no debris
