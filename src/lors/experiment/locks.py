"""Per-stage lock files: workers that share an experiment folder compute each stage once.

Before computing a stage, a worker creates ``<output>.lock`` beside the stage's output with
``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS v3+), holding its pid, host, time
and a random token. Another worker that needs the same stage waits until the lock is gone and
then finds the output (or, if the holder failed, takes the lock and computes it itself).

A holder refreshes its lock's modification time every few seconds (a heartbeat). A lock is
stale, and is taken over, when its holder is a process of this host that no longer exists, or
when its heartbeat is older than ``LORS_LOCK_STALE_S`` seconds (default 600: a holder on
another host that died, or a pid reused by an unrelated process). Taking over renames the
stale lock aside and checks that it was still the stale one (a fresh lock moved by mistake is
put back), so two workers never both take over the same lock.

The locks save work; correctness does not depend on them: every stage's output is written
atomically and is a function of its inputs, so in the worst case (a lost lock) a stage is
computed twice and published twice, identically.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from ..fsutil import process_alive

HOST = socket.gethostname()
POLL_S = 0.2


def stale_seconds() -> float:
    return float(os.environ.get("LORS_LOCK_STALE_S", "600"))


def lock_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".lock")


def read_lock(path: Path) -> dict | None:
    """The holder's record (pid, host, time, token, stage), ``{}`` while unreadable (being
    written), or None when there is no lock."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _age(path: Path) -> float | None:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def is_stale(info: dict, age: float) -> bool:
    """Whether a lock with holder ``info`` and heartbeat ``age`` seconds old is abandoned."""
    if age > stale_seconds():
        return True
    if not info:  # created but not yet written: give its holder a moment
        return age > 30
    pid = info.get("pid")
    return info.get("host") == HOST and isinstance(pid, int) and not process_alive(pid)


class StageLock:
    """The lock of one stage output (see the module docstring)."""

    def __init__(self, output: Path) -> None:
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._made: list[Path] = []

    def _try_create(self) -> bool:
        token = secrets.token_hex(8)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except FileNotFoundError:  # a failed holder removed the empty folder meanwhile
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._try_create()
        record = {"pid": os.getpid(), "host": HOST, "time": time.time(), "token": token,
                  "stage": self.output.name}
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.token = token
        return True

    def _take_over(self, seen: dict) -> None:
        """Remove the stale lock whose record is ``seen``, unless it was replaced meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_lock(aside) or {}
        if moved.get("token") != seen.get("token"):  # a fresh lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            print(f"lors: taking over the stale lock of {self.output.name} (holder "
                  f"{seen.get('pid')}@{seen.get('host')} is gone)", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)

    def acquire(self, ready: Callable[[], bool] = lambda: False) -> bool:
        """Hold the lock (True), waiting while another worker holds it; False as soon as
        ``ready()`` says the output exists (then the lock is not taken)."""
        missing, folder = [], self.path.parent.absolute()
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing
        while True:
            if self._try_create():
                self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                              name=f"lock {self.output.name}")
                self._beat.start()
                return True
            if ready():
                return False
            info, age = read_lock(self.path), _age(self.path)
            if info is not None and age is not None and is_stale(info, age):
                self._take_over(info)
                continue
            time.sleep(POLL_S)

    def _heartbeat(self) -> None:
        interval = max(0.05, min(15.0, stale_seconds() / 4))
        while not self._stop.wait(interval):
            if (read_lock(self.path) or {}).get("token") != self.token:
                return  # no longer ours
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.token is not None and (read_lock(self.path) or {}).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.token = None
        for folder in self._made:  # deepest first; folders that got content stay
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def stage_lock(output: Path, ready: Callable[[], bool] = lambda: False) -> Iterator[bool]:
    """Hold ``output``'s lock for the block; yields False (without the lock) when ``ready()``
    became true while waiting for another holder."""
    lock = StageLock(output)
    mine = lock.acquire(ready)
    try:
        yield mine
    finally:
        if mine:
            lock.release()


__all__ = ["StageLock", "is_stale", "lock_path", "read_lock", "stage_lock"]
