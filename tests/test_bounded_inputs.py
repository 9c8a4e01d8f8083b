"""Inputs that reached a traceback or unbounded work (issue 27, items 10 and 11): each is
refused before any work with a message naming the value and what to do (exit status 2), and
the advice, taken, works.

| input                                                        | mechanism                                  | test |
|--------------------------------------------------------------|--------------------------------------------|------|
| an image whose header claims more than PIL's pixel limit      | DecompressionBombError is no OSError        | test_an_image_beyond_pils_pixel_limit_is_named |
| text_encoder.max_length = 10^7 (T5)                           | only learned positions (CLIP) were a limit  | test_max_length_beyond_the_models_limit_is_refused_before_padding |
| predict seed beyond int64; negative seeds                     | int settings were unbounded                 | test_a_seed_beyond_64_bits_exits_2_and_the_largest_allowed_works |
| data.resolution = [8192, 8192] on built-in data               | nothing estimated memory before allocating  | test_a_resolution_that_cannot_fit_is_refused_before_allocating |
| drift.py: a stage-1 checkpoint; --json a folder                | read before checked; written after sampling | test_drift_refuses_a_stage1_checkpoint_and_a_json_folder_first |
| time_to_quality.py --runs-dir FILE, bench scripts' --json      | paths used unchecked                        | test_benchmark_paths_are_checked_before_any_work |
| make_tiny_text_encoder.py --out FILE (and its stray temp)      | the temp folder was made beside any path    | test_make_tiny_text_encoder_out_file_exits_2_and_leaves_nothing |
| predict num_frames = 10^6, evaluate windows = 10^6            | unbounded; the window plan was quadratic    | test_long_videos_and_many_windows_are_refused_at_load, test_the_window_plan_is_linear |
"""
import io
import os
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import predict_advanced
import train_advanced
from tests.test_bad_input import _assert_user_error_exit, _cli
from tests.test_predict_output import _args, checkpoint  # noqa: F401  (checkpoint is a fixture)
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (random_vae: a fixture of checkpoint)
from utils.config import (MAX_SEED, MAX_VIDEO_FRAMES, MAX_WINDOWS, EvaluateConfig, PredictConfig,
                          TrainRunConfig, load_config)
from utils.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")
PREDICT_YAML = os.path.join(ROOT, "predict_advanced.yaml")
EVAL_YAML = os.path.join(ROOT, "evaluate.yaml")


# --------------------------------------------------------------------------- item 11: bounded work


def _plan_by_sums(num_frames, window, overlap):
    """The old window plan (sum(plan) in the loop): the reference for small sizes."""
    if num_frames <= window:
        return [num_frames]
    plan = [window]
    while sum(plan) < num_frames:
        plan.append(min(window - overlap, num_frames - sum(plan)))
    return plan


def test_the_window_plan_is_linear():
    from training.first_frames import window_plan, windows_of
    for n in range(1, 40):
        for window, overlap in ((4, 1), (8, 1), (9, 5), (5, 4)):
            assert window_plan(n, window, overlap) == _plan_by_sums(n, window, overlap)
            assert sum(window_plan(n, window, overlap)) == n
    start = time.perf_counter()
    plan = window_plan(300_000, 8, 1)  # 42858 windows: the quadratic plan took seconds here
    spans = windows_of(300_000, 8, 1)
    assert time.perf_counter() - start < 0.5
    assert sum(plan) == 300_000 and len(spans) == len(plan) and spans[-1][1] == 300_000


def test_long_videos_and_many_windows_are_refused_at_load():
    with pytest.raises(ConfigError) as e:
        load_config(PredictConfig, PREDICT_YAML, ["num_frames=1000000"])
    assert "num_frames = 1000000" in str(e.value) and f"at most {MAX_VIDEO_FRAMES}" in str(e.value)
    assert load_config(PredictConfig, PREDICT_YAML, [f"num_frames={MAX_VIDEO_FRAMES}"]).num_frames == MAX_VIDEO_FRAMES
    with pytest.raises(ConfigError) as e:
        load_config(EvaluateConfig, EVAL_YAML, ["checkpoint=x.pth", "windows=1000000"])
    assert "windows = 1000000" in str(e.value) and f"use at most {MAX_WINDOWS}" in str(e.value)
    assert load_config(EvaluateConfig, EVAL_YAML, ["checkpoint=x.pth", f"windows={MAX_WINDOWS}"]).windows == MAX_WINDOWS


