"""Paths read from files a user can edit, and paths a user gives to be read or written.

Manifests (predict's `.predict_manifest.jsonl`, the text and latent caches' `manifest.json`)
name files by their plain name inside their own folder: `inside` refuses anything else (a
path, `..`, an absolute name), so an edited manifest cannot point outside its folder.

Removal of a file found on disk goes through `remove_file`: only a regular file is removed,
never a symlink (a user's link where a manifest says a file of ours is) and never a file
behind one (`remove_file` looks at the path itself with lstat; callers that walk a folder a
manifest names check that the folder is no symlink first).

`refuse_folder` / `refuse_file` name a folder given where a file is expected (and the
reverse), which "not found" would misname; `check_output_file` refuses, before any work, an
output file that cannot be written.
"""
from __future__ import annotations

import os
import stat
import tempfile

from utils.errors import UserError


def plain_name(name: object) -> bool:
    """`name` is a file name with no folder part: a non-empty string, not `.` or `..`, no
    separator and no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and os.sep not in name and "\0" not in name)


def inside(folder: str, name: object, what: str) -> str:
    """`folder/name` for a plain `name`; ValueError naming `what` (e.g. "shard") otherwise."""
    if not plain_name(name):
        raise ValueError(f"{what} {name!r} is not a plain file name inside {folder}")
    return os.path.join(folder, name)


def is_regular_file(path: str) -> bool:
    """`path` itself is a regular file (lstat: not a symlink, folder, socket or device)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_file(path: str) -> bool:
    """Remove `path` if it is a regular file; a symlink (whatever it points at), a folder or
    nothing there is left alone. True when a file was removed."""
    if not is_regular_file(path):
        return False
    try:
        os.remove(path)
    except FileNotFoundError:  # removed meanwhile (another rank, a user)
        return False
    return True


def refuse_folder(path: str, key: str, what: str) -> None:
    """UserError when `path` (setting `key`) is a folder where a file is expected: `what` says
    which file (e.g. "a PNG or JPG image"). A missing path is the caller's to name."""
    if os.path.isdir(path):
        raise UserError(f"{key} = {path}: is a folder, not a file; give {what}")


def refuse_file(path: str, key: str, what: str) -> None:
    """UserError when `path` (setting `key`) exists but is not a folder, where a folder is
    expected. A missing path is the caller's to name."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{key} = {path}: is a file, not a folder; give {what}")


def check_output_file(path: str, key: str) -> None:
    """Refuse now, before any work is done, an output file that cannot be written: a folder, a
    path through a file, or a folder without write permission. Creates nothing (the writer
    makes the missing folders)."""
    if os.path.isdir(path):
        raise UserError(f"{key} = {path}: is a folder; give a file name, e.g. "
                        f"{os.path.join(path, 'result.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the writer creates the missing folders inside it
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{key} = {path}: {folder} is a file, not a folder; choose another {key}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_test_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{key} = {path}: cannot write in {folder} ({e.strerror}); choose another "
                        f"{key}") from None
