"""Buckets on the training side: what the VAE and the DiT allow of a bucket, the batches, the
run's buckets.json and log lines, the checkpoint's record, and the shape predict samples.

data/buckets.py plans the buckets without knowing the VAE or the network; stage 2 gives it
`Rules` (`bucket_rules`), checks every bucket the plan makes as it checks data.resolution and
data.num_frames (`check_buckets`: the VAE's frame rule, the patch grid, the family's limits,
first frames), builds the loader (`BucketBatchSampler`) and records the buckets in the
checkpoint (`record`). Predict and evaluate read that record (`trained_shapes`, `window_for`):
any trained bucket is sampled as trained; another shape is sampled with a warning that names
the trained ones. A checkpoint without the record (one shape) answers its `dims`, as always.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from data.buckets import Bucket, BucketBatchSampler, Rules
from data.loader import make_bucket_loader
from utils.checkpoint import write_json
from utils.config import TrainRunConfig, check_size_multiple
from utils.errors import ConfigError, UserError

if TYPE_CHECKING:
    from models.backbones import Family
    from models.vae import FrozenVAE
    from utils.dist import DistInfo
    from utils.logging import RunLogger

BUCKETS_FILE = "buckets.json"  # in the run directory (the contract's format: BucketPlan.report)


@dataclass
class Buckets:
    """A bucketed run's buckets: the rules, the training plan's buckets, their latent shapes."""
    rules: Rules
    buckets: list[Bucket]
    latent_shapes: list[tuple[int, int, int, int]]  # (C, t, h, w) per bucket

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.buckets]

    def record(self) -> list[dict]:
        """What a checkpoint keeps under "buckets": each bucket and its latent shape."""
        return [{**b.record(), "latent_shape": list(shape)} for b, shape in zip(self.buckets, self.latent_shapes)]


def bucket_rules(cfg: TrainRunConfig, vae: "FrozenVAE", family: "Family") -> Optional[Rules]:
    """The Rules of this run's buckets (None: data.buckets is null, one shape)."""
    if cfg.data.buckets is None:
        return None
    geometry, (patch_t, patch) = vae.geometry, family.patch

    def frames_ok(n: int) -> bool:  # the VAE encodes n frames, and the latent frames split into patches
        return geometry.frames_ok(n) and geometry.latent_frames(n) % patch_t == 0

    def tokens(height: int, width: int, n: int) -> int:  # >= 1: a shape the patch cannot take is refused later
        return max(1, family.tokens((geometry.channels, geometry.latent_frames(n), height // geometry.spatial,
                                     width // geometry.spatial)))
    return Rules(vae.downsample_factor * patch, frames_ok, tokens, cfg.train.batch_size)


def check_listed(cfg: TrainRunConfig, vae: "FrozenVAE", family: "Family") -> None:
    """Every bucket of a data.buckets list fits the VAE and the network, refused naming the key
    (before any file is probed)."""
    if isinstance(cfg.data.buckets, list):
        for i, b in enumerate(cfg.data.buckets):
            _check(cfg, vae, family, Bucket(b.height, b.width, b.num_frames, b.batch_size or 1),
                   f"data.buckets[{i}]", "")


def check_buckets(cfg: TrainRunConfig, vae: "FrozenVAE", family: "Family", rules: Rules,
                  buckets: Sequence[Bucket]) -> Buckets:
    """The plan's buckets checked (auto's are derived: a one-frame bucket for images may not
    fit model.patch_t, nor leave first frames anything to generate) with their latent shapes."""
    auto = "" if isinstance(cfg.data.buckets, list) else \
        " (data.buckets: auto makes one bucket per aspect ratio for the clips, at data.num_frames, and " \
        "for the images, at 1 frame; list the buckets instead, or set data.images: exclude)"
    keys = [f"data.buckets[{i}]" for i in range(len(buckets))] if not auto else \
        [f"the bucket {b.name}" for b in buckets]
    shapes = [_check(cfg, vae, family, b, key, auto) for b, key in zip(buckets, keys)]
    return Buckets(rules, list(buckets), shapes)


def _check(cfg: TrainRunConfig, vae: "FrozenVAE", family: "Family", bucket: Bucket, key: str,
           advice: str) -> tuple[int, int, int, int]:
    """Bucket `bucket` (named `key`) as latent_dims checks data.resolution and num_frames."""
    from models.dit import check_patchable
    from training.first_frames import FirstFrames
    patch_t, patch = family.patch
    multiple = vae.downsample_factor * patch
    check_size_multiple(bucket.height, bucket.width, multiple,
                        f"VAE factor {vae.downsample_factor} x patch {patch} = {multiple}", f"{key}.resolution",
                        [bucket.height, bucket.width], note=advice)
    vae.check_num_frames(bucket.num_frames, f"{key}.num_frames")
    shape = vae.latent_shape(bucket.num_frames, bucket.height, bucket.width)  # (C, t, h, w)
    try:
        check_patchable(*shape[1:], patch_t, patch)
        family.check_latents(shape, vae, cfg.model.first_frame_conditioning > 0)
    except ConfigError as e:
        raise ConfigError(f"{key} ({bucket.height}x{bucket.width} pixels, {bucket.num_frames} frame(s): "
                          f"{shape[1]} latent frame(s) of {shape[2]}x{shape[3]}): {e}{advice}") from None
    first = FirstFrames.of(cfg.model)
    if first.enabled and first.frames >= shape[1]:
        raise ConfigError(f"{key} has {shape[1]} latent frame(s) ({bucket.num_frames} frames) and "
                          f"model.condition_frames = {first.frames} with model.first_frame_conditioning: "
                          f"nothing of it would be left to generate; give it more frames{advice}")
    return shape


# --------------------------------------------------------------------------- training


def bucket_sampler(dataset, cfg: TrainRunConfig, dist: "DistInfo") -> BucketBatchSampler:
    """Batches of the training set's buckets (each bucket's windows, its batch size)."""
    plan = dataset.plan
    items: list[list[int]] = [[] for _ in plan.buckets]
    for src, bucket in enumerate(plan.bucket_of):
        first = int(dataset._first[src])
        items[bucket] += range(first, first + dataset.counts[src])
    sampler = BucketBatchSampler(items, [b.batch_size for b in plan.buckets], seed=cfg.experiment.seed,
                                 rank=dist.rank, world_size=dist.world_size)
    if sampler.per_rank < cfg.train.grad_accum_steps:
        raise UserError(f"one epoch has {sampler.per_rank} batches over the buckets, fewer than "
                        f"train.grad_accum_steps = {cfg.train.grad_accum_steps}; lower it")
    return sampler


def bucket_loader(dataset, sampler: BucketBatchSampler, cfg: TrainRunConfig, dist: "DistInfo",
                  device_type: str, collate_fn):
    return make_bucket_loader(dataset, sampler, seed=cfg.experiment.seed, num_workers=cfg.data.num_workers,
                              rank=dist.rank, device_type=device_type, collate_fn=collate_fn)


def report(dataset, sampler: BucketBatchSampler, run_dir: str, dist: "DistInfo", log: "RunLogger") -> None:
    """Every bucket (shape, batch size, sources, windows, batches per epoch) and every unused
    source with its reason, to log.txt and (rank 0) <run>/buckets.json."""
    written = dataset.plan.report(dataset.counts)
    for b, entry, batches in zip(dataset.plan.buckets, written["buckets"], sampler.batches_of):
        fill = batches * b.batch_size * dist.world_size - entry["windows"]
        extra = f", {fill} repeated to fill the last batch" if fill else ""
        log.info(f"bucket {b.name}: {b.height}x{b.width} pixels, {b.num_frames} frame(s), batch "
                 f"{b.batch_size}: {entry['sources']} sources, {entry['windows']} windows, {batches} "
                 f"batches per epoch{extra}")
    for entry in written["unused"]:
        log.info(f"unused: {entry['path']}: {entry['reason']}")
    log.info(f"buckets: {len(written['buckets'])}, {sum(e['sources'] for e in written['buckets'])} sources "
             f"used, {len(written['unused'])} unused; {sampler.per_rank} batches per epoch "
             f"({os.path.join(run_dir, BUCKETS_FILE)})")
    if dist.is_main:
        write_json(written, os.path.join(run_dir, BUCKETS_FILE))


def by_shape(items: Sequence, shape_of: Callable = lambda x: x.shape) -> list[list]:
    """`items` grouped by `shape_of(item)`, in order of first appearance: what can be stacked
    (with buckets, clips of several shapes)."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(tuple(shape_of(item)), []).append(item)
    return list(groups.values())


# --------------------------------------------------------------------------- predict, evaluate


def trained_shapes(ckpt: dict) -> list[tuple[int, int, int]]:
    """(height, width, frames) in pixels of every shape the checkpoint trained: its buckets, or
    the one shape of its dims (checkpoints without buckets)."""
    if ckpt.get("buckets"):
        return [(b["resolution"][0], b["resolution"][1], b["num_frames"]) for b in ckpt["buckets"]]
    return [reference_shape(ckpt)]


def reference_shape(ckpt: dict) -> tuple[int, int, int]:
    """(height, width, frames) in pixels of the checkpoint's `dims`: data.resolution x
    data.num_frames of its training run (its one shape without buckets)."""
    from training.evaluation import generated_geometry
    from training.checkpoints import model_dims
    g = generated_geometry(model_dims(ckpt["model"]), ckpt["vae"])
    return g.height, g.width, g.num_frames


def default_shape(ckpt: dict) -> tuple[int, int, int]:
    """What predict and evaluate sample when resolution and num_frames are null: the
    reference shape if it was trained, else the trained bucket with the most frames (the
    first such in the record)."""
    trained, reference = trained_shapes(ckpt), reference_shape(ckpt)
    return reference if reference in trained else max(trained, key=lambda x: x[2])


def describe(shapes: Sequence[tuple[int, int, int]]) -> str:
    return ", ".join(f"[{h}, {w}] x {n}" for h, w, n in shapes)


@dataclass(frozen=True)
class Window:
    """What predict samples: one window of `latent_shape` (C, t, h, w), cut or chained to
    `num_frames` pixel frames (None: the window as it is)."""
    latent_shape: tuple[int, int, int, int]
    num_frames: Optional[int]
    height: int  # pixels
    width: int


def window_for(resolution, num_frames: Optional[int], ckpt: dict, vae: "FrozenVAE",
               key: str = "resolution") -> Window:
    """The window predict samples for `resolution` (null: the checkpoint's training shape) and
    `num_frames` (null: that shape's frames): a trained bucket's shape is sampled as one window
    of it; other frame counts are cut from (or, with first frames, chained from) the longest
    trained window of that resolution; a resolution or window never trained is allowed with a
    warning naming the trained shapes; a resolution the VAE and patch cannot tile is refused."""
    from training.checkpoints import latent_shape as shape_of, model_dims, patch_of
    dims_shape = shape_of(model_dims(ckpt["model"]))
    trained, reference = trained_shapes(ckpt), reference_shape(ckpt)
    factor, g = vae.downsample_factor, vae.geometry
    if resolution is None and num_frames is None and default_shape(ckpt) == reference:
        return Window(dims_shape, None, reference[0], reference[1])  # as before buckets
    if resolution is None:
        height, width = default_shape(ckpt)[:2]
    else:
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        patch = patch_of(ckpt)[1]
        check_size_multiple(height, width, factor * patch, f"the VAE factor {factor} x the model's patch "
                            f"{patch} = {factor * patch}", key, resolution, UserError,
                            f"; trained: {describe(trained)}")
    at = [n for h, w, n in trained if (h, w) == (height, width)]  # frames trained at this size
    wanted = num_frames if num_frames is not None else (max(at) if at else reference[2])
    if (height, width, wanted) in trained:
        window = wanted
    else:  # cut from (or chained from) the longest clip window of this size
        clips = [n for n in at if n > 1]
        window = max(clips) if clips else reference[2]
        if (height, width, window) not in trained:
            print(f"warning: {height}x{width} pixels x {window} frames was not trained (trained: "
                  f"{describe(trained)}); sampled anyway")
    latent = (dims_shape[0], g.latent_frames(window), height // factor, width // factor)
    if latent == dims_shape and resolution is None and not ckpt.get("buckets"):
        return Window(latent, num_frames, height, width)
    return Window(latent, None if wanted == window else wanted, height, width)


def bucket_summary(ckpt: dict) -> str:
    """A line for predict: the trained buckets, if any."""
    return "" if not ckpt.get("buckets") else f"; trained buckets {describe(trained_shapes(ckpt))}"


def read_report(run_dir: str) -> dict:
    with open(os.path.join(run_dir, BUCKETS_FILE)) as f:
        return json.load(f)
