"""benchmarks/shape_coherence.py: real built-in clips pass, the failures seen in bad samples fail."""
import os
import re

import numpy as np
import pytest

from benchmarks.shape_coherence import blob_sizes, main, summarize, video_coherence
from data.builtin import MovingShapes
from tests.test_stage2 import ROOT, random_vae  # noqa: F401  (random_vae is a fixture)
from utils.cli import run_main
from utils.config import TrainRunConfig, load_config


def _clips(*overrides, n=12):
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), list(overrides))
    ds = MovingShapes(cfg.data, "val")
    step = max(1, len(ds) // n)
    return [((ds[i]["video"].permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            for i in range(0, step * n, step)]  # (T, H, W, 3) each


def test_blob_sizes():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[4, 1:6] = True  # 5 pixels
    mask[2, 2] = True  # touches the first only diagonally: its own blob
    assert sorted(blob_sizes(mask)) == [1, 4, 5]
    assert blob_sizes(np.zeros((3, 3), dtype=bool)) == []


@pytest.mark.parametrize("overrides", [(), ("data.builtin.num_backgrounds=4", "data.builtin.labels=shape")])
def test_real_clips_are_coherent(overrides):
    s = summarize([video_coherence(v) for v in _clips(*overrides)])
    assert s["coherent"] == s["videos"] == 12 and s["frames_with_one_blob"] == 1.0
    assert s["median_colour_drift"] < 0.05 and s["median_area_ratio"] < 1.3


def test_two_shapes_a_colour_change_or_a_vanishing_shape_are_not():
    two = [video_coherence(v) for v in _clips("data.builtin.num_shapes=2", "data.builtin.min_size=0.2",
                                               "data.builtin.max_size=0.25")]
    assert sum(m["coherent"] for m in two) <= 2  # only where the two shapes overlap throughout
    clip = _clips()[0]
    recoloured = clip.copy()
    shape = np.abs(clip[4:].astype(int) - clip[4:, :1, :1].astype(int)).sum(-1) > 60  # (T-4, H, W)
    recoloured[4:][shape] = (40, 220, 60)  # the second half of the video in another colour
    m = video_coherence(recoloured)
    assert m["blobs"] == [1] * 8 and m["colour_drift"] > 0.2 and not m["coherent"]
    vanishing = clip.copy()
    vanishing[5] = clip[5, :1, :1]  # frame 5 is background only
    m = video_coherence(vanishing)
    assert m["blobs"][5] == 0 and not m["coherent"]


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: main(["--config", os.path.join(ROOT, "predict_advanced.yaml"),
                                    f"checkpoint={tmp_path}/none.pth"]))
    assert e.value.code == 2 and "none.pth" in capsys.readouterr().err


def test_scores_the_videos_predict_makes(tmp_path, random_vae, capsys):
    """End to end on a 2-step checkpoint: samples like predict (nothing written) and reports."""
    from tests.test_stage2 import _train
    run = _train(tmp_path, random_vae, "run", ["train.max_steps=2"])
    out = tmp_path / "never_written"
    assert main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                 f"checkpoint={run}/latest.pth", f"output_dir={out}", "num_videos=3", "num_steps=2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"ddpm 2 steps, guidance 2.5: (\d+) of 3 videos coherent; frames with one shape ([\d.]+)%", line)
    assert m and 0 <= int(m.group(1)) <= 3 and 0 <= float(m.group(2)) <= 100, line
    assert not out.exists()
