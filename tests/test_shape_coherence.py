"""benchmarks/shape_coherence.py: real built-in clips pass, the failures seen in bad samples fail;
real clips are classified with their own shape and colour, and prompt following runs end to end."""
import json
import os
import re

import numpy as np
import pytest

from benchmarks.shape_coherence import (blob_sizes, builtin_prompts, main, prompt_following, prompted, summarize,
                                        video_coherence, video_shape)
from data.builtin import CLASS_NAMES, COLOUR_NAMES, MovingShapes
from tests.test_stage2 import ROOT, random_vae  # noqa: F401  (random_vae is a fixture)
from utils.cli import run_main
from utils.config import BuiltinDataConfig, DataConfig, TrainRunConfig, load_config
from utils.errors import UserError


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
    out, scores = tmp_path / "never_written", tmp_path / "scores.json"
    assert main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu", "seed=0",
                 f"checkpoint={run}/latest.pth", f"output_dir={out}", "num_videos=3", "num_steps=2",
                 "--json", str(scores)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.search(r"ddpm 2 steps, guidance 2.5: (\d+) of 3 videos coherent; frames with one shape ([\d.]+)%", line)
    assert m and 0 <= int(m.group(1)) <= 3 and 0 <= float(m.group(2)) <= 100, line
    assert not out.exists()
    # benchmarks/demo_seeds.py reads the count back from that file (and does not sample again)
    from benchmarks.demo_seeds import coherence
    assert coherence(f"{run}/latest.pth", 0, 3, str(scores)) == int(m.group(1))


def _uint8(video):
    return ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5).round().astype(np.uint8)  # (T, H, W, 3)


@pytest.mark.parametrize("resolution, backgrounds", [(32, 1), (16, 4)])  # the t2v demo's; the tests' size
def test_real_clips_are_classified_with_their_own_shape_and_colour(resolution, backgrounds):
    """Every window of 40 val clips: the classifier against the dataset's own scene record."""
    cfg = DataConfig(resolution=resolution, num_frames=8, builtin=BuiltinDataConfig(
        num_clips=1, num_val_clips=40, num_backgrounds=backgrounds, labels="shape_colour", captions=True))
    ds = MovingShapes(cfg, "val")
    frames = videos = coherent = 0
    frame_shape_right = frame_colour_right = video_right = 0
    truths, captions, clips = set(), [], []
    for i in range(len(ds)):
        clip, _ = ds.window(i)
        scene = ds.scene(clip)
        truth = (CLASS_NAMES[scene["kind"]], COLOUR_NAMES[scene["colour_ids"][0]])
        video = _uint8(ds[i]["video"])
        got = video_shape(video)
        frames += len(got["frames"])
        frame_shape_right += sum(f is not None and f[0] == truth[0] for f in got["frames"])
        frame_colour_right += sum(f is not None and f[1] == truth[1] for f in got["frames"])
        video_right += (got["shape"], got["colour"]) == truth
        coherent += video_coherence(video)["coherent"]
        videos += 1
        truths.add(truth)
        captions.append(ds.caption(i))
        clips.append(video)
    assert videos == 200 and len({s for s, _ in truths}) == 3 and len({c for _, c in truths}) == 6
    assert frame_shape_right >= 0.95 * frames and frame_colour_right >= 0.95 * frames
    assert video_right >= 0.95 * videos and coherent >= 0.95 * videos
    # The same through prompt_following with each clip's own caption as its prompt; with the next
    # clip's captions only the videos whose shape and colour happen to agree follow (1 in 18).
    own = prompt_following(clips, captions)
    assert own["follows"] >= 0.95 * videos
    k = ds.windows
    other = prompt_following(clips, captions[k:] + captions[:k])
    assert other["follows"] <= 0.2 * videos and other["shape_right"] < own["shape_right"]


def test_prompted_reads_one_shape_and_colour():
    assert prompted("a red square moving left on a black background") == ("square", "red")
    assert prompted("A Violet Triangle moving up") == ("triangle", "violet")
    assert prompted("a red square moving left and a blue circle moving up on a black background") is None
    assert prompted("a brown dog on a beach") is None


