"""One thread setting for every lors job: how many CPU threads torch and OpenMP may use.

Two torch processes that each start one OpenMP thread per core and let idle threads spin-wait
slow each other down badly when they share the cores (one 768 x 768 SVD went from 0.14 s to
13 s here while another process was busy). lors therefore sets, once per process:

* the thread count: ``--threads N`` (``lors --threads N COMMAND``), else ``LORS_THREADS``, else
  ``OMP_NUM_THREADS`` when the user set it, else the CPUs this process may run on
  (``os.sched_getaffinity``: a ``taskset``, a container's or a SLURM job's CPU set, not the
  machine's core count);
* ``torch.set_num_threads`` to that count, and ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
  ``OPENBLAS_NUM_THREADS`` for the OpenMP pool and for child processes;
* ``OMP_WAIT_POLICY=PASSIVE`` (unless set): idle OpenMP threads sleep instead of spinning, so
  a busy neighbour does not steal their cores while they wait. OpenMP reads it when torch is
  imported, so :func:`configure_threads` must run before ``import torch`` to have this
  effect (the command line does; in Python, call it first or set the variable yourself).

Worker processes of ``lors experiment --jobs N`` each get their share (``threads // N``).
"""

from __future__ import annotations

import os
import sys

from .errors import LorsError

ENV = "LORS_THREADS"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive(text: str, source: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LorsError(f"{source}={text!r}: the number of threads must be a whole number "
                        f">= 1, e.g. {source}=4")
    return value


def thread_count(threads: int | None = None) -> int:
    """The thread count lors uses: ``threads``, else ``LORS_THREADS``, else a user-set
    ``OMP_NUM_THREADS``, else :func:`available_cpus`."""
    if threads is not None:
        return _positive(str(threads), "--threads")
    for variable in (ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(variable, "").strip()
        if text:
            return _positive(text, variable)
    return available_cpus()


def configure_threads(threads: int | None = None, import_torch: bool = True) -> int:
    """Apply the thread setting to this process and its future children; return the count.

    Sets ``LORS_THREADS`` and the OpenMP/BLAS variables to the count, ``OMP_WAIT_POLICY`` to
    PASSIVE unless already set, then ``torch.set_num_threads`` (importing torch, with these
    variables in place, unless ``import_torch`` is False and it is not imported yet: torch
    would otherwise cap a count above the physical cores at their number)."""
    count = thread_count(threads)
    os.environ[ENV] = str(count)
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(count)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        import torch
    if torch is not None:
        torch.set_num_threads(count)
    return count


def share(threads: int, workers: int) -> int:
    """Threads per worker when ``workers`` share ``threads``: at least 1 each."""
    return max(1, threads // max(1, workers))


__all__ = ["ENV", "available_cpus", "configure_threads", "share", "thread_count"]
