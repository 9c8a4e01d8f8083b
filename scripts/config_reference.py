"""The configuration reference (docs/configuration.md), generated from the config schemas: every
key of every script's config with its type, default and meaning, so the reference cannot drift
from the code.

    python scripts/config_reference.py            # rewrite docs/configuration.md
    python scripts/config_reference.py --check    # exit 1 if docs/configuration.md is out of date

The schemas are the dataclasses utils/config.py re-exports (utils/config_*.py); a key's
meaning is the comment written beside its field (or the comment lines just above it), its
section's description the dataclass's docstring. tests/test_config_reference.py checks that the
file is current and that every key has a meaning.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import types
import typing
from typing import Any, Iterator, Literal, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "docs", "configuration.md")
# (title, run config class name, the command and the shipped files that use it)
SCRIPTS = [
    ("Stage 1: `train_vae.py`", "VAERunConfig", "`python train_vae.py --config config_vae.yaml`"),
    ("Stage 2: `train_advanced.py` (and `diagnose.py`)", "TrainRunConfig",
     "`python train_advanced.py --config config_advanced.yaml` (also `config_t2v_demo.yaml`, "
     "`config_finetune.yaml`); `diagnose.py` reads the same file"),
    ("Predict: `predict_advanced.py`", "PredictConfig", "`python predict_advanced.py --config predict_advanced.yaml`"),
    ("Evaluate: `evaluate.py`", "EvaluateConfig", "`python evaluate.py --config evaluate.yaml`"),
    ("Export: `export.py`", "ExportConfig", "`python export.py checkpoint=runs/finetune/latest.pth`"),
]


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the source of the class that declares the field (the
    class itself or a base): the comment lines right above the field, then the one at the end
    of its line."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's redeclaration wins
        if dataclasses.is_dataclass(klass):
            found = _own_comments(klass)
            out.update({k: v for k, v in found.items() if v or k not in out})
    return out


def _own_comments(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name not in cls.__dict__.get("__annotations__", {}):
            continue  # declared by a base
        for number, line in enumerate(lines, start=1):
            stripped = line.strip()
            if stripped.startswith(f"{f.name}:") and line.startswith("    ") and not line.startswith("     "):
                above, k = [], number - 1
                while k >= 1 and lines[k - 1].strip().startswith("#"):
                    above.insert(0, comments.get(k, ""))
                    k -= 1
                text = " ".join(a for a in above + [comments.get(number, "")] if a)
                out[f.name] = " ".join(text.split())
                break
    return out


def type_name(tp: Any) -> str:
    """A field's annotation, as a reader writes it in YAML terms."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, typing.List):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin in (dict, typing.Dict):
        return "mapping"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def rows(cls: type, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every leaf key of `cls`, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from rows(tp, key + ".")
            continue
        yield key, type_name(tp), default_text(f), comments.get(f.name, "")


def sections(cls: type, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(section key, its dataclass docstring's first paragraph) of the nested sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip()
            if doc.startswith(f"{tp.__name__}("):  # the signature dataclasses write when none is
                doc = ""
            yield f"{prefix}{f.name}", " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
            yield from sections(tp, f"{prefix}{f.name}.")


def render() -> str:
    import utils.config as config
    out = ["# Configuration reference", "",
           "Every key of every script's config, with its type, default and meaning. Generated from the "
           "config schemas (`python scripts/config_reference.py`): do not edit by hand; a test fails "
           "when it is out of date. Keys are written nested in the YAML files or as dotted overrides on "
           "the command line (`train.lr=3e-4`, parsed as YAML scalars); unknown keys are refused with "
           "the closest valid name, and every value is checked at load, naming the key. `null` keeps a "
           "key's documented fallback.", ""]
    for title, name, command in SCRIPTS:
        cls = getattr(config, name)
        out += [f"## {title}", "", f"{command}.", ""]
        described = [(k, d) for k, d in sections(cls) if d]
        out += [f"- `{k}`: {d}" for k, d in described] + ([""] if described else [])
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, meaning in rows(cls):
            meaning = meaning.replace("|", "\\|")
            out.append(f"| `{key}` | {tp} | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.isfile(OUT) else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
