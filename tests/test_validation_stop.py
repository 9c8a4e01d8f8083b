"""SIGTERM during validation is honoured at once (issue 18, defect 15): Slurm and Kubernetes
kill 30 s after SIGTERM, so a stop that waits for validation to end loses the run since the
last checkpoint. latest.pth is written before validation starts, and a signal ends it."""
import os
import signal
import time

from tests.test_fault_tolerance import STARTUP_TIMEOUT, _read, _start
from tests.test_stage2 import random_vae  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint

PROMPT = 20  # s from SIGTERM to exit: validation here takes minutes, a step far less


def test_sigterm_during_validation_saves_and_exits_promptly(tmp_path, random_vae):  # noqa: F811
    # The final validation of a 2-step run: 64 videos x 1000 ddpm steps, minutes of sampling.
    proc, out = _start(tmp_path, random_vae, "run", [
        "train.max_steps=2", "train.checkpoint_every=1000", "validation.every_epochs=1000",
        "validation.num_videos=64", "validation.sampler=ddpm", "validation.num_steps=1000",
        "validation.loss_clips=0", "train.time_limit_minutes=null"])
    run = os.path.join(tmp_path, "run")
    latest = os.path.join(run, "latest.pth")
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(latest):  # written just before the validation starts
            assert proc.poll() is None, _read(os.path.join(tmp_path, "run.out"))
            assert time.monotonic() < deadline, "no checkpoint within the timeout"
            time.sleep(0.05)
        time.sleep(2)  # well inside the sampling
        assert proc.poll() is None, "the validation ended before the signal: make it slower"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        out.close()
    text = _read(os.path.join(tmp_path, "run.out"))
    assert code == 0, text
    assert took < PROMPT, f"exited {took:.1f} s after SIGTERM"
    assert "stop requested during the validation at step 2: the rest of it is skipped" in text
    assert "stopped by signal during the final validation" in text
    assert load_checkpoint(latest)["step"] == 2
    assert "Traceback" not in text
