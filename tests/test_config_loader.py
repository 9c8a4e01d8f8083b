"""The generic config loader (utils/config_loader.py): files that are not YAML configs are
refused with a message naming the file, and the entry scripts exit 2 without a traceback."""
import os
import subprocess
import sys

import pytest

from utils.config import TrainRunConfig, load_config
from utils.config_loader import build, read_yaml_mapping
from utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_binary_config_file_is_named(tmp_path):
    p = tmp_path / "weights.pth"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"weights\.pth.*not a YAML text file"):
        load_config(TrainRunConfig, str(p))


def test_nul_bytes_in_utf8_file_are_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"train:\0\0\0")
    with pytest.raises(ConfigError, match=r"c\.yaml.*NUL"):
        read_yaml_mapping(str(p))


@pytest.mark.parametrize("path", ["/dev/null", "EMPTY", "COMMENTS"])
def test_empty_config_says_empty_not_missing(tmp_path, path):
    if path == "EMPTY":
        path = str(tmp_path / "empty.yaml")
        open(path, "w").close()
    elif path == "COMMENTS":
        path = str(tmp_path / "comments.yaml")
        open(path, "w").write("# train:\n#   lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainRunConfig, path)
    assert path in str(e.value) and "empty" in str(e.value) and "not found" not in str(e.value)


def test_a_list_at_top_level_is_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml_mapping(str(p))


def test_build_is_generic_and_strict():
    from dataclasses import dataclass

    @dataclass
    class Part:
        rate: float = 1.0
        home: str = "x"

    assert build(Part, {"rate": "3e-4", "home": "~/a"}, "", {"home"}) == Part(3e-4, os.path.expanduser("~/a"))
    with pytest.raises(ConfigError, match="did you mean p.rate"):
        build(Part, {"rat": 1}, "p.")


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b""])
def test_entry_script_exits_2_without_traceback(tmp_path, content):
    p = tmp_path / "cfg.bin"
    p.write_bytes(content)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_advanced.py"), "--config", str(p)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "cfg.bin" in r.stderr


@pytest.mark.parametrize("fps, ok", [(100, True), (101, False), (1000, False)])
def test_validation_fps_is_bounded_at_load(fps, ok):
    """The validation samples are written as .gif too (whole 1/100 s ticks): a rate above 100
    fps used to load and fail only when the first validation wrote its samples, after training."""
    overrides = ["vae.path=x", f"validation.fps={fps}"]
    if ok:
        assert load_config(TrainRunConfig, None, overrides).validation.fps == fps
        return
    with pytest.raises(ConfigError, match=rf"validation\.fps = {fps}: must be at most 100 frames"):
        load_config(TrainRunConfig, None, overrides)
