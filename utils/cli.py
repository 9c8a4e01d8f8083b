"""Command-line plumbing shared by the entry scripts: `--config file.yaml key.sub=value ...`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping, Optional

from utils.errors import UserError


def parse_args(argv: Optional[list[str]], description: str,
               flags: Optional[Mapping[str, str]] = None,
               config_required: bool = True) -> tuple[Optional[str], list[str], dict[str, Optional[str]]]:
    """Returns (config path, dotted overrides, {flag: value}). `flags`: {name: help} of the
    optional `--name VALUE` flags (each shown in --help with its help); `--config` is required
    unless `config_required` is False (then None without it).


    Overrides may stand anywhere: before, between or after the flags
    (`--config c.yaml --checkpoint p.pth vae.path=x` and `vae.path=x --config c.yaml` alike);
    plain `parse_args` would stop collecting positionals at the first flag after them.
    `description` (the script's docstring, with its example commands) is shown as written:
    argparse would rewrap it, running the examples together.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=config_required, default=None, help="YAML config file")
    flags = flags or {}
    for name, text in flags.items():
        parser.add_argument(f"--{name}", default=None, help=text)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    args = parser.parse_intermixed_args(argv)
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"argument {item!r}: overrides are written key.sub=value")
    return args.config, list(args.overrides), {n: getattr(args, n.replace("-", "_")) for n in flags}


def run_main(main: Callable[[Optional[list[str]]], Optional[int]]) -> None:
    """Run an entry point; a user mistake prints its message (no traceback) and exits 2."""
    try:
        code = main(None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
