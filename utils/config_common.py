"""The config sections every stage shares (experiment, data with its built-in clips and
buckets, the VAE and text-encoder references, model, diffusion), the checks they share, and the
schema rules of loading (path fields, refused keys). The run configs that combine them are in
config_vae.py, config_train.py, config_predict.py and config_evaluate.py; utils/config.py loads
any of them and re-exports them all, so callers import from there.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from utils import config_loader
from utils.errors import ConfigError


DEVICE_HELP = "use auto, cpu, cuda or cuda:N"
CAPTION_FILE_EXTS = (".csv", ".jsonl", ".json")  # data.captions metadata files
MAX_NAME_BYTES = 255  # a file or folder name's limit on ext4, xfs, btrfs, APFS, NTFS
MAX_RESOLUTION = 8192  # pixels per side: 8K video; a window of 8192 x 8192 frames is already ~0.8 GB/frame
FLOW_SHIFT_RANGE = (0.01, 100.0)  # diffusion.flow_shift: models use 1-17 (SD3 3, Wan 3-5, HunyuanVideo 7-17)
MAX_TEXT_TOKENS = 4096  # text_encoder.max_length: an encoder that states no limit is still bounded
MAX_SEED = 2 ** 63 - 1  # seeds are 64-bit (torch's generators; python ints are unbounded)
# experiment.seed: each rank's streams are seeded with seed x ~1000 + rank (utils/train_utils.py)
MAX_EXPERIMENT_SEED = 2 ** 53 - 1
MAX_VIDEO_FRAMES = 10_000  # predict num_frames: ~7 min at 24 fps, sampled window after window and held in memory
MAX_WINDOWS = 64  # evaluate windows: window positions, each sampled for every video and given its own FVD
MAX_FPS = 1000.0  # frames per second: beyond high-speed cameras' playback; resampling allocates fps * seconds
# The built-in dataset's shape kinds and colour names, in the order data/builtin.py draws them
# (it takes them from here, so that data.builtin.held_out_combinations is checked at load).
BUILTIN_SHAPES = ("circle", "square", "triangle")
BUILTIN_COLOURS = ("red", "green", "blue", "yellow", "white", "violet")


@dataclass
class ExperimentConfig:
    name: str = "demo"  # the run's folder name (one plain name, at most 255 bytes)
    runs_dir: str = "runs"  # run directory is <runs_dir>/<name>
    seed: int = 0  # seeds python, numpy, torch and the data order

    def validate(self, prefix: str = "experiment") -> None:
        """`name` is one plain directory name inside runs_dir: never a path that leaves it."""
        check_seed(self.seed, f"{prefix}.seed", top=MAX_EXPERIMENT_SEED)
        name = self.name
        if name.strip() in ("", ".", "..") or os.path.isabs(name) or "/" in name or "\\" in name \
                or name != name.strip() or "\0" in name:
            raise ConfigError(f"{prefix}.name = {name!r}: must be one plain directory name (no "
                              "path separators, not empty, '.' or '..', no surrounding spaces); "
                              f"the run directory is {prefix}.runs_dir/<name>. Put the parent "
                              f"folders in {prefix}.runs_dir instead")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"{prefix}.name is {len(name.encode())} bytes long: a folder name may "
                              f"have at most {MAX_NAME_BYTES} bytes on most file systems; shorten "
                              f"{prefix}.name (the run directory is {prefix}.runs_dir/<name>)")


@dataclass
class BuiltinDataConfig:
    """`data.path: builtin:moving_shapes`: procedural clips, deterministic from the seed."""
    num_clips: int = 256  # training clips; held-out clips use a different seed
    num_val_clips: int = 16  # held-out clips (the val split; a seed of their own)
    clip_frames: int = 24  # source frames per clip, before frame_stride / windows
    num_shapes: int = 1  # shapes per clip
    background: Literal["plain", "gradient"] = "plain"  # plain (one colour per clip) or gradient backgrounds
    min_size: float = 0.25  # shape size as a fraction of the frame's shorter side
    max_size: float = 0.4  # largest shape size, as min_size
    min_speed: float = 0.03  # fraction of the shorter side per source frame
    max_speed: float = 0.06  # fastest shape speed, as min_speed
    num_backgrounds: int = 4  # background colours drawn from (the first k of 4)
    labels: Literal["shape", "shape_colour"] = "shape"  # class = shape kind, or kind and colour
    captions: bool = False  # each window captioned, e.g. "a red square moving left on a black background"
    # "<colour> <shape>" pairs, e.g. "red triangle", that no training clip shows (its shape gets
    # another colour); the validation split keeps them: a test of compositional generalisation
    held_out_combinations: list[str] = field(default_factory=list)
    # With data.buckets: the clips' own sizes, cycled over them (clip k is rendered at entry
    # k mod n: a square side or [height, width]); null = data.resolution for every clip
    resolutions: Optional[list[Union[int, list[int]]]] = None
    num_stills: int = 0  # with data.buckets: still images (one frame of a clip each) beside the clips

    def held_out_pairs(self) -> list[tuple[str, str]]:
        """held_out_combinations as (colour, shape) pairs (lower case; checked by `validate`)."""
        return [split_combination(text) for text in self.held_out_combinations]

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "num_clips", "num_val_clips", "clip_frames", "num_shapes")
        self._check_held_out(prefix + ".held_out_combinations")
        if not 1 <= self.num_backgrounds <= 4:
            raise ConfigError(f"{prefix}.num_backgrounds = {self.num_backgrounds}: must be 1 to 4")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ConfigError(f"{prefix}.min_size / max_size = {self.min_size} / {self.max_size}: "
                              "need 0 < min_size <= max_size <= 1")
        if not 0 <= self.min_speed <= self.max_speed:
            raise ConfigError(f"{prefix}.min_speed / max_speed = {self.min_speed} / {self.max_speed}: "
                              "need 0 <= min_speed <= max_speed")
        if self.resolutions is not None:
            if not self.resolutions:
                raise ConfigError(f"{prefix}.resolutions is an empty list: give sizes (e.g. [[32, 64], "
                                  "[64, 32], 48]) or null (every clip at data.resolution)")
            for i, res in enumerate(self.resolutions):
                _check_resolution(res, f"{prefix}.resolutions[{i}]")
        if self.num_stills < 0:
            raise ConfigError(f"{prefix}.num_stills = {self.num_stills}: must be >= 0")

    def _check_held_out(self, key: str) -> None:
        """Each entry a known "<colour> <shape>"; every shape keeps at least one training colour."""
        known = f"colours: {', '.join(BUILTIN_COLOURS)}; shapes: {', '.join(BUILTIN_SHAPES)}"
        for i, text in enumerate(self.held_out_combinations):
            words = text.lower().split() if isinstance(text, str) else []
            if len(words) != 2:
                raise ConfigError(f"{key}[{i}] = {text!r}: write a colour and a shape, e.g. \"red triangle\" "
                                  f"({known})")
            colour, shape = words
            if colour not in BUILTIN_COLOURS:
                raise ConfigError(f"{key}[{i}] = {text!r}: {colour!r} is not a colour of the built-in "
                                  f"shapes; use one of {', '.join(BUILTIN_COLOURS)}")
            if shape not in BUILTIN_SHAPES:
                raise ConfigError(f"{key}[{i}] = {text!r}: {shape!r} is not a built-in shape; use one of "
                                  f"{', '.join(BUILTIN_SHAPES)}")
        pairs = set(self.held_out_pairs())
        for shape in BUILTIN_SHAPES:
            if all((colour, shape) in pairs for colour in BUILTIN_COLOURS):
                raise ConfigError(f"{key} holds out every colour of the {shape}: no training clip could "
                                  f"show a {shape}; leave at least one of its colours out of the list")


def split_combination(text: str) -> tuple[str, str]:
    """A data.builtin.held_out_combinations entry as (colour, shape): "Red triangle" -> ("red", "triangle")."""
    colour, shape = text.lower().split()
    return colour, shape


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")  # stills: one-frame samples with data.buckets


class Sized:
    """`height` and `width` of a section's `resolution` (a square side or [height, width])."""
    resolution: Union[int, list[int]]

    @property
    def height(self) -> int:
        """Frame height in pixels."""
        return self.resolution[0] if isinstance(self.resolution, (list, tuple)) else self.resolution

    @property
    def width(self) -> int:
        """Frame width in pixels."""
        return self.resolution[1] if isinstance(self.resolution, (list, tuple)) else self.resolution
