"""Text embedding cache: each distinct caption encoded once by the frozen text encoder.

The training step never runs the text encoder: every caption a run uses (both splits, and the
null caption) is encoded once, in batches, and looked up by its text afterwards. Entries are
keyed by the sha256 of the caption's UTF-8 text inside a cache whose key is the encoder's
fingerprint, `max_length` and dtype: a caption edited on disk is a new entry (encoded next
run), the others are reused; another encoder, max_length or dtype re-encodes everything,
saying what changed. This module takes an encode function, so `data/` never imports `models/`.

Layout on disk (`cache_dir`, e.g. `<run>/text_cache/`, or shared between runs: entries are
keyed by content): `manifest.json` ({"key", "format", "shards": {file: [sha, ...]}}) and
`text_{k:05d}.safetensors` shards, tensors `<sha>.tokens` (n, D) trimmed to the caption's n
real tokens (padding is zero and masked, so it need not be stored) and `<sha>.pooled` (D')
for encoders with a pooled vector. Shards are written whole to a temp file and renamed, the
manifest after them: a build killed part-way keeps the shards it finished; files no manifest
names are removed (regular files only: never a symlink, nor what it points at). A manifest
that cannot be read, or whose entries are not this cache's (a shard named by a path, `..` or
another name than `text_NNNNN.safetensors`, an entry that is not a caption key), rebuilds the
cache: nothing outside `cache_dir` is read or removed. A shard that cannot be read (or lacks an
entry) is dropped and its captions re-encoded, each said through `log`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from utils.checkpoint import write_json
from utils.paths import remove_file

# captions -> tokens (N, L, D) zero at padding, mask (N, L) bool (a prefix per row), pooled (N, D') or None
EncodeFn = Callable[[list[str]], tuple]
FORMAT = 1
SHARD_BYTES = 256 * 2**20  # a shard is closed at this size: a killed build loses less
SHARD_NAME = re.compile(r"text_(\d{5,})\.safetensors")  # what `_write_shard` names a shard
CAPTION_KEY = re.compile(r"[0-9a-f]{64}")  # `caption_key`: a sha256 in hex


def caption_key(text: str) -> str:
    """The entry name of a caption: sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_cache_key(encoder_fingerprint: str, max_length: int, dtype: str, convention: str = "masked") -> dict:
    """What the cached embeddings depend on besides the caption text: the encoder, its length
    and dtype, and the text convention (how captions are encoded: masked, or the padding
    attended, as a pretrained DiT family was trained; models/backbones.py)."""
    key = {"encoder_fingerprint": encoder_fingerprint, "max_length": int(max_length), "dtype": str(dtype)}
    if convention != "masked":  # caches written before conventions keep their key
        key["convention"] = convention
    return key


def describe_change(old: dict, new: dict) -> str:
    names = {"encoder_fingerprint": "the text encoder changed", "max_length": "text_encoder.max_length changed",
             "dtype": "text_encoder.dtype changed", "convention": "the text convention changed"}
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{names.get(k, k)} ({old.get(k)} -> {new.get(k)})" for k in changed)


def _shard_number(name: str) -> int:
    """k of a shard file `text_{k:05d}.safetensors`; ValueError for any other name."""
    found = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"shard {name!r} is not a shard file of this cache (text_NNNNN.safetensors)")
    return int(found.group(1))


def _check_entries(shards: dict) -> None:
    """A manifest's {shard: [sha, ...]}: every shard a file of this cache inside its folder
    (never a path), every entry a caption key; ValueError naming the first that is not."""
    for name, shas in shards.items():
        _shard_number(name)
        if not isinstance(shas, list):
            raise ValueError(f"shard {name!r} lists {type(shas).__name__}, not caption keys")
        bad = next((sha for sha in shas if not (isinstance(sha, str) and CAPTION_KEY.fullmatch(sha))), None)
        if bad is not None:
            raise ValueError(f"shard {name!r} lists {bad!r}, not a caption key (64 hex digits)")