# --------------------------------------------------------------------------- item 10: tracebacks


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims width x height pixels (a 'decompression bomb' header)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_an_image_beyond_pils_pixel_limit_is_named(tmp_path):
    """predict's `image` and a frame folder: named (too large, resize it), no traceback; the
    frame folder is skipped like any unreadable source. Resized, the image loads."""
    from training.first_frames import load_image
    from utils.video_io import read_frames
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(_png_claiming(30_000, 30_000))
    with pytest.raises(UserError) as e:
        load_image(str(bomb), 16, 16)
    assert str(bomb) in str(e.value) and "too large" in str(e.value) and "resize" in str(e.value)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "frame_0.png").write_bytes(_png_claiming(30_000, 30_000))
    with pytest.raises(UserError, match="too large"):
        read_frames(str(folder), [0])
    Image.fromarray(np.zeros((4096, 64, 3), np.uint8)).save(bomb)  # the advice: resized
    assert load_image(str(bomb), 16, 16).shape == (3, 16, 16)


def test_max_length_beyond_the_models_limit_is_refused_before_padding(text_encoders, capsys):
    """T5 has no position table, so nothing bounded max_length: the probe encode padded a
    caption to 10^8 tokens (an allocation of L x width). Its tokenizer's model_max_length is
    the limit now, checked before anything is padded; beyond any encoder, the config refuses."""
    from models.text_encoder import FrozenTextEncoder
    from tests.text_fixtures import MAX_LENGTH
    for kind in ("t5", "umt5"):
        with pytest.raises(ConfigError) as e:
            FrozenTextEncoder.from_pretrained(text_encoders[kind], max_length=10 ** 7)
        assert f"text_encoder.max_length = {10 ** 7}" in str(e.value)
        assert f"takes at most {MAX_LENGTH} tokens" in str(e.value) and f"use at most {MAX_LENGTH}" in str(e.value)
    assert FrozenTextEncoder.from_pretrained(text_encoders["t5"], max_length=MAX_LENGTH).max_length == MAX_LENGTH
    with pytest.raises(ConfigError, match="text_encoder.max_length = 100000000: must be 1 to 4096 tokens"):
        load_config(TrainRunConfig, None, ["vae.path=x", "text_encoder.max_length=100000000"])


