"""Typed command-line options shared by the bench/ programs, and how they end.

Every program is `python bench/<name>.py CONFIG [options]`: CONFIG is a ctrkit YAML config,
`--set KEY=VALUE` (repeatable) overrides one of its keys, as `key=value` does for `ctrkit`.
A user error (bad config, bad input file, bad option) is one line on stderr and exit status 2,
never a traceback; the result is printed as JSON on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import ctrkit
from ctrkit.config import Config
from ctrkit.errors import CtrkitError
from ctrkit.ownership import LOCK, MANIFEST, OwnedFolder, is_disk_error


def comma_list(kind: type, what: str, allow_empty: bool = False) -> Callable[[str], list]:
    """An argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)] ("" is [] with `allow_empty`)."""
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items and not allow_empty:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: not a comma-separated list of "
                                             f"{kind.__name__}: {text!r}") from None
    return parse


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`; "1e6" is accepted for 1000000."""
    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != int(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, not {text}")
        return int(value)
    return parse


def override(text: str) -> str:
    """An argparse type: one `key=value` config override."""
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"--set takes key=value, not {text!r}")
    return text


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error (argparse prints its usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str) -> Parser:
    """A program's parser with the arguments every bench program takes: CONFIG and --set."""
    p = Parser(prog=prog, description=description,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", type=Path, help="ctrkit YAML config")
    p.add_argument("--set", dest="overrides", type=override, action="append", default=[],
                   metavar="KEY=VALUE", help="config override (repeatable)")
    return p


def load(args: argparse.Namespace) -> Config:
    """The config named on the command line, with its --set overrides."""
    return ctrkit.load_config(args.config, args.overrides)


def run(prog: str, body: Callable[[], dict]) -> int:
    """Run a program's body; print its result as JSON (0), or a user error as one line (2)."""
    try:
        result = body()
    except (CtrkitError, OSError) as e:
        if isinstance(e, OSError) and not (is_disk_error(e) or e.filename):
            raise   # (an OSError about no file is a bug: its traceback helps)
        msg = str(e) if isinstance(e, CtrkitError) else \
            f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1, default=float))
    return 0


def parse(p: argparse.ArgumentParser, argv: List[str] | None):
    """Parsed arguments, or the exit status of --help or of a usage error (already printed)."""
    try:
        return p.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def remove_owned_folder(folder: Path, kind: str) -> Optional[str]:
    """Remove what ctrkit recorded in `folder` (a ctrkit `kind`: ctrkit.ownership), then the
    folder if nothing else is left in it. Returns a note when something was left."""
    if not folder.is_dir():
        return None
    owned = OwnedFolder(folder, kind)
    if not owned.owned:
        return f"{folder} is not a ctrkit {kind}; left as it is"
    with owned.lock(exclusive=True, wait=False):
        owned.clear()
    left = owned.contents()
    if left:
        return f"{folder} kept: it holds {left[0]}, which ctrkit did not write"
    for name in (MANIFEST, LOCK):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    return None
