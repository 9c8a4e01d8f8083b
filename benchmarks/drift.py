"""Drift of long videos: coherent moving-shapes videos per window position, for 1-4 windows.

    python benchmarks/drift.py --config predict_advanced.yaml checkpoint=runs/i2v/latest.pth \
        num_videos=32 [--windows 4] [--no-image] [--json runs/i2v/drift.json]
    python benchmarks/drift.py --quick     # smoke test: a tiny first-frame checkpoint, 2 windows

Needs a checkpoint trained with model.first_frame_conditioning (README, "Image-to-video and
long videos"). Video i starts from frame 0 of held-out clip i of the checkpoint's own data
(`--no-image`: its first window is generated from noise) and is extended to `--windows`
training windows, each conditioned on the last model.condition_frames latent frames of the one
before, exactly as predict does (`num_frames`, `images`). One sampling serves every count of
windows: the first w windows of a 4-window video are the w-window video of the same seed.

Per window position w it prints the share of videos whose window w is coherent by
benchmarks/shape_coherence.py (one shape, constant colour and size, still background: a
detector-free stand-in for FVD) and the share coherent over windows 1..w together (the same
shape all along: drift across joins shows here first), with the median colour drift. Flat
rows mean no drift. Only meaningful for `builtin:moving_shapes` checkpoints.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.checkpoint import write_json  # noqa: E402


def held_out_first_frames(ckpt: dict, n: int, folder: str) -> tuple[list[str], list[int], list[str]]:
    """PNGs of frame 0 of n held-out clips (spread over the val split) of the checkpoint's data,
    with each clip's label and caption ("" without captions): a video is told what its image shows."""
    from PIL import Image

    from data import build_dataset
    from utils.config import DataConfig, config_from_dict
    from utils.video_io import video_tensor_to_uint8
    data = config_from_dict(DataConfig, ckpt["config"]["data"])
    dataset = build_dataset(data, "val", ckpt["config"]["experiment"]["seed"])
    index = np.linspace(0, len(dataset) - 1, n).round().astype(int)
    paths, labels, captions = [], [], []
    for k, i in enumerate(index):
        item = dataset[int(i)]
        frame = video_tensor_to_uint8(item["video"][:, :1])[0]
        paths.append(os.path.join(folder, f"first_{k:04d}.png"))
        Image.fromarray(frame).save(paths[-1])
        labels.append(int(item["label"]))
        captions.append(item.get("caption", ""))
    return paths, labels, captions


def drift_rows(videos: list[np.ndarray], spans: list[tuple[int, int]]) -> list[dict]:
    """Per window position: coherence of that window alone and of windows 1..w together."""
    from benchmarks.shape_coherence import video_coherence
    rows = []
    for w, (a, b) in enumerate(spans):
        local = [video_coherence(v[a:b]) for v in videos]
        prefix = [video_coherence(v[:b]) for v in videos]
        rows.append({"window": w + 1, "frames": [a, b], "videos": len(videos),
                     "coherent": sum(m["coherent"] for m in local),
                     "coherent_so_far": sum(m["coherent"] for m in prefix),
                     "median_colour_drift": statistics.median(m["colour_drift"] for m in local),
                     "median_colour_drift_so_far": statistics.median(m["colour_drift"] for m in prefix)})
    return rows


def run(cfg, windows: int, image: bool) -> dict:
    """Sample cfg.num_videos videos of `windows` windows (predict's path) and measure each window."""
    import torch

    from training.checkpoints import PREDICT_ENTRIES, check_entries, check_format
    from training.conditioning import checkpoint_kind
    from training.first_frames import FirstFrames, windows_of
    from training.sampling import checkpoint_sampler, sample_videos
    from utils.checkpoint import load_checkpoint
    from utils.train_utils import setup_runtime
    ckpt = load_checkpoint(cfg.checkpoint, key="checkpoint")
    check_format(ckpt, cfg.checkpoint, key="checkpoint")  # a stage-1 checkpoint is named as such
    check_entries(ckpt, cfg.checkpoint, PREDICT_ENTRIES, key="checkpoint")
    cfg.num_videos = cfg.resolved().num_videos  # null: one per prompt / label given, else the default
    first = FirstFrames.of(ckpt["model"]["config"])
    first.require("benchmarks/drift.py", cfg.checkpoint)
    temporal = int(ckpt["vae"].get("temporal_factor", 1))
    window = 1 + (ckpt["model"]["dims"]["num_frames"] - 1) * temporal
    overlap = 1 + (first.frames - 1) * temporal
    cfg.num_frames = window + (windows - 1) * (window - overlap)
    device = setup_runtime(cfg.device, cfg.seed)[0]
    image_labels = None
    with tempfile.TemporaryDirectory() as folder:
        if image:
            cfg.images, image_labels, captions = held_out_first_frames(ckpt, cfg.num_videos, folder)
            cfg.image = None
            # Video i is conditioned on what its image shows: the clip's class, or its caption (a
            # "red square" told to continue a blue circle's frame is no measure of drift).
            kind = checkpoint_kind(ckpt)
            if kind == "class" and not cfg.class_labels:
                cfg.class_labels = image_labels
            elif kind == "text" and not (cfg.prompts or cfg.prompts_file) and all(captions):
                cfg.prompts = captions
        with torch.no_grad():
            videos, _ = sample_videos(cfg, device)
    spans = windows_of(cfg.num_frames, window, overlap)
    return {"checkpoint": cfg.checkpoint, "step": int(ckpt["step"]),
            "sampler": checkpoint_sampler(cfg.sampler, ckpt),
            "num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale, "image_to_video": image,
            "condition_frames": first.frames, "window_frames": window, "overlap_frames": overlap,
            "num_frames": cfg.num_frames, "class_labels": cfg.class_labels, "image_labels": image_labels,
            "prompts": cfg.prompts, "rows": drift_rows(videos, spans)}


