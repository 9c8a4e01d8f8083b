"""Never lose an hour of GPU work (issue 14): one test per class of failure, not per example.

| class                                   | test                                                      |
|-----------------------------------------|-----------------------------------------------------------|
| two runs on one run directory           | test_second_run_is_refused_naming_the_running_process     |
|                                         | (two real processes), test_stale_lock_is_replaced         |
| save before fail (any exception)        | test_exception_mid_run_saves_latest_and_logs_the_error,   |
|                                         | test_stage1_user_error_mid_run_saves_and_exits_2          |
| a source unreadable mid-run             | test_source_deleted_after_indexing_is_skipped_with_a_warning |
| checks before heavy work                | test_checks_come_before_the_latent_cache,                 |
|                                         | test_config_refusals (duplicate key, NaN, name, steps),   |
|                                         | test_predict_checks_sampler_steps_first                   |
| paths as users type them                | test_paths_as_users_type_them                             |
| a corrupt latent cache                  | test_corrupt_cache_is_reported_and_rebuilt                |
| a killed cache build                    | test_interrupted_cache_build_resumes_where_it_stopped     |
| resume after the dataset shrank         | test_resume_on_a_smaller_dataset_starts_the_next_epoch    |
| a checkpoint with a bad entry / objects | test_checkpoint_entry_problems_are_named                  |
| a full disk (a real write limit)        | test_write_failure_keeps_the_previous_checkpoint          |
| predict interrupted by a signal         | test_predict_sigterm_keeps_finished_videos                |
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_advanced
import train_vae
import training.stage2 as stage2
from data import build_dataset
from data import latent_cache
from data.latent_cache import LatentCache, cache_key
from data.videos import DataWarning, VideoFolder
from models.diffusion import Diffusion
from tests.conftest import smooth_frames
from tests.test_bad_input import _assert_user_error_exit, _cli
from tests.test_fault_tolerance import _args, _read, _start, _train, _wait_for_checkpoint
from tests.test_stage2 import ROOT, random_vae  # noqa: F401  (random_vae is a fixture)
from tests.test_vae import TINY_OVERRIDES as VAE_TINY
from utils.checkpoint import load_checkpoint
from utils.config import DataConfig, TrainRunConfig, load_config
from utils.errors import ConfigError, UserError
from utils.run_guard import RunLock
from utils.video_io import write_video

STARTUP_TIMEOUT = 240  # seconds for a subprocess to reach its first checkpoint or video


# --------------------------------------------------------------------------- one owner


def test_second_run_is_refused_naming_the_running_process(tmp_path, random_vae):
    first, out = _start(tmp_path, random_vae, "run", ["train.max_steps=100000", "train.checkpoint_every=1"])
    latest = os.path.join(tmp_path, "run", "latest.pth")
    try:
        _wait_for_checkpoint(first, latest)
        log_before = _read(os.path.join(tmp_path, "run", "log.txt"))
        second = subprocess.run([sys.executable, "train_advanced.py",
                                 *_args(tmp_path, random_vae, "run", ["train.resume=auto"])],
                                cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
        _assert_user_error_exit(second.returncode, second.stderr, f"in use by process {first.pid}",
                                "pick another experiment.name")
        assert first.poll() is None  # the first run goes on
        assert _read(os.path.join(tmp_path, "run", "log.txt")).startswith(log_before)
        assert "resumed" not in _read(os.path.join(tmp_path, "run", "log.txt"))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        out.close()
    assert not os.path.exists(os.path.join(tmp_path, "run", ".lock"))  # released on exit


def test_stale_lock_is_replaced(tmp_path, random_vae):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID now names no process
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                           "started": "yesterday"}))
    _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    assert f"removed a stale lock {run / '.lock'} (process {gone.pid}" in _read(run / "log.txt")
    assert not (run / ".lock").exists()
    with RunLock(str(run)):  # held by this (live) process: refused in-process too, nothing written
        with pytest.raises(UserError, match=f"in use by process {os.getpid()} on"):
            _train(tmp_path, random_vae, "run", ["train.max_steps=2", "train.resume=auto"])
    assert load_checkpoint(str(run / "latest.pth"))["step"] == 1


# --------------------------------------------------------------------------- save before fail


def test_exception_mid_run_saves_latest_and_logs_the_error(tmp_path, random_vae, monkeypatch):
    """A crash at step 4 (checkpoint_every 100): steps 1-3 are saved, the error is in log.txt,
    and a resume continues from step 3."""
    original, calls = Diffusion.loss, [0]

    def loss_that_breaks(self, v, x0, noise, t, frame_mask=None):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("simulated failure inside step 4")
        return original(self, v, x0, noise, t, frame_mask)

    monkeypatch.setattr(Diffusion, "loss", loss_that_breaks)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _train(tmp_path, random_vae, "run", ["train.max_steps=10", "train.checkpoint_every=100"])
    run = os.path.join(tmp_path, "run")
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 3
    log = _read(os.path.join(run, "log.txt"))
    assert "error at step 3: RuntimeError: simulated failure inside step 4" in log
    assert f"saved step 3 to {run}/latest.pth before stopping" in log
    monkeypatch.setattr(Diffusion, "loss", original)
    _train(tmp_path, random_vae, "run", ["train.max_steps=5", "train.resume=auto"])
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 5


def test_stage1_user_error_mid_run_saves_and_exits_2(tmp_path, monkeypatch, capsys):
    import training.stage1 as stage1
    original = stage1.optimizer_step

    def fail_at_step_3(optimizer, scaler, loss, grad_clip, *agree):
        if stage1_steps[0] == 2:
            raise UserError("a clip could not be read (simulated)")
        stage1_steps[0] += 1
        return original(optimizer, scaler, loss, grad_clip, *agree)

    stage1_steps = [0]
    monkeypatch.setattr(stage1, "optimizer_step", fail_at_step_3)
    args = ["--config", os.path.join(ROOT, "config_vae.yaml"), *VAE_TINY, "train.max_steps=6",
            "train.time_limit_minutes=null", f"experiment.runs_dir={tmp_path}", "experiment.name=vae"]
    code, _, err = _cli(train_vae, args, capsys)
    _assert_user_error_exit(code, err, "a clip could not be read (simulated)")
    run = tmp_path / "vae"
    assert load_checkpoint(str(run / "latest.pth"))["step"] == 2
    assert "saved step 2" in _read(run / "log.txt")
    assert not (run / ".lock").exists()


def test_source_deleted_after_indexing_is_skipped_with_a_warning(tmp_path):
    clips = tmp_path / "clips"
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_video(str(clips / name), smooth_frames(8, 16, 16), fps=8)
    os.symlink(clips / "missing.mp4", clips / "dangling.mp4")  # skipped when indexing
    cfg = DataConfig(path=str(clips), num_frames=4, resolution=16, window_stride=4, val_fraction=0)
    with pytest.warns(DataWarning, match="dangling.mp4: a dangling symlink"):
        ds = VideoFolder(cfg, "train")
    assert ds.num_sources == 3 and len(ds) == 6
    os.remove(clips / "b.mp4")
    with pytest.warns(DataWarning) as caught:
        items = [ds[i] for i in range(len(ds))]
    texts = [str(w.message) for w in caught if "could not be read any more" in str(w.message)]
    assert len(texts) == 1 and "b.mp4" in texts[0] and "skipped for the rest of this run" in texts[0]
    assert all(it["video"].shape == (3, 4, 16, 16) for it in items)


# --------------------------------------------------------------------------- checks first


def test_checks_come_before_the_latent_cache(tmp_path, random_vae, capsys):
    """Refused from the config, the data index, the VAE and the checkpoint alone: no cache."""
    cache = os.path.join(tmp_path, "run", "latent_cache")
    code, _, err = _cli(train_advanced, _args(tmp_path, random_vae, "run", ["train.grad_accum_steps=7"]),
                        capsys)
    _assert_user_error_exit(code, err, "one epoch has 6 batches, fewer than train.grad_accum_steps = 7")
    assert not os.path.exists(cache)
    _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    manifest = os.path.join(cache, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    flat = tmp_path / "flat"  # videos without class folders: 0 classes
    flat.mkdir()
    for i in range(2):
        write_video(str(flat / f"v{i}.mp4"), smooth_frames(8, 16, 16 + 8 * i), fps=8)
    for extra, words in ((["data.resolution=32"], ("trained on other data", "data.resolution is 16 "
                                                   "in the checkpoint but 32 now")),
                         ([f"data.path={flat}"], ("trained on other data", "data.path is 'builtin:",
                                                  f"but '{flat}' now")),
                         (["diffusion.beta_schedule=linear"], ("another diffusion schedule",
                                                               "diffusion.beta_schedule is"))):
        code, _, err = _cli(train_advanced, _args(tmp_path, random_vae, "run",
                                                  ["train.resume=auto", *extra]), capsys)
        _assert_user_error_exit(code, err, *words)
    assert os.stat(manifest).st_mtime_ns == stamp  # the cache was neither rebuilt nor touched


@pytest.mark.parametrize("text, override, words", [
    ("train:\n  lr: 1.0e-3\n  batch_size: 2\n  lr: 3.0e-4\n", [],
     ("duplicate key 'lr'", "first on line 4, again on line 6")),
    ("train:\n  lr: .nan\n", [], ("train.lr = nan", "finite")),
    ("", ["train.grad_clip=.inf"], ("train.grad_clip = inf",)),
    ("", ["experiment.name=../elsewhere"], ("experiment.name = '../elsewhere'", "one plain directory")),
    ("", ["experiment.name=/abs"], ("experiment.name = '/abs'",)),
    ("", ["experiment.name="], ("experiment.name = ''",)),
    ("", ["validation.num_steps=2000"], ("validation.num_steps = 2000", "num_train_timesteps = 1000")),
])
def test_config_refusals(tmp_path, text, override, words):
    path = tmp_path / "c.yaml"
    path.write_text("vae:\n  path: x\n" + text if "vae" not in text else text)
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, str(path), override)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_paths_as_users_type_them(tmp_path, monkeypatch, random_vae, capsys):
    """`~` expanded; a file where a folder is expected (and the reverse) named as such."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(TrainRunConfig, None, ["vae.path=~/vae", "experiment.runs_dir=~/runs"])
    assert (cfg.vae.path, cfg.experiment.runs_dir) == (f"{tmp_path}/vae", f"{tmp_path}/runs")
    with pytest.raises(ConfigError, match=f"--config {tmp_path} is a directory"):
        load_config(TrainRunConfig, str(tmp_path))
    weights = os.path.join(random_vae, "diffusion_pytorch_model.safetensors")
    for extra, words in (([f"vae.path={weights}"], (f"vae.path = {weights} is a file",)),
                         ([f"train.resume={tmp_path}"], (f"train.resume = '{tmp_path}' is a directory",))):
        code, _, err = _cli(train_advanced, _args(tmp_path, random_vae, "run", extra), capsys)
        _assert_user_error_exit(code, err, *words)


