"""Aspect-ratio and duration buckets (`data.buckets`): the shape each sample trains at, and
batches of one shape, the same on every rank.

Buckets. A bucket is a shape (height x width pixels, num_frames frames) and a batch size per
process. `data.buckets: auto` makes one bucket per aspect ratio present in the training split
(musubi-tuner's rule): a sample of aspect ratio a = width / height gets the size of about
`data.bucket_area` pixels (null: data.resolution's area) with that ratio, both sides snapped to
multiples of what the VAE and the patch need (`Rules.multiple`); samples that snap to the same
size share it; clips get data.num_frames frames, images 1. A list gives the buckets. A batch
size left null (and every auto one) keeps the tokens per batch of train.batch_size samples of
data.resolution x data.num_frames (Open-Sora's bucket_config idea: more images and short clips
per batch than long clips).

Assignment. Each sample goes to the bucket nearest its aspect ratio (|log| of the ratio of
ratios) among those it can fill: a clip of L frames fills a bucket of n >= 2 frames when one
window of n frames (every data.frame_stride) fits in it, and then takes the longest such n; an
image (a still, one frame) fills the one-frame buckets only, and clips never go to those. Ties
go to the nearest area. The sample is resized and center-cropped (or randomly, with
data.random_crop) to its bucket's size, never padded; its windows are its bucket's frames.

Nothing dropped silently. A sample no bucket can take is `unused` with its reason (with the
samples that indexing skipped, the images data.images leaves out and the clips without
captions); `BucketPlan.report` is the run's buckets.json. A bucket list that takes no sample,
or that leaves every sample of one aspect ratio unused, is refused (`UserError`) naming those
samples and a bucket that would take them, before anything is encoded.

Batches (`BucketBatchSampler`). Epoch e's order comes from `torch.Generator().manual_seed(seed
+ e)` alone: each bucket's items are shuffled and cut into global batches of batch_size x
world_size (the last one filled by wrapping around the bucket's order, so no window is dropped
and a bucket smaller than one global batch still trains), then the global batches of every
bucket are shuffled together. Every rank computes the same list and takes its share of batch k
at step k: all ranks draw the same bucket at every step (equal shapes in every all-reduce) and
run the same number of steps. A resume skips the batches done (`set_start_batch`).

data/ never imports models/: the VAE's frame rule and the network's patch come in `Rules`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from data.loader import EpochSampler
from data.windows import window_span, windows_per_clip
from utils.config import DataConfig
from utils.errors import UserError

MAX_LISTED = 20  # samples named in one message; the rest are counted
AREA_STEPS = 2  # auto: sizes tried either side of the nearest sides, in multiples (musubi-tuner's +-2)
AREA_WEIGHT = 0.5  # auto: an area off by a factor k costs as much as a ratio off by sqrt(k)


@dataclass(frozen=True)
class Bucket:
    """One shape of training sample and its batch size per process."""
    height: int  # pixels
    width: int  # pixels
    num_frames: int  # pixel frames; 1 = images
    batch_size: int  # samples per batch, per process

    @property
    def name(self) -> str:
        """e.g. "32x64x8": height x width x frames (TensorBoard tags, log lines)."""
        return f"{self.height}x{self.width}x{self.num_frames}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def record(self) -> dict:
        return {"resolution": [self.height, self.width], "num_frames": self.num_frames,
                "batch_size": self.batch_size}

    def spec(self, num_frames: Optional[int] = None) -> str:
        """As a data.buckets entry is written (`num_frames` replaced when given)."""
        n = self.num_frames if num_frames is None else num_frames
        return f"{{resolution: [{self.height}, {self.width}], num_frames: {n}, batch_size: {self.batch_size}}}"


@dataclass(frozen=True)
class Rules:
    """What the VAE and the network ask of a bucket (stage 2 gives them: data/ never asks models/)."""
    multiple: int  # pixels both sides must be multiples of: VAE factor x patch
    frames_ok: Callable[[int], bool]  # pixel frame counts the VAE encodes and the patch_t divides
    tokens: Callable[[int, int, int], int]  # tokens of one sample of (height, width, frames)
    batch_size: int  # train.batch_size: a null bucket batch size keeps its tokens per batch


class Sample(NamedTuple):
    """A source as the planner sees it."""
    path: str  # relative to data.path (messages, buckets.json)
    image: bool  # a still: one frame, one-frame buckets only
    frames: int  # usable frames (resampled at data.fps)
    height: int  # pixels of its frames
    width: int


# --------------------------------------------------------------------------- the buckets


def snapped_size(aspect: float, area: int, multiple: int) -> tuple[int, int]:
    """(height, width), multiples of `multiple`, of about `area` pixels with a ratio near
    `aspect` (width / height): of the sides within AREA_STEPS multiples of sqrt(area / aspect)
    and sqrt(area * aspect) (musubi-tuner's search, over both sides), the one with the least
    |log ratio error| + AREA_WEIGHT |log area error| (a coarse multiple cannot keep both)."""
    def near(side: float) -> range:
        k = max(1, round(side / multiple))
        return range(max(1, k - AREA_STEPS), k + AREA_STEPS + 1)

    def cost(size: tuple[int, int]) -> tuple[float, int]:
        h, w = size
        return round(abs(math.log(w / h / aspect)) + AREA_WEIGHT * abs(math.log(h * w / area)), 9), h * w
    return min(((h * multiple, w * multiple) for h in near(math.sqrt(area / aspect))
                for w in near(math.sqrt(area * aspect))), key=cost)


def bucket_batch(rules: Rules, reference: tuple[int, int, int], height: int, width: int,
                 num_frames: int) -> int:
    """train.batch_size scaled to the tokens of the `reference` sample (data.resolution x
    data.num_frames) over this shape's: about the same tokens per batch in every bucket."""
    tokens = rules.tokens(height, width, num_frames)
    return max(1, round(rules.batch_size * rules.tokens(*reference) / tokens))


def resolve_buckets(cfg: DataConfig, samples: Sequence[Sample], rules: Rules) -> list[Bucket]:
    """data.buckets as Buckets: the list given (null batch sizes filled), or auto's one per
    aspect ratio among `samples` (the training split) that a bucket of its kind can take."""
    reference = (cfg.height, cfg.width, cfg.num_frames)
    if isinstance(cfg.buckets, list):
        return [Bucket(b.height, b.width, b.num_frames,
                       b.batch_size or bucket_batch(rules, reference, b.height, b.width, b.num_frames))
                for b in cfg.buckets]
    area = cfg.bucket_area or cfg.height * cfg.width
    span = window_span(cfg.num_frames, cfg.frame_stride)
    shapes = sorted({(*snapped_size(s.width / s.height, area, rules.multiple), 1 if s.image else cfg.num_frames)
                     for s in samples if s.image or s.frames >= span},
                    key=lambda x: (-x[2], x[0] / x[1], x[0] * x[1]))  # clips first, landscape to portrait
    return [Bucket(h, w, n, bucket_batch(rules, reference, h, w, n)) for h, w, n in shapes]


# --------------------------------------------------------------------------- assignment


def _fills(sample: Sample, bucket: Bucket, frame_stride: int) -> bool:
    if sample.image or bucket.num_frames == 1:
        return sample.image and bucket.num_frames == 1
    return window_span(bucket.num_frames, frame_stride) <= sample.frames


def _distance(sample: Sample, bucket: Bucket) -> tuple[float, int, float]:
    """Aspect ratio first, then the longest frames, then the area."""
    ratio = abs(math.log(bucket.aspect * sample.height / sample.width))
    area = abs(math.log(bucket.height * bucket.width / (sample.height * sample.width)))
    return round(ratio, 9), -bucket.num_frames, area


def assign(sample: Sample, buckets: Sequence[Bucket], frame_stride: int) -> Optional[int]:
    """The index of the bucket `sample` trains in, or None when none can take it."""
    fits = [i for i, b in enumerate(buckets) if _fills(sample, b, frame_stride)]
    return min(fits, key=lambda i: _distance(sample, buckets[i])) if fits else None


def unfit_reason(sample: Sample, buckets: Sequence[Bucket], frame_stride: int) -> str:
    """Why no bucket takes `sample` (`assign` gave None)."""
    if sample.image:
        return "an image, and no bucket has num_frames 1"
    clips = [b for b in buckets if b.num_frames > 1]
    if not clips:
        return "a clip, and every bucket has num_frames 1 (those are for images)"
    shortest = min(clips, key=lambda b: b.num_frames)
    need = window_span(shortest.num_frames, frame_stride)
    stride = f" every data.frame_stride = {frame_stride}" if frame_stride > 1 else ""
    return (f"too short: {sample.frames} frames, the shortest bucket ({shortest.num_frames} frames{stride}) "
            f"needs {need}")


def suggestion(sample: Sample, buckets: Sequence[Bucket], rules: Rules, cfg: DataConfig) -> Optional[str]:
    """A bucket that would take `sample`, as a data.buckets entry: its own aspect ratio at the
    area of the listed bucket nearest its ratio (auto: data.bucket_area), the longest frame
    count it fills (None: it is too short to be any clip)."""
    if sample.image:
        frames = 1
    else:
        fits = [n for n in range(2, sample.frames + 1)
                if window_span(n, cfg.frame_stride) <= sample.frames and rules.frames_ok(n)]
        if not fits:
            return None
        frames = max(fits)
    aspect = sample.width / sample.height
    area = cfg.bucket_area or cfg.height * cfg.width
    if isinstance(cfg.buckets, list) and buckets:
        nearest = min(buckets, key=lambda b: abs(math.log(b.aspect / aspect)))
        area = nearest.height * nearest.width
    h, w = snapped_size(aspect, area, rules.multiple)
    return Bucket(h, w, frames, bucket_batch(rules, (cfg.height, cfg.width, cfg.num_frames), h, w, frames)).spec()


# --------------------------------------------------------------------------- the plan


class BucketPlan:
    """The buckets of a split and where each of its sources goes.

    `bucket_of[i]`: the bucket of the split's source i (used sources only); `unused`: (path,
    reason) of every source of the folder the split does not train on (indexing skips, left-out
    images, no bucket)."""

    def __init__(self, buckets: list[Bucket], bucket_of: list[int], unused: list[tuple[str, str]]):
        self.buckets, self.bucket_of, self.unused = buckets, bucket_of, unused

    @classmethod
    def make(cls, cfg: DataConfig, samples: Sequence[Sample], train: Sequence[Sample], rules: Rules,
             unused: list[tuple[str, str]], refuse: bool) -> tuple["BucketPlan", list[int]]:
        """(the plan, the indices of `samples` it keeps). The buckets come from `train` (the
        training split: auto's aspect ratios); `samples` (this split) are assigned to them.
        `refuse`: raise a UserError when nothing, or a whole aspect ratio, goes unused."""
        buckets = resolve_buckets(cfg, train, rules)
        kept, bucket_of, misfits = [], [], []
        for i, s in enumerate(samples):
            b = assign(s, buckets, cfg.frame_stride)
            if b is None:
                misfits.append(s)
            else:
                kept.append(i)
                bucket_of.append(b)
        if refuse:
            _refuse_unused(cfg, samples, misfits, buckets, rules)
        unused = unused + [(s.path, unfit_reason(s, buckets, cfg.frame_stride)) for s in misfits]
        return cls(buckets, bucket_of, sorted(unused)), kept

    def sources_per_bucket(self) -> list[int]:
        return [self.bucket_of.count(b) for b in range(len(self.buckets))]

    def report(self, windows: Sequence[int]) -> dict:
        """buckets.json: every bucket with its sources and windows (`windows`: per source of the
        split), and every unused source with its reason."""
        per = [0] * len(self.buckets)
        for b, n in zip(self.bucket_of, windows):
            per[b] += n
        return {"buckets": [{**b.record(), "sources": k, "windows": w}
                            for b, k, w in zip(self.buckets, self.sources_per_bucket(), per)],
                "unused": [{"path": p, "reason": r} for p, r in self.unused]}


def _refuse_unused(cfg: DataConfig, samples: Sequence[Sample], misfits: list[Sample],
                   buckets: list[Bucket], rules: Rules) -> None:
    """Refuse a bucket list that takes no sample, or none of one aspect ratio (the samples
    that auto would give one size), naming them and a bucket that would take them."""
    if not misfits:
        return
    area = cfg.bucket_area or cfg.height * cfg.width

    def ratio(s: Sample) -> tuple[int, int]:
        return snapped_size(s.width / s.height, area, rules.multiple)
    used = {ratio(s) for s in samples if s not in misfits}
    lost = [s for s in misfits if ratio(s) not in used]
    if not lost:
        return
    lines = []
    for s in lost[:MAX_LISTED]:
        fix = suggestion(s, buckets, rules, cfg)
        take = f"; a bucket that takes it: {fix}" if fix else "; no clip bucket can take it (too short)"
        lines.append(f"{s.path} ({s.height}x{s.width}, {s.frames} frame{'s' if s.frames > 1 else ''}): "
                     f"{unfit_reason(s, buckets, cfg.frame_stride)}{take}")
    more = [f"... and {len(lost) - MAX_LISTED} more"] if len(lost) > MAX_LISTED else []
    what = "none of the" if len(lost) == len(samples) else "no sample of an aspect ratio among the"
    listed = "[" + ", ".join(b.spec() for b in buckets) + "]"
    given = listed if isinstance(cfg.buckets, list) else f"{cfg.buckets} (its buckets: {listed})"
    raise UserError(f"data.buckets = {given} takes {what} {len(samples)} samples of data.path = {cfg.path}; "
                    "nothing is encoded. "
                    "Add the buckets named below to data.buckets, lower data.num_frames (auto), or remove "
                    "those files:\n  " + "\n  ".join(lines + more))


# --------------------------------------------------------------------------- batches


class BucketBatchSampler(EpochSampler):
    """Batches of one bucket each: this rank's share of the same global batch on every rank.

    `bucket_items[b]`: the dataset indices of bucket b's windows; `batch_sizes[b]`: its batch
    size per process. See the module docstring for the order."""

    def __init__(self, bucket_items: Sequence[Sequence[int]], batch_sizes: Sequence[int], *, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank} must be in [0, world_size = {world_size})")
        self.bucket_items = [list(items) for items in bucket_items]
        self.batch_sizes = list(batch_sizes)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.batches_of = [math.ceil(len(items) / (b * world_size)) if items else 0
                           for items, b in zip(self.bucket_items, self.batch_sizes)]
        self.per_rank = sum(self.batches_of)  # batches per epoch, the same on every rank
        super().__init__()

    def global_batches(self) -> list[tuple[int, list[int]]]:
        """(bucket, the items of every rank) of each step of the current epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for b, items in enumerate(self.bucket_items):
            if not items:
                continue
            order = torch.randperm(len(items), generator=g).tolist() if self.shuffle else list(range(len(items)))
            size = self.batch_sizes[b] * self.world_size
            wrapped = (order * math.ceil(self.batches_of[b] * size / len(order)))[:self.batches_of[b] * size]
            batches += [(b, [items[i] for i in wrapped[k:k + size]]) for k in range(0, len(wrapped), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def epoch_batches(self) -> list[tuple[int, list[int]]]:
        """(bucket, this rank's items) of each step of the current epoch, before `set_start`."""
        return [(b, items[self.rank::self.world_size]) for b, items in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([items for _, items in self.epoch_batches()[self.start:]])

    def set_start_batch(self, batches: int, batch_size: int = 0) -> None:
        """Skip the first `batches` batches of this epoch (mid-epoch resume; `batch_size`, the
        nominal one, is unused: batches count, not items)."""
        if not 0 <= batches <= self.per_rank:
            raise ValueError(f"start = {batches} must be in [0, {self.per_rank}]")
        self.start = batches


def windows_of(sample: Sample, bucket: Bucket, frame_stride: int, window_stride: int) -> int:
    """Windows of `sample` in `bucket` (an image: 1)."""
    if sample.image:
        return 1
    return windows_per_clip(sample.frames, bucket.num_frames, frame_stride, window_stride)
