"""Stage 2: train a video DiT with v-prediction on the latents of a frozen VAE.

    python train_advanced.py --config config_advanced.yaml [key.sub=value ...] [--resume PATH]
    torchrun --nproc_per_node=N train_advanced.py --config config_advanced.yaml
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from data.videos import DataWarning
from training.checkpoints import ensure_writable_dir, resolve_resume
from training.stage2 import setup, train
from utils.cli import parse_args, run_main
from utils.config import TrainRunConfig, dump_config, load_config
from utils.dist import cleanup, device_for, init_distributed
from utils.logging import RunLogger
from utils.train_utils import resolve_device, resolve_precision, seed_everything, set_tf32


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, flags = parse_args(argv, __doc__, flags=("resume",))
    if flags["resume"]:
        overrides.append(f"train.resume={flags['resume']}")
    cfg = load_config(TrainRunConfig, config_path, overrides)
    device = resolve_device(cfg.device)
    dist = init_distributed(cfg.device)
    try:
        device = device_for(dist, device)
        if not dist.is_main:  # every rank reads the same files: rank 0 reports what it skipped
            warnings.filterwarnings("ignore", category=DataWarning)
        seed_everything(cfg.experiment.seed)
        set_tf32(cfg.train.tf32)
        run_dir = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name)
        resume_path = resolve_resume(cfg.train.resume, run_dir)
        if dist.is_main:
            ensure_writable_dir(run_dir, "experiment.runs_dir")
        log = RunLogger(run_dir, enabled=dist.is_main)
        try:
            s = setup(cfg, run_dir, dist, device, resolve_precision(cfg.train.precision, device),
                      log, resume_path)
            if dist.is_main:  # only now: a refused resume must not overwrite the run's config
                dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            train(s)
            log.info(f"samples: {os.path.join(run_dir, 'samples')}\n"
                     f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
        finally:
            log.close()
    finally:
        cleanup(dist)
    return 0


if __name__ == "__main__":
    run_main(main)
