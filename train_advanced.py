"""Stage 2: train a video DiT (diffusion.objective: v_prediction or flow_matching) on the latents
of a frozen VAE.

    python train_advanced.py --config config_advanced.yaml [key.sub=value ...] [--resume PATH]
    torchrun --nproc_per_node=N train_advanced.py --config config_advanced.yaml
"""
from __future__ import annotations

import os
from typing import Optional

import utils.openmp  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads)
from training.common import run_stage
from training.stage2 import setup, train
from utils.cli import run_main
from utils.config import TrainRunConfig


def main(argv: Optional[list[str]] = None) -> int:
    return run_stage(argv, __doc__, TrainRunConfig, setup, _train)


def _train(s, started: float) -> None:
    train(s)
    s.log.info(f"samples: {os.path.join(s.run_dir, 'samples')}\n"
               f"TensorBoard: tensorboard --logdir {os.path.join(s.run_dir, 'tensorboard')}")


if __name__ == "__main__":
    run_main(main)
