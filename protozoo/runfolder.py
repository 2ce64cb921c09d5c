"""A run folder's one writer: the lock, what a new run may start over, what a failed run leaves.

A leaf beside :mod:`protozoo.fileio` (it imports only :mod:`protozoo.errors` and
:mod:`protozoo.fileio`). :func:`run_folder` is what ``train.py`` and :func:`protozoo.train` hold
while a run writes its folder:

* **One writer.** The lock file (:data:`LOCK`, holding the writer's pid) is locked with
  ``fcntl.flock``; a second training on the same folder stops at once with a one-line error.
  The kernel drops the lock when its process ends, however it ends (``kill -9`` included), so a
  lock left by a dead process never blocks: the lock file itself is only a name.
* **Nothing half-written.** A run that fails before its first checkpoint (no resume state,
  :data:`STATE`) is removed; a run that fails later keeps its last completed epoch and the
  error says how to continue. A new run on a folder that holds only what a run killed before
  its first checkpoint leaves (:data:`LEFTOVERS`) starts over in place.
* **No stray temporary files.** The temporary files a killed atomic write left are removed
  when the folder's next writer starts (a live writer's file looks the same, so only the lock
  holder may).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .errors import UserError
from .fileio import stale_temps

try:  # POSIX; elsewhere the folder is not locked (documented in docs/hardening.md)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK = ".lock"
STATE = "train_state.pt"  # the resume state: a run has a checkpoint once this exists
RUN_CONFIG = "train_config.json"
# what a run killed before its first checkpoint leaves (besides the lock and temporary files)
LEFTOVERS = frozenset({RUN_CONFIG, "log.jsonl", "curves.png"})


class RunFolderError(UserError):
    """A run folder that cannot be written (in use, read-only, full) or must not be reused."""


def _flags(cli: bool) -> tuple[str, str]:
    return ("--out", "--resume") if cli else ("run_dir", "resume=True")


def has_checkpoint(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / STATE).is_file()


def _log_lines(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "log.jsonl").read_text().splitlines() if line)
    except (OSError, UnicodeDecodeError):
        return 0


def restartable(run_dir: Path) -> bool:
    """Does ``run_dir`` hold only what a run stopped before its first checkpoint leaves, so a
    new run may start over in place? That is: nothing but a lock and temporary files (stopped
    as it started); or its config, log and curves (stopped in its first epoch); or those and
    the model of that one epoch without its resume state (stopped during the first checkpoint:
    one log record at most, so a trained run whose state was deleted never qualifies)."""
    names = {p.name for p in run_dir.iterdir()} - {LOCK}
    names -= {p.name for p in stale_temps(run_dir)}
    if not names:
        return True
    if RUN_CONFIG not in names or STATE in names:
        return False
    if names <= LEFTOVERS:
        return True
    return names <= LEFTOVERS | {"model.safetensors", "config.json"} and _log_lines(run_dir) <= 1


def never_started(run_dir: Path) -> bool:
    """Is ``run_dir`` a run folder whose run was stopped before it wrote its config (it holds
    only the lock and temporary files)?"""
    return run_dir.is_dir() and any(run_dir.iterdir()) and restartable(run_dir) and \
        not (run_dir / RUN_CONFIG).exists()


def _cannot_write(run_dir: Path, exc: OSError, cli: bool) -> RunFolderError:
    flag, _ = _flags(cli)
    fix = ("free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else f"make it writable (chmod u+w {run_dir})")
    return RunFolderError(f"cannot write in the run folder '{run_dir}' ({exc.strerror}): {fix}, "
                          f"or choose another {flag}")


class _Lock:
    """An exclusive ``flock`` on ``run_dir/.lock``, taken without waiting."""

    def __init__(self, run_dir: Path, cli: bool):
        self.path, self.fd, self.made = run_dir / LOCK, None, False
        while True:
            try:
                try:  # made: whether this process created the lock file (removed on failure)
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    self.made = True
                except FileExistsError:
                    fd = os.open(self.path, os.O_RDWR)
            except OSError as exc:
                raise _cannot_write(run_dir, exc, cli) from None
            if fcntl is None:
                self.fd = fd
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _cannot_write(run_dir, exc, cli) from None
                self.made = False
                raise self._busy(run_dir, cli) from None
            try:  # the file we locked must still be the one at the path (a finishing writer
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino  # removes it)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def _busy(self, run_dir: Path, cli: bool) -> RunFolderError:
        try:
            pid = self.path.read_text().strip() or "?"
        except OSError:
            pid = "?"
        flag, _ = _flags(cli)
        return RunFolderError(
            f"run folder '{run_dir}' is being written by another training (pid {pid}): wait for "
            f"it to end or stop it, or choose another {flag} (the lock is released as soon as "
            "that process ends, even if it is killed, so it never outlives its writer)")

    def release(self, remove: bool) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # while still locked: a waiting writer then retries
        os.close(self.fd)
        self.fd = None


def _check_new(run_dir: Path, cli: bool) -> bool:
    """A new run's folder must be empty or a leftover of a run that never checkpointed (cleared
    here, under the lock); returns whether it was such a leftover."""
    flag, again = _flags(cli)
    others = [p for p in run_dir.iterdir() if p.name != LOCK]
    if not others:
        return False
    if restartable(run_dir):
        for p in others:
            (shutil.rmtree if p.is_dir() else os.remove)(p)
        return True
    if (run_dir / RUN_CONFIG).is_file() and not has_checkpoint(run_dir):
        raise RunFolderError(f"run directory '{run_dir}' holds files of a run that has no "
                             f"resume state ({STATE}): evaluate what it holds with evaluate.py, "
                             f"or delete it (rm -r {run_dir}) to start over, or choose another "
                             f"{flag}")
    target = f"{again} {run_dir}" if cli else again
    raise RunFolderError(f"run directory '{run_dir}' already exists; continue it with {target} "
                         f"or choose another {flag}")


@contextlib.contextmanager
def run_folder(run_dir: str | os.PathLike, new: bool, cli: bool = False):
    """Hold ``run_dir`` as its one writer (see the module doc); yields the folder as a Path.

    ``new``: a new run (the folder is created, or must be empty or a restartable leftover);
    otherwise a resumed run (the folder and its resume state exist). An exception inside
    removes a folder without a checkpoint, and a :class:`UserError` gets the way on appended.
    """
    flag, again = _flags(cli)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{flag} '{run_dir}' is a file; a run is a folder: choose another "
                             f"{flag}")
    created = False
    if new:
        try:
            run_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder '{run_dir}' ({exc.strerror}); "
                                 f"choose a writable {flag}") from None
    lock = None
    try:
        lock = _Lock(run_dir, cli)
        restarted = _check_new(run_dir, cli) if new else False
        for tmp in stale_temps(run_dir):  # left by a kill during an atomic write
            os.remove(tmp)
        if restarted:
            print(f"run folder '{run_dir}' held no checkpoint (its run stopped before its first "
                  "epoch ended): starting it over", flush=True)
    except BaseException:
        if lock is not None:
            lock.release(remove=created or lock.made)
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        yield run_dir
    except BaseException as exc:
        removed = new and not has_checkpoint(run_dir)
        if removed:  # nothing worth keeping: no half-written run folder is left behind
            shutil.rmtree(run_dir, ignore_errors=True)
        lock.release(remove=not removed)
        if removed:
            way = (f"the run folder '{run_dir}' was removed (it had no checkpoint yet): start "
                   "the run again")
        else:
            way = (f"its last completed epoch is saved: continue it with {again}"
                   + (f" {run_dir}" if cli else ""))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            exc = write_failed(exc.filename or run_dir, exc)
        if isinstance(exc, UserError):
            if not getattr(exc, "resumable", True) and not removed:
                way = (f"the epochs before are saved in '{run_dir}' (evaluate.py reads them); "
                       f"for that change start a new run with another {flag}")
            raise type(exc)(f"{exc}; {way}") from None
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(f"interrupted: {way}") from None
        raise
    lock.release(remove=True)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)
# below this much free space a failed write is put down to a full disk (torch.save's writer
# reports ENOSPC as a RuntimeError without an errno)
FULL_DISK_BYTES = 16 << 20


class RunWriteError(RunFolderError):
    """A file of the run could not be written (full disk, read-only folder)."""


def write_failed(path, exc: BaseException) -> RunWriteError:
    """The one-line error for a failed write of ``path``; :func:`run_folder` adds the way on."""
    reason = getattr(exc, "strerror", None)
    if not reason:
        try:
            full = shutil.disk_usage(Path(path).parent).free < FULL_DISK_BYTES
        except OSError:
            full = False
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = os.strerror(errno.ENOSPC) if full else first
    return RunWriteError(f"cannot write '{path}' ({reason}): free some disk space or make the "
                         "folder writable (nothing saved before is damaged)")
