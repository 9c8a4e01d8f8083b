"""Messages that misled (issue 27, item 12): each now says what is wrong, and where it advises
a step, the test takes the step and it works.

| message                                                          | test |
|------------------------------------------------------------------|------|
| a caption over 131072 characters refused as invalid CSV, the wrong line named | test_a_caption_of_any_length_is_read_and_bad_rows_are_named_by_their_first_line |
| a column (JSON key) given twice not detected                      | test_a_column_given_twice_is_refused |
| a class model refused for data.captions it never reads            | test_captions_on_a_model_that_reads_none_are_refused_for_that_reason |
| a folder where a file is expected called "not found" (and reverse) | test_a_folder_where_a_file_is_expected_is_named_as_such |
| resume told to leave text_encoder.path null (refused in training) | test_a_resumed_text_run_is_told_what_training_accepts |
| evaluate told num_videos=0 or 1                                   | test_few_generated_videos_never_advise_num_videos_below_2 |
| a class checkpoint told to give prompts (negative_prompt)         | test_negative_prompt_on_a_class_checkpoint_says_remove_it |
| an empty --config told to leave --config out (it is required)     | test_an_empty_config_is_told_to_give_one |
| predict told to use experiment.name (it has none)                 | test_predict_is_never_told_to_use_experiment_name |
| diffusion.flow_shift = 1e9 accepted silently                      | test_flow_shifts_beyond_any_model_are_refused_with_a_reason |
| validation.num_steps checked while validation is off              | test_validation_settings_are_not_checked_while_validation_is_off |
| torch's jit.load deprecation warning at every evaluate / log.txt   | test_loading_a_detector_shows_no_jit_deprecation_warning |
| --help runs its examples together; --resume has no help           | test_help_keeps_the_examples_and_explains_every_flag |
"""
import contextlib
import io
import os
import warnings

import pytest
import torch

import diagnose
import evaluate
import predict_advanced
import train_advanced
import train_vae
from data.captions import read_metadata, read_prompts_file
from tests.conftest import smooth_frames
from tests.test_bad_input import _assert_user_error_exit, _cli
from tests.test_predict_output import _args, checkpoint  # noqa: F401  (checkpoint is a fixture)
from tests.test_stage2 import ROOT, random_vae  # noqa: F401  (a fixture of `checkpoint`)
from utils.config import TrainRunConfig, load_config
from utils.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")
ADVANCED = os.path.join(ROOT, "config_advanced.yaml")


# --------------------------------------------------------------------------- caption files


def test_a_caption_of_any_length_is_read_and_bad_rows_are_named_by_their_first_line(tmp_path):
    """The README says captions are of any length; csv's default field limit (131072
    characters) refused a longer one as "not valid CSV". A row is named by the line it starts
    on, even after a caption that spans lines."""
    long = "a very long caption " * 10_000  # 200000 characters
    path = tmp_path / "meta.csv"
    path.write_text(f'path,text\na.mp4,"{long}"\nb.mp4,"two\nlines"\nc.mp4,fine\n', encoding="utf-8")
    rows = read_metadata(str(path))
    assert [len(r.caption) for r in rows] == [len(long.strip()), 9, 4]
    path.write_text('path,text\na.mp4,"two\nlines"\nb.mp4,one,too many\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 4: more fields than the header"):
        read_metadata(str(path))


@pytest.mark.parametrize("ext, text", [
    (".csv", "path,text,text\na.mp4,one,two\n"),
    (".jsonl", '{"path": "a.mp4", "text": "one", "text": "two"}\n'),
    (".json", '[{"path": "a.mp4", "text": "one", "text": "two"}]'),
])
def test_a_column_given_twice_is_refused(tmp_path, ext, text):
    """A header naming a column twice (or a JSON object a key twice) silently kept one value."""
    path = tmp_path / f"meta{ext}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_metadata(str(path))
    assert str(path) in str(e.value) and "'text'" in str(e.value) and ("2 times" in str(e.value))
    path.write_text(text.replace('"text": "two"', '"prompt_2": "two"').replace("text,text", "text,other"),
                    encoding="utf-8")  # the advice: rename the other one
    assert [r.caption for r in read_metadata(str(path))] == ["one"]


def test_captions_on_a_model_that_reads_none_are_refused_for_that_reason(tmp_path, capsys):
    """A class model was refused for problems in captions it never reads; now data.captions
    on a model that is not text-conditioned is refused at load, saying why, and both ways out
    (remove it, or make the model a text model) load."""
    meta = tmp_path / "meta.csv"
    meta.write_text("path,text\nnowhere.mp4,a caption\n", encoding="utf-8")
    base = ["vae.path=x", f"data.path={tmp_path}", f"data.captions={meta}"]
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, ADVANCED, base)
    assert f"data.captions = '{meta}' is set but model.conditioning = class" in str(e.value)
    assert "only text models read captions" in str(e.value)
    assert load_config(TrainRunConfig, ADVANCED, base[:2]).data.captions is None  # removed
    text = load_config(TrainRunConfig, ADVANCED, [*base, "model.conditioning=text", "model.class_conditional=null"])
    assert text.model.conditioning_kind() == "text" and text.data.captions == str(meta)


