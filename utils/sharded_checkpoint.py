"""Sharded checkpoints: a torch.distributed.checkpoint (DCP) directory of which every process
writes its own shard, published atomically and read safely.

Layout: `<run>/sharded/step_0000200/` holds DCP's `.metadata` and one `__<rank>_0.distcp` file
per process; the run's `latest.pth` (a small plain dict, utils/checkpoint.py) names it in its
`sharded` entry. Only tensors are stored, under flat keys that spell their place in the
checkpoint dict (`flatten`): `model_state/blocks.0.attn.qkv.weight`, `optimizer/state/3/exp_avg`.

Atomic: every process writes into `sharded/.step_0000200.tmp/`; DCP's save returns on every
process only after its last collective, when the coordinator has written `.metadata`; then rank 0
renames the directory to `step_0000200`, and only after that is latest.pth replaced to name it
(`utils.checkpoint.atomic_save`); older directories are removed last (`prune`). A process killed
at any moment (kill -9) leaves latest.pth naming a complete directory; the unfinished `.tmp` one
is removed by the next save.

Safe: DCP reads `.metadata` with `pickle.load`, which runs whatever a crafted file names; here
a restricted unpickler builds only DCP's own metadata classes (`_SafeReader`), as
`torch.load(weights_only=True)` guarantees for `.pth` files. Tensor data is read by DCP with
`torch.load(weights_only=True)`.

Reading: `load_shards` (every process, into its own sharded tensors: DCP reshards, so another
world size reads the same directory) or `read_shards` (one process, no process group: full
tensors, for predict, evaluate, export and a one-process resume).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import shutil
import warnings
from typing import Any, Callable, Optional

import torch

from utils.checkpoint import fsync_dir
from utils.errors import UserError

SHARDED_DIR = "sharded"  # under the run directory
SEP = "/"  # between the parts of a flat key (parameter names use '.')


def dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ----------------------------------------------------------------------------- flat keys


def flatten(nested: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{"optimizer": {"state": {3: {"exp_avg": t}}}} -> {"optimizer/state/3/exp_avg": t}. Every
    leaf must be a tensor (DCP stores other values with pickle, which this module never reads)."""
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + SEP))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            raise TypeError(f"sharded checkpoints hold tensors only; {name} is a {type(value).__name__}")
    return flat


def unflatten_into(target: dict, flat: dict[str, torch.Tensor]) -> dict:
    """`flatten` undone into `target` (nested dicts created as needed, all-digit parts as ints)."""
    for key, value in flat.items():
        *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(SEP)]
        node = target
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return target


# ----------------------------------------------------------------------------- writing


def write_shards(state: dict[str, torch.Tensor], run_dir: str, step: int, is_main: bool,
                 barrier: Callable[[], None]) -> str:
    """Every process: write `state` (flat keys; DTensors are written shard by shard, plain tensors
    once) as `<run_dir>/sharded/step_<step>`, atomically (see the module docstring). Returns that
    directory relative to `run_dir`, for latest.pth's `sharded` entry."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a write failed on some process
    root = os.path.join(run_dir, SHARDED_DIR)
    final, tmp = os.path.join(root, dir_name(step)), os.path.join(root, f".{dir_name(step)}.tmp")
    if is_main:
        os.makedirs(root, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(root), ".step_*.tmp")):  # a killed save's
            shutil.rmtree(stale, ignore_errors=True)
    barrier()  # no process writes into a directory that rank 0 is still clearing
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
    except (OSError, CheckpointException) as e:
        free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:300]
        raise UserError(f"could not write the sharded checkpoint {tmp} ({why}); "
                        f"{free / 2**20:.0f} MiB are free on that disk: free some space or fix the "
                        "directory. latest.pth and the checkpoint it names are intact.") from None
    if is_main:
        publish(tmp, final)
    barrier()
    return os.path.join(SHARDED_DIR, dir_name(step))


def publish(tmp: str, final: str) -> None:
    """Rank 0, once every shard and the metadata are on disk: the temp directory becomes `final`.
    A `final` already there is a leftover of a run killed between this rename and latest.pth's
    replacement (latest.pth names an older step then), so it is replaced."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def prune(run_dir: str, keep: Optional[str]) -> None:
    """Rank 0, after latest.pth was replaced: remove the sharded directories it no longer names
    (`keep`: the one it names, relative to run_dir, or None) and unfinished ones."""
    root = os.path.join(run_dir, SHARDED_DIR)
    if not os.path.isdir(root):
        return
    keep_path = os.path.normpath(os.path.join(run_dir, keep)) if keep else None
    for path in glob.glob(os.path.join(glob.escape(root), "*")) + \
            glob.glob(os.path.join(glob.escape(root), ".step_*.tmp")):
        if os.path.normpath(path) != keep_path:
            shutil.rmtree(path, ignore_errors=True)
    if keep is None:
        with contextlib.suppress(OSError):
            os.rmdir(root)


