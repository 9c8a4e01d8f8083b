"""Write the tiny frozen text encoder of the built-in captions (no download).

    python scripts/make_tiny_text_encoder.py [--out runs/tiny_text_encoder] [--seed 0]

A small random T5EncoderModel (2 layers, 64 wide) with a word-level tokenizer over every word
a built-in caption can use (data.builtin.CAPTION_WORDS) plus the specials, saved with
save_pretrained: point `text_encoder.path` at the folder. The same seed gives the same
weights and fingerprint. Random weights are a legitimate frozen encoder: different words
still map to different vectors, and the DiT learns what they mean. An existing folder is
kept unless --force.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.builtin import CAPTION_WORDS  # noqa: E402
from models.text_encoder import FrozenTextEncoder, make_tiny_text_encoder  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/tiny_text_encoder", help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    parser.add_argument("--force", action="store_true", help="rewrite an existing folder")
    args = parser.parse_args(argv)
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: is a file, not a folder; give a folder path (it is created)")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not args.force:
        print(f"{args.out} exists; kept (--force rewrites it)")
    else:
        make_tiny_text_encoder(args.out, CAPTION_WORDS, seed=args.seed)
    print(FrozenTextEncoder.from_pretrained(args.out).summary())
    return 0


if __name__ == "__main__":
    run_main(main)
