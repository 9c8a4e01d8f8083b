"""Sampling videos: the one path shared by validation (during training), predict and the
benchmarks (`sample_videos`: checkpoint -> videos).

Latents come from `models.diffusion.sample` with a diffusers scheduler built from the
checkpoint's schedule, and are decoded by the same frozen VAE the DiT was trained on.

predict streams (`predict_to_folder`): each batch of videos is written as soon as it is
decoded (every file written under a temp name, then renamed), so Ctrl-C or SIGTERM keeps
every finished video and memory does not grow with `num_videos`. A stop request is a flag
checked after each video and before each sampler step (never an exception raised inside a
writer). Its output folder's
`.predict_manifest.jsonl` records what predict wrote there (name, size, sha256): a later run
removes those files and nothing else, and refuses to overwrite a file it cannot prove it wrote.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from models.diffusion import Objective, SamplingStopped, make_objective, sample
from models.vae import FrozenVAE
from training.conditioning import Conditioning, SampleConditions, conditioning_from_checkpoint
from training.buckets import Window, bucket_summary, window_for
from training.first_frames import FirstFrames, generate_long, load_image, window_plan
from training.checkpoints import (PREDICT_ENTRIES, check_entries, check_format, check_vae,
                                  load_entry, model_from_checkpoint,
                                  objective_of, recorded_diffusion)
from utils.checkpoint import load_checkpoint
from utils.config import (AUTO_SAMPLER, DiffusionConfig, PredictConfig, VAERefConfig, check_num_steps,
                          config_from_dict)
from utils.errors import UserError
from utils.paths import is_regular_file, plain_name, remove_file
from utils.train_utils import GracefulStop
from utils.video_io import (check_write_fps, encode_video, grid_png_bytes, video_tensor_to_uint8,
                            write_bytes_atomic)


def default_labels(num_videos: int, num_classes: int,
                   class_labels: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """One label per video: the given ones cycled, else 0, 1, 2, ... over the classes."""
    if num_classes == 0:
        return None
    labels = list(class_labels) if class_labels else list(range(num_classes))
    return torch.tensor([labels[i % len(labels)] for i in range(num_videos)], dtype=torch.long)


@torch.no_grad()
def generate_videos(model: nn.Module, vae: FrozenVAE, diffusion: Objective | DiffusionConfig, *,
                    latent_shape: Sequence[int], seeds: Sequence[int], labels: Optional[torch.Tensor] = None,
                    sampler: str, num_steps: int, guidance_scale: float, null_class_id: Optional[int] = None,
                    device: torch.device, batch_size: int = 8, progress: bool = False,
                    conditions: Optional[SampleConditions] = None, images: Optional[torch.Tensor] = None,
                    num_frames: Optional[int] = None, condition_frames: int = 1) -> list[np.ndarray]:
    """Sample one video per seed. Returns uint8 frames (T, H, W, 3) per video, H x W the VAE's
    decode of `latent_shape`'s (h, w): data.resolution of the training run, square or not.

    Each video has its own generator seeded with its seed, so video i is the same whatever
    the batch size or the other videos. `diffusion`: the objective (or a DiffusionConfig: its
    objective) whose samplers run.
    """
    return [v for batch in generate_batches(
        model, vae, diffusion, latent_shape=latent_shape, seeds=seeds, labels=labels,
        sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
        null_class_id=null_class_id, device=device, batch_size=batch_size, progress=progress,
        conditions=conditions, images=images, num_frames=num_frames, condition_frames=condition_frames)
        for v in batch]


@torch.no_grad()
def generate_batches(model: nn.Module, vae: FrozenVAE, diffusion: Objective | DiffusionConfig, *,
                     latent_shape: Sequence[int], seeds: Sequence[int], labels: Optional[torch.Tensor] = None,
                     sampler: str, num_steps: int, guidance_scale: float, null_class_id: Optional[int] = None,
                     device: torch.device, batch_size: int = 8, progress: bool = False,
                     conditions: Optional[SampleConditions] = None, images: Optional[torch.Tensor] = None,
                     num_frames: Optional[int] = None, condition_frames: int = 1,
                     should_stop: Optional[Callable[[], bool]] = None
                     ) -> Iterator[list[np.ndarray]]:
    """`generate_videos`, one batch of uint8 videos (T, H, W, 3) at a time, as each is decoded.
    The condition of video i: row i of `conditions` (training/conditioning.py's seam), or the
    older class form `labels` with `null_class_id` (None: unconditional).

    First frames (a model trained with model.first_frame_conditioning): `images` (N, 3, H, W)
    in [-1, 1], image i the first frame of video i; `num_frames` pixel frames per video (more
    than the window: extended window by window on the last `condition_frames` latent frames;
    training/first_frames.py `generate_long`). Both None: one window, as before.
    `should_stop() -> bool` is asked before every sampler step: True ends the iteration there
    (the batch being sampled is dropped; the batches already yielded are whole)."""
    if conditions is None:
        conditions = class_conditions(labels, null_class_id)
    objective = diffusion if isinstance(diffusion, Objective) else make_objective(diffusion)
    model.eval()
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start:start + batch_size])
        generators = [torch.Generator(device).manual_seed(int(s)) for s in chunk]
        cond, uncond = conditions.rows(start, start + len(chunk), device)
        if images is not None or num_frames is not None:
            def window(shape, cond_frames, generators=generators, cond=cond, uncond=uncond):
                return sample(model, shape, scheduler=objective.make_scheduler(sampler),
                              num_steps=num_steps, generator=generators, device=device, cond=cond,
                              uncond=uncond, guidance_scale=guidance_scale, progress=progress,
                              mu=objective.mu(shape), cond_frames=cond_frames,
                              should_stop=should_stop)
            try:
                pixels = generate_long(
                    window, vae, batch=len(chunk), latent_shape=latent_shape, frames=condition_frames,
                    num_frames=num_frames or vae.geometry.pixel_frames(latent_shape[1]), device=device,
                    images=None if images is None else images[start:start + len(chunk)])
            except SamplingStopped:
                return
            yield [video_tensor_to_uint8(v) for v in pixels.cpu()]
            continue
        scheduler = objective.make_scheduler(sampler)
        try:
            latents = sample(model, (len(chunk), *latent_shape), scheduler=scheduler, num_steps=num_steps,
                             generator=generators, device=device, cond=cond, uncond=uncond,
                             guidance_scale=guidance_scale, progress=progress, should_stop=should_stop,
                             mu=objective.mu((len(chunk), *latent_shape)))  # (B, C, T, h, w)
        except SamplingStopped:
            return
        pixels = vae.decode(latents.float())  # (B, 3, T, H, W) in [-1, 1]
        yield [video_tensor_to_uint8(v) for v in pixels.cpu()]


def class_conditions(labels: Optional[torch.Tensor], null_class_id: Optional[int]) -> SampleConditions:
    """The older class form as seam conditions: y = labels, uncond y = the null class."""
    if labels is None:
        return SampleConditions({}, None)
    uncond = None if null_class_id is None else {"y": torch.full_like(labels, null_class_id)}
    return SampleConditions({"y": labels}, uncond, [""] * len(labels))


SAMPLE_EXTS = (".mp4", ".gif")
GRID_NAME = "grid.png"
PROMPTS_NAME = "prompts.txt"  # one line per video: what sample_{i:03d} was asked for
GRID_FRAMES = 16  # frames per video in grid.png
GRID_MAX_VIDEOS = 64  # rows of grid.png: the first videos (memory stays bounded)
MANIFEST_NAME = ".predict_manifest.jsonl"
MANIFEST_FORMAT = "predict-output/1"
TMP_PREFIX = ".predict_tmp_"  # a run's temp folder inside output_dir (recorded in the manifest)
PART_SUFFIX = ".part"  # a file being written, in that folder: no video extension, so never read as one


def sample_names(count: int) -> list[str]:
    """The files of `count` samples: sample_000.mp4, sample_000.gif, ..."""
    return [f"sample_{i:03d}{ext}" for i in range(count) for ext in SAMPLE_EXTS]


class OutputFolder:
    """What predict wrote into its output_dir, so that it removes or overwrites only that.

    `.predict_manifest.jsonl` holds one JSON line per file predict wrote (name, size, sha256),
    appended *before* the file is renamed into place, and one line per temp folder it made. A
    file is predict's only while it is a regular file (a symlink never is) whose bytes still
    hash to the recorded value: a user's video, or one of ours the user replaced, edited or
    linked, is never removed or overwritten. Entries name plain files inside output_dir; a temp
    folder that is a symlink is left alone (nothing is removed through it).
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.manifest = os.path.join(out_dir, MANIFEST_NAME)
        self.files, self.tmp_dirs = self._read()
        self.tmp_dir: Optional[str] = None
        self._log = None

    def _read(self) -> tuple[dict, list]:
        if not os.path.exists(self.manifest):
            return {}, []
        try:
            with open(self.manifest) as f:
                lines = f.read().splitlines()
            header = json.loads(lines[0]) if lines else None
        except (OSError, UnicodeDecodeError, ValueError):
            header = None
        if not isinstance(header, dict) or header.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{self.manifest} is not a manifest predict wrote (it lists the files "
                            "predict may replace); predict overwrites nothing it cannot prove it "
                            "wrote. Choose another output_dir, or remove that file.")
        files, tmp_dirs = {}, []
        for line in lines[1:]:
            with contextlib.suppress(ValueError):  # a line cut by a kill: nothing to prove
                record = json.loads(line)
                if isinstance(record, dict) and plain_name(record.get("tmp")):  # never a path out of output_dir
                    tmp_dirs.append(record["tmp"])
                elif _file_record(record):
                    files[record["file"]] = record
        return files, tmp_dirs

    def owns(self, name: str) -> bool:
        """`name` exists and is byte for byte the file this folder's manifest says predict wrote."""
        record, path = self.files.get(name), os.path.join(self.out_dir, name)
        # lstat: a symlink is never predict's, even to a file with the recorded bytes
        if record is None or not is_regular_file(path) or os.path.getsize(path) != record["size"]:
            return False
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == record["sha256"]

    def claim(self, names: Sequence[str]) -> list[str]:
        """Prepare to write `names`: refuse (before anything changes) if one exists and is not
        predict's; remove every file an earlier predict left here; start a fresh manifest and a
        temp folder. Returns the removed names."""
        foreign = sorted(n for n in names if os.path.lexists(os.path.join(self.out_dir, n))
                         and not self.owns(n))
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise UserError(f"output_dir {self.out_dir} already holds {shown}, which predict did not "
                            "write (or which changed since it did); predict never overwrites such a "
                            "file. Choose another output_dir, or move or remove "
                            f"{'that file' if len(foreign) == 1 else 'those files'} first.")
        removed = [n for n in sorted(self.files) if self.owns(n)]
        for name in removed:
            remove_file(os.path.join(self.out_dir, name))
        for tmp in self.tmp_dirs:
            self._remove_tmp(os.path.join(self.out_dir, tmp))
        os.makedirs(self.out_dir, exist_ok=True)
        write_bytes_atomic(self.manifest, (json.dumps({"format": MANIFEST_FORMAT}) + "\n").encode())
        self.files, self.tmp_dirs = {}, []
        self._log = open(self.manifest, "a")
        self.tmp_dir = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.out_dir)
        self._append({"tmp": os.path.basename(self.tmp_dir)})
        return removed

    def record(self, name: str, data: bytes) -> None:
        """Note `name` with `data`'s size and hash, before the file takes that name."""
        entry = {"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.files[name] = entry
        self._append(entry)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.tmp_dir is not None:
            self._remove_tmp(self.tmp_dir)
            self.tmp_dir = None

    def _append(self, entry: dict) -> None:
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()

    @staticmethod
    def _remove_tmp(folder: str) -> None:
        """A temp folder predict made: its part files, then the folder if nothing else is in it.
        A symlink of that name is not predict's folder: nothing is removed through it."""
        if os.path.islink(folder) or not os.path.isdir(folder) \
                or not os.path.basename(folder).startswith(TMP_PREFIX):
            return
        for name in os.listdir(folder):
            if name.endswith(PART_SUFFIX):
                remove_file(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _file_record(record) -> bool:
    """A manifest line naming a file predict wrote: a plain name in output_dir (never a path out
    of it), its size in bytes and its sha256 (64 hex digits)."""
    if not isinstance(record, dict) or not plain_name(record.get("file")):
        return False
    size, digest = record.get("size"), record.get("sha256")
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0 and isinstance(digest, str)
            and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest))


