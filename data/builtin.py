"""`data.path: builtin:moving_shapes`: procedural clips of coloured shapes that bounce.

Each clip is rendered on demand from its own `np.random.default_rng((seed, split, clip))`,
so nothing is stored and the same (seed, split, clip index) always gives the same pixels.
Motion is analytic (a constant velocity folded into the frame by reflection), so any frame
of a clip is rendered directly, without simulating the frames before it. Positions, sizes and
speeds are in units of the frame's shorter side, so with `data.resolution: [height, width]`
the shapes keep their form and the longer side simply gives them more room.

The default scene is deliberately plain (one shape, a flat background, a few distinct
colours, sizes of 25-40% of the frame, motion visible within 8 frames): a small DiT trained
for minutes on a CPU has to be able to learn it. `background: gradient` and `num_shapes > 1`
make it harder.

Captions (`data.builtin.captions: true`): each window is described by what it shows, e.g.
"a red square moving left on a black background": the shape kind, its colour, the direction
of its net motion over the window (the dominant axis of its displacement from the first to
the last frame: a shape that bounces is described by where it ends up going) and the
background ("on a dark blue and black gradient background" for gradients); several shapes
are joined with "and". All words are in `CAPTION_WORDS`.

Shapes (`data.buckets`, with the `Rules` stage 2 gives): clip k is rendered at its own size,
`data.builtin.resolutions[k mod n]` (landscape, portrait, square...), and
`data.builtin.num_stills` stills follow the clips (still j: frame 0 of the scene of clip
num_clips + j, a one-frame source; the val split gets the same share of stills as of clips).
The bucket plan (data/buckets.py) gives each source its shape; a clip whose bucket has another
size is rendered at its own and resized and center-cropped to it (`crop_resize`), one of the
bucket's size is rendered directly. Without buckets every clip is data.resolution, as always.

Held-out combinations (`data.builtin.held_out_combinations`, e.g. ["red triangle"]): no
training clip shows a shape in a held-out colour. The clip is drawn as usual, then each such
shape gets another colour (one the list allows for its kind, drawn from the clip's own RNG
after everything else, so the clip keeps its geometry); with `labels: shape_colour` a
held-out label is never drawn for training. The validation split is unchanged: it still
shows them, which is how a model's compositional generalisation is measured
(benchmarks/shape_coherence.py --prompts held_out).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from data.buckets import BucketPlan, Rules, Sample
from data.videos import cover_crop_box, crop_resize
from data.windows import window_span, windows_per_clip
from utils.config import BUILTIN_COLOURS, BUILTIN_SHAPES, DataConfig
from utils.errors import ConfigError

CLASS_NAMES = list(BUILTIN_SHAPES)  # shape kinds: circle, square, triangle
SPLIT_STREAMS = {"train": 0, "val": 1}  # val clips come from a different seed stream

# Flat, well separated colours in [0, 1]: dark backgrounds, saturated or light shapes.
BACKGROUNDS = np.array([[0.08, 0.08, 0.10], [0.12, 0.18, 0.38], [0.35, 0.12, 0.14],
                        [0.10, 0.30, 0.18]], dtype=np.float32)
SHAPE_COLOURS = np.array([[0.95, 0.25, 0.20], [0.25, 0.85, 0.30], [0.30, 0.55, 1.00],
                          [1.00, 0.85, 0.20], [0.95, 0.95, 0.95], [0.90, 0.40, 0.95]],
                         dtype=np.float32)
COLOUR_NAMES = list(BUILTIN_COLOURS)  # of SHAPE_COLOURS, in order
BACKGROUND_NAMES = ["black", "dark blue", "dark red", "dark green"]  # of BACKGROUNDS, in order
DIRECTIONS = ("left", "right", "up", "down")
# Every word a built-in caption can use (a tiny text encoder's vocabulary is built from it).
CAPTION_WORDS = sorted({"a", "and", "on", "moving", "background", "gradient", *CLASS_NAMES, *DIRECTIONS,
                        *(w for name in COLOUR_NAMES + BACKGROUND_NAMES for w in name.split())})
# Outward edge normals of an upward-pointing equilateral triangle, (3, 2) as (x, y-up).
TRIANGLE_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in
                             np.deg2rad([270.0, 30.0, 150.0])], dtype=np.float32)


class MovingShapes(torch.utils.data.Dataset):
    """Items: {"video": (3, T, H, W) float in [-1, 1], "label": int} (+ "caption": str with
    data.builtin.captions).

    `data.builtin.labels`: `shape` (3 classes, the shape kind) or `shape_colour` (18 classes,
    e.g. "green square"; every shape of a clip then has the label's colour). With `rules`
    (data.buckets): items of their bucket's shape, with "bucket" (module docstring).
    """

    def __init__(self, cfg: DataConfig, split: str = "train", seed: int = 0, rules: Optional[Rules] = None):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split = {split!r}: use 'train' or 'val'")
        self.cfg, self.split, self.seed = cfg, split, seed
        b = cfg.builtin
        if b.labels == "shape":
            self.class_names = list(CLASS_NAMES)
        else:
            self.class_names = [f"{c} {k}" for k in CLASS_NAMES for c in COLOUR_NAMES]
        self.num_classes = len(self.class_names)
        # (shape kind, colour id) pairs no training clip shows; the val split keeps them all.
        self.held_out = set() if split != "train" else {
            (CLASS_NAMES.index(shape), COLOUR_NAMES.index(colour)) for colour, shape in b.held_out_pairs()}
        self.num_clips = b.num_clips if split == "train" else b.num_val_clips
        self.rules = rules if cfg.buckets is not None else None
        self.plan: Optional[BucketPlan] = None  # with rules: the buckets and each source's
        self._grids: dict[tuple[int, int], tuple] = {}  # (height, width) -> pixel centres (`_grid`)
        self.windows = windows_per_clip(b.clip_frames, cfg.num_frames, cfg.frame_stride,
                                        cfg.window_stride)
        if self.rules is not None:
            self._plan_buckets()
        elif self.windows == 0:
            span = window_span(cfg.num_frames, cfg.frame_stride)
            raise ConfigError(
                f"data.num_frames = {cfg.num_frames} with data.frame_stride = {cfg.frame_stride} "
                f"spans {span} source frames, but data.builtin.clip_frames = {b.clip_frames}: "
                f"no window fits; raise data.builtin.clip_frames to >= {span} or lower data.num_frames")
        if self.plan is None:  # every clip at data.resolution, data.num_frames per window
            self.sizes = [(cfg.height, cfg.width)] * self.num_clips  # (height, width) rendered, per source
            self.shapes = [(cfg.num_frames, cfg.height, cfg.width)] * self.num_clips  # (frames, height, width) of items
            self.counts = [self.windows] * self.num_clips
        self._first = np.cumsum([0] + self.counts)  # (S + 1,) first window of each source

    def _plan_buckets(self) -> None:
        """Sources (clips at data.builtin.resolutions, then stills), their buckets and windows."""
        cfg, b = self.cfg, self.cfg.builtin
        sizes = [(r[0], r[1]) if isinstance(r, (list, tuple)) else (r, r)
                 for r in (b.resolutions or [[cfg.height, cfg.width]])]
        stills = b.num_stills if self.split == "train" else math.ceil(b.num_stills * b.num_val_clips / b.num_clips)

        def samples(clips: int, stills: int) -> list[Sample]:
            return [Sample(f"{'still' if k >= clips else 'clip'} {k}", k >= clips, 1 if k >= clips else b.clip_frames,
                           *sizes[k % len(sizes)]) for k in range(clips + stills)]
        mine, train = samples(self.num_clips, stills), samples(b.num_clips, b.num_stills)
        if cfg.images != "include":  # the kind data.images leaves out
            only = cfg.images == "only"
            unused = [(s.path, f"{'a clip' if only else 'an image'} (data.images = {cfg.images})")
                      for s in mine if s.image != only]
            mine, train = [s for s in mine if s.image == only], [s for s in train if s.image == only]
        else:
            unused = []
        self.plan, kept = BucketPlan.make(cfg, mine, train, self.rules, unused, refuse=self.split == "train")
        self._ids = [int(mine[i].path.split()[1]) for i in kept]  # source -> clip (scene) index
        self.sizes = [(mine[i].height, mine[i].width) for i in kept]
        self.shapes = [(x.num_frames, x.height, x.width) for x in map(self.plan.buckets.__getitem__, self.plan.bucket_of)]
        self.counts = [1 if mine[i].image else windows_per_clip(b.clip_frames, n, cfg.frame_stride, cfg.window_stride)
                       for i, (n, _, _) in zip(kept, self.shapes)]
        self._stills = {k for k, i in enumerate(kept) if mine[i].image}

    def _grid(self, height: int, width: int) -> tuple:
        """(side, extent, x, y) of a height x width frame: pixel centres in units of the shorter
        side (a square frame spans [0, 1]), shared by every frame of that size; extent is the
        frame's (x, y) size in those units; x, y (H, W) each."""
        if (height, width) not in self._grids:
            side = min(height, width)  # pixels
            extent = np.array([width, height], dtype=np.float64) / side
            x, y = np.meshgrid((np.arange(width, dtype=np.float32) + 0.5) / side,
                               (np.arange(height, dtype=np.float32) + 0.5) / side)  # (H, W) each
            self._grids[(height, width)] = (side, extent, x, y)
        return self._grids[(height, width)]

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int) -> dict:
        src, frames = self.window(index)
        scene = self.scene(src)  # drawn once for the pixels and the label
        item = {"video": self._pixels(src, scene, frames), "label": scene["label"]}
        if self.has_captions:
            item["caption"] = self.caption(index)
        if self.plan is not None:
            item["bucket"] = self.plan.bucket_of[src]
        return item

    def _pixels(self, src: int, scene: dict, frames: list) -> torch.Tensor:
        """Frames `frames` of source `src` -> (3, T, H, W) in [-1, 1] at its item shape: rendered at
        its own size, then resized and center-cropped to its bucket's when that differs."""
        video = torch.from_numpy(self.render_frames(scene, frames) * 2 - 1)  # (3, T, h, w)
        (height, width), size = self.shapes[src][1:], self.sizes[src]
        if (height, width) == size:
            return video
        x = crop_resize(video.transpose(0, 1), height, width, cover_crop_box(*size, height, width))  # (T, 3, H, W)
        return x.clamp(-1, 1).transpose(0, 1).contiguous()

    # ----------------------------------------------------------------- captions

    @property
    def has_captions(self) -> bool:
        return self.cfg.builtin.captions

    def caption(self, index: int) -> str:
        """What window `index` shows, e.g. "a red square moving left on a black background"."""
        return self.source_caption(*self.window(index))

    def source_caption(self, clip: int, frames: list[int]) -> str:
        """What frames `frames` of source `clip` show (evaluate's real clips are such windows)."""
        scene = self.scene(clip)
        start, end = frames[0], (frames[-1] if len(frames) > 1 else frames[0] + 1)
        moves = self.render_positions(scene, end) - self.render_positions(scene, start)  # (n, 2)
        kind = CLASS_NAMES[scene["kind"]]
        shapes = [(COLOUR_NAMES[c], kind, _direction(dx, dy)) for c, (dx, dy) in zip(scene["colour_ids"], moves)]
        first, second = (BACKGROUND_NAMES[b] for b in scene["background_ids"])
        return scene_caption(shapes, first, second if self.cfg.builtin.background == "gradient" else first)

    def distinct_captions(self) -> list[str]:
        """Every caption of this split once, sorted (what the text embedding cache encodes)."""
        return sorted({self.caption(i) for i in range(len(self))}) if self.has_captions else []

    def window(self, index: int) -> tuple[int, list[int]]:
        """(source: a clip, the source frame indices of window `index`)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        src = int(np.searchsorted(self._first, int(index), side="right")) - 1
        start = (int(index) - int(self._first[src])) * self.cfg.window_stride
        return src, [start + self.cfg.frame_stride * i for i in range(self.shapes[src][0])]

    # Latent cache protocol (see data/latent_cache.py): clips are the sources.
    augments = False  # procedural clips: the same pixels every epoch
    frame_rate = None  # procedural frames have no time of their own (videos use validation.fps)

    @property
    def num_sources(self) -> int:
        return len(self.shapes)

    def source_length(self, clip: int) -> int:
        return 1 if self.plan is not None and clip in self._stills else self.cfg.builtin.clip_frames

    def source_label(self, clip: int) -> int:
        return self.scene(clip)["label"]

    def source_frames(self, clip: int, indices: list[int]) -> torch.Tensor:
        """Frames `indices` of `clip` -> (3, n, H, W) in [-1, 1]."""
        return self._pixels(clip, self.scene(clip), indices)

    def iter_source_frames(self, clip: int, indices: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, (3, H, W) frame in [-1, 1]) for each of `indices`, one frame at a time."""
        scene = self.scene(clip)
        for t in indices:
            yield t, self._pixels(clip, scene, [t])[:, 0]

    def cache_key(self) -> dict:
        builtin = asdict(self.cfg.builtin)
        if not self.held_out:  # pixels as before the option (none, or the val split): the same key
            del builtin["held_out_combinations"]
        for name, default in (("resolutions", None), ("num_stills", 0)):  # before buckets: the same key
            if builtin[name] == default:
                del builtin[name]
        key = {"path": self.cfg.path, "split": self.split, "seed": self.seed,
               "resolution": [self.cfg.height, self.cfg.width], "builtin": builtin}
        if self.plan is not None:  # each source's pixels are its bucket's size
            key["buckets"] = [list(shape[1:]) for shape in self.shapes]
        return key

    def scene(self, clip: int) -> dict:
        """Random scene parameters of one source (everything drawn from its clip's own RNG;
        with buckets, source `clip` is clip `_ids[clip]`, rendered at its own size)."""
        b = self.cfg.builtin
        size = self.sizes[clip]
        clip = clip if self.plan is None else self._ids[clip]
        extent = self._grid(*size)[1]
        rng = np.random.default_rng((self.seed, SPLIT_STREAMS[self.split], clip))
        label = int(rng.integers(self.num_classes))
        kind, colour = divmod(label, len(COLOUR_NAMES)) if b.labels == "shape_colour" else (label, None)
        bg = rng.choice(b.num_backgrounds, size=2, replace=b.num_backgrounds < 2)
        n = b.num_shapes
        sizes = rng.uniform(b.min_size, b.max_size, n)  # fraction of the frame's shorter side
        half = sizes / 2
        speed = rng.uniform(b.min_speed, b.max_speed, n)  # shorter sides per source frame
        angle = rng.uniform(0, 2 * np.pi, n)
        gradient_dir = rng.normal(size=2)
        colours = rng.choice(len(SHAPE_COLOURS), size=n, replace=n > len(SHAPE_COLOURS))
        colour_ids = colours if colour is None else np.full(n, colour)
        if any((kind, int(c)) in self.held_out for c in colour_ids):  # drawn last: the rest stays
            colour_ids = self._recolour(kind, colour_ids, rng)
            if colour is not None:
                label = kind * len(COLOUR_NAMES) + int(colour_ids[0])
        return {
            "label": label,
            "kind": kind,
            "background": BACKGROUNDS[bg],  # (2, 3): gradient end colours
            "gradient_dir": gradient_dir,
            "colours": SHAPE_COLOURS[colour_ids],
            "colour_ids": [int(c) for c in colour_ids],  # into COLOUR_NAMES (captions)
            "background_ids": [int(b) for b in bg],  # into BACKGROUND_NAMES
            "half": half,
            "size": size,  # (height, width) pixels it is rendered at
            "extent": extent,  # (2,): frame width, height in shorter sides
            "pos0": rng.uniform(half[:, None], extent - half[:, None], (n, 2)),  # (n, 2): x, y
            "vel": speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1),  # (n, 2)
        }

    def _recolour(self, kind: int, colour_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`colour_ids` with each held-out colour of shape `kind` replaced by an allowed one,
        preferring colours no other shape of the clip has (shape_colour labels: one colour for all)."""
        allowed = [c for c in range(len(COLOUR_NAMES)) if (kind, c) not in self.held_out]
        ids = [int(c) for c in colour_ids]
        if self.cfg.builtin.labels == "shape_colour":
            return np.full(len(ids), allowed[rng.integers(len(allowed))])
        for i, c in enumerate(ids):
            if (kind, c) in self.held_out:
                free = [a for a in allowed if a not in ids] or allowed
                ids[i] = free[rng.integers(len(free))]
        return np.array(ids)

    @staticmethod
    def render_positions(scene: dict, t: float) -> np.ndarray:
        """(n, 2) shape centres (x, y in shorter sides) at source time `t`."""
        return MovingShapes._positions(scene, np.array([t], dtype=np.float64))[:, 0]

    @staticmethod
    def _positions(scene: dict, times: np.ndarray) -> np.ndarray:
        """(n_shapes, n, 2) shape centres at the source times `times` (n,)."""
        lo = scene["half"][:, None, None]  # (n_shapes, 1, 1): centres stay this far from the borders
        free = scene["pos0"][:, None] + times[None, :, None] * scene["vel"][:, None]  # (n_shapes, n, 2)
        return _bounce(free, lo, scene["extent"] - lo)

    def render(self, scene: dict, t: float) -> np.ndarray:
        """Frame at source time `t` (frames) -> (3, H, W) float32 in [0, 1]."""
        return self.render_frames(scene, [t])[:, 0]

    def render_frames(self, scene: dict, times: list[float]) -> np.ndarray:
        """Frames at source times `times` -> (3, n, H, W) float32 in [0, 1], all at once.

        One array pass per shape for the whole window instead of one per frame (stage 1 draws
        a window per clip at every step); per pixel the arithmetic is that of a single frame,
        so every frame is bitwise the same as rendered alone.
        """
        side, _, x, y = self._grid(*scene["size"])
        img = self._background(scene)[:, None]  # (3, 1, H, W): every frame starts from it
        pos = self._positions(scene, np.asarray(times, dtype=np.float64))  # (n_shapes, n, 2)
        for shape_pos, h, colour in zip(pos, scene["half"], scene["colours"]):
            cx, cy = shape_pos[:, 0, None, None], shape_pos[:, 1, None, None]  # (n, 1, 1) each
            cover = _coverage(self._sdf(scene["kind"], x - cx, y - cy, h), 1.0 / side)  # (n, H, W)
            img = img + cover * (colour[:, None, None, None] - img)  # (3, n, H, W)
        return np.ascontiguousarray(np.broadcast_to(img, (3, len(times)) + x.shape), dtype=np.float32)

    def _background(self, scene: dict) -> np.ndarray:
        _, extent, x, y = self._grid(*scene["size"])
        c0, c1 = scene["background"][:, :, None, None]  # (3, 1, 1) each
        if self.cfg.builtin.background == "plain":
            return np.broadcast_to(c0, (3,) + x.shape).astype(np.float32)
        d = scene["gradient_dir"] / (np.linalg.norm(scene["gradient_dir"]) + 1e-8)
        ex, ey = (float(v) for v in extent)  # python floats: float32 arithmetic, as on a square
        ramp = (x - ex / 2) * d[0] + (y - ey / 2) * d[1]  # within +-half the diagonal
        diagonal = 1.42 * (math.hypot(ex, ey) / math.sqrt(2))  # 1.42 on a square frame
        a = np.clip(ramp / diagonal + 0.5, 0, 1)[None]  # (1, H, W)
        return (c0 + a * (c1 - c0)).astype(np.float32)

    @staticmethod
    def _sdf(kind_id: int, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
        """Signed distance (shorter sides, < 0 inside) to a shape of half-extent `half`."""
        kind = CLASS_NAMES[kind_id]
        if kind == "circle":
            return np.hypot(dx, dy) - half
        if kind == "square":
            return np.maximum(np.abs(dx), np.abs(dy)) - half * 0.9  # same visual area as the circle
        # Equilateral triangle pointing up whose bounding box is 2*half wide: circumradius
        # R = 2*half/sqrt(3); its centroid sits R/4 below the box centre, so the box spans
        # +-0.75 R = +-0.87 half vertically. Distance = max over the three edge lines.
        R = 2 * half / np.sqrt(3)
        p = np.stack([dx, -(dy - R / 4)], -1)  # (..., H, W, 2), relative to the centroid, y up
        return (p @ TRIANGLE_NORMALS.T).max(-1) - R / 2  # inradius R/2


def scene_caption(shapes: Sequence[tuple[str, str, str]], background: str, gradient_to: Optional[str] = None) -> str:
    """The built-in caption of (colour, shape, direction) shapes on `background` (a gradient
    from it to `gradient_to` when that differs), e.g. "a red square moving left on a black
    background": every built-in caption, and any prompt in their words, is written here."""
    described = " and ".join(f"a {colour} {kind} moving {direction}" for colour, kind, direction in shapes)
    if gradient_to is not None and gradient_to != background:
        return f"{described} on a {background} and {gradient_to} gradient background"
    return f"{described} on a {background} background"


def _direction(dx: float, dy: float) -> str:
    """The dominant axis of a displacement (x right, y down, as pixels are laid out)."""
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "up" if dy < 0 else "down"


def _bounce(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fold free motion into [lo, hi] by reflection at the borders (a triangle wave)."""
    width = hi - lo
    q = np.mod(p - lo, 2 * width)
    return lo + np.where(q > width, 2 * width - q, q)


def _coverage(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage: a linear ramp one pixel wide across the edge."""
    return np.clip(0.5 - sdf / pixel, 0.0, 1.0)
