"""Tampered manifests and symlinks never cost a user a file (issue 27, item 7).

The mechanism: each manifest reader trusted the names it read (a predict `tmp` entry, a text
cache shard, a latent cache shard) and each remover followed symlinks (`os.path.isdir`,
`os.path.isfile`). Now every name read from a manifest must be a plain name inside the
manifest's own folder (`utils/paths.py` `inside` / `plain_name`), a malformed entry is a
named error (predict: the entry proves nothing; caches: rebuilt, said in the log), and every
removal of a file found on disk goes through `remove_file`, which removes regular files only.

| tampering                                                | test                                              |
|----------------------------------------------------------|---------------------------------------------------|
| predict `tmp` entry + a symlink of that name elsewhere   | test_a_symlinked_predict_tmp_folder_loses_nothing |
| predict entry = a user's symlink with its target's hash  | test_a_symlink_with_its_targets_hash_is_never_predicts |
| text cache shard named `../x` or `/abs/x`                | test_a_text_cache_shard_outside_its_folder_is_never_read_or_removed |
| text cache shard of another width, entries not keys      | test_malformed_text_cache_entries_rebuild_without_a_traceback |
| latent cache shard outside its folder, a source not a number | test_malformed_latent_cache_entries_are_named_and_rebuilt |
| shards and temps matched by a glob that are symlinks     | test_cache_cleanup_removes_no_symlink             |
"""
import hashlib
import json
import os
import re

import pytest
import torch

import predict_advanced
from data.builtin import MovingShapes
from data.latent_cache import CacheCorruptError, LatentCache
from data.text_cache import TextEmbeddingCache, caption_key
from tests.test_bad_input import _assert_user_error_exit, _cli
from tests.test_predict_output import _args, checkpoint  # noqa: F401  (checkpoint is a fixture)
from tests.test_stage2 import random_vae  # noqa: F401  (a fixture of `checkpoint`)
from training.sampling import MANIFEST_FORMAT, MANIFEST_NAME, OutputFolder
from utils.config import BuiltinDataConfig, DataConfig
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _manifest(folder, *entries):
    lines = [{"format": MANIFEST_FORMAT}, *entries]
    (folder / MANIFEST_NAME).write_text("".join(json.dumps(e) + "\n" for e in lines))


# --------------------------------------------------------------------------- predict


def test_a_symlinked_predict_tmp_folder_loses_nothing(tmp_path):
    """A `tmp` entry naming a symlink to a folder elsewhere: nothing in that folder is removed,
    nor the symlink; predict's own temp folder is still cleaned."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.part").write_bytes(b"a user's download in progress")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / ".predict_tmp_evil")
    _manifest(out, {"tmp": ".predict_tmp_evil"}, {"tmp": "../elsewhere"}, {"tmp": str(elsewhere)})
    folder = OutputFolder(str(out))
    assert folder.claim(["sample_000.mp4"]) == []
    folder.close()
    assert (elsewhere / "thesis.part").read_bytes() == b"a user's download in progress"
    assert os.path.islink(out / ".predict_tmp_evil")
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, ".predict_tmp_evil"])


def test_a_symlink_with_its_targets_hash_is_never_predicts(tmp_path, checkpoint, capsys):
    """The manifest lists sample_000.mp4 with the size and sha256 of the file a user's symlink
    of that name points at: the symlink is the user's; predict refuses, naming it, and keeps
    both. The advice (move it away) works."""
    mine = tmp_path / "my_video.mp4"
    mine.write_bytes(b"my own video")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(mine, out / "sample_000.mp4")
    _manifest(out, {"file": "sample_000.mp4", "size": 12, "sha256": hashlib.sha256(b"my own video").hexdigest()})
    code, _, err = _cli(predict_advanced, _args(checkpoint, out, "num_videos=1"), capsys)
    _assert_user_error_exit(code, err, "already holds sample_000.mp4", "predict did not write",
                            "move or remove")
    assert os.path.islink(out / "sample_000.mp4") and mine.read_bytes() == b"my own video"
    os.rename(out / "sample_000.mp4", tmp_path / "moved.mp4")  # the advice
    assert predict_advanced.main(_args(checkpoint, out, "num_videos=1")) == 0
    assert mine.read_bytes() == b"my own video" and os.path.isfile(out / "sample_000.mp4")


def test_malformed_predict_entries_prove_nothing(tmp_path):
    """Entries of the wrong types or widths (a size as text, a short hash) are not predict's
    files: the file they name is refused as foreign, never removed, and no traceback."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample_000.mp4").write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    _manifest(out, {"file": "sample_000.mp4", "size": "3", "sha256": digest},
              {"file": "sample_000.mp4", "size": 3, "sha256": digest[:12]}, {"tmp": 7}, ["file"])
    folder = OutputFolder(str(out))
    with pytest.raises(UserError) as e:
        folder.claim(["sample_000.mp4"])
    assert "already holds sample_000.mp4" in str(e.value)
    assert (out / "sample_000.mp4").read_bytes() == b"abc"


# --------------------------------------------------------------------------- text cache


