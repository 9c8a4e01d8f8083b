"""Check a stage-2 setup end to end: VAE, latent scale, patches, diffusion identities, gradients,
checkpoint, condition, denoising, jigsaw.

    python diagnose.py --config config_advanced.yaml [--checkpoint PATH] [--min-vae-psnr DB] [key.sub=value ...]

Prints one line per check, [PASS] / [WARN] / [FAIL] / [SKIP], with the number it measured
and, for a failure, what to do. The checkpoint defaults to <runs_dir>/<name>/latest.pth;
without one the checkpoint checks are skipped (not passed). Exit status 1 if any check
fails, 2 on a user error (bad config, missing VAE), 0 otherwise.
"""
from __future__ import annotations

import os
from typing import Optional

import utils.openmp  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads)
from training.diagnostics import DEFAULT_MIN_VAE_PSNR, FAIL, default_checkpoint, run_diagnostics, summary
from utils.cli import parse_args, run_main
from utils.config import TrainRunConfig, load_config
from utils.errors import MissingFileError, UserError
from utils.train_utils import setup_runtime


def main(argv: Optional[list[str]] = None) -> int:
    config_path, overrides, flags = parse_args(argv, __doc__, flags={
        "checkpoint": "stage-2 checkpoint to check (default: <runs_dir>/<name>/latest.pth)",
        "min-vae-psnr": f"dB the VAE's round trip must reach (default {DEFAULT_MIN_VAE_PSNR})"})
    cfg = load_config(TrainRunConfig, config_path, overrides)
    min_psnr = _min_psnr(flags["min-vae-psnr"])
    checkpoint = flags["checkpoint"]
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint}: is a folder, not a file; give the checkpoint in it "
                        f"(e.g. {os.path.join(checkpoint, 'latest.pth')})")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise MissingFileError(f"--checkpoint {checkpoint}: no such file")
    if checkpoint is None and os.path.isfile(default_checkpoint(cfg)):
        checkpoint = default_checkpoint(cfg)
    device, _ = setup_runtime(cfg.device, cfg.experiment.seed)  # checks run in fp32, TF32 untouched
    print(f"diagnose: config {config_path}, VAE {cfg.vae.path}, checkpoint {checkpoint or 'none'}, "
          f"device {device}", flush=True)
    checks = []
    for check in run_diagnostics(cfg, checkpoint, device, min_psnr):
        print(check.line(), flush=True)
        checks.append(check)
    print(summary(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def _min_psnr(value: Optional[str]) -> float:
    if value is None:
        return DEFAULT_MIN_VAE_PSNR
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--min-vae-psnr {value!r}: give a number of dB, e.g. 20") from None


if __name__ == "__main__":
    run_main(main)
