"""Stop and schedule decisions that every process takes together (issue 18, defects 1, 2, 8).

- Under a time limit the LR schedule's end step is decided once, from the pace, identically
  on every rank even when their clocks disagree; saved in the checkpoint and kept on resume.
- A time limit that does not bind leaves the schedule exactly the step schedule.
- A NaN loss on one rank alone stops every rank at the same step with the same message.

The multi-process tests launch one process per rank with the environment torchrun (or srun)
sets, through tests/ddp_hooks.py, which installs the test hooks (a skewed clock, a NaN loss).
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

import training.common as common
import training.stage2 as stage2
import utils.train_utils as train_utils
from tests.test_ddp import _free_port
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint

HOOKS = os.path.join(ROOT, "tests", "ddp_hooks.py")
STEP, EMA_UPDATE = stage2._optimizer_step, train_utils.EMA.update  # unpatched, whatever a test patched
PROCESS_TIMEOUT = 300  # s: far below gloo's 30-minute collective timeout, so a hang fails


def _launch(world_size, hooks, out, overrides):
    """One process per rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT): no launcher that would kill
    the others when one exits. Returns [(exit code, output)] by rank."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, HOOKS, str(out), hooks, *overrides], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=PROCESS_TIMEOUT)
            results.append((p.returncode, text))
    finally:
        for p in procs:
            p.kill()
    return results


def _args(tmp_path, vae, name, extra=()):
    return [*TINY, f"vae.path={vae}", f"experiment.runs_dir={tmp_path}", f"experiment.name={name}",
            "data.builtin.num_clips=16", "train.checkpoint_every=1000", *extra]


@pytest.mark.slow  # one 2-process run: ~20 s
def test_time_limited_schedule_is_one_schedule_on_every_rank(tmp_path, random_vae):  # noqa: F811
    """Rank 1's clock runs 1.3x rank 0's: each rank's own clock would give it its own LR (and
    its own weights, since DDP never re-syncs them). The end step is agreed once instead."""
    out = tmp_path / "lr"
    results = _launch(2, "clock", out, _args(tmp_path, random_vae, "run", [
        "train.max_steps=40", "train.time_limit_minutes=0.5", "train.warmup_steps=2"]))
    for code, text in results:
        assert code == 0, text[-3000:]
    r0, r1 = (torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1))
    plan = r0["plan"]
    assert plan == r1["plan"]
    assert plan["decided_at"] is not None and plan["end_step"] < 40  # the limit binds
    assert r0["lr"] == r1["lr"]  # every update, same LR on both ranks
    assert len(r0["lr"]) == plan["end_step"]  # training ends at the planned step
    assert r0["lr"][-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(
        torch.pi * (plan["end_step"] - 1 - 2) / (plan["end_step"] - 2))).item())))  # annealed to it
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), f"{name} differs between the ranks"
    ckpt = load_checkpoint(os.path.join(tmp_path, "run", "latest.pth"))
    assert ckpt["step"] == plan["end_step"] and ckpt["lr_plan"] == plan
    log = open(os.path.join(tmp_path, "run", "log.txt")).read()
    assert f"the LR anneals to step {plan['end_step']} and training ends there" in log


@pytest.mark.slow  # one 2-process run: ~20 s
def test_nan_on_one_rank_stops_every_rank_together(tmp_path, random_vae):  # noqa: F811
    """fp16 loss scaling on, rank 1 alone sees NaN losses: rank 0's scaler merely skips. Every
    rank counts the same non-finite steps and stops at the same one, with the same message,
    instead of rank 0 waiting for rank 1 in the next all-reduce."""
    results = _launch(2, "nan1", tmp_path / "nan", _args(tmp_path, random_vae, "run", [
        "train.max_steps=20", "train.max_nonfinite_steps=3", "train.time_limit_minutes=null"]))
    for rank, (code, text) in enumerate(results):
        assert code == 2, f"rank {rank}: {text[-3000:]}"
        assert "error: 3 non-finite losses in a row at step 1: stopped" in text, f"rank {rank}: {text[-3000:]}"
        assert os.path.isfile(os.path.join(tmp_path, "run", f"nonfinite_batch_rank{rank}.pt"))
        assert "Traceback" not in text


