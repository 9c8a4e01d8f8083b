"""Overrides are accepted anywhere on every script's command line, before or after flags."""
import os

import pytest

import diagnose
import predict_advanced
import train_advanced
import train_vae
from utils.cli import parse_args
from utils.errors import MissingFileError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [
    ["--config", "c.yaml", "--checkpoint", "p.pth", "vae.path=x", "seed=3"],
    ["vae.path=x", "--config", "c.yaml", "seed=3", "--checkpoint", "p.pth"],
    ["--checkpoint", "p.pth", "vae.path=x", "--config", "c.yaml", "seed=3"],
])
def test_overrides_before_between_and_after_flags(argv):
    config, overrides, flags = parse_args(argv, "test", flags={"checkpoint": "c", "min-vae-psnr": "m"})
    assert (config, overrides, flags) == ("c.yaml", ["vae.path=x", "seed=3"],
                                          {"checkpoint": "p.pth", "min-vae-psnr": None})


def test_a_token_without_equals_is_refused():
    with pytest.raises(UserError, match="'vae.path': overrides are written key.sub=value"):
        parse_args(["--config", "c.yaml", "vae.path"], "test")


def test_diagnose_reads_an_override_after_checkpoint(tmp_path):
    """`diagnose.py --config c --checkpoint p vae.path=x` once failed in argparse; now the
    override reaches the config (vae.path is checked) and the flag reaches its check."""
    cfg = os.path.join(ROOT, "config_advanced.yaml")
    with pytest.raises(MissingFileError, match="--checkpoint .*nope.pth: no such file"):
        diagnose.main(["--config", cfg, "--checkpoint", str(tmp_path / "nope.pth"),
                       f"vae.path={tmp_path}", "device=cpu"])
    with pytest.raises(UserError, match="train.max_stepz"):  # an override after the flag is parsed
        diagnose.main(["--config", cfg, "--checkpoint", str(tmp_path / "nope.pth"), "train.max_stepz=1"])


@pytest.mark.parametrize("module,config", [(train_vae, "config_vae.yaml"),
                                           (train_advanced, "config_advanced.yaml"),
                                           (predict_advanced, "predict_advanced.yaml")])
def test_every_script_takes_overrides_before_the_config_flag(module, config):
    """An unknown key named before `--config` is reached by the config loader (not argparse)."""
    with pytest.raises(UserError, match="experimentt"):
        module.main(["experimentt.name=x", "--config", os.path.join(ROOT, config)])