def test_builtin_prompts_are_captions_of_the_split_that_has_them():
    """seen: captions of training clips; held_out: captions only the val split has; both in the
    built-in wording (the dataset's own captions of many clips contain every prompt)."""
    builtin = BuiltinDataConfig(num_clips=300, num_val_clips=300, num_backgrounds=1, labels="shape_colour",
                                captions=True, held_out_combinations=["red triangle", "green circle", "blue square"])
    cfg = DataConfig(resolution=16, num_frames=8, builtin=builtin)
    train, val = (set(MovingShapes(cfg, split).distinct_captions()) for split in ("train", "val"))
    held = builtin_prompts(builtin, "held_out", 12)
    assert {prompted(p) for p in held} == {("triangle", "red"), ("circle", "green"), ("square", "blue")}
    assert len(set(held)) == 12 and set(held) <= val and not set(held) & train  # 3 pairs x 4 directions
    seen = builtin_prompts(builtin, "seen", 36)
    assert len({prompted(p) for p in seen}) == 15 and set(seen) <= train
    assert seen[0] == "a red circle moving left on a black background"
    with pytest.raises(UserError, match="no data.builtin.held_out_combinations"):
        builtin_prompts(BuiltinDataConfig(), "held_out", 4)
    gradient = BuiltinDataConfig(background="gradient", num_backgrounds=2)
    assert builtin_prompts(gradient, "seen", 73)[72] == ("a red circle moving left on a dark blue and black "
                                                         "gradient background")


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory, random_vae, text_encoders):
    """A 2-step text checkpoint on the built-in captions with two held-out combinations."""
    from tests.test_stage2 import _train
    from tests.test_text_conditioning import _text_args
    root = str(tmp_path_factory.mktemp("held_out"))
    return _train(root, random_vae, "run", _text_args(text_encoders["t5"], 2, [
        "data.builtin.held_out_combinations=[red triangle,green circle]", "data.builtin.labels=shape_colour",
        "data.builtin.num_backgrounds=1"]))


@pytest.mark.parametrize("which, pairs", [("held_out", {("triangle", "red"), ("circle", "green")}),
                                          ("seen", None)])
def test_prompt_following_end_to_end(held_out_run, tmp_path, capsys, which, pairs):
    out = tmp_path / "scores.json"
    assert main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu", "num_videos=4",
                 "num_steps=2", f"checkpoint={held_out_run}/latest.pth", "--prompts", which, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.search(r": (\d+) of 4 videos coherent", lines[-2]), lines
    m = re.fullmatch(rf"follows its prompt \({which} combinations\): (\d+) of 4 \(shape right (\d+), colour "
                     r"right (\d+); coherent and following (\d+)\)", lines[-1])
    assert m, lines[-1]
    r = json.loads(out.read_text())
    p = r["prompt_following"]
    assert r["prompt_set"] == which and r["coherence"]["videos"] == p["videos"] == 4
    counts = [p["follows"], p["shape_right"], p["colour_right"], p["coherent_and_follows"]]
    assert counts == [int(g) for g in m.groups()]
    assert p["follows"] == sum(v["follows"] for v in p["per_video"]) <= min(p["shape_right"], p["colour_right"])
    asked = {prompted(v["prompt"]) for v in p["per_video"]}
    assert asked == pairs if pairs else not asked & {("triangle", "red"), ("circle", "green")}
    assert all(v["shape"] in CLASS_NAMES + [None] and v["colour"] in COLOUR_NAMES + [None] for v in p["per_video"])


@pytest.mark.parametrize("args, words", [
    (["--prompts", "unseen"], "--prompts unseen: use seen"),
    (["--prompts", "seen", "prompts=[a red square]"], "remove prompts"),
])
def test_prompt_set_errors_exit_2(held_out_run, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: main(["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
                                    f"checkpoint={held_out_run}/latest.pth", *args]))
    assert e.value.code == 2 and words in capsys.readouterr().err
