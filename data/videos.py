"""A folder of videos and frame folders as a dataset of sliding windows.

Sources. `data.path` is searched recursively (hidden files and folders skipped) for video
files (`VIDEO_EXTS`, any case) and for frame folders: a folder holding numbered png/jpg
files and no video is one source clip whose frames are sorted by the number in their names
(images next to videos, e.g. thumbnails, are not frames).

Windows. A window is `num_frames` frames, one every `frame_stride` source frames, so it spans
`(num_frames - 1) * frame_stride + 1` source frames; a new window starts every
`window_stride` source frames. Only the frame counts and times are read at construction
(data/source_index.py: in parallel, saved between runs, keyed by path, size and mtime);
pixels are decoded per item, only the frames the item needs (seeking to the keyframe before).

Frame rate. `data.fps: null` uses every source frame. A number resamples each source in time
first: frame k of the resampled clip is the source frame on screen at time k / fps (from the
file's timestamps, so variable-frame-rate files work too; frame folders are at
`data.frame_folder_fps`), and the windows above count resampled frames. 24, 30 and 60 fps
sources then show the same motion per window.

Labels. `data.labels: subfolder`: class = index of the top-level subfolder holding the
clip's files, among the sorted names of all top-level subfolders with clips (the same for
both splits); clips directly in `data.path` are skipped. `none`: label 0, num_classes 0.

Captions. `data.captions` (data/captions.py): null, sidecar `.txt` files or a metadata file.
They are read and checked when the dataset is built, before any clip is probed; items then
carry "caption" (a string; the substitute's caption when an unreadable source is replaced).

Buckets (`data.buckets`, data/buckets.py; given the VAE's and the network's `Rules`). Stills
(png/jpg/webp files that are not frames of a frame folder) are sources too, of one frame
(`data.images`); a source of any length is usable, and the bucket plan decides its shape
(frames, height, width): its windows are its bucket's frames, its pixels its bucket's size,
and a source that fits no bucket is listed as unused with its reason (`plan.unused`, with the
indexing skips, the images left out and the clips without captions). An unreadable source is
served by another of its bucket, so a batch keeps one shape. Without `Rules` (validation's
clips, evaluate) the dataset is the fixed-shape one of data.resolution x data.num_frames.

Split. Every usable source goes to "val" when a stable hash of its relative path falls below
`val_fraction`, independent of the seed, so stage 1, stage 2 and every seed agree. With >= 2
sources each split gets at least one; with 1 source (or val_fraction = 0) val reuses train.

Warnings. Problems that do not stop training are reported with `warnings.warn(...,
DataWarning)`, once per kind: one warning listing every skipped file with its reason and the
count, one listing frame folders with gaps in their numbering. Python shows an identical
warning once, so building the train and the val split does not print it twice. Entry
scripts can route them to log.txt with `logging.captureWarnings(True)`.

Randomness (random crop, flip; train split only). Each item draws from its own
`torch.Generator` seeded from (seed, epoch, index): the same for any number of DataLoader
workers, different every epoch, and reproduced exactly after a mid-epoch resume. The epoch
lives in a shared-memory tensor, so `set_epoch` in the main process reaches persistent
workers; `data.loader.set_epoch(loader, epoch)` calls it together with the sampler's.
"""
from __future__ import annotations

import hashlib
import os
import statistics
import warnings
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset

from data.buckets import BucketPlan, Rules, Sample
from data.captions import attach_captions
from data.source_index import DataWarning, SourceInfo, index_sources, reprobe
from data.windows import window_span, windows_per_clip
from utils.config import IMAGE_EXTS, DataConfig
from utils.errors import MissingFileError, UserError
from utils.video_io import (FRAME_EXTS, VIDEO_EXTS, VideoReadError, is_image_file, iter_frames, list_frame_files,
                            read_frames)

SPLITS = ("train", "val")
MAX_LISTED = 20  # problem files named in one warning; the rest are counted
TIME_TOLERANCE = 1e-3  # of a resampled frame: a source frame starting this close counts as on time


# --------------------------------------------------------------------------- finding sources


