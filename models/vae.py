"""The frozen VAE adapter: the one place that knows a VAE family.

Pixels are (B, 3, T, H, W) in [-1, 1]; latents are (B, C, t, h, w) with h = H / spatial
factor and, for a causal video VAE, t = 1 + (T - 1) / temporal factor (frame rule: T must
be 1 + k * f_t). Per-frame image VAEs (`AutoencoderKL`: SD 1.x/2.x, SDXL, SD3, FLUX and our
stage 1) fold `(b t)` into their batch; video VAEs (`AutoencoderKLWan`, `...CogVideoX`,
`...HunyuanVideo`, `...LTXVideo`) take whole clips. The family is chosen by `_class_name`
in the folder's config.json; its geometry is MEASURED by one probe encode at load and
checked against what the config declares; its normalisation is read from the VAE (config or
buffers), never a literal here, and mirrors the family's diffusers pipeline:

    z_norm = (z - mean) * scaling_factor / std        (mean, std per channel)

  AutoencoderKL         mean = shift_factor (0 if unset), std = 1   (SD, SD3, FLUX)
                        or latents_mean / latents_std when the config has them (SDXL pipeline)
  AutoencoderKLWan      mean, std = config latents_mean / latents_std, scaling_factor = 1
  CogVideoX, Hunyuan    mean = 0, std = 1: z * scaling_factor
  AutoencoderKLLTXVideo mean, std = the model's latents_mean / latents_std buffers

Stage 2, the cache, predict and diagnose only ever see `FrozenVAE`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo,
                       AutoencoderKLLTXVideo, AutoencoderKLWan)
from einops import rearrange
from torch import nn

from models.frozen import FrozenPretrained
from utils.checkpoint import pickle_weights_error
from utils.config import VAEArchConfig, VAERefConfig
from utils.errors import ConfigError, MissingFileError, UserError


# Full-resolution activations as wide as the encoder's first layer alive at once in an encode
# call: the stage-1 AutoencoderKL measured 4.3 (peak RSS growth at 1024 and 2048 pixels a side),
# so 4 keeps `FrozenVAE.encode_bytes` a lower bound.
ENCODE_ACTIVATIONS = 4


def build_autoencoder(cfg: VAEArchConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL: len(block_out_channels) blocks, each but the last halves H and W.

    `init_logvar`: at diffusers' init the posterior std is ~1, as large as the latent means,
    so the decoder first learns to ignore its noisy input and sits on a plateau at the mean
    colour. Starting the log-variance (the bias of `quant_conv`'s second half) at -6, i.e.
    std 0.05, lets the latents carry the image from step 0 (measured on the built-in data:
    +2.8 dB held-out PSNR after 400 steps, +1 dB after 800).
    """
    n = len(cfg.block_out_channels)
    ae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_attention,
        scaling_factor=1.0,  # placeholder until train_vae.py measures it
    )
    if cfg.init_logvar is not None:
        with torch.no_grad():
            ae.quant_conv.bias[cfg.latent_channels:].fill_(cfg.init_logvar)  # (mean | logvar)
    return ae


