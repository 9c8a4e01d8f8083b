"""Datasets: `build_dataset` picks the built-in moving shapes or a folder of videos."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch.utils.data import Dataset

from utils.config import DataConfig

if TYPE_CHECKING:
    from data.buckets import Rules

BUILTIN_MOVING_SHAPES = "builtin:moving_shapes"


def build_dataset(cfg: DataConfig, split: str, seed: int, index_file: Optional[str] = None,
                  rules: Optional["Rules"] = None) -> Dataset:
    """Items: {"video": (3, T, H, W) float in [-1, 1], "label": int} (+ "caption": str when
    data.captions or data.builtin.captions is set: `has_captions`, `caption(index)`,
    `distinct_captions()`); also `num_classes`
    (0 = unconditional), `class_names` and `frame_rate` (frames per second; None: unknown).
    `index_file`: where a folder's probed sources are saved (data.index_cache overrides it).
    `rules` (data/buckets.py: what the VAE and the network need) with data.buckets set: items of
    their bucket's shape, with "bucket", and the dataset's `plan`; None: every item at
    data.resolution x data.num_frames (validation clips, evaluate's real clips)."""
    if cfg.path == BUILTIN_MOVING_SHAPES:
        from data.builtin import MovingShapes  # imported here: folder users never need it
        return MovingShapes(cfg, split, seed, rules=rules)
    from data.videos import VideoFolder
    return VideoFolder(cfg, split, seed, index_file=index_file, rules=rules)
