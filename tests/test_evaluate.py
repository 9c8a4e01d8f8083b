"""FVD (Frechet math, the evaluate.py protocol end to end with a stand-in detector), and the
held-out validation loss of stage 2 (logged, deterministic across runs and resumes)."""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from tests.test_stage2 import ROOT, _train, random_vae  # noqa: F401  (random_vae is a fixture)
from utils.config import EvaluateConfig, load_config
from utils.errors import ConfigError, MissingFileError, UserError
from utils.fvd import (FeatureStats, frechet_distance, fvd_from_stats, kernel_inception_distance,
                       trace_sqrt_product)
from utils.video_io import write_video


# --------------------------------------------------------------------------- Frechet math


def _reference_trace_sqrt(s1, s2, iters=60):
    """tr sqrtm(S1 S2) by the Denman-Beavers iteration on the (non-symmetric) product, as
    scipy.linalg.sqrtm(S1 @ S2) would be used in StyleGAN-V: an independent algorithm."""
    y, z = s1 @ s2, np.eye(len(s1))
    for _ in range(iters):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return np.trace(y)


def _features(seed, n=300, d=12, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


def _stats(x):
    s = FeatureStats()
    s.add(torch.from_numpy(x))
    return s


def test_identical_sets_give_zero():
    s = _stats(_features(0))
    assert abs(fvd_from_stats(s, s)) < 1e-9
    assert trace_sqrt_product(*[s.mean_cov()[1]] * 2) == pytest.approx(np.trace(s.mean_cov()[1]), rel=1e-12)


def test_mean_shift_only_gives_squared_distance_of_means():
    x = _features(1)
    shift = np.linspace(-1.0, 2.0, x.shape[1])
    d = fvd_from_stats(_stats(x), _stats(x + shift))
    assert d == pytest.approx(float(np.square(shift).sum()), rel=1e-9)


def test_diagonal_covariances_closed_form():
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, 0.0, 2.0])
    expected = 5.0 + float(np.square(np.sqrt(a) - np.sqrt(b)).sum())  # 5 + (1 + 1 + 0 + 0.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_matches_a_reference_implementation_on_fixed_features():
    real, gen = _stats(_features(2)), _stats(_features(3, shift=0.3, scale=1.5))
    (mu_g, s_g), (mu_r, s_r) = gen.mean_cov(), real.mean_cov()
    ref = float(np.square(mu_g - mu_r).sum() + np.trace(s_g) + np.trace(s_r)
                - 2 * _reference_trace_sqrt(s_g, s_r))
    eig = np.sqrt(np.clip(np.linalg.eigvals(s_g @ s_r).real, 0, None)).sum()  # a third way
    assert fvd_from_stats(real, gen) == pytest.approx(ref, rel=1e-9)
    assert trace_sqrt_product(s_g, s_r) == pytest.approx(eig, rel=1e-9)
    assert fvd_from_stats(real, gen) > 1.0


def test_feature_stats_are_streamed_exactly():
    x = _features(4, n=50)
    whole, parts = _stats(x), FeatureStats()
    for chunk in np.array_split(x, 7):
        parts.add(torch.from_numpy(chunk))
    mean, cov = parts.mean_cov()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.T, bias=True), rtol=1e-9, atol=1e-12)  # biased, as StyleGAN-V
    merged = FeatureStats.from_packed(_stats(x[:20]).packed() + _stats(x[20:]).packed(), x.shape[1])
    np.testing.assert_allclose(merged.mean_cov()[1], whole.mean_cov()[1], rtol=1e-9, atol=1e-12)
    # Fewer samples than features (rank-deficient covariances) stays finite and >= 0.
    few = FeatureStats()
    few.add(torch.from_numpy(_features(5, n=4, d=30)))
    assert 0 < fvd_from_stats(few, _stats(_features(6, n=5, d=30))) < np.inf


