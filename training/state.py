"""The training state of stage 2: `Stage2`, everything the loop, validation and the
checkpoints need, built once by `training.stage2.setup()`, and `HeldOut`, validation's
encoded windows. A module of its own so that the loop (`training/stage2.py`) and validation
(`training/validation.py`) both import it and neither imports the other's caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.loader import ResumableSampler
from models.backbones import Family
from models.diffusion import Objective
from models.vae import FrozenVAE
from training.buckets import Buckets
from training.common import Deadline, LRPlan, Position, StepControl
from training.conditioning import Conditioning
from training.first_frames import FirstFrames
from training.parallel import Replicated
from utils.config import TrainRunConfig
from utils.dist import DistInfo
from utils.fvd import FeatureStats
from utils.logging import RunLogger
from utils.train_utils import EMA


@dataclass
class Stage2:
    """Everything the loop needs, built once by `setup()`."""
    cfg: TrainRunConfig
    run_dir: str
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype
    log: RunLogger
    vae: FrozenVAE
    diffusion: Objective  # the objective (models/diffusion.py): the model's, for a pretrained one
    model: nn.Module  # the bare module (VideoDiT, or a PretrainedDiT): EMA, checkpoints and sampling use this; fsdp: sharded
    net: nn.Module  # what the loop calls: maybe compiled and/or DDP-wrapped
    ddp: Optional[DistributedDataParallel]  # the DDP module (no_sync lives here), None = 1 process or fsdp
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_sched: torch.optim.lr_scheduler.LambdaLR
    loader: torch.utils.data.DataLoader
    sampler: ResumableSampler
    noise_gen: torch.Generator  # t, noise and posterior samples: its state is checkpointed
    dims: dict
    class_names: list
    pos: Position
    total_steps: int
    deadline: Deadline  # train.time_limit_minutes: a hard stop
    plan: LRPlan  # the step the LR anneals to (and training ends at) under the time limit
    real_jigsaw: Optional[float] = None  # jigsaw score of real clips, computed once
    held_out: Optional[list[HeldOut]] = None  # val/loss's fixed windows (per bucket), encoded once (rank 0)
    detector: Optional[torch.jit.ScriptModule] = None  # validation.fvd's I3D, if set
    fvd_real: Optional[FeatureStats] = None  # real clips' features for val/fvd, computed once
    saved_step: int = 0  # the step latest.pth holds (a failing run saves only what is newer)
    saved_whole: bool = True  # latest.pth holds the weights itself (False: it names a sharded directory)
    last_data_wait_fraction: float = 0.0  # of the last logging interval (benchmarks read it)
    val_losses: list[float] = field(default_factory=list)  # val/loss (EMA) of each validation, this launch
    fps: Optional[float] = None  # frames per second of the training windows (in checkpoints)
    control: Optional[StepControl] = None  # the loop's agreed stop decisions (set by train())
    cond: Conditioning = field(default_factory=Conditioning)  # what a condition is (training/conditioning.py)
    val_captions: list = field(default_factory=list)  # distinct captions of the val split (text runs)
    first_frames: FirstFrames = field(default_factory=FirstFrames)  # model.first_frame_conditioning
    family: Family = None  # the DiT family (models/backbones.py): set by setup
    parallel: Replicated = None  # train.parallel's strategy (training/parallel.py): set by setup
    grad_bytes: Optional[int] = None  # local gradient bytes, measured before the last logged step
    memory_logged: bool = False  # log.txt got this launch's memory line
    buckets: Optional[Buckets] = None  # data.buckets (training/buckets.py); None: one shape


@dataclass
class HeldOut:
    """val/loss's fixed windows of the val split, as the frozen VAE's scaled posterior means."""
    latents: torch.Tensor  # (N, C, T, h, w) on the training device
    cond: dict  # the seam's eval keyword arguments, (N, ...) each ({} for an unconditional model)
    name: str = ""  # the data bucket of these windows ("" without buckets)
