"""Prompt files: predict's and validation's prompts, one per line (utils, so that the configs
can read them without importing data/)."""
from __future__ import annotations

import os

from utils.errors import MissingFileError, UserError
from utils.paths import refuse_folder


def read_prompts_file(path: str, key: str = "prompts_file") -> list[str]:
    """The prompts of a text file, one per line (UTF-8; surrounding whitespace stripped, blank
    lines skipped), for predict's and validation's prompts; UserError naming `key` and the file."""
    path = os.path.expanduser(path)
    refuse_folder(path, key, "a text file with one prompt per line")
    if not os.path.isfile(path):
        raise MissingFileError(f"{key} = {path}: file not found; give a text file with one prompt per line")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{key} = {path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{key} = {path}, line {line}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{key} = {path}: has no prompts; write one prompt per line")
    return prompts
