"""torchrun with 2 CPU processes (gloo) vs 1 process at the same global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.fixed_noise import assert_same_update, train_fixed
from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc, batch, tmp_path, vae, name, extra=()):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}", "--master_addr=127.0.0.1"] if nproc > 1 else [sys.executable]
    args = ["train_advanced.py", "--config", "config_advanced.yaml", *TINY, f"vae.path={vae}",
            f"experiment.runs_dir={tmp_path}", f"experiment.name={name}", "train.max_steps=12",
            f"train.batch_size={batch}", "data.builtin.num_clips=16", "train.warmup_steps=0",
            "train.lr=1e-3", "data.cache=auto", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(tmp_path, name), proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_process_ddp_step_matches_one_process(tmp_path, random_vae):  # noqa: F811
    """2 processes x batch 2 x accumulation 2 == 1 process x batch 8: weights and AdamW moments
    after 3 steps, to float tolerance. t and noise are fixed per training window
    (tests/fixed_noise.py), so this checks the rank split of the data, DDP's gradient
    all-reduce, no_sync on the accumulation micro-batch and the loss scaling."""
    data = [*TINY, f"vae.path={random_vae}", "data.builtin.num_clips=12", "train.max_steps=3"]
    one = train_fixed(data + ["train.batch_size=8"], str(tmp_path / "one"))
    out = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
           os.path.join(ROOT, "tests", "fixed_noise.py"), str(out), str(tmp_path / "two"),
           *data, "train.batch_size=2", "train.grad_accum_steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(tmp_path / "two" / "log.txt").read()
    assert "world size 2, global batch 8 = 2 per process x 2 processes x 2 accumulation" in log
    assert_same_update(one, torch.load(out, weights_only=True))


def test_a_skipped_file_is_reported_once_not_per_rank(tmp_path, random_vae):  # noqa: F811
    from tests.conftest import index_frames
    from utils.video_io import write_video
    clips = tmp_path / "clips"
    for k in range(3):
        write_video(str(clips / f"clip{k}.mp4"), index_frames(12), fps=8)
    (clips / "broken.mp4").write_text("this is not a video")
    run, out = _run(2, 2, tmp_path, random_vae, "folder", [f"data.path={clips}", "train.max_steps=2",
                                                           "data.val_fraction=0"])
    assert out.count("skipped 1 of 4 sources") == 1, out[-3000:]
    assert "broken.mp4" in open(os.path.join(run, "log.txt")).read()