def test_kid_matches_the_unbiased_mmd_by_definition():
    x, y = _features(7, n=40, d=6).astype(np.float32), _features(8, n=30, d=6, shift=0.5).astype(np.float32)
    k = lambda a, b: (float(a @ b) / 6 + 1) ** 3
    xx, yy = [np.float64(v) for v in x], [np.float64(v) for v in y]
    m = 30  # one subset of all 30 of y and 30 of x: the estimator by its definition
    sub = x[np.random.default_rng(0).choice(40, m, replace=False)].astype(np.float64)
    within = sum(k(a, b) for i, a in enumerate(sub) for j, b in enumerate(sub) if i != j) + \
        sum(k(a, b) for i, a in enumerate(yy) for j, b in enumerate(yy) if i != j)
    cross = sum(k(a, b) for a in sub for b in yy)
    expected = within / (m * (m - 1)) - 2 * cross / m ** 2
    got = kernel_inception_distance(y, x, num_subsets=1, max_subset_size=1000, seed=0)
    assert got == pytest.approx(expected, rel=1e-9)
    # 30 of x against 30 of y: the subsets are the whole sets, so any seed gives the estimator
    # over every pair of xx[:30] and yy.
    within = sum(k(a, b) for i, a in enumerate(xx[:30]) for j, b in enumerate(xx[:30]) if i != j) + \
        sum(k(a, b) for i, a in enumerate(yy) for j, b in enumerate(yy) if i != j)
    whole = within / (m * (m - 1)) - 2 * sum(k(a, b) for a in xx[:30] for b in yy) / m ** 2
    for seed in (0, 5):
        assert kernel_inception_distance(y, x[:30], 1, 1000, seed) == pytest.approx(whole, rel=1e-9)
    z = _features(9, n=800, d=6)  # one distribution, two halves
    same = kernel_inception_distance(z[:400], z[400:], 20, 200)
    assert abs(same) < 0.1 * kernel_inception_distance(y, x, 20, 25)  # same distribution: ~0


# --------------------------------------------------------------------------- stand-in detectors


class StandInI3D(torch.nn.Module):
    """The I3D TorchScript's call signature on a tiny random network: (N, 3, T, H, W) uint8 in
    [0, 255] -> (N, 400). Refuses any other call, so the test checks StyleGAN-V's kwargs and
    input dtype (StyleGAN-V passes uint8 videos)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8, 400)

    def forward(self, videos: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        if videos.dtype != torch.uint8:
            raise RuntimeError("expected uint8 videos in [0, 255]")
        x = videos.float() / 127.5 - 1
        x = F.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        x = F.adaptive_avg_pool3d(torch.relu(self.conv(x)), (1, 2, 4)).flatten(1)  # (N, 64)
        return self.fc(x)


class StandInInception(torch.nn.Module):
    """The Inception TorchScript's call: uint8 frames (N, 3, H, W) -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 16, 2048)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if images.dtype != torch.uint8 or not return_features:
            raise RuntimeError("expected uint8 frames and return_features=True")
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(images.float() / 127.5 - 1)), (4, 4))
        return self.fc(x.flatten(1))  # (N, 2048)


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt")
    torch.jit.save(torch.jit.script(StandInInception()), path)
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.script(StandInI3D()), path)
    return path


