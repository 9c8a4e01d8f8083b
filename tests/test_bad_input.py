"""Bad input: each case fails (or warns) with a message naming the file / key / value, and
nothing is lost (an existing run's latest.pth and config.yaml stay byte-identical).

Where each item of issue 5 is tested (items tested elsewhere are not repeated here):

| bad input                                   | test                                                    |
|---------------------------------------------|---------------------------------------------------------|
| missing config file                         | test_config.py::test_missing_config_file (in-process);  |
|                                             | here test_missing_config_file_exits_2 (subprocess)      |
| unknown / mistyped key                      | test_config.py::test_config_errors_name_the_key;        |
|                                             | here test_mistyped_key_exits_2 (subprocess, predict)    |
| wrong type                                  | test_config.py::test_config_errors_name_the_key;        |
|                                             | here test_wrong_type_exits_2 (entry script, run kept)   |
| invalid YAML                                | test_config.py::test_bad_yaml_names_file                |
| resolution not divisible by VAE x patch     | test_resolution_not_divisible_keeps_the_run             |
|   (stage 1: VAE factor only)                | test_config.py::test_vae_resolution_must_divide         |
| num_frames longer than every video          | test_num_frames_longer_than_every_video (end to end);   |
|                                             | test_data.py::test_all_clips_too_short_says_what_to_change, |
|                                             | test_builtin.py::test_no_window_fits_names_the_keys     |
| missing VAE directory                       | test_missing_vae_dir_exits_2 (subprocess)               |
| corrupt VAE directory (garbage weights)     | test_corrupt_vae_dir_is_refused                         |
| checkpoint from another model (resume)      | test_stage2.py::test_resume_refuses_other_model         |
| checkpoint made with another VAE            | test_stage2.py::test_resume_refuses_a_different_vae,    |
|                                             | test_stage2.py::test_predict_refuses_a_different_vae    |
| corrupt / truncated checkpoint: predict     | test_truncated_checkpoint_predict_exits_2 (subprocess)  |
| corrupt / truncated checkpoint: resume      | test_truncated_checkpoint_resume_keeps_the_file         |
| truncated video, zero-byte file, non-video  | test_data.py::test_bad_files_are_skipped_with_one_warning |
|   with a video extension: skipped + warning | (dataset); here test_bad_files_warn_in_the_log_and_training_runs |
|                                             | (end to end, warnings reach log.txt)                   |
| truncated "faststart" mp4 (index up front)  | test_truncated_faststart_mp4_is_skipped                 |
| frame folder with gaps: warning             | test_data.py::test_frame_folder_with_gap_warns_and_loads_in_order; |
|                                             | here in test_bad_files_warn_in_the_log_and_training_runs |
| output directory not writable (predict)     | test_unwritable_output_dir_exits_2 (subprocess)         |
| CUDA out of memory                          | test_out_of_memory_suggests_smaller_batch               |
| fresh start over an existing run            | test_stage2.py::test_fresh_start_does_not_overwrite     |
| disk full, NaN losses, kill -9, SIGTERM     | test_fault_tolerance.py                                 |
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import predict_advanced
import train_advanced
from models.dit import VideoDiT
from tests.conftest import smooth_frames, write_frame_folder
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (random_vae is a fixture)
from utils.cli import run_main
from utils.errors import UserError
from utils.video_io import write_video

KEPT = ("latest.pth", "config.yaml")  # what a failed command must leave untouched


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, random_vae):
    """A finished 2-step tiny run; tests copy it so they cannot disturb each other."""
    runs = tmp_path_factory.mktemp("runs")
    assert train_advanced.main(_train_args(runs, random_vae, ["train.max_steps=2"])) == 0
    return str(runs / "run")


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of `trained_run` at <tmp>/runs/run, and a snapshot of the files that must survive."""
    path = str(tmp_path / "runs" / "run")
    shutil.copytree(trained_run, path)
    return path


def _train_args(runs_dir, vae, extra=()):
    return ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={runs_dir}", "experiment.name=run", *extra]


def _resume_args(run, vae, extra=()):
    return _train_args(os.path.dirname(run), vae, ["train.max_steps=4", "train.resume=auto", *extra])


def _snapshot(run):
    return {name: open(os.path.join(run, name), "rb").read() for name in KEPT}


