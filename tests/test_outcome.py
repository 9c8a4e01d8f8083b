"""Stopping on work done, not on wall time: stage 1's held-out PSNR target (train.target_psnr,
checked every train.eval_every steps), and the outcome line each stage writes to log.txt and
<run>/outcome.txt saying what stopped it and what the result is worth."""
import os
import re

import pytest
import torch

import train_advanced
import train_vae
from tests.test_stage2 import TINY, random_vae  # noqa: F401 (a fixture)
from tests.test_vae import TINY_OVERRIDES
from training.outcome import (OUTCOME_FILE, StopReason, minutes_for, stage1_outcome,
                              stage2_outcome)
from utils.checkpoint import load_checkpoint
from utils.config import VAERunConfig, load_config
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def _stage1(runs, name, *extra):
    args = ["--config", os.path.join(ROOT, "config_vae.yaml"), *TINY_OVERRIDES,
            "train.time_limit_minutes=null", f"experiment.runs_dir={runs}", f"experiment.name={name}",
            "train.resume=null", *extra]
    assert train_vae.main(args) == 0
    run = os.path.join(runs, name)
    return run, open(os.path.join(run, OUTCOME_FILE)).read().strip(), open(os.path.join(run, "log.txt")).read()


def test_a_reachable_target_stops_stage1_early_with_a_vae(tmp_path):
    """A random autoencoder already beats 3 dB: the first check (step 2) stops the run."""
    run, outcome, log = _stage1(tmp_path, "low", "train.target_psnr=3", "train.eval_every=2",
                                "train.max_steps=50")
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 2
    assert os.path.isfile(os.path.join(run, "vae", "config.json"))
    assert re.search(r"step 2: held-out PSNR [\d.]+ dB over \d+ windows \(train.target_psnr = 3\)", log)
    assert "stopped at step 2 (epoch 0) by the quality target (train.target_psnr = 3.0 dB)" in log
    assert re.fullmatch(r"stage 1: reached its quality target at step 2 of at most 50: held-out PSNR "
                        r"[\d.]+ dB, at or above the 3 dB target", outcome), outcome
    assert outcome in log


def test_an_unreachable_target_runs_to_the_step_cap_and_says_it_fell_short(tmp_path):
    run, outcome, log = _stage1(tmp_path, "high", "train.target_psnr=99", "train.eval_every=2",
                                "train.max_steps=5")
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 5
    checks = re.findall(r"step (\d+): held-out PSNR", log)
    assert checks == ["2", "4"]  # every eval_every steps, not at the cap (the final report is there)
    assert "by the step budget" in log
    assert re.fullmatch(r"stage 1: ran its 5 planned steps: held-out PSNR [\d.]+ dB, below the 99 dB "
                        r"target; .*blurred.*; raise train.max_steps .*", outcome), outcome


def test_the_quality_check_does_not_change_what_is_learned(tmp_path):
    """Checking every step (eval mode, posterior means) draws no RNG and leaves the weights,
    optimizer and noise generator exactly as a run without checks."""
    a, _, _ = _stage1(tmp_path, "checked", "train.target_psnr=99", "train.eval_every=1", "train.max_steps=3")
    b, _, log = _stage1(tmp_path, "plain", "train.max_steps=3")
    assert "held-out PSNR" in log and not re.search(r"step \d+: held-out PSNR", log)  # no checks: off
    ca, cb = (load_checkpoint(os.path.join(r, "latest.pth")) for r in (a, b))
    for k, v in ca["model_state"].items():
        assert torch.equal(v, cb["model_state"][k]), k
    assert torch.equal(ca["rng"][0]["noise_gen"], cb["rng"][0]["noise_gen"])


@pytest.fixture
def fake_clock(monkeypatch):
    """`training.common.now` (the clock train.time_limit_minutes reads, counted from launch)
    advances 1 s per read: a 0.5-minute limit ends a run after some steps on any machine."""
    from training import common
    reads = [0]

    def fake_now():
        reads[0] += 1
        return float(reads[0])
    monkeypatch.setattr(common, "now", fake_now)


