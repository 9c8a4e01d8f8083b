"""Generate videos from a stage-2 checkpoint with the VAE and schedule it was trained with.

    python predict_advanced.py --config predict_advanced.yaml [key=value ...]
"""
from __future__ import annotations

from typing import Optional

from training.checkpoints import ensure_writable_dir
from training.sampling import output_fps, sample_videos, save_videos
from utils.cli import parse_args, run_main
from utils.config import PredictConfig, load_config
from utils.train_utils import setup_runtime


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, _ = parse_args(argv, __doc__)
    cfg = load_config(PredictConfig, config_path, overrides)
    device, _ = setup_runtime(cfg.device, cfg.seed)  # video i still has its own generator (seed + i)
    ensure_writable_dir(cfg.output_dir, "output_dir")
    videos, ckpt = sample_videos(cfg, device)
    paths = save_videos(cfg.output_dir, videos, output_fps(cfg.fps, ckpt))
    print(f"wrote {len(videos)} videos ({len(paths)} files) to {cfg.output_dir}: "
          f"sample_000.mp4/.gif ... grid.png")
    return 0


if __name__ == "__main__":
    run_main(main)