class SampleWriter:
    """Writes sample_{i:03d}.mp4/.gif as videos arrive (a sample's files all appear, or none),
    and keeps the few frames grid.png needs. With an `OutputFolder` (predict), every file is
    recorded in its manifest and written in its temp folder before it is renamed into place."""

    def __init__(self, out_dir: str, fps: float, folder: Optional[OutputFolder] = None):
        self.out_dir, self.fps, self.folder = out_dir, fps, folder
        self.count, self.paths, self.thumbs, self.names = 0, [], [], []
        self.interrupted = False  # predict stopped by Ctrl-C / SIGTERM before the last video
        os.makedirs(out_dir, exist_ok=True)

    def add(self, frames: np.ndarray, name: str = "") -> None:
        """`frames`: (T, H, W, 3) uint8, written as the next sample (all its files, or none);
        `name`: what it was conditioned on (a prompt, a class), its line in prompts.txt."""
        names = [f"sample_{self.count:03d}{ext}" for ext in SAMPLE_EXTS]
        self._write(names, [encode_video(frames, self.fps, ext) for ext in SAMPLE_EXTS])
        if len(self.thumbs) < GRID_MAX_VIDEOS:  # the frames grid_png_bytes would pick
            keep = np.linspace(0, len(frames) - 1, min(GRID_FRAMES, len(frames))).round().astype(int)
            self.thumbs.append(frames[keep])
        self.names.append(" ".join(str(name).split()))  # one line, whatever the prompt held
        self.count += 1

    def write_prompts(self) -> Optional[str]:
        """prompts.txt: line i is what sample_{i:03d} was conditioned on (written when any is)."""
        if not any(self.names):
            return None
        self._write([PROMPTS_NAME], ["".join(f"{n}\n" for n in self.names).encode("utf-8")])
        return os.path.join(self.out_dir, PROMPTS_NAME)

    def write_grid(self) -> Optional[str]:
        if not self.thumbs:
            return None
        self._write([GRID_NAME], [grid_png_bytes(self.thumbs, max_frames=GRID_FRAMES)])
        return os.path.join(self.out_dir, GRID_NAME)

    def _write(self, names: list[str], blobs: list[bytes]) -> None:
        """Each blob to a part file, then all renamed into place; an error or a second Ctrl-C
        mid-write leaves no part of them (and, with a folder, each is in its manifest first)."""
        paths = [os.path.join(self.out_dir, n) for n in names]
        if self.folder is not None:
            parts = [os.path.join(self.folder.tmp_dir, n + PART_SUFFIX) for n in names]
        else:
            parts = [os.path.join(self.out_dir, f".tmp_{n}{PART_SUFFIX}") for n in names]
        placed = []
        try:
            for name, part, data in zip(names, parts, blobs):
                if self.folder is not None:
                    self.folder.record(name, data)
                with open(part, "wb") as f:
                    f.write(data)
            for part, path in zip(parts, paths):
                os.replace(part, path)
                placed.append(path)
        except BaseException as e:
            for path in parts + placed:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            if isinstance(e, OSError):
                raise UserError(f"cannot write {paths[0]} ({e.strerror or e}); free some space or "
                                "choose another output directory") from None
            raise
        self.paths.extend(paths)