def test_stage1_stopped_by_the_time_limit_says_what_the_vae_is_worth(tmp_path, fake_clock):
    """A limit that ends the run after some steps: the line names the limit, the steps done of
    the cap, the PSNR against the target and a limit that would fit the cap."""
    run, outcome, log = _stage1(tmp_path, "slow", "train.time_limit_minutes=0.5",
                                "train.target_psnr=99", "train.max_steps=50")
    step = load_checkpoint(os.path.join(run, "latest.pth"))["step"]
    assert 1 <= step < 50, log
    m = re.fullmatch(rf"stage 1: stopped by the time limit \(train.time_limit_minutes = 0.5\) at step {step} "
                     r"of 50: held-out PSNR ([\d.]+) dB, below the 99 dB target; the VAE's reconstructions "
                     r"are blurred, and so will be stage 2's samples; rerun with "
                     r"train.time_limit_minutes=(\d+) \(or null\) to allow its step cap", outcome)
    assert m, outcome
    assert int(m.group(2)) == minutes_for(0.5, step, 50)
    assert outcome in log


def _stage2(runs, vae, name, *extra):
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={runs}", f"experiment.name={name}", "validation.every_epochs=100",
            "validation.loss_clips=2", *extra]
    assert train_advanced.main(args) == 0
    return (runs / name / OUTCOME_FILE).read_text().strip(), (runs / name / "log.txt").read_text()


def test_stage2_stopped_by_the_time_limit_reports_steps_and_val_loss(tmp_path, random_vae,  # noqa: F811
                                                                    fake_clock):
    outcome, log = _stage2(tmp_path, random_vae, "slow", "train.max_steps=40", "train.time_limit_minutes=0.5")
    m = re.fullmatch(r"stage 2: stopped by the time limit \(train.time_limit_minutes = 0.5\) at step (\d+) "
                     r"of 40 \((\d+)% of the planned steps\): val/loss ([\d.]+); a model trained for fewer "
                     r"steps gives fewer coherent samples; rerun with train.time_limit_minutes=(\d+) \(or null\) "
                     r"in a new run directory .*", outcome)
    assert m and 1 <= int(m.group(1)) < 40, outcome
    step = int(m.group(1))
    assert int(m.group(2)) == round(100 * step / 40) and int(m.group(4)) == minutes_for(0.5, step, 40)
    assert f"val/loss {m.group(3)}" in log and outcome in log

    # Run to its planned steps: the line says so (no time limit to blame).
    outcome, _ = _stage2(tmp_path, random_vae, "full", "train.max_steps=2", "train.time_limit_minutes=null")
    assert re.fullmatch(r"stage 2: ran its 2 planned steps: val/loss [\d.]+", outcome), outcome


def test_outcome_lines_for_each_ending():
    assert minutes_for(4.0, 454, 1600) == 17  # 4 min for 454 steps -> 1600 steps need 14.1, +15%
    line = stage1_outcome(StopReason.TIME_LIMIT, 454, 1600, 25.14, 30.0, 4.0)
    assert line.startswith("stage 1: stopped by the time limit (train.time_limit_minutes = 4) at step 454 "
                           "of 1600: held-out PSNR 25.1 dB, below the 30 dB target")
    assert line.endswith("rerun with train.time_limit_minutes=17 (or null) to allow its step cap")
    good = stage1_outcome(StopReason.TIME_LIMIT, 1500, 1600, 31.0, 30.0, 4.0)
    assert good.endswith("held-out PSNR 31.0 dB, at or above the 30 dB target")  # nothing to fix
    assert "no train.target_psnr set" in stage1_outcome(StopReason.STEPS, 10, 10, 20.0, None, None)
    line = stage2_outcome(StopReason.TIME_LIMIT, 5979, 12000, [0.281, 0.131], 11)
    assert line.startswith("stage 2: stopped by the time limit (train.time_limit_minutes = 11) at step 5979 "
                           "of 12000 (50% of the planned steps): val/loss 0.1310 (first 0.2810)")
    assert "train.time_limit_minutes=26 (or null)" in line
    assert stage2_outcome(StopReason.STEPS, 12000, 12000, [], 11) == (
        "stage 2: ran its 12000 planned steps: no val/loss measured (validation.loss_clips = 0 or no validation)")


