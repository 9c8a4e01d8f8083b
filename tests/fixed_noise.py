"""Run the stage-2 trainer with noise and timesteps fixed per training item, not per call.

Comparing updates across batch layouts (batch 8 vs accumulating 2 x 4, or 2 processes x 2
x 2) needs every training window to see the same t and noise in both runs, while the
trainer draws them per micro-batch from its generator. `ItemNoise` replaces the trainer's
`Diffusion` with one whose draws come from tables indexed by the ids of the windows in the
micro-batch (read from the rank's sampler order); everything else - the loader, the loss
scaling by grad_accum_steps, DDP's no_sync and all-reduce, clipping, AdamW - is the trainer's
own code. Also a torchrun entry point: `python -m torch.distributed.run ... tests/fixed_noise.py
OUT.pt RUN_DIR key=value ...` writes rank 0's weights and AdamW moments after training.
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, ROOT)

from models.diffusion import Diffusion  # noqa: E402
from training.checkpoints import latent_shape  # noqa: E402
from training.stage2 import setup, train  # noqa: E402
from utils.config import TrainRunConfig, load_config  # noqa: E402
from utils.dist import DistInfo, cleanup, init_distributed  # noqa: E402
from utils.logging import RunLogger  # noqa: E402
from utils.train_utils import seed_everything  # noqa: E402

# Shared by every layout compared: fixed t and noise, the posterior mean (no sampling), no
# label dropout, a constant LR (no warmup), so one step depends only on the batch's content.
EXACT = ["vae.sample_posterior=false", "model.class_dropout=0", "model.caption_dropout=0", "train.warmup_steps=0",
         "train.lr_schedule=constant", "validation.every_epochs=0", "train.checkpoint_every=1000",
         "train.precision=fp32", "device=cpu", "data.cache=off"]


class ItemNoise:
    """A `Diffusion` whose t and noise for a micro-batch are rows `ids` of fixed tables."""

    def __init__(self, diffusion: Diffusion, sampler, num_items: int, latent_shape: tuple, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.diffusion, self.sampler = diffusion, sampler
        self.t = torch.randint(0, diffusion.num_train_timesteps, (num_items,), generator=g)  # (N,)
        self.noise = torch.randn((num_items, *latent_shape), generator=g)  # (N, C, T, h, w)
        self.served, self.epoch, self.ids = 0, None, None

    def sample_timesteps(self, batch: int, device, generator=None, latent_shape=None) -> torch.Tensor:
        if self.sampler.epoch != self.epoch:
            self.served, self.epoch = 0, self.sampler.epoch
        order = self.sampler.epoch_order()
        self.ids = torch.tensor(order[self.served:self.served + batch])  # this micro-batch's windows
        self.served += batch
        return self.t[self.ids].to(device)

    def add_noise(self, x0, noise, t):
        return self.diffusion.add_noise(x0, self.noise[self.ids].to(x0.device), t)

    def loss(self, v, x0, noise, t, frame_mask=None):
        return self.diffusion.loss(v, x0, self.noise[self.ids].to(x0.device), t, frame_mask)


def train_fixed(overrides: list[str], run_dir: str, dist: DistInfo = DistInfo(),
                config: str = "config_advanced.yaml") -> dict:
    """Train with `ItemNoise`; returns {"model": state_dict, "exp_avg": [first moments of the
    trainable parameters]} on CPU."""
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, config), EXACT + overrides)
    seed_everything(cfg.experiment.seed)
    s = setup(cfg, run_dir, dist, torch.device("cpu"), torch.float32, RunLogger(run_dir, dist.is_main), None)
    latent = latent_shape(s.dims)
    s.diffusion = ItemNoise(s.diffusion, s.sampler, s.sampler.num_items, latent)
    train(s)
    s.log.close()
    return {"step": s.pos.step, "model": {k: _whole(v).clone() for k, v in s.model.state_dict().items()},
            "exp_avg": [_whole(s.optimizer.state[p]["exp_avg"]).clone() for p in s.model.parameters()
                        if p.requires_grad]}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: train.parallel=fsdp shards parameters and optimizer state (every rank calls this)."""
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def assert_same_update(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Weights and AdamW first moments (0.1 x the gradient after one step: they see its scale,
    which Adam's normalised update hides) agree."""
    assert a["step"] == b["step"]
    for name, w in a["model"].items():
        torch.testing.assert_close(b["model"][name], w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    moved = 0
    for i, (m1, m2) in enumerate(zip(a["exp_avg"], b["exp_avg"])):
        torch.testing.assert_close(m2, m1, rtol=rtol, atol=atol * 1e-2, msg=lambda m: f"exp_avg {i}: {m}")
        moved += int(m1.abs().max() > 0)
    assert moved >= 0.75 * len(a["exp_avg"]), f"only {moved} parameters got a gradient to compare"


if __name__ == "__main__":
    out_path, run_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    config = next((a.split("=", 1)[1] for a in overrides if a.startswith("--config=")), "config_advanced.yaml")
    overrides = [a for a in overrides if not a.startswith("--config=")]
    info = init_distributed("cpu")
    try:
        result = train_fixed(overrides, run_dir, info, config)
        if info.is_main:
            torch.save(result, out_path)
    finally:
        cleanup(info)
