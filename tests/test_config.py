"""Config strictness: unknown keys, wrong types, broken invariants, overrides, unread keys."""
import contextlib
import dataclasses
import os
import sys
import typing

import pytest
import torch
import yaml

import utils.config
from utils import config_loader
from models.vae import build_autoencoder
from utils.config import VAEArchConfig
from utils.config import (EvaluateConfig, ModelConfig, PredictConfig, TrainRunConfig, VAERunConfig, config_from_dict,
                          config_to_dict, dump_config, load_config)
from utils.errors import ConfigError, MissingFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = {"config_advanced.yaml": TrainRunConfig, "config_vae.yaml": VAERunConfig,
           "predict_advanced.yaml": PredictConfig, "evaluate.yaml": EvaluateConfig}


def _load(overrides, cls=TrainRunConfig):
    return load_config(cls, None, ["vae.path=x"] + overrides if cls is TrainRunConfig else overrides)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load(name):
    extra = ["checkpoint=runs/demo/latest.pth"] if SHIPPED[name] is EvaluateConfig else []  # one is required
    cfg = load_config(SHIPPED[name], os.path.join(ROOT, name), extra)
    assert cfg.device == "auto"


TRAINING_YAMLS = ("config_advanced.yaml", "config_t2v_demo.yaml")


def test_shipped_configs_spell_the_condition_with_model_conditioning():
    """The older key model.class_conditional is an alias for old configs and checkpoints only: a
    shipped YAML that set it made `model.conditioning=text` on the command line contradict it."""
    for name in TRAINING_YAMLS:
        model = yaml.safe_load(open(os.path.join(ROOT, name)))["model"]
        assert "class_conditional" not in model and model["conditioning"] in ("class", "text"), name


def test_an_override_of_either_spelling_replaces_the_files_other_spelling(tmp_path):
    """An old config (model.class_conditional: true) takes `model.conditioning=text`, and the
    shipped one takes the old `model.class_conditional=false`: the command line wins over the
    file, as for every key. Both spellings on the command line and disagreeing is still refused."""
    old = tmp_path / "old.yaml"
    old.write_text(open(os.path.join(ROOT, "config_advanced.yaml")).read().replace(
        "  conditioning: class", "  class_conditional: true"))
    assert _load_file(old, "model.conditioning=text").model.conditioning_kind() == "text"
    assert _load_file(old).model.conditioning_kind() == "class"
    shipped = os.path.join(ROOT, "config_advanced.yaml")
    assert _load_file(shipped, "model.class_conditional=false").model.conditioning_kind() == "none"
    with pytest.raises(ConfigError, match="contradicts"):
        _load_file(shipped, "model.class_conditional=true", "model.conditioning=text")


def _load_file(path, *overrides):
    return load_config(TrainRunConfig, str(path), ["vae.path=x", *overrides])


@pytest.mark.parametrize("name", TRAINING_YAMLS)
@pytest.mark.parametrize("objective", ["v_prediction", "flow_matching"])
@pytest.mark.parametrize("kind", ["none", "class", "text"])
def test_every_shipped_training_config_takes_each_objective_and_condition(name, objective, kind):
    """One override switches the objective or the condition of a shipped config (plus what that
    condition needs: an encoder and captions for text; no validation.prompts without text). The
    validation sampler follows the objective (`auto`), the alias class_conditional is not in the way."""
    needs = {"text": ["text_encoder.path=x", "data.builtin.captions=true"],
             "class": ["validation.prompts=null"], "none": ["validation.prompts=null"]}[kind]
    cfg = load_config(TrainRunConfig, os.path.join(ROOT, name),
                      ["vae.path=x", f"diffusion.objective={objective}", f"model.conditioning={kind}", *needs])
    assert cfg.model.conditioning_kind() == kind and cfg.diffusion.objective == objective
    assert cfg.validation.sampler == "auto"