VIRTUAL_FILESYSTEMS = ("/proc", "/sys", "/dev", "/run")  # never clips; walking them never ends


def find_sources(root: str, skipped_links: Optional[list[str]] = None, images: bool = False) -> list[str]:
    """Relative posix paths of the video files and frame folders under `root`, sorted; with
    `images` also the stills: png/jpg/webp files that are not frames of a frame folder.

    Symlinked folders are followed (a dataset may be links to folders elsewhere), except a
    link back to `root` or to a folder above it or above the link (a loop, e.g. `ln -s / all`)
    and links into /proc, /sys, /dev, /run: those are left out and described in
    `skipped_links` ("rel -> target: why")."""
    found, seen = [], set()
    top = os.path.realpath(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached twice (two links to one folder)
            dirs[:] = []
            continue
        seen.add(real)
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            why = _unfollowable(os.path.join(folder, d), top, real)
            if why is None:
                kept.append(d)
            elif skipped_links is not None:
                link = d if rel == "." else f"{rel}/{d}"
                skipped_links.append(f"{link} -> {os.path.realpath(os.path.join(folder, d))}: {why}")
        dirs[:] = kept
        videos = [f for f in files if f.lower().endswith(VIDEO_EXTS) and not f.startswith(".")]
        found += [f if rel == "." else f"{rel}/{f}" for f in videos]
        frames = [] if videos else list_frame_files(folder)  # images beside videos are not frames
        if frames:
            found.append(rel)
        if images:
            taken = {os.path.basename(f) for f in frames}
            found += [f if rel == "." else f"{rel}/{f}" for f in files if f.lower().endswith(IMAGE_EXTS)
                      and not f.startswith(".") and f not in taken]
    return sorted(found)


def _unfollowable(path: str, top: str, parent: str) -> Optional[str]:
    """Why the folder symlink `path` is not followed (None: it is, or it is no link)."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    if any(target == v or target.startswith(v + os.sep) for v in VIRTUAL_FILESYSTEMS):
        return "a system folder, not clips"
    for above in (top, parent):
        if above == target or above.startswith(target.rstrip(os.sep) + os.sep):
            return "a folder that contains the link itself (a loop)"
    return None


def resample_indices(frames: int, rate: float, times: Optional[list], fps: float) -> list[int]:
    """The source frame on screen at each time k / fps, k = 0, 1, ... within the clip.

    `times`: seconds from the first frame per frame (variable frame rate), or None for
    `frames` evenly spaced at `rate`. The clip lasts until its last frame ends (one mean
    frame interval after it starts).
    """
    t = np.asarray(times, dtype=np.float64) if times is not None else np.arange(frames) / rate
    duration = t[-1] - t[0] + (1 / rate if frames < 2 else (t[-1] - t[0]) / (frames - 1))
    count = int(np.floor(duration * fps + TIME_TOLERANCE))
    targets = t[0] + (np.arange(count) + TIME_TOLERANCE) / fps  # (count,) seconds
    return (np.searchsorted(t, targets, side="right") - 1).tolist()


def _unit_hash(rel: str) -> float:
    """A stable number in [0, 1) per relative path (same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") / 2 ** 64


def split_is_val(rels: list[str], val_fraction: float) -> list[bool]:
    """Per source: goes to val? With >= 2 sources and val_fraction > 0, at least one each
    way; otherwise all go to train (and the val split reuses them)."""
    if len(rels) < 2 or val_fraction == 0:
        return [False] * len(rels)
    u = [_unit_hash(r) for r in rels]
    is_val = [x < val_fraction for x in u]
    if not any(is_val):
        is_val[int(np.argmin(u))] = True
    if all(is_val):
        is_val[int(np.argmax(u))] = False
    return is_val


def _class_of(rel: str, is_folder: bool) -> Optional[str]:
    """Top-level subfolder holding the source's files (None: the files are in the root)."""
    parts = rel.split("/")
    if is_folder:
        return None if rel == "." else parts[0]
    return parts[0] if len(parts) > 1 else None


def _describe_gaps(rel: str, gaps: list[tuple[int, int]]) -> str:
    return f"{rel} (missing " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps) + ")"


def _seed(*numbers: int) -> int:
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


# --------------------------------------------------------------------------- the dataset


class VideoFolder(Dataset):
    """Sliding windows over the clips under `cfg.path`.

    Items: {"video": (3, T, H, W) float32 in [-1, 1], "label": int} (+ "caption": str when
    cfg.captions is set), T = cfg.num_frames,
    H x W = cfg.resolution (a square side or [height, width]). `augment` (default: split ==
    "train") enables cfg.random_crop and cfg.hflip; a latent cache passes augment=False to get
    the deterministic center crop. With `rules` (data.buckets): T, H, W are the item's bucket's,
    and items carry "bucket" (its index in `plan.buckets`).
    """

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0,
                 augment: Optional[bool] = None, index_file: Optional[str] = None,
                 rules: Optional[Rules] = None):
        """`index_file`: where to save the probed sources (data.index_cache overrides it);
        `rules`: what the VAE and network need of a bucket (data.buckets; None: one shape)."""
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: use one of {SPLITS}")
        self.cfg, self.split, self.seed = cfg, split, seed
        self.index_file = cfg.index_cache or index_file
        self.augment = (split == "train") if augment is None else augment
        self.span = window_span(cfg.num_frames, cfg.frame_stride)  # source frames per window
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._unreadable: set[int] = set()  # sources that failed to read after indexing
        self._reprobed: set[int] = set()  # sources probed again after a failed read
        self._caps: dict[int, int] = {}  # source -> its length, where a stale index overstated it
        self.rules = rules if cfg.buckets is not None else None  # None: every item at one shape
        self.plan: Optional[BucketPlan] = None  # with rules: the buckets and each source's
        self._unused: list[tuple[str, str]] = []  # (rel, reason) of sources left out before the plan
        found = self._find(cfg.path)
        rels, self._caption_of = attach_captions(cfg, found)  # checked before probing
        kept = set(rels)
        self._unused += [(r, f"no caption (data.missing_caption = {cfg.missing_caption})")
                         for r in found if r not in kept]
        names = sorted({c for r in rels if (c := _class_of(r, self._is_dir(r))) is not None})
        if cfg.labels == "subfolder" and not names:
            raise UserError(f"data.labels = subfolder but {cfg.path} has no subfolders with "
                            "clips; put each class in its own subfolder or set data.labels: none")
        self.class_names: list[str] = names if cfg.labels == "subfolder" else []
        self.num_classes = len(self.class_names)
        usable, self.skipped = self._index(rels)
        self._use_split(usable)

    # ----------------------------------------------------------------- construction

    def _is_dir(self, rel: str) -> bool:
        return os.path.isdir(os.path.join(self.cfg.path, rel))

    def _is_still(self, rel: str) -> bool:
        return self.rules is not None and is_image_file(os.path.join(self.cfg.path, rel))

    def _find(self, root: str) -> list[str]:
        if not os.path.exists(root):
            raise MissingFileError(f"data.path = {root}: folder not found; point data.path at a "
                                   "folder of videos or use builtin:moving_shapes")
        if not os.path.isdir(root):
            raise UserError(f"data.path = {root}: is a file; point data.path at the folder "
                            "that holds the videos")
        links: list[str] = []
        rels = find_sources(root, links, images=self.rules is not None)
        self._warn(f"{len(links)} folder symlink(s) not followed (point data.path at the target "
                   "folder instead if it holds clips)", links)
        if self.rules is not None and self.cfg.images != "include":  # the kind data.images leaves out
            only = self.cfg.images == "only"
            out = [r for r in rels if self._is_still(r) != only]
            self._unused += [(r, f"{'a clip' if only else 'an image'} (data.images = {self.cfg.images})")
                             for r in out]
            rels = [r for r in rels if self._is_still(r) == only]
        if not rels:
            raise UserError(f"data.path = {root}: no videos ({' '.join(VIDEO_EXTS)}) and no "
                            f"folders of numbered frames ({' '.join(FRAME_EXTS)}) found in it "
                            "or its subfolders")
        return rels

    def _index(self, rels: list[str]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
        """Probe every source: (usable (rel, frames), skipped (rel, reason)); frames are
        resampled frames when data.fps is set."""
        cfg = self.cfg
        infos = index_sources([os.path.abspath(os.path.join(cfg.path, r)) for r in rels],
                              self.index_file, cfg.index_workers, f"indexing {cfg.path}")
        usable, skipped, gappy, slower = [], [], [], []
        need = 1 if self.rules is not None else self.span  # buckets: the plan decides what is too short
        self._sizes: dict[str, tuple[int, int]] = {}  # rel -> (height, width) of its frames
        self._maps: dict[str, list[int]] = {}  # rel -> source frame of each resampled frame
        self._lengths: dict[str, int] = {}
        self._seconds: dict[str, float] = {}  # rel -> duration of a resampled source
        self._rates: dict[str, float] = {}
        folder_fps = cfg.frame_folder_fps  # frame folders have no timestamps of their own
        for rel, info in zip(rels, infos):
            if info.gaps:
                gappy.append(_describe_gaps(rel, info.gaps))
            length = self._length(rel, info, folder_fps)
            if self.num_classes and _class_of(rel, self._is_dir(rel)) is None:
                skipped.append((rel, "not inside a class subfolder (data.labels: subfolder)"))
            elif isinstance(length, str):
                skipped.append((rel, length))
            elif length < need:
                at = f" at data.fps = {cfg.fps}" if cfg.fps else ""
                skipped.append((rel, f"too short: {length} frames{at}, a window needs {self.span}"))
            else:
                usable.append((rel, length))
                if info.frame_size is not None:
                    self._sizes[rel] = tuple(info.frame_size)
                rate = self._rates.get(rel)
                if cfg.fps is not None and rate is not None and cfg.fps > rate * (1 + TIME_TOLERANCE):
                    slower.append(f"{rel}: {rate:g} fps")
        if slower:
            self._warn(f"data.fps = {cfg.fps:g} is above the frame rate of {len(slower)} source(s): "
                       "their windows show source frames repeated (about data.fps / rate times "
                       "each); lower data.fps to the slowest rate to avoid it", slower)
        self._warn(f"{len(gappy)} frame folder(s) have gaps in their frame numbering; their "
                   "frames are used in order anyway", gappy)
        self._warn(f"skipped {len(skipped)} of {len(rels)} sources",
                   [f"{r}: {why}" for r, why in skipped])
        if not usable:
            raise UserError(self._nothing_usable(rels, skipped))
        return usable, skipped

    def _length(self, rel: str, info: SourceInfo, folder_fps: Optional[float]) -> Union[int, str]:
        """Frames the windows can use (resampled at data.fps if set), or why there are none."""
        if isinstance(info.frames, str):
            return info.frames
        if self._is_still(rel):  # one frame, at any data.fps
            return 1
        is_dir = self._is_dir(rel)
        rate = folder_fps if is_dir else info.rate
        if rate:
            self._rates[rel] = rate
        if self.cfg.fps is None or info.frames == 0:
            length = info.frames
        elif rate is None:
            return ("a frame folder has no frame rate: set data.frame_folder_fps to resample it at "
                    "data.fps" if is_dir else "no frame rate or timestamps to resample it at data.fps")
        else:
            self._maps[rel] = resample_indices(info.frames, rate, None if is_dir else info.times,
                                               self.cfg.fps)
            self._seconds[rel] = info.frames / rate  # as resample_indices counts it
            length = len(self._maps[rel])
        self._lengths[rel] = length
        return length

    def _warn(self, headline: str, lines: list[str]) -> None:
        if not lines:
            return
        more = [f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
        text = "\n  ".join([f"data.path = {self.cfg.path}: {headline}:"] + lines[:MAX_LISTED] + more)
        warnings.warn(text, DataWarning, stacklevel=2)  # a fixed location: repeats show once

    def _nothing_usable(self, rels: list[str], skipped: list[tuple[str, str]]) -> str:
        lengths = {r: n for r, n in self._lengths.items() if n < self.span}  # too short
        head = f"data.path = {self.cfg.path}: no usable clip among {len(rels)} sources. "
        if not lengths:
            reasons = "; ".join(f"{r}: {why}" for r, why in skipped[:MAX_LISTED])
            return head + f"None could be read: {reasons}"
        longest = max(lengths, key=lengths.get)
        window = (f"one window of data.num_frames = {self.cfg.num_frames} every "
                  f"data.frame_stride = {self.cfg.frame_stride} frames spans {self.span}")
        fps = self.cfg.fps
        if longest not in self._seconds:
            return head + (f"The longest has {lengths[longest]} frames but {window}; lower "
                           "data.num_frames or data.frame_stride.")
        seconds = self._seconds[longest]
        need = self.span / seconds  # frames per second for one window in the longest clip
        return head + (f"At data.fps = {fps:g} the longest ({longest}, {seconds:.3g} s) has "
                       f"{lengths[longest]} frames but {window}; raise data.fps (to at least "
                       f"{need:.3g}), or lower data.num_frames or data.frame_stride.")

    def _use_split(self, usable: list[tuple[str, int]]) -> None:
        is_val = split_is_val([r for r, _ in usable], self.cfg.val_fraction)
        mine = [s for s, v in zip(usable, is_val) if v == (self.split == "val")]
        if not mine:  # 1 source, or val_fraction = 0: val reuses the training clips
            mine = usable
            why = "only one usable clip" if len(usable) == 1 else "data.val_fraction = 0"
            warnings.warn(f"data.path = {self.cfg.path}: {why}, so the val split reuses the "
                          "training clips", DataWarning)
        if self.rules is not None:
            mine = self._plan(mine, [s for s, v in zip(usable, is_val) if not v] or usable)
        cfg = self.cfg
        self.sources = [(os.path.join(cfg.path, r), n) for r, n in mine]  # (path, frames)
        self._frame_maps = [self._maps.get(r) for r, _ in mine]  # None: every source frame
        rates = [self._rates[r] for r, _ in mine if r in self._rates]
        # frames per second of the windows: data.fps, else the sources' median rate (None: unknown)
        self.frame_rate: Optional[float] = cfg.fps or (statistics.median(rates) if rates else None)
        self.labels = [self.class_names.index(_class_of(r, self._is_dir(r)))
                       if self.num_classes else 0 for r, _ in mine]
        # per source; None: data.captions is null
        self.captions: Optional[list[str]] = [self._caption_of[r] for r, _ in mine] if cfg.captions else None
        # (frames, height, width) of each source's items: its bucket's, or data's
        self.shapes = [(cfg.num_frames, cfg.height, cfg.width)] * len(mine) if self.plan is None else \
            [(b.num_frames, b.height, b.width) for b in map(self.plan.buckets.__getitem__, self.plan.bucket_of)]
        self.counts = [windows_per_clip(n, frames, cfg.frame_stride, cfg.window_stride)
                       for (_, n), (frames, _, _) in zip(self.sources, self.shapes)]
        self._first = np.cumsum([0] + self.counts)  # (S + 1,) first window of each source

    def _plan(self, mine: list[tuple[str, int]], train: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The bucket plan of this split's sources `mine` (`train`: the training split's, whose
        aspect ratios auto's buckets follow): sets `self.plan`, returns the sources it keeps.
        The training split refuses a plan that leaves everything, or an aspect ratio, unused."""
        def sample(rel: str, frames: int) -> Sample:
            h, w = self._sizes.get(rel, (self.cfg.height, self.cfg.width))
            return Sample(rel, self._is_still(rel), frames, h, w)
        unused = self._unused + list(self.skipped)
        self.plan, kept = BucketPlan.make(self.cfg, [sample(*m) for m in mine], [sample(*t) for t in train],
                                          self.rules, unused, refuse=self.split == "train")
        if not kept:  # a val split that no bucket takes: the training sources validate
            self.plan, kept = BucketPlan.make(self.cfg, [sample(*t) for t in train],
                                              [sample(*t) for t in train], self.rules, unused, refuse=False)
            return [train[i] for i in kept]
        return [mine[i] for i in kept]

    # ----------------------------------------------------------------- windows

    def __len__(self) -> int:
        return int(self._first[-1])

    def window(self, index: int) -> tuple[int, list[int]]:
        """(source index into `sources`, the frame indices of window `index`: of the clip
        resampled at data.fps when set, see `source_indices`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        src = int(np.searchsorted(self._first, index, side="right")) - 1
        start = (index - int(self._first[src])) * self.cfg.window_stride
        span = window_span(self.shapes[src][0], self.cfg.frame_stride)
        return src, list(range(start, start + span, self.cfg.frame_stride))

    def source_windows(self) -> list[tuple[str, list[list[int]]]]:
        """Per source, in dataset order: (path, frame indices of each of its windows)."""
        return [(path, [self.window(i)[1] for i in range(self._first[s], self._first[s + 1])])
                for s, (path, _) in enumerate(self.sources)]

    def set_epoch(self, epoch: int) -> None:
        """Pick this epoch's crops and flips (shared with DataLoader workers)."""
        self._epoch.fill_(epoch)

    def __getitem__(self, index: int) -> dict:
        index = int(index)  # numpy / tensor indices must seed like python ints
        src, frames = self.window(index)
        src, pixels = self._read_or_substitute(src, frames)  # (T, h, w, 3) uint8
        g = None
        if self.augment and (self.cfg.random_crop or self.cfg.hflip):
            g = torch.Generator().manual_seed(_seed(self.seed, int(self._epoch), index))
        item = {"video": self.transform(pixels, g, self.shapes[src][1:]), "label": self.labels[src]}
        if self.captions is not None:
            item["caption"] = self.captions[src]
        if self.plan is not None:
            item["bucket"] = self.plan.bucket_of[src]
        return item

    def _read_or_substitute(self, src: int, frames: list[int]) -> tuple[int, np.ndarray]:
        """(source read, the window's frames). A source that became unreadable after indexing
        (deleted, cut short, a symlink left dangling) is skipped for the rest of the run with
        one warning; its windows are served by the first window of the next readable source."""
        for attempt in range(self.num_sources):
            s = (src + attempt) % self.num_sources
            if self.shapes[s] != self.shapes[src]:  # a batch has one shape: its bucket's sources only
                continue
            window = frames if s == src else [f - frames[0] for f in frames]  # its first window
            pixels = self._try_read(s, window)
            if pixels is not None:
                return s, pixels
        raise UserError(f"data.path = {self.cfg.path}: none of the {self.num_sources} indexed "
                        "sources can be read any more (were the files moved or deleted?)")

    def _try_read(self, s: int, window: list[int]) -> Optional[np.ndarray]:
        """Frames `window` of source `s` (T, h, w, 3), or None when `s` cannot serve them. A
        failed read probes the source again once: if the index's entry was stale, it is
        corrected and the source keeps serving the windows it has; otherwise the file is at
        fault and skipped for the rest of the run (one warning each)."""
        path = self.sources[s][0]
        for _ in range(2):
            cap = self._caps.get(s)
            if s in self._unreadable or (cap is not None and window[-1] >= cap):
                return None
            try:
                return read_frames(path, self.source_indices(s, window))
            except (VideoReadError, OSError) as e:
                error = e
                if not self._correct_stale_entry(s):
                    break
        self._unreadable.add(s)
        warnings.warn(f"data.path = {self.cfg.path}: {path} could not be read any more "
                      f"({str(error).removeprefix(f'{path}: ')}); it is skipped for the rest of "
                      "this run, its windows served by other clips", DataWarning)
        return None

    def _correct_stale_entry(self, s: int) -> bool:
        """Probe source `s` again (once per run); True when the index had it wrong (its entry is
        replaced, and `s` now serves the windows that fit its true length)."""
        if s in self._reprobed:
            return False
        self._reprobed.add(s)
        path, indexed = self.sources[s]
        old, new = reprobe(os.path.abspath(path), self.index_file)
        if isinstance(new.frames, str):
            return False  # no answer now: the file is at fault
        rel = os.path.relpath(path, self.cfg.path).replace(os.sep, "/")
        length = self._length(rel, new, self.cfg.frame_folder_fps)
        if isinstance(length, str) or length == indexed:
            return False  # the same answer: the file is at fault
        self._frame_maps[s] = self._maps.get(rel)
        self._caps[s] = length
        where = f"data.index_cache = {self.index_file}" if self.index_file else "the data index"
        was = old.frames if old is not None else indexed
        warnings.warn(f"data.path = {self.cfg.path}: {where} had a stale entry for {path} "
                      f"({was} frames; the file has {new.frames}); it is corrected, and this "
                      f"run's windows past frame {length} are served by other clips", DataWarning)
        return True

    # ----------------------------------------------------------------- latent cache protocol

    @property
    def augments(self) -> bool:
        """Whether items change from epoch to epoch (then latents cannot be cached)."""
        return self.augment and (self.cfg.random_crop or self.cfg.hflip)

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def source_length(self, src: int) -> int:
        """Frames of source `src`: the index's count, or the true one where a failed read found
        the index entry stale (`_correct_stale_entry`)."""
        return self._caps.get(src, self.sources[src][1])

    def source_label(self, src: int) -> int:
        return self.labels[src]

    @property
    def has_captions(self) -> bool:
        return self.captions is not None

    def caption(self, index: int) -> str:
        """The caption of window `index` (its source's); ValueError without data.captions."""
        if self.captions is None:
            raise ValueError("this dataset has no captions (data.captions is null)")
        return self.captions[self.window(index)[0]]

    def source_caption(self, src: int, frames: Optional[list[int]] = None) -> str:
        """The caption of source `src` (any of its windows `frames`); ValueError without data.captions."""
        if self.captions is None:
            raise ValueError("this dataset has no captions (data.captions is null)")
        return self.captions[src]

    def distinct_captions(self) -> list[str]:
        """Every caption of this split once, sorted (what the text embedding cache encodes)."""
        return sorted(set(self.captions or []))

    def source_indices(self, src: int, indices: list[int]) -> list[int]:
        """Frames of the file behind the (resampled, with data.fps) frame `indices` of `src`."""
        frame_map = self._frame_maps[src]
        return list(indices) if frame_map is None else [frame_map[i] for i in indices]

    def source_frames(self, src: int, indices: list[int]) -> torch.Tensor:
        """Frames `indices` of source `src`, center-cropped, no augmentation: (3, n, H, W)."""
        return self.transform(read_frames(self.sources[src][0], self.source_indices(src, indices)),
                              size=self.shapes[src][1:])

    def iter_source_frames(self, src: int, indices: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, (3, H, W) center-cropped frame) for the increasing `indices` of source `src`,
        decoding it once, front to back, one frame in memory at a time (the latent cache).

        A read that fails is checked against the index as `__getitem__`'s are: when the index
        entry was stale (the file has fewer frames than it said), the entry is corrected, the
        frames the file has were yielded, and the iteration ends there (`source_length` then
        gives the true count); otherwise the file is at fault and the error is raised."""
        mapped = self.source_indices(src, indices)
        decoded = iter_frames(self.sources[src][0], sorted(set(mapped)))
        at, frame = -1, None
        try:
            for i, m in zip(indices, mapped):
                while at != m:  # a resampled clip may show one source frame twice
                    at, pixels = next(decoded)  # (h, w, 3) uint8
                    frame = self.transform(pixels[None], size=self.shapes[src][1:])[:, 0]  # (3, H, W)
                yield i, frame
        except (VideoReadError, OSError):
            if not self._correct_stale_entry(src):
                raise

    def cache_key(self) -> dict:
        """What the cached latents depend on besides the VAE: files (size, mtime) and pixels.
        The resolution is keyed as [height, width]: `32` and `[32, 32]` give the same pixels and
        share a cache."""
        files = []
        for path, _ in self.sources:
            parts = [path] + (list_frame_files(path) if os.path.isdir(path) else [])
            files.append([[p, os.path.getsize(p), os.path.getmtime(p)] for p in parts])
        key = {"path": os.path.abspath(self.cfg.path), "split": self.split,
               "resolution": [self.cfg.height, self.cfg.width], "crop": "center", "fps": self.cfg.fps,
               "frame_folder_fps": self.cfg.frame_folder_fps, "files": files}
        if self.plan is not None:  # each source's pixels are its bucket's size
            key["buckets"] = [list(shape[1:]) for shape in self.shapes]
        return key

    # ----------------------------------------------------------------- pixels

    def transform(self, frames: np.ndarray, g: Optional[torch.Generator] = None,
                  size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """(T, h, w, 3) uint8 -> (3, T, H, W) float in [-1, 1]: crop, resize, flip. H x W is
        `size` (a source's bucket), else data.resolution.

        The largest box of the target's aspect ratio is cropped from the frame (centered, or at
        a random place when `g` is given and cfg.random_crop; `cover_crop_box`), then resized
        to exactly H x W (bilinear, antialiased, in uint8). This is what resizing the frame to
        cover H x W and cropping would show, but not the same pixels: that route rounds the
        resized frame to whole pixels (640 x 480 to 32 x 32 would be resized to 43 x 32, a
        scale 1% off across) and crops at whole resized pixels, where this one rounds the box
        to whole source pixels and resizes once, with one scale per axis. The two agree exactly
        when the frame already has the target's aspect ratio (tests/test_data_hardening.py).
        """
        height, width = size or (self.cfg.height, self.cfg.width)
        x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w")  # uint8
        x = crop_resize(x, height, width, self._crop_box(x.shape[2], x.shape[3], g, height, width)).float()
        if g is not None and self.cfg.hflip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)  # one flip for every frame of the window
        x = (x / 127.5 - 1).clamp(-1, 1)
        return rearrange(x, "t c h w -> c t h w").contiguous()  # (3, T, H, W)

    def _crop_box(self, h: int, w: int, g: Optional[torch.Generator], height: int,
                  width: int) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) in an h x w source frame for a height x width target."""
        rng = g if self.cfg.random_crop else None
        return cover_crop_box(h, w, height, width, rng)


def crop_resize(x: torch.Tensor, height: int, width: int,
                box: tuple[int, int, int, int]) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, height, width) uint8: the `box` (top, left, box_h, box_w)
    cut out and resized (bilinear, antialiased): how training clips (and predict's `image`)
    are brought to data.resolution."""
    top, left, box_h, box_w = box
    x = x[:, :, top: top + box_h, left: left + box_w]  # (T, 3, box_h, box_w)
    if (box_h, box_w) != (height, width):  # resized in uint8: a 4K frame never exists as float
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                          align_corners=False)  # (T, 3, H, W)
    return x


def cover_crop_box(h: int, w: int, height: int, width: int,
                   g: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w): the largest box of aspect ratio height:width inside an h x w
    frame (all in pixels): its full width when the frame is taller than the target, else its
    full height. Centered, or at a uniformly random place drawn from `g` (top, then left).
    Resizing the box to height x width shows what resizing the frame to cover the target and
    cropping would, without rounding the resized frame's size (see `VideoFolder.transform`).
    """
    if h * width > w * height:  # taller than the target: keep the width, crop rows
        box_h, box_w = min(h, (2 * w * height + width) // (2 * width)), w  # round(w * height / width)
    else:  # wider (or the same shape): keep the height, crop columns
        box_h, box_w = h, min(w, (2 * h * width + height) // (2 * height))
    box_h, box_w = max(box_h, 1), max(box_w, 1)
    if g is None:
        return (h - box_h) // 2, (w - box_w) // 2, box_h, box_w
    top = int(torch.randint(0, h - box_h + 1, (), generator=g))
    left = int(torch.randint(0, w - box_w + 1, (), generator=g))
    return top, left, box_h, box_w
