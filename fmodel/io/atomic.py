"""Crash-safe folder replacement: build a folder beside the target, then swap it in atomically.

`atomic_folder(target)` yields an empty temporary folder `.NAME.tmp-<random>` beside `target`;
when the block ends without an exception, every file in it and the folder itself are fsynced,
the parent folder is fsynced, and it replaces `target`:

- no `target` yet: one `rename(tmp, target)`, atomic;
- an existing `target`: one `renameat2(tmp, target, RENAME_EXCHANGE)` (Linux 3.15+; ext4, xfs,
  btrfs, tmpfs, overlayfs, ...) swaps the two folders atomically, so the old checkpoint is then
  at the temporary name and is removed; the parent is fsynced again after the swap.

At every instant `target` is the complete old or the complete new folder. Where the exchange
is unavailable (not Linux, an old kernel, a filesystem answering EINVAL/ENOSYS/ENOTSUP) it
falls back to two renames, `target -> .NAME.old-<random>` then `tmp -> target`; a crash
between the two leaves no `target` and the old folder under its hidden `.old-` name.
Recovery: the next `fmodel.save` to that target and `fmodel.load` of it (`recover(target)`)
rename the old folder back into place. The interrupted save never returned, so the old
checkpoint is what `target` held; the new folder is discarded.

A failure inside the block removes the temporary folder and leaves `target` as it was.

One save at a time per target: the whole block holds an exclusive `flock` on `.NAME.lock`
beside the target (removed when done), so concurrent saves to one target run one after the
other (the last one wins) and any `.NAME.tmp-*` / `.NAME.old-*` folder found while holding
the lock is a leftover of a killed save; it is removed before the new folder is made. Without
`fcntl` (Windows) there is no lock and concurrent saves to one target are not supported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator

from ..errors import InvalidArgumentError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_folder",
    "exchange",
    "file_mode",
    "folder_mode",
    "fsync_tree",
    "leftovers",
    "recover",
]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's syscall number where libc has no wrapper (glibc < 2.28, musl < 1.2.?)
_SYS_RENAMEAT2 = {
    "x86_64": 316,
    "amd64": 316,
    "aarch64": 276,
    "arm64": 276,
    "riscv64": 276,
    "i386": 353,
    "i686": 353,
    "armv7l": 382,
    "ppc64le": 357,
    "ppc64": 357,
    "s390x": 347,
}
# What a kernel or filesystem answers when it cannot exchange: fall back to two renames.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_SUFFIX = re.compile(r"(tmp|old)-[A-Za-z0-9_]{8}")


@functools.cache  # the libc lookup only; never changes a result
def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    number = _SYS_RENAMEAT2.get(os.uname().machine)
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b, flags: syscall(
        ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), a, ctypes.c_int(_AT_FDCWD), b, ctypes.c_uint(flags)
    )


def exchange(a: str, b: str) -> bool:
    """Swap the two existing paths `a` and `b` atomically (Linux `renameat2(RENAME_EXCHANGE)`).

    Returns:
        True when swapped; False when this OS or filesystem has no atomic exchange (nothing
        was changed).

    Raises:
        OSError: any other failure (missing path, permissions, different filesystems), with
            both paths.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}", a, None, b)


def _umask() -> int:
    # Linux 4.7+: read it without changing it (os.umask is process-wide and racy)
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/status", encoding="ascii") as f,
    ):
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def folder_mode(directory: str | os.PathLike) -> int:
    """The mode the saved folder gets: an existing folder's own, else a new folder's (0o777
    less the umask)."""
    if os.path.isdir(directory):
        return stat.S_IMODE(os.stat(directory).st_mode)
    return 0o777 & ~_umask()


def _fsync_path(path: str, *, folder: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if folder and os.name == "nt":  # folders cannot be opened (nor fsynced) there
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno in (errno.EINVAL, errno.EBADF)):  # no folder fsync here
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every regular file under `folder`, then each folder, deepest first (symlinks are
    not followed)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync_path(path, folder=False)
        _fsync_path(root, folder=True)


def _split(target: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(target))
    if not name:
        raise InvalidArgumentError(f"{target!r}: a folder to replace needs a parent folder")
    return parent, name


