"""The text embedding cache (data/text_cache.py) with a tiny T5 encoder: each distinct caption
encoded once, a second run encodes nothing, an edited caption alone is re-encoded, another
encoder / max_length re-encodes all, a corrupt cache heals itself with a message."""
import json
import os

import pytest
import torch

from data.builtin import MovingShapes
from data.text_cache import TextEmbeddingCache, caption_key, text_cache_key
from models.text_encoder import FrozenTextEncoder, TextWarning
from utils.config import BuiltinDataConfig, DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red square moving left on a black background", "a blue circle", "", "雪の中を走る犬",
            "a red square moving left on a black background"]  # the last one again: encoded once


@pytest.fixture(scope="module")
def encoders(text_encoders):
    return {k: FrozenTextEncoder.from_pretrained(text_encoders[k]) for k in ("t5", "clip_projection")}


class Counting:
    """An encode function that counts the captions it was asked to encode."""

    def __init__(self, encoder):
        self.encoder, self.texts, self.calls = encoder, [], 0

    def __call__(self, texts):
        self.texts += list(texts)
        self.calls += 1
        return self.encoder.encode(texts)


def _cache(path, enc, log=None):
    key = text_cache_key(enc.fingerprint, enc.max_length, enc.dtype_name)
    return TextEmbeddingCache(str(path), key, log=(log.append if log is not None else print))


@pytest.mark.parametrize("kind", ["t5", "clip_projection"])
def test_encoded_once_then_reused(encoders, tmp_path, kind):
    enc = encoders[kind]
    first = Counting(enc)
    cache = _cache(tmp_path, enc)
    table = cache.ensure(CAPTIONS, first, batch_size=2, progress=False)
    assert sorted(first.texts) == sorted(set(CAPTIONS)) and first.calls == 2  # 4 distinct, 2 per call
    assert (cache.encoded, cache.reused, len(table)) == (4, 0, 4)
    tokens, mask, pooled = table.lookup(CAPTIONS)
    ref = enc.encode(CAPTIONS)
    assert tokens.shape == ref.tokens.shape and torch.equal(mask, ref.mask)
    torch.testing.assert_close(tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    assert (pooled is None) == (ref.pooled is None)
    if pooled is not None:
        torch.testing.assert_close(pooled, ref.pooled, atol=1e-5, rtol=1e-5)

    second = Counting(enc)
    again = _cache(tmp_path, enc)
    table2 = again.ensure(CAPTIONS, second, progress=False)
    assert second.texts == [] and (again.encoded, again.reused) == (0, 4)
    assert torch.equal(table2.lookup(CAPTIONS)[0], tokens)  # bit-exact from disk
    assert torch.equal(again.load(CAPTIONS).lookup(CAPTIONS)[0], tokens)


def test_edited_caption_alone_is_encoded(encoders, tmp_path):
    enc = encoders["t5"]
    _cache(tmp_path, enc).ensure(CAPTIONS, Counting(enc), progress=False)
    edited = [c if c != "a blue circle" else "a blue circle moving up" for c in CAPTIONS]
    counting = Counting(enc)
    cache = _cache(tmp_path, enc)
    table = cache.ensure(edited, counting, progress=False)
    assert counting.texts == ["a blue circle moving up"] and (cache.encoded, cache.reused) == (1, 3)
    assert "a blue circle moving up" in table and "a blue circle" not in table
    with pytest.raises(KeyError, match="'a blue circle' is not in the text embedding cache"):
        table.lookup(["a blue circle"])
    # the old entry is still on disk: going back encodes nothing
    back = Counting(enc)
    _cache(tmp_path, enc).ensure(CAPTIONS, back, progress=False)
    assert back.texts == []


def test_another_encoder_or_max_length_reencodes_all(encoders, text_encoders, tmp_path):
    enc = encoders["t5"]
    _cache(tmp_path, enc).ensure(CAPTIONS, Counting(enc), progress=False)
    log = []
    short = FrozenTextEncoder.from_pretrained(text_encoders["t5"], max_length=6)
    counting = Counting(short)
    with pytest.warns(TextWarning, match="longer than text_encoder.max_length = 6"):
        _cache(tmp_path, short, log).ensure(CAPTIONS, counting, progress=False)
    assert len(counting.texts) == 4
    assert any("text_encoder.max_length changed (16 -> 6)" in m and "re-encoding every caption" in m for m in log)
    other = encoders["clip_projection"]
    log.clear()
    _cache(tmp_path, other, log).ensure(CAPTIONS, Counting(other), progress=False)
    assert any("the text encoder changed" in m for m in log)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 1  # old shards gone


def test_corrupt_cache_is_rebuilt_with_a_message(encoders, tmp_path):
    enc = encoders["t5"]
    _cache(tmp_path, enc).ensure(CAPTIONS[:2], Counting(enc), progress=False)
    _cache(tmp_path, enc).ensure(CAPTIONS, Counting(enc), progress=False)  # a second shard
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) == 2
    with open(tmp_path / shards[1], "r+b") as f:  # truncate one shard
        f.truncate(20)
    log, counting = [], Counting(enc)
    table = _cache(tmp_path, enc, log).ensure(CAPTIONS, counting, progress=False)
    assert sorted(counting.texts) == sorted(set(CAPTIONS) - set(CAPTIONS[:2]))  # the broken shard's only
    assert any(f"shard {shards[1]} cannot be read" in m for m in log)
    torch.testing.assert_close(table.lookup(CAPTIONS)[0], enc.encode(CAPTIONS).tokens, atol=1e-5, rtol=1e-5)

    (tmp_path / "manifest.json").write_text("{ not json")
    log, counting = [], Counting(enc)
    _cache(tmp_path, enc, log).ensure(CAPTIONS, counting, progress=False)
    assert len(counting.texts) == 4 and any("manifest.json cannot be read" in m and "rebuilding" in m for m in log)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(sha for v in manifest["shards"].values() for sha in v) == sorted({caption_key(c) for c in CAPTIONS})
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_killed_build_keeps_finished_shards(encoders, tmp_path, monkeypatch):
    """A build that dies part-way keeps what it wrote: the next run encodes only the rest."""
    import data.text_cache as text_cache
    enc = encoders["t5"]
    monkeypatch.setattr(text_cache, "SHARD_BYTES", 1)  # a shard per batch
    calls = {"n": 0}

    def dies_on_second_batch(texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return enc.encode(texts)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, enc).ensure(CAPTIONS, dies_on_second_batch, batch_size=2, progress=False)
    counting = Counting(enc)
    cache = _cache(tmp_path, enc)
    cache.ensure(CAPTIONS, counting, batch_size=2, progress=False)
    assert (cache.encoded, cache.reused) == (2, 2)


def test_builtin_captions_are_a_small_set(encoders, tmp_path):
    """The built-in training split: hundreds of windows, a few dozen distinct captions, each encoded once."""
    ds = MovingShapes(DataConfig(builtin=BuiltinDataConfig(captions=True, num_clips=32)))
    captions = [ds.caption(i) for i in range(len(ds))]
    counting = Counting(encoders["t5"])
    _cache(tmp_path, encoders["t5"]).ensure(captions + [""], counting, progress=False)
    assert len(counting.texts) == len(set(captions)) + 1 < len(captions)
