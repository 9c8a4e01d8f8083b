"""Stage 2: train a video DiT with v-prediction on the latents of a frozen VAE.

    python train_advanced.py --config config_advanced.yaml [key.sub=value ...] [--resume PATH]
    torchrun --nproc_per_node=N train_advanced.py --config config_advanced.yaml
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional

from data.videos import DataWarning
from training.common import prepare_run
from training.stage2 import setup, train
from utils.cli import parse_args, run_main
from utils.config import TrainRunConfig, dump_config, load_config
from utils.dist import cleanup, init_distributed
from utils.logging import RunLogger
from utils.train_utils import setup_runtime


def main(argv: Optional[list[str]] = None) -> int:
    started = time.monotonic()  # train.time_limit_minutes counts from here, startup included
    config_path, overrides, flags = parse_args(argv, __doc__, flags=("resume",))
    if flags["resume"]:
        overrides.append(f"train.resume={flags['resume']}")
    cfg = load_config(TrainRunConfig, config_path, overrides)
    dist = init_distributed(cfg.device)
    try:
        if not dist.is_main:  # every rank reads the same files: rank 0 reports what it skipped
            warnings.filterwarnings("ignore", category=DataWarning)
        device, dtype = setup_runtime(cfg.device, cfg.experiment.seed, cfg.train.precision,
                                      cfg.train.tf32, dist.local_rank if dist.enabled else None)
        run_dir = os.path.join(cfg.experiment.runs_dir, cfg.experiment.name)
        resume_path, lock = prepare_run(cfg.train.resume, run_dir, dist)
        log = RunLogger(run_dir, enabled=dist.is_main)
        try:
            if lock.note:
                log.info(f"warning: {lock.note}")
            s = setup(cfg, run_dir, dist, device, dtype, log, resume_path, started)
            if dist.is_main:  # only now: a refused resume must not overwrite the run's config
                dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            train(s)
            log.info(f"samples: {os.path.join(run_dir, 'samples')}\n"
                     f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
        finally:
            log.close()
            lock.release()
    finally:
        cleanup(dist)
    return 0


if __name__ == "__main__":
    run_main(main)
