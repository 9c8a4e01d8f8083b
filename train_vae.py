"""Stage 1: train the per-frame VAE on frames of the training data, measure its latent scale.

    python train_vae.py --config config_vae.yaml [key.sub=value ...] [--resume PATH]
    torchrun --nproc_per_node=N train_vae.py --config config_vae.yaml

Writes <runs_dir>/<name>/: config.yaml, log.txt, tensorboard/, latest.pth and, at the end,
vae/ (a diffusers AutoencoderKL directory whose config holds the measured scaling_factor).
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make CPU training ~15x slower as soon as another
# process shares the cores (measured here: 0.15 vs 2.2 steps/s); passive waiting costs little
# when the machine is quiet. Must be set before torch loads libgomp; an explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time  # noqa: E402
from typing import Optional  # noqa: E402

from training.common import run_stage  # noqa: E402
from training.stage1 import finish, setup, train  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.config import VAERunConfig  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    return run_stage(argv, __doc__, VAERunConfig, setup, _train_and_export)


def _train_and_export(s, started: float) -> None:
    if not train(s):  # False: ended by its budget, not by a signal (then latest.pth only)
        finish(s)  # held-out PSNR, scaling_factor, vae/
        s.log.info(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    run_main(main)
