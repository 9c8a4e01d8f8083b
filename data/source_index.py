"""The index of a folder's sources: each file's frame count (or why it is unusable) and times.

Probing a video opens and demuxes it (an mp4 header, or decoding other containers), which
costs milliseconds per file: thousands of files take minutes serially. So the sources that
are not yet known are probed in worker processes (`data.index_workers`) with a progress bar,
and the results are saved in a JSON file (`<run>/data_index.json`, or `data.index_cache`
shared between runs), keyed by absolute path, size and mtime: a restart probes nothing, and
a file that changed is probed again. A process-wide memo serves the second split.

Probing rules. The index records a fingerprint of the code that probes (`probe_rules`: the
syntax trees of the probing functions, docstrings and comments aside, with the PyAV and
FFmpeg versions): entries written under other rules (older code, another FFmpeg) are probed
again, never trusted. Every failure of one source is that source's skip with its reason,
never the end of indexing; failures that may pass (an I/O error, an unexpected exception)
are not saved, so the next run probes the source again.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import multiprocessing
import os
import textwrap
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import av
from tqdm import tqdm

from utils import video_io
from utils.checkpoint import write_json
from utils.errors import UserError
from utils.video_io import (VideoReadError, frame_number_gaps, image_size, is_image_file, list_frame_files,
                            probe_video)

RUN_INDEX_FILE = "data_index.json"  # in the run directory, unless data.index_cache is set
INDEX_FORMAT = 2  # the file's layout (2: with each source's frame size); what probing means is `probe_rules()`
INDEX_PREFIX = '{"format":'  # how every index this module writes begins (even a truncated one)
PARALLEL_MIN_SOURCES = 32  # fewer unknown sources are probed in this process (no pool start-up)
PROGRESS_MIN_SOURCES = 64  # show the progress bar from this many sources to probe on


class SourceInfo(NamedTuple):
    """One source as indexing found it (a file or a frame folder; size and mtime of its stat)."""
    size: int
    mtime_ns: int
    frames: Union[int, str]  # frame count, or the reason the source is unusable
    gaps: list  # [first, last] missing runs in a frame folder's numbering
    rate: Optional[float]  # frames per second (None: unknown, e.g. a frame folder)
    times: Optional[list]  # seconds from the first frame, only for variable frame rate files
    transient: bool = False  # a failure that may pass (I/O, an unexpected error): not saved
    frame_size: Optional[tuple] = None  # (height, width) pixels of its frames as shown (buckets)


class DataWarning(UserWarning):
    """A data problem that does not stop training (skipped files, gaps in frame numbering)."""


_MEMO: dict[str, SourceInfo] = {}  # absolute path -> info, for this process


def probe_source(path: str) -> SourceInfo:
    """Probe one source (runs in worker processes: module level, picklable arguments).

    Never raises for a bad source: every failure is that source's reason to be skipped."""
    try:
        st = os.stat(path)
    except OSError as e:  # a dangling symlink, or a file removed while indexing
        why = "a dangling symlink" if os.path.islink(path) else f"cannot be read ({e.strerror})"
        return SourceInfo(-1, -1, why, [], None, None, True)
    try:
        if os.path.isdir(path):
            files = list_frame_files(path)
            size = image_size(files[0]) if files else None
            return SourceInfo(st.st_size, st.st_mtime_ns, len(files), frame_number_gaps(files), None, None,
                              frame_size=size)
        if is_image_file(path):  # a still (data.images): one frame
            return SourceInfo(st.st_size, st.st_mtime_ns, 1, [], None, None, frame_size=image_size(path))
        info = probe_video(path)
    except VideoReadError as e:  # the file itself: the same answer until it changes
        return SourceInfo(st.st_size, st.st_mtime_ns, str(e).removeprefix(f"{path}: "), [], None, None)
    except OSError as e:  # unreadable (permissions, I/O error): skipped with the reason
        return SourceInfo(st.st_size, st.st_mtime_ns, f"cannot read it ({e.strerror or e})", [], None,
                          None, True)
    except Exception as e:  # a decoder or library fault on this file: skip it, probe it next run
        return SourceInfo(st.st_size, st.st_mtime_ns, f"probing failed ({type(e).__name__}: {e}); "
                          "it is probed again next run", [], None, None, True)
    return SourceInfo(st.st_size, st.st_mtime_ns, info.frames, [], info.rate, info.times, frame_size=info.size)


@lru_cache(maxsize=None)
def probe_rules() -> str:
    """A fingerprint of what probing answers: the code of the probing functions (syntax trees
    without docstrings, so comments and wording do not count) and the PyAV / FFmpeg versions."""
    trees = []
    for fn in (probe_source, *video_io.PROBE_FUNCTIONS):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError):  # no source on disk (a zipped install): the bytecode
            trees.append(fn.__code__.co_code.hex())
            continue
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        trees.append(ast.dump(tree))
    libs = f"av {av.__version__} ffmpeg {getattr(av, 'ffmpeg_version_info', '')}"
    return hashlib.sha256("\n".join(trees + [libs]).encode()).hexdigest()[:16]


def _fresh(info: Optional[SourceInfo], path: str) -> bool:
    if info is None:
        return False
    try:
        st = os.stat(path)
    except OSError:  # gone or dangling: probe it again, which says why
        return False
    return (info.size, info.mtime_ns) == (st.st_size, st.st_mtime_ns)