def _write_clips(folder, videos):
    os.makedirs(folder, exist_ok=True)
    for i, frames in enumerate(videos):
        write_video(os.path.join(folder, f"clip_{i:03d}.mp4"), frames, 8)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Real clips (built-in shapes, 8 frames of 32 x 32) and random-noise videos, as mp4."""
    from data import build_dataset
    from utils.config import DataConfig
    from utils.video_io import video_tensor_to_uint8
    root = tmp_path_factory.mktemp("clips")
    cfg = DataConfig(num_frames=8, resolution=32, window_stride=8)
    cfg.builtin.num_clips = 10
    ds = build_dataset(cfg, "train", 0)
    real = [video_tensor_to_uint8(ds[i * ds.windows]["video"]) for i in range(10)]  # one per clip
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8) for _ in range(10)]
    _write_clips(str(root / "real"), real)
    _write_clips(str(root / "noise"), noise)
    return str(root / "real"), str(root / "noise")


def _evaluate(args, tmp_path, name="out.json"):
    out = str(tmp_path / name)
    assert evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu",
                          f"output={out}", *args]) == 0
    return json.load(open(out))


def test_real_clips_against_themselves_score_far_below_noise(detector, inception, clip_folders, tmp_path,
                                                           capsys):
    real, noise = clip_folders
    common = [f"data.path={real}", "data.num_frames=8", "data.resolution=32", "num_videos=10",
              "data.val_fraction=0", f"fvd.detector_path={detector}", "fvd.batch_size=5",
              f"fid.detector_path={inception}", "fid.batch_size=16", "fid.kid_subsets=10"]
    same = _evaluate(common + [f"generated.path={real}"], tmp_path, "same.json")
    rand = _evaluate(common + [f"generated.path={noise}"], tmp_path, "noise.json")
    assert rand["fvd"] > 0 and abs(same["fvd"]) < rand["fvd"] / 10, (same["fvd"], rand["fvd"])
    assert abs(same["fvd"]) < 1e-3 * rand["fvd"]  # each video's only window is the generated one
    p = rand["protocol"]
    assert rand["num_generated"] == rand["num_real"] == 10
    assert p["real"]["num_frames"] == 8 and p["real"]["frame_stride"] == 1 and p["real"]["split"] == "all"
    assert p["real"]["num_videos"] == 10 and p["generated"]["source"] == "folder"
    assert p["detector"]["kwargs"] == {"rescale": True, "resize": True, "return_features": True}
    lines = [l for l in capsys.readouterr().out.splitlines() if l.split(" ")[0] in ("FVD", "FID", "KID")]
    assert [l.split(" ")[0] for l in lines] == ["FVD", "FID", "KID"] * 2
    assert re.match(r"FVD [\d.]+ \(10 generated vs 10 real clips of 8 frames", lines[3])
    assert re.match(r"FID [\d.]+ \(per frame: 80 generated vs 80 real frames", lines[4])
    # Per-frame FID and KID (stand-in Inception): near 0 for the same frames, far above for noise.
    assert abs(same["fid"]) < 1e-3 * rand["fid"] and rand["fid"] > 0
    assert abs(same["kid"]) < rand["kid"] / 10 and rand["kid"] > 0
    assert rand["num_real_frames"] == rand["num_generated_frames"] == 80


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, random_vae):
    run = _train(str(tmp_path_factory.mktemp("ckpt")), random_vae, "run", ["train.max_steps=2"])
    return os.path.join(run, "latest.pth")


def test_checkpoint_form_is_deterministic_and_pins_the_protocol(detector, tiny_checkpoint, tmp_path,
                                                                monkeypatch):
    import training.evaluation as ev
    args = [f"checkpoint={tiny_checkpoint}", "num_videos=6", "num_steps=3", "sampler=ddim",
            f"fvd.detector_path={detector}", "batch_size=4"]
    a = _evaluate(args, tmp_path, "a.json")
    b = _evaluate(args, tmp_path, "b.json")
    assert a["fvd"] == b["fvd"] and a["fvd"] > 0  # identical settings, identical number
    assert a["protocol"] == b["protocol"]
    r, g = a["protocol"]["real"], a["protocol"]["generated"]
    # Geometry and data default to the checkpoint's (TINY: 4 frames of 16 x 16, 6 built-in clips).
    assert (r["path"], r["num_frames"], r["resolution"], r["num_videos"]) == ("builtin:moving_shapes", 4, 16, 6)
    assert g["source"] == "checkpoint" and g["step"] == 2 and g["weights"] == "EMA" and g["num_steps"] == 3
    # Predict called per chunk of 3 (video i keeps seed + i and predict's label for i).
    monkeypatch.setattr(ev, "GENERATION_CHUNK", 3)
    assert _evaluate(args, tmp_path, "c.json")["fvd"] == pytest.approx(a["fvd"], rel=1e-5)


def test_missing_detector_exits_2_and_says_what_it_is(tmp_path, monkeypatch, capsys):
    from utils.cli import run_main
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--config", os.path.join(ROOT, "evaluate.yaml"),
                                      "device=cpu", f"generated.path={tmp_path}",
                                      f"fvd.detector_path={tmp_path}/nope.pt"])
    with pytest.raises(SystemExit) as e:
        run_main(evaluate.main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for words in ("nope.pt", "i3d_torchscript.pt", "fvd.detector_path", "never downloads"):
        assert words in err


def test_evaluate_config_errors():
    path = os.path.join(ROOT, "evaluate.yaml")
    with pytest.raises(ConfigError, match="exactly one of checkpoint"):
        load_config(EvaluateConfig, path, [])
    with pytest.raises(ConfigError, match="exactly one of checkpoint"):
        load_config(EvaluateConfig, path, ["checkpoint=a.pth", "generated.path=b"])
    with pytest.raises(ConfigError, match="fvd.detector_pth"):
        load_config(EvaluateConfig, path, ["checkpoint=a.pth", "fvd.detector_pth=x"])
    with pytest.raises(MissingFileError, match="fvd.detector_path is not set"):
        evaluate.main(["--config", path, "checkpoint=a.pth", "device=cpu"])


def test_real_frames_must_match_the_checkpoint(detector, tiny_checkpoint):
    with pytest.raises(UserError, match="data.num_frames = 8 .* generates 4 frames"):
        evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu",
                       f"checkpoint={tiny_checkpoint}", f"fvd.detector_path={detector}",
                       "data.num_frames=8"])


def test_too_few_generated_videos_is_refused(detector, clip_folders, tmp_path):
    real, _ = clip_folders
    with pytest.raises(UserError, match="generated.path = .*nowhere: no such folder"):
        evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu",
                       f"generated.path={tmp_path}/nowhere", f"data.path={real}",
                       f"fvd.detector_path={detector}"])
    with pytest.raises(UserError, match="has 10 usable videos .* fewer than num_videos = 20"):
        evaluate.main(["--config", os.path.join(ROOT, "evaluate.yaml"), "device=cpu",
                       f"generated.path={real}", f"data.path={real}", "num_videos=20",
                       f"fvd.detector_path={detector}"])


# --------------------------------------------------------------------------- stage 2: val/loss and val/fvd


def _val_lines(run):
    return [re.sub(r"^\S+ \S+ ", "", l) for l in open(os.path.join(run, "log.txt"))
            if re.search(r" step \d+ val/loss ", l)]


@pytest.mark.slow
def test_val_loss_logged_and_deterministic_across_runs_and_resume(tmp_path, random_vae, detector,
                                                                  monkeypatch):
    """Validation every epoch (6 batches): at step 6 and at the end (8). A second run, resumed
    from the first one's step-6 checkpoint (written before that validation), logs the same
    val/loss lines: the held-out loss depends on the weights only."""
    import training.stage2 as stage2
    ck6, original_save = os.path.join(tmp_path, "step6.pth"), stage2.save

    def spy_save(s, name="latest.pth", **kw):
        original_save(s, name, **kw)
        if s.pos.step == 6 and name == "latest.pth" and not os.path.exists(ck6):
            shutil.copy(os.path.join(s.run_dir, name), ck6)

    monkeypatch.setattr(stage2, "save", spy_save)
    steps = ["train.max_steps=8", "data.cache=off", "validation.every_epochs=1", "validation.num_videos=1", "validation.loss_clips=5",
             "data.builtin.num_val_clips=3", f"validation.fvd.detector_path={detector}",
             "validation.fvd.num_videos=4", "train.checkpoint_every=6"]
    a = _train(str(tmp_path), random_vae, "a", steps)
    monkeypatch.setattr(stage2, "save", original_save)
    la = _val_lines(a)
    assert [l.split()[1] for l in la] == ["6", "8"]
    assert "on 5 held-out clips" in la[0]
    torch.manual_seed(123)  # val/loss must not depend on the process's RNG state
    resumed = _train(str(tmp_path), random_vae, "d", steps + [f"train.resume={ck6}"])
    assert _val_lines(resumed) == la
    fvd_lines = [l for l in open(os.path.join(a, "log.txt")) if "FVD" in l]
    assert len(fvd_lines) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(a, "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"val/loss", "val/loss_raw", "val/fvd"} <= set(tags)
    assert sum(t.startswith("val_loss_by_t/") for t in tags) == 10
    assert [e.step for e in acc.Scalars("val/fvd")] == [6, 8]
    assert all(np.isfinite(e.value) and e.value > 0 for e in acc.Scalars("val/fvd"))


def _scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_the_docs_claim_val_fvd_is_evaluates_number_only_for_the_models_it_holds_for():
    """val/fvd equals evaluate.py's number for unconditional and class models (tested below),
    but a text model's val/fvd prompts are the validation prompts and evaluate's the real clips'
    captions: docs/evaluation.md and _val_fvd's docstring must say so, not claim it for every model."""
    import training.validation as validation
    docs = " ".join(open(os.path.join(ROOT, "docs", "evaluation.md")).read().split())
    claim = docs[docs.index("`real.split=train` gives the same number") - 200:][:700]
    assert "For a text model it does not" in claim and "caption of real clip i" in claim
    doc = " ".join(validation._val_fvd.__doc__.split())
    assert "Text models: not that number" in doc


