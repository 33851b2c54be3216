"""Folders ctrkit writes (run folders, prepared folders): what it owns there, who is writing, and
how files appear.

- **Manifest.** `.ctrkit-manifest.json` lists the files ctrkit writes in the folder (as `fnmatch`
  patterns, e.g. `checkpoints/last-step*-rank*.pt`) and the folders it created. A name is recorded
  *before* the file is written, so a crash still leaves only owned files behind. `clear()` removes
  exactly the owned files (and the owned folders that are then empty); a folder holding anything
  else is refused, with a message naming one such file.
- **Lock.** `.ctrkit-lock` is an OS file lock (`flock`): released by the kernel when the process
  dies, so a killed run never leaves a stale lock. An exclusive holder writes its pid and command
  into the file, so a refused second process can name it.
- **Atomic files.** `atomic_path()` yields a unique temporary name beside the target (one per
  process and call) and renames it into place only when the block succeeds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

from ctrkit.errors import CtrkitError

MANIFEST = ".ctrkit-manifest.json"
LOCK = ".ctrkit-lock"
_TMP = ".tmp-"   # temporary names: .<target name>.tmp-<pid>-<random>


def _tmp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _target_of_tmp(name: str) -> Optional[str]:
    """`x` for a temporary name `.x.tmp-...` (a leftover of a crashed write of `x`)."""
    if name.startswith(".") and _TMP in name:
        return name[1:name.index(_TMP)]
    return None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path to write `target` through: renamed onto `target` when the block ends
    without an error, removed otherwise (a reader sees the old file or the whole new one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(target: Path, text: str) -> None:
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise write_error(target, e) from None


def write_error(path: Path, e: OSError) -> CtrkitError:
    """A failed write as one line: which file, and the system's reason (disk full, ...)."""
    return CtrkitError(f"{path}: cannot write ({e.strerror or e})")


