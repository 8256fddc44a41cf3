"""Atomic outputs: write under a temporary name beside the target, rename only when complete."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(target: str | Path) -> None:
    """Raise PermissionError unless a folder can be created beside `target` (probed in its nearest existing
    ancestor, so a read-only output fails before a model is loaded, not after)."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    parent = target if target.is_dir() else target.parent
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".moekit-write-probe-"))
    except OSError as exc:
        raise PermissionError(f"{target} cannot be written: {parent} is not writable ({exc.strerror})") from None


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class Terminated(SystemExit):
    """SIGTERM (what Slurm and Kubernetes send), raised like KeyboardInterrupt is for SIGINT so that cleanup runs;
    an uncaught one exits with status 143 (128 + 15), as the signal would."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def handle_sigterm() -> bool:
    """Make SIGTERM raise `Terminated` in this process, unless someone installed a handler already or this is not
    the main thread; True when installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (see `handle_sigterm`); the previous handler comes back after."""
    installed = handle_sigterm()
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_time(pid: int) -> str:
    """The kernel's start time of process `pid` (tells a reused pid apart); "0" where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_OWNER = re.compile(r"-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)\.(?P<start>\d+)(?:-[^-]*)?$")


def owner_tag() -> str:
    """`HOST-PID.START` of this process: put in the names of temporary folders so a later run can tell a dead
    writer's leftovers from a live one's."""
    return f"{HOST}-{os.getpid()}.{_start_time(os.getpid())}"


def is_stale(path: Path) -> bool:
    """Whether `path` was left by a process of this host that no longer runs (its pid is gone, or now belongs to a
    process started at another time). Unknown owners (other hosts, old names) are never stale."""
    match = _OWNER.search(path.name)
    if match is None or match["host"] != HOST:
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return match["start"] != "0" and _start_time(pid) not in (match["start"], "0")


def reap_stale(target: Path) -> list[Path]:
    """Remove the partial folders beside `target` that dead processes left; a stale `.old-*` (a run killed between
    its two renames) is renamed back to `target` when `target` is missing. Return what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.partial-*")):
        if path.is_dir() and is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*")):
        if path.is_dir() and is_stale(path):
            if not target.exists():
                os.replace(path, target)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`, on failure it is removed.

    An existing non-empty `target` is refused unless `overwrite`; it is only removed after the new directory
    is complete, so an interrupted run never leaves something that looks like a finished output. SIGTERM is
    handled like SIGINT (the temporary directory is removed); what a killed process (SIGKILL, power loss) left
    beside `target` is removed by the next `atomic_dir` into the same place, never a live process's. The new
    directory gets the permissions the umask gives a plain `mkdir`, and a symlinked `target` is followed: the
    folder it points to is replaced, the link stays.
    """
    target = Path(target)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if not overwrite and is_nonempty_dir(target):
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    reap_stale(target)
    with sigterm_raises():
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{owner_tag()}-"))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap(tmp, target)


def _swap(tmp: Path, target: Path) -> None:
    """Put `tmp` in `target`'s place with SIGINT/SIGTERM held back, so no signal lands between the two renames."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{owner_tag()}"
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (os.umask alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