@pytest.mark.slow
def test_two_process_val_fvd_equals_evaluate_py(tmp_path, random_vae, detector):
    """val/fvd with 2 processes (3 videos: uneven shares, gathered) is evaluate.py's number
    for the same checkpoint, sampler, seeds and real windows."""
    from tests.test_ddp import _run
    run, _ = _run(2, 2, tmp_path, random_vae, "ddp", [
        "train.max_steps=2", "validation.every_epochs=1", f"validation.fvd.detector_path={detector}",
        "validation.fvd.num_videos=3", "validation.loss_clips=3", "data.builtin.num_val_clips=2"])
    (step, in_loop), = _scalars(run, "val/fvd")
    assert step == 2 and len(_scalars(run, "val/loss")) == 1
    import yaml
    v = yaml.safe_load(open(os.path.join(run, "config.yaml")))["validation"]
    out = _evaluate([f"checkpoint={run}/latest.pth", "num_videos=3", f"sampler={v['sampler']}",
                     f"num_steps={v['num_steps']}", f"guidance_scale={v['guidance_scale']}",
                     f"seed={v['seed']}", f"real.seed={v['seed']}", f"fvd.detector_path={detector}"],
                    tmp_path)
    assert out["fvd"] == pytest.approx(in_loop, rel=1e-4)
