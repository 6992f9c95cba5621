"""Task functions for tests/test_experiment_parallel.py, in a light module: spawned worker
processes import it to unpickle a task, and should not pay for the test module's imports."""

from __future__ import annotations

import os
import time
from pathlib import Path


def slow_stage(path: str, counter: str) -> dict:
    """A stage that takes a while and counts its computations: the pattern of
    ``stages.cached_json`` (check, lock, check again, compute, publish) on the light
    ``locks`` module alone, so that a spawned worker does not import torch for it."""
    import json

    from lors.experiment.locks import stage_lock
    from lors.fsutil import atomic_file
    out = Path(path)
    with stage_lock(out, out.is_file) as mine:
        if mine and not out.is_file():
            with open(counter, "a") as handle:
                handle.write(f"{os.getpid()}\n")
            time.sleep(1.0)
            with atomic_file(out, "w") as handle:
                handle.write(json.dumps({"value": 42}))
    return json.loads(out.read_text())


def flaky(marker: str, how: str) -> dict:
    """Fails (an exception, or the worker process dies) the first time: no marker file yet;
    ``how="always"``: every time."""
    marker = Path(marker)
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if attempts == 1 or how == "always":
        if how == "crash":
            os._exit(3)
        raise RuntimeError(f"attempt {attempts} failed")
    return {"attempts": attempts}


def worker_threads() -> tuple:
    """What a worker was given: torch threads, OMP_NUM_THREADS, its CPUs, its GPU (after a
    second, so that two of these run on two workers at once)."""
    time.sleep(1.0)
    import torch
    return (torch.get_num_threads(), os.environ["OMP_NUM_THREADS"],
            tuple(sorted(os.sched_getaffinity(0))), os.environ.get("CUDA_VISIBLE_DEVICES"),
            os.environ["OMP_WAIT_POLICY"])
