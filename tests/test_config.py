"""Config strictness: unknown keys, wrong types, broken invariants, overrides, unread keys."""
import glob
import os
import re

import pytest
import yaml

from utils.config import (EvaluateConfig, ModelConfig, PredictConfig, TrainRunConfig, VAERunConfig,
                          config_from_dict, config_to_dict, dump_config, load_config)
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
])
def test_config_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        _load(override)
    for w in words:
        assert w in str(e.value)


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


# Keys consumed inside utils/config.py itself (the file is excluded from the search below).
CONSUMED_BY_CONFIG = {"model.preset"}  # ModelConfig.resolved() turns it into sizes


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", k


def _source_text():
    files = [f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
             if "/tests/" not in f and "/.venv/" not in f and not f.endswith("utils/config.py")]
    return "\n".join(open(f).read() for f in files)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_key_is_read(name):
    """A key that no code reads is a lie in the config: each leaf must be accessed as `.key`."""
    source = _source_text()
    raw = yaml.safe_load(open(os.path.join(ROOT, name)))
    unread = [full for full, leaf in _leaf_keys(raw)
              if full not in CONSUMED_BY_CONFIG and not re.search(rf"\.{leaf}\b", source)]
    assert not unread, f"{name}: keys never read by code: {unread}"