def leftovers(target: str | os.PathLike) -> list[str]:
    """The hidden `.NAME.tmp-*` / `.NAME.old-*` folders beside `target` (paths, sorted)."""
    parent, name = _split(os.fspath(target))
    prefix = f".{name}."
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(
        os.path.join(parent, e)
        for e in entries
        if e.startswith(prefix) and _SUFFIX.fullmatch(e[len(prefix) :])
    )


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _target_lock(target: str) -> Iterator[None]:
    """Hold the exclusive lock of `target` (`flock` on `.NAME.lock` beside it); remove the lock
    file when done. A lock file removed by its last holder while another process waited on it
    is detected (its inode is no longer the path's) and the waiter locks the new file."""
    if fcntl is None:
        yield
        return
    parent, name = _split(target)
    path = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            now = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: see the docstring
        os.close(fd)


def _recover_locked(target: str) -> bool:
    if os.path.lexists(target):
        return False
    olds = [p for p in leftovers(target) if ".old-" in os.path.basename(p) and os.path.isdir(p)]
    if not olds:
        return False
    latest = max(olds, key=lambda p: os.stat(p).st_ctime_ns)  # a rename sets ctime
    os.rename(latest, target)
    _fsync_path(os.path.dirname(target), folder=True)
    return True


def recover(target: str | os.PathLike) -> bool:
    """Put back the checkpoint a save killed between its two fallback renames left under
    `.NAME.old-*` when `target` is missing (see the module docstring). Cheap when there is
    nothing to do (one stat); never raises: a recovery that cannot run is skipped.

    Returns:
        True when a folder was put back at `target`.
    """
    try:
        target = os.path.abspath(os.fspath(target))
        if os.path.lexists(target) or not any(".old-" in p for p in leftovers(target)):
            return False
        with _target_lock(target):
            return _recover_locked(target)
    except (OSError, ValueError, TypeError):
        return False


def _clean_locked(target: str) -> None:
    """Under the target's lock: recover an interrupted fallback swap, then remove every
    leftover (no other save to this target can be running)."""
    _recover_locked(target)
    for path in leftovers(target):
        _remove_with_leftovers(path)


def _remove_with_leftovers(path: str) -> None:
    """Remove a stale folder and what a save *into* it left beside it (`fmodel convert` saves
    into its `.NAME.tmp-*` folder): its own hidden folders and lock file."""
    for nested in leftovers(path):
        _remove_with_leftovers(nested)
    parent, name = os.path.split(path)
    _remove(os.path.join(parent, f".{name}.lock"))
    _remove(path)


def _new_folder(parent: str, name: str, kind: str) -> str:
    while True:
        path = os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any new folder
            return path
        except FileExistsError:
            continue


def _unused_name(parent: str, name: str, kind: str) -> str:
    while True:
        path = os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(4)}")
        if not os.path.lexists(path):
            return path


def _swap(tmp: str, target: str) -> str | None:
    """Put `tmp` at `target`; return the path now holding the old folder (None: there was none)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return None
    if exchange(tmp, target):
        return tmp
    old = _unused_name(os.path.dirname(target), os.path.basename(target), "old")
    os.rename(target, old)  # fallback: from here to the next rename, `target` is missing
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[str]:
    """Build a folder that replaces `target` atomically when the block ends (module docstring).

    Arguments:
        target: the folder to create or replace; its parent is created if absent.

    Yields:
        The temporary folder to fill (empty, a new folder's mode). At the end it gets the
        existing target's mode, if there is one.

    Raises:
        OSError: from the swap or the fsyncs; `target` is then as before.

    Example:
        >>> with atomic_folder("out/ckpt") as tmp:
        ...     write_files(tmp)
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = _split(target)
    os.makedirs(parent, exist_ok=True)
    with _target_lock(target):
        _clean_locked(target)
        tmp = _new_folder(parent, name, "tmp")
        try:
            yield tmp
            if os.path.isdir(target):
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            fsync_tree(tmp)
            _fsync_path(parent, folder=True)
            old = _swap(tmp, target)
            _fsync_path(parent, folder=True)
        except BaseException:
            _remove(tmp)
            raise
        if old is not None:
            _remove(old)
            _fsync_path(parent, folder=True)
