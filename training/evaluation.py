"""FVD of generated videos against real clips, under a protocol that is pinned and recorded.

The default protocol is StyleGAN-V's `fvd2048_16f` (universome/stylegan-v: src/metrics/
metric_main.py `fvd2048_16f`, frechet_video_distance.py `compute_fvd`, metric_utils.py, and
src/training/dataset.py `VideoFramesFolderDataset`):
- real: the videos of the dataset folder in sorted order, no train/val split (`real.split:
  all`); videos with fewer than `num_frames * frame_stride` frames are left out (its
  `discard_short_videos`, threshold n*s), the first N = 2048 of the rest are used, one clip
  each, no video twice: with fewer videos, all of them (N is then smaller, and the record and
  stdout say so). A clip is `num_frames` frames every `frame_stride` from a uniformly random
  start in [0, L - (n-1)s - 1] (its `random.randint` range); here the start of clip k is drawn
  from `numpy.random.default_rng((real.seed, k))`, so the same settings pick the same windows.
- generated: 2048 videos; a checkpoint's video i sampled with seed `seed + i` exactly as
  predict samples it, or the first 2048 videos of a folder in sorted order (one per name:
  `sample_000.mp4` wins over `sample_000.gif`), their first `num_frames` frames every
  `frame_stride` as stored (no resampling in time or space; a video shorter than
  `num_frames * frame_stride` is refused, as StyleGAN-V asserts).
- both sides uint8 (N, 3, T, H, W), 16 frames, of one size (a mismatch of frames or size
  is refused), given to the I3D TorchScript as StyleGAN-V does: uint8 with rescale=True,
  resize=True, return_features=True, TF32 off; float64 statistics, biased covariance, the
  Frechet distance of utils/fvd.py.
Any other setting (num_videos, data.num_frames, data.frame_stride, real.split, real.num_clips,
data.fps) is a deviation named in the record's `protocol.deviations`.
`fvd_real_clips` and `generated_geometry` are the one path both this and training's val/fvd
take. Optionally (`fid.detector_path`) per-frame FID and KID on every frame of the same
clips, with the Inception features of StyleGAN2-ADA (utils/fvd.py).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

from data import BUILTIN_MOVING_SHAPES, build_dataset
from data.videos import find_sources
from data.windows import window_span
from models.vae import Geometry
from training.checkpoints import PREDICT_ENTRIES, check_entries, check_format, model_dims
from training.sampling import Loaded, load_sampler
from utils.checkpoint import load_checkpoint, write_json
from utils.config import DataConfig, EvalDataConfig, EvaluateConfig, PredictConfig
from utils.errors import UserError
from utils.paths import check_output_file, refuse_file, refuse_folder
from utils.fvd import (DETECTOR_KWARGS, FEATURE_DIMS, INCEPTION_KWARGS, FeatureStats,
                       check_detector, detector_features, detector_precision, file_digest,
                       fvd_from_stats, image_features, kernel_inception_distance, load_detector)
from utils.video_io import count_frames, read_frames, video_tensor_to_uint8

GENERATION_CHUNK = 256  # videos per predict call: bounds host memory for 2048 long videos
# StyleGAN-V's fvd2048_16f: 2048 generated vs 2048 real clips of 16 consecutive frames
PROTOCOL = "fvd2048_16f"
PROTOCOL_VIDEOS, PROTOCOL_FRAMES, PROTOCOL_STRIDE = 2048, 16, 1
# Of several files with one name in a generated folder, the first kind here is read: a frame
# folder or a video before a palette-quantised GIF ("" = a frame folder).
GENERATED_PREFERENCE = ("", ".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")

# predict's sample_videos: (the chunk's config, device, the checkpoint loaded once) -> (videos, checkpoint)
SampleFn = Callable[[PredictConfig, torch.device, Optional[Loaded]], tuple[list, dict]]


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


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ClipGeometry:
    """Pixel frames and size of the clips on one side of the comparison."""
    num_frames: int  # pixel frames per clip
    height: int  # pixels
    width: int  # pixels

    def resolution(self):
        """As data.resolution writes it: a side, or [height, width]."""
        return self.height if self.height == self.width else [self.height, self.width]


def generated_geometry(dims: dict, vae: dict) -> ClipGeometry:
    """What a stage-2 model generates in pixels: its latent frames and size (`dims`, a
    checkpoint's model dims) through the VAE's measured geometry (`vae`: a checkpoint's vae
    record or FrozenVAE.describe()): a causal video VAE decodes t latent frames to
    1 + (t - 1) * f_t pixel frames, a per-frame VAE t to t."""
    spatial = int(vae.get("spatial_factor", vae.get("downsample_factor", 1)))
    # checkpoints written before the video VAEs record no temporal factor: per-frame VAEs
    geometry = Geometry(spatial=spatial, temporal=int(vae.get("temporal_factor", 1)),
                        channels=int(vae.get("latent_channels", dims["in_channels"])))
    return ClipGeometry(geometry.pixel_frames(dims["num_frames"]), dims["latent_height"] * spatial,
                        dims["latent_width"] * spatial)


def check_real_geometry(data: DataConfig, generated: ClipGeometry, generator: str) -> None:
    """Refuse real clips of another length or size than the generated videos: FVD of two
    geometries mixes what is compared (`generator`: who made the videos, for the message)."""
    if data.num_frames != generated.num_frames:
        raise UserError(f"data.num_frames = {data.num_frames} but {generator} generates "
                        f"{generated.num_frames} frames: FVD compares clips of one length; leave "
                        f"data.num_frames null or set data.num_frames={generated.num_frames}")
    if (data.height, data.width) != (generated.height, generated.width):
        res = generated.resolution()
        raise UserError(f"data.resolution = {data.resolution} (real clips of {data.height}x"
                        f"{data.width} px) but {generator} generates {generated.height}x"
                        f"{generated.width} px videos: FVD compares clips of one size; leave "
                        f"data.resolution null or set data.resolution={str(res).replace(' ', '')}")


# --------------------------------------------------------------------------- real clips


@dataclass
class RealClips:
    """The real side: the dataset, (source, frame indices) per clip, and what was selected."""
    dataset: object
    plan: list[tuple[int, list[int]]]
    record: dict


def fvd_real_clips(data: DataConfig, generated: ClipGeometry, generator: str, split: str,
                   dataset_seed: int, num_clips: int, seed: int) -> RealClips:
    """The real clips FVD compares `generated` videos with: evaluate.py and training's
    val/fvd both take this path (same geometry check, same selection)."""
    check_real_geometry(data, generated, generator)
    return select_real_clips(data, split, dataset_seed, num_clips, seed)


def select_real_clips(data: DataConfig, split: str, dataset_seed: int, num_clips: int,
                      seed: int) -> RealClips:
    """StyleGAN-V's real set: the videos in sorted order, those shorter than num_frames *
    frame_stride left out, the first `num_clips` of the rest (all of them when fewer: never
    a video twice), one window each at a random start drawn from rng (seed, k)."""
    dataset = _real_dataset(data, split, dataset_seed)
    need = data.num_frames * data.frame_stride  # StyleGAN-V's threshold n*s (not the span)
    span = window_span(data.num_frames, data.frame_stride)
    long_enough = [s for s in range(dataset.num_sources) if dataset.source_length(s) >= need]
    if not long_enough:
        raise UserError(f"data.path = {data.path}: no real video ({split} split) has the "
                        f"{need} frames (data.num_frames = {data.num_frames} x data.frame_stride "
                        f"= {data.frame_stride}, StyleGAN-V's rule) a clip needs; lower them")
    plan = []
    for k, src in enumerate(long_enough[:num_clips]):
        start = int(np.random.default_rng((seed, k)).integers(0, dataset.source_length(src) - span + 1))
        plan.append((src, list(range(start, start + span, data.frame_stride))))
    record = {"num_clips_requested": num_clips, "num_clips": len(plan),
              "num_videos": int(dataset.num_sources), "num_videos_long_enough": len(long_enough),
              "min_frames": need}
    return RealClips(dataset, plan, record)


def _real_dataset(data: DataConfig, split: str, seed: int):
    """split all: every video of data.path (a folder's val_fraction ignored), as StyleGAN-V
    reads its dataset folder; the built-in dataset's clips are its train split."""
    if split != "all":
        return build_dataset(data, split, seed)
    if data.path == BUILTIN_MOVING_SHAPES:
        return build_dataset(data, "train", seed)
    return build_dataset(replace(data, val_fraction=0.0), "train", seed)


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


# --------------------------------------------------------------------------- a generated folder


@dataclass
class GeneratedFolder:
    """The videos of generated.path that are read: one per name, sorted, the first num_videos."""
    path: str
    videos: list[str]  # relative paths, in order
    found: int  # distinct videos (one per name) in the folder
    left_out: list[str]  # files not read because another file has their name (e.g. the .gif)
    height: int = 0  # pixels of every video (set by `check`)
    width: int = 0

    @classmethod
    def scan(cls, path: str, num_videos: int) -> "GeneratedFolder":
        refuse_file(path, "generated.path", "the folder of generated videos (or use checkpoint=PATH to "
                    "sample them)")
        if not os.path.isdir(path):
            raise UserError(f"generated.path = {path}: no such folder; point it at the folder of "
                            "generated videos (or use checkpoint=PATH to sample them)")
        chosen, left_out = one_video_per_name(path, find_sources(path))
        if len(chosen) < num_videos:
            # num_videos below 2 is refused (a covariance needs 2): never advise it
            fewer = f" or set num_videos={len(chosen)}" if len(chosen) >= 2 else " (FVD needs at least 2)"
            raise UserError(f"generated.path = {path} has {len(chosen)} usable videos (one per name), "
                            f"fewer than num_videos = {num_videos}; generate more{fewer}")
        return cls(path, chosen[:num_videos], len(chosen), left_out)

    def check(self, num_frames: int, frame_stride: int) -> None:
        """Every video has num_frames * frame_stride frames (StyleGAN-V's rule) and one size."""
        need = num_frames * frame_stride
        for rel in self.videos:
            file = os.path.join(self.path, rel)
            n = count_frames(file)
            if n < need:
                raise UserError(f"generated.path = {self.path}: {rel} has {n} frames, fewer than the "
                                f"{need} each video needs (data.num_frames = {num_frames} x "
                                f"data.frame_stride = {frame_stride}); generate longer videos or "
                                "lower data.num_frames")
            h, w = read_frames(file, [0]).shape[1:3]
            if not self.height:
                self.height, self.width, first = h, w, rel
            elif (h, w) != (self.height, self.width):
                raise UserError(f"generated.path = {self.path}: {rel} is {h}x{w} px but {first} is "
                                f"{self.height}x{self.width} px; FVD compares videos of one size")

    def batches(self, num_frames: int, frame_stride: int, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, T, H, W): the first num_frames frames every frame_stride, as stored."""
        frames = list(range(0, num_frames * frame_stride, frame_stride))
        for i in range(0, len(self.videos), batch_size):
            yield uint8_batch([read_frames(os.path.join(self.path, rel), frames)
                               for rel in self.videos[i:i + batch_size]])


def one_video_per_name(root: str, sources: list[str]) -> tuple[list[str], list[str]]:
    """(chosen, left out): of the sources (files and frame folders) that share a name without
    extension, e.g. predict's sample_000.mp4 and sample_000.gif, the first kind in
    GENERATED_PREFERENCE is chosen; chosen in sorted order of their names."""
    by_name: dict[str, list[str]] = {}
    for rel in sources:
        is_folder = os.path.isdir(os.path.join(root, rel))
        name, ext = (rel, "") if is_folder else os.path.splitext(rel)
        by_name.setdefault(name, []).append(rel)
    rank = lambda rel: (GENERATED_PREFERENCE.index(_kind(root, rel)), rel)
    chosen, left_out = [], []
    for name in sorted(by_name):
        first, *others = sorted(by_name[name], key=rank)
        chosen.append(first)
        left_out += others
    return chosen, left_out


def _kind(root: str, rel: str) -> str:
    if os.path.isdir(os.path.join(root, rel)):
        return ""
    ext = os.path.splitext(rel)[1].lower()
    return ext if ext in GENERATED_PREFERENCE else ".gif"


# --------------------------------------------------------------------------- evaluate.py


def evaluate(cfg: EvaluateConfig, device: torch.device, sample_fn: SampleFn) -> dict:
    """FVD and its protocol; prints one line per metric and writes `cfg.output` if set.

    `sample_fn` is predict's `sample_videos`: generation is predict's own path. Everything
    that can be checked (output, detectors, checkpoint, geometry, folder) is checked before
    the first feature is computed.
    """
    if cfg.output:
        check_output_file(cfg.output, "output")
    i3d = load_detector(cfg.fvd.detector_path, device, check_frames=None)  # checked below
    inception = None if cfg.fid.detector_path is None else \
        load_detector(cfg.fid.detector_path, device, "fid.detector_path", "inception", check_frames=1)
    features = lambda: ClipFeatures(i3d, inception, device, cfg.fid.batch_size)
    ckpt, folder, generated, data, generator = _generated_side(cfg)
    dataset_seed = cfg.real.dataset_seed if cfg.real.dataset_seed is not None else \
        (ckpt["config"]["experiment"]["seed"] if ckpt else 0)
    real_clips = fvd_real_clips(data, generated, generator, cfg.real.split, dataset_seed,
                                cfg.real.num_clips or cfg.num_videos, cfg.real.seed)
    check_detector(i3d, "i3d", data.num_frames, device, "fvd.detector_path", cfg.fvd.detector_path)
    # The checkpoint's weights, VAE and text encoder (cfg.text_encoder.path: the same one, else
    # refused now), loaded and fingerprinted once for every chunk of videos.
    loaded = load_sampler(cfg.sampling(), device, ckpt) if ckpt is not None else None
    # Real side, then generated.
    real = features().add_all(_progress(clip_batches(real_clips.dataset, real_clips.plan,
                                                     cfg.fvd.batch_size),
                                        len(real_clips.plan), "features, real clips"))
    drift = None
    if ckpt is not None:
        gen, gen_record, drift = _checkpoint_features(cfg, loaded, generated, features, sample_fn, real_clips,
                                                      device)
    else:
        gen = features().add_all(_progress(folder.batches(data.num_frames, data.frame_stride,
                                                          cfg.fvd.batch_size),
                                           len(folder.videos), "features, generated"))
        gen_record = _folder_record(folder, data)
    result = {"fvd": fvd_from_stats(real.videos, gen.videos), "num_generated": gen.videos.n,
              "num_real": real.videos.n,
              "protocol": protocol(cfg, data, device, real_clips, dataset_seed,
                                   dict(gen_record, num_videos=gen.videos.n))}
    if inception is not None:
        result.update(_frame_metrics(cfg, real.frames, gen.frames))
    if drift is not None:
        result["image_to_video"] = drift.result(real.videos)
        print(drift.line(result["image_to_video"]))
    _report(result, real_clips)
    if cfg.output:
        _write_json(cfg.output, result)
        print(f"wrote {cfg.output}")
    return result


def _generated_side(cfg: EvaluateConfig):
    """(checkpoint or None, GeneratedFolder or None, the generated videos' geometry, the real
    clips' resolved data config, who generates the videos): everything checked, nothing
    computed yet."""
    if cfg.checkpoint is not None:
        ckpt = _load_stage2(cfg.checkpoint)
        generated = bucket_geometry(cfg.data, ckpt) or generated_geometry(model_dims(ckpt["model"]), ckpt["vae"])
        data = cfg.data.resolved(ckpt["config"]["data"])
        if ckpt.get("buckets"):  # null keys: the bucket's (not data.resolution and num_frames of training)
            data = replace(data, num_frames=cfg.data.num_frames or generated.num_frames,
                           resolution=cfg.data.resolution or generated.resolution())
        return ckpt, None, generated, data, _checkpoint_generator(cfg.checkpoint, ckpt)
    folder = GeneratedFolder.scan(cfg.generated.path, cfg.num_videos)
    frames = cfg.data.num_frames or PROTOCOL_FRAMES
    stride = cfg.data.frame_stride or PROTOCOL_STRIDE
    folder.check(frames, stride)
    generated = ClipGeometry(frames, folder.height, folder.width)
    data = cfg.data.resolved(None, {"num_frames": frames, "frame_stride": stride,
                                    "resolution": generated.resolution()})
    return None, folder, generated, data, f"generated.path = {cfg.generated.path}"


def bucket_geometry(data: EvalDataConfig, ckpt: dict) -> Optional[ClipGeometry]:
    """The trained bucket that data.resolution and data.num_frames (either may be null) name,
    for a checkpoint trained on buckets (the most frames among those that match; both null:
    predict's default); None: the checkpoint's own shape (no buckets, or no bucket matches:
    refused later with the geometry check's message)."""
    from training.buckets import default_shape, trained_shapes
    if not ckpt.get("buckets"):
        return None
    if data.resolution is None and data.num_frames is None:
        h, w, n = default_shape(ckpt)  # what predict samples by default
        return ClipGeometry(n, h, w)
    size = None if data.resolution is None else (data.height, data.width)
    match = [(n, h, w) for h, w, n in trained_shapes(ckpt)
             if size in (None, (h, w)) and data.num_frames in (None, n)]
    return ClipGeometry(*max(match)) if match else None


def _load_stage2(path: str) -> dict:
    refuse_folder(path, "checkpoint", f"the checkpoint file in it (e.g. {os.path.join(path, 'latest.pth')})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint = {path}: no such file; point it at a stage-2 "
                        "latest.pth (or use generated.path=FOLDER)")
    ckpt = load_checkpoint(path, key="checkpoint")
    check_format(ckpt, path, key="checkpoint")
    check_entries(ckpt, path, PREDICT_ENTRIES, key="checkpoint")
    return ckpt


def _checkpoint_generator(path: str, ckpt: dict) -> str:
    """Who generates the videos, for messages: the checkpoint and, for a causal video VAE,
    how its latent frames become pixel frames."""
    latent, temporal = ckpt["model"]["dims"]["num_frames"], ckpt["vae"].get("temporal_factor", 1)
    if temporal == 1:
        return path
    return (f"{path} (its {ckpt['vae'].get('class_name', 'video')} VAE decodes {latent} latent "
            f"frames to 1 + ({latent} - 1) x {temporal})")


class WindowDrift:
    """Image-to-video and long videos at evaluate (`image_to_video`, `windows`): the features,
    jigsaw score and count of each window position (window 0 = the FVD of the record), and the
    PSNR of frame 0 against the given image (with the image's own VAE round trip, its bound)."""

    def __init__(self, cfg: EvaluateConfig, ckpt: dict, geometry: ClipGeometry, features: Callable,
                 real_clips: RealClips, device: torch.device, vae=None):
        """`vae`: the checkpoint's FrozenVAE, which the images' round trip goes through."""
        from training.first_frames import FirstFrames, window_plan, windows_of
        first = FirstFrames.of(ckpt["model"]["config"])
        if cfg.image_to_video:
            first.require("image_to_video", cfg.checkpoint)
        if cfg.windows > 1:
            first.require(f"windows = {cfg.windows}", cfg.checkpoint)
        self.cfg, self.real_clips, self.device = cfg, real_clips, device
        window = geometry.num_frames
        self.overlap = 1 + (first.frames - 1) * int(ckpt["vae"].get("temporal_factor", 1))
        self.num_frames = window + (cfg.windows - 1) * (window - self.overlap)
        assert len(window_plan(self.num_frames, window, self.overlap)) == cfg.windows
        self.spans = windows_of(self.num_frames, window, self.overlap)
        self.features = [features() for _ in self.spans]
        self.jigsaw = [0.0 for _ in self.spans]
        self.cell = int(ckpt["vae"].get("spatial_factor", 1)) * int(ckpt["model"]["config"].get("patch_size", 1))
        self.psnr, self.round_trip, self.count = [], [], 0
        self.vae = vae if cfg.image_to_video else None

    def images(self, start: int, n: int, folder: str) -> Optional[list[str]]:
        """PNGs of the first frames of real clips start .. start + n - 1 (cycled), in `folder`."""
        if not self.cfg.image_to_video:
            return None
        from PIL import Image
        paths, self.given = [], []
        for i in range(start, start + n):
            src, frames = self.real_clips.plan[i % len(self.real_clips.plan)]
            frame = video_tensor_to_uint8(self.real_clips.dataset.source_frames(src, frames[:1]))[0]
            paths.append(os.path.join(folder, f"first_{i:06d}.png"))
            Image.fromarray(frame).save(paths[-1])
            self.given.append(frame)
        return paths

    def add(self, videos: list[np.ndarray]) -> None:
        from training.first_frames import psnr
        from utils.metrics import jigsaw_score
        from utils.video_io import uint8_to_video_tensor
        for w, (a, b) in enumerate(self.spans):
            part = [v[a:b] for v in videos]
            self.features[w].add_all(video_batches(part, self.cfg.fvd.batch_size))
            score = jigsaw_score(torch.stack([uint8_to_video_tensor(x) for x in part]), self.cell)
            self.jigsaw[w] += score * len(part)
        self.count += len(videos)
        if self.vae is not None:
            for v, given in zip(videos, self.given):
                self.psnr.append(psnr(v[0], given))
                x = uint8_to_video_tensor(given[None])[None].to(self.device)  # (1, 3, 1, H, W)
                back = video_tensor_to_uint8(self.vae.decode(self.vae.encode(x, sample=False))[0].cpu())[0]
                self.round_trip.append(psnr(back, given))

    def result(self, real: FeatureStats) -> dict:
        out = {"image_to_video": self.cfg.image_to_video, "windows": self.cfg.windows,
               "num_frames": self.num_frames, "overlap_frames": self.overlap,
               "window_spans": [list(s) for s in self.spans],
               "fvd_by_window": [fvd_from_stats(real, f.videos) for f in self.features],
               "jigsaw_by_window": [j / max(self.count, 1) for j in self.jigsaw]}
        if self.psnr:
            out["first_frame_psnr"] = float(np.mean(self.psnr))
            out["first_frame_psnr_vae_round_trip"] = float(np.mean(self.round_trip))
        return out

    @staticmethod
    def line(r: dict) -> str:
        fvd = ", ".join(f"{x:.2f}" for x in r["fvd_by_window"])
        jig = ", ".join(f"{x:.2f}" for x in r["jigsaw_by_window"])
        first = "" if "first_frame_psnr" not in r else (
            f"; frame 0 PSNR {r['first_frame_psnr']:.2f} dB vs the image (its VAE round trip "
            f"{r['first_frame_psnr_vae_round_trip']:.2f} dB)")
        return (f"windows: {r['windows']} of {r['num_frames']} frames ({r['overlap_frames']} shared "
                f"per join); FVD by window {fvd}; jigsaw by window {jig}{first}")


def _checkpoint_features(cfg: EvaluateConfig, loaded: Loaded, geometry: ClipGeometry,
                         features: Callable[[], ClipFeatures], sample_fn: SampleFn,
                         real_clips: RealClips, device: torch.device
                         ) -> tuple[ClipFeatures, dict, Optional[WindowDrift]]:
    """Samples num_videos with predict's path from the checkpoint `loaded` once, in chunks
    (video i always has seed + i and the label predict gives video i; a text model: real clip
    i's caption), and accumulates their features. With `image_to_video` / `windows`: the first
    window's features, and the drift."""
    ckpt = loaded.ckpt
    drift = WindowDrift(cfg, ckpt, geometry, features, real_clips, device, loaded.vae) \
        if cfg.image_to_video or cfg.windows > 1 else None
    features = drift.features[0] if drift is not None else features()
    dims = model_dims(ckpt["model"])
    # Video i has real clip i's own condition (its class, its caption: the two sides of FVD
    # describe the same content, and image i's video continues its own clip), unless
    # class_labels are given.
    own = loaded.seam.clip_conditions(*real_conditions(real_clips, cfg.num_videos)) \
        if cfg.class_labels is None else {"labels": list(cfg.class_labels)}
    labels_of_real = cfg.class_labels is None and "labels" in own
    labels = None if "labels" not in own else torch.tensor(
        [own["labels"][i % len(own["labels"])] for i in range(cfg.num_videos)], dtype=torch.long)
    prompts = own.get("prompts")
    frames = geometry.num_frames if drift is None else drift.num_frames
    expected = (frames, geometry.height, geometry.width, 3)
    with tqdm(total=cfg.num_videos, desc="features, generated", unit="video", leave=False) as bar, \
            tempfile.TemporaryDirectory() as images_dir:
        for start in range(0, cfg.num_videos, GENERATION_CHUNK):
            n = min(GENERATION_CHUNK, cfg.num_videos - start)
            chunk = replace(cfg.sampling(), num_videos=n, seed=cfg.seed + start,
                            class_labels=None if labels is None else labels[start:start + n].tolist(),
                            prompts=None if prompts is None else prompts[start:start + n])
            if ckpt.get("buckets"):  # a trained bucket's shape (bucket_geometry), sampled as predict does
                chunk = replace(chunk, resolution=[geometry.height, geometry.width], num_frames=geometry.num_frames)
            if drift is not None:
                chunk = replace(chunk, images=drift.images(start, n, images_dir),
                                num_frames=None if cfg.windows == 1 else drift.num_frames)
            videos, _ = sample_fn(chunk, features.device, loaded)
            assert all(v.shape == expected for v in videos), (videos[0].shape, expected)
            if drift is not None:
                drift.add(videos)  # window 0 into `features`
            else:
                features.add_all(video_batches(videos, cfg.fvd.batch_size))
            bar.update(n)
    record = {"source": "checkpoint", "checkpoint": os.path.abspath(cfg.checkpoint),
              "step": int(ckpt["step"]), "vae_fingerprint": ckpt["vae"]["fingerprint"],
              "vae_class": ckpt["vae"].get("class_name"), "weights": "EMA" if cfg.use_ema else "raw",
              "sampler": loaded.sampler, "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale,
              "class_labels": "the class of real clip i" if labels_of_real else cfg.class_labels,
              **_prompt_record(ckpt, prompts), "seeds": f"{cfg.seed} + i, i = 0 ... {cfg.num_videos - 1}",
              "num_frames": geometry.num_frames, "latent_frames": dims["num_frames"],
              "resolution": [geometry.height, geometry.width],
              "uint8": "predict's: round((x + 1) * 127.5) of the decoded [-1, 1] pixels"}
    if drift is not None:
        record.update(image_to_video=cfg.image_to_video, windows=cfg.windows,
                      images="the first frame of real clip i" if cfg.image_to_video else None,
                      fvd_scores="the first window")
    return features, record, drift


def real_conditions(real: RealClips, num_videos: int) -> tuple[list[int], list[Optional[str]]]:
    """The labels and captions (None without captions) of real clips 0 .. num_videos - 1
    (cycled): what the conditioning seam makes each generated video's condition of."""
    plan = [real.plan[i % len(real.plan)] for i in range(num_videos)]
    captions = [real.dataset.source_caption(src, frames) if getattr(real.dataset, "has_captions", False)
                else None for src, frames in plan]
    return [real.dataset.source_label(src) for src, _ in plan], captions


def real_prompts(real: RealClips, num_videos: int) -> list[str]:
    """The captions of real clips 0 .. num_videos - 1 (cycled): a text checkpoint's video i is
    conditioned on real clip i's."""
    from training.conditioning import TextConditioning
    return TextConditioning.clip_conditions(*real_conditions(real, num_videos))["prompts"]


def _prompt_record(ckpt: dict, prompts: Optional[list[str]]) -> dict:
    if prompts is None:
        return {}
    encoder = ckpt["conditioning"]["text_encoder"]
    return {"prompts": "the captions of the real clips: generated video i is conditioned on real clip i's "
                       "(cycled when there are fewer real clips)",
            "num_distinct_prompts": len(set(prompts)), "first_prompt": prompts[0],
            "text_encoder": {k: encoder.get(k) for k in ("class_name", "fingerprint", "max_length")}}


def _folder_record(folder: GeneratedFolder, data: DataConfig) -> dict:
    return {"source": "folder", "path": os.path.abspath(folder.path),
            "videos": "the first num_videos in sorted order of their names, one file per name "
                      "(preferred: " + " > ".join(k or "frame folder" for k in GENERATED_PREFERENCE) + ")",
            "found": folder.found, "left_out_same_name": len(folder.left_out),
            "first": folder.videos[0], "last": folder.videos[-1],
            "frames": f"frames 0, {data.frame_stride}, ... {(data.num_frames - 1) * data.frame_stride} "
                      "as stored (no resampling in time or space)",
            "num_frames": data.num_frames, "frame_stride": data.frame_stride,
            "resolution": [folder.height, folder.width]}


def _frame_metrics(cfg: EvaluateConfig, real: FeatureStats, generated: FeatureStats) -> dict:
    """Per-frame FID and KID, and how they were computed."""
    f = cfg.fid
    return {"fid": fvd_from_stats(real, generated),
            "kid": kernel_inception_distance(real.features(), generated.features(), f.kid_subsets,
                                             f.kid_subset_size, seed=cfg.real.seed),
            "num_generated_frames": generated.n, "num_real_frames": real.n,
            "frame_protocol": {
                "detector": {"path": os.path.abspath(f.detector_path), "sha256": file_digest(f.detector_path),
                             "kwargs": dict(INCEPTION_KWARGS), "feature_dim": FEATURE_DIMS["inception"],
                             "input": "uint8 frames (N, 3, H, W) in [0, 255]", **detector_precision()},
                "frames": "every frame of the clips above (generated and real)",
                "kid": {"kernel": "(x . y / D + 1)^3", "estimator": "unbiased MMD^2",
                        "subsets": f.kid_subsets, "subset_size": f"min({f.kid_subset_size}, frames)",
                        "seed": cfg.real.seed}}}


def deviations(cfg: EvaluateConfig, data: DataConfig, real: RealClips, num_generated: int) -> list[str]:
    """Every way this run differs from StyleGAN-V's fvd2048_16f, as the option that made it."""
    out = []
    if num_generated != PROTOCOL_VIDEOS:
        out.append(f"{num_generated} generated videos (num_videos; {PROTOCOL}: {PROTOCOL_VIDEOS})")
    used, asked = real.record["num_clips"], real.record["num_clips_requested"]
    if used != PROTOCOL_VIDEOS:
        why = (f"real.num_clips / num_videos asked for {asked}, the real set has only "
               f"{real.record['num_videos_long_enough']} videos of >= {real.record['min_frames']} "
               "frames" if used < asked else "real.num_clips / num_videos")
        out.append(f"{used} real clips ({why}; {PROTOCOL}: {PROTOCOL_VIDEOS})")
    if data.num_frames != PROTOCOL_FRAMES:
        out.append(f"clips of {data.num_frames} frames (data.num_frames; {PROTOCOL}: {PROTOCOL_FRAMES})")
    if data.frame_stride != PROTOCOL_STRIDE:
        out.append(f"every {data.frame_stride}th frame (data.frame_stride; {PROTOCOL}: consecutive)")
    if cfg.real.split != "all":
        out.append(f"real videos of the {cfg.real.split} split only (real.split; {PROTOCOL}: every "
                   "video of the dataset folder)")
    if data.fps is not None:
        out.append(f"real videos resampled to {data.fps} fps (data.fps; {PROTOCOL}: frames as stored)")
    return out


def protocol(cfg: EvaluateConfig, data: DataConfig, device: torch.device, real: RealClips,
             dataset_seed: int, generated: dict) -> dict:
    """Everything a reader needs to reproduce or compare the number."""
    off = deviations(cfg, data, real, generated["num_videos"])
    return {
        "name": PROTOCOL if not off else f"deviates from {PROTOCOL}",
        "deviations": off,
        "reference": "StyleGAN-V (universome/stylegan-v) src/metrics/metric_main.py fvd2048_16f, "
                     "frechet_video_distance.py compute_fvd, metric_utils.py, src/training/dataset.py",
        "detector": {"path": os.path.abspath(cfg.fvd.detector_path),
                     "sha256": file_digest(cfg.fvd.detector_path), "kwargs": dict(DETECTOR_KWARGS),
                     "feature_dim": FEATURE_DIMS["i3d"],
                     "input": "uint8 (N, 3, T, H, W) in [0, 255]", **detector_precision()},
        "device": str(device), "torch": torch.__version__,
        "statistics": "float64; mean and biased covariance (1/N); Frechet distance with "
                      "tr sqrt via symmetric eigendecompositions",
        "real": {"path": data.path, "split": cfg.real.split, **real.record,
                 "dataset_seed": dataset_seed, "num_frames": data.num_frames,
                 "frame_stride": data.frame_stride, "resolution": data.resolution, "fps": data.fps,
                 "videos": "sorted by path; the first num_clips with >= min_frames frames "
                           "(num_frames x frame_stride), one clip each, none twice",
                 "crop": "resized to cover height x width keeping the aspect ratio, center crop "
                         "(no resize when a video is already that size)",
                 "windows": "start uniform in [0, length - (num_frames - 1) x frame_stride - 1], "
                            "from numpy default_rng((seed, k)) for clip k",
                 "seed": cfg.real.seed,
                 "builtin": asdict(data.builtin) if data.path == BUILTIN_MOVING_SHAPES else None},
        "generated": generated,
    }


def _report(result: dict, real: RealClips) -> None:
    """One stdout line per metric, and a note when fewer real clips exist than were asked."""
    r = real.record
    if r["num_clips"] < r["num_clips_requested"]:
        print(f"note: {r['num_clips_requested']} real clips were asked for but the real set has "
              f"{r['num_videos_long_enough']} videos of >= {r['min_frames']} frames: FVD uses "
              f"{r['num_clips']} real clips (each video once, as StyleGAN-V); a number from fewer "
              "clips is biased upwards, compare only equal counts")
    for name in ("FVD", "FID", "KID"):
        if name.lower() in result:
            print(metric_line(name, result))


def metric_line(name: str, result: dict) -> str:
    """One stdout line: the number and the protocol details that must match to compare it."""
    p = result["protocol"]
    r = p["real"]
    clips = (f"real: {r['path']} ({r['split']}), the first {r['num_clips']} of "
             f"{r['num_videos_long_enough']} videos of >= {r['min_frames']} frames, window seed {r['seed']}")
    if name == "FVD":
        proto = p["name"] if not p["deviations"] else f"{p['name']}: " + "; ".join(p["deviations"])
        return (f"FVD {result['fvd']:.2f} ({result['num_generated']} generated vs "
                f"{result['num_real']} real clips of {r['num_frames']} frames, frame stride "
                f"{r['frame_stride']}, {_pixels(r['resolution'])}; {clips}; detector "
                f"{os.path.basename(p['detector']['path'])} sha256 {p['detector']['sha256'][:16]}, "
                f"uint8, TF32 {'on' if p['detector']['tf32'] else 'off'}; {proto})")
    f = result["frame_protocol"]
    value = f"{result['fid']:.2f}" if name == "FID" else f"{result['kid']:.5f}"
    kid = f", {f['kid']['subsets']} subsets of {f['kid']['subset_size']}" if name == "KID" else ""
    return (f"{name} {value} (per frame: {result['num_generated_frames']} generated vs "
            f"{result['num_real_frames']} real frames of the clips above{kid}; "
            f"{_pixels(r['resolution'])}; detector {os.path.basename(f['detector']['path'])} sha256 "
            f"{f['detector']['sha256'][:16]})")


def _pixels(resolution) -> str:
    """data.resolution as text: "256 px" (a square side) or "256x448 px" ([height, width])."""
    return f"{resolution[0]}x{resolution[1]} px" if isinstance(resolution, list) else f"{resolution} px"


def _write_json(path: str, result: dict) -> None:
    try:
        write_json(result, path, indent=2)
    except OSError as e:
        raise UserError(f"output = {path}: cannot write it ({e.strerror}); choose another output") from None
