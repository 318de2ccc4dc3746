"""The rules for every file the scripts write, in one place and on the standard library
alone (plot.py and bench.py use them without torch): atomic writes, output paths made ready
or refused before any work, and one writer per run folder."""

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


class OutputError(Exception):
    """An output that cannot be written, or a run folder in use; one line for the user."""


def atomic_write(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """write(f) into a new file beside path, fsync, then rename it over path: a kill at any
    instant leaves the old file or the new one, never part of one. The file gets the
    permissions open() gives a new file (the umask's)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode()))


@dataclass(frozen=True)
class Output:
    """An output path made ready by output(), and the folders made for it, outermost first."""

    path: Path
    created: tuple[Path, ...] = ()

    def undo(self) -> None:
        """Remove the folders made for this output that are still empty, deepest first."""
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                return


def output(path: str | Path, flag: str, *, folder: bool = False, default_name: str = "") -> Output:
    """Where an output flag writes, made ready before any work: the missing folders made
    (with folder=True the path itself is a folder) and a file created and removed there to
    prove it can be written; an existing folder given for a file gets default_name inside it.
    Anything else is an OutputError naming the flag, with nothing left behind."""
    path = Path(path)
    if default_name and not folder and path.is_dir():
        path = path / default_name
    where = path if folder else path.parent
    chain = [where, *where.parents]
    blocker = next((p for p in chain if p.exists()), None)

    def refuse(why: str) -> OutputError:
        return OutputError(f"{flag} {path}: cannot write there ({why})")

    if blocker is not None and not blocker.is_dir():
        raise refuse(f"{'it' if blocker == path else blocker} is a file, not a folder")
    if not folder and path.is_dir():
        raise refuse("it is a folder")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise refuse("the file is read-only")
    made = Output(path, tuple(p for p in reversed(chain) if not p.exists()))
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-test.{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as e:
        made.undo()
        raise refuse(e.strerror or str(e)) from None
    return made


class RunLock:
    """One writer per run folder: the folder made ready (output()), then an OS lock (flock) on
    <folder>/.lock, held until release() or the end of the process. The kernel drops it when
    the process dies, so a killed run leaves no stale lock. The file names its holder for the
    refusal line; a holder refused before it writes anything (release() without keep())
    leaves the file, and the folders, as it found them."""

    NAME = ".lock"

    def __init__(self, folder: Path, flag: str) -> None:
        self.out = output(folder, flag, folder=True)
        self.path, self.kept = folder / self.NAME, False
        # Without flock (Windows) nothing stops a second process: `exclusive` says so.
        self.exclusive = fcntl is not None
        try:
            self.fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            self.fd, created = os.open(self.path, os.O_RDWR), False
        try:
            if self.exclusive:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(self.fd)
            self.out.undo()
            raise OutputError(f"{flag} {folder}: in use by {holder}; one process writes a run "
                              f"at a time (--evaluate may read it meanwhile)") from None  # fmt: skip
        self.before = None if created else self.path.read_bytes()
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._rewrite(json.dumps(me).encode() + b"\n")

    def _rewrite(self, content: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, content)

    def holder(self) -> str:
        """The holder as its lock file names it: "pid 123 on host since 2026-12-05 10:11:12"."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, TypeError, KeyError):
            return "another process"  # the holder is writing its line this instant

    def keep(self) -> None:
        """The run goes ahead: from now on the folder and the lock file are its own."""
        self.kept = True

    def release(self) -> None:
        """Unlock; a holder that did not keep() first puts back what it found."""
        if not self.kept:
            if self.before is None:
                self.path.unlink(missing_ok=True)
            else:
                self._rewrite(self.before)
        if self.exclusive:
            fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for forked children sharing the file
        os.close(self.fd)
        if not self.kept:
            self.out.undo()
