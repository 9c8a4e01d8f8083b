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
import warnings  # noqa: E402
from typing import Optional  # noqa: E402

from data.videos import DataWarning  # noqa: E402
from training.common import prepare_run  # noqa: E402
from training.stage1 import finish, setup, train  # noqa: E402
from utils.cli import parse_args, run_main  # noqa: E402
from utils.config import VAERunConfig, dump_config, load_config  # noqa: E402
from utils.dist import cleanup, init_distributed  # noqa: E402
from utils.logging import RunLogger  # noqa: E402
from utils.train_utils import setup_runtime  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    started = time.monotonic()  # train.time_limit_minutes counts from here, startup included
    config_path, overrides, flags = parse_args(argv, __doc__, flags=("resume",))
    if flags["resume"]:
        overrides.append(f"train.resume={flags['resume']}")
    cfg = load_config(VAERunConfig, config_path, overrides)
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
            if not train(s):  # False: ended by its budget, not by a signal
                finish(s)
                log.info(f"done in {time.monotonic() - started:.0f} s")
        finally:
            log.close()
            lock.release()
    finally:
        cleanup(dist)
    return 0


if __name__ == "__main__":
    run_main(main)
