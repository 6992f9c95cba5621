"""Publishing: every output lors produces is built under a temporary name and then put in place.

All publishing goes through one path (``_publish``): the new output is built in a temporary
sibling ``.<name>.tmp-<pid>@<host>-<8 hex digits>``, then swapped with ``<name>`` in one atomic
``renameat2(RENAME_EXCHANGE)`` (or renamed, for a file or when nothing is there yet), and only
then is the temporary, now holding the old output, deleted. At every instant ``<name>`` is the
complete old output or the complete new one (where the kernel or file system cannot exchange,
two renames are used and ``<name>`` is absent between them).

A crash, Ctrl-C or SIGTERM (see ``sigterm_as_interrupt``) removes the temporary on the way out.
A SIGKILL cannot, so the temporary's name holds its owner's pid: a later run that publishes
the same output removes the temporaries whose owner process is gone, never one of a living
process.
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
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LorsError, OutputExistsError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
"""This machine, in temporary names: a pid means something only on the host that made it."""

_TEMPORARY = re.compile(r"\.(.+)\.tmp-(\d+)(?:@([A-Za-z0-9]+))?-[0-9a-f]{8}")
"""The names ``temporary`` gives: ``.<output name>.tmp-<owner pid>@<host>-<8 hex digits>``
(names without ``@<host>``, from lors 0.2.0 before it, count as this host's)."""

_stale: dict[str, dict[str, list[str]]] = {}
"""Per folder (absolute path): output name -> its temporaries whose owner was gone when this
process first listed the folder."""


def check_output_free(out: Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Everything that would make publishing at ``out`` fail or destroy something, checked
    before any heavy work: an existing ``out`` (unless ``force``), a dangling symbolic link,
    ``out`` under a regular file, a folder this process cannot write in, and ``out`` being (or
    holding) one of ``inputs`` (``--force`` would replace what the job reads). Raises
    OutputExistsError or LorsError naming the path and what to do."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise LorsError(f"output {out} is a dangling symbolic link (to {os.readlink(out)}); "
                        "remove it or choose another path")
    if out.exists() and not force:
        raise OutputExistsError(
            f"output {out} already exists; choose another path or pass --force to replace it"
        )
    _check_inputs_outside(out, inputs)
    folder = _nearest_existing(out.parent)
    if not folder.is_dir():
        raise LorsError(f"output {out}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LorsError(f"output {out}: cannot write in {folder} (permission denied or a "
                        "read-only file system); choose another path")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_inputs_outside(out: Path, inputs: Iterable[str | Path]) -> None:
    target = Path(os.path.realpath(out))
    for source in inputs:
        if not os.path.exists(source):  # "base", a hub id: not a path of ours to protect
            continue
        where = Path(os.path.realpath(source))
        if where == target or target in where.parents:
            raise LorsError(f"output {out} is an input of this merge ({source}); replacing it "
                            "would destroy what is being read: choose another --out")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = []
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that gained other content stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # no process can have such a pid
        return False
    return True


def _remove(path: Path) -> None:
    """Delete ``path`` (a folder with its contents, or a file); a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stale_in(folder: Path) -> dict[str, list[str]]:
    """The dead owners' temporaries in ``folder`` by output name. The folder is listed once per
    process (a cache of n files would otherwise be listed n times); a temporary left by a run
    killed later is found by the next process."""
    key = os.path.abspath(folder)
    if key not in _stale:
        found: dict[str, list[str]] = {}
        for name in os.listdir(folder):
            match = _TEMPORARY.fullmatch(name)
            # another host's pid says nothing here (a shared file system): never remove it
            if match and match.group(3) in (None, _HOST) and not process_alive(int(match.group(2))):
                found.setdefault(match.group(1), []).append(name)
        _stale.setdefault(key, found)
    return _stale[key]


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporaries of ``out`` (``.<name>.tmp-<pid>@<host>-<8 hex>`` beside it,
    exactly) whose owner process on this host no longer exists; return the removed paths. Temporaries of living
    processes (this one included) and every other name are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = [out.parent / name for name in _stale_in(out.parent).pop(out.name, [])]
    for path in removed:
        _remove(path)
    return removed


def _temporary_name(out: Path) -> Path:
    """A fresh ``.<name>.tmp-<pid>@<host>-<8 hex>`` beside ``out`` (not created)."""
    return out.with_name(f".{out.name}.tmp-{os.getpid()}@{_HOST}-{secrets.token_hex(4)}")


def _created(path: Path, directory: bool) -> bool:
    """Create ``path`` as an empty folder or file; False if the name is taken."""
    try:
        if directory:
            os.mkdir(path, 0o777)  # the umask applies: outputs are ordinary folders
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def temporary(out: Path, directory: bool = True) -> Iterator[Path]:
    """Yield a new empty temporary folder (or file) beside ``out``, deleted when the block
    ends however it ends. Stale temporaries of ``out`` from dead processes are removed first,
    so a SIGKILLed run's full-size leftovers do not pile up."""
    out = Path(out)
    created = _make_parents(out.parent)
    remove_stale_temporaries(out)
    path = _temporary_name(out)
    # Named before it exists and created inside the try: a Ctrl-C or SIGTERM right after the
    # mkdir (when a watcher sees it appear) still removes it.
    try:
        while not _created(path, directory):
            path = _temporary_name(out)
        yield path
    except BaseException:
        _remove(path)
        _remove_empty(created)  # a failed job leaves no folders it made for its output
        raise
    _remove(path)


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not Linux, or a libc without it: glibc before 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (renameat2 with RENAME_EXCHANGE); False, with nothing
    changed, where the platform or the file system has no such call."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``. If ``out`` existed, ``tmp`` holds the old output
    afterwards, for the caller to delete; otherwise ``tmp`` no longer exists."""
    if not os.path.lexists(out) or not (tmp.is_dir() or out.is_dir()):
        os.replace(tmp, out)  # nothing to swap, or a file over a file: already atomic
        return
    if _exchange(tmp, out):
        return
    # No exchange here: two renames, with ``out`` absent in between (a kill there leaves the
    # old output in a temporary, which a later run removes).
    aside = _temporary_name(out)
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    os.replace(aside, tmp)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; when the block succeeds, publish it at ``out``.

    An existing ``out`` is refused unless ``force`` (checked before the block runs), and is
    replaced only once the new one is in place. On any exception the temporary is removed and
    ``out`` is untouched.
    """
    out = Path(out)
    check_output_free(out, force)
    with temporary(out, directory=True) as tmp:
        yield tmp
        _publish(tmp, out)


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield the path of an empty temporary file beside ``out``, for writers that take a file
    name; when the block succeeds the file is synced to disk and published at ``out``
    (replacing any file there). On any exception it is removed and ``out`` is untouched."""
    out = Path(out)
    with temporary(out, directory=False) as tmp:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reaches the disk before the name does
        finally:
            os.close(fd)
        _publish(tmp, out)


@contextlib.contextmanager
def atomic_file(out: Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside ``out`` with ``open(path, mode, **open_kwargs)``; publish
    it at ``out`` when the block succeeds (see ``atomic_path``)."""
    with atomic_path(out) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


def publish(built: Path, out: Path, force: bool = False) -> None:
    """Move the finished folder or file ``built`` to ``out`` through the same path.

    ``built`` is first renamed to a temporary of ``out`` and published from there, so a kill
    leaves at most a temporary that the next run removes; the old output never lands under
    ``built``'s name (where a re-run could take it for work in progress). An existing ``out``
    is refused unless ``force`` and is deleted only after the new one is in place. If
    publishing fails, ``built`` is put back. ``built`` must be on ``out``'s file system.
    """
    built, out = Path(built), Path(out)
    check_output_free(out, force)
    with temporary(out, directory=built.is_dir()) as tmp:
        os.replace(built, tmp)
        moved = os.lstat(tmp).st_ino
        try:
            _publish(tmp, out)
        except BaseException:
            if os.path.lexists(tmp) and os.lstat(tmp).st_ino == moved:  # still unpublished
                os.replace(tmp, built)
            raise


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so cleanups run as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (every
    ``atomic_*`` and ``temporary`` cleanup then runs); the previous handler is restored after.
    Outside the main thread, where handlers cannot be installed, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; the default is the closest
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
