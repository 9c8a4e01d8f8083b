"""The frozen text encoder: the one place that knows a transformers text-encoder class.

`text_encoder.path` is a folder a user already has on disk (nothing is downloaded):
- a transformers encoder folder (config.json + weights) with its tokenizer files beside them;
- a diffusers pipeline folder (model_index.json) with `text_encoder/` and `tokenizer/`
  (`text_encoder.subfolder: text_encoder_2` picks another encoder; its tokenizer is then
  `tokenizer_2/`, the diffusers convention), e.g. a Wan (UMT5) or CogVideoX (T5) pipeline.

The class comes from the folder's own config.json (`architectures`, as the VAE's family comes
from `_class_name`); supported: T5EncoderModel (PixArt, Latte, CogVideoX, LTX, Open-Sora 1.x),
UMT5EncoderModel (Wan), CLIPTextModel and CLIPTextModelWithProjection (SD-family, Latte's
early variant), plus T5ForConditionalGeneration folders, read as their encoder. Tokenizers load
with transformers' AutoTokenizer.

    encode(list[str]) -> tokens (N, L, D), mask (N, L) bool, pooled (N, D') or None

L = max_length for every batch (`text_encoder.max_length`; null = the tokenizer's own
model_max_length, e.g. 77 for CLIP, 226 for CogVideoX, 512 for Wan). Padding is on the right,
never attended by the encoder, and its positions are zero in `tokens` (as Wan's pipeline
does), so a caption's encoding does not depend on its batch companions or on how far the
batch was padded. `pooled` is CLIP's pooled (or projected) text vector; T5 has none.

Frozen like the VAE: eval mode, no grads; `fingerprint` covers the weights (as stored, before
any dtype cast), the config and the tokenizer files, so the same encoder has the same
fingerprint wherever it lives. `describe()` is the record a checkpoint keeps and
`check_text_encoder` refuses another encoder, naming what differs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel, UMT5EncoderModel)
from transformers.utils import logging as hf_logging

from models.frozen import FrozenPretrained
from utils.checkpoint import pickle_weights_error
from utils.config import TextEncoderConfig
from utils.errors import ConfigError, MissingFileError, UserError

DEFAULT_MAX_LENGTH = 120  # tokens, when the tokenizer states no model_max_length (PixArt's, Latte's)
UNSET_MAX_LENGTH = 10 ** 6  # transformers marks "no model_max_length" with a huge number
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # describe()'s dtype -> config name
# Files that make up a tokenizer (fingerprinted); model weights and config are not among them.
TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
# Config keys that do not change what the encoder computes (and change between saves).
VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures")


class TextWarning(UserWarning):
    """Captions cut at text_encoder.max_length."""


class TextEmbeddings(NamedTuple):
    """What `encode` returns (unpacks as a tuple)."""
    tokens: torch.Tensor  # (N, L, D), zero at padding
    mask: torch.Tensor  # (N, L) bool, True at real tokens (a prefix of each row)
    pooled: Optional[torch.Tensor]  # (N, D') or None


@dataclass(frozen=True)
class EncoderKind:
    """How one transformers class is loaded and read."""
    cls: type
    pooled: Optional[str]  # the output field holding a pooled text vector, if the class has one
    positions: Optional[str] = None  # config key bounding the token count (learned positions)


ENCODERS: dict[str, EncoderKind] = {
    "T5EncoderModel": EncoderKind(T5EncoderModel, None),
    "UMT5EncoderModel": EncoderKind(UMT5EncoderModel, None),
    "CLIPTextModel": EncoderKind(CLIPTextModel, "pooler_output", "max_position_embeddings"),
    "CLIPTextModelWithProjection": EncoderKind(CLIPTextModelWithProjection, "text_embeds",
                                               "max_position_embeddings"),
}
ALIASES = {"T5ForConditionalGeneration": "T5EncoderModel"}  # a full T5 folder: its encoder is read


def resolve_text_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`text_encoder.dtype`: auto = fp32 on CPU (bf16 is ~100x slower there), bf16 on CUDA
    (fp16 overflows in T5)."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- the folder


def _tokenizer_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and
                  (n.startswith("tokenizer") or n in TOKENIZER_FILES or n.endswith((".model", ".tiktoken"))))


def resolve_text_encoder_dir(path: str, subfolder: Optional[str] = None) -> tuple[str, str, str]:
    """`text_encoder.path` -> (encoder folder, tokenizer folder, how they were found)."""
    if os.path.isfile(path):
        raise UserError(f"text_encoder.path = {path} is a file, not a directory: point it at the folder "
                        "that holds the encoder's config.json, weights and tokenizer (or at a pipeline folder)")
    if not os.path.isdir(path):
        raise MissingFileError(f"text encoder directory not found: {path}. Fix text_encoder.path (a "
                               "transformers encoder folder with its tokenizer, or a diffusers pipeline "
                               "folder with text_encoder/ and tokenizer/); nothing is downloaded")
    pipeline = os.path.isfile(os.path.join(path, "model_index.json"))
    if subfolder or pipeline:
        name = subfolder or "text_encoder"
        folder = os.path.join(path, name)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            key = f"text_encoder.subfolder = {subfolder!r}" if subfolder else \
                f"text_encoder.path = {path} is a diffusers pipeline folder (model_index.json), but"
            raise MissingFileError(f"{key}: {folder} has no config.json; name the subfolder of {path} "
                                   "that holds the text encoder in text_encoder.subfolder (e.g. text_encoder)")
        tok_name = name.replace("text_encoder", "tokenizer") if "text_encoder" in name else "tokenizer"
        tok = os.path.join(path, tok_name)
        if not _tokenizer_files(tok):
            if not _tokenizer_files(folder):
                raise MissingFileError(f"text_encoder.path = {path}: no tokenizer for {name}/: neither "
                                       f"{tok_name}/ nor {name}/ holds tokenizer files (tokenizer.json, "
                                       "tokenizer_config.json, spiece.model, ...)")
            tok = folder
        return folder, tok, f"{name}/ (tokenizer {os.path.basename(tok)}/) of {path}"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"text encoder directory {path} has no config.json: it is not a transformers "
                               "model folder. Point text_encoder.path at one (saved with save_pretrained, "
                               "tokenizer beside it) or at a pipeline folder with model_index.json")
    if not _tokenizer_files(path):
        raise MissingFileError(f"text encoder directory {path} has no tokenizer files (tokenizer.json, "
                               "tokenizer_config.json, spiece.model, ...): save the tokenizer into the same "
                               "folder (tokenizer.save_pretrained(folder))")
    return path, path, path


def _class_of(folder: str) -> str:
    """The supported encoder class named by folder/config.json `architectures`."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise _corrupt(folder, e) from None
    found = config.get("architectures") if isinstance(config, dict) else None
    names = [ALIASES.get(a, a) for a in found or [] if isinstance(a, str)]
    for name in names:
        if name in ENCODERS:
            return name
    what = f"architectures {found}" if found else "no 'architectures' entry"
    raise UserError(f"{folder}/config.json has {what}: not a text encoder this repo supports. Supported: "
                    f"{', '.join(ENCODERS)} (and {', '.join(ALIASES)}, read as its encoder). Point "
                    "text_encoder.path at such a folder, or at a pipeline folder with a text_encoder/ subfolder")


