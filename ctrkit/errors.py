"""Errors that the CLI turns into one-line messages and a non-zero exit (never a traceback)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Optional, Union


class CtrkitError(Exception):
    """Base class: anything a user can fix (config, input files, paths)."""


class ConfigError(CtrkitError):
    """Invalid configuration: unknown key, wrong type, bad value, missing file."""


class DataError(CtrkitError):
    """Bad input data; the message names the file, the line and the field where known."""

    def __init__(self, path: Union[str, Path], message: str, line: Optional[int] = None,
                 field: Optional[str] = None) -> None:
        self.path, self.line, self.field = str(path), line, field
        where = self.path
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f" field {field}"
        super().__init__(f"{where}: {message}")


class NoDataRows(DataError):
    """A file with a header (or nothing) and no data rows; a caller may treat it as zero rows."""

    def __init__(self, path: Union[str, Path]) -> None:
        super().__init__(path, "file has no data rows")


class Interrupted(CtrkitError):
    """SIGINT/SIGTERM during training: the run saved its state first and can be resumed."""

    exit_code = 130

    def __init__(self, step: Optional[int], checkpoint: Union[str, Path]) -> None:
        self.step, self.checkpoint = step, str(checkpoint)
        super().__init__(f"interrupted at step {step}; saved {checkpoint}" if step is not None else
                         f"interrupted; the last complete checkpoint is in {checkpoint}")


def report_rank_error(message: str) -> None:
    """Under torchrun, leave this rank's one-line error where the launcher reads it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time()),
                                              "ctrkit_time": time.time()}))