class TextTable:
    """Cached embeddings by caption text: `lookup` pads them back to (B, L, D) with a mask."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]], max_length: int):
        self.entries = entries  # sha -> (tokens (n, D), pooled (D') or None)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, text: str) -> bool:
        return caption_key(text) in self.entries

    def lookup(self, texts: Sequence[str], trim: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Captions -> tokens (B, L, D) zero at padding, mask (B, L) bool, pooled (B, D') or None:
        exactly what the encoder gave for each. L = max_length, or with `trim` the longest of
        these captions (for a DiT that reads the mask: the padding it would mask out is then
        not computed at all)."""
        rows = []
        for text in texts:
            entry = self.entries.get(caption_key(text))
            if entry is None:
                raise KeyError(f"caption {text!r} is not in the text embedding cache: build the cache "
                               "with every caption the run uses (TextEmbeddingCache.ensure)")
            rows.append(entry)
        L = max([t.shape[0] for t, _ in rows] or [1]) if trim else self.max_length
        tokens = torch.stack([F.pad(t, (0, 0, 0, L - t.shape[0])) for t, _ in rows])  # (B, L, D)
        lengths = torch.tensor([t.shape[0] for t, _ in rows])  # (B,)
        mask = torch.arange(L)[None] < lengths[:, None]  # (B, L)
        pooled = torch.stack([p for _, p in rows]) if rows and rows[0][1] is not None else None  # (B, D')
        return tokens, mask, pooled


