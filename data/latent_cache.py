"""Latent cache: each source clip's frames encoded once by the frozen VAE.

Because the VAE never changes in stage 2, encoding every training window at every step
repeats the same work. The cache stores the posterior mean and std of every frame of every
source (so training can still sample the posterior) and serves sliding windows as slices.

Two layouts, by what the VAE allows:
- per frame (image VAEs, `per_window=False`): each source's frames are encoded once and
  windows are slices of them: {source: {"mean", "std"}}, each (C, L, h, w) float32.
- per window (causal video VAEs, `per_window=True`): a causal VAE's latents of a long clip
  are not the latents of a window cut from it (its first latent frame sees one frame, the
  others see what came before), so every window is encoded as its own clip, exactly as
  encoding that window directly would: {source: {"mean", "std": (N, C, t, h, w), "frames":
  (N, T) source frame indices of each of its N windows}}. Overlapping windows cost their
  frames again; training reads them exactly.

Layout on disk (`<run>/latent_cache/`): `manifest.json` (the key: VAE fingerprint and
settings, data config, file list with sizes and mtimes; which shard holds which source; the
VAE's class, geometry and normalisation as a record) and `shard_r{rank}_{k}.pt` files.
A key that differs from the manifest's rebuilds the cache, saying what changed. Ranks
encode disjoint sources in parallel. This module takes an encode function, so `data/`
never imports `models/`.

Key. Everything that decides what is cached: the VAE, the dataset's pixels (files, sizes,
mtimes, resolution, frame rate) and, for the per-window layout, the windows themselves
(data.num_frames, frame_stride, window_stride, and a digest of every window's frames): a
cache built with another window stride is rebuilt, never served (it raised a KeyError in a
DataLoader worker). `load` also checks that the cached windows are the dataset's.

Unreadable sources. A source that cannot be decoded while building (a frame folder whose
images differ in size, a file cut short after indexing) is recorded as skipped with its
reason (one DataWarning), as reading it with the cache off does; its windows are served by
the first window of the next usable source.

Stale index entries. A source whose file ends before its data index entry said (the file
changed but kept its size and mtime, or a shared index was edited) is corrected by the
dataset when the build reads past its end (`iter_source_frames` stops there, the index is
rewritten): its entry then holds the frames (windows) it has, flagged `short`, and its
windows past the end are served by the next usable source, as for a skipped source. Nothing
is blamed on the file and the good frames are kept.

Healing. A manifest or shard that cannot be read, or that does not cover every source with
well-formed latents, is reported (`CacheCorruptError`) and the cache is rebuilt. A build is
written shard by shard (every `SOURCES_PER_SHARD` sources or `SHARD_BYTES`), each shard
followed by `progress_r{rank}.json` (the key, the world size, the shards written): a build
killed part-way resumes with the sources it had not finished. The manifest is written last.

Building decodes each source once, front to back (`iter_source_frames`: one frame in memory
at a time, resized before it becomes float), and encodes frames or windows as they complete,
in chunks bounded by pixels, not frames, so a long or 4K source needs no more memory than a
short small one.

Buckets (`data.buckets`): each source is encoded at its bucket's size (the dataset's
`iter_source_frames` gives its frames so), so an entry's latents carry their own shape; the
key holds every source's size; a skipped source is served by another of its bucket, and items
carry their "bucket".

Datasets provide: `num_sources`, `source_length(i)`, `source_label(i)`,
`iter_source_frames(i, increasing indices) -> (index, (3, H, W))` (no augmentation),
`window(index) -> (source, frame indices)`, `augments` and `cache_key()`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from data.source_index import DataWarning
from utils.checkpoint import atomic_save, write_json
from utils.errors import UserError
from utils.paths import remove_file

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (B,3,T,H,W) -> mean, std (B,C,t,h,w)
SOURCES_PER_SHARD = 256
SHARD_BYTES = 256 * 2**20  # a shard is also closed at this size: a killed build loses less
SHARD_NAME = re.compile(r"shard_r\d+_\d{5,}\.pt")  # what `build_part` names a shard
SHORT = "short"  # entry flag: the source ended before the data index said (its first frames only)
PIXELS_PER_ENCODE = 1 << 22  # frame pixels (after resize) per encode call: ~50 MB of float pixels


def window_key(dataset) -> dict:
    """What decides which windows a per-window cache holds: the window settings (named in the
    message when they change) and a digest of every window's (source, frames)."""
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        src, frames = dataset.window(index)
        digest.update(repr((src, list(frames))).encode())
    cfg = getattr(dataset, "cfg", None)
    settings = {k: getattr(cfg, k) for k in ("num_frames", "frame_stride", "window_stride")
                if hasattr(cfg, k)}
    return {**settings, "windows": digest.hexdigest()[:16]}