def test_overrides_are_yaml_scalars():
    cfg = _load(["train.lr=3e-4", "train.max_steps=null", "data.hflip=true", "train.betas=[0.8, 0.9]",
                 "data.path=/clips", "model.preset=DiT-S/2"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps is None
    assert cfg.data.hflip is True and cfg.train.betas == [0.8, 0.9] and cfg.data.path == "/clips"
    assert cfg.model.resolved().hidden_size == 384 and cfg.model.resolved().patch_size == 2


@pytest.mark.parametrize("override, words", [
    (["train.lrr=1"], ["train.lrr", "did you mean train.lr"]),
    (["data.builtin.num_clip=3"], ["data.builtin.num_clip", "num_clips"]),
    (["trian.lr=1"], ["trian", "did you mean train"]),
    (["train.lr=fast"], ["train.lr", "'fast'", "number"]),
    (["train.batch_size=2.5"], ["train.batch_size", "integer"]),
    (["data.hflip=yesplease"], ["data.hflip", "true or false"]),
    (["data.num_frames=0"], ["data.num_frames", "0"]),
    (["model.attention=global"], ["model.attention", "factorized"]),
    (["model.preset=DiT-Q/2"], ["model.preset", "DiT-Q/2"]),
    (["model.hidden_size=102"], ["model.hidden_size", "num_heads"]),
    (["device=gpu"], ["device", "gpu"]),
    (["data.path=builtin:cats"], ["data.path", "builtin:cats"]),
    (["train.resume"], ["train.resume", "key.sub=value"]),
    (["diffusion.beta_schedule=sigmoid"], ["diffusion.beta_schedule", "sigmoid"]),
    # checked in stage 1 and stage 2 alike (stage 2 took a negative clip, which flips updates)
    (["train.grad_clip=0"], ["train.grad_clip = 0", "> 0", "null"]),
    (["train.grad_clip=-1"], ["train.grad_clip = -1"]),
    (["train.min_lr_ratio=2"], ["train.min_lr_ratio = 2", "[0, 1]"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay = -0.1"]),
    (["validation.guidance_scale=-1"], ["validation.guidance_scale = -1", ">= 0"]),
    (["model.mlp_ratio=0"], ["model.mlp_ratio = 0", "> 0"]),
])
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        _load(override)
    for w in words:
        assert w in str(e.value)


def test_tilde_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    """README: "A leading `~` in any path key is expanded" (data.index_cache was not: a folder
    named `~` appeared in the working directory)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _load(["data.path=~/clips", "data.index_cache=~/index.json"])
    assert (cfg.data.path, cfg.data.index_cache) == (f"{tmp_path}/clips", f"{tmp_path}/index.json")


@pytest.mark.parametrize("override", ["train.grad_clip=-1", "train.min_lr_ratio=1.5", "train.weight_decay=-1"])
def test_stage1_checks_the_optimiser_keys_as_stage2(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(VAERunConfig, None, [override])


def test_vae_resolution_must_divide():
    with pytest.raises(ConfigError, match=r"data.resolution = 30 .*factor 4"):
        load_config(VAERunConfig, None, ["data.resolution=30"])


def test_stage2_requires_vae_path():
    with pytest.raises(ConfigError, match="vae.path"):
        load_config(TrainRunConfig, None, [])


@pytest.mark.parametrize("key", ["train.vae_loss_weight", "train.kl_loss_weight"])
def test_training_the_vae_is_refused_with_reason(key):
    with pytest.raises(ConfigError) as e:
        _load([f"{key}=5.0"])
    assert key in str(e.value) and "jigsaw" in str(e.value)
    with pytest.raises(ConfigError, match="remove this key"):
        _load([f"{key}=0.0"])


def test_missing_config_file(tmp_path):
    with pytest.raises(MissingFileError, match="nope.yaml"):
        load_config(TrainRunConfig, str(tmp_path / "nope.yaml"))


def test_bad_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainRunConfig, str(p))


def test_resolved_dump_roundtrip(tmp_path):
    cfg = _load(["train.lr=1e-3", "model.depth=2"])
    dump_config(cfg, str(tmp_path / "config.yaml"))
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["train"]["lr"] == pytest.approx(1e-3) and raw["model"]["depth"] == 2
    assert config_from_dict(TrainRunConfig, raw) == cfg
    assert config_to_dict(config_from_dict(ModelConfig, raw["model"])) == raw["model"]


# --------------------------------------------------------------------------- every key is read
#
# A key that no code reads is a lie in the config. Each shipped YAML runs a tiny end-to-end
# run (its own entry script, the shipped file plus tiny-size overrides) while every read of a
# config dataclass field is recorded; each YAML leaf must have been read by the code that uses
# it. Reads by the config machinery itself (validation, loading, dumping, dataclass-generated
# __eq__/__repr__, asdict/replace) do not count: they read every key.

_MACHINERY = {"validate", "_positive", "_check_device", "_build", "_coerce", "load_config",
              "config_to_dict", "config_from_dict", "dump_config", "_set_dotted",
              "_refuse_vae_training"}


@contextlib.contextmanager
def recorded_reads():
    """Yields a set that fills with (class name, field) for each use of a config field."""
    reads, originals = set(), {}
    classes = [c for c in vars(utils.config).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]
    schema_files = {os.path.abspath(sys.modules[c.__module__].__file__) for c in classes}  # utils/config_*.py
    schema_files |= {os.path.abspath(utils.config.__file__), os.path.abspath(config_loader.__file__)}
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _names=names):
            if name in _names:
                code = sys._getframe(1).f_code
                machinery = (code.co_filename.startswith("<") or code.co_filename == dataclasses.__file__
                             or (os.path.abspath(code.co_filename) in schema_files
                                 and code.co_name in _MACHINERY))
                if not machinery:
                    reads.add((type(self).__name__, name))
            return object.__getattribute__(self, name)
        originals[cls] = cls.__dict__.get("__getattribute__")
        cls.__getattribute__ = getattribute
    try:
        yield reads
    finally:
        for cls, original in originals.items():
            if original is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = original


def _leaf_fields(raw: dict, cls: type, prefix: str = ""):
    """(dotted YAML key, dataclass name, field) for each leaf of `raw`, a YAML for `cls`."""
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            yield from _leaf_fields(value, hints[key], f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", cls.__name__, key


def _assert_all_read(name: str, reads: set) -> None:
    raw = yaml.safe_load(open(os.path.join(ROOT, name)))
    unread = [key for key, cls, field in _leaf_fields(raw, SHIPPED[name]) if (cls, field) not in reads]
    assert not unread, f"{name}: keys never read by the code: {unread}"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory):
    """config_advanced.yaml's consumers -> (reads, checkpoint path): train_advanced for 7 steps
    over an epoch end (validation, epoch checkpoint), one NaN loss (the non-finite guard),
    logit-normal timesteps; diagnose (held-out clips); a folder dataset with augmentation."""
    import diagnose
    import train_advanced
    from data import build_dataset
    from models.diffusion import Diffusion
    from tests.conftest import smooth_frames
    from tests.test_fault_tolerance import _nan_loss_on
    from tests.test_stage2 import TINY
    from utils.video_io import write_video
    vae = tmp_path_factory.mktemp("vae") / "vae"
    ae = build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8))
    ae.save_pretrained(str(vae))
    runs = tmp_path_factory.mktemp("runs")
    from tests.test_evaluate import StandInI3D  # validation.fvd.* are read only with a detector
    detector = str(tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.script(StandInI3D()), detector)
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={vae}",
            f"validation.fvd.detector_path={detector}", "validation.fvd.num_videos=4",
            f"experiment.runs_dir={runs}", "train.max_steps=7", "validation.every_epochs=1",
            "train.epoch_checkpoint_every=1", "diffusion.timestep_sampling=logit_normal"]
    clips = tmp_path_factory.mktemp("clips")
    write_video(str(clips / "a.mp4"), smooth_frames(8, 24, 32), fps=8)
    folder = load_config(TrainRunConfig, os.path.join(ROOT, "config_advanced.yaml"), [
        f"data.path={clips}", "data.random_crop=true", "data.hflip=true", "data.num_frames=4",
        "data.resolution=16", f"vae.path={vae}"])
    original_loss = Diffusion.loss
    Diffusion.loss = _nan_loss_on({2})
    try:
        with recorded_reads() as reads:
            assert train_advanced.main(args) == 0
            Diffusion.loss = original_loss
            assert diagnose.main(args + ["--min-vae-psnr", "0"]) in (0, 1)
            assert build_dataset(folder.data, "train", 0)[0]["video"].shape == (3, 4, 16, 16)
    finally:
        Diffusion.loss = original_loss
    return reads, str(runs / "demo" / "latest.pth")


def test_every_key_of_config_advanced_is_read(stage2_run):
    _assert_all_read("config_advanced.yaml", stage2_run[0])


def test_every_key_of_config_vae_is_read(tmp_path):
    import train_vae
    from tests.test_vae import TINY_OVERRIDES
    args = ["--config", os.path.join(ROOT, "config_vae.yaml"), *TINY_OVERRIDES,
            f"experiment.runs_dir={tmp_path}", "train.max_steps=2"]
    with recorded_reads() as reads:
        assert train_vae.main(args) == 0
    _assert_all_read("config_vae.yaml", reads)


def test_every_key_of_predict_advanced_is_read(stage2_run, tmp_path):
    import predict_advanced
    args = ["--config", os.path.join(ROOT, "predict_advanced.yaml"), "device=cpu",
            f"checkpoint={stage2_run[1]}", f"output_dir={tmp_path}", "num_videos=2", "num_steps=2"]
    with recorded_reads() as reads:
        assert predict_advanced.main(args) == 0
    _assert_all_read("predict_advanced.yaml", reads)


def test_every_key_of_config_t2v_demo_is_read(tmp_path, text_encoders):
    """config_t2v_demo.yaml's own keys (text encoder, captions, held-out pairs, prompts, caption
    dropout) are read by a text run; the keys it shares with config_advanced.yaml are checked
    by that file's test (its run reads the folder-only and FVD keys)."""
    import train_advanced
    from tests.test_stage2 import TINY
    vae = tmp_path / "vae"
    build_autoencoder(VAEArchConfig(block_out_channels=[16, 16, 16], norm_num_groups=8)).save_pretrained(str(vae))
    args = ["--config", os.path.join(ROOT, "config_t2v_demo.yaml"), *TINY, f"vae.path={vae}",
            f"text_encoder.path={text_encoders['t5']}", f"experiment.runs_dir={tmp_path}",
            "train.max_steps=3", "validation.every_epochs=1"]
    with recorded_reads() as reads:
        assert train_advanced.main(args) == 0
    raw = yaml.safe_load(open(os.path.join(ROOT, "config_t2v_demo.yaml")))
    shared = {key for key, _, _ in _leaf_fields(yaml.safe_load(open(os.path.join(ROOT, "config_advanced.yaml"))),
                                                TrainRunConfig)}
    unread = [key for key, cls, f in _leaf_fields(raw, TrainRunConfig) if (cls, f) not in reads and key not in shared]
    assert not unread, f"config_t2v_demo.yaml: keys never read by the code: {unread}"


def test_the_read_recorder_sees_an_unread_key():
    """The check can fail: a key nothing reads during the run is reported."""
    cfg = load_config(TrainRunConfig, None, ["vae.path=x"])
    with recorded_reads() as reads:
        config_to_dict(cfg)  # machinery: reads every field, counts none
        cfg.train.lr
    assert reads == {("TrainRunConfig", "train"), ("TrainConfig", "lr")}
    with pytest.raises(AssertionError, match=r"keys never read by the code: \[.*'train.batch_size'"):
        _assert_all_read("config_advanced.yaml", reads)