def _corrupt(folder: str, e: Exception) -> UserError:
    """The folder did not load: pickle weights named as refused (never passing on torch's
    advice to turn weights_only off), else the folder called corrupt or incomplete."""
    unsafe = pickle_weights_error(folder, e, "the text encoder", "text_encoder.path")
    if unsafe is not None:
        return unsafe
    return UserError(f"could not load the text encoder in {folder} ({type(e).__name__}: {e}). The folder "
                     "is corrupt or incomplete: copy it again or fix text_encoder.path")


@contextlib.contextmanager
def _quiet_transformers():
    """No per-load progress bars from transformers (they would interleave with ours)."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- fingerprint


def _sha(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return _sha(h)


def config_fingerprint(model: nn.Module) -> str:
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    return _sha(hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()))


def tokenizer_fingerprint(folder: str) -> str:
    """The tokenizer's files (names and bytes)."""
    h = hashlib.sha256()
    for name in _tokenizer_files(folder):
        h.update(f"{name}|".encode())
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return _sha(h)


def text_encoder_fingerprint(parts: dict) -> str:
    """One short sha256 over the parts' fingerprints (weights, config, tokenizer)."""
    return _sha(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()))


# ----------------------------------------------------------------------------- the adapter


class FrozenTextEncoder(FrozenPretrained):
    """A transformers text encoder and its tokenizer that never train (models/frozen.py).
    Construct with `from_config` / `from_pretrained`."""

    held = "model"

    def __init__(self, model: nn.Module, tokenizer, path: str = "", tokenizer_dir: str = "",
                 max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None, found: str = "",
                 source: tuple[str, Optional[str]] = ("", None), attend_padding: bool = False,
                 default_length: Optional[int] = None):
        """`path`: the encoder's own folder; `source`: (text_encoder.path, text_encoder.subfolder)
        as given, which is what reloads it (a pipeline's text_encoder/ alone lacks its tokenizer).
        `attend_padding`: every caption padded to max_length and encoded with the padding
        attended and kept (CogVideoX's convention), instead of masked and zeroed.
        `default_length`: the tokens per caption when `max_length` is null, instead of the
        tokenizer's own (a DiT family's, e.g. Wan's 512), within the encoder's limit."""
        super().__init__()
        self.attend_padding = attend_padding
        self.source, self.subfolder = source
        self.class_name = type(model).__name__
        if self.class_name not in ENCODERS:
            raise UserError(f"{self.class_name} is not a supported text encoder; supported: {', '.join(ENCODERS)}")
        self.kind = ENCODERS[self.class_name]
        self.parts = {"weights": weights_fingerprint(model), "config": config_fingerprint(model),
                      "tokenizer": tokenizer_fingerprint(tokenizer_dir) if tokenizer_dir else ""}
        self.model = self.hold(model, path, found, text_encoder_fingerprint(self.parts), dtype)  # identity before the cast
        self.tokenizer = self._prepare_tokenizer(tokenizer)
        self.max_length = self._resolve_max_length(max_length, default_length)
        probe = self.encode([""])  # measures the sizes, and that the encoder runs at all
        self.hidden_size = probe.tokens.shape[-1]
        self.pooled_size = None if probe.pooled is None else probe.pooled.shape[-1]

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | str = "cpu", dtype: str = "auto",
                        max_length: Optional[int] = None, subfolder: Optional[str] = None,
                        attend_padding: bool = False, default_length: Optional[int] = None) -> "FrozenTextEncoder":
        folder, tok_dir, found = resolve_text_encoder_dir(path, subfolder)
        name = _class_of(folder)
        with _quiet_transformers():
            try:  # dtype auto: the weights as stored (fingerprinted before the cast to `dtype`)
                model = ENCODERS[name].cls.from_pretrained(folder, dtype="auto", local_files_only=True)
            except Exception as e:  # corrupt config/weights surface as many error types
                raise _corrupt(folder, e) from None
            try:
                tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            except Exception as e:
                raise UserError(f"could not load the tokenizer in {tok_dir} ({type(e).__name__}: {e}). "
                                "Its files are corrupt or incomplete, or need a package not installed "
                                "here: save it with tokenizer.json (a fast tokenizer)") from None
        return cls(model.to(device), tokenizer, folder, tok_dir, max_length, resolve_text_dtype(dtype, device),
                   found, (os.path.abspath(path), subfolder), attend_padding, default_length)

    @classmethod
    def from_record(cls, record: dict, where: str, device: torch.device | str = "cpu", dtype: str = "auto",
                    path: Optional[str] = None, subfolder: Optional[str] = None) -> "FrozenTextEncoder":
        """The encoder a `describe()` record (e.g. the checkpoint `where`'s) names, or the one at
        `path` (a user's override, e.g. the same encoder moved), checked against the record.
        dtype `auto` is the recorded one: a model trained on bf16 embeddings gets bf16 embeddings
        (another dtype, asked for, is said: the embeddings then differ slightly from training's)."""
        if path is None:
            path, subfolder = record.get("source") or record.get("path"), record.get("subfolder")
        recorded = record.get("dtype")
        if dtype == "auto" and recorded in DTYPE_NAMES:
            dtype = DTYPE_NAMES[recorded]
        elif recorded in DTYPE_NAMES and DTYPES.get(dtype) is not None and DTYPE_NAMES[recorded] != dtype:
            warnings.warn(f"text_encoder.dtype = {dtype}, but {where} was trained on {DTYPE_NAMES[recorded]} embeddings: "
                          "the prompts' embeddings differ slightly from the training captions'; set "
                          f"text_encoder.dtype to auto (or {DTYPE_NAMES[recorded]}) to match", TextWarning,
                          stacklevel=2)
        encoder = cls.from_pretrained(path, device, dtype, record.get("max_length"), subfolder,
                                      bool(record.get("attend_padding", False)))
        check_text_encoder(record, encoder, where)
        return encoder

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, device: torch.device | str = "cpu",
                    path: Optional[str] = None, max_length: Optional[int] = None,
                    attend_padding: bool = False, default_length: Optional[int] = None) -> "FrozenTextEncoder":
        """The encoder `cfg` describes; `path` / `max_length` override cfg's (e.g. a checkpoint's
        record, or a pretrained DiT's text length)."""
        if (path or cfg.path) is None:
            raise ConfigError("text_encoder.path is not set: point it at a text-encoder folder with its "
                              "tokenizer, or a pipeline folder with text_encoder/ and tokenizer/")
        return cls.from_pretrained(path or cfg.path, device, cfg.dtype, max_length or cfg.max_length,
                                   cfg.subfolder, attend_padding, default_length)

    def _prepare_tokenizer(self, tokenizer):
        tokenizer.padding_side = "right"  # the mask is then a prefix of each row
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"the tokenizer of {self._path} has neither a pad nor an eos token; "
                                "give it a pad_token (tokenizer.pad_token = ...; save_pretrained)")
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked and zeroed anyway
        return tokenizer

    def _resolve_max_length(self, asked: Optional[int], default: Optional[int] = None) -> int:
        """`asked` (text_encoder.max_length), bounded by the model's own limit (checked before
        any caption is padded to it), or null: `default` (a DiT family's), else the tokenizer's
        length, within the limit."""
        limit, why = self._token_limit()
        if asked is not None:
            if limit is not None and asked > limit:
                raise ConfigError(f"text_encoder.max_length = {asked}: the {self.class_name} in {self._path} "
                                  f"takes at most {limit} tokens ({why}); use at most {limit} (or null)")
            return asked
        own = getattr(self.tokenizer, "model_max_length", None)
        length = own if isinstance(own, int) and 0 < own < UNSET_MAX_LENGTH else DEFAULT_MAX_LENGTH
        length = default if default is not None else length
        return min(length, limit) if limit is not None else length

    def _token_limit(self) -> tuple[Optional[int], str]:
        """(the most tokens the model takes, why), or (None, "") when it states no limit. A class
        with learned positions (CLIP) has as many as its config says; one with relative
        positions (T5, UMT5) was trained to its tokenizer's model_max_length."""
        own = getattr(self.tokenizer, "model_max_length", None)
        stated = own if isinstance(own, int) and 0 < own < UNSET_MAX_LENGTH else None
        if self.kind.positions:
            positions = getattr(self.model.config, self.kind.positions)
            if stated is not None and stated < positions:
                return stated, f"its tokenizer's model_max_length; it has {positions} positions"
            return positions, f"it has {positions} positions"
        if stated is not None:
            return stated, "its tokenizer's model_max_length"
        return None, ""

    # ------------------------------------------------------------------------- encode

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """Captions -> tokens (N, L, D) zero at padding, mask (N, L) bool, pooled (N, D') or None,
        in the encoder's dtype on its device. Captions longer than L tokens are cut (TextWarning)."""
        texts = [str(t) for t in texts]
        L = self.max_length
        if not texts:
            return TextEmbeddings(torch.zeros(0, L, getattr(self, "hidden_size", 0), device=self.device),
                                  torch.zeros(0, L, dtype=torch.bool, device=self.device), None)
        self._warn_truncated(texts)
        if self.attend_padding:  # CogVideoX: L tokens, padding attended and kept, no mask
            ids = self.tokenizer(texts, padding="max_length", max_length=L, truncation=True,
                                 return_tensors="pt")["input_ids"].to(self.device)  # (N, L)
            tokens = self.model(input_ids=ids).last_hidden_state  # (N, L, D)
            mask = torch.ones(ids.shape, dtype=torch.bool, device=self.device)
            pooled = None
            self._check_finite(texts, tokens, pooled)
            return TextEmbeddings(tokens, mask, pooled)
        batch = self.tokenizer(texts, padding="longest", max_length=L, truncation=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (N, n), n <= L
        mask = batch["attention_mask"].to(self.device).bool()  # (N, n)
        empty = ~mask.any(1)
        if empty.any():  # no token at all (a tokenizer without special tokens, an empty caption):
            mask[empty, 0] = True  # one zero token, so attention over the caption stays defined
        out = self.model(input_ids=ids, attention_mask=mask.long())
        tokens = out.last_hidden_state * mask[..., None].to(out.last_hidden_state.dtype)  # (N, n, D)
        tokens[empty] = 0
        tokens = F.pad(tokens, (0, 0, 0, L - tokens.shape[1]))  # (N, L, D)
        mask = F.pad(mask, (0, L - mask.shape[1]))  # (N, L)
        pooled = getattr(out, self.kind.pooled) if self.kind.pooled else None  # (N, D')
        self._check_finite(texts, tokens, pooled)
        return TextEmbeddings(tokens, mask, pooled)

    def _warn_truncated(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        cut = [t for t, n in zip(texts, lengths) if n > self.max_length]
        if cut:
            example = cut[0] if len(cut[0]) <= 80 else cut[0][:77] + "..."
            warnings.warn(f"{len(cut)} caption(s) are longer than text_encoder.max_length = {self.max_length} "
                          f"tokens and were cut (e.g. {example!r}); raise text_encoder.max_length to keep "
                          "more of them", TextWarning, stacklevel=3)

    def _check_finite(self, texts: list[str], tokens: torch.Tensor, pooled: Optional[torch.Tensor]) -> None:
        bad = ~torch.isfinite(tokens).flatten(1).all(1)
        if pooled is not None:
            bad |= ~torch.isfinite(pooled).all(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise UserError(f"the text encoder {self._path} ({self.class_name}, {self.dtype_name}) gave "
                            f"NaN/Inf for caption {texts[i]!r}: T5 overflows in fp16; set "
                            "text_encoder.dtype to bf16 or fp32")

    # ------------------------------------------------------------------------- identity

    def describe(self) -> dict:
        """The record a checkpoint keeps (and the text cache's key is built from)."""
        return {"class_name": self.class_name, "path": os.path.abspath(self._path) if self._path else "",
                "source": self.source, "subfolder": self.subfolder, "fingerprint": self.fingerprint, "parts": dict(self.parts), "max_length": self.max_length,
                "hidden_size": self.hidden_size, "pooled_size": self.pooled_size, "dtype": self.dtype_name,
                "tokenizer_class": type(self.tokenizer).__name__, "attend_padding": self.attend_padding}

    def summary(self) -> str:
        pooled = f", pooled {self.pooled_size}" if self.pooled_size else ""
        return (f"{self.class_name} from {self.found}: fingerprint {self.fingerprint}, {self.max_length} tokens "
                f"of {self.hidden_size}{pooled}, {self.dtype_name} (frozen)")


def check_text_encoder(recorded: dict, encoder: FrozenTextEncoder, where: str, resume: bool = False) -> None:
    """Refuse `encoder` unless it is the one `recorded` (a `describe()` record, e.g. from the
    checkpoint `where`) describes: same fingerprint, max_length and encoding. Names what
    differs, with the advice of the command: sampling (predict, evaluate) takes the recorded
    encoder when text_encoder.path / max_length are null; a resumed training run (`resume`)
    needs them set."""
    if recorded.get("fingerprint") == encoder.fingerprint and recorded.get("max_length") == encoder.max_length \
            and bool(recorded.get("attend_padding", False)) == encoder.attend_padding:
        return
    theirs, ours = recorded.get("parts") or {}, encoder.parts
    differs = [k for k in ("weights", "config", "tokenizer") if theirs.get(k) != ours.get(k)]
    if recorded.get("fingerprint") != encoder.fingerprint:
        listed = ", ".join(differs[:-1]) + " and " + differs[-1] if len(differs) > 1 else "".join(differs)
        what = f"its {listed} differ" if differs else "its fingerprint differs"
        raise UserError(
            f"text encoder mismatch: {where} was trained with the {recorded.get('class_name')} at "
            f"{recorded.get('path')} (fingerprint {recorded.get('fingerprint')}), but text_encoder.path = "
            f"{encoder.path} holds a {encoder.class_name} with fingerprint {encoder.fingerprint}: {what}. "
            "The DiT only understands the embeddings it was trained on: "
            + (f"point text_encoder.path at that encoder ({recorded.get('source') or recorded.get('path')}), "
               "or start a new run (another experiment.name)" if resume else
               "use that encoder (or leave text_encoder.path null to take the one the checkpoint records)"))
    if recorded.get("max_length") == encoder.max_length:  # the encoding differs, not the encoder
        raise UserError(f"text encoding mismatch: {where} was trained on captions encoded "
                        f"{'with' if recorded.get('attend_padding') else 'without'} their padding attended, "
                        "this run encodes them otherwise: the pretrained DiT fixes how; use the "
                        "model.pretrained it was trained with")
    null = "" if resume else " (or null to take the checkpoint's)"  # in training, null is the tokenizer's
    raise UserError(f"text encoder mismatch: {where} was trained with text_encoder.max_length = "
                    f"{recorded.get('max_length')}, but it is {encoder.max_length} here; set "
                    f"text_encoder.max_length = {recorded.get('max_length')}{null}")


# ----------------------------------------------------------------------------- a tiny encoder


def word_tokenizer(words: Sequence[str], max_length: int, eos: str = "</s>", bos: Optional[str] = None,
                   pad: str = "<pad>", unk: str = "<unk>"):
    """A word-level fast tokenizer over `words` (lower-cased, split at whitespace and
    punctuation): specials first (pad, eos, unk, bos), then the words sorted; each caption ends
    with `eos` (and starts with `bos` if given). Built with the `tokenizers` library, so it
    needs no sentencepiece."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = [pad, eos, unk] + ([bos] if bos else [])
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted({w.lower() for w in words} - set(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = (f"{bos} $A {eos}" if bos else f"$A {eos}")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, vocab[s]) for s in ([bos] if bos else []) + [eos]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token=unk,
                                   bos_token=bos, model_max_length=max_length)


def make_tiny_text_encoder(folder: str, words: Sequence[str], seed: int = 0, d_model: int = 64,
                           num_layers: int = 2, num_heads: int = 4, max_length: int = 32) -> str:
    """A small random T5EncoderModel with a word-level tokenizer over `words`, saved to
    `folder` with save_pretrained (written beside it, then renamed: never half there). The same
    arguments give the same weights (and fingerprint). Returns folder.

    Random weights are a legitimate frozen encoder: different words still map to different
    vectors, which is all a DiT needs to tell captions apart."""
    tokenizer = word_tokenizer(words, max_length)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=num_heads, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      dropout_rate=0.0, feed_forward_proj="gated-gelu")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    folder = folder.rstrip(os.sep) or os.sep
    if os.path.lexists(folder) and (os.path.islink(folder) or not os.path.isdir(folder)):
        raise UserError(f"{folder} is a file (or a link), not a folder: give a folder path to write "
                        "the text encoder into (it is created)")
    tmp = f"{folder}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise UserError(f"cannot write the text encoder to {folder} ({e.strerror or e}); choose a "
                        "writable folder") from None
    finally:  # written beside the folder: never left behind
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