# --------------------------------------------------------------------------- state that heals


def test_corrupt_cache_is_reported_and_rebuilt(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    cache = os.path.join(run, "latent_cache")
    shard = os.path.join(cache, "shard_r0_00000.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    _train(tmp_path, random_vae, "run", ["train.max_steps=2", "train.resume=auto"])
    log = _read(os.path.join(run, "log.txt"))
    assert f"the cache is damaged: shard {shard} cannot be read" in log
    assert load_checkpoint(shard) is not None  # rebuilt whole
    with open(os.path.join(cache, "manifest.json"), "w") as f:
        f.write('{"key": ')  # a manifest cut short
    _train(tmp_path, random_vae, "run", ["train.max_steps=3", "train.resume=auto"])
    assert "manifest.json cannot be read (JSONDecodeError" in _read(os.path.join(run, "log.txt"))
    assert load_checkpoint(os.path.join(run, "latest.pth"))["step"] == 3


def test_interrupted_cache_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(latent_cache, "SOURCES_PER_SHARD", 2)
    cfg = DataConfig(num_frames=4, resolution=16)
    cfg.builtin.num_clips, cfg.builtin.clip_frames = 7, 8
    dataset = build_dataset(cfg, "train", 0)
    encoded = []

    def encode(pixels):  # (B, 3, T, H, W) -> moments (B, 2, T, 4, 4): deterministic
        encoded.append(pixels.shape[2])
        if len(encoded) == 4 and fail[0]:
            raise KeyboardInterrupt  # like Ctrl-C or a kill between two sources
        mean = torch.nn.functional.avg_pool3d(pixels[:, :2], (1, 4, 4))
        return mean, mean.abs() + 0.1

    def cache_in(folder):
        return LatentCache(dataset, str(folder), cache_key(dataset, "vae-x"))

    fail = [True]
    with pytest.raises(KeyboardInterrupt):
        cache_in(tmp_path / "c").build_part(encode, progress=False)  # sources 0-2 done, 0-1 saved
    progress = json.loads((tmp_path / "c" / "progress_r0.json").read_text())
    assert sorted(progress["shards"]) == ["0", "1"]
    fail[0], encoded[:] = False, []
    cache = cache_in(tmp_path / "c")
    assert cache.status() == (False, "no cache yet")
    shards = cache.build_part(encode, progress=False)
    assert len(encoded) == 5  # sources 2..6 only
    cache.write_manifest(shards)
    assert not (tmp_path / "c" / "progress_r0.json").exists()
    clean = cache_in(tmp_path / "clean")
    clean.write_manifest(clean.build_part(encode, progress=False))
    a, b = cache.load(), clean.load()
    for src in range(dataset.num_sources):
        assert torch.equal(a.latents[src]["mean"], b.latents[src]["mean"])


def test_resume_on_a_smaller_dataset_starts_the_next_epoch(tmp_path, random_vae):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2", "data.builtin.num_clips=6"])
    first = load_checkpoint(os.path.join(run, "latest.pth"))
    assert (first["epoch"], first["micro"], first["num_items"]) == (0, 2, 12)  # mid-epoch
    _train(tmp_path, random_vae, "run", ["train.max_steps=3", "data.builtin.num_clips=3",
                                         "train.resume=auto"])
    log = _read(os.path.join(run, "log.txt"))
    assert "the number of training windows changed since the checkpoint" in log
    after = load_checkpoint(os.path.join(run, "latest.pth"))
    assert (after["step"], after["epoch"], after["micro"], after["num_items"]) == (3, 1, 1, 6)


def test_checkpoint_entry_problems_are_named(tmp_path, random_vae, capsys):
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=1"])
    latest = os.path.join(run, "latest.pth")
    good = load_checkpoint(latest)
    for broken, words in (({k: v for k, v in good.items() if k != "optimizer"},
                           ("entry 'optimizer' is missing",)),
                          ({**good, "step": "one"}, ("entry 'step' is a str, expected int",)),
                          ({**good, "model_state": {"nonsense": torch.zeros(1)}},
                           ("entry 'model_state' does not fit",)),
                          ({**good, "extra": socket.AddressFamily.AF_INET},
                           ("holds objects that are not allowed", "socket.AddressFamily"))):
        torch.save(broken, latest)
        code, _, err = _cli(train_advanced, _args(tmp_path, random_vae, "run",
                                                  ["train.max_steps=2", "train.resume=auto"]), capsys)
        _assert_user_error_exit(code, err, f"checkpoint {latest}", *words)
        assert "corrupt" not in err


def test_write_failure_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: the process may not grow a file past 64 KiB (RLIMIT_FSIZE, what a
    full disk or quota does to a writer), so torch's zip writer fails part-way."""
    target = tmp_path / "latest.pth"
    script = f"""
import resource, signal, torch
from utils.checkpoint import atomic_save
from utils.errors import UserError
atomic_save({{"step": 1, "w": torch.zeros(10)}}, {str(target)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    atomic_save({{"step": 2, "w": torch.zeros(200_000)}}, {str(target)!r})
except UserError as e:
    print("USER ERROR:", e)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"USER ERROR: could not write {target} (" in proc.stdout, proc.stdout
    assert "the previous file, if any, is intact" in proc.stdout.lower()
    assert load_checkpoint(str(target))["step"] == 1
    assert os.listdir(tmp_path) == ["latest.pth"]  # no temp file left behind


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, random_vae):
    runs = tmp_path_factory.mktemp("runs")
    _train(str(runs), random_vae, "run", ["train.max_steps=1"])
    return str(runs / "run" / "latest.pth")


def test_predict_checks_sampler_steps_first(tmp_path, checkpoint, capsys):
    import predict_advanced
    out = tmp_path / "out"
    code, _, err = _cli(predict_advanced, ["--config", os.path.join(ROOT, "predict_advanced.yaml"),
                                           "device=cpu", f"checkpoint={checkpoint}",
                                           f"output_dir={out}", "num_steps=5000"], capsys)
    _assert_user_error_exit(code, err, "num_steps = 5000 is more than diffusion.num_train_timesteps = 1000")
    assert os.listdir(out) == []


def test_predict_sigterm_keeps_finished_videos(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.mp4").write_bytes(b"a user's video: never predict's to remove")
    cmd = [sys.executable, "predict_advanced.py", "--config", "predict_advanced.yaml", "device=cpu",
           f"checkpoint={checkpoint}", f"output_dir={out}", "num_videos=200", "batch_size=1",
           "num_steps=20"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (out / "sample_001.gif").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    done = int(stdout.split("interrupted: ")[1].split(" of 200")[0])
    assert 2 <= done < 200 and "Traceback" not in stderr
    names = sorted(os.listdir(out))
    assert names == sorted([f"sample_{i:03d}{e}" for i in range(done) for e in (".mp4", ".gif")]
                           + ["grid.png", "mine.mp4", ".predict_manifest.jsonl"])  # whole files only
    from utils.video_io import read_frames
    assert read_frames(str(out / f"sample_{done - 1:03d}.mp4"), [0, 3]).shape[0] == 2
