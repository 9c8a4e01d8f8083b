"""Training helpers that live beside the loops: device, precision, seeding, LR, EMA."""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
from typing import Optional

import numpy as np
import torch
from torch import nn

from utils.errors import UserError

# Seeds derived from `experiment.seed` for each rank's random streams. The strides keep the
# streams of different (seed, rank) pairs apart for up to 1000 ranks; the primes keep the
# three kinds of stream apart from each other.
NOISE_SEED_STRIDE = 1000  # the training noise generator (t, noise, posterior samples)
WORKER_SEED_STRIDE = 1009  # DataLoader workers' base seed
GLOBAL_SEED_STRIDE = 1013  # python / numpy / torch global RNGs of ranks > 0 (label dropout, frame picks)


def noise_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s training noise generator."""
    return seed * NOISE_SEED_STRIDE + rank


def worker_seed(seed: int, rank: int) -> int:
    """Base seed of rank `rank`'s DataLoader workers (worker k gets base + k)."""
    return seed * WORKER_SEED_STRIDE + rank


def global_seed(seed: int, rank: int) -> int:
    """Seed of the global RNGs of rank `rank` > 0 once the model is built (rank 0 keeps the
    stream `experiment.seed` started), so that ranks draw their own label dropout and picks."""
    return seed * GLOBAL_SEED_STRIDE + rank


PIXEL_BYTES = 4  # float32 pixels
BATCH_COPIES = 2  # a batch of pixels exists twice while it is made: its clips and the collated tensor