# ----------------------------------------------------------------------------- reading


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes, dtypes and layouts, and paths; refuses any
    other global (a crafted `.metadata` naming os.system, say)."""
    METADATA_MODULE = "torch.distributed.checkpoint.metadata"  # every class defined there
    NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.NAMES or self._metadata_class(module, name) or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")

    @classmethod
    def _metadata_class(cls, module: str, name: str) -> bool:
        if module != cls.METADATA_MODULE:
            return False
        import torch.distributed.checkpoint.metadata as metadata
        found = getattr(metadata, name, None)
        return isinstance(found, type) and found.__module__ == module


def _reader(directory: str):
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeReader(FileSystemReader):
        """DCP's file reader with `.metadata` read by `_MetadataUnpickler`."""

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta
            with open(os.path.join(directory, ".metadata"), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return _SafeReader(directory)


def shard_keys(directory: str, where: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{flat key: (global size, dtype)} of a sharded directory (`where`: the checkpoint that
    names it, for messages); a missing, unfinished or foreign directory is a UserError."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        state = "is missing" if not os.path.isdir(directory) else "is unfinished (no .metadata)"
        raise UserError(f"checkpoint {where} names the sharded checkpoint {directory}, which {state}: it "
                        "was deleted or moved. Use another checkpoint, or start fresh with another "
                        "experiment.name.")
    try:
        metadata = _reader(directory).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise UserError(f"the sharded checkpoint {directory} (named by {where}) has a .metadata that "
                        f"cannot be read safely ({type(e).__name__}: {e}); it is corrupt or was not "
                        "written by this repo. Nothing in it was run. Use another checkpoint.") from None
    keys = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UserError(f"the sharded checkpoint {directory} (named by {where}) holds a non-tensor "
                            f"entry {key!r}: it was not written by this repo. Use another checkpoint.")
        keys[key] = (entry.size, entry.properties.dtype)
    return keys


def load_shards(targets: dict[str, torch.Tensor], directory: str, where: str) -> None:
    """Every process: read the directory into `targets` in place (flat keys; DTensors receive
    their own shard, whatever world size wrote it)."""
    import torch.distributed.checkpoint as dcp
    shard_keys(directory, where)  # refuses a missing, unfinished or foreign directory first
    dcp.load(targets, storage_reader=_reader(directory))


def read_shards(directory: str, where: str) -> dict[str, torch.Tensor]:
    """One process, no process group: every tensor of the directory, whole, on the CPU."""
    import torch.distributed.checkpoint as dcp
    state = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in shard_keys(directory, where).items()}
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(directory), no_dist=True)
    except OSError as e:  # a run still training removed it after a newer save
        raise UserError(f"could not read the sharded checkpoint {directory} (named by {where}): "
                        f"{e.strerror or e}. A run still training replaces it at every checkpoint: read "
                        f"{where} again.") from None
    return state