def test_a_folder_where_a_file_is_expected_is_named_as_such(tmp_path, capsys):
    from training.evaluation import GeneratedFolder, _load_stage2
    from training.first_frames import load_image
    from utils.fvd import load_detector
    folder = tmp_path / "a_folder"
    folder.mkdir()
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    for call, key in ((lambda: read_metadata(str(folder)), "data.captions"),
                      (lambda: read_prompts_file(str(folder)), "prompts_file"),
                      (lambda: load_image(str(folder), 8, 8), "image"),
                      (lambda: load_detector(str(folder), torch.device("cpu")), "fvd.detector_path"),
                      (lambda: _load_stage2(str(folder)), "checkpoint")):
        with pytest.raises(UserError) as e:
            call()
        assert f"{key} = {folder}: is a folder, not a file" in str(e.value) and "not found" not in str(e.value)
    with pytest.raises(UserError) as e:
        GeneratedFolder.scan(str(a_file), 2)
    assert f"generated.path = {a_file}: is a file, not a folder" in str(e.value)
    with pytest.raises(UserError, match="--checkpoint .*a_folder: is a folder, not a file"):
        diagnose.main(["--config", ADVANCED, "--checkpoint", str(folder), "device=cpu"])
    prompts = folder / "prompts.txt"  # the advice: the file, not its folder
    prompts.write_text("a red square\n", encoding="utf-8")
    assert read_prompts_file(str(prompts)) == ["a red square"]


# --------------------------------------------------------------------------- advice that was refused


def test_a_resumed_text_run_is_told_what_training_accepts(text_encoders):
    """Resuming with another encoder said "leave text_encoder.path null", which training
    refuses (a text run needs the path). A resume is told to point at the recorded encoder."""
    from models.text_encoder import FrozenTextEncoder, check_text_encoder
    recorded = FrozenTextEncoder.from_pretrained(text_encoders["t5"]).describe()
    other = FrozenTextEncoder.from_pretrained(text_encoders["umt5"])
    with pytest.raises(UserError) as e:
        check_text_encoder(recorded, other, "ckpt.pth", resume=True)
    assert f"point text_encoder.path at that encoder ({recorded['source']})" in str(e.value)
    assert "null" not in str(e.value)
    with pytest.raises(UserError) as e:
        check_text_encoder(recorded, FrozenTextEncoder.from_pretrained(text_encoders["t5"], max_length=8),
                           "ckpt.pth", resume=True)
    assert f"set text_encoder.max_length = {recorded['max_length']}" in str(e.value) and "null" not in str(e.value)
    cfg = load_config(TrainRunConfig, ADVANCED, ["vae.path=x", "model.conditioning=text", "model.class_conditional=null",
                                                f"text_encoder.path={recorded['source']}",
                                                f"text_encoder.max_length={recorded['max_length']}"])
    again = FrozenTextEncoder.from_config(cfg.text_encoder)  # the advice, as training loads it
    check_text_encoder(recorded, again, "ckpt.pth", resume=True)
    with pytest.raises(UserError, match="leave text_encoder.path null"):  # predict: null works there
        check_text_encoder(recorded, other, "ckpt.pth")


def test_few_generated_videos_never_advise_num_videos_below_2(tmp_path):
    from training.evaluation import GeneratedFolder
    from utils.video_io import write_video
    write_video(str(tmp_path / "sample_000.mp4"), smooth_frames(8, 16, 16), fps=8)
    with pytest.raises(UserError) as e:
        GeneratedFolder.scan(str(tmp_path), 4)
    assert "has 1 usable videos" in str(e.value) and "num_videos=" not in str(e.value)
    assert "FVD needs at least 2" in str(e.value)
    write_video(str(tmp_path / "sample_001.mp4"), smooth_frames(8, 16, 16), fps=8)
    with pytest.raises(UserError, match="or set num_videos=2"):
        GeneratedFolder.scan(str(tmp_path), 4)
    assert len(GeneratedFolder.scan(str(tmp_path), 2).videos) == 2  # the advice


def test_negative_prompt_on_a_class_checkpoint_says_remove_it(tmp_path, checkpoint, capsys):
    """It said "give prompts (text checkpoints only)", which a class checkpoint refuses."""
    out = tmp_path / "out"
    code, _, err = _cli(predict_advanced, _args(checkpoint, out, "num_videos=1", "negative_prompt=blurry"), capsys)
    _assert_user_error_exit(code, err, "negative_prompt is set but this checkpoint's model is class-conditional",
                            "remove negative_prompt")
    assert "give prompts" not in err
    assert predict_advanced.main(_args(checkpoint, out, "num_videos=1")) == 0  # the advice


