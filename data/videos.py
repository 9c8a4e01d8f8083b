"""A folder of videos and frame folders as a dataset of sliding windows.

Sources. `data.path` is searched recursively (hidden files and folders skipped) for video
files (`VIDEO_EXTS`, any case) and for frame folders: a folder holding numbered png/jpg
files and no video is one source clip whose frames are sorted by the number in their names
(images next to videos, e.g. thumbnails, are not frames).

Windows. A window is `num_frames` frames, one every `frame_stride` source frames, so it spans
`(num_frames - 1) * frame_stride + 1` source frames; a new window starts every
`window_stride` source frames. Only the frame counts are read at construction (a process-wide
memo keyed by path, size and mtime lets the val split reuse the train split's scan); pixels
are decoded per item, only the frames the item needs.

Labels. `data.labels: subfolder`: class = index of the top-level subfolder holding the
clip's files, among the sorted names of all top-level subfolders with clips (the same for
both splits); clips directly in `data.path` are skipped. `none`: label 0, num_classes 0.

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
import warnings
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset
from tqdm import tqdm

from data.windows import window_span, windows_per_clip
from utils.config import DataConfig
from utils.errors import MissingFileError, UserError
from utils.video_io import (FRAME_EXTS, VIDEO_EXTS, VideoReadError, count_frames,
                            frame_number_gaps, list_frame_files, read_frames)

SPLITS = ("train", "val")
PROGRESS_MIN_SOURCES = 64  # show the indexing progress bar from this many sources on
MAX_LISTED = 20  # problem files named in one warning; the rest are counted

# path -> (size, mtime_ns, frame count or reason it is unusable, numbering gaps)
_SCAN_MEMO: dict[str, tuple[int, int, Union[int, str], list[tuple[int, int]]]] = {}


class DataWarning(UserWarning):
    """A data problem that does not stop training (skipped files, gaps in frame numbering)."""


# --------------------------------------------------------------------------- finding sources


def find_sources(root: str) -> list[str]:
    """Relative posix paths of the video files and frame folders under `root`, sorted."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        videos = [f for f in files if f.lower().endswith(VIDEO_EXTS) and not f.startswith(".")]
        found += [f if rel == "." else f"{rel}/{f}" for f in videos]
        if not videos and list_frame_files(folder):  # images beside videos are not frames
            found.append(rel)
    return sorted(found)