BUCKET_ORIGINS = ("auto",)  # data.buckets spelled as a word (else null or a list)


@dataclass
class BucketConfig(Sized):
    """One entry of `data.buckets`: the shape of its samples and how many make a batch."""
    resolution: Optional[Union[int, list[int]]] = None  # pixels: a square side or [height, width]
    num_frames: Optional[int] = None  # frames per sample; 1 = images (stills)
    batch_size: Optional[int] = None  # samples per batch, per process; null = train.batch_size x
                                      # the tokens of data.resolution x data.num_frames / this bucket's

    def validate(self, prefix: str) -> None:
        for name, example in (("resolution", "[32, 64]"), ("num_frames", "8")):
            if getattr(self, name) is None:
                raise ConfigError(f"{prefix}.{name} is missing: every bucket needs resolution and "
                                  f"num_frames (e.g. {name}: {example}); batch_size may be null")
        _check_resolution(self.resolution, prefix + ".resolution")
        _positive(self, prefix, "num_frames")
        if self.batch_size is not None:
            _positive(self, prefix, "batch_size")


@dataclass
class DataConfig(Sized):
    path: str = "builtin:moving_shapes"  # or a folder of videos / frame folders
    num_frames: int = 8  # frames per training clip (after frame_stride)
    resolution: Union[int, list[int]] = 32  # pixels: a square side, or [height, width]
    frame_stride: int = 1  # take every k-th source frame
    window_stride: int = 4  # start a new window every k source frames
    random_crop: bool = False  # else the center: frames are resized to cover the resolution, then cropped
    hflip: bool = False  # random horizontal flip
    val_fraction: float = 0.1  # folders: share of videos held out for validation
    labels: Literal["none", "subfolder"] = "none"  # folders: class = top-level subfolder
    num_workers: int = 0  # DataLoader worker processes
    cache: Literal["off", "auto"] = "off"  # stage 2: auto = encode each window once with the frozen VAE (latent cache)
    fps: Optional[float] = None  # resample every source to this frame rate by time; null = every frame
    frame_folder_fps: Optional[float] = None  # frame rate of frame folders (needed with fps)
    index_cache: Optional[str] = None  # JSON file of probed sources shared between runs; null = <run>/data_index.json
    index_workers: Optional[int] = None  # processes probing new sources; null = one per CPU core
    # null = no captions; sidecar = <stem>.txt beside each clip (<folder>.txt beside a frame
    # folder); or a .csv / .jsonl / .json metadata file (columns path / file_path / video and
    # text / caption / prompt; docs/data.md)
    captions: Optional[str] = None
    missing_caption: Literal["error", "skip", "empty"] = "error"  # a clip with no (or an empty) caption
    # Buckets (docs/data.md "Buckets"): null = every sample at resolution x num_frames; auto = one
    # bucket per aspect ratio found, at about bucket_area pixels (clips: num_frames; images: 1);
    # or a list of {resolution, num_frames, batch_size}: each sample goes to the nearest aspect
    # ratio and the longest frame count it fills, is resized and cropped to it, never padded
    buckets: Optional[Union[Literal["auto"], list[BucketConfig]]] = None
    bucket_area: Optional[int] = None  # pixels per frame of auto buckets; null = resolution's area
    images: Literal["include", "exclude", "only"] = "include"  # stills under path (with buckets)
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)

    def validate(self, prefix: str = "data") -> None:
        _positive(self, prefix, "num_frames", "frame_stride", "window_stride")
        _check_resolution(self.resolution, prefix + ".resolution")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers = {self.num_workers}: must be >= 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{prefix}.val_fraction = {self.val_fraction}: must be in [0, 1)")
        for n in ("fps", "frame_folder_fps"):
            if getattr(self, n) is not None and getattr(self, n) <= 0:
                raise ConfigError(f"{prefix}.{n} = {getattr(self, n)}: must be > 0 (frames per "
                                  "second) or null")
            if getattr(self, n) is not None and getattr(self, n) > MAX_FPS:
                raise ConfigError(f"{prefix}.{n} = {getattr(self, n):g}: at most {MAX_FPS:g} frames "
                                  "per second (each second of every clip becomes this many frames "
                                  "in memory); give the rate to train at, e.g. 8 to 30")
        if self.index_workers is not None and self.index_workers < 1:
            raise ConfigError(f"{prefix}.index_workers = {self.index_workers}: must be >= 1 or "
                              "null (one per CPU core)")
        if self.fps is not None and self.path.startswith("builtin:"):
            raise ConfigError(f"{prefix}.fps = {self.fps}: the built-in clips have no timestamps "
                              f"to resample; set {prefix}.fps: null or use a folder of videos")
        if self.path.startswith("builtin:") and self.path != "builtin:moving_shapes":
            raise ConfigError(f"{prefix}.path = {self.path!r}: the only built-in dataset is "
                              "'builtin:moving_shapes'; otherwise give a folder of videos")
        # (in validate itself: tests/test_config.py does not count reads by `validate` as uses)
        if self.captions is not None and self.path.startswith("builtin:"):
            raise ConfigError(f"{prefix}.captions = {self.captions!r}: the built-in clips caption "
                              f"themselves; set {prefix}.captions: null and {prefix}.builtin.captions: true")
        if self.captions not in (None, "sidecar") and not self.captions.lower().endswith(CAPTION_FILE_EXTS):
            raise ConfigError(f"{prefix}.captions = {self.captions!r}: use null (no captions), sidecar "
                              f"(<clip stem>.txt beside each clip) or a metadata file ending in "
                              f"{', '.join(CAPTION_FILE_EXTS)}")
        self.builtin.validate(prefix + ".builtin")
        self._check_buckets(prefix)

    def _check_buckets(self, prefix: str) -> None:
        """data.buckets, bucket_area, images and the built-in shapes agree with each other."""
        b = self.builtin
        if self.buckets is None:
            needs = [(f"{prefix}.images = {self.images}", self.images == "only"),
                     (f"{prefix}.bucket_area = {self.bucket_area}", self.bucket_area is not None),
                     (f"{prefix}.builtin.resolutions = {b.resolutions}", b.resolutions is not None),
                     (f"{prefix}.builtin.num_stills = {b.num_stills}", b.num_stills > 0)]
            for what, given in needs:
                if given:
                    raise ConfigError(f"{what} needs {prefix}.buckets (samples of several shapes, stills "
                                      f"in one-frame batches); set {prefix}.buckets: auto (or a list), or "
                                      "remove it")
            return
        if isinstance(self.buckets, list):
            if not self.buckets:
                raise ConfigError(f"{prefix}.buckets is an empty list: list buckets ({{resolution: [32, 64], "
                                  f"num_frames: 8, batch_size: 4}}, ...), or use auto or null")
            seen = {}
            for i, bucket in enumerate(self.buckets):
                bucket.validate(f"{prefix}.buckets[{i}]")
                shape = (bucket.height, bucket.width, bucket.num_frames)
                if shape in seen:
                    raise ConfigError(f"{prefix}.buckets[{i}] repeats {prefix}.buckets[{seen[shape]}] "
                                      f"({bucket.height}x{bucket.width}, {bucket.num_frames} frames): give "
                                      "each shape once")
                seen[shape] = i
            if self.bucket_area is not None:
                raise ConfigError(f"{prefix}.bucket_area = {self.bucket_area} sizes {prefix}.buckets: auto "
                                  f"only, and the buckets are listed: remove {prefix}.bucket_area")
            if self.images == "only" and not any(x.num_frames == 1 for x in self.buckets):
                raise ConfigError(f"{prefix}.images = only but no bucket of {prefix}.buckets has num_frames "
                                  "1 (images are one-frame samples): add one, e.g. {resolution: [32, 32], "
                                  "num_frames: 1, batch_size: 32}")
        if self.bucket_area is not None and not 1 <= self.bucket_area <= MAX_RESOLUTION ** 2:
            raise ConfigError(f"{prefix}.bucket_area = {self.bucket_area}: pixels per frame, between 1 and "
                              f"{MAX_RESOLUTION ** 2} (e.g. 1024 for about 32x32), or null (data.resolution's)")
        if self.images == "only" and b.num_stills == 0 and self.path.startswith("builtin:"):
            raise ConfigError(f"{prefix}.images = only but {prefix}.builtin.num_stills = 0: the built-in "
                              f"data has no stills; set {prefix}.builtin.num_stills")


