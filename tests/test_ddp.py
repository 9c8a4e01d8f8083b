"""torchrun with 2 CPU processes (gloo) vs 1 process at the same global batch."""
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.test_stage2 import ROOT, TINY, random_vae  # noqa: F401  (fixture)
from utils.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    text = open(os.path.join(run_dir, "log.txt")).read()
    return [float(x) for x in re.findall(r"step \d+/\d+ epoch \d+ loss ([\d.]+)", text)]


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


def test_two_process_ddp_matches_one_process(tmp_path, random_vae):  # noqa: F811
    one, _ = _run(1, 4, tmp_path, random_vae, "one")
    two, out = _run(2, 2, tmp_path, random_vae, "two")
    assert "world size 2, global batch 4 = 2 per process x 2 processes x 1 accumulation" in out
    assert load_checkpoint(os.path.join(two, "latest.pth"))["step"] == 12
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    # Same data order and global batch; only the per-rank noise differs, so the curves agree
    # within noise: compare the means of the first and second halves.
    for lo, hi in ((0, 6), (6, 12)):
        ma, mb = sum(a[lo:hi]) / 6, sum(b[lo:hi]) / 6
        assert mb == pytest.approx(ma, rel=0.3), (a, b)


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
