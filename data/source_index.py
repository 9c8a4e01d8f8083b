"""The index of a folder's sources: each file's frame count (or why it is unusable) and times.

Probing a video opens and demuxes it (an mp4 header, or decoding other containers), which
costs milliseconds per file: thousands of files take minutes serially. So the sources that
are not yet known are probed in worker processes (`data.index_workers`) with a progress bar,
and the results are saved in a JSON file (`<run>/data_index.json`, or `data.index_cache`
shared between runs), keyed by absolute path, size and mtime: a restart probes nothing, and
a file that changed is probed again. A process-wide memo serves the second split.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple, Optional, Union

from tqdm import tqdm

from utils.checkpoint import write_json
from utils.errors import UserError
from utils.video_io import VideoReadError, frame_number_gaps, list_frame_files, probe_video

RUN_INDEX_FILE = "data_index.json"  # in the run directory, unless data.index_cache is set
INDEX_FORMAT = 1  # bump when the probe's meaning changes: older files are then ignored
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


_MEMO: dict[str, SourceInfo] = {}  # absolute path -> info, for this process


def probe_source(path: str) -> SourceInfo:
    """Probe one source (runs in worker processes: module level, picklable arguments)."""
    try:
        st = os.stat(path)
    except OSError as e:  # a dangling symlink, or a file removed while indexing
        why = "a dangling symlink" if os.path.islink(path) else f"cannot be read ({e.strerror})"
        return SourceInfo(-1, -1, why, [], None, None)
    if os.path.isdir(path):
        files = list_frame_files(path)
        return SourceInfo(st.st_size, st.st_mtime_ns, len(files), frame_number_gaps(files), None, None)
    try:
        info = probe_video(path)
    except VideoReadError as e:
        return SourceInfo(st.st_size, st.st_mtime_ns, str(e).removeprefix(f"{path}: "), [], None, None)
    except OSError as e:  # unreadable (permissions, I/O error): skipped with the reason
        return SourceInfo(st.st_size, st.st_mtime_ns, f"cannot read it ({e.strerror or e})", [], None, None)
    return SourceInfo(st.st_size, st.st_mtime_ns, info.frames, [], info.rate, info.times)


def _fresh(info: Optional[SourceInfo], path: str) -> bool:
    if info is None:
        return False
    try:
        st = os.stat(path)
    except OSError:  # gone or dangling: probe it again, which says why
        return False
    return (info.size, info.mtime_ns) == (st.st_size, st.st_mtime_ns)


def _load(index_file: Optional[str]) -> dict[str, SourceInfo]:
    """The saved entries ({} when there is no file, or one of another format)."""
    if not index_file or not os.path.isfile(index_file):
        return {}
    try:
        with open(index_file) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}  # unreadable or half-written by a crash: probe again and rewrite it
    if not isinstance(saved, dict) or saved.get("format") != INDEX_FORMAT:
        return {}
    return {p: SourceInfo(*entry) for p, entry in saved.get("sources", {}).items()}


def _save(index_file: str, entries: dict[str, SourceInfo]) -> None:
    """Merge `entries` into the file (other data paths sharing it keep theirs); atomic."""
    merged = {**_load(index_file), **entries}
    try:
        write_json({"format": INDEX_FORMAT, "sources": {p: list(e) for p, e in merged.items()}},
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
