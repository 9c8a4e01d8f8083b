"""Aspect-ratio and duration buckets (`data.buckets`), images beside videos (`data.images`),
and the fixed-shape path (`data.buckets: null`) left exactly as it was."""
import hashlib
import json
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


# --------------------------------------------------------------------------- planning, a folder

RULES = None  # set below: buckets of multiples of 8, any frame count, tokens of a 4x VAE + 2x2 patches


def _rules(batch_size=2):
    from data.buckets import Rules
    return Rules(8, lambda n: True, lambda h, w, n: n * (h // 8) * (w // 8), batch_size)


def _mixed_folder(root) -> dict:
    """Landscape, portrait and square clips of different lengths, stills of each kind, one clip
    too short for its bucket and one unreadable file: {relative path: what it is}."""
    from PIL import Image
    from utils.video_io import write_video
    files = {"land_long.mp4": (12, 24, 40), "land_short.mp4": (3, 24, 40), "port.mp4": (10, 40, 24),
             "sq/sq_9": (9, 32, 32), "land_mid.mp4": (6, 30, 52)}
    for rel, (t, h, w) in files.items():
        if rel.endswith(".mp4"):
            write_video(str(root / rel), smooth_frames(t, h, w), fps=8)
        else:
            write_frame_folder(str(root / rel), smooth_frames(t, h, w))
    stills = {"still_land.png": (20, 36), "still_port.jpg": (36, 20), "more/still_sq.webp": (30, 30)}
    for rel, (h, w) in stills.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_frames(1, h, w)[0]).save(str(root / rel))
    (root / "broken.mp4").write_text("not a video")
    return {**files, **stills, "broken.mp4": None}


def _folder_cfg(root, **kw):
    from utils.config import DataConfig
    base = dict(path=str(root), num_frames=4, resolution=[16, 24], val_fraction=0.0, window_stride=4,
                buckets="auto", bucket_area=576, index_cache=str(root.parent / "index.json"))
    cfg = DataConfig(**{**base, **kw})
    cfg.validate()
    return cfg


def test_a_mixed_folder_uses_or_lists_every_sample_and_never_pads(tmp_path):
    """Three aspect ratios, three lengths, stills: every source is in a bucket or listed unused
    with its reason, the counts add up to the folder, each item has its bucket's shape and is
    pixels of its source (no padded border), and each sample went to its nearest aspect ratio."""
    import warnings
    from data import build_dataset
    files = _mixed_folder(tmp_path / "clips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_dataset(_folder_cfg(tmp_path / "clips"), "train", 0, rules=_rules())
    report = data.plan.report(data.counts)
    names = [b.name for b in data.plan.buckets]  # auto: one per aspect ratio present, clips then stills
    assert names == ["16x32x4", "24x24x4", "32x16x4", "16x32x1", "24x24x1", "32x16x1"]
    used = sum(b["sources"] for b in report["buckets"])
    unused = {u["path"]: u["reason"] for u in report["unused"]}
    assert used + len(unused) == len(files)  # the counts add up to the folder
    assert set(unused) == {"land_short.mp4", "broken.mp4"}
    assert "too short: 3 frames" in unused["land_short.mp4"] and "not a readable video" in unused["broken.mp4"]
    assert sum(b["windows"] for b in report["buckets"]) == len(data)
    for i in range(len(data)):
        item = data[i]
        bucket = data.plan.buckets[item["bucket"]]
        assert item["video"].shape == (3, bucket.num_frames, bucket.height, bucket.width)
        video = item["video"]  # smooth gradients everywhere: a padded border would be flat
        for border in (video[:, :, 0], video[:, :, -1], video[:, :, :, 0], video[:, :, :, -1]):
            assert border.std() > 1e-3, (i, bucket.name)
    rel = {os.path.relpath(p, data.cfg.path): k for k, (p, _) in enumerate(data.sources)}
    for name, shape in files.items():
        if name in rel:
            h, w = shape[-2:]
            bucket = data.plan.buckets[data.plan.bucket_of[rel[name]]]
            nearest = min((b for b in data.plan.buckets if (b.num_frames == 1) == (len(shape) == 2)),
                          key=lambda b: abs(np.log(b.aspect * h / w)))
            assert bucket.aspect == nearest.aspect, name
            assert (bucket.num_frames == 1) == (len(shape) == 2), name  # stills in one-frame buckets only


def test_a_list_picks_the_nearest_ratio_and_the_longest_frames_a_sample_fills(tmp_path):
    from data.buckets import Bucket, Sample, assign
    buckets = [Bucket(16, 32, 8, 2), Bucket(16, 32, 4, 4), Bucket(32, 16, 4, 4), Bucket(24, 24, 1, 8)]
    assert assign(Sample("a", False, 12, 90, 160), buckets, 1) == 0  # landscape, long: 8 frames
    assert assign(Sample("b", False, 6, 90, 160), buckets, 1) == 1  # too short for 8: 4
    assert assign(Sample("c", False, 6, 100, 100), buckets, 1) in (1, 2)  # square: the nearest clip bucket
    assert assign(Sample("d", False, 6, 160, 90), buckets, 1) == 2
    assert assign(Sample("e", True, 1, 160, 90), buckets, 1) == 3  # a still: one-frame buckets only
    assert assign(Sample("f", False, 3, 90, 160), buckets, 1) is None  # no clip bucket it fills
    assert assign(Sample("g", False, 7, 90, 160), buckets, 2) == 1  # frame_stride 2: 8 frames span 15


def test_images_include_exclude_only_and_their_captions(tmp_path):
    import warnings
    from data import build_dataset
    _mixed_folder(tmp_path / "clips")
    for rel in ("land_long", "port", "sq/sq_9", "land_mid", "still_land", "still_port", "more/still_sq"):
        (tmp_path / "clips" / f"{rel}.txt").write_text(f"caption of {rel}")
    kinds = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for images in ("include", "exclude", "only"):
            data = build_dataset(_folder_cfg(tmp_path / "clips", images=images, captions="sidecar",
                                             missing_caption="skip"), "train", 0, rules=_rules())
            kinds[images] = sorted(os.path.relpath(p, data.cfg.path) for p, _ in data.sources)
            reasons = {u[0]: u[1] for u in data.plan.unused}
            if images == "include":
                still = next(i for i in range(len(data)) if data.plan.buckets[data[i]["bucket"]].num_frames == 1)
                assert data[still]["caption"].startswith("caption of ") and "still_" in data[still]["caption"]
                assert "no caption" in reasons["land_short.mp4"]  # no sidecar: skipped, and listed
    stills = {"still_land.png", "still_port.jpg", "more/still_sq.webp"}
    assert stills < set(kinds["include"]) and not stills & set(kinds["exclude"])
    assert set(kinds["only"]) == stills
    assert set(kinds["include"]) == set(kinds["exclude"]) | stills


def test_auto_batch_sizes_keep_the_tokens_per_batch():
    """Open-Sora's idea: a one-frame bucket takes num_frames x as many samples; every bucket's
    tokens per batch are within 25% of the reference batch's."""
    from data.buckets import Sample, resolve_buckets
    cfg = _folder_cfg(__import__("pathlib").Path("/x"), num_frames=8, resolution=[32, 32], bucket_area=1024)
    samples = [Sample("a", False, 20, 90, 160), Sample("b", False, 20, 160, 90), Sample("c", False, 20, 50, 50),
               Sample("d", True, 1, 50, 50), Sample("e", True, 1, 90, 160)]
    buckets = resolve_buckets(cfg, samples, _rules(batch_size=4))
    reference = 4 * _rules().tokens(32, 32, 8)
    assert {b.num_frames for b in buckets} == {8, 1}
    assert all(b.batch_size >= 6 * 4 for b in buckets if b.num_frames == 1)  # about 8 x train.batch_size
    for b in buckets:
        assert abs(b.batch_size * _rules().tokens(b.height, b.width, b.num_frames) / reference - 1) <= 0.25, b


# --------------------------------------------------------------------------- the sampler


def test_bucket_batches_are_one_shape_the_same_on_every_rank_and_resume_exactly():
    from data.buckets import BucketBatchSampler
    items = [list(range(0, 13)), list(range(13, 16)), list(range(16, 40))]  # one bucket below one batch
    sizes = [2, 4, 3]
    ranks = [BucketBatchSampler(items, sizes, seed=5, rank=r, world_size=2) for r in range(2)]
    of = {i: b for b, group in enumerate(items) for i in group}
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        steps = [s.epoch_batches() for s in ranks]
        assert len(steps[0]) == len(steps[1]) == ranks[0].per_rank == len(ranks[0])  # same step count
        for (b0, x0), (b1, x1) in zip(*steps):
            assert b0 == b1 and len(x0) == len(x1) == sizes[b0]  # same bucket, its batch size
            assert {of[i] for i in x0 + x1} == {b0}
        seen = {i for batches in steps for _, x in batches for i in x}
        assert seen == set(range(40))  # every window, every epoch: nothing dropped
    again = BucketBatchSampler(items, sizes, seed=5, rank=1, world_size=2)
    again.set_epoch(1)
    assert again.epoch_batches() == steps[1]  # from (seed, epoch) alone
    ranks[0].set_epoch(0)
    first = list(ranks[0])
    assert first != [x for _, x in steps[0]]  # epochs differ
    resumed = BucketBatchSampler(items, sizes, seed=5, rank=0, world_size=2)
    resumed.set_epoch(0)
    resumed.set_start_batch(5, 2)
    assert list(resumed) == first[5:]


# --------------------------------------------------------------------------- refusals

BUILTIN = ["data.buckets=auto", "data.builtin.resolutions=[[16,32],[32,16],24]", "data.builtin.num_stills=4",
           "data.bucket_area=576", "data.builtin.num_clips=6"]


def test_a_bucket_list_that_takes_nothing_is_refused_naming_samples_and_a_bucket(tmp_path, random_vae):  # noqa: F811
    from utils.errors import UserError
    clips = tmp_path / "clips"
    from utils.video_io import write_video
    for k in range(2):
        write_video(str(clips / f"c{k}.mp4"), smooth_frames(6, 24, 40), fps=8)
    with pytest.raises(UserError) as e:
        _train(tmp_path, random_vae, "none", [f"data.path={clips}", "data.val_fraction=0",
                                             "data.buckets=[{resolution: [16, 32], num_frames: 8, batch_size: 2}]"])
    text = str(e.value)
    assert "takes none of the 2 samples" in text and "c0.mp4 (24x40, 6 frames)" in text
    assert "too short: 6 frames, the shortest bucket (8 frames) needs 8" in text
    assert "a bucket that takes it: {resolution: [16, 32], num_frames: 6, batch_size:" in text
    assert not os.path.exists(os.path.join(tmp_path, "none", "latent_cache"))  # before any encoding


def test_a_whole_aspect_ratio_left_unused_is_refused(tmp_path, random_vae):  # noqa: F811
    from utils.errors import UserError
    from utils.video_io import write_video
    clips = tmp_path / "clips"
    write_video(str(clips / "wide.mp4"), smooth_frames(10, 24, 40), fps=8)
    write_video(str(clips / "tall.mp4"), smooth_frames(3, 40, 24), fps=8)  # portrait: too short for auto's 4
    with pytest.raises(UserError, match=r"(?s)no sample of an aspect ratio.*tall\.mp4 \(40x24, 3 frames\)"
                                        r".*\{resolution: \[24, 16\], num_frames: 3"):
        _train(tmp_path, random_vae, "ratio", [f"data.path={clips}", "data.val_fraction=0", "data.buckets=auto"])


@pytest.mark.parametrize("override, words", [
    ("data.buckets=[{resolution: [20, 32], num_frames: 4}]",
     ["data.buckets[0].resolution = [20, 32]: height 20 is not divisible by VAE factor 4 x patch 2 = 8",
      "16 or 24"]),
    ("data.buckets=[{resolution: 16, num_frames: 4}, {resolution: 16, num_frames: 4}]",
     ["data.buckets[1] repeats data.buckets[0]"]),
    ("data.buckets=[{num_frames: 4}]", ["data.buckets[0].resolution is missing"]),
    ("data.builtin.num_stills=3", ["data.builtin.num_stills = 3 needs data.buckets"]),
    ("data.buckets=auto|model.patch_t=2|data.builtin.num_stills=2",
     ["the bucket 16x16x1", "model.patch_t = 2", "data.images: exclude"]),
])
def test_bucket_settings_are_refused_naming_the_key(tmp_path, random_vae, override, words):  # noqa: F811
    from utils.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        _train(tmp_path, random_vae, "bad", override.split("|"))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# --------------------------------------------------------------------------- training


def test_a_bucketed_run_resumes_mid_epoch_bit_for_bit(tmp_path, random_vae):  # noqa: F811
    """Built-in clips at three shapes and stills (auto buckets, per-bucket batch sizes): 9
    steps straight == 5 steps, then a resume to 9 (mid-epoch: same bucket order, weights,
    noise); the checkpoint records its buckets, buckets.json and log.txt list them."""
    import shutil
    import training.stage2 as stage2
    steps = [*BUILTIN, "train.max_steps=9", "train.checkpoint_every=5", "train.lr_schedule=constant",
             "data.cache=auto"]
    ck5 = os.path.join(tmp_path, "step5.pth")
    original = stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original(s, name, **kw)
        if s.pos.step == 5 and name == "latest.pth":
            shutil.copy(os.path.join(s.run_dir, name), ck5)
    stage2.save = spy_save
    try:
        straight = _train(tmp_path, random_vae, "straight", steps)
    finally:
        stage2.save = original
    a = load_checkpoint(os.path.join(straight, "latest.pth"))
    b5 = load_checkpoint(ck5)
    assert 0 < b5["micro"] < 9 and b5["epoch"] == 0  # mid-epoch
    resumed = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "resumed",
                                                  steps + [f"train.resume={ck5}"]), "latest.pth"))
    assert a["step"] == resumed["step"] == 9
    for key in ("model_state", "ema_state"):
        assert _digest(a[key]) == _digest(resumed[key]), key
    assert torch.equal(a["rng"][0]["noise_gen"], resumed["rng"][0]["noise_gen"])
    assert [b["resolution"] + [b["num_frames"]] for b in a["buckets"]] == \
        [[16, 32, 4], [24, 24, 4], [32, 16, 4], [16, 32, 1], [24, 24, 1], [32, 16, 1]]
    assert a["buckets"][0]["latent_shape"] == [4, 4, 4, 8]
    report = json.load(open(os.path.join(straight, "buckets.json")))
    assert sum(x["sources"] for x in report["buckets"]) == 6 + 4 and report["unused"] == []
    log = open(os.path.join(straight, "log.txt")).read()
    assert "bucket 24x24x1: 24x24 pixels, 1 frame(s), batch" in log and "train" in log
    assert "note: buckets with model.positions sincos; rotary positions (model.positions=rope)" in log
    warned = [line for line in open(os.path.join(tmp_path, "resumed", "log.txt")).read().splitlines()
              if "data position" in line]
    assert not warned  # the position was restored, not skipped to the next epoch


