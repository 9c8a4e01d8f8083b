"""`predict_advanced.py`'s and `export.py`'s schemas (`PredictConfig`: predict_advanced.yaml;
`ExportConfig`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from utils.config_common import (MAX_VIDEO_FRAMES, PREDICT_FPS_RANGE, SamplerName, _check_device,
                                 _check_resolution, _positive, check_prompts, check_seed)
from utils.errors import ConfigError


DEFAULT_NUM_VIDEOS = 8  # predict's count when num_videos is null and nothing else sets it


@dataclass
class PredictVAEConfig:
    path: Optional[str] = None  # null: the VAE path recorded in the checkpoint


@dataclass
class PredictTextEncoderConfig:
    """Text checkpoints: the frozen encoder to embed prompts with (must be the checkpoint's)."""
    path: Optional[str] = None  # null: the encoder recorded in the checkpoint; else the same one moved
    subfolder: Optional[str] = None  # with path: as text_encoder.subfolder in training
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA


@dataclass
class PredictConfig:
    """`predict_advanced.py --config predict_advanced.yaml`"""
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda or cuda:N
    checkpoint: str = "runs/demo/latest.pth"  # the stage-2 checkpoint to sample from
    output_dir: str = "runs/demo/predict"  # folder the videos are written to
    # videos to make; null = one per prompt, image or class label given (`video_count`), else
    # DEFAULT_NUM_VIDEOS. A number: the prompts / images / labels are cycled over that many
    num_videos: Optional[int] = None
    batch_size: int = 4  # videos sampled at once
    sampler: SamplerName = "auto"  # auto: a pretrained model's own (Wan unipc, CogVideoX ddim), else ddpm for v, euler for flow
    num_steps: int = 50  # sampler steps
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    class_labels: Optional[list[int]] = None  # one per video, cycled; null = 0, 1, 2, ...
    # text checkpoints: video i is prompt i (cycled when num_videos is larger); or prompts_file,
    # a UTF-8 file with one prompt per line
    prompts: Optional[list[str]] = None
    prompts_file: Optional[str] = None  # or a UTF-8 file, one prompt per line (not both)
    negative_prompt: Optional[str] = None  # the uncond half of guidance; null = the learned null caption
    seed: int = 0  # sample i uses seed + i: same seed, same video
    fps: Optional[float] = None  # frames per second of the written videos; null = the checkpoint's rate
    use_ema: bool = True  # False: the raw (non-EMA) weights
    vae: PredictVAEConfig = field(default_factory=PredictVAEConfig)
    text_encoder: PredictTextEncoderConfig = field(default_factory=PredictTextEncoderConfig)
    # a checkpoint fine-tuned from a pretrained DiT (model.pretrained): its base folder; null = the
    # folder the checkpoint records (a LoRA needs it, with the recorded fingerprint; a full
    # fine-tune holds every weight itself)
    pretrained: Optional[str] = None
    # image-to-video (a checkpoint trained with model.first_frame_conditioning): a PNG/JPG that
    # becomes frame 0 of every video, or `images`, one per video (cycled)
    image: Optional[str] = None
    images: Optional[list[str]] = None  # or one image per video (cycled)
    # pixel frames per video; null = the training window's. Longer: extended window by window
    num_frames: Optional[int] = None
    # [height, width] (or a side) of the videos in pixels; null = the checkpoint's training shape.
    # A checkpoint trained on buckets samples any of them (resolution and num_frames of a bucket)
    resolution: Optional[Union[int, list[int]]] = None

    def image_list(self) -> Optional[list[str]]:
        """The image of each video (cycled over num_videos), or None."""
        paths = [self.image] if self.image is not None else self.images
        count = self.video_count()[0] if self.num_videos is None else self.num_videos
        return None if not paths else [paths[i % len(paths)] for i in range(count)]

    def video_count(self) -> tuple[int, str]:
        """(videos to make, a line saying how, "" when nothing needs saying).

        `num_videos` null: one video per prompt, per image of `images`, or per class label given,
        as diffusers' pipelines make one video per prompt (`image` alone is one video; with
        several lists, the longest decides and the shorter ones are cycled); with none of them,
        DEFAULT_NUM_VIDEOS (the count predict made before null existed). A number: that many,
        the lists cycled over it (video i is prompt i mod len(prompts)), said when it cycles."""
        prompts = self.prompt_list()
        lists = {"prompts": prompts, "images": self.images, "class_labels": self.class_labels}
        given = {name: len(v) for name, v in lists.items() if v}
        if self.num_videos is not None:
            cycled = [f"{k} {name}" for name, k in given.items() if k < self.num_videos]
            note = "" if not cycled else (
                f"num_videos = {self.num_videos} with {' and '.join(cycled)}: cycled over the videos "
                f"(video i takes entry i mod their count); leave num_videos null for one video per entry")
            return self.num_videos, note
        if not given:
            n = 1 if self.image is not None else DEFAULT_NUM_VIDEOS
            what = "image (one video)" if self.image is not None else \
                f"no prompts, images or class_labels: {n} videos (set num_videos for another count)"
            return n, f"num_videos = null and {what}"
        n = max(given.values())
        cycled = [name for name, k in given.items() if k < n]
        return n, (f"num_videos = null: {n} videos, one per entry of {' / '.join(given)}"
                   + (f" ({' and '.join(cycled)} cycled)" if cycled else ""))

    def resolved(self) -> "PredictConfig":
        """Copy with num_videos decided (`video_count`)."""
        return dataclasses.replace(self, num_videos=self.video_count()[0])

    def prompt_list(self) -> Optional[list[str]]:
        """`prompts`, or the lines of `prompts_file`, or None."""
        if self.prompts_file is not None:
            from utils.prompts import read_prompts_file
            return read_prompts_file(self.prompts_file, "prompts_file")
        return self.prompts

    def validate(self) -> None:
        _check_device(self.device)
        check_prompts(self.prompts, "prompts")
        if self.prompts is not None and self.prompts_file is not None:
            raise ConfigError("prompts and prompts_file are both set: give the prompts one way")
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise ConfigError("negative_prompt is empty: give a caption (e.g. \"blurry, static\") or null "
                              "(the learned null caption)")
        _positive(self, "", "batch_size", "num_steps")
        if self.num_videos is not None:
            _positive(self, "", "num_videos")
        check_seed(self.seed, "seed", self.num_videos or 1)
        if self.image is not None and self.images is not None:
            raise ConfigError("image and images are both set: give one image (every video) or a list "
                              "(one per video)")
        if self.images is not None and not self.images:
            raise ConfigError("images is an empty list: give image paths, or null")
        if self.images is not None and self.num_videos is not None and len(self.images) > self.num_videos:
            raise ConfigError(f"{len(self.images)} images but num_videos = {self.num_videos}: video i "
                              f"starts with image i, so set num_videos = {len(self.images)} or leave it "
                              "null (one video per image)")
        if self.num_frames is not None:
            _positive(self, "", "num_frames")
            if self.num_frames > MAX_VIDEO_FRAMES:
                raise ConfigError(f"num_frames = {self.num_frames}: at most {MAX_VIDEO_FRAMES} frames per "
                                  f"video (about {MAX_VIDEO_FRAMES / 24 / 60:.0f} minutes at 24 fps): a video "
                                  "is sampled window after window and its frames are held in memory until "
                                  f"it is written. Use at most {MAX_VIDEO_FRAMES}, or null (one training window)")
        if self.resolution is not None:
            _check_resolution(self.resolution, "resolution")
        lo, hi = PREDICT_FPS_RANGE
        if self.fps is not None and not lo <= self.fps <= hi:
            raise ConfigError(f"fps = {self.fps:g}: must be between {lo:g} and {hi:g} frames per second, "
                              "or null (the checkpoint's frame rate); the .gif written beside each "
                              "video counts time in whole 1/100 s")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale = {self.guidance_scale}: must be >= 0")


@dataclass
class ExportConfig:
    """`export.py checkpoint=PATH`: a fine-tuned pretrained DiT's weights back in diffusers' format."""
    checkpoint: str = ""  # a stage-2 checkpoint of a model.pretrained run (latest.pth, epoch_XXXX.pth)
    output_dir: Optional[str] = None  # null = <the checkpoint's folder>/export
    use_ema: bool = True  # the EMA weights (as the run's own export); false: the trained ones
    pretrained: Optional[str] = None  # a LoRA's base folder; null = the one the checkpoint records

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is not set: give checkpoint=PATH, the latest.pth of a "
                              "model.pretrained run (e.g. runs/finetune/latest.pth)")
