"""Where the stages of a parallel experiment run: one interface over three engines.

Every executor has ``submit(fn, *args)`` returning a future with ``done()`` and ``result()``
(``result`` re-raises the task's exception), ``shutdown(cancel=False)``, ``threads`` (the
torch threads each task may use) and ``slots`` (how many tasks the scheduler keeps in flight;
None: as many as are ready, the engine queues them).

* :class:`LocalExecutor`: N worker processes on this machine (``lors experiment --jobs N``),
  each on its own share of the CPUs (``sched_setaffinity``, ``threads // N`` torch threads)
  and, when GPUs are visible, its own ``CUDA_VISIBLE_DEVICES`` (round robin over them).
* :class:`RayExecutor`: tasks on a Ray cluster (``--ray-address`` or ``RAY_ADDRESS``), or on a
  local Ray started for the run; each task asks for ``threads`` CPUs and ``gpus`` GPUs.
* :class:`SubmititExecutor`: one SLURM job per task through submitit (partition, time limit,
  GPUs and CPUs per job; logs in a folder), or submitit's ``LocalExecutor`` (``slurm-local``),
  which runs the same jobs as local processes, for testing.

The engines are imported only when used: Ray and submitit are optional dependencies.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..errors import LorsError
from ..threads import available_cpus, configure_threads, share

EXECUTORS = ("local", "ray", "slurm", "slurm-local")


# --- local worker processes ------------------------------------------------------------------

def _worker_setup(slots, threads: int, cpu_sets: list[list[int]], gpus: list[str]) -> None:
    """Run in each new worker process before any task (and before torch is imported): take
    a slot, pin to its CPUs, pick its GPU, set its threads."""
    slot = slots.get()
    if cpu_sets:
        try:
            os.sched_setaffinity(0, cpu_sets[slot % len(cpu_sets)])
        except (AttributeError, OSError):
            pass
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    os.environ["LORS_WORKER_SLOT"] = str(slot)
    configure_threads(threads)


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES entries (none without CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch build with CUDA: no GPUs
        return []


class LocalExecutor:
    """``jobs`` worker processes (spawned, so each starts its own torch and OpenMP pool)."""

    def __init__(self, jobs: int, threads: int | None = None, gpus: list[str] | None = None,
                 pin: bool = True) -> None:
        if jobs < 1:
            raise LorsError(f"--jobs {jobs}: give at least 1 worker")
        self.jobs = self.slots = jobs
        self.threads = share(threads or available_cpus(), jobs)
        self.gpus = visible_gpus() if gpus is None else gpus
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        per = len(cpus) // jobs
        # disjoint CPU sets when there are at least as many CPUs as workers
        self.cpu_sets = ([cpus[i * per:(i + 1) * per] for i in range(jobs)]
                         if pin and per >= 1 else [])
        if self.cpu_sets:
            self.threads = min(self.threads, per)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for slot in range(self.jobs):
            slots.put(slot)
        return ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_worker_setup,
                                   initargs=(slots, self.threads, self.cpu_sets, self.gpus))

    def submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start afresh
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(fn, *args)

    def shutdown(self, cancel: bool = False) -> None:
        if self._pool is None:
            return
        if cancel:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.terminate()  # their locks go stale with them; temporaries are swept
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._pool = None


# --- Ray ---------------------------------------------------------------------------------------

class _RayFuture:
    def __init__(self, ray, ref) -> None:
        self.ray, self.ref = ray, ref

    def done(self) -> bool:
        ready, _ = self.ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self):
        try:
            return self.ray.get(self.ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
            raise cause from None

    def cancel(self) -> None:
        try:
            self.ray.cancel(self.ref, force=True)
        except Exception:  # already finished
            pass


class RayExecutor:
    """Tasks on a Ray cluster: ``address`` (or ``RAY_ADDRESS``), else a local Ray with
    ``cpus`` CPUs (default: this process's) started for the run and stopped after it."""

    def __init__(self, address: str | None = None, threads: int = 1, gpus: float = 0,
                 jobs: int | None = None, cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise LorsError("--executor ray needs Ray: pip install 'ray>=2.9'") from None
        self.ray, self.threads, self.slots = ray, max(1, threads), jobs
        self._started = False
        address = address or os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cpus or available_cpus(), include_dashboard=False,
                         log_to_driver=False)
            self._started = True
        self._options = {"num_cpus": self.threads, "num_gpus": gpus, "max_retries": 0}
        self._remote = {}
        self._futures: list[_RayFuture] = []

    def submit(self, fn, *args) -> _RayFuture:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn).options(**self._options)
        future = _RayFuture(self.ray, self._remote[fn].remote(*args))
        self._futures.append(future)
        return future

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for future in self._futures:
                if not future.done():
                    future.cancel()
        self._futures = []
        if self._started:
            self.ray.shutdown()
            self._started = False


# --- SLURM through submitit ----------------------------------------------------------------

class SubmititExecutor:
    """One SLURM job per task (``local=False``), or one local process per task through
    submitit's LocalExecutor (``local=True``); submitit's logs go to ``folder``."""

    def __init__(self, folder: Path, *, local: bool = False, threads: int = 1,
                 jobs: int | None = None, partition: str | None = None, time_min: int = 240,
                 gpus: int = 0, mem_gb: float | None = None,
                 extra: dict | None = None) -> None:
        try:
            import submitit
        except ImportError:
            raise LorsError("--executor slurm needs submitit: pip install 'submitit>=1.5'"
                            ) from None
        self.threads, self.slots, self.folder = max(1, threads), jobs, Path(folder)
        if local:
            executor = submitit.LocalExecutor(folder=str(self.folder))
            executor.update_parameters(timeout_min=time_min, gpus_per_node=gpus,
                                       tasks_per_node=1, nodes=1)
        else:
            executor = submitit.AutoExecutor(folder=str(self.folder), cluster="slurm")
            params = {"timeout_min": time_min, "gpus_per_node": gpus or None,
                      "cpus_per_task": self.threads, "tasks_per_node": 1, "nodes": 1,
                      "slurm_partition": partition, "mem_gb": mem_gb, "name": "lors"}
            executor.update_parameters(**{k: v for k, v in params.items() if v is not None},
                                       **(extra or {}))
        self.executor = executor
        self._jobs: list = []

    def submit(self, fn, *args):
        job = self.executor.submit(fn, *args)
        self._jobs.append(job)
        return job

    def shutdown(self, cancel: bool = False) -> None:
        if cancel:
            for job in self._jobs:
                if not job.done():
                    try:
                        job.cancel(check=False)
                    except Exception:
                        pass
        self._jobs = []


def job_log(job) -> str | None:
    """Where a submitit job's output went (None for other engines' futures)."""
    paths = getattr(job, "paths", None)
    return str(paths.stderr) if paths is not None else None


__all__ = ["EXECUTORS", "LocalExecutor", "RayExecutor", "SubmititExecutor", "job_log",
           "visible_gpus"]
