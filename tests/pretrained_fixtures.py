"""Tiny random pretrained video DiTs, written with `save_pretrained` as diffusers pipeline folders.

No downloads: a Wan pipeline (WanTransformer3DModel, a 4-channel AutoencoderKLWan, a UMT5
encoder with its tokenizer, the UniPC flow scheduler Wan's folders ship) and a CogVideoX one
(CogVideoXTransformer3DModel with rotary positions as the 5B, a 4-channel AutoencoderKLCogVideoX,
a T5 encoder, CogVideoXDDIMScheduler with the 2B's SNR shift), each a few thousand parameters,
built from their diffusers / transformers classes at test time. Both take the repo's built-in
clips at 16x16 pixels and 5 frames (2 latent frames of 4x4 latents, 2x2 patches).
`write_pipelines(root)` writes them and returns {"wan": path, "cogvideox": path}.
"""
from __future__ import annotations

import os

import torch
from diffusers import (AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler,
                       CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel,
                       UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)

from tests.text_fixtures import HIDDEN, MAX_LENGTH, build as build_encoder

TRAIN = ["data.num_frames=5", "data.resolution=16"]  # clips both tiny pipelines take
WAN_SHIFT = 3.0
COGVIDEOX_SNR_SHIFT = 3.0


def wan_transformer(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=HIDDEN, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def cogvideox_transformer(seed: int = 0, rotary: bool = True, image_to_video: bool = False,
                          v15: bool = False) -> CogVideoXTransformer3DModel:
    """`image_to_video`: twice the input channels (CogVideoX-5b-I2V); `v15`: CogVideoX 1.5's
    temporal patches of 2, sliced rotary positions and the ofs embedding (1.5-5B-I2V)."""
    torch.manual_seed(seed)
    extra = dict(patch_size_t=2, ofs_embed_dim=8, patch_bias=False) if v15 else {}
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if image_to_video else 4, out_channels=4,
        time_embed_dim=8, text_embed_dim=HIDDEN, num_layers=2, sample_width=4, sample_height=4, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=MAX_LENGTH,
        use_rotary_positional_embeddings=rotary, **extra)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Zero-initialised outputs (diffusers inits some projections at 0) made non-zero, so a
    parity test compares real numbers rather than zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def wan_pipeline(seed: int = 0) -> WanPipeline:
    transformer = wan_transformer(seed)
    _randomise(transformer, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.5, 2.0, 1.0], scale_factor_spatial=4, scale_factor_temporal=4)
    encoder, tokenizer = build_encoder("umt5", seed=seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=WAN_SHIFT, num_train_timesteps=1000)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)


def cogvideox_pipeline(seed: int = 0, rotary: bool = True, image_to_video: bool = False,
                       v15: bool = False) -> CogVideoXPipeline:
    """`image_to_video`: a CogVideoXImageToVideoPipeline; `v15`: as CogVideoX1.5-5B-I2V, whose VAE
    config says invert_scale_latents (the pipeline scales image latents by 1 / scaling_factor)."""
    transformer = cogvideox_transformer(seed, rotary, image_to_video, v15)
    _randomise(transformer, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, scaling_factor=0.9, invert_scale_latents=v15)
    encoder, tokenizer = build_encoder("t5", seed=seed)
    scheduler = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=COGVIDEOX_SNR_SHIFT, timestep_spacing="trailing",
                                       clip_sample=False, set_alpha_to_one=True)
    cls = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    return cls(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def write_pipelines(root: str) -> dict[str, str]:
    out = {}
    for name, make in (("wan", wan_pipeline), ("cogvideox", cogvideox_pipeline)):
        folder = os.path.join(root, name)
        make().save_pretrained(folder)
        out[name] = folder
    return out
