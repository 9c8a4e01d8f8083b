"""Checkpoints: plain dicts (tensors, numbers, strings), written atomically, read safely.

Atomic: the dict goes to a temp file in the same directory, is fsynced, then `os.replace`d
over the target, so a crash or `kill -9` at any moment leaves the previous file intact.
Safe: always `torch.load(..., weights_only=True)`: nothing in a checkpoint is executed.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

from utils.errors import MissingFileError, UserError
from utils.paths import remove_file

MIN_FREE_BYTES_FACTOR = 2  # need this many times the last checkpoint's size free on disk


def atomic_save(obj: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _check_free_space(path, directory)
    _remove_stale_temps(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error: the user's to fix
        # torch's zip writer reports a failed write as RuntimeError ("file write failed").
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e).strip().splitlines()[-1]
        free = _free_bytes(directory)
        raise UserError(f"could not write {path} ({why}). {free / 2**20:.0f} MiB are free on that "
                        "disk: it may be full, or the directory not writable; free some space or fix "
                        "the directory. The previous file, if any, is intact.") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    fsync_dir(directory)


RESUME_KEY = "train.resume"


def checkpoint_advice(key: str = RESUME_KEY) -> str:
    """What to do about a checkpoint that cannot be used, for the setting `key` that named it:
    a training run may start fresh; predict, evaluate and the tools have no run to start."""
    if key == RESUME_KEY:
        return ("Use another checkpoint (e.g. an epoch_XXXX.pth of the run), or start fresh in a new "
                "run directory (another experiment.name).")
    return f"Point {key} at another checkpoint (e.g. an epoch_XXXX.pth of the same run)."


def load_checkpoint(path: str, map_location: Any = "cpu", key: str = RESUME_KEY, shards: bool = True) -> dict:
    """The plain dict at `path` (weights_only); `key`: the setting that named it, whose own
    advice a bad file's message gives. One whose tensors live in a sharded directory (its
    `sharded` entry: written under train.parallel=fsdp, utils/sharded_checkpoint.py) comes back
    with them read in, whole, like any other checkpoint; `shards=False` leaves them there (for
    the processes of a sharded resume, which read only their own shards)."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a directory, not a file; give the .pth file in it "
                        f"(e.g. {os.path.join(path, 'latest.pth')})")
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # The weights-only unpickler raises UnpicklingError both for an object it refuses and
        # for bytes it cannot parse, in wordings that change between torch versions; which one
        # it was is asked of the file itself: the globals it names that are not allowed
        # (a scan of its GLOBAL opcodes; nothing is constructed or run).
        refused = _refused_globals(path)
        if not refused:
            raise UserError(f"checkpoint {path} could not be read (UnpicklingError); it is corrupt "
                            f"or truncated, or not a torch file. {checkpoint_advice(key)}") from None
        raise UserError(f"checkpoint {path} holds objects that are not allowed: it is loaded with "
                        "torch.load(weights_only=True), which accepts only tensors, numbers, "
                        f"strings and containers of them (it refused {', '.join(refused[:3])}). "
                        "Nothing in it was run. Use a checkpoint written by this repo, or re-save "
                        "this one as a plain dict of tensors.") from None
    except Exception as e:  # truncated, corrupt or not a torch file: all user-facing
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}); it is "
                        f"corrupt or truncated. {checkpoint_advice(key)}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} is not a checkpoint of this repo (not a dict)")
    return with_shards(ckpt, path, key) if shards and ckpt.get("sharded") else ckpt


def with_shards(ckpt: dict, path: str, key: str = RESUME_KEY) -> dict:
    """`ckpt` with the tensors of the sharded directory it names merged in (whole, on the CPU),
    and without its `sharded` entry: the plain checkpoint a replicated run writes."""
    from utils import sharded_checkpoint
    entry = ckpt["sharded"]
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise UserError(f"checkpoint {path}: entry 'sharded' is malformed; the file was edited or not "
                        f"written by this repo. {checkpoint_advice(key)}")
    directory = os.path.join(os.path.dirname(os.path.abspath(path)), entry["path"])
    merged = {k: v for k, v in ckpt.items() if k != "sharded"}
    return sharded_checkpoint.unflatten_into(merged, sharded_checkpoint.read_shards(directory, path))


