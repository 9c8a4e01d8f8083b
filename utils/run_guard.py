"""A run directory has one owner, and a failing run saves its work before it stops.

`RunLock`: `<run_dir>/.lock`, created atomically (O_CREAT | O_EXCL) holding the owner's PID,
host and start time. A second training on the same directory is refused at once, naming
that process. A lock whose process is gone (killed with -9, a crashed machine) is stale:
it is replaced with a note. Released on exit (normal, by exception, or at interpreter exit).

`save_before_fail`: any exception that ends training after step 1 first writes latest.pth,
when the state is sound (finite weights) and newer than the last checkpoint, then records the
error in log.txt; the exception then goes on to the entry script (a user error exits 2
without a traceback).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

from utils.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(run_dir):` owns run_dir for the block; `enabled=False` (ranks > 0) is a no-op."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held = False
        self.note: Optional[str] = None  # set when a stale lock was replaced

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(2):  # a stale lock is removed once, then taken like a fresh one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            atexit.register(self.release)
            return
        raise UserError(f"could not take the lock {self.path}: another process took it at the same "
                        "moment. Wait for that run, or pick another experiment.name.")

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        with contextlib.suppress(FileNotFoundError):
            if read_owner(self.path).get("pid") == os.getpid():
                os.remove(self.path)

    def _refuse_or_clear(self) -> None:
        owner = read_owner(self.path)
        pid, host = owner.get("pid"), owner.get("host")
        if owner and host == socket.gethostname() and not process_alive(pid):
            self.note = (f"removed a stale lock {self.path} (process {pid}, started "
                         f"{owner.get('started')}, is gone)")
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return
        if not owner:  # empty or unreadable: a writer killed between create and write
            age = time.time() - os.path.getmtime(self.path) if os.path.exists(self.path) else 0
            if age > 60:
                self.note = f"removed an unreadable lock {self.path} ({age:.0f} s old)"
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                return
        where = f"process {pid} on {host}" if owner else "another process"
        since = f" since {owner['started']}" if owner.get("started") else ""
        raise UserError(
            f"run directory {self.run_dir} is in use by {where}{since} (lock file {self.path}). "
            "Two runs in one directory would overwrite each other's latest.pth, log.txt and "
            "TensorBoard files. Wait for it to finish or stop it, or pick another experiment.name. "
            f"If that process does not exist any more, delete {self.path}.")


def read_owner(path: str) -> dict:
    """The lock's {pid, host, started}, or {} when it cannot be read."""
    try:
        with open(path) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}


def process_alive(pid: Optional[int]) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # no signal sent: only asks whether the process exists
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def weights_finite(parameters: Iterable[torch.Tensor]) -> bool:
    """True when every tensor is free of NaN and Inf (one host sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in parameters]
    return bool(torch.stack(flags).all()) if flags else True


@contextlib.contextmanager
def save_before_fail(save: Callable[[], None], step: Callable[[], int], saved_step: Callable[[], int],
                     sound: Callable[[], bool], log, latest: str) -> Iterator[None]:
    """On an exception: write latest.pth first (when step() > saved_step() and sound()), then
    record the error in log.txt and re-raise. `log`: the run's RunLogger."""
    try:
        yield
    except Exception as e:
        note = _save_for(save, step(), saved_step(), sound, latest)
        log.info(f"error at step {step()}: {type(e).__name__}: {e}", echo=False)  # the terminal gets it from the entry script
        log.info(note)
        raise


def _save_for(save: Callable[[], None], step: int, saved: int, sound: Callable[[], bool],
              latest: str) -> str:
    if step < 1 or step <= saved:
        return (f"nothing new to save: {latest} holds step {saved}" if saved >= 1
                else "no step was completed, so there is nothing to save")
    if not sound():
        return (f"not saved: the weights at step {step} hold NaN or Inf; {latest} keeps step "
                f"{saved} (continue from it with train.resume=auto)")
    try:
        save()
    except Exception as e:  # noqa: BLE001 - the original error matters more; say why this failed
        return f"could not save step {step} before stopping ({type(e).__name__}: {e})"
    return f"saved step {step} to {latest} before stopping; continue with train.resume=auto"
