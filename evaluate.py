"""FVD of generated videos against real clips, under StyleGAN-V's protocol (pinned and printed).

    python evaluate.py --config evaluate.yaml checkpoint=runs/demo/latest.pth \
        fvd.detector_path=/path/to/i3d_torchscript.pt output=runs/demo/fvd.json
    python evaluate.py --config evaluate.yaml generated.path=FOLDER data.path=/clips \
        fvd.detector_path=/path/to/i3d_torchscript.pt
"""
from __future__ import annotations

from typing import Optional

import utils.openmp  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads)
from training.sampling import sample_videos  # generation is predict's own path
from training.evaluation import evaluate
from utils.cli import parse_args, run_main
from utils.config import EvaluateConfig, load_config
from utils.train_utils import setup_runtime


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, _ = parse_args(argv, __doc__)
    cfg = load_config(EvaluateConfig, config_path, overrides)
    device, _ = setup_runtime(cfg.device, cfg.seed)  # video i still has its own generator (seed + i)
    evaluate(cfg, device, sample_videos)
    return 0


if __name__ == "__main__":
    run_main(main)