def _cli(module, args, capsys):
    """Run an entry point like the command line does (run_main): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: module.main(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _script(name, args):
    """Run an entry script as a real process from the repo root."""
    return subprocess.run([sys.executable, name, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _assert_user_error_exit(code, err, *words):
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err, err  # (a progress bar may precede it)
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


# --------------------------------------------------------------------------- config


def test_missing_config_file_exits_2(run, random_vae):
    before = _snapshot(run)
    missing = os.path.join(os.path.dirname(run), "nope.yaml")
    args = _resume_args(run, random_vae)
    args[1] = missing
    proc = _script("train_advanced.py", args)
    _assert_user_error_exit(proc.returncode, proc.stderr, f"config file not found: {missing}")
    assert _snapshot(run) == before


def test_mistyped_key_exits_2(run, tmp_path):
    before = _snapshot(run)
    out = tmp_path / "out"
    proc = _script("predict_advanced.py", ["--config", "predict_advanced.yaml", "device=cpu",
                                           f"checkpoint={run}/latest.pth", f"output_dir={out}",
                                           "num_step=3"])
    _assert_user_error_exit(proc.returncode, proc.stderr, "unknown config key 'num_step'",
                            "did you mean num_steps?")
    assert not out.exists() and _snapshot(run) == before


def test_wrong_type_exits_2(run, random_vae, capsys):
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(run, random_vae, ["train.batch_size=two"]), capsys)
    _assert_user_error_exit(code, err, "train.batch_size = 'two': expected an integer")
    assert _snapshot(run) == before


def test_resolution_not_divisible_keeps_the_run(run, random_vae, capsys):
    """20 px is a multiple of the VAE's 4x but not of 4 x patch 2 = 8: refused at setup."""
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(run, random_vae, ["data.resolution=20"]), capsys)
    _assert_user_error_exit(code, err, "data.resolution = 20", "VAE factor 4 x model.patch_size 2 = 8")
    assert _snapshot(run) == before  # config.yaml too: it is written only once setup succeeded


# --------------------------------------------------------------------------- data


def _short_videos(folder, frames):
    for name in ("a.mp4", "b.mp4"):
        write_video(os.path.join(folder, name), smooth_frames(frames, 16, 16), fps=8)


def test_num_frames_longer_than_every_video(run, random_vae, tmp_path, capsys):
    clips = tmp_path / "clips"
    _short_videos(str(clips), 6)
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(
        run, random_vae, [f"data.path={clips}", "data.num_frames=8"]), capsys)
    _assert_user_error_exit(code, err, f"data.path = {clips}", "longest has 6 frames",
                            "data.num_frames = 8", "lower data.num_frames")
    assert _snapshot(run) == before


def test_bad_files_warn_in_the_log_and_training_runs(random_vae, tmp_path):
    clips = tmp_path / "clips"
    _short_videos(str(clips), 12)
    write_video(str(clips / "big.mp4"), smooth_frames(20, 64, 64), fps=8)
    data = (clips / "big.mp4").read_bytes()
    (clips / "big.mp4").unlink()
    (clips / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "notes.mp4").write_text("not a video")
    write_frame_folder(str(clips / "gappy"), smooth_frames(10, 16, 16),
                       numbers=[0, 1, 2, 3, 4, 5, 6, 9, 10, 11])
    runs = tmp_path / "runs"
    args = _train_args(runs, random_vae, [f"data.path={clips}", "data.val_fraction=0",
                                          "train.max_steps=2"])
    assert train_advanced.main(args) == 0
    log = (runs / "run" / "log.txt").read_text()
    assert "skipped 3 of 6 sources" in log
    for line in ("truncated.mp4: ", "empty.mp4: empty file (0 bytes)", "notes.mp4: ",
                 "gappy (missing 7-8)"):
        assert line in log, line
    assert torch.load(str(runs / "run" / "latest.pth"), weights_only=True)["step"] == 2


