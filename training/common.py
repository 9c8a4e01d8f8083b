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

from data.videos import DataWarning
from training.checkpoints import ensure_writable_dir, resolve_resume
from utils.checkpoint import capture_rng, restore_rng
from utils.cli import parse_args
from utils.config import dump_config, load_config
from utils.dist import DistInfo, cleanup, gather_objects, init_distributed
from utils.errors import UserError
from utils.logging import RunLogger
from utils.run_guard import RunLock
from utils.train_utils import global_seed, lr_multiplier, noise_seed, seed_everything, setup_runtime


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
    started = time.monotonic()  # train.time_limit_minutes counts from here, startup included
    config_path, overrides, flags = parse_args(argv, doc, flags=("resume",))
    if flags["resume"]:
        overrides.append(f"train.resume={flags['resume']}")
    cfg = load_config(config_cls, config_path, overrides)
    dist = init_distributed(cfg.device)
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
                     log: RunLogger) -> Position:
    """The data position of a checkpoint; with another world size, batch size or number of
    training windows (clips added or removed) the rest of the epoch cannot be found again, so
    training continues from the next epoch. `num_items`: windows in the training set now."""
    pos = Position(ckpt["step"], ckpt["epoch"], ckpt["micro"])
    changed = [what for what, was, now in (
        ("world size", ckpt["world_size"], dist.world_size), ("batch size", ckpt["batch_size"], batch_size),
        ("number of training windows", ckpt.get("num_items", num_items), num_items)) if was != now]
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
        per = f" ({per_rank} per process over {dist.world_size} processes)" if dist.world_size > 1 else ""
        raise UserError(f"the dataset has {num_items} items{per}, fewer than one batch of "
                        f"{tcfg.batch_size}; lower train.batch_size, or add clips / lower "
                        "data.window_stride to get more windows")
    if batches < accum_steps:
        raise UserError(f"one epoch has {batches} batches, fewer than train.grad_accum_steps = "
                        f"{accum_steps}; lower it or train.batch_size")
    return batches // accum_steps


# ----------------------------------------------------------------------------- time and LR


class Deadline:
    """`train.time_limit_minutes`, counted from `started` (the launch, startup included).

    The LR schedule reads `position()`: the step, or further when the time limit will stop
    the run before `total_steps`, so that a slow machine still anneals the LR by the deadline.
    """

    def __init__(self, started: float, minutes: Optional[float]):
        self.end = started + 60 * minutes if minutes else math.inf
        self.minutes = minutes
        self.loop_start = time.monotonic()

    def begin(self) -> None:
        """The loop starts now: the time-based schedule position counts from here."""
        self.loop_start = time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def position(self, step: int, total_steps: int) -> float:
        if self.end == math.inf:
            return step
        elapsed = (time.monotonic() - self.loop_start) / max(self.end - self.loop_start, 1e-9)
        return max(step, total_steps * elapsed)


def make_lr_schedule(optimizer: torch.optim.Optimizer, tcfg, total_steps: int,
                     deadline: Deadline) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then `tcfg.lr_schedule` (cosine to `min_lr_ratio` x lr, or constant) over
    `total_steps`, at the deadline-aware position. `tcfg`: a stage's train config."""
    def multiplier(step: int) -> float:  # a closure: LambdaLR's state_dict leaves it out
        return lr_multiplier(deadline.position(step, total_steps), warmup_steps=tcfg.warmup_steps,
                             total_steps=total_steps, schedule=tcfg.lr_schedule,
                             min_lr_ratio=tcfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ----------------------------------------------------------------------------- the step


class StepOutcome(enum.Enum):
    STEPPED = "stepped"
    SCALER_SKIPPED = "scaler_skipped"  # fp16: the GradScaler found inf/NaN gradients and lowered its scale
    NONFINITE = "nonfinite"  # NaN/Inf loss (or gradient without a scaler): update skipped


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   loss: torch.Tensor, grad_clip: Optional[float]) -> tuple[StepOutcome, torch.Tensor]:
    """Unscale, clip, step, update the scaler, zero the gradients. Returns (outcome, grad norm).

    Only STEPPED is a step: the caller advances the step count, LR schedule and EMA on it
    alone. One host sync per step (`bool(finite)`); with fp16 one more, the scale read that
    tells a step the GradScaler skipped (its own `step` syncs as well).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf)
    # With a scaler, inf gradients are its business (it skips the step and lowers the scale).
    finite = torch.isfinite(loss).all() & (torch.isfinite(grad_norm) | scaler.is_enabled())
    if not bool(finite):
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
    """Counts NaN/Inf updates in a row; after `limit` it saves the batch and stops with a message."""

    def __init__(self, limit: int, run_dir: str, rank: int, log: RunLogger):
        self.limit, self.run_dir, self.rank, self.log = limit, run_dir, rank, log
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
        path = os.path.join(self.run_dir, f"nonfinite_batch_rank{self.rank}.pt")
        torch.save({k: v for k, v in batch.items() if torch.is_tensor(v)}, path)
        raise UserError(f"{self.limit} non-finite losses in a row at step {step}: stopped. The "
                        f"offending batch is saved in {path}; {checkpoint_note}. Try a lower "
                        "train.lr, train.grad_clip, or train.precision=fp32 / bf16.")


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