def _scan(path: str) -> tuple[Union[int, str], list[tuple[int, int]]]:
    """(frame count or the reason the source is unusable, gaps in a frame folder's numbering)."""
    st = os.stat(path)
    memo = _SCAN_MEMO.get(path)
    if memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns):
        return memo[2], memo[3]
    count: Union[int, str]
    gaps: list[tuple[int, int]] = []
    if os.path.isdir(path):
        files = list_frame_files(path)
        count, gaps = len(files), frame_number_gaps(files)
    else:
        try:
            count = count_frames(path)
        except VideoReadError as e:
            count = str(e).removeprefix(f"{path}: ")
    _SCAN_MEMO[path] = (st.st_size, st.st_mtime_ns, count, gaps)
    return count, gaps


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

    Items: {"video": (3, T, H, W) float32 in [-1, 1], "label": int}, T = cfg.num_frames,
    H x W = cfg.resolution (a square side or [height, width]). `augment` (default: split ==
    "train") enables cfg.random_crop and cfg.hflip; a latent cache passes augment=False to get
    the deterministic center crop.
    """

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0,
                 augment: Optional[bool] = None):
        if split not in SPLITS:
            raise ValueError(f"split = {split!r}: use one of {SPLITS}")
        self.cfg, self.split, self.seed = cfg, split, seed
        self.augment = (split == "train") if augment is None else augment
        self.span = window_span(cfg.num_frames, cfg.frame_stride)  # source frames per window
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        rels = self._find(cfg.path)
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

    def _find(self, root: str) -> list[str]:
        if not os.path.exists(root):
            raise MissingFileError(f"data.path = {root}: folder not found; point data.path at a "
                                   "folder of videos or use builtin:moving_shapes")
        if not os.path.isdir(root):
            raise UserError(f"data.path = {root}: is a file; point data.path at the folder "
                            "that holds the videos")
        rels = find_sources(root)
        if not rels:
            raise UserError(f"data.path = {root}: no videos ({' '.join(VIDEO_EXTS)}) and no "
                            f"folders of numbered frames ({' '.join(FRAME_EXTS)}) found in it "
                            "or its subfolders")
        return rels

    def _index(self, rels: list[str]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
        """Count frames of every source: (usable (rel, frames), skipped (rel, reason))."""
        usable, skipped, gappy = [], [], []
        few = len(rels) < PROGRESS_MIN_SOURCES
        for rel in tqdm(rels, desc=f"indexing {self.cfg.path}", unit="clip", disable=few):
            count, gaps = _scan(os.path.join(self.cfg.path, rel))
            if gaps:
                gappy.append(_describe_gaps(rel, gaps))
            if self.num_classes and _class_of(rel, self._is_dir(rel)) is None:
                skipped.append((rel, "not inside a class subfolder (data.labels: subfolder)"))
            elif isinstance(count, str):
                skipped.append((rel, count))
            elif count < self.span:
                skipped.append((rel, f"too short: {count} frames, a window needs {self.span}"))
            else:
                usable.append((rel, count))
        self._warn(f"{len(gappy)} frame folder(s) have gaps in their frame numbering; their "
                   "frames are used in order anyway", gappy)
        self._warn(f"skipped {len(skipped)} of {len(rels)} sources",
                   [f"{r}: {why}" for r, why in skipped])
        if not usable:
            raise UserError(self._nothing_usable(rels, skipped))
        return usable, skipped

    def _warn(self, headline: str, lines: list[str]) -> None:
        if not lines:
            return
        more = [f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
        text = "\n  ".join([f"data.path = {self.cfg.path}: {headline}:"] + lines[:MAX_LISTED] + more)
        warnings.warn(text, DataWarning, stacklevel=2)  # a fixed location: repeats show once

    def _nothing_usable(self, rels: list[str], skipped: list[tuple[str, str]]) -> str:
        counts = [_scan(os.path.join(self.cfg.path, r))[0] for r in rels]
        lengths = [c for c in counts if isinstance(c, int) and c < self.span]  # too short
        head = f"data.path = {self.cfg.path}: no usable clip among {len(rels)} sources. "
        if lengths:
            return head + (
                f"The longest has {max(lengths)} frames but one window of data.num_frames = "
                f"{self.cfg.num_frames} every data.frame_stride = {self.cfg.frame_stride} frames "
                f"spans {self.span}; lower data.num_frames or data.frame_stride.")
        reasons = "; ".join(f"{r}: {why}" for r, why in skipped[:MAX_LISTED])
        return head + f"None could be read: {reasons}"

    def _use_split(self, usable: list[tuple[str, int]]) -> None:
        is_val = split_is_val([r for r, _ in usable], self.cfg.val_fraction)
        mine = [s for s, v in zip(usable, is_val) if v == (self.split == "val")]
        if not mine:  # 1 source, or val_fraction = 0: val reuses the training clips
            mine = usable
            why = "only one usable clip" if len(usable) == 1 else "data.val_fraction = 0"
            warnings.warn(f"data.path = {self.cfg.path}: {why}, so the val split reuses the "
                          "training clips", DataWarning)
        cfg = self.cfg
        self.sources = [(os.path.join(cfg.path, r), n) for r, n in mine]  # (path, frames)
        self.labels = [self.class_names.index(_class_of(r, self._is_dir(r)))
                       if self.num_classes else 0 for r, _ in mine]
        counts = [windows_per_clip(n, cfg.num_frames, cfg.frame_stride, cfg.window_stride)
                  for _, n in self.sources]
        self._first = np.cumsum([0] + counts)  # (S + 1,) first window of each source

    # ----------------------------------------------------------------- windows

    def __len__(self) -> int:
        return int(self._first[-1])

    def window(self, index: int) -> tuple[int, list[int]]:
        """(source index into `sources`, the source frame indices of window `index`)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        src = int(np.searchsorted(self._first, index, side="right")) - 1
        start = (index - int(self._first[src])) * self.cfg.window_stride
        return src, list(range(start, start + self.span, self.cfg.frame_stride))

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
        pixels = read_frames(self.sources[src][0], frames)  # (T, h, w, 3) uint8
        g = None
        if self.augment and (self.cfg.random_crop or self.cfg.hflip):
            g = torch.Generator().manual_seed(_seed(self.seed, int(self._epoch), index))
        return {"video": self.transform(pixels, g), "label": self.labels[src]}

    # ----------------------------------------------------------------- latent cache protocol

    @property
    def augments(self) -> bool:
        """Whether items change from epoch to epoch (then latents cannot be cached)."""
        return self.augment and (self.cfg.random_crop or self.cfg.hflip)

    @property
    def num_sources(self) -> int:
        return len(self.sources)

    def source_length(self, src: int) -> int:
        return self.sources[src][1]

    def source_label(self, src: int) -> int:
        return self.labels[src]

    def source_frames(self, src: int, indices: list[int]) -> torch.Tensor:
        """Frames `indices` of source `src`, center-cropped, no augmentation: (3, n, H, W)."""
        return self.transform(read_frames(self.sources[src][0], indices))

    def cache_key(self) -> dict:
        """What the cached latents depend on besides the VAE: files (size, mtime) and pixels.
        The resolution is keyed as [height, width]: `32` and `[32, 32]` give the same pixels and
        share a cache."""
        files = []
        for path, _ in self.sources:
            parts = [path] + (list_frame_files(path) if os.path.isdir(path) else [])
            files.append([[p, os.path.getsize(p), os.path.getmtime(p)] for p in parts])
        return {"path": os.path.abspath(self.cfg.path), "split": self.split,
                "resolution": [self.cfg.height, self.cfg.width], "crop": "center", "files": files}

    # ----------------------------------------------------------------- pixels

    def transform(self, frames: np.ndarray, g: Optional[torch.Generator] = None) -> torch.Tensor:
        """(T, h, w, 3) uint8 -> (3, T, H, W) float in [-1, 1]: crop, resize, flip.

        The frame is resized to cover H x W keeping its aspect ratio, then cropped (centered,
        or at a random place when `g` is given and cfg.random_crop). Cropping the largest box
        of the target's aspect ratio first (`cover_crop_box`) and resizing it to H x W gives
        the same pixels with fewer to resize.
        """
        height, width = self.cfg.height, self.cfg.width
        x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w").float()
        top, left, box_h, box_w = self._crop_box(x.shape[2], x.shape[3], g)
        x = x[:, :, top: top + box_h, left: left + box_w]  # (T, 3, box_h, box_w)
        if (box_h, box_w) != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                              align_corners=False)  # (T, 3, H, W)
        if g is not None and self.cfg.hflip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)  # one flip for every frame of the window
        x = (x / 127.5 - 1).clamp(-1, 1)
        return rearrange(x, "t c h w -> c t h w").contiguous()  # (3, T, H, W)

    def _crop_box(self, h: int, w: int, g: Optional[torch.Generator]) -> tuple[int, int, int, int]:
        """(top, left, box height, box width) in an h x w source frame."""
        rng = g if self.cfg.random_crop else None
        return cover_crop_box(h, w, self.cfg.height, self.cfg.width, rng)


def cover_crop_box(h: int, w: int, height: int, width: int,
                   g: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w): the largest box of aspect ratio height:width inside an h x w
    frame (all in pixels): its full width when the frame is taller than the target, else its
    full height. Centered, or at a uniformly random place drawn from `g` (top, then left).
    Resizing the box to height x width = resizing the frame to cover the target, then cropping.
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
