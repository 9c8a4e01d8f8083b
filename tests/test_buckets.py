"""Aspect-ratio and duration buckets (`data.buckets`), images beside videos (`data.images`),
and the fixed-shape path (`data.buckets: null`) left exactly as it was."""
import hashlib
import os

import numpy as np
import pytest
import torch

from tests.conftest import smooth_frames, write_frame_folder
from tests.test_stage2 import ROOT, TINY, _predict, _train, random_vae  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # one thread: the digests below are bit-exact


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fixed_folder(root) -> str:
    """Frame folders (PNG: lossless, so pixels are the same on any machine) of three aspect
    ratios and two lengths, and a still beside them, which a fixed-shape run ignores."""
    for k, (t, h, w) in enumerate([(12, 24, 40), (10, 40, 24), (12, 32, 32), (9, 30, 44)]):
        write_frame_folder(str(root / f"clip{k}"), smooth_frames(t, h, w))
    from PIL import Image
    Image.fromarray(smooth_frames(1, 20, 36)[0]).save(str(root / "still.png"))
    return str(root)


# Digests of a run of the code before data.buckets existed (commit 3834f46), one thread.
FIXED_BUILTIN = {"model_state": "dedf7025e26c9f37", "ema_state": "5139c053147a8e53",
                 "noise_gen": "e29db0ae69cd17d8", "samples": "71a1b2c34990fcf4"}
FIXED_FOLDER = {"items": "8273b9200e5d5863", "model_state": "379a6c911f904486"}


def test_fixed_shape_run_is_unchanged_bit_for_bit(tmp_path, random_vae):  # noqa: F811
    """data.buckets: null (the default) trains, checkpoints and samples exactly as the code
    before buckets did: weights, EMA, the noise generator's position and predict's GIFs."""
    run = _train(tmp_path, random_vae, "fixed", ["train.max_steps=4", "data.cache=auto"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    assert _predict(os.path.join(run, "latest.pth"), str(tmp_path / "pred")) == 0
    gifs = {n: torch.from_numpy(np.frombuffer((tmp_path / "pred" / n).read_bytes(), dtype=np.uint8))
            for n in ("sample_000.gif", "sample_001.gif")}
    got = {"model_state": _digest(ckpt["model_state"]), "ema_state": _digest(ckpt["ema_state"]),
           "noise_gen": _digest({"g": ckpt["rng"][0]["noise_gen"]}), "samples": _digest(gifs)}
    print("FIXED_BUILTIN =", got)
    assert got == FIXED_BUILTIN


def test_fixed_shape_folder_is_unchanged_bit_for_bit(tmp_path, random_vae):  # noqa: F811
    """A folder (three aspect ratios, a still beside the clips) at one shape, with random crops
    and flips: the same items (pixels) and the same weights as before buckets."""
    from data import build_dataset
    from utils.config import DataConfig
    folder = _fixed_folder(tmp_path / "clips")
    cfg = DataConfig(path=folder, num_frames=4, resolution=[16, 24], random_crop=True, hflip=True,
                     val_fraction=0.0, window_stride=3, index_cache=str(tmp_path / "index.json"))
    data = build_dataset(cfg, "train", 0)
    data.set_epoch(1)
    items = {f"{i}": data[i]["video"] for i in range(len(data))}
    run = _train(tmp_path, random_vae, "folder", [f"data.path={folder}", "data.val_fraction=0.0",
                                                  "data.resolution=[16,24]", "data.random_crop=true",
                                                  "data.hflip=true", "train.max_steps=3"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    got = {"items": _digest(items), "model_state": _digest(ckpt["model_state"])}
    print("FIXED_FOLDER =", got)
    assert len(items) == 11 and got == FIXED_FOLDER
