"""A directory written whole or not at all: lock, temp directory, one rename to publish.

`Staging(dst, needed)` is what every writer of a store or checkpoint goes through:

- one writer per destination: an exclusive `flock` on `.NAME.lock` beside it; a second
  writer is refused at once with the holder's pid and touches nothing;
- nothing replaced unless asked, and then only what `replaceable` accepts (a mer store),
  never a symbolic link;
- temp directories of writers that died (`.NAME.tmp-PID`, in the same parent) are removed
  first, and each removal is reported on stderr; a temp dir is dead when no process holds
  its destination's lock and its pid is gone (a reused pid only delays the removal);
- free space is checked before a byte is written, and a disk that fills up anyway
  becomes a one-line `StoreError` saying how much was needed;
- publishing is one `rename` (a replacement is an atomic exchange where the filesystem
  has it), so the destination holds its old state or the complete new one.

It knows nothing of what goes inside the directory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from mer.errors import StoreError
from mer.units import fmt_bytes

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?P<old>\.old)?$")
LOCK = re.compile(r"^\.(?P<name>.+)\.lock$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


class Staging:
    """Write into `tmp`, then `publish()`; on any failure `abort()` (or leave the `with`)."""

    def __init__(
        self,
        dst: str | Path,
        needed: int,
        replace: bool = False,
        replaceable: Callable[[Path], None] | None = None,
    ) -> None:
        self.dst = Path(dst)
        if self.dst.name in ("", ".", ".."):
            raise StoreError(f"{self.dst}: not a directory name to write to")
        self.parent = self.dst.parent
        self.needed = needed
        self.replace = replace
        self.replaceable = replaceable
        self.tmp = self.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        self._lock_fd: int | None = None
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self._lock_path(self.dst.name), self.dst)
        except OSError as e:
            raise StoreError(f"{self.dst}: cannot write there ({e.strerror})") from None
        try:
            self._remove_stale()  # first: it may restore the destination itself
            if os.path.lexists(self.dst):
                self._check_replaceable()
            free = _free_bytes(self.parent)
            if needed > free:
                raise StoreError(
                    f"{self.parent}: not enough free space for {self.dst.name}: it needs "
                    f"{fmt_bytes(needed)}, {fmt_bytes(free)} are free"
                )
            self.tmp.mkdir()
        except OSError as e:
            self._unlock()
            if is_disk_full(e):
                raise self.disk_full_error(e) from None
            raise StoreError(f"{self.dst}: cannot write there ({e.strerror})") from None
        except BaseException:
            self._unlock()
            raise

    def _check_replaceable(self) -> None:
        """The destination exists: raise StoreError unless we were asked to and may replace it."""
        if not self.replace:
            hint = " (pass --force to replace it)" if self.replaceable else ""
            raise StoreError(f"{self.dst}: already exists{hint}")
        if self.dst.is_symlink():
            raise StoreError(f"{self.dst}: a symbolic link; --force replaces only a directory")
        if self.replaceable is None:
            raise StoreError(f"{self.dst}: already exists")
        self.replaceable(self.dst)

    def _lock_path(self, name: str) -> Path:
        return self.parent / f".{name}.lock"

    def disk_full_error(self, e: OSError) -> StoreError:
        return StoreError(
            f"{self.dst}: {e.strerror or 'no space left on device'} while writing it: it needs "
            f"{fmt_bytes(self.needed)} in {self.parent}; the partial copy was removed"
        )

    def publish(self) -> Path:
        """Make the temp directory the destination, atomically; then release the lock."""
        if os.path.lexists(self.dst):
            self._check_replaceable()  # again: it may have appeared or changed meanwhile
            old = self.tmp.with_name(self.tmp.name + ".old")
            if _renameat2(self.tmp, self.dst, RENAME_EXCHANGE):
                old = self.tmp  # the exchange left the old state in the temp dir's place
            else:
                # No atomic exchange here: set the old aside, then move the new one in. A
                # crash between the two is undone by the next writer (see _remove_stale).
                os.rename(self.dst, old)
                os.rename(self.tmp, self.dst)
            shutil.rmtree(old)
        else:
            try:
                if not _renameat2(self.tmp, self.dst, RENAME_NOREPLACE):
                    os.rename(self.tmp, self.dst)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise StoreError(f"{self.dst}: appeared while mer was writing it") from None
        _fsync_dir(self.parent)
        self._unlock()
        return self.dst

    def abort(self) -> None:
        """Remove the temp directory and release the lock; safe to call twice."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            _unlock(self._lock_path(self.dst.name), self._lock_fd)
            self._lock_fd = None

    def _remove_stale(self) -> None:
        """Remove what dead writers left in the parent: temp dirs, set-aside old stores, locks."""
        for entry in sorted(os.listdir(self.parent)):
            m = TEMP.match(entry)
            lock_m = LOCK.match(entry)
            if not (m or lock_m):
                continue
            name = (m or lock_m)["name"]
            if m and _alive(int(m["pid"])):
                continue  # a lock-free writer still running (an older mer): leave it be
            if name == self.dst.name:
                fd = None  # ours: we hold its lock
            else:
                try:
                    fd = _lock(self._lock_path(name), None)
                except (BusyError, OSError):
                    continue  # a live writer's, or not ours to judge
            try:
                path = self.parent / entry
                if m is None or not path.is_dir() or path.is_symlink():
                    continue
                if m["old"] and not os.path.lexists(self.parent / name):
                    os.rename(path, self.parent / name)
                    _report(
                        f"restored {self.parent / name} from {entry}, set aside by mer "
                        f"process {m['pid']}, which died replacing it"
                    )
                else:
                    shutil.rmtree(path)
                    _report(
                        f"removed {path}, left behind by mer process {m['pid']}, "
                        "which stopped before finishing"
                    )
            finally:
                if fd is not None:
                    _unlock(self._lock_path(name), fd)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        self.abort()
        if is_disk_full(exc):
            raise self.disk_full_error(exc) from None


class BusyError(StoreError):
    """Another process holds the destination's lock."""


def _lock(path: Path, dst: Path | None) -> int:
    """An exclusive, non-blocking flock on `path` (created if need be), holding our pid."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(
                f"{dst}: another mer process (pid {holder}) is writing it right now; "
                "wait for it to finish or choose another destination"
            ) from None
        # The last holder unlinks the file as it unlocks: if that happened between our open
        # and our flock, we hold a lock on a file no one else will open. Start again.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    try:
        os.unlink(path)  # while still holding the lock: see _lock
    except FileNotFoundError:
        pass
    os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a namesake left before we started: we write no temp dir before this
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the kernel, libc or filesystem does not offer it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _report(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
