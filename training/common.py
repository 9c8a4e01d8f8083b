"""The machinery both training stages share: the run directory and resume rules, the time
limit and LR schedule, the optimizer step with its non-finite guard and fp16 loss scaling,
the out-of-memory message, and per-rank RNG states in checkpoints.

Stage 1 (`training/stage1.py`) and stage 2 (`training/stage2.py`) differ in their model and
loss; what happens around a step is written here once.
"""
from __future__ import annotations

import enum
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from data.loader import fewer_than_one_batch, set_epoch
from data.videos import DataWarning
from training.checkpoints import ensure_writable_dir, resolve_resume
from utils.checkpoint import capture_rng, restore_rng
from utils.cli import parse_args
from utils.config import dump_config, load_config
from utils.dist import DistInfo, all_reduce_max, cleanup, gather_objects, init_distributed, local_tensor
from utils.errors import UserError
from utils.logging import RunLogger
from utils.run_guard import RunLock
from utils.train_utils import (GracefulStop, check_batch_memory, global_seed, lr_multiplier, noise_seed,
                               seed_everything, setup_runtime)


RESUME_HELP = ("checkpoint to continue from: a .pth path, or auto (this run's latest.pth if any); "
               "the same as train.resume=VALUE")


@dataclass
class Position:
    """Where training is: optimizer steps done, epoch, micro-batches consumed in that epoch."""
    step: int = 0
    epoch: int = 0
    micro: int = 0


def run_stage(argv: Optional[list[str]], doc: str, config_cls: type, setup: Callable[..., Any],
              run: Callable[[Any, float], None]) -> int:
    """An entry script's whole life: parse `--config`, overrides and `--resume`; load the
    config; start the process group; take the run directory (lock, resume rule); `setup`
    (every check before heavy work); only then write config.yaml, so a refused run leaves the
    old one; then `run(state, started)`."""
    started = now()  # train.time_limit_minutes counts from here, startup included
    config_path, overrides, flags = parse_args(argv, doc, flags={"resume": RESUME_HELP})
    if flags["resume"]:
        overrides.append(f"train.resume={flags['resume']}")
    cfg = load_config(config_cls, config_path, overrides)
    check_batch_memory(cfg.data, cfg.train.batch_size)  # before anything is allocated
    dist = init_distributed(cfg.device, getattr(cfg.train, "setup_timeout_minutes", None))
    try:
        if not dist.is_main:  # every rank reads the same files: rank 0 reports what it skipped
            warnings.filterwarnings("ignore", category=DataWarning)
        device, dtype = setup_runtime(cfg.device, cfg.experiment.seed, cfg.train.precision,
                                      cfg.train.tf32, dist.local_rank if dist.enabled else None)
        run_dir = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name)
        resume_path, lock = prepare_run(cfg.train.resume, run_dir, dist)
        log = RunLogger(run_dir, enabled=dist.is_main)
        try:
            if lock.note:
                log.info(f"warning: {lock.note}")
            s = setup(cfg, run_dir, dist, device, dtype, log, resume_path, started)
            if dist.is_main:
                dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            run(s, started)
        finally:
            log.close()
            lock.release()
    finally:
        cleanup(dist)
    return 0


def prepare_run(resume: Optional[str], run_dir: str, dist: DistInfo) -> tuple[Optional[str], RunLock]:
    """Before any work: a writable run directory that this run alone owns (rank 0 takes its
    lock; release it when the run ends), then which checkpoint to continue from
    (`train.resume`: null refuses to overwrite an existing run, `auto`, or a path)."""
    lock = RunLock(run_dir, enabled=dist.is_main)
    if dist.is_main:
        ensure_writable_dir(run_dir, "experiment.runs_dir")
        lock.acquire()
    try:
        return resolve_resume(resume, run_dir), lock
    except BaseException:
        lock.release()
        raise


