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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_name(out_dir: Path, kind: str) -> Path:
    """A fresh temporary name beside out_dir that records this host and pid (see the module docstring)."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return out_dir.parent / f".{out_dir.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


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
    refuse_input(out_dir, inputs)
    if os.path.lexists(out_dir) and not force:
        raise BigCodeError(f"{out_dir} already exists; choose another OUT_DIR or pass --force to replace it")
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
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a path component is a file, or not writable
        raise BigCodeError(
            f"cannot create {out_dir.parent} for OUT_DIR ({exc.strerror}); choose another OUT_DIR"
        ) from None
    remove_stale(out_dir.parent)
    with exit_on_signals():
        staging = temp_name(out_dir, "partial")
        staging.mkdir()
        try:
            yield staging
            refuse_input(out_dir, inputs)  # a symlink may have been pointed at an input meanwhile
            publish(staging, out_dir, force)
        except BaseException:
            _remove(staging)
            raise