@dataclass
class VAERefConfig:
    """Stage 2: a frozen diffusers VAE on disk (any family models/vae.py supports)."""
    path: Optional[str] = None  # a VAE folder (e.g. runs/vae/vae) or a pipeline folder with vae/
    subfolder: Optional[str] = None  # the VAE's subfolder of `path`; null = path itself, or vae/ of a pipeline
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA for video VAEs
    tiling: bool = False  # diffusers' spatial tiling (large resolutions)
    slicing: bool = False  # diffusers' batch slicing (one clip / frame batch at a time)
    encode_batch_frames: int = 64  # frames per VAE call (memory bound; a video VAE takes whole clips)
    sample_posterior: bool = True  # train on posterior samples (False: posterior mean)

    def validate(self, prefix: str = "vae") -> None:
        _positive(self, prefix, "encode_batch_frames")


def check_prompts(prompts: Optional[list], key: str) -> None:
    """null, or a non-empty list of non-empty strings."""
    if prompts is None:
        return
    if not isinstance(prompts, list) or not prompts:
        raise ConfigError(f"{key}: give a list of prompts (strings), e.g. [\"a red square moving left\"], or null")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{key}[{i}] = {p!r}: each prompt must be a non-empty string")


@dataclass
class TextEncoderConfig:
    """A frozen transformers text encoder on disk (models/text_encoder.py): T5, UMT5 or CLIP."""
    path: Optional[str] = None  # an encoder folder with its tokenizer, or a pipeline folder with text_encoder/ + tokenizer/
    subfolder: Optional[str] = None  # the encoder's subfolder of `path` (e.g. text_encoder_2); its tokenizer is tokenizer_2
    max_length: Optional[int] = None  # tokens per caption (longer ones are cut); null = the tokenizer's model_max_length
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    batch_size: int = 64  # captions per encoder call when embeddings are cached

    def validate(self, prefix: str = "text_encoder") -> None:
        _positive(self, prefix, "batch_size")
        if self.max_length is not None and not 1 <= self.max_length <= MAX_TEXT_TOKENS:
            raise ConfigError(f"{prefix}.max_length = {self.max_length}: must be 1 to {MAX_TEXT_TOKENS} tokens "
                              "(every caption is padded to it in each batch; video models' text encoders "
                              "take 77 to 512) or null (the tokenizer's model_max_length)")