def test_a_seed_beyond_64_bits_exits_2_and_the_largest_allowed_works(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    for seed, words in ((2 ** 70, "does not fit in 64 bits"), (-3, "must be between 0 and")):
        code, _, err = _cli(predict_advanced, _args(checkpoint, out, "num_videos=2", f"seed={seed}"), capsys)
        _assert_user_error_exit(code, err, f"seed = {seed}", words)
    code, _, err = _cli(predict_advanced, _args(checkpoint, out, "num_videos=2", f"seed={MAX_SEED}"), capsys)
    _assert_user_error_exit(code, err, f"must be between 0 and {MAX_SEED - 1}")
    assert predict_advanced.main(_args(checkpoint, out, "num_videos=2", f"seed={MAX_SEED - 1}")) == 0
    assert os.path.isfile(out / "sample_001.mp4")
    for override, words in (("experiment.seed=-1", "experiment.seed = -1"),
                            ("validation.seed=9223372036854775807", "validation.seed"),
                            ("experiment.seed=9223372036854775807", "experiment.seed")):
        with pytest.raises(ConfigError, match=words):
            load_config(TrainRunConfig, None, ["vae.path=x", override])


def _train_args(tmp_path, vae, *extra):
    return ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={tmp_path / 'runs'}", "experiment.name=run", "train.max_steps=1", *extra]


def test_a_resolution_that_cannot_fit_is_refused_before_allocating(tmp_path, trained_vae, monkeypatch, capsys):
    """data.resolution = [8192, 8192] on built-in data (the documented maximum) allocated until
    torch's allocator failed with a traceback. Now the pixels of one batch, then one VAE call,
    are estimated first against the memory available (fixed here, so that the test does not
    depend on the machine), and the advice works."""
    import utils.train_utils
    monkeypatch.setattr(utils.train_utils, "available_memory", lambda: 8 * 2 ** 30)
    code, _, err = _cli(train_advanced, _train_args(tmp_path, trained_vae, "data.resolution=[8192,8192]"), capsys)
    _assert_user_error_exit(code, err, "data.resolution = [8192, 8192]", "one batch of pixel clips needs about",
                            "more than the 8.0 GiB", "lower data.resolution")
    assert not os.path.exists(tmp_path / "runs" / "run" / "latest.pth")
    # one clip of one frame fits as pixels, but not one VAE call at that size (the fixture VAE)
    small = ["data.resolution=[8192,8192]", "data.num_frames=1", "train.batch_size=1"]
    code, _, err = _cli(train_advanced, _train_args(tmp_path, trained_vae, *small), capsys)
    _assert_user_error_exit(code, err, "one VAE encode call at this size needs at least", "vae.tiling: true")
    # the advice at a size this machine trains in seconds: memory made scarce, then vae.tiling
    monkeypatch.setattr(utils.train_utils, "available_memory", lambda: 2 ** 20)
    code, _, err = _cli(train_advanced, _train_args(tmp_path, trained_vae, "data.resolution=64"), capsys)
    _assert_user_error_exit(code, err, "one VAE encode call", "set vae.tiling: true")
    assert train_advanced.main(_train_args(tmp_path, trained_vae, "data.resolution=64", "vae.tiling=true")) == 0


def _stage1_checkpoint(tmp_path):
    import torch

    from training.checkpoints import STAGE1_FORMAT
    path = tmp_path / "vae_run" / "latest.pth"
    path.parent.mkdir()
    torch.save({"format": STAGE1_FORMAT, "step": 3, "model_state": {}}, path)
    return str(path)


def test_drift_refuses_a_stage1_checkpoint_and_a_json_folder_first(tmp_path, checkpoint, monkeypatch, capsys):
    import benchmarks.drift as drift
    import training.sampling
    from utils.cli import run_main
    monkeypatch.setattr(training.sampling, "sample_videos", lambda *a: pytest.fail("sampled"))

    def exit_code(args):
        with pytest.raises(SystemExit) as e:
            run_main(lambda argv: drift.main(args))
        return e.value.code, capsys.readouterr().err
    code, err = exit_code(["--config", PREDICT_YAML, f"checkpoint={_stage1_checkpoint(tmp_path)}", "device=cpu"])
    _assert_user_error_exit(code, err, "is a stage-1 (VAE) checkpoint", "train_advanced.py")
    code, err = exit_code(["--config", PREDICT_YAML, f"checkpoint={checkpoint}", "--json", str(tmp_path)])
    _assert_user_error_exit(code, err, f"--json = {tmp_path}: is a folder; give a file name")
    code, err = exit_code(["--windows", str(MAX_WINDOWS + 1)])
    assert code == 2 and f"give 1 to {MAX_WINDOWS} windows" in err


def test_benchmark_paths_are_checked_before_any_work(tmp_path, capsys):
    """time_to_quality.py --runs-dir naming a file, and --json naming a folder, exit 2 before
    any training; the same --json check guards every benchmark that writes one."""
    from benchmarks.time_to_quality import main
    from utils.cli import run_main
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, words in ((["--runs-dir", str(a_file)], f"--runs-dir = {str(a_file)!r} is a file"),
                        (["--json", str(tmp_path)], "is a folder; give a file name")):
        with pytest.raises(SystemExit) as e:
            run_main(lambda argv: main(["--quick", "--recipe", "a:train.lr=1e-3", *args]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    for script in ("bench.py", "data_bench.py", "vae_bench.py", "shape_coherence.py", "drift.py",
                   "time_to_quality.py"):
        source = open(os.path.join(ROOT, "benchmarks", script)).read()
        assert "check_output_file(" in source, f"{script} writes --json unchecked"


def test_make_tiny_text_encoder_out_file_exits_2_and_leaves_nothing(tmp_path, capsys):
    import importlib.util

    from utils.cli import run_main
    spec = importlib.util.spec_from_file_location(
        "make_tiny_text_encoder", os.path.join(ROOT, "scripts", "make_tiny_text_encoder.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: script.main(["--out", str(a_file)]))
    err = capsys.readouterr().err
    _assert_user_error_exit(e.value.code, err, f"--out {a_file}: is a file, not a folder")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and a_file.read_text() == "mine"  # no stray temp
    from models.text_encoder import make_tiny_text_encoder
    with pytest.raises(UserError, match="is a file"):
        make_tiny_text_encoder(str(a_file), ["a"])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert script.main(["--out", str(tmp_path / "encoder")]) == 0  # the advice: a folder path
    assert sorted(os.listdir(tmp_path)) == ["encoder", "notes.txt"]
