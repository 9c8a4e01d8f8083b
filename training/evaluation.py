"""FVD of generated videos against real clips, under a protocol that is pinned and printed.

The protocol follows StyleGAN-V's `fvd2048_16f` (src/metrics/frechet_video_distance.py and
metric_utils.py there), with what it leaves to chance fixed by seeds:
- real clips: source videos in sorted order (the dataset's order), one window per video of
  `num_frames` frames taken every `frame_stride` source frames (StyleGAN-V's
  `subsample_factor`; 1 = consecutive) at a uniformly random start, as StyleGAN-V's
  `load_n_consecutive` with its random offset; here the start of clip k is drawn from
  `numpy.random.default_rng((real.seed, k))`, so the same settings pick the same windows.
  Videos shorter than a window are left out (StyleGAN-V's `discard_short_videos`). When more
  clips are asked than there are videos, the videos are cycled with new random starts (a
  departure from StyleGAN-V, which then uses fewer real clips; the JSON says how many videos).
- generated: video i sampled with seed `seed + i` exactly as predict samples it, or the
  first `num_frames` frames (every `frame_stride`) of each video of a folder in sorted order.
- both quantised to uint8 frames, given to the detector as float in [0, 255] with
  rescale=True, resize=True (it resizes to 224 x 224), return_features=True;
- float64 feature statistics with the biased covariance, and the Frechet distance of
  utils/fvd.py.
Optionally (`fid.detector_path`) per-frame FID and KID on every frame of the same clips,
with the Inception features of StyleGAN2-ADA (utils/fvd.py).
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from data import build_dataset
from data.videos import window_span
from training.checkpoints import check_format
from training.sampling import default_labels
from utils.checkpoint import load_checkpoint, write_json
from utils.config import DataConfig, EvaluateConfig, PredictConfig
from utils.errors import UserError
from utils.fvd import (DETECTOR_KWARGS, FeatureStats, detector_features, file_digest,
                       fvd_from_stats, image_features, inception_help, kernel_inception_distance,
                       load_detector)
from utils.video_io import video_tensor_to_uint8

GENERATION_CHUNK = 256  # videos per predict call: bounds host memory for 2048 long videos

SampleFn = Callable[[PredictConfig, torch.device], tuple[list, dict]]  # predict's sample_videos


class ClipFeatures:
    """Features of one side (real or generated): I3D statistics of the clips for FVD and, with
    an Inception detector, the features of every frame for FID and KID."""

    def __init__(self, i3d, inception, device: torch.device, frame_batch: int):
        self.i3d, self.inception, self.device, self.frame_batch = i3d, inception, device, frame_batch
        self.videos = FeatureStats()
        self.frames = FeatureStats(keep=True) if inception is not None else None

    def add(self, videos: torch.Tensor) -> None:
        """uint8 videos (B, 3, T, H, W)."""
        self.videos.add(detector_features(self.i3d, videos.to(self.device)))
        if self.frames is not None:
            frames = rearrange(videos, "b c t h w -> (b t) c h w")
            for chunk in frames.split(self.frame_batch):
                self.frames.add(image_features(self.inception, chunk.to(self.device)))

    def add_all(self, batches: Iterator[torch.Tensor]) -> "ClipFeatures":
        for videos in batches:
            self.add(videos)
        return self


# --------------------------------------------------------------------------- real clips


def real_clip_plan(dataset, num_clips: int, num_frames: int, frame_stride: int,
                   seed: int) -> list[tuple[int, list[int]]]:
    """(source, frame indices) of each real clip: one random window per source, in order."""
    span = window_span(num_frames, frame_stride)
    sources = [s for s in range(dataset.num_sources) if dataset.source_length(s) >= span]
    if not sources:
        raise UserError(f"no real video has the {span} frames one clip of data.num_frames = "
                        f"{num_frames} every data.frame_stride = {frame_stride} needs")
    plan = []
    for k in range(num_clips):
        src = sources[k % len(sources)]
        start = int(np.random.default_rng((seed, k)).integers(0, dataset.source_length(src) - span + 1))
        plan.append((src, list(range(start, start + span, frame_stride))))
    return plan


def clip_batches(dataset, plan: Sequence[tuple[int, list[int]]], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, T, H, W) of the planned windows (center crop, no augmentation)."""
    for i in range(0, len(plan), batch_size):
        clips = [video_tensor_to_uint8(dataset.source_frames(src, frames))  # (T, H, W, 3)
                 for src, frames in plan[i:i + batch_size]]
        yield uint8_batch(clips)