def restore_position(ckpt: dict, dist: DistInfo, batch_size: int, num_items: int,
                     log: RunLogger, buckets: Optional[list] = None) -> Position:
    """The data position of a checkpoint; with another world size, batch size, number of
    training windows (clips added or removed) or buckets the rest of the epoch cannot be found
    again, so training continues from the next epoch. `num_items`: windows in the training set
    now; `buckets`: the run's bucket record (stage 2 with data.buckets)."""
    pos = Position(ckpt["step"], ckpt["epoch"], ckpt["micro"])
    changed = [what for what, was, now in (
        ("world size", ckpt["world_size"], dist.world_size), ("batch size", ckpt["batch_size"], batch_size),
        ("number of training windows", ckpt.get("num_items", num_items), num_items),
        ("buckets", ckpt.get("buckets"), buckets)) if was != now]
    if changed:
        log.info(f"warning: the {' and '.join(changed)} changed since the checkpoint; the data "
                 "position cannot be restored exactly, continuing from the next epoch")
        pos = Position(pos.step, pos.epoch + (pos.micro > 0), 0)
    return pos


def check_epoch(num_items: int, tcfg, dist: DistInfo, accum_steps: int = 1) -> int:
    """Optimizer steps per epoch, refused now (before any cache or model) when an epoch holds
    less than one batch or fewer batches than train.grad_accum_steps. `tcfg`: a train config."""
    per_rank = num_items // dist.world_size
    batches = per_rank // tcfg.batch_size
    if batches == 0:
        raise fewer_than_one_batch(num_items, tcfg.batch_size, dist.world_size)
    if batches < accum_steps:
        raise UserError(f"one epoch has {batches} batches, fewer than train.grad_accum_steps = "
                        f"{accum_steps}; lower it or train.batch_size")
    return batches // accum_steps


# ----------------------------------------------------------------------------- time and LR


def now() -> float:
    """The clock train.time_limit_minutes reads (seconds; one seam, so tests can give the
    processes clocks that disagree)."""
    return time.monotonic()


class Deadline:
    """`train.time_limit_minutes`, counted from `started` (the launch, startup included), on
    this process's clock. Only a hard stop: ranks agree on it through `StepControl`, and the
    LR schedule's end under a time limit is `LRPlan`'s, decided once for all ranks."""

    def __init__(self, started: float, minutes: Optional[float]):
        self.end = started + 60 * minutes if minutes else math.inf
        self.minutes = minutes

    def expired(self) -> bool:
        return now() >= self.end


# The pace that decides LRPlan's end step is timed after the first steps of a launch (a
# compile, caches warming up) over at least this many steps and this share of the time left.
PACE_SKIP_STEPS = 5
PACE_MIN_STEPS = 20
PACE_MIN_FRACTION = 0.05


