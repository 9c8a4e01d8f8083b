"""Generate videos from a stage-2 checkpoint with the VAE and schedule it was trained with.

    python predict_advanced.py --config predict_advanced.yaml [key=value ...]
"""
from __future__ import annotations

from typing import Optional

import utils.openmp  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads)
from training.checkpoints import ensure_writable_dir
from training.sampling import predict_to_folder
from utils.cli import parse_args, run_main
from utils.config import PredictConfig, load_config
from utils.train_utils import setup_runtime

INTERRUPTED = 130  # exit status after Ctrl-C / SIGTERM (128 + SIGINT, as the shell reports one)


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, _ = parse_args(argv, __doc__)
    cfg = load_config(PredictConfig, config_path, overrides)
    device, _ = setup_runtime(cfg.device, cfg.seed)  # video i still has its own generator (seed + i)
    ensure_writable_dir(cfg.output_dir, "output_dir")
    written = predict_to_folder(cfg, device)  # each batch written as it is finished
    if written.interrupted:  # Ctrl-C / SIGTERM: the finished videos stay (it said which)
        return INTERRUPTED
    print(f"wrote {written.count} videos ({len(written.paths)} files) to {cfg.output_dir}: "
          f"sample_000.mp4/.gif ... grid.png")
    return 0


if __name__ == "__main__":
    run_main(main)
