"""Captions of a folder's clips: `data.captions` and `data.missing_caption`.

Where captions come from (`data.captions`):
- `null`: no captions (items carry no "caption").
- `sidecar`: `<clip stem>.txt` beside each video file, `<folder>.txt` beside a frame folder
  (the musubi-tuner / finetrainers convention): `a/clip.mp4` -> `a/clip.txt`, frame folder
  `a/clip/` -> `a/clip.txt`.
- a metadata file, one row per clip: `.csv` (with a header row), `.jsonl` (one JSON object a
  line) or `.json` (a list of objects). The clip's path, relative to `data.path`, is in a column
  named `path`, `file_path` or `video`; its caption in `text`, `caption` or `prompt` (the
  Open-Sora, VideoX-Fun, finetrainers and DiffSynth names). Other columns are ignored. A
  relative file name is looked up from the working directory, then inside `data.path`.

Captions are UTF-8 text of any length and language; surrounding whitespace is stripped. A
column (or JSON key) given twice in one header (object) is refused: which value counts would
be a guess.

What is refused (a `UserError` naming the file, row and column, before any clip is probed):
a metadata file that cannot be read or parsed; no path or no caption column, or two of either
(ambiguous); a row without a path, or whose caption is not text; two rows for one clip; a row
naming no clip found under `data.path`. A clip without a caption, or with an empty one, follows
`data.missing_caption`: `error` (refused, listing them), `skip` (left out of the dataset, with a
warning listing them) or `empty` (trained with the empty caption "").
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

from utils.config import DataConfig
from utils.errors import ConfigError, MissingFileError, UserError
from utils.paths import refuse_folder
from utils.prompts import read_prompts_file  # noqa: F401  (re-exported: predict's and validation's prompt files)

PATH_COLUMNS = ("path", "file_path", "video")
CAPTION_COLUMNS = ("text", "caption", "prompt")
SIDECAR = "sidecar"
MAX_LISTED = 20  # problem clips or rows named in one message; the rest are counted


class CaptionWarning(UserWarning):
    """Clips left out for want of a caption (data.missing_caption: skip)."""


@dataclass(frozen=True)
class Row:
    """One metadata row: where it is (for messages), the clip it names, its caption."""
    where: str  # e.g. "line 4" (csv, jsonl) or "item 3" (json)
    path: str  # relative to data.path, as written
    caption: Optional[str]  # None: no caption value in the row


def attach_captions(cfg: DataConfig, rels: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the sources kept, {source: caption}) for the relative source paths `rels` under
    cfg.path (posix, as data/videos.py finds them), by cfg.captions and cfg.missing_caption.

    Raises UserError for every bad case in the module docstring."""
    if cfg.captions is None:
        return list(rels), {}
    if cfg.captions == SIDECAR:
        found, where = _sidecar_captions(cfg.path, rels), "sidecar"
    else:
        found, where = _table_captions(cfg.path, rels, metadata_path(cfg)), cfg.captions
    return _apply_policy(cfg, rels, found, where)


def metadata_path(cfg: DataConfig) -> str:
    """The metadata file cfg.captions names: as given (~ expanded), else inside cfg.path."""
    given = os.path.expanduser(cfg.captions)
    if os.path.isfile(given) or os.path.isabs(given):
        return given
    inside = os.path.join(cfg.path, given)
    return inside if os.path.isfile(inside) else given


def sidecar_file(root: str, rel: str) -> str:
    """`<stem>.txt` beside a video file, `<folder>.txt` beside a frame folder."""
    path = os.path.join(root, rel)
    if os.path.isdir(path):
        return os.path.normpath(path) + ".txt"
    return os.path.splitext(path)[0] + ".txt"


