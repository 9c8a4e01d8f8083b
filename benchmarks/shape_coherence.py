"""Are sampled moving-shapes videos coherent, and do they show what their prompt asks for?

    python benchmarks/shape_coherence.py --config predict_advanced.yaml [num_videos=36 ...]
    python benchmarks/shape_coherence.py --config predict_advanced.yaml checkpoint=runs/t2v_demo/latest.pth \
        num_videos=36 --prompts seen|held_out [--json runs/t2v_seen.json]

Samples videos exactly as predict_advanced.py does (same config keys; nothing is written)
and checks each one the way a person looks at the built-in data: every frame shows exactly
one shape on the background, the shape keeps its colour and size from frame to frame, and
the background stays put. Real clips of the built-in data pass it all; prints the share of
coherent videos and the medians of each measure. Only meaningful for `builtin:moving_shapes`
checkpoints with one shape per clip.

Prompt following (text checkpoints): each video's largest shape is classified in every frame,
its colour as the nearest of the built-in SHAPE_COLOURS and its kind from the form of the
blob (below), and a majority vote over the frames gives the video's shape and colour; a
video follows its prompt when both are the prompted ones. `--prompts seen` builds
`num_videos` prompts in the built-in captions' words ("a red square moving right on a black
background"), cycling over the shape x colour combinations the checkpoint's training data
showed (all but its `data.builtin.held_out_combinations`), then the directions and
backgrounds; `--prompts held_out` over exactly the held-out ones (compositional
generalisation). Prompts given with `prompts=[...]` are scored the same way when each names
one built-in colour and shape. Real built-in clips are classified right (tests/test_shape_coherence.py).
"""
from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
from collections import Counter, deque
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from data.builtin import (BACKGROUND_NAMES, CLASS_NAMES, COLOUR_NAMES, DIRECTIONS, SHAPE_COLOURS,  # noqa: E402
                          scene_caption)
from utils.errors import UserError  # noqa: E402

# A pixel is foreground when its colour is this far (RGB in [0, 1], Euclidean) from the
# frame's background (the median of its border pixels); blobs under MIN_BLOB pixels are
# ignored (anti-aliasing, sampler noise). A video is coherent when every frame has exactly
# one blob, the shape's mean colour moves less than MAX_COLOUR_DRIFT, its area varies less
# than MAX_AREA_RATIO (shapes bounce inside the frame, so their area is constant) and the
# background less than MAX_BACKGROUND_DRIFT.
FOREGROUND_DISTANCE = 0.25
MIN_BLOB = 6
MAX_COLOUR_DRIFT, MAX_AREA_RATIO, MAX_BACKGROUND_DRIFT = 0.2, 1.8, 0.1
# Shape kind from the blob's coverage (each pixel's share of shape colour over background,
# so anti-aliased edges count by the share they cover): the vertical skewness of its row
# sums (a triangle points up, so its rows widen downward: -0.57 for the ideal triangle; a
# circle and a square are symmetric, 0) and its fill of the box spanned by the widest row and
# the tallest column (square 1, circle pi/4). Measured on real clips: triangles -0.49 to -0.69
# at 32 pixels (-0.24 to -0.85 at 16), circles and squares within +-0.14; fill of squares
# >= 1.0, of circles <= 0.85 at both sizes.
TRIANGLE_SKEW, SQUARE_FILL = -0.2, 0.9
PROMPT_SETS = ("seen", "held_out")


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a (H, W) bool mask, each as its (n, 2) pixel indices (a
    breadth-first fill: the frames are tiny, and scipy.ndimage.label would add scipy for
    these few lines)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        seen[i, j] = True
        queue, pixels = deque([(i, j)]), []
        while queue:
            a, b = queue.popleft()
            pixels.append((a, b))
            for y, x in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                    seen[y, x] = True
                    queue.append((y, x))
        found.append(np.array(pixels))
    return found


