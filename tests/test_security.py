"""Nothing a user hands us is executed: checkpoints load with weights_only=True, YAML with
the safe loader, and no eval/exec anywhere in the repo's code (tests and .venv excluded).

The scan parses every file (ast), so line breaks inside a call do not hide one; a token
count (code only: strings and comments may mention it) double-checks that the parser saw
every `torch.load` written.

Model folders (text encoder, VAE) whose weights are a pickle that would run code are named as
unsafe pickles, never as "corrupt", and the message never suggests weights_only=False (issue
27, item 8): test_a_pickle_text_encoder_is_refused_as_unsafe, test_a_pickle_vae_exits_2_named_as_unsafe.
"""
import ast
import glob
import io
import os
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
BANNED_CALLS = {"eval", "exec"}


def repo_files():
    skip = (os.sep + ".venv" + os.sep, os.sep + "tests" + os.sep)
    files = [f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
             if not any(s in f for s in skip)]
    assert len(files) > 10, "the scan found too few files to mean anything"
    return sorted(files)


def _name(node):
    """'torch.load' for torch.load(...), 'eval' for eval(...), else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def problems(source: str, filename: str) -> tuple[list[str], int]:
    """(unsafe calls as 'file:line: what', number of torch.load calls seen)."""
    found, torch_loads = [], 0
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name, where = _name(node.func), f"{filename}:{node.lineno}"
        if name == "torch.load":
            torch_loads += 1
            wo = _keyword(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif name is not None and name.startswith("yaml.") and name[5:] in UNSAFE_YAML:
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _name(loader) if loader is not None else None
            if loader_name is None or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{where}: {name} without a safe Loader (use yaml.safe_load)")
        elif name in BANNED_CALLS or name in {f"builtins.{b}" for b in BANNED_CALLS}:
            found.append(f"{where}: {name}()")
        elif name in ("pickle.load", "pickle.loads"):
            found.append(f"{where}: {name} executes code from the file")
    return found, torch_loads


def _token_count(source: str, sequence: tuple[str, ...]) -> int:
    """How often `sequence` appears as consecutive code tokens (strings, comments ignored)."""
    skip = (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT)
    words = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type not in skip]
    n = len(sequence)
    return sum(tuple(words[i:i + n]) == sequence for i in range(len(words)))


def test_no_unsafe_loading_or_eval_in_repo_code():
    found, torch_loads, text_count = [], 0, 0
    for path in repo_files():
        source = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, ROOT)
        bad, n = problems(source, rel)
        found += bad
        torch_loads += n
        text_count += _token_count(source, ("torch", ".", "load"))
        assert "from torch import load" not in source, f"{rel}: import torch.load by name"
    assert not found, "\n".join(found)
    assert torch_loads >= 1, "expected at least the checkpoint loader's torch.load"
    assert torch_loads == text_count, "a torch.load that is not called directly (aliased?)"


@pytest.mark.parametrize("snippet, flagged", [
    ("torch.load(p)", True),
    ("torch.load(p, weights_only=False)", True),
    ("torch.load(\n  p,\n  map_location='cpu',\n  weights_only=True)", False),
    ("yaml.load(f)", True),
    ("yaml.load(f, Loader=yaml.Loader)", True),
    ("yaml.load(f, Loader=yaml.SafeLoader)", False),
    ("yaml.full_load(f)", True),
    ("yaml.safe_load(f)", False),
    ("eval('1 + 1')", True),
    ("exec(code)", True),
    ("pickle.loads(b)", True),
    ("model.eval()", False),  # a method called eval is not the builtin
])
def test_the_scan_can_fail(snippet, flagged):
    assert bool(problems(snippet, "snippet.py")[0]) == flagged


# --------------------------------------------------------------------------- pickle weights in model folders


class RunsCode:
    """Unpickling this calls os.system (the classic malicious pickle)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_pickle_weights(src, dst, weights_name, marker, legacy=False):
    """A copy of model folder `src` whose safetensors weights are replaced by a real pickle
    `weights_name` that would run `touch marker`."""
    import shutil

    import torch
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(dst, name))
    torch.save({"weight": RunsCode(marker)}, os.path.join(dst, weights_name),
               _use_new_zipfile_serialization=not legacy)
    return str(dst)


def _assert_named_unsafe(message, path, calls):
    assert f"{path} is a pickle file" in message and "loading a pickle can run code" in message
    assert "nothing in it was run" in message and "safetensors" in message
    assert "weights_only" not in message and "corrupt" not in message
    if calls:
        assert "would call posix.system" in message


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_text_encoder_is_refused_as_unsafe(text_encoders, tmp_path, legacy):
    """issue 27, item 8: a real os.system pickle as pytorch_model.bin is named as an unsafe
    pickle (it was called "corrupt or incomplete", passing on torch's advice to retry with
    weights_only=False), and never run. The advice works: the safetensors weights load."""
    from models.text_encoder import FrozenTextEncoder
    from utils.errors import UserError
    marker = tmp_path / "was_run"
    folder = _with_pickle_weights(text_encoders["t5"], tmp_path / "t5", "pytorch_model.bin", marker, legacy)
    with pytest.raises(UserError) as e:
        FrozenTextEncoder.from_pretrained(folder)
    _assert_named_unsafe(str(e.value), os.path.join(folder, "pytorch_model.bin"), calls=not legacy)
    assert "text_encoder.path" in str(e.value) and not marker.exists()
    trusted = FrozenTextEncoder.from_pretrained(text_encoders["t5"])  # the advice: safetensors weights
    os.remove(os.path.join(folder, "pytorch_model.bin"))
    trusted.model.save_pretrained(folder, safe_serialization=True)
    assert FrozenTextEncoder.from_pretrained(folder).fingerprint == trusted.fingerprint


def test_a_pickle_vae_exits_2_named_as_unsafe(trained_vae, tmp_path, capsys):
    import train_advanced
    from models.vae import FrozenVAE
    from tests.test_bad_input import _assert_user_error_exit, _cli
    from tests.test_stage2 import TINY
    marker = tmp_path / "was_run"
    folder = _with_pickle_weights(trained_vae, tmp_path / "vae", "diffusion_pytorch_model.bin", marker)
    args = ["--config", os.path.join(ROOT, "config_advanced.yaml"), *TINY, f"vae.path={folder}",
            f"experiment.runs_dir={tmp_path / 'runs'}", "experiment.name=run"]
    code, _, err = _cli(train_advanced, args, capsys)
    _assert_user_error_exit(code, err, "vae.path")
    _assert_named_unsafe(err, os.path.join(folder, "diffusion_pytorch_model.bin"), calls=True)
    assert not marker.exists()
    os.remove(os.path.join(folder, "diffusion_pytorch_model.bin"))  # the advice: safetensors weights
    FrozenVAE.from_pretrained(trained_vae).ae.save_pretrained(folder, safe_serialization=True)
    assert FrozenVAE.from_pretrained(folder).fingerprint == FrozenVAE.from_pretrained(trained_vae).fingerprint
