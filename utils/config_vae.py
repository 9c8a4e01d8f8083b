"""`train_vae.py`'s schema: the VAE architecture and stage-1 training sections and the stage-1
run config (`VAERunConfig`: config_vae.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from utils.config_common import (DataConfig, ExperimentConfig, _check_device, _check_optimiser, _positive,
                                 check_resolution_multiple)
from utils.errors import ConfigError


@dataclass
class VAEArchConfig:
    """Stage 1: the diffusers AutoencoderKL to train (applied per frame)."""
    # channels of each block: 3 blocks = 4x down, 4 = 8x
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1  # resnet layers per encoder / decoder block
    latent_channels: int = 4  # channels of the latents
    norm_num_groups: int = 16  # GroupNorm groups (divides every block's channels)
    mid_block_attention: bool = False  # self-attention in the mid block (at the latent resolution)
    init_logvar: Optional[float] = -6.0  # initial posterior log-variance; null = diffusers' init

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, prefix: str = "vae") -> None:
        if len(self.block_out_channels) not in (3, 4):
            raise ConfigError(f"{prefix}.block_out_channels = {self.block_out_channels}: give 3 "
                              "blocks (4x spatial downsampling) or 4 blocks (8x)")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ConfigError(f"{prefix}.block_out_channels = {self.block_out_channels}: each "
                                  f"must be a positive multiple of norm_num_groups={self.norm_num_groups}")
        _positive(self, prefix, "layers_per_block", "latent_channels", "norm_num_groups")


@dataclass
class VAETrainConfig:
    """Stage 1 optimisation."""
    epochs: int = 1000  # passes over the data at most (max_steps usually stops first)
    max_steps: Optional[int] = 1600  # optimizer steps at most (the cap); null = epochs decide
    time_limit_minutes: Optional[float] = None  # wall time from launch (the LR anneals by then); null = stop on steps or the PSNR target
    target_psnr: Optional[float] = None  # dB: stop once the held-out PSNR reaches it; null = off
    eval_every: int = 200  # steps between held-out PSNR checks (with target_psnr)
    batch_size: int = 16  # clips per batch
    frames_per_clip: Optional[int] = 1  # random frames per clip in the VAE batch; null = all
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 50  # linear LR warmup, optimizer steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after warmup, over the step budget
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    l1_weight: float = 1.0  # weight of the L1 reconstruction loss
    mse_weight: float = 1.0  # weight of the MSE reconstruction loss
    kl_weight: float = 1e-6  # weight of the KL term (keeps the posterior near N(0, 1))
    grad_clip: Optional[float] = 1.0  # max global gradient norm; null = no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    tf32: bool = True  # TF32 matmuls (CUDA only)
    # NHWC weights and frames: the step ran 1.36x faster on a 2-core CPU at load ~1.5 but
    # 0.85x at load ~10 (one interleaved run each): off until the quiet-machine A/B of
    # docs/benchmarks.md "Stage 1" decides
    channels_last: bool = False
    log_every: int = 25  # optimizer steps between scalar logs
    image_every: int = 200  # steps between reconstruction grids in TensorBoard
    checkpoint_every: int = 200  # write latest.pth every k optimizer steps (and at the end)
    resume: Optional[str] = None  # null, auto, or a checkpoint path
    scale_num_clips: int = 64  # training clips used to measure the latent scaling_factor
    max_nonfinite_steps: int = 5  # stop after this many NaN/Inf losses in a row

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, "epochs", "batch_size", "log_every", "image_every",
                  "checkpoint_every", "scale_num_clips", "max_nonfinite_steps", "eval_every")
        if self.target_psnr is not None and self.target_psnr <= 0:
            raise ConfigError(f"{prefix}.target_psnr = {self.target_psnr}: must be > 0 (dB) or null (off)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{prefix}.max_steps = {self.max_steps}: must be >= 1 or null")
        if self.frames_per_clip is not None and self.frames_per_clip < 1:
            raise ConfigError(f"{prefix}.frames_per_clip = {self.frames_per_clip}: must be >= 1 "
                              "or null (all frames)")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr = {self.lr}: must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps = {self.warmup_steps}: must be >= 0")
        _check_optimiser(self, prefix)
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"{prefix}.time_limit_minutes = {self.time_limit_minutes}: "
                              "must be > 0 or null")
        if min(self.l1_weight, self.mse_weight, self.kl_weight) < 0:
            raise ConfigError(f"{prefix}: loss weights must be >= 0")
        if self.l1_weight + self.mse_weight == 0:
            raise ConfigError(f"{prefix}.l1_weight and mse_weight are both 0: "
                              "the VAE needs a reconstruction loss")


@dataclass
class VAERunConfig:
    """`train_vae.py --config config_vae.yaml`"""
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda or cuda:N
    experiment: ExperimentConfig = field(default_factory=lambda: ExperimentConfig(name="vae"))
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEArchConfig = field(default_factory=VAEArchConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)

    def validate(self) -> None:
        _check_device(self.device)
        self.experiment.validate()
        self.data.validate()
        self.vae.validate()
        self.train.validate()
        if self.data.buckets is not None:
            raise ConfigError(f"data.buckets = {self.data.buckets!r}: stage 1 trains the VAE on frames of "
                              "one shape (data.resolution); buckets are for stage 2 (train_advanced.py). "
                              "Remove data.buckets here")
        factor = self.vae.downsample_factor
        check_resolution_multiple(self.data, factor, f"the VAE's downsampling factor {factor}")
        if (self.train.frames_per_clip or 0) > self.data.num_frames:
            raise ConfigError(f"train.frames_per_clip = {self.train.frames_per_clip} is more than "
                              f"data.num_frames = {self.data.num_frames}; lower it or use null (all)")
