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
import re
import shutil
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


_TMP_NAME = re.compile(r"\.(.+)\.tmp-\d+-[0-9a-f]{8}")
_ENTRIES = ("files", "patterns", "dirs", "trees")


def _target_of_tmp(name: str) -> Optional[str]:
    """`x` for a temporary name `.x.tmp-<pid>-<8 hex>` that `atomic_path` made (a leftover of a
    crashed write of `x`); None for any other name."""
    m = _TMP_NAME.fullmatch(name)
    return m.group(1) if m else None


def _match(rel: str, pattern: str) -> bool:
    """fnmatch one path segment at a time: `*` never crosses a `/`."""
    a, b = rel.split("/"), pattern.split("/")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(a, b))


def _inside(entry) -> bool:
    """A manifest entry that names something inside the folder (relative, no `..`)."""
    return (isinstance(entry, str) and entry != "" and not entry.startswith("/")
            and ".." not in entry.split("/") and "\\" not in entry)


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
    """A folder ctrkit writes into; `kind` names it in messages ("run folder", ...).

    The manifest holds `files` (names, compared literally), `patterns` (fnmatch patterns matched
    one path segment at a time, e.g. `tb/events.out.tfevents.*`), `dirs` (folders ctrkit made,
    removed when left empty) and `trees` (folders ctrkit made whole, e.g. a temporary folder
    with a unique name: everything in them is ctrkit's). A manifest of another kind owns
    nothing here: a run folder is never cleared as a prepared folder."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root, self.kind = Path(root), kind

    # ------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read(self) -> dict:
        try:
            d = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise CtrkitError(f"{self.manifest_path}: unreadable manifest ({e})") from None
        if not isinstance(d, dict):
            raise CtrkitError(f"{self.manifest_path}: unreadable manifest (not an object)")
        for key in _ENTRIES:   # (an edited manifest never reaches outside the folder)
            d[key] = [e for e in d.get(key, []) if _inside(e)]
        return d

    def _entries(self) -> dict:
        d = self._read()
        return d if d.get("kind") == self.kind else {}

    @property
    def owned(self) -> bool:
        """The folder has a manifest of this kind: ctrkit wrote here."""
        return bool(self._entries())

    @property
    def manifest_kind(self) -> Optional[str]:
        return self._read().get("kind")

    def _check_kind(self) -> None:
        kind = self.manifest_kind
        if kind is not None and kind != self.kind:
            raise CtrkitError(f"{self.root} is a ctrkit {kind}, not a {self.kind}; choose another "
                              "folder")

    def record(self, files: Sequence[str] = (), patterns: Sequence[str] = (),
               dirs: Sequence[str] = (), trees: Sequence[str] = ()) -> None:
        """Add names relative to the folder to the manifest, before writing them."""
        self._check_kind()
        d = self._read()
        new = {"kind": self.kind}
        for key, extra in zip(_ENTRIES, (files, patterns, dirs, trees)):
            new[key] = list(dict.fromkeys(list(d.get(key, [])) + list(extra)))
        if new == {k: d.get(k, []) if k != "kind" else d.get("kind") for k in new}:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.manifest_path, json.dumps(new, indent=1))

    def reset(self, files: Sequence[str] = (), patterns: Sequence[str] = (),
              dirs: Sequence[str] = (), trees: Sequence[str] = ()) -> None:
        """Make the manifest list exactly these names (after the old ones were cleared)."""
        self._check_kind()
        new = {"kind": self.kind, "files": list(files), "patterns": list(patterns),
               "dirs": list(dirs), "trees": list(trees)}
        atomic_write_text(self.manifest_path, json.dumps(new, indent=1))

    def owns(self, rel: str, entries: Optional[dict] = None) -> bool:
        """Whether ctrkit recorded `rel`; `entries`: the manifest already read (a walk over many
        files reads it once)."""
        if rel in (MANIFEST, LOCK):
            return True
        d = self._entries() if entries is None else entries
        if any(rel.startswith(t + "/") for t in d.get("trees", [])):
            return True
        head, _, name = rel.rpartition("/")
        target = _target_of_tmp(name)
        names = [rel] + ([f"{head}/{target}" if head else target] if target else [])
        return any(n in d.get("files", []) or any(_match(n, p) for p in d.get("patterns", []))
                   for n in names)

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
        d = self._entries()
        return next((f for f in self.files() if not self.owns(f, d)), None)

    def check_replaceable(self, how: str) -> None:
        """Refuse unless every file in the folder is one ctrkit recorded. `how` says what the
        user asked for ("train.overwrite=true", ...)."""
        self._check_kind()
        stray = self.foreign() if self.root.is_dir() else None
        if stray is None:
            return
        if not self.owned:
            raise CtrkitError(f"{self.root} is not empty and is not a ctrkit {self.kind} (it holds "
                              f"{stray}); {how} only replaces what ctrkit wrote: choose another "
                              "folder")
        raise CtrkitError(f"{self.root} holds {stray}, which ctrkit did not write; {how} "
                          "never deletes it: move it away or choose another folder")

    def clear(self, keep: Optional[str] = None, under: Optional[str] = None) -> None:
        """Remove the files ctrkit recorded (and leftovers of its interrupted writes) and its
        trees, then the recorded folders left empty. Nothing else is touched. `keep`: a tree to
        leave; `under`: only paths inside this sub-folder."""
        d = self._entries()
        if not d:
            return
        inside = (lambda rel: rel.startswith(under + "/")) if under else (lambda rel: True)
        for tree in d.get("trees", []):
            if tree != keep and inside(tree):
                self.remove_tree(tree)
        for rel in self.files():
            if rel not in (MANIFEST, LOCK) and inside(rel) and self.owns(rel, d) and \
                    not (keep and rel.startswith(keep + "/")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / rel)
        for rel in sorted(d.get("dirs", []), key=lambda x: -x.count("/")):
            if inside(rel):
                with contextlib.suppress(OSError):   # (only when empty)
                    os.rmdir(self.root / rel)

    def remove_tree(self, tree: str) -> None:
        """A folder ctrkit made whole (recorded under `trees`), with everything in it."""
        if tree in self._entries().get("trees", []):
            path = self.root / tree
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, exclusive: bool = True, wait: bool = False,
             waiting_message: Optional[str] = None) -> Iterator[None]:
        """Hold the folder's lock in the block. `wait=False`: a busy folder is a one-line error
        naming the holder; `wait=True`: block (printing `waiting_message` once)."""
        path = self.root / LOCK
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if exclusive or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a read-only shared folder (nobody can replace it): read it without a lock
            if not path.exists():
                yield
                return
            fd = os.open(path, os.O_RDONLY)
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
            if exclusive:   # (flock works on a read-only descriptor; only exclusive ones write)
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
