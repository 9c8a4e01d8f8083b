"""docs/configuration.md is the config schemas, rendered: every key of every script's config with
its type, default and meaning (scripts/config_reference.py), and nothing else."""
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import config_reference  # noqa: E402

SHIPPED = ["config_vae.yaml", "config_advanced.yaml", "config_t2v_demo.yaml", "config_finetune.yaml",
           "predict_advanced.yaml", "evaluate.yaml"]


def _keys(text: str) -> set:
    return {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, re.M)}


def _flatten(mapping: dict, prefix: str = "") -> set:
    out = set()
    for k, v in mapping.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def test_the_reference_is_the_schemas_and_every_key_has_a_meaning():
    text = config_reference.render()
    assert open(os.path.join(ROOT, "docs", "configuration.md")).read() == text, \
        "docs/configuration.md is out of date: run python scripts/config_reference.py"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 200
    empty = [r.split("|")[1].strip() for r in rows if not r.rstrip("| ").split("|")[-1].strip()]
    assert not empty, f"keys without a meaning (write a comment beside the field): {empty}"
    assert not re.search(r"\bissue \d+", text), "no issue numbers in user docs"


def test_every_key_of_the_shipped_configs_is_in_the_reference():
    documented = _keys(open(os.path.join(ROOT, "docs", "configuration.md")).read())
    for name in SHIPPED:
        keys = _flatten(yaml.safe_load(open(os.path.join(ROOT, name))))
        assert keys <= documented, f"{name}: {sorted(keys - documented)} not in docs/configuration.md"


def test_a_key_missing_from_the_schemas_or_the_file_is_caught(tmp_path, monkeypatch):
    """The check can fail: a reference with a key removed, or one naming a key no schema has."""
    text = config_reference.render()
    monkeypatch.setattr(config_reference, "OUT", str(tmp_path / "configuration.md"))
    for broken in (text.replace("| `train.lr` |", "| `train.learning_rate` |"),
                   "\n".join(line for line in text.splitlines() if not line.startswith("| `train.lr` |"))):
        (tmp_path / "configuration.md").write_text(broken)
        monkeypatch.setattr(sys, "argv", ["config_reference.py", "--check"])
        assert config_reference.main() == 1