MODEL_PRESETS: dict[str, dict[str, int]] = {
    # name: hidden_size, depth, num_heads (DiT paper sizes), patch from the suffix
    "DiT-T": dict(hidden_size=192, depth=6, num_heads=3),
    "DiT-S": dict(hidden_size=384, depth=12, num_heads=6),
    "DiT-B": dict(hidden_size=768, depth=12, num_heads=12),
    "DiT-L": dict(hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


@dataclass
class LoRAConfig:
    """`model.finetune: lora` (peft, through diffusers' add_adapter): low-rank adapters on the
    pretrained transformer's linear layers; only they train."""
    rank: int = 16  # r: the adapters' inner width
    alpha: float = 16.0  # scale alpha / rank on the adapters' output
    dropout: float = 0.0  # dropout on the adapters' input
    # module name suffixes to adapt (peft target_modules); null = the family's default (attention
    # q/k/v/out and the feed-forward linears; models/backbones.py)
    targets: Optional[list[str]] = None

    def validate(self, prefix: str = "model.lora") -> None:
        _positive(self, prefix, "rank")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha = {self.alpha}: must be > 0 (the adapters' scale is alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout = {self.dropout}: must be in [0, 1)")
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ConfigError(f"{prefix}.targets = {self.targets!r}: give module names, e.g. [to_q, to_k, to_v, "
                              "to_out.0], or null (the family's default)")


@dataclass
class ModelConfig:
    """The video DiT. Its input size derives from data + VAE, never from here."""
    preset: Optional[str] = None  # e.g. "DiT-S/2": overrides hidden_size/depth/num_heads/patch_size
    hidden_size: int = 256  # token width (the DiT's channels)
    depth: int = 6  # transformer blocks
    num_heads: int = 4  # attention heads per block
    mlp_ratio: float = 4.0  # MLP width as a multiple of hidden_size (DiT: 4)
    patch_size: int = 2  # spatial patch side in latent pixels
    patch_t: int = 1  # temporal patch length in latent frames
    attention: Literal["factorized", "full"] = "factorized"  # spatial/temporal alternating, or space-time
    qk_norm: bool = True  # LayerNorm on each head's queries and keys
    # Where a token is: `sincos` (a fixed 3-D sin-cos table added to the tokens once, DiT/Latte)
    # or `rope` (3-D rotary positions on each self-attention's queries and keys, as Wan and
    # HunyuanVideo: relative positions, for models trained on several shapes, data.buckets).
    positions: Literal["sincos", "rope"] = "sincos"
    # What the DiT is told besides (x_t, t): `none`, `class` (the dataset's labels, if it has
    # any) or `text` (captions through a frozen text encoder). null: from class_conditional.
    conditioning: Optional[Literal["none", "class", "text"]] = None
    class_conditional: Optional[bool] = None  # older key: true == conditioning class, false == none
    class_dropout: float = 0.1  # label dropout for classifier-free guidance
    caption_dropout: float = 0.1  # probability of training on the null caption (text; for guidance)
    # Probability that a training clip gets its first `condition_frames` latent frames clean, as
    # the condition (timestep 0, no loss): image-to-video and extension. 0 = off.
    first_frame_conditioning: float = 0.0
    condition_frames: int = 1  # latent frames given when it does (1: image-to-video; more: continuation)
    # A pretrained video DiT to start from: a diffusers pipeline folder (its transformer/ and
    # scheduler/) or a transformer folder (WanTransformer3DModel, CogVideoXTransformer3DModel).
    # Its architecture, objective, schedule and text convention are its own (models/backbones.py):
    # the architecture keys above are then ignored (said in the log). null = the repo's DiT.
    pretrained: Optional[str] = None
    finetune: Literal["full", "lora"] = "lora"  # with pretrained: every weight, or LoRA adapters only
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def conditioning_kind(self) -> str:
        """`none`, `class` or `text`: `conditioning` if set, else from the older `class_conditional`
        (unset: class, today's default)."""
        if self.conditioning is not None:
            return self.conditioning
        return "none" if self.class_conditional is False else "class"

    def resolved(self) -> "ModelConfig":
        """Copy with the preset applied (presets are names for sizes, nothing more) and the
        condition spelled both ways: `conditioning` set, `class_conditional` = (it is class)."""
        kind = self.conditioning_kind()
        cond = dict(conditioning=kind, class_conditional=kind == "class")
        if self.preset is None:
            return dataclasses.replace(self, **cond)
        name, _, patch = self.preset.partition("/")
        sizes = dict(MODEL_PRESETS[name])
        if patch:
            sizes["patch_size"] = int(patch)
        return dataclasses.replace(self, preset=None, **sizes, **cond)

    def validate(self, prefix: str = "model") -> None:
        if self.preset is not None:
            name, _, patch = self.preset.partition("/")
            if name not in MODEL_PRESETS or (patch and not patch.isdigit()):
                raise ConfigError(f"{prefix}.preset = {self.preset!r}: use one of "
                                  f"{sorted(MODEL_PRESETS)} with an optional '/<patch>', e.g. 'DiT-S/2'")
        _positive(self, prefix, "hidden_size", "depth", "num_heads", "patch_size", "patch_t")
        r = self.resolved()
        if r.hidden_size % r.num_heads:
            raise ConfigError(f"{prefix}.hidden_size = {r.hidden_size} is not divisible by "
                              f"num_heads = {r.num_heads}")
        if (r.hidden_size // r.num_heads) % 2:
            raise ConfigError(f"{prefix}: head dim {r.hidden_size // r.num_heads} must be even")
        if r.positions == "rope" and r.hidden_size // r.num_heads < 8:
            raise ConfigError(f"{prefix}.positions = rope: head dim {r.hidden_size // r.num_heads} (hidden_size / "
                              "num_heads) is too small to rotate by frame, row and column; give each head at "
                              "least 8 channels (fewer heads or a larger hidden_size), or positions sincos")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{prefix}.mlp_ratio = {self.mlp_ratio}: must be > 0 (the MLP's width as a "
                              "multiple of hidden_size; DiT uses 4.0)")
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"{prefix}.class_dropout = {self.class_dropout}: must be in [0, 1)")
        if self.conditioning is not None and self.class_conditional is not None and \
                self.class_conditional != (self.conditioning == "class"):
            raise ConfigError(
                f"{prefix}.class_conditional = {str(self.class_conditional).lower()} contradicts "
                f"{prefix}.conditioning = {self.conditioning}: class_conditional is the older spelling "
                f"of conditioning (true == class, false == none); remove {prefix}.class_conditional "
                f"(or set it to null)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"{prefix}.caption_dropout = {self.caption_dropout}: must be in [0, 1)")
        if not 0 <= self.first_frame_conditioning <= 1:
            raise ConfigError(f"{prefix}.first_frame_conditioning = {self.first_frame_conditioning}: "
                              "a probability, must be in [0, 1] (0 = off)")
        _positive(self, prefix, "condition_frames")
        self.lora.validate(prefix + ".lora")
        if self.pretrained is not None and not str(self.pretrained).strip():
            raise ConfigError(f"{prefix}.pretrained is empty: give a diffusers pipeline or transformer folder, "
                              "or null (the repo's DiT from random weights)")
        if self.pretrained is not None:
            return  # patch_t is the pretrained model's (models/backbones.py checks condition_frames)
        if self.first_frame_conditioning > 0 and self.condition_frames % r.patch_t:
            raise ConfigError(f"{prefix}.condition_frames = {self.condition_frames} is not a multiple of "
                              f"{prefix}.patch_t = {r.patch_t}: a temporal patch has one timestep, so "
                              "condition whole patches")


# Which diffusers samplers can serve each objective (`sampler:` of validation, predict and
# evaluate). `euler` is EulerDiscrete for v and FlowMatchEulerDiscrete for flow; `dpm++` is
# DPM-Solver++ with the VP sigmas or with flow sigmas; `unipc` (flow sigmas) is offered for
# flow only; ddim / ddpm step a VP schedule that flow matching does not have. `auto` (the
# default) is `default_sampler(objective)`, resolved where the objective is known: the training
# config's diffusion.objective, or the one a checkpoint records (predict, evaluate).
SamplerName = Literal["auto", "ddim", "dpm++", "euler", "ddpm", "unipc"]
AUTO_SAMPLER = "auto"
SAMPLERS_BY_OBJECTIVE = {"v_prediction": ("ddim", "dpm++", "euler", "ddpm"),
                         "flow_matching": ("euler", "dpm++", "unipc")}


def default_sampler(objective: str) -> str:
    """What `sampler: auto` samples a model of `objective` with.

    v_prediction -> ddpm: the sampler every shipped config named before `auto` existed (chosen
    for the demo: the stochastic sampler left fewer stray blobs), so `auto` leaves the demo's
    validation, predict and evaluate numbers as they were, and the benchmarks' (the time-to-quality
    runs of docs/benchmarks.md sample v with ddpm, flow with euler).
    flow_matching -> euler (FlowMatchEulerDiscrete, as diffusers' SD3 / LTX pipelines): it hands
    the DiT the float time s * T it trained on (unipc and dpm++ round it down to an integer)."""
    return {"v_prediction": "ddpm", "flow_matching": "euler"}[objective]


def resolve_sampler(sampler: str, objective: str, key: str = "sampler", whose: str = "") -> str:
    """The concrete sampler for `objective`: `auto` -> `default_sampler(objective)`; any other
    name is returned when it can serve the objective, else refused naming those that can."""
    if sampler == AUTO_SAMPLER:
        return default_sampler(objective)
    check_sampler(sampler, objective, key, whose)
    return sampler


# The schedule keys a pretrained DiT fixes (models/backbones.py reads them from its folder's
# scheduler config): null in a config means "the pretrained model's, else the default here".
SCHEDULE_DEFAULTS: dict[str, Any] = dict(
    objective="v_prediction", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
    beta_start=0.0001, beta_end=0.02, rescale_betas_zero_snr=True, snr_shift_scale=1.0,
    timestep_spacing="trailing", flow_shift=1.0, flow_shift_dynamic=False)


@dataclass
class DiffusionConfig:
    """Training objective and schedule; predict and validation rebuild diffusers schedulers from it.

    `objective: v_prediction` uses the VP schedule keys (num_train_timesteps, beta_*,
    rescale_betas_zero_snr, snr_shift_scale, min_snr_gamma). `flow_matching` ignores those
    (its schedule is x_t = (1 - s) x0 + s eps, s in [0, 1]; the model sees t = s *
    num_train_timesteps) and uses the flow_* keys and loss_weighting instead.

    The schedule keys (SCHEDULE_DEFAULTS) default to null: with `model.pretrained` they are the
    pretrained model's own (its folder's scheduler config; a value that contradicts it is
    refused), otherwise the defaults of SCHEDULE_DEFAULTS. `resolved()` fills them in; a
    checkpoint records the resolved values.
    """
    objective: Optional[Literal["v_prediction", "flow_matching"]] = None  # null: v_prediction, or the pretrained model's
    num_train_timesteps: Optional[int] = None  # null: 1000, or the pretrained model's
    beta_schedule: Optional[Literal["linear", "scaled_linear", "squaredcos_cap_v2"]] = None  # null: squaredcos_cap_v2
    beta_start: Optional[float] = None  # null: 0.0001
    beta_end: Optional[float] = None  # null: 0.02
    rescale_betas_zero_snr: Optional[bool] = None  # null: true (zero terminal SNR, Lin et al. 2023)
    # CogVideoX's SNR shift: alpha_bar / (k + (1 - k) alpha_bar), i.e. SNR / k, before the
    # zero-SNR rescale (k = 3 for CogVideoX-2b); null: 1 (none)
    snr_shift_scale: Optional[float] = None
    # which timesteps the v samplers visit: trailing starts at T-1 (zero SNR); null: trailing
    timestep_spacing: Optional[Literal["trailing", "leading", "linspace"]] = None
    # min-SNR-gamma weighting (v only); null = plain v MSE. With zero-terminal SNR it gives ~0
    # weight to the high-noise steps every sampler starts from, so it is off by default.
    min_snr_gamma: Optional[float] = None
    # Which timesteps training draws: uniform, logit_normal (t / T = sigmoid(N(mean, std))), or
    # mode (SD3's heavy-middle density, curvature mode_scale), as diffusers' training utilities.
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0  # > 0 trains the noisy end more often
    logit_std: float = 1.0  # timestep_sampling logit_normal: the normal's std
    mode_scale: float = 1.29  # timestep_sampling: mode; in [-1, 2 / (pi - 2)]
    # Flow matching only. Shift of the noise level, s' = shift s / (1 + (shift - 1) s), in
    # training and sampling alike; > 1 spends more steps at high noise (SD3: 3.0, Wan: 3-5).
    # null: 1 (no shift), or the pretrained model's
    flow_shift: Optional[float] = None
    # Flow matching only: a shift that grows with the latent size instead of flow_shift:
    # mu linear in the sequence length, counted as latent positions (latent frames x height x
    # width, before patching, as LTX-Video; Flux / SD3 count 2x2-patched tokens, 4x fewer), from
    # flow_base_shift at flow_base_seq_len to flow_max_shift at flow_max_seq_len (extrapolated
    # outside), then s' = e^mu / (e^mu + 1/s - 1) (diffusers' use_dynamic_shifting). null: false
    flow_shift_dynamic: Optional[bool] = None
    flow_base_shift: float = 0.5  # dynamic shift: mu at flow_base_seq_len
    flow_max_shift: float = 1.15  # dynamic shift: mu at flow_max_seq_len
    flow_base_seq_len: int = 256  # latent positions T * h * w
    flow_max_seq_len: int = 4096  # latent positions T * h * w
    # Flow matching only: weight on the velocity MSE, named as diffusers'
    # compute_loss_weighting_for_sd3: none, sigma_sqrt (1 / s^2), cosmap (2 / (pi (1 - 2s + 2s^2))).
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"

    def unset(self) -> list[str]:
        """The schedule keys left null (to be taken from a pretrained model or the defaults)."""
        return [k for k in SCHEDULE_DEFAULTS if getattr(self, k) is None]

    def resolved(self, values: Optional[dict] = None) -> "DiffusionConfig":
        """Copy with every null schedule key taken from `values` (a pretrained model's schedule),
        else from SCHEDULE_DEFAULTS; `self` itself when none is null."""
        missing = self.unset()
        if not missing:
            return self
        source = {**SCHEDULE_DEFAULTS, **(values or {})}
        return dataclasses.replace(self, **{k: source[k] for k in missing})

    def validate(self, prefix: str = "diffusion", rules: bool = True) -> None:
        """Ranges of what is given; with `rules`, the rules between keys on the resolved schedule
        (the defaults for null keys; a pretrained run checks them once its model's schedule is
        in, TrainRunConfig.check_schedule)."""
        given = {k: getattr(self, k) for k in SCHEDULE_DEFAULTS if getattr(self, k) is not None}
        if given.get("num_train_timesteps", 1) < 1:
            raise ConfigError(f"{prefix}.num_train_timesteps = {self.num_train_timesteps}: must be >= 1")
        if "snr_shift_scale" in given and not self.snr_shift_scale > 0:
            raise ConfigError(f"{prefix}.snr_shift_scale = {self.snr_shift_scale}: must be > 0 (1 = no shift)")
        lo, hi = FLOW_SHIFT_RANGE
        if "flow_shift" in given and not lo <= self.flow_shift <= hi:
            raise ConfigError(f"{prefix}.flow_shift = {self.flow_shift:g}: must be between {lo:g} and {hi:g} "
                              "(1 = no shift; SD3 uses 3, Wan 3 to 5): beyond them nearly every training "
                              f"step and sampler step sits at one end of the noise range (at {hi:g} the median "
                              f"training noise level is already {hi / (hi + 1):.2f})")
        for key in ("flow_base_shift", "flow_max_shift"):  # mu = log of the shift
            if abs(getattr(self, key)) > math.log(hi):
                raise ConfigError(f"{prefix}.{key} = {getattr(self, key):g}: must be between {-math.log(hi):.2f} "
                                  f"and {math.log(hi):.2f} (it is the log of the shift, e^mu; Flux uses 0.5 and "
                                  f"1.15): beyond them the shift leaves {prefix}.flow_shift's range [{lo:g}, {hi:g}]")
        if not rules:
            return
        r = self.resolved()
        if not 0 < r.beta_start < r.beta_end < 1:
            raise ConfigError(f"{prefix}.beta_start / beta_end = {r.beta_start} / {r.beta_end}: "
                              "need 0 < beta_start < beta_end < 1")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"{prefix}.min_snr_gamma = {self.min_snr_gamma}: must be > 0 or null")
        if self.logit_std <= 0:
            raise ConfigError(f"{prefix}.logit_std = {self.logit_std}: must be > 0")
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ConfigError(f"{prefix}.mode_scale = {self.mode_scale}: must be in [-1, 1.75] "
                              "(outside it the mode density is not a density on [0, 1])")
        if not 0 < self.flow_base_seq_len < self.flow_max_seq_len:
            raise ConfigError(f"{prefix}.flow_base_seq_len / flow_max_seq_len = {self.flow_base_seq_len} / "
                              f"{self.flow_max_seq_len}: need 0 < flow_base_seq_len < flow_max_seq_len")
        if r.objective == "flow_matching":
            if self.min_snr_gamma is not None:
                raise ConfigError(f"{prefix}.min_snr_gamma = {self.min_snr_gamma} is a v_prediction weighting; "
                                  f"with {prefix}.objective = flow_matching use {prefix}.loss_weighting "
                                  "(none, sigma_sqrt, cosmap) and set min_snr_gamma to null")
            if r.flow_shift_dynamic and r.flow_shift != 1.0:
                raise ConfigError(f"{prefix}.flow_shift = {r.flow_shift} with {prefix}.flow_shift_dynamic "
                                  "= true: the dynamic shift replaces the fixed one; set one of them")
            if r.snr_shift_scale != 1.0:
                raise ConfigError(f"{prefix}.snr_shift_scale = {r.snr_shift_scale} applies to v_prediction "
                                  f"only, but {prefix}.objective = flow_matching: remove it")
            return
        flow_only = {"flow_shift": 1.0, "flow_shift_dynamic": False, "loss_weighting": "none"}
        for key, neutral in flow_only.items():
            if getattr(r, key) != neutral:
                raise ConfigError(f"{prefix}.{key} = {getattr(r, key)!r} applies to flow matching only, "
                                  f"but {prefix}.objective = v_prediction: set {prefix}.objective="
                                  f"flow_matching, or remove {prefix}.{key}")


def check_sampler(sampler: str, objective: str, key: str = "sampler", whose: str = "") -> None:
    """Refuse a sampler that cannot serve `objective`, naming the ones that can (`auto` serves
    every objective: it becomes `default_sampler(objective)`)."""
    usable = SAMPLERS_BY_OBJECTIVE[objective]
    if sampler != AUTO_SAMPLER and sampler not in usable:
        raise ConfigError(f"{key} = {sampler!r} cannot sample {whose or 'a model trained with'} "
                          f"diffusion.objective = {objective}; use one of {', '.join(usable)} "
                          f"(or {AUTO_SAMPLER}: {default_sampler(objective)})")

# Predict's `fps`: from a frame every 10 s to one per GIF tick (1/100 s; above it two GIF frames
# would share a timestamp); values outside are typing slips (0.0001, 1e7), not frame rates.
PREDICT_FPS_RANGE = (0.1, 100.0)


def check_num_steps(num_steps: int, num_train_timesteps: int, key: str) -> None:
    """A sampler cannot take more steps than the schedule has timesteps."""
    if num_steps > num_train_timesteps:
        raise ConfigError(f"{key} = {num_steps} is more than diffusion.num_train_timesteps = "
                          f"{num_train_timesteps} (the schedule has no more timesteps to visit); "
                          f"use at most {num_train_timesteps}")


def _check_resolution(res: Union[int, list[int]], key: str) -> None:
    """A side >= 1, or [height, width] with both >= 1; the message names the side."""
    if not isinstance(res, (list, tuple)):
        if res < 1:
            raise ConfigError(f"{key} = {res}: must be >= 1")
        if res > MAX_RESOLUTION:
            raise ConfigError(f"{key} = {res}: at most {MAX_RESOLUTION} pixels per side (frames are "
                              "resized to it in memory); training resolutions are typically 64-1024")
        return
    if len(res) != 2:
        raise ConfigError(f"{key} = {res}: give one side in pixels (a square, e.g. 32) or "
                          "[height, width] (e.g. [32, 64])")
    for side, v in zip(("height", "width"), res):
        if v < 1:
            raise ConfigError(f"{key} = {res}: {side} {v} must be >= 1")
        if v > MAX_RESOLUTION:
            raise ConfigError(f"{key} = {res}: {side} {v} is more than {MAX_RESOLUTION} pixels (frames "
                              "are resized to it in memory); training resolutions are typically 64-1024")


def check_resolution_multiple(data: DataConfig, multiple: int, what: str) -> None:
    """ConfigError unless `multiple` (described by `what`) divides both sides of
    data.resolution; the message names the side that is wrong and the nearest valid values."""
    check_size_multiple(data.height, data.width, multiple, what, "data.resolution", data.resolution)


def check_size_multiple(height: int, width: int, multiple: int, what: str, key: str, value: Any,
                        error: type = ConfigError, note: str = "") -> None:
    """`error` unless `multiple` (described by `what`) divides both sides of the size `key` =
    `value` (pixels); the message names the side that is wrong, the nearest valid values and
    ends with `note`."""
    for side, v in (("height", height), ("width", width)):
        if v % multiple:
            near = " or ".join(str(m) for m in (v // multiple * multiple, (v // multiple + 1) * multiple)
                               if m > 0)
            where = f"{key} = {value}" if height == width else f"{key} = {value}: {side} {v}"
            raise error(f"{where} is not divisible by {what}; pick a multiple of {multiple} ({near}){note}")


def _check_optimiser(tcfg: Any, prefix: str) -> None:
    """The keys both stages' optimisers share (one copy, so the stages cannot drift apart)."""
    if not 0 <= tcfg.min_lr_ratio <= 1:
        raise ConfigError(f"{prefix}.min_lr_ratio = {tcfg.min_lr_ratio}: must be in [0, 1]")
    if tcfg.grad_clip is not None and tcfg.grad_clip <= 0:  # 0 zeroes every update, < 0 flips it
        raise ConfigError(f"{prefix}.grad_clip = {tcfg.grad_clip}: must be > 0 (the largest gradient "
                          "norm) or null (no clipping)")
    if tcfg.weight_decay < 0:
        raise ConfigError(f"{prefix}.weight_decay = {tcfg.weight_decay}: must be >= 0")


def check_seed(seed: int, key: str, videos: int = 1, top: int = MAX_SEED) -> None:
    """A seed torch, numpy and python all take: 0 <= seed, and seed + i of each of `videos`
    videos (video i uses seed + i) at most `top` (64 bits)."""
    top -= videos - 1
    if not 0 <= seed <= top:
        each = f" (video i uses {key} + i, for {videos} videos)" if videos > 1 else ""
        raise ConfigError(f"{key} = {seed}: must be between 0 and {top}{each}; seeds are 64-bit")


def _positive(obj: Any, prefix: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 1:
            key = f"{prefix}.{n}" if prefix else n
            raise ConfigError(f"{key} = {v}: must be >= 1")


def _check_device(device: str) -> None:
    ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit())
    if not ok:
        raise ConfigError(f"device = {device!r}: {DEVICE_HELP}")


# Keys of the original script that trained the VAE together with the DiT. Such a config is
# refused: a VAE that moves under the DiT gives scrambled "jigsaw" samples.
LEGACY_VAE_LOSS_KEYS = ("vae_loss_weight", "kl_loss_weight")
# Fields that hold a file or folder path: a leading `~` is expanded to the home directory.
PATH_FIELDS = frozenset({"path", "runs_dir", "resume", "checkpoint", "output_dir", "output",
                         "detector_path", "index_cache", "pretrained"})


def config_from_dict(cls: type, raw: dict) -> Any:
    """Rebuild a config stored in a checkpoint (already resolved; still type-checked)."""
    return config_loader.config_from_dict(cls, raw, PATH_FIELDS)


def _refuse_vae_training(raw: dict, prefix: str) -> None:
    for key in list(raw):
        full = f"{prefix}{key}"
        value = raw[key]
        if isinstance(value, dict):
            _refuse_vae_training(value, full + ".")
        elif key in LEGACY_VAE_LOSS_KEYS:
            if isinstance(value, (int, float)) and value > 0:
                raise ConfigError(
                    f"{full} = {value}: this repo never trains the VAE during diffusion training. "
                    "A VAE trained together with the DiT keeps moving its latent space, the DiT learns "
                    "to denoise a space that no longer exists, and samples come out as scrambled "
                    "'jigsaw' patches. Train the VAE first with train_vae.py, point vae.path at it, "
                    "and remove this key.")
            raise ConfigError(f"{full} = {value}: remove this key; the VAE is always frozen in stage 2 "
                              "(train it with train_vae.py)")