def _sidecar_captions(root: str, rels: list[str]) -> dict[str, Optional[str]]:
    """{source: caption, or None when it has no .txt}."""
    out: dict[str, Optional[str]] = {}
    for rel in rels:
        path = sidecar_file(root, rel)
        if not os.path.isfile(path):
            out[rel] = None
            continue
        try:
            with open(path, encoding="utf-8-sig") as f:
                out[rel] = f.read().strip()
        except UnicodeDecodeError as e:
            raise UserError(f"data.captions = sidecar: {path} is not UTF-8 text ({e.reason} at byte "
                            f"{e.start}); save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"data.captions = sidecar: {path} cannot be read ({e.strerror})") from None
    return out


# --------------------------------------------------------------------------- metadata files


def read_metadata(path: str) -> list[Row]:
    """The rows of a .csv / .jsonl / .json caption file; UserError naming what is wrong."""
    refuse_folder(path, "data.captions", "a .csv, .jsonl or .json caption file (or sidecar: <stem>.txt "
                  "beside each clip)")
    if not os.path.isfile(path):
        raise MissingFileError(f"data.captions = {path}: file not found (a relative name is looked "
                               "up from the working directory, then inside data.path)")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext == ".csv":
                records = _csv_records(path, f)
            elif ext == ".jsonl":
                records = _jsonl_records(path, f)
            elif ext == ".json":
                records = _json_records(path, f)
            else:
                raise ConfigError(f"data.captions = {path}: use a .csv, .jsonl or .json file, or sidecar")
    except UnicodeDecodeError as e:
        raise UserError(f"data.captions = {path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"data.captions = {path}: cannot be read ({e.strerror})") from None
    if not records:
        raise UserError(f"data.captions = {path}: has no rows; give one row per clip with a path "
                        f"column ({' / '.join(PATH_COLUMNS)}) and a caption column ({' / '.join(CAPTION_COLUMNS)})")
    path_col = _column(path, records, PATH_COLUMNS, "clip path")
    text_col = _column(path, records, CAPTION_COLUMNS, "caption")
    return [_row(path, where, record, path_col, text_col) for where, record in records]


def _csv_records(path: str, f) -> list[tuple[str, dict]]:
    """The rows of a .csv with a header. Captions may be of any length (csv's field limit is
    lifted while reading); a row is named by the line it starts on (a quoted caption may span
    lines); a column named twice in the header is refused."""
    reader = csv.DictReader(f)
    records, start = [], 1
    limit = csv.field_size_limit(sys.maxsize)  # "any length": the module's default is 131072 characters
    try:
        if reader.fieldnames is None:
            raise UserError(f"data.captions = {path}: the file is empty; a .csv needs a header row "
                            f"naming its columns, e.g. path,text")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]  # "path, text" as typed
        twice = sorted({n for n in reader.fieldnames if reader.fieldnames.count(n) > 1})
        if twice:
            raise UserError(f"data.captions = {path}, line 1: the header names column {twice[0]!r} "
                            f"{reader.fieldnames.count(twice[0])} times ({', '.join(reader.fieldnames)}); "
                            "which one holds the value is ambiguous: rename or remove the others")
        start = reader.line_num + 1
        for record in reader:
            where = f"line {start}"
            start = reader.line_num + 1
            if None in record:
                raise UserError(f"data.captions = {path}, {where}: more fields than the header "
                                f"({len(reader.fieldnames)} columns); quote captions that hold commas")
            if any(v is None for v in record.values()):
                raise UserError(f"data.captions = {path}, {where}: fewer fields than the header "
                                f"({len(reader.fieldnames)} columns: {', '.join(reader.fieldnames)})")
            records.append((where, record))
    except csv.Error as e:
        raise UserError(f"data.captions = {path}, line {start}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return records


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's keys, refusing one given twice (json keeps the last one silently)."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice!r} is given {keys.count(twice)} times; keep one of them")
    return dict(pairs)


def _jsonl_records(path: str, f) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except ValueError as e:
            raise UserError(f"data.captions = {path}, line {number}: not valid JSON ({e}); a .jsonl "
                            "file holds one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"data.captions = {path}, line {number}: a {type(record).__name__}, not a "
                            'JSON object such as {"path": "clip.mp4", "text": "..."}')
        records.append((f"line {number}", record))
    return records


def _json_records(path: str, f) -> list[tuple[str, dict]]:
    try:
        data = json.load(f, object_pairs_hook=_unique_keys)
    except ValueError as e:
        raise UserError(f"data.captions = {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"data.captions = {path}: the top level is a {type(data).__name__}; a .json "
                        'caption file is a list of objects, e.g. [{"path": "clip.mp4", "text": "..."}]')
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise UserError(f"data.captions = {path}, item {i}: a {type(record).__name__}, not an "
                            'object such as {"path": "clip.mp4", "text": "..."}')
    return [(f"item {i}", record) for i, record in enumerate(data)]


def _column(path: str, records: list[tuple[str, dict]], names: tuple[str, ...], what: str) -> str:
    """The one column among `names` that the file uses."""
    seen = list(dict.fromkeys(k for _, r in records for k in r))
    present = [n for n in names if n in seen]
    if not present:
        raise UserError(f"data.captions = {path}: no {what} column; name it one of "
                        f"{', '.join(names)} (found: {', '.join(map(str, seen)) or 'none'})")
    if len(present) > 1:
        raise UserError(f"data.captions = {path}: {len(present)} {what} columns ({' and '.join(present)}); "
                        "which one to use is ambiguous: keep one of them (rename or remove the others)")
    return present[0]


def _row(path: str, where: str, record: dict, path_col: str, text_col: str) -> Row:
    clip, text = record.get(path_col), record.get(text_col)
    if not isinstance(clip, str) or not clip.strip():
        raise UserError(f"data.captions = {path}, {where}: no clip path in column {path_col!r} "
                        f"(got {clip!r}); give the clip's path relative to data.path")
    if text is not None and not isinstance(text, str):
        raise UserError(f"data.captions = {path}, {where}: the caption in column {text_col!r} is "
                        f"{text!r} ({type(text).__name__}), not text; quote it as a string")
    return Row(where, clip.strip(), None if text is None else text.strip())


def _normalise(root: str, clip: str) -> str:
    """A row's clip path -> the posix path relative to root that data/videos.py uses."""
    clip = clip.replace("\\", "/")
    if os.path.isabs(clip):
        clip = os.path.relpath(clip, root).replace(os.sep, "/")
    return posixpath.normpath(clip)


def _table_captions(root: str, rels: list[str], path: str) -> dict[str, Optional[str]]:
    """{source: caption, or None when no row names it}; refuses rows naming no clip and
    clips named twice."""
    known = set(rels)
    out: dict[str, Optional[str]] = {r: None for r in rels}
    first: dict[str, str] = {}  # source -> where its row is
    unknown = []
    for row in read_metadata(path):
        rel = _normalise(root, row.path)
        if rel not in known:
            unknown.append(f"{row.where}: {row.path!r}")
            continue
        if rel in first:
            raise UserError(f"data.captions = {path}: {first[rel]} and {row.where} both caption "
                            f"{rel}; keep one row per clip")
        first[rel] = row.where
        out[rel] = row.caption
    if unknown:
        raise UserError(f"data.captions = {path}: {len(unknown)} row(s) name no clip found under "
                        f"data.path = {root} (paths are relative to data.path; a clip must be a video "
                        f"file or a frame folder): " + _listing(unknown))
    return out


# --------------------------------------------------------------------------- policy


def _apply_policy(cfg: DataConfig, rels: list[str], found: dict[str, Optional[str]],
                  where: str) -> tuple[list[str], dict[str, str]]:
    """Clips without a caption (None) or with an empty one, by cfg.missing_caption."""
    bad = [(r, "no caption" if found[r] is None else "empty caption") for r in rels if not found[r]]
    if not bad:
        return list(rels), {r: found[r] for r in rels}
    how = (f"no <stem>.txt beside it ({sidecar_file(cfg.path, bad[0][0])} for the first)"
           if cfg.captions == SIDECAR else f"no row (or an empty caption) in {where}")
    lines = [f"{r}: {why}" for r, why in bad]
    if cfg.missing_caption == "error":
        raise UserError(f"data.captions = {where}: {len(bad)} of {len(rels)} clips have no caption "
                        f"or an empty one ({how}): {_listing(lines)}. Caption them, or set "
                        "data.missing_caption: skip (leave them out) or empty (train them with the "
                        "empty caption)")
    if cfg.missing_caption == "skip":
        kept = [r for r in rels if found[r]]
        if not kept:
            raise UserError(f"data.captions = {where}: none of the {len(rels)} clips has a caption "
                            f"({how}); with data.missing_caption: skip nothing is left to train on")
        warnings.warn(f"data.path = {cfg.path}: data.missing_caption = skip: left out {len(bad)} of "
                      f"{len(rels)} clips without a caption (or with an empty one):\n  " + "\n  ".join(lines[:MAX_LISTED])
                      + (f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""),
                      CaptionWarning, stacklevel=3)
        return kept, {r: found[r] for r in kept}
    return list(rels), {r: found[r] or "" for r in rels}  # empty: the empty caption


def _listing(lines: list[str]) -> str:
    more = f"; ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "; ".join(lines[:MAX_LISTED]) + more