# ----------------------------------------------------------------------------- one process


def _fake_clock(monkeypatch):
    """`training.common.now` advances 1 s per read; the plan is timed after 1 step over 3."""
    reads = [0]

    def fake_now():
        reads[0] += 1
        return float(reads[0])
    monkeypatch.setattr(common, "now", fake_now)
    monkeypatch.setattr(common, "PACE_SKIP_STEPS", 1)
    monkeypatch.setattr(common, "PACE_MIN_STEPS", 3)
    monkeypatch.setattr(common, "PACE_MIN_FRACTION", 0.0)


def _train(tmp_path, vae, name, extra, monkeypatch, interrupt_at=None):
    """In-process stage 2; returns (LR of each update, final checkpoint, log text). With
    `interrupt_at`: SIGINT after that step (the run saves and stops there)."""
    import train_advanced
    lrs, original_step, original_update = [], STEP, EMA_UPDATE

    def spy_step(s, stats, per_sample):
        lrs.append(s.optimizer.param_groups[0]["lr"])
        return original_step(s, stats, per_sample)

    def update(self, model, step):
        original_update(self, model, step)
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(stage2, "_optimizer_step", spy_step)
    monkeypatch.setattr(train_utils.EMA, "update", update)
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *_args(tmp_path, vae, name, extra)]
    assert train_advanced.main(args) == 0
    run = os.path.join(tmp_path, name)
    return lrs, load_checkpoint(os.path.join(run, "latest.pth")), open(os.path.join(run, "log.txt")).read()


def _same_weights(a, b):
    for key in ("model_state", "ema_state"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"


def test_resumed_time_limited_run_keeps_its_planned_end(tmp_path, random_vae, monkeypatch):  # noqa: F811
    """A binding time limit: the uninterrupted run plans its end at step E. A run stopped
    after the decision and resumed (a new launch, whose clock starts afresh) continues the
    same cosine to the same E: the same LR at every update and the same final weights."""
    _fake_clock(monkeypatch)
    limit = ["train.max_steps=60", "train.time_limit_minutes=1", "train.warmup_steps=2"]
    lr_a, a, _ = _train(tmp_path, random_vae, "a", limit, monkeypatch)
    end = a["lr_plan"]["end_step"]
    assert 8 < end < 60 and a["step"] == end
    lr_b1, b1, _ = _train(tmp_path, random_vae, "b", limit, monkeypatch, interrupt_at=7)
    assert b1["step"] == 7 and b1["lr_plan"]["end_step"] == end  # decided before the stop
    lr_b2, b, log = _train(tmp_path, random_vae, "b", limit + ["train.resume=auto"], monkeypatch)
    assert "continuing the checkpoint's plan: the LR anneals to step" in log
    assert lr_b1 + lr_b2 == lr_a  # no jump back up at the resume
    assert b["step"] == end
    _same_weights(a, b)


def test_non_binding_time_limit_is_the_step_schedule_and_resumes_exactly(tmp_path, random_vae,
                                                                         monkeypatch):  # noqa: F811
    """A time limit that the run finishes within: the same LRs and weights as no time limit
    at all, and a run stopped mid-way and resumed ends bit-identical to both."""
    steps = ["train.max_steps=9", "train.warmup_steps=2"]
    lr_none, none, _ = _train(tmp_path, random_vae, "none", steps + ["train.time_limit_minutes=null"],
                              monkeypatch)
    _fake_clock(monkeypatch)
    limit = steps + ["train.time_limit_minutes=600"]
    lr_a, a, log = _train(tmp_path, random_vae, "a", limit, monkeypatch)
    assert "the pace finishes all 9 steps within train.time_limit_minutes = 600" in log
    assert a["lr_plan"]["end_step"] == 9 and a["lr_plan"]["decided_at"] is not None
    assert lr_a == lr_none
    _same_weights(none, a)
    lr_b1, _, _ = _train(tmp_path, random_vae, "b", limit, monkeypatch, interrupt_at=6)
    lr_b2, b, _ = _train(tmp_path, random_vae, "b", limit + ["train.resume=auto"], monkeypatch)
    assert lr_b1 + lr_b2 == lr_none and b["step"] == 9
    _same_weights(none, b)
