"""Atomic writes: every output lors produces is built in a temporary sibling and renamed.

A crash, Ctrl-C or a full disk therefore leaves either the old state or nothing, never a
half-written directory or file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def check_output_free(out: Path, force: bool) -> None:
    """Refuse an existing output path unless ``force``; call before any heavy work."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(
            f"output {out} already exists; choose another path or pass --force to replace it"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success rename it to ``out``.

    On any exception the temporary directory is removed and ``out`` is untouched.
    With ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    check_output_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file beside ``out``; rename it over ``out`` when the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
    os.close(fd)
    try:
        with open(tmp_name, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