def blob_sizes(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a (H, W) bool mask."""
    return [len(b) for b in blobs(mask)]


def frame_shape(frame: np.ndarray, background: np.ndarray) -> Optional[tuple[str, str]]:
    """(shape kind, colour name) of the largest blob of `frame` (H, W, 3) in [0, 1] on
    `background` (3,), or None when the frame has no blob of MIN_BLOB pixels."""
    distance = np.linalg.norm(frame - background, axis=-1)  # (H, W)
    found = [b for b in blobs(distance > FOREGROUND_DISTANCE) if len(b) >= MIN_BLOB]
    if not found:
        return None
    blob = np.zeros(distance.shape, dtype=bool)
    blob[tuple(max(found, key=len).T)] = True  # (H, W)
    # Its colour: the median of its inner pixels (at least half its largest distance from the
    # background), not diluted by the anti-aliased rim.
    colour = np.median(frame[blob & (distance >= distance[blob].max() / 2)], axis=0)  # (3,)
    colour_id = int(np.argmin(np.linalg.norm(SHAPE_COLOURS - colour, axis=-1)))
    # Coverage: each pixel's share of that colour, over the blob and the pixel ring around it.
    ring = blob.copy()
    ring[1:] |= blob[:-1]
    ring[:-1] |= blob[1:]
    ring[:, 1:] |= blob[:, :-1]
    ring[:, :-1] |= blob[:, 1:]
    ahead = colour - background  # (3,)
    cover = np.clip((frame - background) @ ahead / max(float(ahead @ ahead), 1e-6), 0, 1) * ring  # (H, W)
    rows = cover.sum(axis=1)  # (H,)
    return _kind(rows, cover.sum() / max(rows.max() * cover.sum(axis=0).max(), 1e-6)), COLOUR_NAMES[colour_id]


def _kind(rows: np.ndarray, fill: float) -> str:
    """The shape kind of a blob from its row sums (H,) and its fill (see TRIANGLE_SKEW)."""
    y = np.arange(len(rows), dtype=np.float64)
    mean = (rows * y).sum() / rows.sum()
    var = max((rows * (y - mean) ** 2).sum() / rows.sum(), 1e-6)
    skew = (rows * (y - mean) ** 3).sum() / rows.sum() / var ** 1.5
    if skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def video_shape(frames: np.ndarray) -> dict:
    """The shape and colour a video (T, H, W, 3) uint8 shows: each frame's largest blob
    classified (`frame_shape`), then a majority vote over the frames (None: no frame had a
    blob). `shape_share` / `colour_share`: the winners' share of all frames."""
    f = frames.astype(np.float32) / 255
    per_frame = [frame_shape(frame, bg) for frame, bg in zip(f, _backgrounds(f))]
    votes = [v for v in per_frame if v is not None]
    out = {"frames": per_frame, "shape": None, "colour": None, "shape_share": 0.0, "colour_share": 0.0}
    for i, key in enumerate(("shape", "colour")):
        if votes:
            (out[key], n), = Counter(v[i] for v in votes).most_common(1)
            out[f"{key}_share"] = n / len(per_frame)
    return out


def prompted(prompt: str) -> Optional[tuple[str, str]]:
    """(shape, colour) a prompt asks for when it names one built-in colour and shape, else None."""
    found = re.findall(rf"\b({'|'.join(COLOUR_NAMES)}) ({'|'.join(CLASS_NAMES)})\b", prompt.lower())
    return (found[0][1], found[0][0]) if len(found) == 1 else None


def prompt_following(videos: Sequence[np.ndarray], prompts: Sequence[str],
                     coherence: Optional[Sequence[dict]] = None) -> dict:
    """How many videos show their prompt's shape and colour (`video_shape` against `prompted`)."""
    rows = []
    for video, prompt in zip(videos, prompts):
        want = prompted(prompt)
        if want is None:
            raise ValueError(f"prompt {prompt!r} does not name one built-in colour and shape")
        got = video_shape(video)
        rows.append({"prompt": prompt, "shape": got["shape"], "colour": got["colour"],
                     "shape_right": got["shape"] == want[0], "colour_right": got["colour"] == want[1]})
        rows[-1]["follows"] = rows[-1]["shape_right"] and rows[-1]["colour_right"]
    out = {"videos": len(rows), **{k: sum(r[k] for r in rows) for k in ("follows", "shape_right", "colour_right")},
           "per_video": rows}
    if coherence is not None:
        out["coherent_and_follows"] = sum(r["follows"] and m["coherent"] for r, m in zip(rows, coherence))
    return out


def builtin_prompts(builtin, which: str, n: int) -> list[str]:
    """`n` prompts in the built-in captions' words for `which` (seen: the shape x colour pairs
    the training split of `builtin` (a checkpoint's data.builtin) showed; held_out: its
    held-out ones), cycling over the pairs, then the four directions, then the backgrounds."""
    held = {(shape, colour) for colour, shape in builtin.held_out_pairs()}
    pairs = [(s, c) for s in CLASS_NAMES for c in COLOUR_NAMES if ((s, c) in held) == (which == "held_out")]
    if not pairs:
        raise UserError("--prompts held_out: the checkpoint was trained with no "
                        "data.builtin.held_out_combinations (every shape x colour pair was seen); "
                        "use --prompts seen, or train with held-out combinations")
    names = BACKGROUND_NAMES[:builtin.num_backgrounds]
    # a gradient's captions name both ends (always two different colours when there are two)
    ends = [(a, names[(i + 1) % len(names)] if builtin.background == "gradient" else a) for i, a in enumerate(names)]
    prompts = []
    for i in range(n):
        shape, colour = pairs[i % len(pairs)]
        direction = DIRECTIONS[i // len(pairs) % len(DIRECTIONS)]
        background, to = ends[i // (len(pairs) * len(DIRECTIONS)) % len(ends)]
        prompts.append(scene_caption([(colour, shape, direction)], background, to))
    return prompts


def _backgrounds(f: np.ndarray) -> np.ndarray:
    """(T, 3): each frame's background, the median of its border pixels; f (T, H, W, 3)."""
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)  # (T, 2H+2W, 3)
    return np.median(border, axis=1)


def video_coherence(frames: np.ndarray) -> dict:
    """Measures of one video, frames (T, H, W, 3) uint8; `coherent` is the verdict."""
    f = frames.astype(np.float32) / 255
    background = _backgrounds(f)  # (T, 3)
    counts, areas, colours = [], [], []
    for frame, bg in zip(f, background):
        mask = np.linalg.norm(frame - bg, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
        counts.append(sum(s >= MIN_BLOB for s in blob_sizes(mask)))
        areas.append(int(mask.sum()))
        colours.append(frame[mask].mean(axis=0) if mask.any() else bg)
    colours = np.stack(colours)
    colour_drift = float(np.abs(colours - np.median(colours, axis=0)).max())
    background_drift = float(np.abs(background - background.mean(axis=0)).max())
    area_ratio = max(areas) / max(min(areas), 1)
    coherent = (all(n == 1 for n in counts) and colour_drift < MAX_COLOUR_DRIFT
                and area_ratio < MAX_AREA_RATIO and background_drift < MAX_BACKGROUND_DRIFT)
    return {"blobs": counts, "colour_drift": colour_drift, "area_ratio": area_ratio,
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
    from training.sampling import checkpoint_sampler, sample_videos
    from utils.checkpoint import write_json
    from utils.cli import parse_args
    from utils.config import PredictConfig, load_config
    from utils.paths import check_output_file
    from utils.train_utils import setup_runtime

    config_path, overrides, flags = parse_args(argv, __doc__, {
        "prompts": "seen or held_out: prompts from the checkpoint's built-in data (text checkpoints)",
        "json": "write the result here"})
    if flags["json"]:
        check_output_file(flags["json"], "--json")  # before the sampling, not after it
    cfg = load_config(PredictConfig, config_path, overrides).resolved()  # num_videos decided
    if flags["prompts"] is not None:
        cfg = dataclasses.replace(cfg, prompts=checkpoint_prompts(cfg, flags["prompts"]), prompts_file=None)
    videos, ckpt = sample_videos(cfg, setup_runtime(cfg.device, cfg.seed)[0])
    measures = [video_coherence(v) for v in videos]
    s = summarize(measures)
    sampler = checkpoint_sampler(cfg.sampler, ckpt)
    print(f"{cfg.checkpoint} (step {ckpt['step']}), {sampler} {cfg.num_steps} steps, guidance "
          f"{cfg.guidance_scale}: {s['coherent']} of {s['videos']} videos coherent; frames with one "
          f"shape {s['frames_with_one_blob']:.1%}, median colour drift {s['median_colour_drift']:.3f} "
          f"(max {MAX_COLOUR_DRIFT}), median area ratio {s['median_area_ratio']:.2f} (max {MAX_AREA_RATIO})")
    prompts = _cycled(cfg.prompt_list() or [], len(videos))
    result = {"checkpoint": cfg.checkpoint, "step": ckpt["step"], "sampler": sampler, "num_steps": cfg.num_steps,
              "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "prompt_set": flags["prompts"],
              "coherence": s, "prompt_following": None}
    if prompts and all(prompted(p) for p in prompts):
        p = prompt_following(videos, prompts, measures)
        which = f" ({flags['prompts']} combinations)" if flags["prompts"] else ""
        print(f"follows its prompt{which}: {p['follows']} of {p['videos']} (shape right {p['shape_right']}, "
              f"colour right {p['colour_right']}; coherent and following {p['coherent_and_follows']})")
        result["prompt_following"] = p
    if flags["json"]:
        write_json(result, flags["json"])
    return 0


def checkpoint_prompts(cfg, which: str) -> list[str]:
    """`--prompts seen|held_out`: cfg.num_videos prompts from the built-in data cfg.checkpoint
    was trained on (refused for other checkpoints, or with prompts given as well)."""
    from training.checkpoints import load_entry
    from training.conditioning import checkpoint_kind
    from utils.checkpoint import load_checkpoint
    from utils.config import DataConfig, config_from_dict
    if which not in PROMPT_SETS:
        raise UserError(f"--prompts {which}: use seen (the shape x colour pairs the training clips showed) "
                        "or held_out (the checkpoint's data.builtin.held_out_combinations)")
    if cfg.prompts is not None or cfg.prompts_file is not None:
        raise UserError(f"--prompts {which} builds the prompts; remove prompts / prompts_file (or --prompts)")
    ckpt = load_checkpoint(cfg.checkpoint, key="checkpoint")
    if checkpoint_kind(ckpt) != "text":
        raise UserError(f"--prompts {which}: {cfg.checkpoint} is {checkpoint_kind(ckpt)}-conditioned; prompt "
                        "following needs a text checkpoint (model.conditioning: text)")
    data = load_entry(cfg.checkpoint, "config", lambda c: config_from_dict(DataConfig, c["data"]),
                      ckpt.get("config"), "is malformed", key="checkpoint")
    if data.path != "builtin:moving_shapes" or data.builtin.num_shapes != 1:
        raise UserError(f"--prompts {which}: {cfg.checkpoint} was trained on data.path = {data.path} with "
                        f"data.builtin.num_shapes = {data.builtin.num_shapes}; the check reads one built-in "
                        "shape per video (builtin:moving_shapes, num_shapes: 1)")
    return builtin_prompts(data.builtin, which, cfg.num_videos)


def _cycled(values: Sequence, n: int) -> list:
    return [values[i % len(values)] for i in range(n)] if values else []


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