class LRPlan:
    """The step the LR schedule anneals to.

    Without a time limit, or while it will not bind, that is `total_steps` (max_steps and
    epochs): the schedule is then exactly the step schedule, so a resume is bit-exact. With
    `train.time_limit_minutes`, each rank times its pace after a short warm-up and proposes
    the last step the time left allows; the ranks agree on the smallest proposal once
    (`StepControl`), and if it falls short of `total_steps` it becomes `end_step`: the cosine
    anneals to it and training stops there (the time limit stays a hard stop). The decision is
    saved in the checkpoint; a resume with the same `time_limit_minutes` and step budget keeps
    it, any other budget is planned afresh in the new launch (docs/training.md, "Time limits").
    """

    def __init__(self, tcfg, total_steps: int, deadline: Deadline):
        self.tcfg, self.total_steps, self.deadline = tcfg, total_steps, deadline
        self.end_step = total_steps
        self.decided_at: Optional[int] = None  # the step at which end_step was decided
        self._launch_step = 0
        self._timed_from: Optional[tuple[int, float]] = None  # (step, clock) where timing began

    @property
    def undecided(self) -> bool:
        return self.deadline.minutes is not None and self.decided_at is None

    def multiplier(self, step: int) -> float:
        return lr_multiplier(step, warmup_steps=self.tcfg.warmup_steps, total_steps=self.end_step,
                             schedule=self.tcfg.lr_schedule, min_lr_ratio=self.tcfg.min_lr_ratio)

    def begin(self, step: int) -> None:
        """The loop of this launch starts at `step`: the pace is timed from here on."""
        self._launch_step, self._timed_from = step, None

    def proposal(self, step: int) -> Optional[float]:
        """This rank's estimate of the last step the time limit allows (`step` done so far),
        once it has timed enough steps; None before that, and once decided."""
        if not self.undecided:
            return None
        t = now()
        if self._timed_from is None:
            if step >= self._launch_step + PACE_SKIP_STEPS:
                self._timed_from = (step, t)
            return None
        step0, t0 = self._timed_from
        steps, elapsed = step - step0, t - t0
        if steps < PACE_MIN_STEPS or elapsed <= 0 or elapsed < PACE_MIN_FRACTION * (self.deadline.end - t0):
            return None
        return step + steps / elapsed * max(self.deadline.end - t, 0.0)

    def decide(self, step: int, proposal: float, log: RunLogger) -> None:
        """Every rank, with the same agreed `proposal`: fixes end_step for the rest of the run."""
        self.decided_at = step
        last = max(step, math.floor(proposal))
        if last < self.total_steps:
            self.end_step = last
            log.info(f"time limit: at step {step} the pace allows about {last} steps within "
                     f"train.time_limit_minutes = {self.deadline.minutes} (of {self.total_steps}); "
                     f"the LR anneals to step {last} and training ends there")
        else:
            log.info(f"time limit: at step {step} the pace finishes all {self.total_steps} steps "
                     f"within train.time_limit_minutes = {self.deadline.minutes}; the LR follows "
                     "the step schedule")

    def state_dict(self) -> dict:
        return {"end_step": self.end_step, "decided_at": self.decided_at,
                "total_steps": self.total_steps, "time_limit_minutes": self.deadline.minutes}

    def load_state_dict(self, saved: Optional[dict], log: RunLogger) -> None:
        """Keep a saved decision made for this very budget (time limit and total steps);
        otherwise this launch plans its own (a checkpoint from before plans were saved, too)."""
        if not saved or saved.get("decided_at") is None:
            return
        same = (saved["time_limit_minutes"] == self.deadline.minutes
                and saved["total_steps"] == self.total_steps)
        if same and self.deadline.minutes is not None:
            self.end_step, self.decided_at = saved["end_step"], saved["decided_at"]
            if self.end_step < self.total_steps:
                log.info(f"time limit: continuing the checkpoint's plan: the LR anneals to step "
                         f"{self.end_step} (decided at step {self.decided_at}) and training ends there")
        elif saved["end_step"] < saved["total_steps"]:
            log.info(f"time limit: the checkpoint planned to end at step {saved['end_step']} for "
                     f"train.time_limit_minutes = {saved['time_limit_minutes']} and "
                     f"{saved['total_steps']} steps; this run has {self.deadline.minutes} and "
                     f"{self.total_steps}: the plan is made again")


