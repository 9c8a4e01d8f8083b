"""Tiny random-initialised VAEs of every supported family, written with `save_pretrained`.

No downloads: each is built at test time from its diffusers class with 8-16 channels and one
layer per block, so a test runs in seconds on CPU. `write_families(root)` writes one folder
per family (and a pipeline folder: model_index.json + vae/) and returns {name: path}.
EXPECTED gives each one's geometry (spatial factor, temporal factor, channels) and
`pipeline_normalise` mirrors the normalisation of the family's own diffusers pipeline, written
out independently of models/vae.py so a test can compare the two.
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo,
                       AutoencoderKLLTXVideo, AutoencoderKLWan)

# name: (spatial factor, temporal factor, latent channels)
EXPECTED = {
    "sd3": (8, 1, 16),
    "wan": (4, 4, 4),
    "cogvideox": (4, 4, 4),
    "hunyuan": (4, 4, 4),
    "ltx": (8, 4, 8),
}
# a resolution each family's tiny instance handles with 2x2 DiT patches
RESOLUTION = {"sd3": 64, "wan": 16, "cogvideox": 16, "hunyuan": 16, "ltx": 16}
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
LTX_MEAN, LTX_STD = [0.05 * i for i in range(8)], [0.5 + 0.1 * i for i in range(8)]


def build(name: str) -> torch.nn.Module:
    """A tiny random instance of family `name` (seeded: the same weights every time)."""
    torch.manual_seed(0)
    if name == "sd3":  # SD3-style: 4 blocks (8x), 16 channels, shift and scale
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16,
            norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    if name == "wan":
        return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                temperal_downsample=[True, True], latents_mean=WAN_MEAN,
                                latents_std=WAN_STD, scale_factor_spatial=4, scale_factor_temporal=4)
    if name == "cogvideox":
        return AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, scaling_factor=0.9)
    if name == "hunyuan":
        return AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
            layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
            temporal_compression_ratio=4, mid_block_add_attention=False, scaling_factor=0.6)
    if name == "ltx":
        ae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
            down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
            decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
            downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1),
            patch_size=2, patch_size_t=1, scaling_factor=0.8)
        with torch.no_grad():  # per-channel statistics live in buffers for this family
            ae.latents_mean.copy_(torch.tensor(LTX_MEAN))
            ae.latents_std.copy_(torch.tensor(LTX_STD))
        return ae
    raise KeyError(name)


def pipeline_normalise(name: str, z: torch.Tensor, config: dict) -> torch.Tensor:
    """Raw latents (B, C, t, h, w) -> normalised, as each family's diffusers pipeline writes it."""
    view = lambda v: torch.tensor(v, dtype=z.dtype).view(1, -1, 1, 1, 1)
    if name == "sd3":  # pipeline_stable_diffusion_3: (latents - shift_factor) * scaling_factor
        return (z - config["shift_factor"]) * config["scaling_factor"]
    if name == "wan":  # pipeline_wan: (latents - latents_mean) * (1 / latents_std)
        return (z - view(config["latents_mean"])) * (1.0 / view(config["latents_std"]))
    if name in ("cogvideox", "hunyuan"):  # latents * scaling_factor
        return z * config["scaling_factor"]
    if name == "ltx":  # pipeline_ltx._normalize_latents
        return (z - view(LTX_MEAN)) * config["scaling_factor"] / view(LTX_STD)
    raise KeyError(name)


def write_families(root: str) -> dict[str, str]:
    """Every family's tiny instance under root/<name>, and root/pipeline (model_index.json + vae/)."""
    paths = {}
    for name in EXPECTED:
        paths[name] = os.path.join(root, name)
        build(name).save_pretrained(paths[name])
    pipe = os.path.join(root, "pipeline")
    build("wan").save_pretrained(os.path.join(pipe, "vae"))
    with open(os.path.join(pipe, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}, f)
    paths["pipeline"] = pipe
    return paths