def cache_key(dataset, vae_fingerprint: str, vae_settings: Optional[dict] = None) -> dict:
    """What the cached latents depend on: the VAE (fingerprint, and settings such as its dtype
    and layout) and the dataset's pixels."""
    return {"vae_fingerprint": vae_fingerprint, **(vae_settings or {}), **dataset.cache_key()}


class CacheCorruptError(Exception):
    """The cache on disk cannot be used as it is (unreadable, partial or malformed): rebuild it."""


def describe_change(old: dict, new: dict) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    names = {"vae_fingerprint": "the VAE changed", "files": "the video files changed",
             "vae_dtype": "vae.dtype changed", "layout": "the VAE's temporal compression changed",
             "windows": "the windows changed"}
    return ", ".join(names.get(k, f"data setting {k!r} changed") for k in changed)


class LatentCache:
    """Builds (if needed) and loads the cache for `dataset` in `cache_dir`."""

    def __init__(self, dataset, cache_dir: str, key: dict, per_window: bool = False,
                 vae_record: Optional[dict] = None):
        self.per_window = per_window  # encode each window as its own clip (causal video VAEs)
        # per window, the windows are what is cached: they belong to the key
        self.dataset, self.dir = dataset, cache_dir
        self.key = {**key, **window_key(dataset)} if per_window else key
        self.vae_record = vae_record or {}  # class, geometry, normalisation: written to the manifest
        self.manifest_path = os.path.join(cache_dir, "manifest.json")

    def status(self) -> tuple[bool, str]:
        """(usable, why not) for the cache on disk, from the manifest alone (`load` checks the
        shards' contents)."""
        if not os.path.isfile(self.manifest_path):
            return False, "no cache yet"
        try:
            manifest = self._manifest()
        except CacheCorruptError as e:
            return False, str(e)
        if manifest["key"] != self.key:
            return False, describe_change(manifest["key"], self.key)
        missing = sorted({s for s in manifest["shards"].values()
                          if not os.path.isfile(os.path.join(self.dir, s))})
        return (False, f"shard files missing: {missing[:3]}") if missing else (True, "")

    def build_part(self, encode: EncodeFn, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> dict[int, str]:
        """Encode this rank's sources (every world_size-th), resuming a killed build of the
        same key; returns {source: shard file}."""
        os.makedirs(self.dir, exist_ok=True)
        if rank == 0:  # the manifest is written again once every rank is done
            remove_file(self.manifest_path)
        written = self._progress(rank, world_size)
        if not written:
            self._remove_rank_files(rank)
        mine = [s for s in range(rank, self.dataset.num_sources, world_size) if s not in written]
        k = len(set(written.values()))
        shard, size = {}, 0
        windows = self._windows_by_source() if self.per_window else {}
        bar = tqdm(mine, desc="latent cache", disable=not progress, dynamic_ncols=True,
                   initial=len(written), total=len(written) + len(mine))
        for src in bar:
            try:
                shard[src] = (self._encode_windows(src, windows.get(src, []), encode) if self.per_window
                              else self._encode_source(src, encode))
            except (UserError, OSError) as e:  # this source's pixels cannot be read: skip it
                shard[src] = {"skipped": str(e)}
                _warn_skipped({src: str(e)}, "building the latent cache")
            size += sum(t.numel() * t.element_size() for t in shard[src].values() if torch.is_tensor(t))
            if len(shard) == SOURCES_PER_SHARD or size >= SHARD_BYTES or src == mine[-1]:
                name = f"shard_r{rank}_{k:05d}.pt"
                atomic_save(shard, os.path.join(self.dir, name))
                written.update({s: name for s in shard})
                self._write_progress(rank, world_size, written)
                shard, size, k = {}, 0, k + 1
        return written

    def write_manifest(self, shards: dict[int, str]) -> None:
        """Rank 0, once every rank's part is written: the cache is complete; progress records go."""
        manifest = {"key": self.key, "vae": self.vae_record,
                    "layout": "window" if self.per_window else "frame",
                    "shards": {str(s): name for s, name in sorted(shards.items())}}
        write_json(manifest, self.manifest_path)
        for path in glob.glob(os.path.join(glob.escape(self.dir), "progress_r*.json")):
            remove_file(path)

    def load(self) -> "CachedWindows":
        """The cached windows; `CacheCorruptError` names what is wrong when the cache on disk is
        unreadable, partial or malformed."""
        shards = self._manifest()["shards"]
        missing = sorted(set(range(self.dataset.num_sources)) - {int(k) for k in shards})
        if missing:
            raise CacheCorruptError(f"the manifest covers {self.dataset.num_sources - len(missing)} "
                                    f"of {self.dataset.num_sources} sources")
        latents: dict[int, dict] = {}
        for name in sorted(set(shards.values())):
            path = os.path.join(self.dir, name)
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # truncated, overwritten, not a torch file: all mean "rebuild"
                raise CacheCorruptError(f"shard {path} cannot be read ({type(e).__name__})") from None
            if not isinstance(part, dict):
                raise CacheCorruptError(f"shard {path} is not a dict of latents")
            latents.update(part)
        windows = self._windows_by_source() if self.per_window else {}
        short = [src for src in range(self.dataset.num_sources)
                 if self._check_entry(src, latents.get(src), windows.get(src, []))]
        latents = {src: latents[src] for src in range(self.dataset.num_sources)}  # nothing else a shard holds
        if short:
            warnings.warn(f"{len(short)} source(s) of the latent cache {self.dir} ended before their "
                          f"data index entry said (a stale entry, corrected when the cache was built): "
                          f"their windows past the end are served by other clips (sources {short[:20]})",
                          DataWarning, stacklevel=2)
        skipped = {s: e["skipped"] for s, e in latents.items() if "skipped" in e}
        if len(skipped) == self.dataset.num_sources:
            raise UserError(f"none of the {len(skipped)} sources could be read for the latent "
                            f"cache {self.dir}: " + "; ".join(sorted(set(skipped.values()))[:5]))
        if skipped:
            _warn_skipped(skipped, "in the latent cache")
        plan = getattr(self.dataset, "plan", None)
        for b, bucket in enumerate(plan.buckets if plan is not None else []):
            mine = [s for s, x in enumerate(plan.bucket_of) if x == b]
            if mine and all(s in skipped for s in mine):  # nothing of that shape to serve its batches
                raise UserError(f"none of the {len(mine)} sources of bucket {bucket.name} could be read for "
                                f"the latent cache {self.dir}: " + "; ".join(sorted(set(skipped[s] for s in mine))[:5]))
        return CachedWindows(self.dataset, latents)

    def _manifest(self) -> dict:
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise CacheCorruptError(f"{self.manifest_path} cannot be read ({type(e).__name__}: {e})") from None
        if not (isinstance(manifest, dict) and isinstance(manifest.get("key"), dict)
                and isinstance(manifest.get("shards"), dict)):
            raise CacheCorruptError(f"{self.manifest_path} lacks its 'key' or 'shards'")
        try:
            _check_shards(manifest["shards"])
        except ValueError as e:
            raise CacheCorruptError(f"{self.manifest_path}: {e}") from None
        return manifest

    def _check_entry(self, src: int, entry, windows: list[list[int]]) -> bool:
        """A source's latents are complete: mean and std of every frame (or of every one of
        the dataset's windows, exactly those), or the reason it was skipped. A source whose
        file ended before its index said (`SHORT`: a stale index entry, corrected while
        building) holds its first frames (windows) only. Returns whether it is short of what
        the dataset asks, which other processes, still holding the stale entry, may see."""
        if isinstance(entry, dict) and isinstance(entry.get("skipped"), str):
            return False
        ok = isinstance(entry, dict) and all(torch.is_tensor(entry.get(k)) for k in ("mean", "std"))
        short = ok and entry.get(SHORT) is True
        if ok and self.per_window:
            ok = torch.is_tensor(entry.get("frames")) and entry["mean"].shape[0] == entry["frames"].shape[0]
            cached = entry["frames"].tolist() if ok else []
            if ok and cached != (windows[:len(cached)] if short else windows):
                raise CacheCorruptError(f"the cached windows of source {src} are not the dataset's "
                                        "(data.num_frames, frame_stride or window_stride changed)")
            short = short and len(cached) < len(windows)
        elif ok:
            length = entry["mean"].shape[1] if entry["mean"].ndim == 4 else -1  # (C, L, h, w)
            wanted = self.dataset.source_length(src)
            ok = length == wanted or short and 0 < length < wanted
            short = short and length < wanted
        if not ok or entry["mean"].shape != entry["std"].shape:
            raise CacheCorruptError(f"the latents of source {src} are missing or incomplete")
        return short

    def _progress_path(self, rank: int) -> str:
        return os.path.join(self.dir, f"progress_r{rank}.json")

    def _progress(self, rank: int, world_size: int) -> dict[int, str]:
        """{source: shard} this rank wrote in a build of the same key that did not finish."""
        try:
            with open(self._progress_path(rank)) as f:
                record = json.load(f)
            if record["key"] != self.key or record["world_size"] != world_size:
                return {}
            _check_shards(record["shards"])
            done = {int(s): name for s, name in record["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        if not all(os.path.isfile(os.path.join(self.dir, n)) for n in done.values()):
            return {}
        return done

    def _write_progress(self, rank: int, world_size: int, written: dict[int, str]) -> None:
        write_json({"key": self.key, "world_size": world_size,
                     "shards": {str(s): n for s, n in sorted(written.items())}}, self._progress_path(rank))

    def _remove_rank_files(self, rank: int) -> None:
        """Shards and progress of an earlier build by this rank: a fresh build starts clean."""
        for path in glob.glob(os.path.join(glob.escape(self.dir), f"shard_r{rank}_*.pt*")):
            remove_file(path)  # never a symlink, nor what it points at
        remove_file(self._progress_path(rank))

    def _windows_by_source(self) -> dict[int, list[list[int]]]:
        """{source: frame indices of each of its windows}, from the dataset's `window(index)`:
        the windows that fit in the source (all of them, unless a stale index entry was
        corrected in this process)."""
        out: dict[int, list[list[int]]] = {}
        for index in range(len(self.dataset)):
            src, frames = self.dataset.window(index)
            if frames[-1] < self.dataset.source_length(src):
                out.setdefault(src, []).append(list(frames))
        return out

    def _encode_windows(self, src: int, windows: list[list[int]], encode: EncodeFn) -> dict:
        """Each window of `src` encoded as its own clip: {"mean", "std": (N, C, t, h, w), "frames": (N, T)}.

        The source is decoded once, front to back; a window is encoded once its last frame is
        in, and frames before the next window's start are dropped (`windows` come in dataset
        order: increasing starts).
        """
        needed = sorted({i for w in windows for i in w})
        frames = self.dataset.iter_source_frames(src, needed)
        held: dict[int, torch.Tensor] = {}  # decoded frames still needed: index -> (3, H, W)
        means, stds, group, done = [], [], [], []
        for k, window in enumerate(windows):
            while window[-1] not in held and (got := next(frames, None)) is not None:
                held[got[0]] = got[1]
            if window[-1] not in held:  # the source ended early (a stale index entry, corrected)
                break
            group.append(torch.stack([held[i] for i in window], dim=1))  # (3, T, H, W)
            done.append(window)
            if k + 1 < len(windows):
                held = {i: f for i, f in held.items() if i >= windows[k + 1][0]}
            if len(group) * group[0][0].numel() >= PIXELS_PER_ENCODE:
                means, stds = self._encoded(group, encode, means, stds)
                group = []
        if group:  # the last windows
            means, stds = self._encoded(group, encode, means, stds)
        if not done:
            return {"skipped": "it ends before its first window's last frame (the data index said more frames)"}
        entry = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                 "frames": torch.tensor(done, dtype=torch.long)}
        return {**entry, SHORT: True} if len(done) < len(windows) else entry

    @staticmethod
    def _encoded(group: list[torch.Tensor], encode: EncodeFn, means: list, stds: list) -> tuple[list, list]:
        """`means` and `stds` with the group of windows (3, T, H, W) encoded, (n, C, t, h, w) each."""
        mean, std = encode(torch.stack(group))
        return means + [mean.cpu()], stds + [std.cpu()]

    def _encode_source(self, src: int, encode: EncodeFn) -> dict:
        """Every frame of `src`, decoded once front to back and encoded in chunks of about
        PIXELS_PER_ENCODE pixels: {"mean", "std": (C, L, h, w)}."""
        length = self.dataset.source_length(src)
        frames = self.dataset.iter_source_frames(src, range(length))
        means, stds = [], []
        for chunk in _chunks(frames, PIXELS_PER_ENCODE):
            pixels = torch.stack(chunk, dim=1)  # (3, n, H, W) in [-1, 1]
            mean, std = encode(pixels[None])  # (1, C, n, h, w) each
            means.append(mean[0].cpu())
            stds.append(std[0].cpu())
        if not means:
            return {"skipped": "it has no frame the data index said it had"}
        entry = {"mean": torch.cat(means, dim=1).contiguous(),  # (C, L, h, w)
                 "std": torch.cat(stds, dim=1).contiguous()}
        return {**entry, SHORT: True} if entry["mean"].shape[1] < length else entry


def _check_shards(shards: dict) -> None:
    """{source: shard file} as a manifest or progress record holds it: every source a
    non-negative integer, every shard a file of this cache inside its folder (never a path);
    ValueError naming the first entry that is not."""
    for src, name in shards.items():
        if not (isinstance(src, str) and src.isascii() and src.isdigit()):
            raise ValueError(f"source {src!r} is not a source number")
        if not (isinstance(name, str) and SHARD_NAME.fullmatch(name)):
            raise ValueError(f"shard {name!r} of source {src} is not a shard file of this cache "
                             "(shard_rR_NNNNN.pt)")


def _chunks(frames: Iterator[tuple[int, torch.Tensor]], max_pixels: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive frames (3, H, W) in groups that close once they hold `max_pixels` pixels."""
    group: list[torch.Tensor] = []
    for _, frame in frames:
        group.append(frame)
        if len(group) * frame[0].numel() >= max_pixels:
            yield group
            group = []
    if group:
        yield group


def _warn_skipped(skipped: dict[int, str], when: str) -> None:
    lines = "\n  ".join(f"source {s}: {why}" for s, why in sorted(skipped.items())[:20])
    warnings.warn(f"{len(skipped)} source(s) could not be read {when}; their windows are served "
                  f"by other clips:\n  {lines}", DataWarning, stacklevel=3)


class CachedWindows(Dataset):
    """The dataset's windows, served from cached latents: {"mean", "std": (C, T, h, w), "label"}
    (+ "caption": the window's caption when the dataset has captions; + "bucket" with buckets).
    A skipped source's windows are served by the first window of the next usable source of
    its bucket (of any source without buckets)."""

    def __init__(self, dataset, latents: dict[int, dict]):
        self.dataset, self.latents = dataset, latents
        self.num_classes = dataset.num_classes
        self.class_names = list(getattr(dataset, "class_names", []))
        self.frame_rate = getattr(dataset, "frame_rate", None)
        self.labels = [dataset.source_label(i) for i in range(dataset.num_sources)]  # once, not per item
        self.plan = getattr(dataset, "plan", None)  # buckets: a substitute must have the same shape
        self.shapes = getattr(dataset, "shapes", None) or [None] * dataset.num_sources
        self.rows = {(src, tuple(f)): row for src, entry in latents.items() if "frames" in entry
                     for row, f in enumerate(entry["frames"].tolist())}  # per-window layout

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        wanted, frames = self.dataset.window(index)
        n = len(self.latents)
        src = next(s for s in ((wanted + k) % n for k in range(n)) if self.shapes[s] == self.shapes[wanted]
                   and self._serves(s, frames if s == wanted else [f - frames[0] for f in frames]))
        if src != wanted:
            frames = [f - frames[0] for f in frames]  # the substitute's first window
        entry = self.latents[src]
        if "frames" in entry:  # per window: the window's own encoding
            row = self.rows[(src, tuple(frames))]
            item = {"mean": entry["mean"][row], "std": entry["std"][row],  # (C, t, h, w)
                    "label": self.labels[src]}
        else:
            idx = torch.as_tensor(frames)
            item = {"mean": entry["mean"][:, idx], "std": entry["std"][:, idx],  # (C, T, h, w)
                    "label": self.labels[src]}
        if getattr(self.dataset, "has_captions", False):  # a substitute's latents get its own caption
            item["caption"] = self.dataset.caption(index) if src == wanted else self.dataset.captions[src]
        if self.plan is not None:
            item["bucket"] = self.plan.bucket_of[src]
        return item

    def _serves(self, src: int, frames: list[int]) -> bool:
        """Whether source `src` has the latents of window `frames` (not skipped, and not past
        the end of a source that ended early)."""
        entry = self.latents[src]
        if "skipped" in entry:
            return False
        if "frames" in entry:
            return (src, tuple(frames)) in self.rows
        return frames[-1] < entry["mean"].shape[1]


def cache_disabled_reason(dataset, mode: str) -> Optional[str]:
    """Why the cache is not used (None: use it). Augmentation changes pixels every epoch."""
    if mode == "off":
        return "data.cache is off"
    if getattr(dataset, "augments", False):
        return ("data.random_crop / data.hflip change the pixels every epoch, so latents cannot "
                "be cached; set both to false to use the cache")
    return None
