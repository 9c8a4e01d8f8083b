"""Write a tiny random Wan pipeline folder around a VAE and a text encoder you have (no download):
the "pretrained" model of the fine-tuning demo (./demo_finetune.sh), made here so that the demo
runs through the very path a real Wan 2.1 folder takes.

    python scripts/make_tiny_wan.py --vae runs/vae/vae --text-encoder runs/tiny_text_encoder \
        [--out runs/tiny_wan] [--seed 0] [--force]

The folder is what diffusers' WanPipeline.save_pretrained writes: model_index.json,
transformer/ (a WanTransformer3DModel at random: 4 blocks of 4 x 32 heads, 2x2 patches, its
input channels the VAE's latent channels, its text width the encoder's), scheduler/
(UniPC with flow sigmas, as Wan's folders ship, flow shift 1: the built-in clips are 32 pixels),
vae/ and text_encoder/ + tokenizer/ (copies of the given folders). An existing folder is kept
unless --force.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402

SIZE = dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, ffn_dim=512, freq_dim=256)
FLOW_SHIFT = 1.0


def _json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{what}: {path} is missing; give the folder save_pretrained wrote")
    with open(path) as f:
        return json.load(f)


def write(out: str, vae: str, text_encoder: str, seed: int) -> None:
    import torch
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    vae_config = _json(os.path.join(vae, "config.json"), "--vae")
    encoder_config = _json(os.path.join(text_encoder, "config.json"), "--text-encoder")
    channels = int(vae_config.get("latent_channels") or vae_config.get("z_dim"))
    text_dim = int(encoder_config.get("d_model") or encoder_config.get("hidden_size"))
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        torch.manual_seed(seed)
        WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=channels, out_channels=channels, text_dim=text_dim,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
                              **SIZE).save_pretrained(os.path.join(tmp, "transformer"))
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                                num_train_timesteps=1000).save_pretrained(os.path.join(tmp, "scheduler"))
        shutil.copytree(vae, os.path.join(tmp, "vae"))
        shutil.copytree(text_encoder, os.path.join(tmp, "text_encoder"))
        shutil.copytree(text_encoder, os.path.join(tmp, "tokenizer"))
        index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                 "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                 "vae": ["diffusers", vae_config.get("_class_name", "AutoencoderKL")],
                 "text_encoder": ["transformers", (encoder_config.get("architectures") or ["T5EncoderModel"])[0]],
                 "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="a diffusers VAE folder (e.g. runs/vae/vae)")
    parser.add_argument("--text-encoder", required=True, help="a text encoder folder with its tokenizer")
    parser.add_argument("--out", default="runs/tiny_wan", help="the pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    parser.add_argument("--force", action="store_true", help="rewrite an existing folder")
    args = parser.parse_args(argv)
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: is a file, not a folder; give a folder path (it is created)")
    if os.path.isfile(os.path.join(args.out, "model_index.json")) and not args.force:
        print(f"{args.out} exists; kept (--force rewrites it)")
        return 0
    write(args.out, args.vae, args.text_encoder, args.seed)
    print(f"tiny random Wan pipeline in {args.out} (transformer {SIZE}, UniPC flow shift {FLOW_SHIFT:g})")
    return 0


if __name__ == "__main__":
    run_main(main)
