"""`evaluate.py`'s schema (`EvaluateConfig`: evaluate.yaml): the real clips, the generated
videos and the metrics."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from utils.config_common import (DataConfig, MAX_WINDOWS, SamplerName, _check_device, _check_resolution,
                                 _positive, check_seed, config_from_dict)
from utils.config_loader import config_to_dict
from utils.config_predict import (PredictConfig, PredictTextEncoderConfig, PredictVAEConfig)
from utils.errors import ConfigError


@dataclass
class EvalDataConfig(DataConfig):
    """evaluate.py's real clips: a training config's `data` section. With a checkpoint, a null
    path takes the checkpoint's whole data section (the clips it was trained on), and null
    num_frames / resolution / frame_stride take the checkpoint's; without one, the generated
    videos' size and StyleGAN-V's fvd2048_16f (16 frames, stride 1)."""
    path: Optional[str] = None
    num_frames: Optional[int] = None
    resolution: Optional[Union[int, list[int]]] = None  # a square side or [height, width]
    frame_stride: Optional[int] = None

    def validate(self, prefix: str = "data") -> None:
        """Checked as a DataConfig once resolved (`resolved`); here only what is given."""
        for n in ("num_frames", "frame_stride"):
            if getattr(self, n) is not None and getattr(self, n) < 1:
                raise ConfigError(f"{prefix}.{n} = {getattr(self, n)}: must be >= 1 or null")
        if self.resolution is not None:
            _check_resolution(self.resolution, prefix + ".resolution")

    def resolved(self, trained: Optional[dict], generated: Optional[dict] = None) -> DataConfig:
        """The DataConfig to read real clips with. `trained`: the checkpoint's data section;
        `generated`: defaults from the generated videos (num_frames, resolution, frame_stride),
        used for keys that are null here and in `trained`."""
        base = config_to_dict(self)
        if trained is not None and self.path is None:
            base = dict(trained)
        for n in ("path", "num_frames", "resolution", "frame_stride"):
            if getattr(self, n) is not None:
                base[n] = getattr(self, n)
            elif base.get(n) is None:
                fallback = (trained or {}).get(n)
                if fallback is None:
                    fallback = (generated or {}).get(n)
                base[n] = fallback if fallback is not None else getattr(DataConfig(), n)
        try:
            return config_from_dict(DataConfig, base)
        except ConfigError as e:
            raise ConfigError(f"data (real clips): {e}") from None


@dataclass
class RealClipsConfig:
    """Which real clips FVD compares with (see docs/evaluation.md)."""
    # all: every video of data.path (StyleGAN-V: the dataset folder, no split); train | val:
    # that split of data.val_fraction only (a deviation, written into the protocol record)
    split: Literal["all", "train", "val"] = "all"
    num_clips: Optional[int] = None  # null = num_videos; the first num_clips videos, one clip each
    seed: int = 0  # seeds each clip's random window start
    dataset_seed: Optional[int] = None  # built-in data's experiment.seed; null = the checkpoint's, else 0

    def validate(self, prefix: str = "real") -> None:
        check_seed(self.seed, f"{prefix}.seed")
        if self.dataset_seed is not None:
            check_seed(self.dataset_seed, f"{prefix}.dataset_seed")
        if self.num_clips is not None and self.num_clips < 2:
            raise ConfigError(f"{prefix}.num_clips = {self.num_clips}: need >= 2 (or null = num_videos)")


@dataclass
class GeneratedConfig:
    # a folder of generated videos (files and frame folders; one per name: sample_000.mp4 wins
    # over sample_000.gif), instead of `checkpoint`
    path: Optional[str] = None


@dataclass
class FVDConfig:
    detector_path: Optional[str] = None  # i3d_torchscript.pt (never downloaded by this repo)
    batch_size: int = 8  # videos per detector call

    def validate(self, prefix: str = "fvd") -> None:
        _positive(self, prefix, "batch_size")


@dataclass
class FIDConfig:
    """Optional per-frame FID and KID on the frames of the same clips."""
    detector_path: Optional[str] = None  # inception-2015-12-05.pt (TorchScript); null = skip FID/KID
    batch_size: int = 64  # frames per detector call
    kid_subsets: int = 100  # KID: random subsets averaged (StyleGAN2-ADA: 100)
    kid_subset_size: int = 1000  # KID: frames per subset and side, at most (StyleGAN2-ADA: 1000)

    def validate(self, prefix: str = "fid") -> None:
        _positive(self, prefix, "batch_size", "kid_subsets")
        if self.kid_subset_size < 2:
            raise ConfigError(f"{prefix}.kid_subset_size = {self.kid_subset_size}: must be >= 2")


@dataclass
class EvaluateConfig:
    """`evaluate.py --config evaluate.yaml`: FVD of generated videos against real clips.

    The sampling keys are predict's (`predict_advanced.yaml`), with the same meaning."""
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda or cuda:N
    checkpoint: Optional[str] = None  # sample num_videos from it exactly as predict does
    generated: GeneratedConfig = field(default_factory=GeneratedConfig)
    num_videos: int = 2048  # generated videos (StyleGAN-V's fvd2048_16f: 2048)
    batch_size: int = 16  # videos sampled at once
    sampler: SamplerName = "auto"  # auto: a pretrained model's own (Wan unipc, CogVideoX ddim), else ddpm for v, euler for flow
    num_steps: int = 50  # sampler steps
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    class_labels: Optional[list[int]] = None  # cycled over the videos; null = video i gets real clip i's class
    seed: int = 0  # video i uses seed + i
    use_ema: bool = True  # the EMA weights (false: the raw ones)
    vae: PredictVAEConfig = field(default_factory=PredictVAEConfig)
    # text checkpoints: video i is conditioned on real clip i's caption, embedded by this encoder
    text_encoder: PredictTextEncoderConfig = field(default_factory=PredictTextEncoderConfig)
    pretrained: Optional[str] = None  # as predict's: a LoRA checkpoint's base; null = the recorded folder
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    real: RealClipsConfig = field(default_factory=RealClipsConfig)
    fvd: FVDConfig = field(default_factory=FVDConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    output: Optional[str] = None  # JSON file for every number and the protocol; null = stdout only
    # A checkpoint trained with model.first_frame_conditioning: video i starts from the first
    # frame of real clip i (image_to_video) and/or runs `windows` training windows; FVD then
    # scores the first window, and each window position gets its own FVD and jigsaw score (drift)
    image_to_video: bool = False
    windows: int = 1  # training windows per video (image_to_video / drift: FVD per window)

    def validate(self) -> None:
        _check_device(self.device)
        _positive(self, "", "num_videos", "batch_size", "num_steps", "windows")
        check_seed(self.seed, "seed", self.num_videos)
        if self.windows > MAX_WINDOWS:
            raise ConfigError(f"windows = {self.windows}: at most {MAX_WINDOWS} window positions (each one "
                              "is sampled for every video and gets its own FVD statistics); use at most "
                              f"{MAX_WINDOWS}")
        if self.num_videos < 2:
            raise ConfigError(f"num_videos = {self.num_videos}: a covariance needs >= 2 videos")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale = {self.guidance_scale}: must be >= 0")
        if (self.checkpoint is None) == (self.generated.path is None):
            raise ConfigError(
                "give exactly one of checkpoint=PATH (sample videos from a stage-2 checkpoint) and "
                f"generated.path=FOLDER (videos already generated); got checkpoint = "
                f"{self.checkpoint!r}, generated.path = {self.generated.path!r}")
        self.data.validate("data")
        self.real.validate("real")
        self.fvd.validate("fvd")
        self.fid.validate("fid")

    def sampling(self, output_dir: str = "") -> PredictConfig:
        """predict's config for these sampling keys, so generation is predict's own path."""
        return PredictConfig(
            device=self.device, checkpoint=self.checkpoint or "", output_dir=output_dir,
            num_videos=self.num_videos, batch_size=self.batch_size, sampler=self.sampler,
            num_steps=self.num_steps, guidance_scale=self.guidance_scale,
            class_labels=self.class_labels, seed=self.seed, use_ema=self.use_ema,
            vae=dataclasses.replace(self.vae), text_encoder=dataclasses.replace(self.text_encoder),
            pretrained=self.pretrained)
