"""How a training stage ended, in one line a user can act on.

A time limit keeps a run short, and on a slower machine it silently trades the result away.
So each stage ends with an outcome line that says what stopped it (its planned steps, its
quality target, the time limit or a signal) and what the result is worth, e.g.

    stage 1: stopped by the time limit (train.time_limit_minutes = 4) at step 454 of 1600:
    held-out PSNR 25.1 dB, below the 30 dB target; ...; rerun with train.time_limit_minutes=15

The line goes to log.txt and to `<run>/outcome.txt`, which demo.sh prints again at its end.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from training.common import StopReason  # the one enum of stop reasons (training/common.py)

OUTCOME_FILE = "outcome.txt"  # <run>/outcome.txt: the last run's outcome line
RERUN_MARGIN = 1.15  # a suggested time limit leaves 15% for a machine that slows down


def minutes_for(limit_minutes: float, steps_done: int, steps_planned: int) -> int:
    """A time limit (whole minutes) under which `steps_planned` steps fit at the pace that
    fitted `steps_done` into `limit_minutes` (startup included), with a margin."""
    pace = limit_minutes / max(steps_done, 1)  # minutes per step, startup spread over them
    return math.ceil(pace * steps_planned * RERUN_MARGIN)


def _time_limited(limit_minutes: Optional[float], step: int, total: int) -> str:
    return (f"stopped by the time limit (train.time_limit_minutes = {limit_minutes:g}) at step "
            f"{step} of {total}")


def stage1_outcome(reason: StopReason, step: int, total: int, psnr: float,
                   target: Optional[float], limit_minutes: Optional[float]) -> str:
    """Stage 1's line. `psnr`: the final held-out PSNR (dB); `target`: train.target_psnr."""
    measured = f"held-out PSNR {psnr:.1f} dB"
    if target is None:
        judged = f"{measured} (no train.target_psnr set to judge it by)"
    elif psnr >= target:
        judged = f"{measured}, at or above the {target:g} dB target"
    else:
        judged = (f"{measured}, below the {target:g} dB target; the VAE's reconstructions are "
                  "blurred, and so will be stage 2's samples")
    if reason is StopReason.TARGET:
        return f"stage 1: reached its quality target at step {step} of at most {total}: {judged}"
    if reason is StopReason.TIME_LIMIT:
        short = target is None or psnr < target
        advice = (f"; rerun with train.time_limit_minutes={minutes_for(limit_minutes, step, total)} "
                  "(or null) to allow its step cap" if short else "")
        return f"stage 1: {_time_limited(limit_minutes, step, total)}: {judged}{advice}"
    advice = ("; raise train.max_steps (delete the run directory to start over)"
              if target is not None and psnr < target else "")
    return f"stage 1: ran its {step} planned steps: {judged}{advice}"


def stage2_outcome(reason: StopReason, step: int, total: int, val_losses: list[float],
                   limit_minutes: Optional[float]) -> str:
    """Stage 2's line. `val_losses`: val/loss (EMA) at each validation, oldest first."""
    if val_losses:
        loss = f"val/loss {val_losses[-1]:.4f}" + (f" (first {val_losses[0]:.4f})" if len(val_losses) > 1 else "")
    else:
        loss = "no val/loss measured (validation.loss_clips = 0 or no validation)"
    if reason is StopReason.TIME_LIMIT:
        done = 100 * step / max(total, 1)
        return (f"stage 2: {_time_limited(limit_minutes, step, total)} ({done:.0f}% of the planned "
                f"steps): {loss}; a model trained for fewer steps gives fewer coherent samples; "
                f"rerun with train.time_limit_minutes={minutes_for(limit_minutes, step, total)} (or null) "
                "in a new run directory (delete it or set experiment.name) to train all of them")
    return f"stage 2: ran its {step} planned steps: {loss}"


def signal_outcome(stage: int, step: int, total: int) -> str:
    return (f"stage {stage}: stopped by a signal at step {step} of {total}; latest.pth is saved: "
            "continue with train.resume=auto (the same command)")


def write_outcome(run_dir: str, line: str) -> None:
    """`<run_dir>/outcome.txt` := `line` (temp file, then rename: never half a line)."""
    path = os.path.join(run_dir, OUTCOME_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, path)