def test_an_empty_config_is_told_to_give_one(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, _, err = _cli(train_vae, ["--config", str(empty)], capsys)
    _assert_user_error_exit(code, err, f"--config {empty} is empty", "config_vae.yaml")
    assert "leave --config out" not in err
    with pytest.raises(SystemExit) as e:  # what that advice did: --config is required
        train_vae.main([])
    assert e.value.code == 2
    from utils.config import VAERunConfig
    assert load_config(VAERunConfig, os.path.join(ROOT, "config_vae.yaml")).experiment.name  # the advice


def test_predict_is_never_told_to_use_experiment_name(tmp_path, checkpoint, capsys):
    """A malformed or truncated checkpoint gave predict the training advice "start fresh with
    another experiment.name", a key predict does not have; it is told to point checkpoint at
    another file, which works."""
    good = torch.load(checkpoint, weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in good.items() if k != "ema_state"}, bad)
    for broken in (bad, tmp_path / "cut.pth"):
        if broken.name == "cut.pth":
            broken.write_bytes(open(checkpoint, "rb").read()[:2000])
        code, _, err = _cli(predict_advanced, _args(str(broken), tmp_path / "out"), capsys)
        _assert_user_error_exit(code, err, f"checkpoint {broken}", "Point checkpoint at another checkpoint")
        assert "experiment.name" not in err
    mangled = dict(good, diffusion={"num_train_timesteps": "many"})
    torch.save(mangled, bad)
    code, _, err = _cli(predict_advanced, _args(str(bad), tmp_path / "out"), capsys)
    _assert_user_error_exit(code, err, "entry 'diffusion' is malformed", "Point checkpoint at another checkpoint")
    assert "experiment.name" not in err
    assert predict_advanced.main(_args(checkpoint, tmp_path / "out", "num_videos=1")) == 0  # the advice


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("override, words", [
    ("diffusion.flow_shift=1e9", "diffusion.flow_shift = 1e+09: must be between 0.01 and 100"),
    ("diffusion.flow_shift=1e-9", "must be between 0.01 and 100"),
    ("diffusion.flow_max_shift=1e9", "diffusion.flow_max_shift = 1e+09: must be between -4.61 and 4.61"),
])
def test_flow_shifts_beyond_any_model_are_refused_with_a_reason(override, words):
    flow = ["vae.path=x", "diffusion.objective=flow_matching", "validation.sampler=euler"]
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, ADVANCED, [*flow, override])
    assert words in str(e.value)
    assert load_config(TrainRunConfig, ADVANCED, [*flow, "diffusion.flow_shift=100"]).diffusion.flow_shift == 100


def test_validation_settings_are_not_checked_while_validation_is_off():
    """validation.num_steps beyond the schedule (and a sampler for the other objective) were
    refused with validation.every_epochs: 0, when nothing samples with them."""
    off = ["vae.path=x", "validation.every_epochs=0", "diffusion.num_train_timesteps=50"]
    cfg = load_config(TrainRunConfig, ADVANCED, [*off, "validation.num_steps=100"])
    assert cfg.validation.num_steps == 100
    with pytest.raises(ConfigError, match="validation.num_steps = 100 is more than"):
        load_config(TrainRunConfig, ADVANCED, [*off, "validation.num_steps=100", "validation.every_epochs=1"])


def test_loading_a_detector_shows_no_jit_deprecation_warning(tmp_path):
    """torch warns that jit.load is deprecated; the I3D detector papers use is a TorchScript
    file, so the warning said nothing a user could act on, at every evaluate and in log.txt."""
    from tests.test_evaluate import StandInI3D
    from utils.fvd import load_detector
    path = str(tmp_path / "i3d.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(StandInI3D()), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_detector(path, torch.device("cpu"))
    assert not [w for w in caught if "jit" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("module", [train_vae, train_advanced, predict_advanced, evaluate, diagnose])
def test_help_keeps_the_examples_and_explains_every_flag(module):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = out.getvalue()
    examples = [line.strip() for line in module.__doc__.splitlines() if line.strip().startswith("python ")]
    lines = [line.strip() for line in text.splitlines()]
    for example in examples:  # each example command on a line of its own, as written
        assert example in lines, (example, text)
    flags = [i for i, line in enumerate(lines) if line.startswith("--")]
    for i in flags:  # "--flag VALUE  help", or the help on the next line when the flag is long
        helped = len(lines[i].split(None, 2)) == 3 or (lines[i + 1] and not lines[i + 1].startswith("-"))
        assert helped, (lines[i], text)
    assert flags
    if module is train_advanced:
        assert "--resume RESUME" in text and "train.resume" in text
