"""The run directory: one owner at a time, which files make a directory a run's, and disk-full errors that name
the file.

::

    with RunDirLock(run_dir):                      # RunDirError naming the holder's pid if another run has it
        if run_files(run_dir) and not overwrite:   # an existing run is never overwritten silently
            raise RunDirError(...)
        remove_run_files(run_dir)                  # --overwrite: the old run's files, its replay store included
        write_json(run_dir / "config.json", record)

**The lock.** ``RunDirLock`` takes ``fcntl.flock`` on ``<run_dir>/.lock`` and writes its pid there (for the
message a second run gets). The lock belongs to the open file description, so the kernel releases it when the
process dies, ``kill -9`` included: there is never a stale lock to delete by hand. A forked child inherits the
open file description and would keep the lock held after the parent died, so the descriptor is opened with
``O_CLOEXEC`` (closed by every ``exec``: the fork server, ``spawn`` workers, ``subprocess``) and closed in every
child that Python's ``os.fork`` makes (``os.register_at_fork``: gymnasium's ``AsyncVectorEnv`` workers under the
``fork`` start method). Closing the child's copy leaves the parent's lock held; only an explicit unlock or the
last close releases it. The ``.lock`` file stays in the directory; it is not one of the run's files.

**Disk full.** :func:`on_disk_full` turns ``ENOSPC`` (and ``EDQUOT``) inside it into :class:`DiskFull` naming the
file being written and what to do (:func:`resume_advice`: free space and ``--resume DIR``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from streamrl.errors import DiskFull, RunDirError

LOCK_NAME = ".lock"
RUN_FILES = ("config.json", "summary.json", "status.json", "metrics.csv", "scalars.csv", "events.jsonl", "curves.png",
             "tensorboard", "wandb")
RUN_FILE_PATTERNS = ("checkpoint*.pt", "*.tmp")

_held_fds: set[int] = set()  # descriptors of the run-directory locks this process holds


def _close_locks_in_child() -> None:
    """After ``os.fork``, in the child: drop the copies of the lock descriptors (never unlock: that is the parent's)."""
    for fd in _held_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


def resume_advice(run_dir: str | Path) -> str:
    """What to do after a disk filled up mid-run."""
    return f"free space and resume with --resume {run_dir}"


@contextlib.contextmanager
def on_disk_full(path: str | Path, advice: str = "free space and run again") -> Iterator[None]:
    """Inside it, an ``OSError`` for a full disk (or quota) becomes :class:`DiskFull` naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(path, advice) from exc


class RunDirLock:
    """An exclusive, non-blocking lock on a run directory for as long as a run uses it; see the module docstring.

    ::

        with RunDirLock("runs/x"):     # creates the directory if needed
            ...                        # RunDirError if another process holds it: "... in use by pid 1234 ..."
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"run directory {str(self.run_dir)!r} is a file; give --out a directory") from None
        with on_disk_full(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirError(
                f"run directory {str(self.run_dir)!r} is in use by another run (pid {holder}); wait for it to "
                "end or stop it, or give this run another --out"
            ) from None
        _held_fds.add(fd)
        self.fd = fd
        try:
            with on_disk_full(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _held_fds.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes just after locking: give it a moment)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def run_files(run_dir: str | Path) -> list[Path]:
    """The files and replay stores (zarr groups) of a run in ``run_dir``; empty when it holds no run."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = {root / name for name in RUN_FILES if (root / name).exists()}
    for pattern in RUN_FILE_PATTERNS:
        found.update(root.glob(pattern))
    found.update(child for child in root.iterdir() if child.is_dir() and (child / "zarr.json").exists())
    return sorted(found)


def remove_run_files(run_dir: str | Path, *, keep: Iterable[str] = ()) -> list[Path]:
    """Remove the run's files and stores from ``run_dir`` (not the lock, not foreign files); return what went."""
    kept = set(keep)
    removed = [path for path in run_files(run_dir) if path.name not in kept]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def has_checkpoint(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a checkpoint (``checkpoint.pt`` or an older rotated one) to resume from."""
    return any(Path(run_dir).glob("checkpoint*.pt"))