def _refused_globals(path: str) -> list[str]:
    """The classes and functions `path`'s pickle names that weights_only loading refuses
    (e.g. `posix.system`); [] when there are none or the file cannot be scanned."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip file, or damaged: nothing to name
        return []


PICKLE_WEIGHT_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights as pickle (not safetensors)


def pickle_weights_error(folder: str, error: BaseException, what: str, key: str) -> Optional[UserError]:
    """Why a model folder (`what`, e.g. "the text encoder", found through setting `key`) did not
    load, when the reason is pickle weights: a pickle file in it that names classes or functions
    the weights-only loader refuses (e.g. `posix.system`), or a pickle that loader refused while
    loading the folder (`error`'s chain holds an UnpicklingError). Named as refused because
    loading it could run code, with the way out (safetensors); None when pickles are not the
    reason. Never suggests turning the weights-only protection off."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_WEIGHT_EXTS)
                       and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        return None
    flagged = [(n, g) for n in names if (g := _refused_globals(os.path.join(folder, n)))]
    refused = any(isinstance(e, pickle.UnpicklingError) for e in _causes(error))
    if not flagged and not (refused and names):
        return None
    name, calls = flagged[0] if flagged else (names[0], [])
    path = os.path.join(folder, name)
    why = (f"is a pickle file that would call {', '.join(calls[:3])} when loaded" if calls else
           "is a pickle file that the weights-only loader refused (damaged, or it holds more than tensors)")
    return UserError(f"could not load {what} in {folder}: {path} {why}. It is refused because loading a "
                     "pickle can run code; nothing in it was run. Use weights in safetensors format: "
                     "convert them where you trust the file's source (load the model there and "
                     "save_pretrained(folder, safe_serialization=True), which writes .safetensors "
                     f"weights), or a copy of the model that ships .safetensors weights; then fix {key}")


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the exceptions it was raised from or while handling (libraries wrap them)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def capture_rng() -> dict:
    """RNG states of python, numpy, torch (CPU and CUDA) as checkpoint-safe values."""
    np_state = np.random.get_state()
    _, py_words, py_gauss = random.getstate()
    state = {
        "python": torch.tensor(py_words, dtype=torch.int64),
        "python_gauss": float("nan") if py_gauss is None else float(py_gauss),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    gauss = state["python_gauss"]
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()),
                     None if gauss != gauss else gauss))  # NaN marks "no cached gauss"
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_stale_temps(path: str) -> None:
    """Temp files of a writer killed mid-save (one writer per path: rank 0)."""
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        remove_file(stale)  # never a symlink, nor what it points at


def require_entries(ckpt: dict, path: str, spec: dict[str, type | tuple[type, ...]],
                    key: str = RESUME_KEY) -> None:
    """Refuse a checkpoint whose format is right but an entry is missing or of the wrong type,
    naming the entry (rather than a KeyError deep inside the resume); `key` named the file."""
    for name, types in spec.items():
        if name not in ckpt:
            problem = "is missing"
        elif not isinstance(ckpt[name], types) or (isinstance(ckpt[name], bool) and types is int):
            kinds = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            problem = f"is a {type(ckpt[name]).__name__}, expected {kinds}"
        else:
            continue
        raise UserError(f"checkpoint {path}: entry {name!r} {problem}; the file was edited or not "
                        f"written by this repo's training. {checkpoint_advice(key)}")


def _free_bytes(directory: str) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _check_free_space(path: str, directory: str) -> None:
    needed = os.path.getsize(path) * MIN_FREE_BYTES_FACTOR if os.path.exists(path) else 0
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(f"not enough free disk space to write {path}: {free / 2**20:.0f} MiB free, "
                        f"about {needed / 2**20:.0f} MiB needed. Free some space; the previous "
                        "checkpoint is intact.")


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the file itself is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj: Any, path: str, indent: int = 1) -> None:
    """JSON written to a temp file beside `path`, then renamed over it: a reader (or a crash)
    sees the old file or the new one, never half of one. Creates the parent folder; OSError
    is the caller's to turn into a message naming its key."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