def available_memory() -> Optional[int]:
    """Bytes of host memory available now (Linux MemAvailable: free plus reclaimable cache,
    else free pages); None when the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: `available_memory`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def check_batch_memory(data, batch_size: int, batch_key: str = "train.batch_size") -> None:
    """Refuse, before anything is allocated, a batch of pixel clips larger than the host's
    available memory: `batch_size` clips of data.num_frames frames at data.resolution, float32,
    held twice while collated. `data`: a DataConfig. A lower bound (the VAE and the model need
    memory on top), so a run it lets through may still be too big, but one it refuses cannot
    fit."""
    need = BATCH_COPIES * batch_size * 3 * data.num_frames * data.height * data.width * PIXEL_BYTES
    free = available_memory()
    if free is None or need <= free:
        return
    raise UserError(f"data.resolution = {data.resolution} with data.num_frames = {data.num_frames} and "
                    f"{batch_key} = {batch_size}: one batch of pixel clips needs about {need / 2**30:.1f} GiB "
                    f"(float32, as clips and as the batch), more than the {free / 2**30:.1f} GiB of memory "
                    f"available here; lower data.resolution, data.num_frames or {batch_key}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(device_name: str, seed: int, precision: str = "fp32", tf32: Optional[bool] = None,
                  local_rank: Optional[int] = None) -> tuple[torch.device, torch.dtype]:
    """What every script does first: the device (under torchrun this rank's GPU), the seeds, the
    autocast dtype and TF32 (None leaves torch's defaults). Returns (device, autocast dtype)."""
    device = resolve_device(device_name)
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    seed_everything(seed)
    if tf32 is not None:
        set_tf32(tf32)
    return device, resolve_precision(precision, device)


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda if available, else cpu. Asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device = {name!r} but CUDA is not available here; use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device = {name!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. `auto`: bf16 on CUDA (fp16 + loss scaling where bf16 is missing),
    fp32 on CPU, where bf16/fp16 matmuls are ~500x slower. An explicit bf16/fp16 is honoured
    on CPU too (torch autocasts and loss-scales there): the tests run those paths on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.precision = bf16 but {torch.cuda.get_device_name(device)} cannot "
                        "compute in bfloat16; use train.precision=fp16 (with loss scaling) or auto")
    if precision in ("bf16", "fp16") and device.type not in ("cuda", "cpu"):
        raise UserError(f"train.precision = {precision} is not supported on device {device}; "
                        "use train.precision=fp32 or auto")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; disabled scalers are no-ops (and still checkpointable)."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA, through the `fp32_precision` API of
    torch >= 2.9 (the `allow_tf32` flags are deprecated there)."""
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def make_adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the fastest update torch has for the parameters' device (see `use_fast_adamw`)."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    use_fast_adamw(optimizer)
    return optimizer


def use_fast_adamw(optimizer: torch.optim.Optimizer) -> None:
    """Switch every group to the fused kernel (one pass over all parameters; CPU and CUDA), or to
    foreach where the device has no fused kernel.

    torch's default on CPU is a Python loop per tensor (it cost 7% of a demo step). Measured on
    the benchmark's 32M-parameter DiT: 70 ms per update with foreach, 22 ms fused. Call this
    again after `load_state_dict`, which restores the flags the checkpoint was saved with. The
    update is the same AdamW either way (to float rounding; tests/test_train_utils.py).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    fused_devices = _get_fused_kernels_supported_devices()
    for group in optimizer.param_groups:
        fused = all(p.device.type in fused_devices and p.is_floating_point() for p in group["params"])
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if fused and "step" in state:  # fused keeps `step` on the parameter's device
                state["step"] = state["step"].to(p.device, torch.float32)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str,
                  min_lr_ratio: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to `min_lr_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's TRAINABLE weights; decay ramps up over
    `warmup_steps`.

    `model` is the averaged copy, for sampling: its frozen weights (a LoRA's base) are the very
    tensors of the trained model, not copies, so an EMA over adapters costs the adapters' memory
    only; its buffers follow the trained model's. `state_dict` holds the averaged weights and the
    buffers (for a model without frozen weights: its whole state_dict, as ever)."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=dict(shared)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self._keys = set(trainable_state_dict(model))
        self._source, self._pairs = None, None  # update's tensor lists, built once per model

    def decay_at(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * min(1.0, step / self.warmup_steps)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if self._source is not model:
            self._source = model
            pairs = [(e, p.detach()) for (_, e), (_, p) in zip(self.model.named_parameters(),
                                                               model.named_parameters()) if p.requires_grad]
            self._pairs = ([e for e, _ in pairs], [p for _, p in pairs],
                           list(zip(self.model.buffers(), model.buffers())))
        ema_params, params, buffers = self._pairs
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))  # ema += (1 - d) * (p - ema)
        for b_ema, b in buffers:
            b_ema.copy_(b)

    def averaged(self) -> list[torch.Tensor]:
        """The averaged weights this EMA holds itself (not the frozen ones it shares)."""
        return [p for n, p in self.model.named_parameters() if n in self._keys]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if k in self._keys}

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state_dict(self.model, state, self._keys)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The module that holds the averaged weights, for sampling: this EMA's own copy (the
        trained `model` is left as it is)."""
        yield self.model


def trainable_state_dict(model: nn.Module) -> dict:
    """The weights a checkpoint keeps: the trainable parameters and the persistent buffers (a
    model without frozen weights: its whole state_dict; a LoRA: the adapters alone)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state_dict(model: nn.Module, state: dict, keys: Optional[set] = None) -> None:
    """Load `state` (a `trainable_state_dict`) into `model`: exactly the keys it should hold
    (`keys`, default: the model's trainable ones), else a RuntimeError naming the difference."""
    check_state_keys(state, set(trainable_state_dict(model)) if keys is None else set(keys))
    model.load_state_dict(state, strict=False)


def check_state_keys(state: dict, expected: set) -> None:
    """`state` is a mapping with exactly the keys `expected`, else an error naming the difference."""
    if not isinstance(state, dict):
        raise TypeError(f"a state dict is a mapping, got {type(state).__name__}")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError("Error(s) in loading state_dict: "
                           + (f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}; " if missing else "")
                           + (f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
                              if unexpected else ""))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


class StopRequested(BaseException):
    """SIGINT/SIGTERM inside `GracefulStop.interruptible()`: unwinds that phase (validation)
    at once. A BaseException, so that `except Exception` in between does not swallow it."""


class GracefulStop:
    """SIGINT/SIGTERM set a flag the loop checks after each step (it then saves and exits).

    Inside `interruptible()` (long phases without steps: validation sampling) the first
    signal also raises StopRequested, so a stop is not held up until the phase ends (Slurm
    and Kubernetes kill 30 s after SIGTERM). A second SIGINT raises KeyboardInterrupt at
    once, for a user who really wants out.
    """

    def __init__(self):
        self.requested = False
        self._raise = False
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def interruptible(self):
        """A phase that a stop request ends at once (StopRequested), also one that came before."""
        if self.requested:
            raise StopRequested
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def _handle(self, signum, frame) -> None:
        import signal
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._raise:
            self._raise = False  # once: the handler of the phase's clean-up must not raise again
            raise StopRequested
