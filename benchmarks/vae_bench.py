"""Per-frame VAE vs a 4x temporal video VAE at equal pixels: DiT tokens per clip and stage-2 steps/s.

    python benchmarks/vae_bench.py [--quick] [--json runs/vae_bench.json] [--device cpu|cuda]

Both VAEs are random-initialised diffusers models of similar width (the cost of their latents
is what is measured, not their quality): an `AutoencoderKL` applied per frame and an
`AutoencoderKLHunyuanVideo` (causal, 4x temporal), both 8x spatial with 8 latent channels.
Stage 2 runs on the demo config at 17 frames of 64x64 with the latent cache, so a step is
the DiT alone; the per-frame VAE gives 17 latent frames, the temporal one 1 + 16 / 4 = 5.
The two runs are timed in the same process, one after the other.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo  # noqa: E402

from utils.checkpoint import write_json  # noqa: E402
from utils.paths import check_output_file  # noqa: E402

WIDTHS = (32, 64, 64, 64)  # 4 blocks: 8x spatial for both
LATENT_CHANNELS = 8


def per_frame_vae() -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=WIDTHS, layers_per_block=1, latent_channels=LATENT_CHANNELS,
                         norm_num_groups=16, mid_block_add_attention=False, scaling_factor=1.0)


def temporal_vae() -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=WIDTHS, layers_per_block=1,
        norm_num_groups=16, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False, scaling_factor=1.0)


def run(quick: bool, device: torch.device) -> dict:
    """{"per_frame": {...}, "temporal_4x": {...}, "token_ratio", "speed_ratio"} at 17 x 64 x 64."""
    from training.checkpoints import latent_shape
    from training.stage2 import setup, train
    from utils.config import TrainRunConfig, load_config
    from utils.dist import DistInfo
    from utils.logging import RunLogger
    steps = 3 if quick else 40
    frames, res = (9, 32) if quick else (17, 64)
    out = {"frames": frames, "resolution": res, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("per_frame", per_frame_vae), ("temporal_4x", temporal_vae)):
            torch.manual_seed(0)
            build().save_pretrained(os.path.join(tmp, name))
            small = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"] if quick else []
            cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
                f"vae.path={tmp}/{name}", f"data.num_frames={frames}", f"data.resolution={res}",
                f"data.builtin.clip_frames={frames}", f"data.builtin.num_clips={8 if quick else 16}",
                "train.batch_size=4" if quick else "train.batch_size=8", f"train.max_steps={steps}",
                "train.time_limit_minutes=null", "validation.every_epochs=0", f"device={device.type}",
                "train.resume=null", "data.cache=auto", *small])
            s = setup(cfg, os.path.join(tmp, f"run_{name}"), DistInfo(), device, torch.float32,
                      RunLogger(None), None)
            t0 = time.perf_counter()
            train(s)
            sec = time.perf_counter() - t0
            out[name] = {"latent_shape": list(latent_shape(s.dims)),
                         "tokens_per_clip": math.prod(s.model.grid), "steps_per_s": steps / sec,
                         "vae": s.vae.class_name}
    out["token_ratio"] = out["per_frame"]["tokens_per_clip"] / out["temporal_4x"]["tokens_per_clip"]
    out["speed_ratio"] = out["temporal_4x"]["steps_per_s"] / out["per_frame"]["steps_per_s"]
    return out


def print_row(r: dict) -> None:
    print(f"stage 2 at equal pixels ({r['frames']} frames of {r['resolution']}x{r['resolution']}, "
          f"{r['steps']} steps, latent cache):")
    for name in ("per_frame", "temporal_4x"):
        m = r[name]
        print(f"  {name:<12} {m['vae']:<26} latents {tuple(m['latent_shape'])}  "
              f"{m['tokens_per_clip']:>4} tokens/clip  {m['steps_per_s']:.2f} steps/s")
    print(f"  temporal 4x VAE: {r['token_ratio']:.2f}x fewer tokens, {r['speed_ratio']:.2f}x stage-2 steps/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.json:
        check_output_file(args.json, "--json")  # before the measurements, not after them
    r = run(args.quick, torch.device(args.device))
    print_row(r)
    if args.json:
        write_json(r, args.json)


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(lambda argv: main())