def test_the_latent_cache_holds_each_sample_at_its_shape(tmp_path, random_vae):  # noqa: F811
    """Per-frame layout: each source's latents at its bucket's latent size; cached and
    encoded-every-step training take the same steps."""
    steps = [*BUILTIN, "train.max_steps=3", "train.lr_schedule=constant"]
    plain = load_checkpoint(os.path.join(_train(tmp_path, random_vae, "plain", steps), "latest.pth"))
    run = _train(tmp_path, random_vae, "cached", steps + ["data.cache=auto"])
    cached = load_checkpoint(os.path.join(run, "latest.pth"))
    for name, tensor in plain["model_state"].items():
        torch.testing.assert_close(cached["model_state"][name], tensor, rtol=1e-4, atol=1e-5)
    shards = {}
    for f in os.listdir(os.path.join(run, "latent_cache")):
        if f.endswith(".pt"):
            shards.update(torch.load(os.path.join(run, "latent_cache", f), weights_only=True))
    sizes = {tuple(e["mean"].shape[-2:]) for e in shards.values()}
    frames = sorted(e["mean"].shape[1] for e in shards.values())
    assert sizes == {(4, 8), (6, 6), (8, 4)} and frames == [1] * 4 + [8] * 6  # stills: one frame


def test_a_causal_video_vae_encodes_a_still_as_one_latent_frame(tmp_path, vae_families):
    """A Wan-style causal VAE (1 + 4k frames): clips of 5 frames are 2 latent frames, stills
    1; both train in their own buckets."""
    run = _train(tmp_path, vae_families["wan"], "wan", [
        *BUILTIN, "data.num_frames=5", "data.builtin.clip_frames=9", "train.max_steps=2", "data.cache=auto"])
    ckpt = load_checkpoint(os.path.join(run, "latest.pth"))
    shapes = {b["num_frames"]: b["latent_shape"][1] for b in ckpt["buckets"]}
    assert shapes == {5: 2, 1: 1}


