"""`train_advanced.py`'s schema: the train and validation sections and the stage-2 run config
(`TrainRunConfig`: config_advanced.yaml, config_finetune.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from utils.config_common import (DataConfig, DiffusionConfig, ExperimentConfig, ModelConfig,
                                 PREDICT_FPS_RANGE, SamplerName, TextEncoderConfig, VAERefConfig,
                                 _check_device, _check_optimiser, _positive, check_num_steps, check_prompts,
                                 check_sampler, check_seed)
from utils.errors import ConfigError


@dataclass
class TrainConfig:
    """Stage 2 optimisation."""
    epochs: int = 100  # passes over the data at most (max_steps usually stops first)
    max_steps: Optional[int] = None  # stop at whichever comes first; null = epochs decide
    time_limit_minutes: Optional[float] = None  # stop (and save) this long after launch; LR anneals by then
    batch_size: int = 8  # per process
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 100  # linear LR warmup, optimizer steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine down to min_lr_ratio x lr, or constant
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: Optional[float] = 1.0  # max global grad norm; null = no clipping
    ema_decay: float = 0.999  # EMA of the trainable weights (validation and predict sample it); 0 = off
    ema_warmup_steps: int = 100  # EMA decay ramps up over this many steps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    tf32: bool = True  # CUDA only
    activation_checkpointing: bool = False  # recompute each block in the backward pass: memory for time
    compile: bool = False  # torch.compile the DiT
    # under torchrun: ddp replicates the DiT on every process; fsdp shards its parameters,
    # gradients, optimizer state and EMA over them (torch FSDP2; docs/distributed.md)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = 10  # optimizer steps between scalar logs
    checkpoint_every: int = 200  # write latest.pth every k optimizer steps (and at the end)
    epoch_checkpoint_every: int = 0  # write epoch_XXXX.pth every k epochs; 0 = never
    keep_last: int = 3  # epoch_XXXX.pth files kept; 0 = keep all
    resume: Optional[str] = None  # null, auto, or a checkpoint path
    max_nonfinite_steps: int = 5  # stop after this many NaN/Inf losses in a row
    # under torchrun: how long a process may wait for the others while the latent and text caches
    # are built (each rank encodes its share); training's collectives keep torch's default timeout
    setup_timeout_minutes: float = 120.0

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, "epochs", "batch_size", "grad_accum_steps", "log_every",
                  "checkpoint_every", "max_nonfinite_steps")
        if self.setup_timeout_minutes <= 0:
            raise ConfigError(f"{prefix}.setup_timeout_minutes = {self.setup_timeout_minutes}: must be > 0 "
                              "(minutes a process waits for the others while the caches are built)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{prefix}.max_steps = {self.max_steps}: must be >= 1 or null")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"{prefix}.time_limit_minutes = {self.time_limit_minutes}: must be > 0 or null")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr = {self.lr}: must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{prefix}.ema_decay = {self.ema_decay}: must be in [0, 1)")
        _check_optimiser(self, prefix)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas = {self.betas}: give two numbers in [0, 1)")
        for k in ("warmup_steps", "ema_warmup_steps", "epoch_checkpoint_every", "keep_last"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{prefix}.{k} = {getattr(self, k)}: must be >= 0")


@dataclass
class ValidationFVDConfig:
    """FVD during training (off unless detector_path is set); see evaluate.py for the protocol."""
    detector_path: Optional[str] = None  # i3d_torchscript.pt; null = no val/fvd
    num_videos: int = 64  # generated videos, and as many real training clips
    batch_size: int = 8  # videos per detector call

    def validate(self, prefix: str = "validation.fvd") -> None:
        _positive(self, prefix, "num_videos", "batch_size")
        if self.num_videos < 2:
            raise ConfigError(f"{prefix}.num_videos = {self.num_videos}: a covariance needs >= 2 videos")


@dataclass
class ValidationConfig:
    every_epochs: int = 10  # sample validation videos every k epochs (and at the end); 0 = never
    num_videos: int = 4  # videos sampled at each validation
    sampler: SamplerName = "auto"  # auto: a pretrained model's own (Wan unipc, CogVideoX ddim), else ddpm for v, euler for flow
    num_steps: int = 50  # sampler steps
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    fps: int = 8  # frames per second of the validation videos
    seed: int = 1234  # sample i uses seed + i; also fixes the held-out loss's noise
    loss_clips: int = 16  # held-out (val split) windows for val/loss; 0 = no val/loss
    # text models: the prompts of the samples (cycled); null = captions of held-out clips
    prompts: Optional[list[str]] = None
    fvd: ValidationFVDConfig = field(default_factory=ValidationFVDConfig)

    def validate(self, prefix: str = "validation") -> None:
        _positive(self, prefix, "num_videos", "num_steps", "fps")
        check_seed(self.seed, f"{prefix}.seed", max(self.num_videos, self.fvd.num_videos))
        hi = PREDICT_FPS_RANGE[1]  # the validation samples are written as .gif too
        if self.fps > hi:
            raise ConfigError(f"{prefix}.fps = {self.fps}: must be at most {hi:g} frames per second; "
                              "the .gif of the validation samples counts time in whole 1/100 s")
        if self.every_epochs < 0:
            raise ConfigError(f"{prefix}.every_epochs = {self.every_epochs}: must be >= 0")
        if self.loss_clips < 0:
            raise ConfigError(f"{prefix}.loss_clips = {self.loss_clips}: must be >= 0 (0 = off)")
        if self.guidance_scale < 0:  # as predict's and evaluate's guidance_scale
            raise ConfigError(f"{prefix}.guidance_scale = {self.guidance_scale}: must be >= 0 (1 = off)")
        check_prompts(self.prompts, f"{prefix}.prompts")
        self.fvd.validate(prefix + ".fvd")


@dataclass
class TrainRunConfig:
    """`train_advanced.py --config config_advanced.yaml`"""
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda or cuda:N
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAERefConfig = field(default_factory=VAERefConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def validate(self) -> None:
        _check_device(self.device)
        for part in ("experiment", "data", "vae", "model", "train", "validation", "text_encoder"):
            getattr(self, part).validate(part)
        self.diffusion.validate("diffusion", rules=False)
        if self.model.pretrained is None:  # else once the pretrained model's schedule is known (setup)
            self.check_schedule()
        if self.data.captions is not None and self.model.conditioning_kind() != "text":
            raise ConfigError(f"data.captions = {self.data.captions!r} is set but model.conditioning = "
                              f"{self.model.conditioning_kind()}: only text models read captions (and a "
                              "caption file is checked row by row); remove data.captions, or set "
                              "model.conditioning: text")
        if self.validation.prompts is not None and self.model.conditioning_kind() != "text":
            raise ConfigError(f"validation.prompts is set but model.conditioning = "
                              f"{self.model.conditioning_kind()}: prompts need a text model "
                              "(model.conditioning: text); remove validation.prompts")
        if self.vae.path is None and self.model.pretrained is None:  # else: the pretrained pipeline's vae/
            raise ConfigError("vae.path is not set: point it at a diffusers VAE directory (e.g. the vae/ "
                              "folder that train_vae.py writes into its run directory) or a pipeline folder")

    def check_schedule(self) -> None:
        """The keys that depend on the resolved schedule (objective, timesteps): the validation
        sampler and its step count."""
        diffusion = self.diffusion.resolved()
        diffusion.validate("diffusion", rules=True)
        if self.validation.every_epochs:  # validation off: its sampler and steps are never used
            check_num_steps(self.validation.num_steps, diffusion.num_train_timesteps, "validation.num_steps")
            check_sampler(self.validation.sampler, diffusion.objective, "validation.sampler")
