"""Write a bundle directory atomically: build it under a temporary name beside OUT_DIR, then publish it in one step.

Publishing never replaces anything without force, even when two commands race for the same new name: the staging
directory is renamed onto OUT_DIR with renameat2(RENAME_NOREPLACE) (Linux), or, where the file system or platform
lacks it, OUT_DIR is claimed with mkdir(2) (atomic: one caller creates it) and the staging directory is renamed
onto that empty directory (rename(2) replaces an empty directory atomically). The loser gets one BigCodeError line
and its staging directory is removed. Nothing is claimed before the work, so a killed run never leaves an empty
OUT_DIR behind; the cheap `refuse_existing` check at the start only spares a doomed run its work.

With force, an existing OUT_DIR (a directory, a file, or a symlink, whose target is left untouched) is replaced by
renameat2(RENAME_EXCHANGE): a reader sees the complete old or the complete new OUT_DIR, never a mix and never a
missing one; the old one, swapped to the staging name, is then removed. Where RENAME_EXCHANGE is unavailable, POSIX
offers no atomic replacement of a non-empty directory: the old OUT_DIR is renamed aside and the new one renamed in,
so for that instant a reader may find OUT_DIR missing, but never half-written.

Refused in one line before any work: an OUT_DIR that names no new directory (`.`, `..`, `/`), a last component
longer than NAME_MAX bytes (the staging name is shortened to fit whatever OUT_DIR's length), a path component that
is a file or a dangling link, a parent that cannot be written. A full disk or quota, or a read-only file system,
while the bundle is written is one line too (WRITE_ERRORS), and leaves nothing: neither the staging directory nor
the parents this run created.

Cleanup: an exception, KeyboardInterrupt (SIGINT), SIGTERM or SIGHUP (turned into SystemExit(128 + signal) while a
staging directory exists, when the signal has its default disposition and this is the main thread) removes the
staging directory. A run killed outright (SIGKILL) cannot clean up; its temporary names carry this host and the
owner's pid (`.NAME.partial-HOST-PID-TOKEN`), and the next run that stages in the same directory removes those
whose owner is no longer alive (a pid reused by a live process keeps its entry: removal errs on the safe side).

The output must not be, or contain, the command's own input (`inputs`): resolved paths are compared, so `export X X
--force` or an OUT_DIR above the checkpoint is refused instead of deleting the input.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from bigcode_deploy.runtime.errors import BigCodeError

TEMP_KINDS = ("partial", "old")
_TEMP_NAME = re.compile(r"^\..+\.(?:partial|old)-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{8}$")
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
NAME_MAX = 255  # bytes in one path component (Linux, macOS)
# Errors of writing OUT_DIR that a user can cause and fix (a full disk or quota, a read-only file system): one line.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_name(out_dir: Path, kind: str) -> Path:
    """A fresh temporary name beside out_dir that records this host and pid (see the module docstring). The part
    taken from out_dir's name is shortened so that the whole name fits in NAME_MAX bytes (a 255-byte OUT_DIR name
    still stages)."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    suffix = f".{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    stem = out_dir.name
    while stem and len(os.fsencode(f".{stem}{suffix}")) > NAME_MAX:
        stem = stem[:-1]
    return out_dir.parent / f".{stem or '_'}{suffix}"


def require_utf8_path(path: str | Path, what: str) -> None:
    """Raise BigCodeError for a path whose bytes are not UTF-8 (Python holds them as lone surrogates): ONNX's checker
    and ONNX Runtime take UTF-8 paths only, so such a path would fail half-way through the work."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(str(path)).decode("utf-8", "backslashreplace")  # the bytes as \xff escapes
        raise BigCodeError(f"{what} {shown} is not UTF-8; choose a path of UTF-8 characters") from None


def check_out_name(out_dir: str | Path) -> None:
    """Raise BigCodeError for an OUT_DIR that names no new directory (`.`, `..`, `/`) or whose last component is
    longer than the file system allows (NAME_MAX bytes)."""
    require_utf8_path(out_dir, "OUT_DIR")
    name = Path(out_dir).name
    if name in ("", ".", ".."):
        raise BigCodeError(
            f"OUT_DIR {str(out_dir)!r} names no new directory (it is a current, parent or root directory); give a "
            "directory name such as out/bundle"
        )
    if len(os.fsencode(name)) > NAME_MAX:
        raise BigCodeError(
            f"OUT_DIR's last component is {len(os.fsencode(name))} bytes long ({name[:40]}...); the file system "
            f"allows {NAME_MAX}: choose a shorter name"
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (never what a symlink points to); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale(parent: Path) -> list[Path]:
    """Remove the temporary names in `parent` left by dead runs on this host; returns what was removed."""
    removed = []
    host = _host()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def refuse_input(out_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise BigCodeError when out_dir is, contains, or lies inside one of the command's inputs (resolved paths):
    writing inside the input would change it, and --force there would delete one of its files."""
    out = Path(out_dir).resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = Path(item).resolve()
        if source == out:
            raise BigCodeError(f"OUT_DIR {out_dir} is the command's own input {item}; choose another OUT_DIR")
        if out in source.parents:
            raise BigCodeError(
                f"OUT_DIR {out_dir} contains the command's own input {item}; choose an OUT_DIR outside it"
            )
        if source in out.parents:
            raise BigCodeError(f"OUT_DIR {out_dir} lies inside the command's own input {item}; choose one outside it")


def refuse_existing(out_dir: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise BigCodeError for an out_dir that is or contains an input, or that exists (even as a dangling symlink)
    without force. The early check; publishing checks again atomically."""
    check_out_name(out_dir)
    refuse_input(out_dir, inputs)
    if os.path.lexists(out_dir) and not force:
        what = "already exists (a dangling symbolic link)" if not os.path.exists(out_dir) else "already exists"
        raise BigCodeError(f"{out_dir} {what}; choose another OUT_DIR or pass --force to replace it")
    refuse_non_bundle(Path(out_dir), force)


def refuse_non_bundle(out: Path, force: bool) -> None:
    """--force replaces bundles only: never a non-empty directory without manifest.json (checked again just before
    publishing, for a directory that appeared while the command ran)."""
    if force and out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise BigCodeError(
            f"{out} is a directory that is not a bundle (no manifest.json): --force replaces bundles only; "
            "choose another OUT_DIR"
        )


# --- publishing ------------------------------------------------------------------------------------------------


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def _rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when unsupported here; raises OSError otherwise."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _rename_noreplace(staging: Path, out_dir: Path) -> None:
    """Rename staging onto out_dir; FileExistsError when out_dir exists (as anything)."""
    try:
        if _rename_flags(staging, out_dir, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(exc.errno, exc.strerror, str(out_dir)) from None
        raise
    os.mkdir(out_dir)  # the claim: FileExistsError for the loser
    try:
        os.rename(staging, out_dir)  # onto our own empty directory: atomic
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
        raise


def _replace(staging: Path, out_dir: Path) -> None:
    """Replace an existing out_dir (directory, file or symlink) with staging; FileNotFoundError when it is gone."""
    if _rename_flags(staging, out_dir, _RENAME_EXCHANGE):
        _remove(staging)  # now the old out_dir, under the staging name
        return
    old = temp_name(out_dir, "old")
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    _remove(old)


def publish(staging: Path, out_dir: Path, force: bool) -> None:
    """Move the finished staging directory to out_dir (see the module docstring). Raises BigCodeError when out_dir
    appeared meanwhile and force is not set."""
    for _ in range(8):  # with force, out_dir may come and go under a concurrent command; retry a few times
        try:
            _rename_noreplace(staging, out_dir)
            return
        except FileExistsError:
            if not force:
                raise BigCodeError(
                    f"{out_dir} already exists (another command created it while this one ran); choose another "
                    "OUT_DIR or pass --force to replace it"
                ) from None
        refuse_non_bundle(out_dir, force)
        try:
            _replace(staging, out_dir)
            return
        except FileNotFoundError:
            if not staging.is_dir():
                raise
    raise BigCodeError(f"{out_dir} kept changing while this command tried to replace it; run it again")


# --- signals ---------------------------------------------------------------------------------------------------


def _exit_on_signal(signum, frame) -> None:
    for name in ("SIGTERM", "SIGHUP"):  # a second signal must not interrupt the cleanup
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) inside, so `finally` and `except BaseException` blocks
    clean up as for KeyboardInterrupt. Only in the main thread, and only for signals at their default disposition
    (an ignored SIGHUP under nohup stays ignored, an application's own handler stays in charge)."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                signal.signal(number, _exit_on_signal)
                installed[number] = signal.SIG_DFL
    try:
        yield
    finally:
        for number, previous in installed.items():
            signal.signal(number, previous)


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a fresh staging directory beside out_dir; publish it as out_dir when the block completes.

    Raises BigCodeError (before the block) for an out_dir that is or contains one of `inputs` or that exists
    without force, and (after it) when another command created out_dir meanwhile. On any failure, interrupt,
    SIGTERM or SIGHUP the staging directory is removed and nothing appears under out_dir."""
    out_dir = Path(out_dir)
    inputs = list(inputs)
    refuse_existing(out_dir, force, inputs)
    created = _make_parents(out_dir.parent)
    remove_stale(out_dir.parent)
    with exit_on_signals():
        staging = temp_name(out_dir, "partial")
        try:
            staging.mkdir()
        except OSError as exc:  # a read-only or full parent
            _remove_created(created)
            raise BigCodeError(
                f"cannot write in {out_dir.parent} for OUT_DIR ({exc.strerror}); choose another OUT_DIR"
            ) from None
        try:
            yield staging
            refuse_input(out_dir, inputs)  # a symlink may have been pointed at an input meanwhile
            publish(staging, out_dir, force)
        except OSError as exc:
            _remove(staging)
            _remove_created(created)
            ours = exc.filename is None or str(exc.filename).startswith((str(staging), str(out_dir)))
            if exc.errno not in WRITE_ERRORS or (exc.errno in (errno.EACCES, errno.EPERM) and not ours):
                raise  # an input that cannot be read is the command's own error to report
            where = f" ({exc.filename})" if exc.filename else ""
            raise BigCodeError(
                f"writing OUT_DIR {out_dir} failed: {exc.strerror}{where}; nothing was written: free space or "
                "choose another OUT_DIR"
            ) from None
        except BaseException:
            _remove(staging)
            _remove_created(created)
            raise


def _make_parents(parent: Path) -> list[Path]:
    """Create parent and its missing ancestors; returns those created (deepest last), for removal on failure.
    Raises BigCodeError (one line) when a component is a file or a dangling link, or cannot be created."""
    missing = []
    for directory in [parent, *parent.parents]:
        if os.path.lexists(directory):
            if not directory.is_dir():
                raise BigCodeError(
                    f"{directory} (in OUT_DIR's path) is "
                    f"{'a dangling symbolic link' if directory.is_symlink() else 'a file'}, not a directory; choose "
                    "another OUT_DIR"
                )
            break
        missing.append(directory)
    created = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # made meanwhile by another command: not ours to remove
            continue
        except OSError as exc:  # not writable, full, a name too long
            _remove_created(created)
            raise BigCodeError(
                f"cannot create {directory} for OUT_DIR ({exc.strerror}); choose another OUT_DIR"
            ) from None
        created.append(directory)
    return created


def _remove_created(created: list[Path]) -> None:
    """Remove the directories _make_parents created, deepest first, while they are empty."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            return
