"""Tiny random text encoders of every supported class, written with `save_pretrained`.

No downloads: each model is built at test time from a small transformers config (32-wide,
2 layers), its tokenizer a word-level fast tokenizer over WORDS (models/text_encoder.py
`word_tokenizer`, built with the `tokenizers` library), except UMT5's and the pipeline's T5,
which get a SentencePiece-style Unigram `T5Tokenizer` (the class real T5 / Wan folders name,
built from a vocabulary list: no sentencepiece needed). `write_encoders(root)` writes one
folder per kind and a diffusers-style pipeline folder, and returns {name: path}:

  t5, umt5, clip, clip_projection   an encoder folder with its tokenizer beside the weights
  t5_full                           a T5ForConditionalGeneration folder (read as its encoder)
  pipeline                          model_index.json + text_encoder/ (T5) + tokenizer/
                                    + text_encoder_2/ (CLIP with projection) + tokenizer_2/
  unsupported                       config.json naming BertModel, with a tokenizer
"""
from __future__ import annotations

import json
import os

import torch
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer, UMT5Config,
                          UMT5EncoderModel)

from data.builtin import CAPTION_WORDS
from models.text_encoder import word_tokenizer

WORDS = list(CAPTION_WORDS) + ["the", "with", "zebra", "dog", "running", "beach"]
MAX_LENGTH = 16
CLIP_POSITIONS = 16  # CLIP's learned positions: max_length may not exceed them
PROJECTION = 24  # CLIPTextModelWithProjection's text_embeds width
HIDDEN = 32


def t5_tokenizer(words=WORDS):
    return word_tokenizer(words, MAX_LENGTH)


def unigram_tokenizer(words=WORDS):
    """A T5Tokenizer (Unigram, "▁word" pieces, single letters for unknown words) over `words`."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_LENGTH)


def clip_tokenizer(words=WORDS):
    return word_tokenizer(words, CLIP_POSITIONS, bos="<|startoftext|>", eos="<|endoftext|>")


def build(name: str, words=WORDS, seed: int = 0):
    """(model, tokenizer) of kind `name`, seeded: the same weights every time."""
    torch.manual_seed(seed)
    if name in ("t5", "t5_full", "umt5"):
        tok = unigram_tokenizer(words) if name == "umt5" else t5_tokenizer(words)
        cls, config_cls = {"t5": (T5EncoderModel, T5Config), "t5_full": (T5ForConditionalGeneration, T5Config),
                           "umt5": (UMT5EncoderModel, UMT5Config)}[name]
        config = config_cls(vocab_size=len(tok), d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
                            num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0)
        return cls(config), tok
    tok = clip_tokenizer(words)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=CLIP_POSITIONS,
                            projection_dim=PROJECTION, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cls = CLIPTextModelWithProjection if name == "clip_projection" else CLIPTextModel
    return cls(config), tok


def save(folder: str, model, tokenizer, tokenizer_folder: str = None) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(tokenizer_folder or folder)
    return folder


def write_encoders(root: str) -> dict[str, str]:
    out = {}
    for name in ("t5", "umt5", "clip", "clip_projection", "t5_full"):
        out[name] = save(os.path.join(root, name), *build(name))
    pipe = os.path.join(root, "pipeline")
    t5, _ = build("t5", seed=1)
    t5_tok = unigram_tokenizer()
    t5.resize_token_embeddings(len(t5_tok))
    clip, clip_tok = build("clip_projection", seed=2)
    save(os.path.join(pipe, "text_encoder"), t5, t5_tok, os.path.join(pipe, "tokenizer"))
    save(os.path.join(pipe, "text_encoder_2"), clip, clip_tok, os.path.join(pipe, "tokenizer_2"))
    with open(os.path.join(pipe, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "T5TokenizerFast"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "tokenizer_2": ["transformers", "CLIPTokenizer"]}, f)
    out["pipeline"] = pipe
    bert = os.path.join(root, "unsupported")
    os.makedirs(bert)
    with open(os.path.join(bert, "config.json"), "w") as f:
        json.dump({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32}, f)
    t5_tokenizer().save_pretrained(bert)
    out["unsupported"] = bert
    return out