@pytest.mark.slow  # two 2-process runs: ~1 min on a quiet 2-core machine
def test_two_processes_draw_one_bucket_per_step_and_resume_exactly(tmp_path, random_vae):  # noqa: F811
    """2 gloo processes on buckets of unequal sizes (one smaller than a global batch): both
    run the same steps, every micro-batch of a step has the same shape on both ranks (the
    all-reduces see the same work), nobody hangs; a 2-process resume from mid-epoch ends
    with the weights of the uninterrupted run."""
    from tests.test_schedule_ddp import _args, _launch
    extra = [*BUILTIN, "data.builtin.num_clips=10", "data.builtin.num_stills=3", "train.lr_schedule=constant",
             "data.cache=auto", "train.grad_accum_steps=2"]
    out = tmp_path / "shapes"
    results = _launch(2, "", out, _args(tmp_path, random_vae, "straight", [*extra, "train.max_steps=8"]))
    for code, text in results:
        assert code == 0, text[-3000:]
    r0, r1 = (torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(r0["shapes"]) >= 16 and r0["shapes"] == r1["shapes"]  # 8 steps of 2 (an odd epoch leaves one)
    assert len({s[2:] for s in r0["shapes"]}) > 2  # several buckets were drawn
    results = _launch(2, "", tmp_path / "part", _args(tmp_path, random_vae, "resumed", [*extra, "train.max_steps=3"]))
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    first = load_checkpoint(os.path.join(tmp_path, "resumed", "latest.pth"))
    assert first["micro"] == 6 and first["epoch"] == 0
    results = _launch(2, "", tmp_path / "rest", _args(tmp_path, random_vae, "resumed",
                                                      [*extra, "train.max_steps=8", "train.resume=auto"]))
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    a = load_checkpoint(os.path.join(tmp_path, "straight", "latest.pth"))
    b = load_checkpoint(os.path.join(tmp_path, "resumed", "latest.pth"))
    assert a["step"] == b["step"] == 8
    for key in ("model_state", "ema_state"):
        assert _digest(a[key]) == _digest(b[key]), key
    rest = [torch.load(f"{tmp_path / 'rest'}.rank{r}.pt", weights_only=True)["shapes"] for r in (0, 1)]
    assert rest[0] == rest[1] == r0["shapes"][6:]  # the same buckets, in the same order


# --------------------------------------------------------------------------- predict, evaluate


@pytest.fixture(scope="module")
def bucketed_run(tmp_path_factory, random_vae):  # noqa: F811
    tmp = tmp_path_factory.mktemp("bucketed")
    # rotary positions (model.positions = rope): predict and evaluate at every bucket with them
    return _train(tmp, random_vae, "run", [*BUILTIN, "train.max_steps=2", "data.cache=auto", "model.positions=rope"])


@pytest.mark.parametrize("extra, shape", [
    ([], (4, 16, 32)),  # null: the trained bucket with the most frames (16x16 was not trained)
    (["resolution=[32,16]"], (4, 32, 16)),
    (["resolution=24", "num_frames=1"], (1, 24, 24)),  # a still bucket
    (["resolution=[16,32]", "num_frames=2"], (2, 16, 32)),  # cut from the 4-frame window
])
def test_predict_samples_any_trained_bucket(bucketed_run, tmp_path, capsys, extra, shape):
    import imageio.v3 as iio
    assert _predict(os.path.join(bucketed_run, "latest.pth"), str(tmp_path / "out"), extra) == 0
    assert iio.imread(str(tmp_path / "out" / "sample_000.gif")).shape[:3] == shape
    out = capsys.readouterr().out
    assert "trained buckets [16, 32] x 4, [24, 24] x 4, [32, 16] x 4" in out and "warning" not in out
    assert load_checkpoint(os.path.join(bucketed_run, "latest.pth"))["model"]["config"]["positions"] == "rope"
    assert "note: buckets" not in open(os.path.join(bucketed_run, "log.txt")).read()  # rope: no advice


def test_predict_warns_for_an_untrained_shape_and_refuses_one_the_patch_cannot_tile(bucketed_run, tmp_path, capsys):
    import imageio.v3 as iio
    ckpt = os.path.join(bucketed_run, "latest.pth")
    assert _predict(ckpt, str(tmp_path / "a"), ["resolution=[24,40]"]) == 0
    assert iio.imread(str(tmp_path / "a" / "sample_000.gif")).shape[:3] == (4, 24, 40)
    assert "warning: 24x40 pixels x 4 frames was not trained (trained: [16, 32] x 4" in capsys.readouterr().out
    from utils.errors import UserError
    with pytest.raises(UserError, match=r"resolution = \[20, 32\]: height 20 is not divisible by the VAE factor "
                                        r"4 x the model's patch 2 = 8; pick a multiple of 8 \(16 or 24\); trained: "):
        _predict(ckpt, str(tmp_path / "b"), ["resolution=[20,32]"])


def test_evaluate_scores_a_trained_bucket(bucketed_run, tmp_path):
    from tests.test_evaluate import StandInI3D, _evaluate
    detector = str(tmp_path / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.script(StandInI3D()), detector)
    result = _evaluate([f"checkpoint={os.path.join(bucketed_run, 'latest.pth')}", "num_videos=4", "num_steps=2",
                        f"fvd.detector_path={detector}", "data.resolution=[32,16]", "fvd.batch_size=4"], tmp_path)
    assert result["protocol"]["generated"]["resolution"] == [32, 16] and result["num_real"] == 4