def make_lr_schedule(optimizer: torch.optim.Optimizer, plan: LRPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then `train.lr_schedule` (cosine to `min_lr_ratio` x lr, or constant) to
    `plan.end_step`. The multiplier is the plan's bound method: LambdaLR's state_dict leaves it
    out, and the plan is checkpointed on its own."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan.multiplier)


def total_steps(tcfg, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: `train.epochs` epochs, or `train.max_steps` if fewer."""
    total = tcfg.epochs * steps_per_epoch
    return min(total, tcfg.max_steps) if tcfg.max_steps else total


# ----------------------------------------------------------------------------- stop decisions


class StopReason(enum.Enum):
    """What ended a stage's loop (its log line; `training/outcome.py` words the outcome)."""
    STEPS = "the step budget (max_steps, epochs)"  # the planned work is done
    TARGET = "the quality target"  # a stage's own goal (stage 1: train.target_psnr), via StepControl.request
    TIME_LIMIT = "the time limit"
    SIGNAL = "a signal"  # SIGINT / SIGTERM: latest.pth saved, continue with train.resume=auto


@dataclass
class Verdict:
    """What every rank agreed at an optimizer step."""
    nonfinite: bool = False  # some rank's loss or gradient was NaN/Inf: no rank updates
    stop: bool = False  # some rank got SIGINT/SIGTERM
    timed_out: bool = False  # some rank's clock passed the time limit
    proposal: Optional[float] = None  # the smallest end-step proposal of the ranks that made one
    target: bool = False  # some rank requested a stop at its quality target (StepControl.request)


class StepControl:
    """Every decision that skips an update or ends training, taken by all ranks together.

    At each optimizer step `agree` combines this rank's finite flag, stop request, time-limit
    expiry, end-step proposal and quality-target request (`request`) into one all-reduce (MAX)
    and one host read: the single host sync of an ordinary step (with one process, the read of
    the finite flag alone). A rank that alone saw a NaN, a signal, its deadline or its target
    therefore never leaves the others waiting in a collective it does not join.
    """

    def __init__(self, dist: DistInfo, device: torch.device, deadline: Deadline, plan: LRPlan,
                 pos: Position, stop: GracefulStop, log: RunLogger):
        self.dist, self.device, self.deadline, self.plan = dist, device, deadline, plan
        self.pos, self.stop, self.log = pos, stop, log
        self.verdict = Verdict()
        self.target_requested = False  # this rank's `request(StopReason.TARGET)`, not yet agreed

    def request(self, reason: StopReason) -> None:
        """A stage's own stop (only StopReason.TARGET: e.g. rank 0 measured its quality target).
        One process stops after the current step; several carry it into the next step's vote
        (no collective of its own), so every rank stops at the same step, one step later."""
        if reason is not StopReason.TARGET:
            raise ValueError(f"StepControl.request takes StopReason.TARGET, not {reason}")
        self.target_requested = True

    def agree(self, finite: torch.Tensor) -> bool:
        """`finite`: this rank's 0-d bool tensor. True when the update may be made on every rank."""
        stop, expired, proposal = self.stop.requested, self.deadline.expired(), self.plan.proposal(self.pos.step)
        if self.dist.enabled:
            # torch.full, not a copy from host memory: on CUDA that would sync before the copy.
            host = [float(stop), float(expired), -math.inf if proposal is None else -proposal,
                    float(self.target_requested)]
            flags = torch.stack([(~finite).to(torch.float64)] + [
                torch.full((), x, dtype=torch.float64, device=self.device) for x in host])
            nonfinite, stop, expired, neg, target = all_reduce_max(flags, self.dist).tolist()
            nonfinite, proposal = nonfinite > 0, None if neg == -math.inf else -neg
            stop, expired, target = stop > 0, expired > 0, target > 0
        else:
            nonfinite, target = not bool(finite), self.target_requested
        self.verdict = Verdict(nonfinite, stop, expired, proposal, target)
        if stop:  # another rank's signal stops this one too; never cleared here: a signal
            self.stop.requested = True  # that arrived during this vote must not be lost
        if proposal is not None and self.plan.undecided:
            self.plan.decide(self.pos.step, proposal, self.log)
        return not nonfinite

    def reason(self) -> Optional[StopReason]:
        """Why the loop must end after the step just agreed (None: go on). One process reads
        its flag and clock afresh (nothing to agree on); several use what they agreed."""
        alone = not self.dist.enabled
        if self.verdict.stop or (alone and self.stop.requested):
            return StopReason.SIGNAL
        if self.verdict.target or (alone and self.target_requested):
            return StopReason.TARGET
        planned_end = self.plan.end_step < self.plan.total_steps and self.pos.step >= self.plan.end_step
        if self.verdict.timed_out or planned_end or (alone and self.deadline.expired()):
            return StopReason.TIME_LIMIT
        if self.pos.step >= self.plan.total_steps:
            return StopReason.STEPS
        return None


# ----------------------------------------------------------------------------- the step


class StepOutcome(enum.Enum):
    STEPPED = "stepped"
    SCALER_SKIPPED = "scaler_skipped"  # fp16: the GradScaler found inf/NaN gradients and lowered its scale
    NONFINITE = "nonfinite"  # NaN/Inf loss (or gradient without a scaler): update skipped


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   loss: torch.Tensor, grad_clip: Optional[float],
                   agree: Callable[[torch.Tensor], bool] = bool) -> tuple[StepOutcome, torch.Tensor]:
    """Unscale, clip, step, update the scaler, zero the gradients. Returns (outcome, grad norm).

    Only STEPPED is a step: the caller advances the step count, LR schedule and EMA on it
    alone. `agree(finite)` decides whether to update: `bool` for one process, else
    `StepControl.agree`, so that every rank takes the same branch. That is the one host sync
    of a step; with fp16 one more, the scale read that tells a step the GradScaler skipped
    (its own `step` syncs as well).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf)
    grad_norm = local_tensor(grad_norm)  # fsdp: a replicated DTensor (the norm over every shard)
    # With a scaler, inf gradients are its business (it skips the step and lowers the scale).
    finite = torch.isfinite(loss).all() & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if not agree(finite):
        if scaler.is_enabled():
            scaler.update()  # unscale_ was called: the scaler must close this iteration
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome.NONFINITE, grad_norm
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if scale is not None and scaler.get_scale() < scale:  # update() lowers the scale iff it skipped
        return StepOutcome.SCALER_SKIPPED, grad_norm
    return StepOutcome.STEPPED, grad_norm


class NonFiniteGuard:
    """Counts NaN/Inf updates in a row; after `limit` it saves the batch and stops with a message.
    Every rank counts the same skips (`StepControl.agree`), so all stop at the same step."""

    def __init__(self, limit: int, run_dir: str, dist: DistInfo, log: RunLogger):
        self.limit, self.run_dir, self.dist, self.log = limit, run_dir, dist, log
        self.in_a_row = 0

    def ok(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, batch: dict, checkpoint_note: str) -> None:
        """The update for step `step` (1-based, not done) was skipped; raises after `limit`."""
        self.in_a_row += 1
        self.log.info(f"warning: non-finite loss or gradient at step {step}; update skipped "
                      f"({self.in_a_row} in a row, stopping at {self.limit})")
        if self.in_a_row < self.limit:
            return
        path = os.path.join(self.run_dir, f"nonfinite_batch_rank{self.dist.rank}.pt")
        torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, path)
        each = " (every process saved its own, nonfinite_batch_rank<R>.pt)" if self.dist.enabled else ""
        raise UserError(f"{self.limit} non-finite losses in a row at step {step}: stopped. The "
                        f"offending batch is saved in {path}{each}; {checkpoint_note}. Try a lower "
                        "train.lr, train.grad_clip, or train.precision=fp32 / bf16.")


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopHooks:
    """What a stage adds to the loop both stages share (`run_epochs`)."""
    # One micro-batch: forward, backward and, when it closes a step, `optimizer_step` with
    # `s.control.agree`. Returns its outcome, or None for a micro-batch that only accumulated.
    train_step: Callable[[dict], Optional[StepOutcome]]
    # After a STEPPED step (s.pos.step already counts it): EMA, log, preview, checkpoint. May
    # return a stage's own StopReason (then the same on every rank), else None; a stop that one
    # rank alone decides (stage 1's quality target) goes to `s.control.request` instead.
    after_step: Callable[[], Optional[StopReason]]
    end_epoch: Callable[[], None] = lambda: None  # after s.pos moved to the next epoch
    start_epoch: Callable[[], None] = lambda: None  # before the epoch's first batch is asked for


def run_epochs(s, hooks: LoopHooks) -> StopReason:
    """Epochs of `s.loader` from `s.pos` until a stop that every rank agreed (`s.control`).

    `s`: a stage's state (cfg.train, run_dir, dist, log, loader, sampler, pos, control). The
    skeleton of both stages: data position, step count, the non-finite guard and the stop
    decisions live here; the stage's model, loss and logging live in `hooks`.
    """
    tcfg = s.cfg.train
    guard = NonFiniteGuard(tcfg.max_nonfinite_steps, s.run_dir, s.dist, s.log)
    s.control.plan.begin(s.pos.step)
    reason = s.control.reason()  # a resume may start at the end
    while reason is None and s.pos.epoch < tcfg.epochs:
        set_epoch(s.loader, s.pos.epoch)  # sampler order and per-item augmentation
        s.sampler.set_start_batch(s.pos.micro, tcfg.batch_size)  # mid-epoch resume: skip what was seen
        hooks.start_epoch()
        for batch in s.loader:
            s.pos.micro += 1
            outcome = hooks.train_step(batch)
            if outcome is None:  # a micro-batch that only accumulated: nothing was agreed
                continue
            if outcome is StepOutcome.NONFINITE:  # not a step: no LR, EMA or step count
                guard.bad(s.pos.step + 1, batch, checkpoint_note(s.run_dir, tcfg.checkpoint_every))
            elif outcome is StepOutcome.STEPPED:
                guard.ok()
                s.pos.step += 1
                reason = hooks.after_step()
            reason = reason or s.control.reason()
            if reason is not None:
                break
        else:
            s.pos.epoch += 1
            s.pos.micro = 0
            hooks.end_epoch()
            reason = s.control.reason()  # e.g. a signal during the epoch's validation
    return reason or StopReason.STEPS


def checkpoint_note(run_dir: str, checkpoint_every: int) -> str:
    """What an error that stops training can promise about latest.pth."""
    path = os.path.join(run_dir, "latest.pth")
    if os.path.exists(path):
        return f"{path} holds the last checkpoint"
    return f"no checkpoint was written yet (train.checkpoint_every = {checkpoint_every})"


def out_of_memory(batch_size: int, device: torch.device, advice: str, note: str) -> UserError:
    """The error a CUDA OOM becomes: the batch, the device, what to change, the last checkpoint."""
    return UserError(f"out of GPU memory at train.batch_size = {batch_size} on {device}. Lower "
                     f"train.batch_size{advice}. {note}.")


def maybe_no_sync(ddp: Optional[torch.nn.parallel.DistributedDataParallel], sync: bool):
    """DDP's `no_sync` for a micro-batch that only accumulates. `ddp` is the DDP module itself,
    not a compiled wrapper around it (which has no `no_sync`); None = not distributed."""
    import contextlib
    if sync or ddp is None:
        return contextlib.nullcontext()
    return ddp.no_sync()


# ----------------------------------------------------------------------------- per-rank RNG


def seed_rank(seed: int, dist: DistInfo, device: torch.device) -> torch.Generator:
    """Once the model is built (identically on every rank): this rank's global RNGs (label
    dropout, frame picks) and its training noise generator, each its own stream."""
    if dist.rank > 0:
        seed_everything(global_seed(seed, dist.rank))
    return torch.Generator(device).manual_seed(noise_seed(seed, dist.rank))


def capture_rank_rng(noise_gen: torch.Generator, dist: DistInfo, gather: bool = True) -> list[dict]:
    """Every rank's RNG states, gathered to all ranks (index = rank); call on every rank.
    `gather=False` (a failing run, whose other ranks may not answer): this rank's alone."""
    mine = {**capture_rng(), "noise_gen": noise_gen.get_state()}
    return gather_objects(mine, dist) if gather else [mine]


def restore_rank_rng(saved: list[dict], noise_gen: torch.Generator, seed: int, dist: DistInfo,
                     log: RunLogger) -> None:
    """Restore this rank's RNG states from a checkpoint's per-rank list (index = rank). Another
    world size has no state for some ranks: every rank is then seeded as at a fresh start, with
    a warning, since the run can no longer repeat an uninterrupted one."""
    if len(saved) != dist.world_size:
        log.info(f"warning: the checkpoint holds the RNG states of {len(saved)} process(es), "
                 f"this run has {dist.world_size}: every process's noise and RNGs are reseeded")
        noise_gen.set_state(seed_rank(seed, dist, noise_gen.device).get_state())
        return
    state = saved[dist.rank]
    restore_rng(state)
    noise_gen.set_state(state["noise_gen"])