def uint8_batch(videos: Sequence[np.ndarray]) -> torch.Tensor:
    """(T, H, W, 3) uint8 videos -> one (B, 3, T, H, W) uint8 tensor."""
    return rearrange(torch.from_numpy(np.stack(videos)), "b t h w c -> b c t h w")


def video_batches(videos: Sequence[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(videos), batch_size):
        yield uint8_batch(videos[i:i + batch_size])


def _progress(batches: Iterator[torch.Tensor], total: int, desc: str, enabled: bool = True):
    """Yields the batches while a bar counts videos."""
    with tqdm(total=total, desc=desc, unit="video", disable=not enabled, leave=False) as bar:
        for b in batches:
            yield b
            bar.update(b.shape[0])


# --------------------------------------------------------------------------- evaluate.py


def evaluate(cfg: EvaluateConfig, device: torch.device, sample_fn: SampleFn) -> dict:
    """FVD and its protocol; prints one line per metric and writes `cfg.output` if set.

    `sample_fn` is predict's `sample_videos`: generation is predict's own path.
    """
    i3d = load_detector(cfg.fvd.detector_path, device)  # fail before any sampling
    inception = None if cfg.fid.detector_path is None else \
        load_detector(cfg.fid.detector_path, device, "fid.detector_path", inception_help)
    features = lambda: ClipFeatures(i3d, inception, device, cfg.fid.batch_size)
    ckpt = None
    if cfg.checkpoint is not None:
        if not os.path.isfile(cfg.checkpoint):
            raise UserError(f"checkpoint = {cfg.checkpoint}: no such file; point it at a stage-2 "
                            "latest.pth (or use generated.path=FOLDER)")
        ckpt = load_checkpoint(cfg.checkpoint)
        check_format(ckpt, cfg.checkpoint)
    data_cfg = cfg.data.resolved(ckpt["config"]["data"] if ckpt else None)
    if ckpt is not None and data_cfg.num_frames != ckpt["model"]["dims"]["num_frames"]:
        raise UserError(f"data.num_frames = {data_cfg.num_frames} but {cfg.checkpoint} generates "
                        f"{ckpt['model']['dims']['num_frames']} frames: FVD compares clips of one "
                        "length; leave data.num_frames null (the checkpoint's) or set it equal")
    dataset_seed = cfg.real.dataset_seed if cfg.real.dataset_seed is not None else \
        (ckpt["config"]["experiment"]["seed"] if ckpt else 0)
    dataset = build_dataset(data_cfg, cfg.real.split, dataset_seed)
    num_real = cfg.real.num_clips or cfg.num_videos
    plan = real_clip_plan(dataset, num_real, data_cfg.num_frames, data_cfg.frame_stride, cfg.real.seed)
    real = features().add_all(_progress(clip_batches(dataset, plan, cfg.fvd.batch_size), num_real,
                                        "features, real clips"))
    if ckpt is not None:
        generated, gen_record = _checkpoint_features(cfg, ckpt, features(), sample_fn)
    else:
        generated, gen_record = _folder_features(cfg, data_cfg, features())
    result = {"fvd": fvd_from_stats(real.videos, generated.videos), "num_generated": generated.videos.n,
              "num_real": real.videos.n,
              "protocol": protocol(cfg, data_cfg, dataset, dataset_seed, num_real, gen_record)}
    if inception is not None:
        result.update(_frame_metrics(cfg, real.frames, generated.frames))
    for name in ("FVD", "FID", "KID"):
        if name.lower() in result:
            print(metric_line(name, result))
    if cfg.output:
        _write_json(cfg.output, result)
        print(f"wrote {cfg.output}")
    return result


def _checkpoint_features(cfg: EvaluateConfig, ckpt: dict, features: ClipFeatures,
                         sample_fn: SampleFn) -> tuple[ClipFeatures, dict]:
    """Samples num_videos with predict's path, in chunks (video i always has seed + i and the
    label predict gives video i), and accumulates their features."""
    dims = ckpt["model"]["dims"]
    labels = default_labels(cfg.num_videos, dims["num_classes"], cfg.class_labels)
    with tqdm(total=cfg.num_videos, desc="features, generated", unit="video", leave=False) as bar:
        for start in range(0, cfg.num_videos, GENERATION_CHUNK):
            n = min(GENERATION_CHUNK, cfg.num_videos - start)
            chunk = replace(cfg.sampling(), num_videos=n, seed=cfg.seed + start,
                            class_labels=None if labels is None else labels[start:start + n].tolist())
            videos, _ = sample_fn(chunk, features.device)
            features.add_all(video_batches(videos, cfg.fvd.batch_size))
            bar.update(n)
    record = {"source": "checkpoint", "checkpoint": os.path.abspath(cfg.checkpoint),
              "step": int(ckpt["step"]), "vae_fingerprint": ckpt["vae"]["fingerprint"],
              "weights": "EMA" if cfg.use_ema else "raw", "sampler": cfg.sampler,
              "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale,
              "class_labels": cfg.class_labels, "seeds": f"{cfg.seed} + i",
              "num_frames": dims["num_frames"]}
    return features, record


def _folder_features(cfg: EvaluateConfig, data_cfg: DataConfig,
                     features: ClipFeatures) -> tuple[ClipFeatures, dict]:
    """The first num_videos videos of generated.path (sorted), their first frames."""
    if not os.path.isdir(cfg.generated.path):
        raise UserError(f"generated.path = {cfg.generated.path}: no such folder; point it at the "
                        "folder of generated videos (or use checkpoint=PATH to sample them)")
    folder_cfg = replace(data_cfg, path=cfg.generated.path, val_fraction=0.0, labels="none",
                         random_crop=False, hflip=False)
    videos = build_dataset(folder_cfg, "train", 0)  # every video of the folder, no split
    if videos.num_sources < cfg.num_videos:
        raise UserError(f"generated.path = {cfg.generated.path} has {videos.num_sources} usable "
                        f"videos of >= {window_span(data_cfg.num_frames, data_cfg.frame_stride)} "
                        f"frames, fewer than num_videos = {cfg.num_videos}; generate more or set "
                        f"num_videos={videos.num_sources}")
    frames = list(range(0, window_span(data_cfg.num_frames, data_cfg.frame_stride), data_cfg.frame_stride))
    plan = [(src, frames) for src in range(cfg.num_videos)]
    features.add_all(_progress(clip_batches(videos, plan, cfg.fvd.batch_size), len(plan),
                               "features, generated"))
    return features, {"source": "folder", "path": os.path.abspath(cfg.generated.path),
                   "videos": "the first num_videos in sorted path order",
                   "frames": f"the first {data_cfg.num_frames}, every {data_cfg.frame_stride}"}


def _frame_metrics(cfg: EvaluateConfig, real: FeatureStats, generated: FeatureStats) -> dict:
    """Per-frame FID and KID, and how they were computed."""
    f = cfg.fid
    return {"fid": fvd_from_stats(real, generated),
            "kid": kernel_inception_distance(real.features(), generated.features(), f.kid_subsets,
                                             f.kid_subset_size, seed=cfg.real.seed),
            "num_generated_frames": generated.n, "num_real_frames": real.n,
            "frame_protocol": {
                "detector": {"path": os.path.abspath(f.detector_path),
                             "sha256_16": file_digest(f.detector_path), "kwargs": {"return_features": True},
                             "input": "uint8 frames (N, 3, H, W)"},
                "frames": "every frame of the clips above (generated and real)",
                "kid": {"kernel": "(x . y / D + 1)^3", "estimator": "unbiased MMD^2",
                        "subsets": f.kid_subsets, "subset_size": f"min({f.kid_subset_size}, frames)",
                        "seed": cfg.real.seed}}}


def protocol(cfg: EvaluateConfig, data_cfg: DataConfig, dataset, dataset_seed: int,
             num_real: int, generated: dict) -> dict:
    """Everything a reader needs to reproduce or compare the number."""
    return {
        "metric": "FVD as StyleGAN-V computes it (fvd2048_16f when 2048 vs 2048 clips of 16 frames)",
        "detector": {"path": os.path.abspath(cfg.fvd.detector_path),
                     "sha256_16": file_digest(cfg.fvd.detector_path), "kwargs": dict(DETECTOR_KWARGS),
                     "input": "float (N, 3, T, H, W) in [0, 255] from uint8 frames"},
        "statistics": "float64; mean and biased covariance (1/N); Frechet distance with "
                      "tr sqrt via symmetric eigendecompositions",
        "real": {"path": data_cfg.path, "split": cfg.real.split, "num_clips": num_real,
                 "num_videos": int(dataset.num_sources), "dataset_seed": dataset_seed,
                 "num_frames": data_cfg.num_frames, "frame_stride": data_cfg.frame_stride,
                 "resolution": data_cfg.resolution,
                 "crop": "resized to cover height x width keeping the aspect ratio, center crop",
                 "windows": "one per video in sorted order at a random start (rng (seed, k)); "
                            "videos cycled when num_clips > num_videos",
                 "seed": cfg.real.seed,
                 "builtin": asdict(data_cfg.builtin) if data_cfg.path.startswith("builtin:") else None},
        "generated": dict(generated, num_videos=cfg.num_videos),
    }


def metric_line(name: str, result: dict) -> str:
    """One stdout line: the number and the protocol details that must match to compare it."""
    p = result["protocol"]
    r = p["real"]
    clips = (f"real: {r['path']} {r['split']} split, {r['num_videos']} videos, window seed {r['seed']}")
    if name == "FVD":
        return (f"FVD {result['fvd']:.2f} ({result['num_generated']} generated vs "
                f"{result['num_real']} real clips of {r['num_frames']} frames, frame stride "
                f"{r['frame_stride']}, {_pixels(r['resolution'])}; {clips}; detector "
                f"{os.path.basename(p['detector']['path'])} sha256 {p['detector']['sha256_16']})")
    f = result["frame_protocol"]
    value = f"{result['fid']:.2f}" if name == "FID" else f"{result['kid']:.5f}"
    kid = f", {f['kid']['subsets']} subsets of {f['kid']['subset_size']}" if name == "KID" else ""
    return (f"{name} {value} (per frame: {result['num_generated_frames']} generated vs "
            f"{result['num_real_frames']} real frames of the clips above{kid}; "
            f"{_pixels(r['resolution'])}; detector {os.path.basename(f['detector']['path'])} sha256 "
            f"{f['detector']['sha256_16']})")


def _pixels(resolution) -> str:
    """data.resolution as text: "256 px" (a square side) or "256x448 px" ([height, width])."""
    return f"{resolution[0]}x{resolution[1]} px" if isinstance(resolution, list) else f"{resolution} px"


def _write_json(path: str, result: dict) -> None:
    try:
        write_json(result, path, indent=2)
    except OSError as e:
        raise UserError(f"output = {path}: cannot write it ({e.strerror}); choose another output") from None