def report(result: dict) -> str:
    lines = [f"{result['checkpoint']} (step {result['step']}), {result['sampler']} {result['num_steps']} "
             f"steps, guidance {result['guidance_scale']}, "
             f"{'image-to-video' if result['image_to_video'] else 'first window from noise'}, windows of "
             f"{result['window_frames']} frames joined on {result['overlap_frames']}:",
             "| window | frames | coherent (this window) | coherent (windows 1..w) | median colour drift |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['window']} | {r['frames'][0]}-{r['frames'][1] - 1} | {r['coherent']}/{r['videos']} "
                     f"| {r['coherent_so_far']}/{r['videos']} | {r['median_colour_drift']:.3f} |")
    return "\n".join(lines)


def quick_checkpoint(root: str) -> str:
    """A tiny first-frame checkpoint (random VAE, 2 steps): enough to check the script runs."""
    import torch

    import train_advanced
    from models.vae import build_autoencoder
    from utils.config import VAEArchConfig
    torch.manual_seed(0)
    vae = os.path.join(root, "vae")
    build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8)).save_pretrained(vae)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--config", os.path.join(here, "config_advanced.yaml"), "device=cpu", "data.num_frames=4",
            "data.resolution=16", "data.builtin.num_clips=4", "data.builtin.num_val_clips=2",
            "data.builtin.clip_frames=8", "data.window_stride=4", "model.hidden_size=32", "model.depth=2",
            "model.num_heads=2", "train.batch_size=2", "train.max_steps=2", "train.warmup_steps=1",
            "train.ema_warmup_steps=1", "validation.every_epochs=0", f"vae.path={vae}",
            "model.first_frame_conditioning=1.0", f"experiment.runs_dir={root}", "experiment.name=quick"]
    if train_advanced.main(args) != 0:
        raise RuntimeError("the quick checkpoint did not train")
    return os.path.join(root, "quick", "latest.pth")


def main(argv: Optional[list[str]] = None) -> int:
    from utils.config import MAX_WINDOWS, PredictConfig, load_config
    from utils.paths import check_output_file
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="predict_advanced.yaml (sampling keys)")
    parser.add_argument("--windows", type=int, default=4, help="training windows per video (1-4 rows)")
    parser.add_argument("--no-image", action="store_true", help="first window from noise, not a held-out frame")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="smoke test on a tiny checkpoint it trains")
    args, overrides = parser.parse_known_args(argv)
    if not 1 <= args.windows <= MAX_WINDOWS:
        parser.error(f"--windows {args.windows}: give 1 to {MAX_WINDOWS} windows per video")
    if args.json:
        check_output_file(args.json, "--json")  # before the sampling, not after it
    with tempfile.TemporaryDirectory() as root:
        if args.quick:
            overrides = [f"checkpoint={quick_checkpoint(root)}", "device=cpu", "num_videos=2",
                         "batch_size=2", "num_steps=2", "sampler=ddim", *overrides]
            args.windows = min(args.windows, 2)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = load_config(PredictConfig, args.config or os.path.join(here, "predict_advanced.yaml"),
                          [*overrides, f"output_dir={os.path.join(root, 'unused')}"])
        result = run(cfg, args.windows, not args.no_image)
    print(report(result))
    if args.json:
        write_json(result, args.json)  # its folder made, written whole (as the other benchmarks)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