def save_videos(out_dir: str, videos: Sequence[np.ndarray], fps: float,
                names: Optional[Sequence[str]] = None) -> list[str]:
    """Writes sample_000.mp4 / .gif, ..., grid.png and (with `names`, e.g. prompts) prompts.txt;
    returns the written paths."""
    writer = SampleWriter(out_dir, fps)
    for i, frames in enumerate(videos):
        writer.add(frames, names[i] if names else "")
    writer.write_grid()
    writer.write_prompts()
    return writer.paths


def output_fps(fps: Optional[float], ckpt: dict) -> float:
    """Frames per second to write sampled videos at: `fps`, else the rate the checkpoint
    records for its training windows (older checkpoints: their validation.fps)."""
    return fps or ckpt.get("fps") or ckpt["config"]["validation"]["fps"]


def side_by_side(videos: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
    """Videos (T, H, W, 3) next to each other as one (T, H, n*W + gaps, 3) video for TensorBoard."""
    t, h, _, _ = videos[0].shape
    sep = np.full((t, h, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, v in enumerate(videos):
        parts.extend([sep, v] if i else [v])
    return np.concatenate(parts, axis=2)


@dataclass
class Loaded:
    """A checkpoint ready to sample from: checked, with its model, VAE, condition seam (a text
    model's encoder loaded), frame rate and sampler; and the conditions (labels, prompts) and
    first frames of the videos asked for, which `for_videos` makes for another request."""
    ckpt: dict
    model: nn.Module
    vae: FrozenVAE
    conditions: Optional[SampleConditions] = None  # of the videos asked for; None: none asked yet
    fps: float = 0.0  # frames per second the videos are written at
    images: Optional[torch.Tensor] = None  # (N, 3, H, W) in [-1, 1]: frame 0 of each video (image-to-video)
    seam: Conditioning = field(default_factory=Conditioning)  # the checkpoint's condition
    sampler: str = ""  # the configured sampler for the checkpoint's objective (`auto` resolved)
    window: Optional[Window] = None  # the shape sampled (resolution, num_frames: training/buckets.py)

    def for_videos(self, cfg: PredictConfig) -> "Loaded":
        """The same checkpoint, weights, VAE and text encoder with the videos of `cfg` (which
        names this checkpoint; num_videos decided): their conditions, refused when they do not fit
        the checkpoint, and their first frames. Nothing is loaded or hashed again: evaluate
        samples its thousands of videos in chunks this way."""
        conditions = _video_conditions(cfg, self.seam)
        window = window_for(cfg.resolution, cfg.num_frames, self.ckpt, self.vae)
        return replace(self, conditions=conditions, window=window,
                       images=_first_frames(cfg, self.ckpt, self.vae, window))


def load_sampler(cfg: PredictConfig, device: torch.device, ckpt: Optional[dict] = None) -> Loaded:
    """cfg.checkpoint (or `ckpt`, that file already loaded) with the VAE and text encoder it was
    trained with (fingerprints checked), EMA or raw weights and the sampler for its objective;
    no videos yet (`Loaded.for_videos`). Every check of the checkpoint is made here, before a
    video is sampled."""
    if ckpt is None:
        ckpt = load_checkpoint(cfg.checkpoint, key="checkpoint")
    check_format(ckpt, cfg.checkpoint, key="checkpoint")
    check_entries(ckpt, cfg.checkpoint, PREDICT_ENTRIES, key="checkpoint")
    diffusion = load_entry(cfg.checkpoint, "diffusion", lambda _: recorded_diffusion(ckpt),
                           ckpt["diffusion"], "is malformed", key="checkpoint")
    check_num_steps(cfg.num_steps, diffusion.num_train_timesteps, "num_steps")
    # The objective the checkpoint was trained with (recorded since flow matching; older ones are v).
    objective = diffusion.objective
    sampler = objective_of(ckpt).resolve_sampler(cfg.sampler, "sampler", f"checkpoint {cfg.checkpoint}, trained with")
    fps = _output_fps(cfg, ckpt)
    t = cfg.text_encoder
    seam = conditioning_from_checkpoint(ckpt, cfg.checkpoint, device, t.path, t.subfolder, t.dtype)
    vae_settings = load_entry(cfg.checkpoint, "config", _trained_vae_settings, ckpt["config"], "is malformed",
                              key="checkpoint")
    vae = FrozenVAE.from_config(vae_settings, device, cfg.vae.path or ckpt["vae"]["path"])
    check_vae(ckpt, vae, cfg.checkpoint)
    model = model_from_checkpoint(ckpt, cfg.use_ema, device, cfg.checkpoint, cfg.pretrained)
    auto = f" ({AUTO_SAMPLER} for {objective})" if cfg.sampler == AUTO_SAMPLER else ""
    print(f"checkpoint {cfg.checkpoint}: step {ckpt['step']}, {'EMA' if cfg.use_ema else 'raw'} weights, "
          f"{objective}; "
          f"VAE {vae.path} (fingerprint {vae.fingerprint} matches); {seam.summary()}; sampler {sampler}{auto}, "
          f"{cfg.num_steps} steps, {seam.guidance_note(cfg.guidance_scale)}; {fps:g} fps{bucket_summary(ckpt)}")
    return Loaded(ckpt, model, vae, None, fps, None, seam, sampler)


def load_for_sampling(cfg: PredictConfig, device: torch.device) -> Loaded:
    """`load_sampler` with the videos of `cfg` (its num_videos decided: `PredictConfig.resolved`),
    the configured labels or prompts; every check made before a video is sampled."""
    cfg = cfg.resolved()
    _check_request(cfg)  # what needs nothing loaded, first
    return load_sampler(cfg, device).for_videos(cfg)


def checkpoint_sampler(sampler: str, ckpt: dict) -> str:
    """The sampler `sampler` names for the checkpoint `ckpt`'s objective (`auto` resolved; older
    checkpoints record no objective: v_prediction), for records beside the numbers."""
    return objective_of(ckpt).resolve_sampler(sampler)


def requested(cfg: PredictConfig) -> PredictConfig:
    """`cfg` with num_videos decided (`PredictConfig.video_count`: null = one video per prompt,
    image or class label), saying so when it defaults or cycles the prompts, images or labels."""
    count, note = cfg.video_count()
    if note:
        print(note)
    return replace(cfg, num_videos=count)


def sample_videos(cfg: PredictConfig, device: torch.device,
                  loaded: Optional[Loaded] = None) -> tuple[list, dict]:
    """(uint8 videos (T, H, W, 3), checkpoint): every video of `cfg`, held in memory. `loaded`:
    cfg.checkpoint already loaded (`load_sampler`), for a caller that samples it many times
    (evaluate's chunks); only the conditions and first frames of cfg's videos are then made."""
    cfg = requested(cfg)
    if loaded is None:
        loaded = load_for_sampling(cfg, device)
    else:
        _check_request(cfg)
        loaded = loaded.for_videos(cfg)
    return [v for batch in _batches(cfg, loaded, device) for v in batch], loaded.ckpt


def predict_to_folder(cfg: PredictConfig, device: torch.device) -> SampleWriter:
    """Sample cfg.num_videos into cfg.output_dir, each batch written as it is finished, then
    grid.png. Files an earlier predict wrote there are removed first; any other file in the
    way is refused (`OutputFolder`). Ctrl-C or SIGTERM sets a flag checked after every video
    and before every sampler step (the batch being sampled is dropped): the finished videos
    and a grid of them stay, and the writer's `interrupted` is True. A second Ctrl-C stops at once (KeyboardInterrupt)."""
    cfg = requested(cfg)
    loaded = load_for_sampling(cfg, device)  # refused now, before a file is touched
    folder = OutputFolder(cfg.output_dir)
    removed = folder.claim(sample_names(cfg.num_videos) + [GRID_NAME, PROMPTS_NAME])
    if removed:
        print(f"removed {len(removed)} files an earlier predict wrote in {cfg.output_dir} "
              f"({removed[0]} ... {removed[-1]})")
    writer = SampleWriter(cfg.output_dir, loaded.fps, folder)
    stop = GracefulStop()
    videos = (frames for batch in _batches(cfg, loaded, device, lambda: stop.requested) for frames in batch)
    try:
        with stop:
            for frames in videos:
                writer.add(frames, loaded.conditions.prompts[writer.count])
                if stop.requested:  # the video in hand is whole; the rest of its batch is dropped
                    break
            writer.interrupted = writer.count < cfg.num_videos
    except KeyboardInterrupt:
        writer.interrupted = True
        raise
    finally:
        videos.close()
        writer.write_grid()  # also after an error: a grid of the finished videos
        writer.write_prompts()  # line i: what sample_{i:03d} was conditioned on
        folder.close()
        if writer.interrupted:
            print(f"interrupted: {writer.count} of {cfg.num_videos} videos were finished and are in "
                  f"{cfg.output_dir} (sample_000 ... sample_{max(writer.count - 1, 0):03d}); run again to "
                  "make all of them (the same seeds give the same videos)")
    return writer


def _output_fps(cfg: PredictConfig, ckpt: dict) -> float:
    """`output_fps`, checked: a number both the mp4 and the GIF can be written at."""
    fps = load_entry(cfg.checkpoint, "fps", lambda c: float(output_fps(cfg.fps, c)), ckpt, "is malformed",
                     key="checkpoint")
    if cfg.fps is None:
        check_write_fps(fps, f"the frame rate recorded in {cfg.checkpoint} (set fps to override it)")
    return fps


def _batches(cfg: PredictConfig, loaded: Loaded, device: torch.device,
             should_stop: Optional[Callable[[], bool]] = None) -> Iterator[list[np.ndarray]]:
    try:
        yield from _generate(cfg, loaded.model, loaded.vae, loaded.ckpt, loaded.conditions, device,
                             loaded.window, loaded.images, should_stop)
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory sampling {cfg.batch_size} videos at once; lower "
                        "batch_size (videos sampled together) or guidance (cfg doubles the batch)") from None


def _trained_vae_settings(config: dict) -> VAERefConfig:
    """The vae.* settings the checkpoint was trained with (dtype, tiling, slicing, frames per
    call): predict decodes exactly as validation did. `subfolder` is dropped: the recorded path
    is the VAE folder itself."""
    if not isinstance(config.get("vae"), dict):
        raise KeyError("it has no 'vae' section (the VAE settings the model was trained with)")
    recorded = {k: v for k, v in config["vae"].items() if k in VAERefConfig.__dataclass_fields__}
    return config_from_dict(VAERefConfig, {**recorded, "subfolder": None})


def _generate(cfg: PredictConfig, model, vae, ckpt: dict, conditions: SampleConditions,
              device, window: Window, images: Optional[torch.Tensor] = None,
              should_stop: Optional[Callable[[], bool]] = None) -> Iterator[list[np.ndarray]]:
    return generate_batches(
        model, vae, objective_of(ckpt), latent_shape=window.latent_shape,
        seeds=[cfg.seed + i for i in range(cfg.num_videos)], sampler=cfg.sampler,
        num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, conditions=conditions,
        device=device, batch_size=cfg.batch_size, progress=True, images=images,
        num_frames=window.num_frames, condition_frames=FirstFrames.of(ckpt["model"]["config"]).frames,
        should_stop=should_stop)


def _first_frames(cfg: PredictConfig, ckpt: dict, vae: FrozenVAE, sampled: Window) -> Optional[torch.Tensor]:
    """The `image` / `images` (N, 3, H, W) resized and cropped as training clips, or None; image
    and a `num_frames` beyond the window refused for a checkpoint trained without first frames.
    `sampled`: the shape sampled (`window_for`)."""
    first = FirstFrames.of(ckpt["model"]["config"])
    window = vae.geometry.pixel_frames(sampled.latent_shape[1])
    paths = cfg.image_list()
    if paths is not None:
        first.require("image-to-video (image / images)", cfg.checkpoint)
    if cfg.num_frames is not None and cfg.num_frames > window:
        first.require(f"num_frames = {cfg.num_frames} (longer than the {window}-frame training window)",
                      cfg.checkpoint)
        overlap = vae.geometry.pixel_frames(first.frames)
        print(f"num_frames = {cfg.num_frames}: {len(window_plan(cfg.num_frames, window, overlap))} windows "
              f"of {window} frames, each after the first conditioned on the {overlap} frame(s) before it")
    if paths is None:
        return None
    return torch.stack([load_image(p, sampled.height, sampled.width, "image" if cfg.image else "images")
                        for p in paths])


def _check_request(cfg: PredictConfig) -> None:
    """The prompts against num_videos (decided) and the negative prompt, refused before
    anything is loaded."""
    prompts = cfg.prompt_list()
    if prompts is not None and len(prompts) > cfg.num_videos:
        raise UserError(f"{len(prompts)} prompts but num_videos = {cfg.num_videos}: video i is prompt i, "
                        f"so set num_videos = {len(prompts)} (or more: the prompts are cycled), or leave "
                        "num_videos null (one video per prompt)")


def _video_conditions(cfg: PredictConfig, seam: Conditioning) -> SampleConditions:
    """The SampleConditions of the cfg.num_videos videos from the checkpoint's seam: the labels or
    the prompts (prompt i for video i), refused when they do not fit the checkpoint's condition."""
    return seam.samples(cfg.num_videos, labels=cfg.class_labels, prompts=cfg.prompt_list(),
                        negative_prompt=cfg.negative_prompt, guidance_scale=cfg.guidance_scale)