def _faststart_mp4(path, frames):
    """An mp4 with its index (moov) before the data, as web videos usually are."""
    import av
    with av.open(path, "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_truncated_faststart_mp4_is_skipped(random_vae, tmp_path):
    clips = tmp_path / "clips"
    _short_videos(str(clips), 12)
    _faststart_mp4(str(clips / "cut.mp4"), smooth_frames(40, 64, 64))
    data = (clips / "cut.mp4").read_bytes()
    (clips / "cut.mp4").write_bytes(data[: len(data) // 2])
    runs = tmp_path / "runs"
    args = _train_args(runs, random_vae, [f"data.path={clips}", "data.val_fraction=0",
                                          "train.max_steps=12", "train.batch_size=1"])
    assert train_advanced.main(args) == 0
    log = (runs / "run" / "log.txt").read_text()
    assert "cut.mp4: truncated: its header promises 40 frames" in log


# --------------------------------------------------------------------------- VAE


def test_missing_vae_dir_exits_2(run, tmp_path):
    before = _snapshot(run)
    missing = str(tmp_path / "no_such_vae")
    proc = _script("train_advanced.py", _resume_args(run, missing))
    _assert_user_error_exit(proc.returncode, proc.stderr, f"VAE directory not found: {missing}",
                            "train_vae.py")
    assert _snapshot(run) == before


def test_corrupt_vae_dir_is_refused(run, random_vae, tmp_path, capsys):
    corrupt = str(tmp_path / "corrupt_vae")
    shutil.copytree(random_vae, corrupt)
    weights = os.path.join(corrupt, "diffusion_pytorch_model.safetensors")
    with open(weights, "wb") as f:
        f.write(os.urandom(4096))
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(run, corrupt), capsys)
    _assert_user_error_exit(code, err, f"could not load the VAE in {corrupt}", "corrupt or incomplete")
    assert _snapshot(run) == before
    code, _, err = _cli(predict_advanced, ["--config", os.path.join(ROOT, "predict_advanced.yaml"),
                                           "device=cpu", f"checkpoint={run}/latest.pth",
                                           f"output_dir={tmp_path / 'out'}", f"vae.path={corrupt}"],
                        capsys)
    _assert_user_error_exit(code, err, f"could not load the VAE in {corrupt}")
    assert not os.listdir(tmp_path / "out")


# --------------------------------------------------------------------------- checkpoints


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def test_truncated_checkpoint_predict_exits_2(run, tmp_path):
    ckpt = os.path.join(run, "latest.pth")
    _truncate(ckpt)
    before = _snapshot(run)
    out = tmp_path / "out"
    proc = _script("predict_advanced.py", ["--config", "predict_advanced.yaml", "device=cpu",
                                           f"checkpoint={ckpt}", f"output_dir={out}"])
    _assert_user_error_exit(proc.returncode, proc.stderr, f"checkpoint {ckpt} could not be read",
                            "corrupt or truncated")
    assert _snapshot(run) == before and not os.listdir(out)


def test_truncated_checkpoint_resume_keeps_the_file(run, random_vae, capsys):
    ckpt = os.path.join(run, "latest.pth")
    _truncate(ckpt)
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(run, random_vae), capsys)
    _assert_user_error_exit(code, err, f"checkpoint {ckpt} could not be read", "corrupt or truncated")
    assert _snapshot(run) == before  # still there for whoever wants to inspect or repair it


# --------------------------------------------------------------------------- output, memory


def test_unwritable_output_dir_exits_2(run, tmp_path):
    (tmp_path / "a_file").write_text("a regular file where a folder is needed")
    out = str(tmp_path / "a_file" / "videos")  # root ignores permissions, not this
    before = _snapshot(run)
    proc = _script("predict_advanced.py", ["--config", "predict_advanced.yaml", "device=cpu",
                                           f"checkpoint={run}/latest.pth", f"output_dir={out}"])
    _assert_user_error_exit(proc.returncode, proc.stderr, f"output_dir = {out!r} is not a writable "
                            "directory", "choose another output_dir")
    assert _snapshot(run) == before


def test_out_of_memory_suggests_smaller_batch(run, random_vae, monkeypatch, capsys):
    def oom(self, x, t, y=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VideoDiT, "forward", oom)
    before = _snapshot(run)
    code, _, err = _cli(train_advanced, _resume_args(run, random_vae), capsys)
    _assert_user_error_exit(code, err, "out of GPU memory at train.batch_size = 2",
                            "Lower train.batch_size", "train.grad_accum_steps",
                            "train.activation_checkpointing=true")
    # Setup succeeded, so config.yaml now records this (resumed) run; the weights are untouched.
    assert _snapshot(run)["latest.pth"] == before["latest.pth"]