def _load(index_file: Optional[str], quiet: bool = False) -> dict[str, SourceInfo]:
    """The saved entries: {} when there is no file yet, it is empty, it was written under other
    probing rules, or it is a damaged index of ours (each said in a DataWarning, then probed
    again and rewritten); malformed entries are dropped (probed again). A file that is not a
    data index at all is refused: it may be something of the user's that must not be overwritten."""
    if not index_file or not os.path.isfile(index_file):
        return {}
    try:
        with open(index_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"data.index_cache = {index_file}: cannot be read ({e.strerror or e}); "
                        "point data.index_cache at a readable file, or a new path") from None
    if not data.strip():
        return {}
    text = data.decode("utf-8", errors="replace")
    try:
        saved = json.loads(text)
    except ValueError:
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("format"), int)
            and isinstance(saved.get("sources"), dict)):
        if text.startswith(INDEX_PREFIX):  # ours, cut short (a full disk, a crash)
            _warn_index(f"data.index_cache = {index_file} is damaged; every source is probed again "
                        "and the file rewritten", quiet)
            return {}
        raise UserError(f"data.index_cache = {index_file}: not a data index written by this repo "
                        "(the file holds something else); point data.index_cache at a new file "
                        "path (it is created), or delete the file if it is a stale index")
    if saved["format"] != INDEX_FORMAT or saved.get("probe_rules") != probe_rules():
        _warn_index(f"data.index_cache = {index_file} was written under other probing rules (older "
                    "code, or another PyAV/FFmpeg); its sources are probed again and the file rewritten",
                    quiet)
        return {}
    entries, bad = {}, 0
    for path, entry in saved["sources"].items():
        info = _entry(entry)
        if info is None:
            bad += 1
        else:
            entries[path] = info
    if bad:
        _warn_index(f"data.index_cache = {index_file}: {bad} malformed entr{'y' if bad == 1 else 'ies'} "
                    "(edited by hand?) are ignored; those sources are probed again", quiet)
    return entries


def _entry(entry) -> Optional[SourceInfo]:
    """A saved entry as a SourceInfo, or None if it is not one this module writes."""
    if not isinstance(entry, list) or len(entry) != 7:
        return None
    size, mtime, frames, gaps, rate, times, frame_size = entry
    ok = (all(isinstance(v, int) and not isinstance(v, bool) for v in (size, mtime))
          and (frame_size is None or isinstance(frame_size, list) and len(frame_size) == 2
               and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in frame_size))
          and (isinstance(frames, str) or isinstance(frames, int) and not isinstance(frames, bool)
               and frames >= 0)
          and isinstance(gaps, list) and all(isinstance(g, list) and len(g) == 2 for g in gaps)
          and (rate is None or isinstance(rate, (int, float)) and rate > 0)
          and (times is None or isinstance(times, list)
               and all(isinstance(t, (int, float)) for t in times)))
    return SourceInfo(size, mtime, frames, [tuple(g) for g in gaps], rate, times,
                      frame_size=tuple(frame_size) if frame_size else None) if ok else None


def _warn_index(text: str, quiet: bool) -> None:
    if not quiet:  # said when the index is read, not again when it is merged into on saving
        warnings.warn(text, DataWarning, stacklevel=2)


def _save(index_file: str, entries: dict[str, SourceInfo]) -> None:
    """Merge `entries` into the file (other data paths sharing it keep theirs); atomic.
    Transient failures are left out: the next run probes those sources again."""
    merged = {**_load(index_file, quiet=True), **entries}
    sources = {p: [*list(e)[:6], list(e.frame_size) if e.frame_size else None]
               for p, e in merged.items() if not e.transient}
    try:
        write_json({"format": INDEX_FORMAT, "probe_rules": probe_rules(), "sources": sources},
                   index_file, indent=None)
    except OSError as e:
        raise UserError(f"cannot write the data index {index_file}: {e.strerror or e}; set "
                        "data.index_cache to a writable file path") from None


def _probe_all(paths: list[str], workers: int, desc: str) -> list[SourceInfo]:
    """Probe `paths`, in `workers` processes when there are enough of them."""
    bar = dict(total=len(paths), desc=desc, unit="clip", dynamic_ncols=True,
               disable=len(paths) < PROGRESS_MIN_SOURCES)
    if workers <= 1 or len(paths) < PARALLEL_MIN_SOURCES:
        return [probe_source(p) for p in tqdm(paths, **bar)]
    # fork: workers start at once, without importing torch again (they only run PyAV)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(tqdm(pool.map(probe_source, paths, chunksize=chunk), **bar))


def index_sources(paths: list[str], index_file: Optional[str] = None,
                  workers: Optional[int] = None, desc: str = "indexing") -> list[SourceInfo]:
    """Info for each of `paths` (absolute), probing only the unknown or changed ones.

    `index_file`: the JSON file to read known entries from and save new ones to (None: this
    process only). `workers`: probing processes (None: one per CPU core).
    """
    saved = None
    todo = []
    for p in paths:
        if _fresh(_MEMO.get(p), p):
            continue
        if saved is None:
            saved = _load(index_file)
        if _fresh(saved.get(p), p):
            _MEMO[p] = saved[p]
        else:
            todo.append(p)
    if todo:
        found = _probe_all(todo, workers or os.cpu_count() or 1, desc)
        _MEMO.update(zip(todo, found))
    if index_file and (todo or saved is None and not os.path.isfile(index_file)):
        _save(index_file, {p: _MEMO[p] for p in paths})
    return [_MEMO[p] for p in paths]


def reprobe(path: str, index_file: Optional[str]) -> tuple[Optional[SourceInfo], SourceInfo]:
    """(the info indexing used, a fresh probe) for a source that failed to read: when they
    differ the index entry was stale (it is replaced, in memory and in `index_file`), else the
    file itself is at fault."""
    old = _MEMO.get(path)
    new = probe_source(path)
    _MEMO[path] = new
    if index_file and new != old and not new.transient:
        try:
            _save(index_file, {path: new})
        except UserError:
            pass  # the fresh answer still serves this process
    return old, new
