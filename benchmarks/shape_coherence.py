"""Are sampled moving-shapes videos coherent? An automatic look at predict's output.

    python benchmarks/shape_coherence.py --config predict_advanced.yaml [num_videos=36 ...]

Samples videos exactly as predict_advanced.py does (same config keys; nothing is written)
and checks each one the way a person looks at the built-in data: every frame shows exactly
one shape on the background, the shape keeps its colour and size from frame to frame, and
the background stays put. Real clips of the built-in data pass it all; prints the share of
coherent videos and the medians of each measure. Only meaningful for `builtin:moving_shapes`
checkpoints with one shape per clip.
"""
from __future__ import annotations

import os
import statistics
import sys
from collections import deque
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# A pixel is foreground when its colour is this far (RGB in [0, 1], Euclidean) from the
# frame's background (the median of its border pixels); blobs under MIN_BLOB pixels are
# ignored (anti-aliasing, sampler noise). A video is coherent when every frame has exactly
# one blob, the shape's mean colour moves less than MAX_COLOUR_DRIFT, its area varies less
# than MAX_AREA_RATIO (shapes bounce inside the frame, so their area is constant) and the
# background less than MAX_BACKGROUND_DRIFT.
FOREGROUND_DISTANCE = 0.25
MIN_BLOB = 6
MAX_COLOUR_DRIFT, MAX_AREA_RATIO, MAX_BACKGROUND_DRIFT = 0.2, 1.8, 0.1


def blob_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a (H, W) bool mask (a breadth-first fill: the
    frames are tiny, and scipy.ndimage.label would add scipy for these few lines)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    sizes = []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        seen[i, j] = True
        queue, size = deque([(i, j)]), 0
        while queue:
            a, b = queue.popleft()
            size += 1
            for y, x in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                    seen[y, x] = True
                    queue.append((y, x))
        sizes.append(size)
    return sizes


def video_coherence(frames: np.ndarray) -> dict:
    """Measures of one video, frames (T, H, W, 3) uint8; `coherent` is the verdict."""
    f = frames.astype(np.float32) / 255
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 2H+2W, 3)
    background = np.median(border, axis=1)  # (T, 3)
    blobs, areas, colours = [], [], []
    for frame, bg in zip(f, background):
        mask = np.linalg.norm(frame - bg, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
        blobs.append(sum(s >= MIN_BLOB for s in blob_sizes(mask)))
        areas.append(int(mask.sum()))
        colours.append(frame[mask].mean(axis=0) if mask.any() else bg)
    colours = np.stack(colours)
    colour_drift = float(np.abs(colours - np.median(colours, axis=0)).max())
    background_drift = float(np.abs(background - background.mean(axis=0)).max())
    area_ratio = max(areas) / max(min(areas), 1)
    coherent = (all(n == 1 for n in blobs) and colour_drift < MAX_COLOUR_DRIFT
                and area_ratio < MAX_AREA_RATIO and background_drift < MAX_BACKGROUND_DRIFT)
    return {"blobs": blobs, "colour_drift": colour_drift, "area_ratio": area_ratio,
            "background_drift": background_drift, "coherent": coherent}


def summarize(measures: list[dict]) -> dict:
    return {
        "videos": len(measures),
        "coherent": sum(m["coherent"] for m in measures),
        "frames_with_one_blob": float(np.mean([np.mean([n == 1 for n in m["blobs"]]) for m in measures])),
        "median_colour_drift": statistics.median(m["colour_drift"] for m in measures),
        "median_area_ratio": statistics.median(m["area_ratio"] for m in measures),
    }


def main(argv: Optional[list[str]] = None) -> int:
    from training.sampling import sample_videos
    from utils.cli import parse_args
    from utils.config import PredictConfig, load_config
    from utils.train_utils import setup_runtime

    config_path, overrides, _ = parse_args(argv, __doc__)
    cfg = load_config(PredictConfig, config_path, overrides)
    videos, ckpt = sample_videos(cfg, setup_runtime(cfg.device, cfg.seed)[0])
    s = summarize([video_coherence(v) for v in videos])
    print(f"{cfg.checkpoint} (step {ckpt['step']}), {cfg.sampler} {cfg.num_steps} steps, guidance "
          f"{cfg.guidance_scale}: {s['coherent']} of {s['videos']} videos coherent; frames with one "
          f"shape {s['frames_with_one_blob']:.1%}, median colour drift {s['median_colour_drift']:.3f} "
          f"(max {MAX_COLOUR_DRIFT}), median area ratio {s['median_area_ratio']:.2f} (max {MAX_AREA_RATIO})")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