@pytest.mark.parametrize("override, words", [
    ("train.target_psnr=0", ["train.target_psnr = 0", "> 0", "null"]),
    ("train.eval_every=0", ["train.eval_every = 0", ">= 1"]),
])
def test_bad_target_keys_are_refused_by_name(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(VAERunConfig, os.path.join(ROOT, "config_vae.yaml"), [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow  # one 2-process stage-1 run: ~15 s
def test_the_target_stops_every_rank_under_torchrun(tmp_path):
    """Rank 0 measures at step 2; its answer reaches rank 1 in the next step's stop vote
    (StepControl's one all-reduce, no collective of its own): both stop at step 3, no rank
    waits for the other forever."""
    import subprocess
    import sys
    from tests.test_ddp import _free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "train_vae.py",
           "--config", "config_vae.yaml", *TINY_OVERRIDES, "data.builtin.num_clips=8",
           "train.max_steps=50", "train.time_limit_minutes=null", "train.target_psnr=3",
           "train.eval_every=2", f"experiment.runs_dir={tmp_path}", "experiment.name=vae", "train.resume=null"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(os.path.join(tmp_path, "vae", "latest.pth"))
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    log = (tmp_path / "vae" / "log.txt").read_text()
    assert re.findall(r"step (\d+): held-out PSNR", log) == ["2"]  # rank 0 measured once
    outcome = (tmp_path / "vae" / OUTCOME_FILE).read_text()
    assert outcome.startswith("stage 1: reached its quality target at step 3 of at most 50")


def test_a_target_request_is_a_stop_reason_of_the_step_vote():
    """StepControl.request(TARGET): one process stops at once; a signal still wins (latest.pth
    and a resume hint, not a finished VAE); other reasons are refused."""
    from training.common import Deadline, LRPlan, Position, StepControl
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    from utils.train_utils import GracefulStop

    def control():
        deadline = Deadline(0.0, None)
        stop = GracefulStop()
        return StepControl(DistInfo(), torch.device("cpu"), deadline, LRPlan(None, 10, deadline),
                           Position(step=3), stop, RunLogger(None)), stop

    c, stop = control()
    assert c.agree(torch.tensor(True)) and c.reason() is None
    c.request(StopReason.TARGET)
    assert c.reason() is StopReason.TARGET
    assert c.agree(torch.tensor(True)) and c.verdict.target  # the next vote carries it too
    stop.requested = True
    assert c.reason() is StopReason.SIGNAL
    with pytest.raises(ValueError, match="TARGET"):
        control()[0].request(StopReason.TIME_LIMIT)


def test_a_signal_during_the_step_vote_is_not_lost():
    """SIGTERM landing inside StepControl.agree, after it read the stop flag: the vote must not
    write its stale False over the flag the handler set (the run then trained on, ignoring the
    signal, until something killed it)."""
    from training.common import Deadline, LRPlan, Position, StepControl
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    from utils.train_utils import GracefulStop

    stop = GracefulStop()

    class SignalMidVote(Deadline):
        def expired(self) -> bool:  # read by agree() after the stop flag: the handler runs here
            stop.requested = True
            return False

    deadline = SignalMidVote(0.0, None)
    c = StepControl(DistInfo(), torch.device("cpu"), deadline, LRPlan(None, 10, deadline),
                    Position(step=3), stop, RunLogger(None))
    assert c.agree(torch.tensor(True))
    assert stop.requested and c.reason() is StopReason.SIGNAL