def vae_fingerprint(ae: nn.Module) -> str:
    """Short sha256 of the weights (names, dtypes, shapes, bytes) and the config (incl. the
    normalisation keys) of a VAE of any family; LTX's latents_mean/std buffers are weights.

    Keys starting with "_" (diffusers version, the path it was loaded from) are left out, so
    the same VAE has the same fingerprint wherever it lives.
    """
    h = hashlib.sha256()
    for name, t in sorted(ae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = {k: v for k, v in dict(ae.config).items() if not k.startswith("_")}
    config.setdefault("shift_factor", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]



# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Geometry:
    """What the probe measured: the VAE's compression, latent channels and frame rule."""
    spatial: int  # pixels per latent pixel, each side
    temporal: int  # 1 = per frame; f_t = a causal video VAE maps 1 + k * f_t frames to 1 + k
    channels: int  # latent channels C
    # Valid clips have 1 + j * frame_step frames. Usually f_t; CogVideoX's decoder only returns
    # 1 + k * f_t frames for an odd number 1 + k of latent frames, so its step is 2 f_t.
    frame_step: int = 1

    def frames_ok(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.frame_step == 0

    def latent_frames(self, num_frames: int) -> int:
        """Pixel frames T -> latent frames t (T for a per-frame VAE, 1 + (T - 1) / f_t)."""
        return 1 + (num_frames - 1) // self.temporal

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal

    def frame_rule(self) -> str:
        return "any number of frames" if self.frame_step == 1 else f"1 + {self.frame_step}k frames"


@dataclass(frozen=True)
class Normalisation:
    """z_norm = (z - mean) * scaling_factor / std, mean and std per latent channel."""
    formula: str  # the family's own formula, as its diffusers pipeline writes it
    scaling_factor: float
    mean: tuple[float, ...]  # (C,)
    std: tuple[float, ...]  # (C,)

    def record(self) -> dict:
        return {"formula": self.formula, "scaling_factor": self.scaling_factor,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Family:
    """How one diffusers VAE class is driven: its layout, declared geometry and normalisation."""
    cls: type
    video: bool  # takes whole clips (B, 3, T, H, W); else frames (N, 3, H, W)
    bf16_on_cuda: bool  # vae.dtype: auto picks bf16 on CUDA
    declared: Callable[[nn.Module], tuple[int, int, int]]  # (spatial, temporal, channels) per config
    normalisation: Callable[[nn.Module], Normalisation]
    refuse: Callable[[dict], Optional[str]] = lambda config: None  # why a config cannot be used


def _cfg(ae: nn.Module, key: str, default=None):
    return getattr(ae.config, key, default)


NORMALISATION_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_channels")


def _numbers(value) -> bool:
    """None, a number, or a list of numbers (what the normalisation keys may hold)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


def _scale_only(ae: nn.Module) -> Normalisation:
    """CogVideoX / HunyuanVideo pipelines: latents * scaling_factor."""
    c = int(_cfg(ae, "latent_channels"))
    return Normalisation("z * scaling_factor", float(_cfg(ae, "scaling_factor")), (0.0,) * c, (1.0,) * c)


def _kl_normalisation(ae: nn.Module) -> Normalisation:
    """SD / SD3 / FLUX: (z - shift_factor) * scaling_factor; SDXL-style per-channel stats if given."""
    c, scale = int(_cfg(ae, "latent_channels")), float(_cfg(ae, "scaling_factor"))
    mean, std = _cfg(ae, "latents_mean"), _cfg(ae, "latents_std")
    if mean is not None and std is not None:
        return Normalisation("(z - latents_mean) * scaling_factor / latents_std", scale,
                             tuple(map(float, mean)), tuple(map(float, std)))
    shift = _cfg(ae, "shift_factor")
    if shift is None:
        return Normalisation("z * scaling_factor", scale, (0.0,) * c, (1.0,) * c)
    return Normalisation("(z - shift_factor) * scaling_factor", scale, (float(shift),) * c, (1.0,) * c)


def _wan_declared(ae: nn.Module) -> tuple[int, int, int]:
    spatial = _cfg(ae, "scale_factor_spatial") or \
        2 ** (len(_cfg(ae, "dim_mult")) - 1) * (_cfg(ae, "patch_size") or 1)
    temporal = _cfg(ae, "scale_factor_temporal") or 2 ** sum(_cfg(ae, "temperal_downsample"))
    return int(spatial), int(temporal), int(_cfg(ae, "z_dim"))


def _wan_normalisation(ae: nn.Module) -> Normalisation:
    """Wan pipeline: (z - latents_mean) / latents_std (no scaling_factor)."""
    return Normalisation("(z - latents_mean) / latents_std", 1.0,
                         tuple(map(float, _cfg(ae, "latents_mean"))), tuple(map(float, _cfg(ae, "latents_std"))))


def _ltx_normalisation(ae: nn.Module) -> Normalisation:
    """LTX pipeline `_normalize_latents`: (z - latents_mean) * scaling_factor / latents_std, buffers."""
    return Normalisation("(z - latents_mean) * scaling_factor / latents_std", float(_cfg(ae, "scaling_factor")),
                         tuple(ae.latents_mean.float().tolist()), tuple(ae.latents_std.float().tolist()))


def _ltx_refuse(config: dict) -> Optional[str]:
    if config.get("timestep_conditioning"):
        return ("timestep_conditioning is true (LTX-Video 0.9.1 and later): its decoder needs a decode "
                "timestep and noise scale that this repo does not model; use an LTX-Video 0.9.0 VAE "
                "(timestep_conditioning: false)")
    return None


FAMILIES: dict[str, Family] = {
    "AutoencoderKL": Family(
        AutoencoderKL, video=False, bf16_on_cuda=False,  # SD VAEs: fp32 (force_upcast), as before
        declared=lambda ae: (2 ** (len(_cfg(ae, "block_out_channels")) - 1), 1, int(_cfg(ae, "latent_channels"))),
        normalisation=_kl_normalisation),
    "AutoencoderKLWan": Family(
        AutoencoderKLWan, video=True, bf16_on_cuda=True, declared=_wan_declared,
        normalisation=_wan_normalisation),
    "AutoencoderKLCogVideoX": Family(
        AutoencoderKLCogVideoX, video=True, bf16_on_cuda=True,
        declared=lambda ae: (2 ** (len(_cfg(ae, "block_out_channels")) - 1),
                             int(_cfg(ae, "temporal_compression_ratio")), int(_cfg(ae, "latent_channels"))),
        normalisation=_scale_only),
    "AutoencoderKLHunyuanVideo": Family(
        AutoencoderKLHunyuanVideo, video=True, bf16_on_cuda=True,
        declared=lambda ae: (int(_cfg(ae, "spatial_compression_ratio")),
                             int(_cfg(ae, "temporal_compression_ratio")), int(_cfg(ae, "latent_channels"))),
        normalisation=_scale_only),
    "AutoencoderKLLTXVideo": Family(
        AutoencoderKLLTXVideo, video=True, bf16_on_cuda=True,
        declared=lambda ae: (int(ae.spatial_compression_ratio), int(ae.temporal_compression_ratio),
                             int(_cfg(ae, "latent_channels"))),
        normalisation=_ltx_normalisation, refuse=_ltx_refuse),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_vae_dtype(name: str, class_name: str, device: torch.device | str) -> torch.dtype:
    """`vae.dtype`: auto = fp32 on CPU (bf16 is ~100x slower there), bf16 on CUDA where the family runs in it."""
    if name != "auto":
        return DTYPES[name]
    on_cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_cuda and FAMILIES[class_name].bf16_on_cuda else torch.float32


def resolve_vae_dir(path: str, subfolder: Optional[str] = None) -> tuple[str, str]:
    """`vae.path` (a VAE folder, or a pipeline folder with vae/) -> (VAE folder, how it was found)."""
    if os.path.isfile(path):
        raise UserError(f"vae.path = {path} is a file, not a directory: point it at the folder "
                        "that holds the VAE's config.json and weights (or at a pipeline folder)")
    if not os.path.isdir(path):
        raise MissingFileError(f"VAE directory not found: {path}. Train one with "
                               "`python train_vae.py --config config_vae.yaml` (it writes "
                               "<run>/vae) or fix vae.path")
    if subfolder:
        folder = os.path.join(path, subfolder)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise MissingFileError(f"vae.subfolder = {subfolder!r}: {folder} has no config.json; "
                                   f"name the subfolder of {path} that holds the VAE (e.g. vae)")
        return folder, f"subfolder {subfolder}/ of {path} (vae.subfolder)"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        folder = os.path.join(path, "vae")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise MissingFileError(f"vae.path = {path} is a diffusers pipeline folder (model_index.json) "
                                   "without a vae/ subfolder holding config.json; set vae.subfolder to the "
                                   "subfolder that holds its VAE, or point vae.path at a VAE folder")
        return folder, f"the vae/ subfolder of pipeline folder {path}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"VAE directory {path} has no config.json: it is not a diffusers "
                               "VAE directory. Point vae.path at one (e.g. the vae/ folder written "
                               "by train_vae.py, or a pipeline folder with model_index.json and vae/)")
    return path, path


def _corrupt(path: str, e: Exception, cls: Optional[type] = None) -> UserError:
    """The VAE folder did not load: name the config.json key at fault when one can be found
    (an edited config.json), else call the folder corrupt or incomplete. Pickle weights are
    named as refused (never passing on torch's advice to turn weights_only off)."""
    unsafe = pickle_weights_error(path, e, "the VAE", "vae.path")
    if unsafe is not None:
        return unsafe
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    found = _config_key_at_fault(path, cls) if cls is not None else None
    if found:
        return UserError(f"could not load the VAE in {path} ({type(e).__name__}: {first}): {found}. "
                         "Restore that key (the config.json that came with the weights), or fix vae.path")
    return UserError(f"could not load the VAE in {path} ({type(e).__name__}: {first}). The "
                     "directory is corrupt or incomplete: re-run train_vae.py or fix vae.path")


CONFIG_SEARCH_VALUES = (1, 2, 3, 4)  # small counts (layers, blocks) tried besides the weights' sizes


def _config_key_at_fault(folder: str, cls: type) -> Optional[str]:
    """Which one key of folder/config.json keeps it from building `cls`, or from describing the
    weights file; None when no single key explains it. Models are built on the meta device (no
    memory, no weights): first with each key left to the class default (a value that cannot
    build), then with each number (or list element) set to each size found in the weights."""
    import diffusers
    from safetensors import safe_open
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with safe_open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "pt") as f:
            want = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # no config or weights to compare: nothing to say about a key
        return None
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        builds = _meta_shapes(cls, config) is not None
        sizes = sorted({d for shape in want.values() for d in shape} | set(CONFIG_SEARCH_VALUES))
        for key in (k for k in config if not k.startswith("_")):
            for trial in _variants(config, key, sizes):
                shapes = _meta_shapes(cls, {k: v for k, v in trial.items() if v is not _UNSET})
                if not builds and shapes is not None:
                    return f"config.json key {key!r} = {config[key]!r} is not a valid value for {cls.__name__}"
                if builds and shapes == want:
                    made = trial[key] if trial[key] is not _UNSET else _default(cls, key)
                    return f"config.json key {key!r} is {config[key]!r} but the weights were made with {made!r}"
        return None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


_UNSET = object()  # a key left out of the config (the class default)


def _variants(config: dict, key: str, sizes: list[int]) -> Iterator[dict]:
    """`config` with `key` left out, then with the number (or each number of the list) at `key`
    set to each of `sizes`."""
    value = config[key]
    yield {**config, key: _UNSET}
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    slots = [None] if is_int(value) else [i for i, v in enumerate(value) if is_int(v)] if isinstance(value, list) else []
    for slot in slots:
        for size in sizes:
            trial = size if slot is None else [*value[:slot], size, *value[slot + 1:]]
            if trial != value:
                yield {**config, key: trial}


def _default(cls: type, key: str):
    """The value `cls` gives `key` when config.json leaves it out."""
    import inspect
    param = inspect.signature(cls.__init__).parameters.get(key)
    return param.default if param is not None else None


def _meta_shapes(cls: type, config: dict) -> Optional[dict]:
    """{parameter: shape} of `cls` built from `config` on the meta device; None if it does not build."""
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception:  # any error: this config does not build the class
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _family_of(folder: str) -> str:
    """The `_class_name` of folder/config.json, refused unless it is a supported VAE."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise _corrupt(folder, e) from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in FAMILIES:
        found = f"_class_name {name!r}" if name else "no _class_name (not a diffusers model)"
        raise UserError(f"{folder}/config.json has {found}: not a VAE this repo supports. Supported "
                        f"classes: {', '.join(FAMILIES)}. Point vae.path at such a VAE folder, or at a "
                        "pipeline folder with a vae/ subfolder")
    why = FAMILIES[name].refuse(config)
    if why:
        raise UserError(f"the {name} in {folder} cannot be used: {why}")
    return name


# ----------------------------------------------------------------------------- the adapter


class FrozenVAE(FrozenPretrained):
    """A diffusers VAE that never trains (models/frozen.py): eval mode, no grads, encode/decode of videos.

    `geometry` is measured at construction (one probe encode) and checked against the config;
    `normalisation` is read from the VAE. Construct with `from_config` / `from_pretrained`.
    """

    held = "ae"

    def __init__(self, ae: nn.Module, path: str = "", encode_batch_frames: int = 64,
                 dtype: Optional[torch.dtype] = None, tiling: bool = False, slicing: bool = False,
                 found: str = ""):
        super().__init__()
        self.class_name = type(ae).__name__
        if self.class_name not in FAMILIES:
            raise UserError(f"{self.class_name} is not a supported VAE class; supported: {', '.join(FAMILIES)}")
        self.family = FAMILIES[self.class_name]
        self.encode_batch_frames = encode_batch_frames  # frames per VAE call (memory bound)
        fingerprint = vae_fingerprint(ae)  # before any dtype cast: the weights as stored
        try:
            self.normalisation = self.family.normalisation(ae)
        except (TypeError, ValueError) as e:  # a config.json value that is not a number
            bad = [k for k in NORMALISATION_KEYS if not _numbers(_cfg(ae, k))]
            raise UserError(f"VAE {path or self.class_name}: config.json key {(bad or ['?'])[0]!r} = "
                            f"{_cfg(ae, (bad or ['scaling_factor'])[0])!r} is not a number ({e}); "
                            "restore the config.json that came with the weights") from None
        self.ae = self.hold(ae, path, found, fingerprint, dtype)  # `found`: how vae.path led here (for the log)
        self.tiling = tiling  # diffusers' spatial tiling: encode memory no longer grows with the frame
        if tiling:
            self.ae.enable_tiling()
        if slicing:
            self.ae.enable_slicing()
        self.geometry = self._probe()
        if not len(self.normalisation.mean) == len(self.normalisation.std) == self.geometry.channels:
            raise UserError(f"VAE {path or self.class_name}: its normalisation has {len(self.normalisation.mean)} "
                            f"means / {len(self.normalisation.std)} stds but {self.geometry.channels} latent "
                            "channels; fix latents_mean / latents_std in its config.json")
        self._stats: dict = {}

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | str = "cpu", encode_batch_frames: int = 64,
                        dtype: str = "auto", tiling: bool = False, slicing: bool = False,
                        subfolder: Optional[str] = None) -> "FrozenVAE":
        folder, found = resolve_vae_dir(path, subfolder)
        name = _family_of(folder)
        cls_ = FAMILIES[name].cls
        try:  # low_cpu_mem_usage=False: no accelerate here
            ae, info = cls_.from_pretrained(folder, low_cpu_mem_usage=False, output_loading_info=True)
        except Exception as e:  # corrupt config/weights surface as many error types
            raise _corrupt(folder, e, cls_) from None
        if info["missing_keys"]:  # diffusers would initialise them at random, with a warning only
            missing = sorted(info["missing_keys"])
            raise _corrupt(folder, RuntimeError(f"config.json asks for {len(missing)} weights the file "
                                                f"lacks ({missing[0]}, ...)"), cls_)
        return cls(ae.to(device), folder, encode_batch_frames, resolve_vae_dtype(dtype, name, device),
                   tiling, slicing, found)

    @classmethod
    def from_config(cls, cfg: VAERefConfig, device: torch.device | str = "cpu",
                    path: Optional[str] = None) -> "FrozenVAE":
        """The VAE `cfg` describes (`path` overrides cfg.path, e.g. a checkpoint's record)."""
        return cls.from_pretrained(path or cfg.path, device, cfg.encode_batch_frames, cfg.dtype,
                                   cfg.tiling, cfg.slicing, cfg.subfolder)

    # ------------------------------------------------------------------------- geometry

    @torch.no_grad()
    def _probe(self) -> Geometry:
        """Encode one tiny clip and measure spatial / temporal factor and channels."""
        spatial, temporal, channels = self.family.declared(self.ae)
        size, frames = 2 * spatial, (1 + 2 * temporal if self.family.video else 1)
        probe = torch.zeros(1, 3, frames, size, size, device=self.device)
        _, c, t, h, w = self._moments(probe)[0].shape  # (1, C, t, h, w)
        measured_s = size // h if h and size % h == 0 and h == w else None
        if self.family.video:
            measured_t = (frames - 1) // (t - 1) if t > 1 and (frames - 1) % (t - 1) == 0 else None
        else:
            measured_t = 1 if t == frames else None
        if (measured_s, measured_t, c) != (spatial, temporal, channels):
            raise UserError(
                f"VAE {self._path or self.class_name} ({self.class_name}): its config declares "
                f"{spatial}x spatial and {temporal}x temporal compression with {channels} latent "
                f"channels, but a probe encode of {frames} frame(s) of {size}x{size} pixels gave "
                f"latents (C, t, h, w) = {(c, t, h, w)}. The config does not describe these "
                "weights: use the config.json that came with them")
        step = self._probe_frame_step(c, temporal, size // spatial) if self.family.video else 1
        return Geometry(spatial, temporal, channels, step)

    def _probe_frame_step(self, channels: int, temporal: int, side: int) -> int:
        """Decode 2, then 3 latent frames: the smallest latent step whose decode has 1 + k f_t frames."""
        for latent_step in (1, 2):
            z = torch.zeros(1, channels, 1 + latent_step, side, side, device=self.device, dtype=self.dtype)
            frames = self.ae.decode(z).sample.shape[2]  # (1, 3, T, H, W)
            if frames == 1 + latent_step * temporal:
                return latent_step * temporal
        raise UserError(f"VAE {self._path} ({self.class_name}): decoding 3 latent frames gave {frames} "
                        f"frames, not {1 + 2 * temporal}: its decoder does not invert its "
                        f"{temporal}x temporal compression; this VAE cannot be used")

    def check_num_frames(self, num_frames: int, key: str = "data.num_frames") -> None:
        """A ConfigError naming `key`, the frame rule and the nearest valid values."""
        g = self.geometry
        if g.frames_ok(num_frames):
            return
        lo = 1 + (max(num_frames, 1) - 1) // g.frame_step * g.frame_step
        nearest = " or ".join(str(v) for v in (lo, lo + g.frame_step) if v > 1)
        raise ConfigError(
            f"{key} = {num_frames} does not fit the VAE {self._path} ({self.class_name}): it compresses "
            f"time {g.temporal}x causally, so a clip must have {g.frame_rule()} (1, {1 + g.frame_step}, "
            f"{1 + 2 * g.frame_step}, ...), giving 1 + (T - 1) / {g.temporal} latent frames. Use {nearest}")

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of a clip of `num_frames` frames of height x width pixels."""
        self.check_num_frames(num_frames)
        s = self.geometry.spatial
        for key, v in (("height", height), ("width", width)):
            if v % s:
                raise ConfigError(f"data.resolution: {key} {v} is not divisible by the VAE's spatial "
                                  f"factor {s}; use a multiple of {s}")
        return (self.geometry.channels, self.geometry.latent_frames(num_frames), height // s, width // s)

    @property
    def scaling_factor(self) -> float:
        return self.normalisation.scaling_factor

    @property
    def shift_factor(self) -> float:
        shift = getattr(self.ae.config, "shift_factor", None)
        return 0.0 if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return self.geometry.channels

    @property
    def downsample_factor(self) -> int:
        """Spatial factor (measured): pixels per latent pixel on each side."""
        return self.geometry.spatial

    @property
    def temporal_factor(self) -> int:
        return self.geometry.temporal

    def describe(self) -> dict:
        """Class, measured geometry and normalisation: recorded in checkpoints and cache manifests."""
        g = self.geometry
        return {"class_name": self.class_name, "spatial_factor": g.spatial, "temporal_factor": g.temporal,
                "latent_channels": g.channels, "frame_step": g.frame_step, "frame_rule": g.frame_rule(),
                "normalisation": self.normalisation.record(), "dtype": self.dtype_name}

    def summary(self) -> str:
        g, n = self.geometry, self.normalisation
        return (f"{self.class_name} from {self.found}: fingerprint {self.fingerprint}, {g.spatial}x spatial, "
                f"{g.temporal}x temporal ({g.frame_rule()}), {g.channels} latent channels, "
                f"normalisation {n.formula} (scaling_factor {n.scaling_factor:.4f}), "
                f"{self.dtype_name} (frozen)")

    # ------------------------------------------------------------------------- normalisation

    def _mean_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std shaped (1, C, 1, ...) to broadcast over x (B, C, ...)."""
        key = (x.device, x.dtype, x.ndim)
        if key not in self._stats:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            self._stats[key] = tuple(torch.tensor(v, device=x.device, dtype=x.dtype).view(shape)
                                     for v in (self.normalisation.mean, self.normalisation.std))
        return self._stats[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C, ...) -> what the DiT sees: (z - mean) * scaling_factor / std."""
        mean, std = self._mean_std(z)
        return (z - mean) * self.normalisation.scaling_factor / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The exact inverse of `normalize`."""
        mean, std = self._mean_std(z)
        return z * std / self.normalisation.scaling_factor + mean

    # ------------------------------------------------------------------------- encode / decode

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, T, H, W) pixels -> (B, C, t, h, w) normalised latents (posterior sample or mean)."""
        mean, std = self.encode_moments(pixels)
        return self.latents_from_moments(mean, std, sample, generator)

    def latents_from_moments(self, mean: torch.Tensor, std: torch.Tensor, sample: bool = True,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Raw posterior (mean, std) -> normalised latents: the one place the normalisation is
        applied on the way in (also used with cached moments, so both paths give the same latents)."""
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise
        return self.normalize(z)

    @torch.no_grad()
    def encode_bytes(self, height: int, width: int, num_frames: int) -> int:
        """Memory one encode call needs at least for clips of `num_frames` frames of height x
        width pixels: ENCODE_ACTIVATIONS float32 activations as wide as the encoder's first
        layer at full resolution, for the fewest frames a call takes (one frame; a video VAE:
        one clip). 0 with tiling, which bounds it by the tile instead."""
        if self.tiling:
            return 0
        conv = next((m for m in self.ae.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
        channels = conv.out_channels if conv is not None else 3
        frames = num_frames if self.family.video else 1
        return ENCODE_ACTIVATIONS * frames * height * width * channels * 4

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) -> raw posterior (mean, std), each (B, C, t, h, w) float32."""
        self.check_num_frames(pixels.shape[2], key="frames per clip")
        return self._moments(pixels)

    def _moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.family.video:  # whole clips, as many per call as encode_batch_frames allows
            chunks = pixels.split(max(1, self.encode_batch_frames // pixels.shape[2]))
        else:
            chunks = rearrange(pixels, "b c t h w -> (b t) c h w").split(self.encode_batch_frames)
        means, stds = [], []
        for chunk in chunks:
            post = self.ae.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(post.mean.float())  # (n, C, t, h, w) or (n, C, h, w)
            stds.append(post.std.float())
        if self.family.video:
            return torch.cat(means), torch.cat(stds)
        to_video = lambda x: rearrange(torch.cat(x), "(b t) c h w -> b c t h w", b=pixels.shape[0])
        return to_video(means), to_video(stds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, t, h, w) normalised latents -> (B, 3, T, H, W) pixels clamped to [-1, 1]."""
        z = self.denormalize(latents)
        if self.family.video:
            per_call = max(1, self.encode_batch_frames // self.geometry.pixel_frames(z.shape[2]))
            clips = [self.ae.decode(chunk.to(self.device, self.dtype)).sample.float()
                     for chunk in z.split(per_call)]  # (n, 3, T, H, W) each
            return torch.cat(clips).clamp(-1, 1)
        b = latents.shape[0]
        z = rearrange(z, "b c t h w -> (b t) c h w")
        frames = [self.ae.decode(chunk.to(self.device, self.dtype)).sample.float()
                  for chunk in z.split(self.encode_batch_frames)]  # (n, 3, H, W) each
        pixels = rearrange(torch.cat(frames), "(b t) c h w -> b c t h w", b=b)
        return pixels.clamp(-1, 1)


@dataclass
class VAELoss:
    """Stage-1 objective on frames: l1 * L1 + mse * MSE + kl * KL(q(z|x) || N(0, I)).

    KL is summed over a frame's latent elements and averaged over frames (the usual
    AutoencoderKL convention, which is what makes a weight like 1e-6 meaningful).
    """
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6

    def __call__(self, ae: AutoencoderKL, frames: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        """`frames`: (N, 3, H, W) in [-1, 1] -> (loss, {"recon": (N, 3, H, W), parts...})."""
        post = ae.encode(frames).latent_dist
        recon = ae.decode(post.sample(generator)).sample  # (N, 3, H, W)
        l1 = (recon - frames).abs().mean()
        mse = (recon - frames).pow(2).mean()
        kl = post.kl().mean()
        loss = self.l1_weight * l1 + self.mse_weight * mse + self.kl_weight * kl
        return loss, {"recon": recon, "l1": l1, "mse": mse, "kl": kl}