class FakeEncoder:
    """captions -> (tokens (N, 3, 2) filled with the caption's length, mask, None)."""

    def __call__(self, texts):
        n = len(texts)
        tokens = torch.tensor([float(len(t)) for t in texts])[:, None, None].expand(n, 3, 2).clone()
        return tokens, torch.ones(n, 3, dtype=torch.bool), None


def _text_cache(folder, log):
    return TextEmbeddingCache(str(folder), {"encoder_fingerprint": "x", "max_length": 3, "dtype": "float32"},
                              log=log.append)


@pytest.mark.parametrize("outside", ["relative", "absolute"])
def test_a_text_cache_shard_outside_its_folder_is_never_read_or_removed(tmp_path, outside):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"not a shard: the user's file")
    cache_dir = tmp_path / "run" / "text_cache"
    _text_cache(cache_dir, []).ensure(["a", "bb"], FakeEncoder(), progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    name = "../../victim.safetensors" if outside == "relative" else str(victim)
    manifest["shards"][name] = [caption_key("a")]
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    log = []
    table = _text_cache(cache_dir, log).ensure(["a", "bb"], FakeEncoder(), progress=False)
    assert victim.read_bytes() == b"not a shard: the user's file"
    assert any("is not a shard file of this cache" in m and "rebuilding" in m for m in log), log
    assert table.lookup(["bb"])[0][0, 0, 0] == 2.0
    assert all(n.startswith("text_") for n in json.loads((cache_dir / "manifest.json").read_text())["shards"])


@pytest.mark.parametrize("shards", [
    {"text_7.safetensors": []},  # another width: its number was read as n[5:10]
    {"text_abcde.safetensors": []},
    {"text_00009.safetensors": [1, 2]},  # entries that are not caption keys
    {"text_00009.safetensors": "abc"},
])
def test_malformed_text_cache_entries_rebuild_without_a_traceback(tmp_path, shards):
    cache_dir = tmp_path / "text_cache"
    _text_cache(cache_dir, []).ensure(["a"], FakeEncoder(), progress=False)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["shards"].update(shards)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    log = []
    table = _text_cache(cache_dir, log).ensure(["a", "ccc"], FakeEncoder(), progress=False)  # a new shard too
    assert any("cannot be read" in m and "rebuilding" in m for m in log), log
    assert table.lookup(["ccc"])[0][0, 0, 0] == 3.0


# --------------------------------------------------------------------------- latent cache


def _shapes():
    return MovingShapes(DataConfig(num_frames=4, resolution=16, builtin=BuiltinDataConfig(num_clips=2, clip_frames=8)))


def _encode(pixels):  # (B, 3, T, H, W) -> mean, std (B, 1, T, 2, 2)
    b, _, t = pixels.shape[:3]
    return torch.zeros(b, 1, t, 2, 2), torch.ones(b, 1, t, 2, 2)


@pytest.mark.parametrize("edit, words", [
    (lambda shards, victim: {**shards, "0": "../../victim.pt"}, "shard '../../victim.pt' of source 0"),
    (lambda shards, victim: {**shards, "0": victim}, "is not a shard file of this cache"),
    (lambda shards, victim: {**shards, "one": shards["0"]}, "source 'one' is not a source number"),
])
def test_malformed_latent_cache_entries_are_named_and_rebuilt(tmp_path, monkeypatch, edit, words):
    victim = tmp_path / "victim.pt"
    torch.save({0: {"mean": torch.zeros(1)}}, victim)
    ds = _shapes()
    cache = LatentCache(ds, str(tmp_path / "run" / "latent_cache"), {"k": 1})
    cache.write_manifest(cache.build_part(_encode, progress=False))
    manifest = json.loads(open(cache.manifest_path).read())
    manifest["shards"] = edit(manifest["shards"], str(victim))
    with open(cache.manifest_path, "w") as f:
        json.dump(manifest, f)
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: opened.append(str(path)) or real_load(path, *a, **k))
    usable, why = cache.status()
    assert not usable and words in why
    with pytest.raises(CacheCorruptError, match=re.escape(words)):
        cache.load()
    assert str(victim) not in opened and not any(".." in p for p in opened)
    cache.write_manifest(cache.build_part(_encode, progress=False))  # what stage 2 then does
    assert len(cache.load()) == len(ds) and victim.exists()


def test_cache_cleanup_removes_no_symlink(tmp_path):
    """Files matched by a cache's clean-up globs that are symlinks are a user's: kept, with
    what they point at."""
    target = tmp_path / "mine.pt"
    target.write_bytes(b"mine")
    ds = _shapes()
    folder = tmp_path / "latent_cache"
    folder.mkdir()
    os.symlink(target, folder / "shard_r0_00099.pt")
    cache = LatentCache(ds, str(folder), {"k": 1})
    cache.write_manifest(cache.build_part(_encode, progress=False))
    assert os.path.islink(folder / "shard_r0_00099.pt") and target.read_bytes() == b"mine"
    text_dir = tmp_path / "text_cache"
    text_dir.mkdir()
    os.symlink(target, text_dir / "text_00042.safetensors.tmp.1")
    _text_cache(text_dir, []).ensure(["a"], FakeEncoder(), progress=False)
    assert os.path.islink(text_dir / "text_00042.safetensors.tmp.1") and target.read_bytes() == b"mine"