def is_within(a: Path, b: Path) -> bool:
    """True when `a` is `b` or lies inside it (after resolving links)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def check_folder(folder: Path, key: str) -> None:
    """An output folder must be a folder (or not exist yet), and so must its parents."""
    for p in [Path(folder), *Path(folder).parents]:
        if p.exists() and not p.is_dir():
            raise CtrkitError(f"{key}: {p} is a file, not a folder")


def check_disjoint(folder: Path, key: str, inputs: Iterable[Path]) -> None:
    """An output folder may neither hold nor lie inside an input of the same command."""
    for p in inputs:
        if p is None:
            continue
        what = "input file" if Path(p).is_file() else "input"
        if is_within(p, folder):
            raise CtrkitError(f"{key}: {folder} contains {what} {p}; choose another folder")
        if is_within(folder, p):
            raise CtrkitError(f"{key}: {folder} is inside {what} {p}; choose another folder")


class OwnedFolder:
    """A folder ctrkit writes into; `kind` names it in messages ("run folder", ...)."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root, self.kind = Path(root), kind

    # ------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _manifest(self) -> dict:
        try:
            d = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CtrkitError(f"{self.manifest_path}: unreadable manifest ({e})") from None
        return d if isinstance(d, dict) else {}

    @property
    def owned(self) -> bool:
        """The folder has a manifest: ctrkit wrote here."""
        return self.manifest_path.is_file()

    @property
    def manifest_kind(self) -> Optional[str]:
        return self._manifest().get("kind")

    def record(self, files: Sequence[str] = (), dirs: Sequence[str] = ()) -> None:
        """Add names (patterns relative to the folder) to the manifest, before writing them."""
        d = self._manifest()
        d.setdefault("kind", self.kind)
        new_files = list(dict.fromkeys(list(d.get("files", [])) + list(files)))
        new_dirs = list(dict.fromkeys(list(d.get("dirs", [])) + list(dirs)))
        if new_files == d.get("files") and new_dirs == d.get("dirs"):
            return
        d["files"], d["dirs"] = new_files, new_dirs
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest_path, json.dumps(d, indent=1))

    def owns(self, rel: str) -> bool:
        if rel in (MANIFEST, LOCK):
            return True
        patterns = self._manifest().get("files", [])
        head, _, name = rel.rpartition("/")
        target = _target_of_tmp(name)
        names = [rel] + ([f"{head}/{target}" if head else target] if target else [])
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    def files(self) -> List[str]:
        """Every file (and link) under the folder, relative, sorted."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                out.append(n if rel == "." else f"{rel}/{n}".replace(os.sep, "/"))
        return sorted(out)

    def contents(self) -> List[str]:
        """`files()` less the manifest and the lock."""
        return [f for f in self.files() if f not in (MANIFEST, LOCK)]

    def foreign(self) -> Optional[str]:
        """One file in the folder that ctrkit did not write (None: every file is ctrkit's)."""
        return next((f for f in self.files() if not self.owns(f)), None)

    def check_replaceable(self, how: str) -> None:
        """Refuse unless every file in the folder is one ctrkit recorded. `how` says what the
        user asked for ("train.overwrite=true", ...)."""
        stray = self.foreign() if self.root.is_dir() else None
        if stray is None:
            return
        if not self.owned:
            raise CtrkitError(f"{self.root} is not empty and is not a ctrkit {self.kind} (it holds "
                              f"{stray}); {how} only replaces what ctrkit wrote: choose another "
                              "folder")
        if stray is not None:
            raise CtrkitError(f"{self.root} holds {stray}, which ctrkit did not write; {how} "
                              "never deletes it: move it away or choose another folder")

    def clear(self, keep: Optional[str] = None) -> None:
        """Remove the files ctrkit recorded (and leftovers of its interrupted writes), then the
        recorded folders that are left empty. Nothing else is touched; paths starting with `keep`
        stay."""
        self.clear_matching("*", keep)

    def clear_matching(self, pattern: str, keep: Optional[str] = None) -> None:
        """`clear()` restricted to the owned paths that match `pattern`."""
        for rel in self.files():
            if (rel not in (MANIFEST, LOCK) and fnmatch.fnmatchcase(rel, pattern)
                    and not (keep and rel.startswith(keep)) and self.owns(rel)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / rel)
        dirs = sorted(self._manifest().get("dirs", []), key=lambda s: -s.count("/"))
        for rel in dirs:
            if fnmatch.fnmatchcase(rel, pattern) and not (keep and (rel + "/").startswith(keep)):
                self._remove_empty_tree(self.root / rel)

    def reset(self, files: Sequence[str], dirs: Sequence[str]) -> None:
        """Make the manifest list exactly these names (after the old ones were cleared)."""
        d = self._manifest()
        d.update(kind=d.get("kind", self.kind), files=list(files), dirs=list(dirs))
        atomic_write_text(self.manifest_path, json.dumps(d, indent=1))

    @staticmethod
    def _remove_empty_tree(path: Path) -> None:
        """rmdir `path` and its sub-folders bottom-up, where empty (never a file)."""
        if not path.is_dir() or path.is_symlink():
            return
        for dirpath, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count(os.sep)):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)

    # ------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, exclusive: bool = True, wait: bool = False,
             waiting_message: Optional[str] = None) -> Iterator[None]:
        """Hold the folder's lock in the block. `wait=False`: a busy folder is a one-line error
        naming the holder; `wait=True`: block (printing `waiting_message` once)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(path)
                if not wait:
                    raise CtrkitError(f"{self.root}: {self.kind} is in use by another ctrkit "
                                      f"process ({holder}); wait for it to finish or choose "
                                      "another folder") from None
                if waiting_message:
                    print(f"ctrkit: {waiting_message} ({holder})", file=sys.stderr, flush=True)
                fcntl.flock(fd, mode)
            if exclusive:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_text().encode(), 0)
            yield
        finally:
            os.close(fd)   # (closing releases the lock)


def _holder_text() -> str:
    cmd = " ".join(sys.argv[:4]) if sys.argv and sys.argv[0] else "python"
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}: {cmd}"


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that holds it shared"


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                  errno.EACCES, errno.EPERM, errno.EIO)