class TextEmbeddingCache:
    """Builds (what is missing) and loads the embeddings of a set of captions in `cache_dir`.

    After `ensure`, `encoded` and `reused` count the captions encoded by that call and those
    found in the cache."""

    def __init__(self, cache_dir: str, key: dict, log: Callable[[str], None] = print):
        self.dir, self.key, self.log = cache_dir, key, log
        self.manifest_path = os.path.join(cache_dir, "manifest.json")
        self.encoded = self.reused = 0

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The captions not cached yet (sorted). Checks what the manifest lists (a shard that
        cannot be read is dropped, its captions reported missing) and removes files of another key
        or a killed build: one process at a time (rank 0), before any rank builds."""
        wanted = {caption_key(c): c for c in captions}
        entries = self._read(self._shards_for_key(), set(wanted))
        return sorted(wanted[sha] for sha in wanted if sha not in entries)

    def build_part(self, texts: Sequence[str], encode: EncodeFn, rank: int = 0, world_size: int = 1,
                   batch_size: int = 64, progress: bool = True) -> dict[str, list[str]]:
        """Encode `texts` (one rank's share of `missing`) into shard files of their own names
        (rank r writes shards r, r + W, ... after the manifest's), without touching the manifest:
        returns {shard: [sha, ...]} for `add_shards` (rank 0, after every rank wrote its part)."""
        shards = self._manifest_shards_quiet()
        start = 1 + max([_shard_number(n) for n in shards] or [-1])
        written: dict[str, list[str]] = {}
        index = iter(range(start + rank, start + rank + world_size * 10 ** 5, world_size))
        self._build(written, list(texts), encode, batch_size, progress,
                    name=lambda: f"text_{next(index):05d}.safetensors", manifest=False)
        return written

    def add_shards(self, parts: dict[str, list[str]]) -> None:
        """Add the shards ranks wrote (`build_part`) to the manifest (rank 0)."""
        if parts:
            self._write_manifest({**self._manifest_shards_quiet(), **parts})

    def _manifest_shards_quiet(self) -> dict[str, list[str]]:
        log, self.log = self.log, lambda message: None
        try:
            return self._manifest_shards()
        finally:
            self.log = log

    def ensure(self, captions: Iterable[str], encode: EncodeFn, batch_size: int = 64,
               progress: bool = True) -> TextTable:
        """Encode the captions not cached yet (each distinct caption once, `batch_size` per call),
        then return the table of all of `captions`. One process at a time (rank 0)."""
        wanted = {caption_key(c): c for c in captions}
        shards = self._shards_for_key()
        entries = self._read(shards, set(wanted))
        missing = [sha for sha in wanted if sha not in entries]
        self.encoded, self.reused = len(missing), len(wanted) - len(missing)
        if missing:
            entries.update(self._build(shards, [wanted[s] for s in missing], encode, batch_size, progress))
        return TextTable({sha: entries[sha] for sha in wanted}, self.key["max_length"])

    def load(self, captions: Iterable[str]) -> TextTable:
        """The table of `captions`, read only (e.g. ranks > 0 after rank 0's `ensure`)."""
        wanted = {caption_key(c): c for c in captions}
        entries = self._read(self._manifest_shards(), set(wanted))
        absent = [wanted[s] for s in wanted if s not in entries]
        if absent:
            raise KeyError(f"text embedding cache {self.dir}: {len(absent)} caption(s) are not cached "
                           f"(e.g. {absent[0]!r}); build it first (ensure)")
        return TextTable(entries, self.key["max_length"])

    # ------------------------------------------------------------------------- manifest

    def _manifest_shards(self) -> dict[str, list[str]]:
        """{shard: [sha, ...]} of the manifest if its key is ours, else {} (said through log)."""
        if not os.path.isfile(self.manifest_path):
            return {}
        try:
            with open(self.manifest_path) as f:
                manifest = json.load(f)
            key, shards = manifest["key"], manifest["shards"]
            if manifest.get("format") != FORMAT or not isinstance(shards, dict):
                raise ValueError("not a manifest of this format")
            _check_entries(shards)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"text embedding cache {self.dir}: {self.manifest_path} cannot be read "
                     f"({type(e).__name__}: {e}); rebuilding it")
            return {}
        if key != self.key:
            self.log(f"text embedding cache {self.dir}: {describe_change(key, self.key)}; "
                     "re-encoding every caption")
            return {}
        return shards

    def _shards_for_key(self) -> dict[str, list[str]]:
        """The manifest's shards; files of another key, a corrupt manifest or a killed build go."""
        shards = self._manifest_shards()
        for path in glob.glob(os.path.join(glob.escape(self.dir), "text_*.safetensors*")):
            if os.path.basename(path) not in shards:
                remove_file(path)  # never a symlink, nor what it points at
        if not shards:
            remove_file(self.manifest_path)
        return shards

    def _write_manifest(self, shards: dict[str, list[str]]) -> None:
        write_json({"key": self.key, "format": FORMAT, "shards": shards}, self.manifest_path)

    # ------------------------------------------------------------------------- read / build

    def _read(self, shards: dict[str, list[str]], wanted: set[str]) -> dict:
        """{sha: (tokens, pooled)} of the wanted entries; a shard that cannot be read is dropped
        from `shards` (and its file removed) so that its captions are encoded again."""
        entries: dict = {}
        for name in sorted(shards):
            needed = [s for s in shards[name] if s in wanted]
            if not needed:
                continue
            path = os.path.join(self.dir, name)
            try:
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
                    for sha in needed:
                        tokens = f.get_tensor(f"{sha}.tokens")  # (n, D)
                        pooled = f.get_tensor(f"{sha}.pooled") if f"{sha}.pooled" in keys else None
                        if tokens.ndim != 2:
                            raise ValueError(f"entry {sha[:12]} has shape {tuple(tokens.shape)}")
                        entries[sha] = (tokens, pooled)
            except Exception as e:  # missing, truncated, not safetensors, an entry absent: re-encode
                self.log(f"text embedding cache {self.dir}: shard {name} cannot be read ({type(e).__name__}: "
                         f"{e}); its {len(shards[name])} caption(s) will be encoded again")
                for sha in shards.pop(name):
                    entries.pop(sha, None)
                remove_file(path)
                self._write_manifest(shards)
        return entries

    def _build(self, shards: dict[str, list[str]], texts: list[str], encode: EncodeFn,
               batch_size: int, progress: bool, name: Optional[Callable[[], str]] = None,
               manifest: bool = True) -> dict:
        """Encode `texts` in batches; shards (then, with `manifest`, the manifest) written every
        SHARD_BYTES, named by `name()` (default: the next free index)."""
        os.makedirs(self.dir, exist_ok=True)
        texts = sorted(texts, key=len)  # batches of similar lengths: little padding to encode
        new, pending, size = {}, {}, 0
        bar = tqdm(total=len(texts), desc="text embeddings", unit="caption", disable=not progress,
                   dynamic_ncols=True)
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens, mask, pooled = encode(chunk)  # (N, L, D), (N, L), (N, D') or None
            for i, text in enumerate(chunk):
                n = int(mask[i].sum())
                entry = (tokens[i, :n].detach().cpu().clone(),  # own storage: not a view of the batch
                         None if pooled is None else pooled[i].detach().cpu().clone())
                pending[caption_key(text)] = entry
                size += sum(t.numel() * t.element_size() for t in entry if t is not None)
            bar.update(len(chunk))
            if size >= SHARD_BYTES or start + batch_size >= len(texts):
                self._write_shard(shards, pending, name() if name else None, manifest)
                new.update(pending)
                pending, size = {}, 0
        bar.close()
        return new

    def _write_shard(self, shards: dict[str, list[str]], entries: dict, name: Optional[str] = None,
                     manifest: bool = True) -> None:
        if name is None:
            k = 1 + max([_shard_number(n) for n in shards] or [-1])
            name = f"text_{k:05d}.safetensors"
        tensors = {f"{sha}.tokens": t for sha, (t, _) in entries.items()}
        tensors.update({f"{sha}.pooled": p for sha, (_, p) in entries.items() if p is not None})
        path = os.path.join(self.dir, name)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata={"format": str(FORMAT)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        shards[name] = sorted(entries)
        if manifest:
            self._write_manifest(shards)
