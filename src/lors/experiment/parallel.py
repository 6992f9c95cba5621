"""A parallel experiment: its independent stages computed by worker processes, Ray or SLURM.

The serial :func:`.runner.run_experiment` stays the one place that assembles the experiment;
this module only fills its cache first. :func:`plan_stages` lists the stages of a config with
their dependencies::

    base eval             expert L-T ──> eval expert L-T ────────────────> extensibility
                               │
                               ├──> mtl SETTING (+ its test eval; needs the experts' steps)
                               └──> dev SETTING (experts' dev scores, cosines)
                                        └──> merge SETTING METHOD (dev search, chosen
                                             merge, its test eval)
    mtl_plateau SETTING, sequential SETTING (+ test evals): no dependencies

:func:`run_parallel` submits each stage as soon as its dependencies are done (no waves to
wait for) through an executor (:mod:`.executors`); each task is a small picklable
description (the config as a dict, the working folder, the stage's kind and arguments, the
threads it may use, its log file) run by the top-level :func:`run_stage`, which rebuilds
``Experiment(config)`` in the worker. Every stage writes its outputs to the cache under its
lock (:mod:`.locks`), so a stage is never computed twice, even by workers that need it at
the same time; a failed stage is resubmitted up to ``retries`` times, then the run stops with
an error naming the stage and its log. Finally :func:`.runner.run_experiment` runs here and
finds every stage cached: the same ``experiment.json`` as a serial run.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LorsError

# torch-heavy modules are imported inside the functions: a fresh worker process must set its
# OpenMP variables (threads, passive waiting) before torch starts its thread pool


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``kind`` with ``args``, after the stages named in ``deps``."""

    id: str
    kind: str
    args: tuple = ()
    deps: tuple[str, ...] = ()


def plan_stages(config) -> list[Stage]:
    """The stages of ``config`` (an ExperimentConfig) with their dependencies, in the order
    the serial run meets them (ready stages are submitted in this order)."""
    pairs = config.pairs()
    name = "-".join
    stages = [Stage("base eval", "base_eval")]
    stages += [Stage(f"expert {name(p)}", "expert", (list(p),)) for p in pairs]
    stages += [Stage(f"eval expert {name(p)}", "expert_eval", (list(p),),
                     (f"expert {name(p)}",)) for p in pairs]
    for setting, _, setting_pairs in config.setting_pairs():
        experts = tuple(f"expert {name(p)}" for p in setting_pairs)
        if len(setting_pairs) >= 2:
            for baseline in config.baselines:
                stages.append(Stage(f"{baseline} {setting}", "baseline", (baseline, setting),
                                    experts if baseline == "mtl" else ()))
        stages.append(Stage(f"dev {setting}", "setting", (setting,), experts))
        stages += [Stage(f"merge {setting} {method}", "method", (setting, method),
                         (f"dev {setting}",)) for method in config.methods]
    if config.extensibility is not None and "lors" in config.methods:
        stages.append(Stage("extensibility", "extensibility", (),
                            tuple(f"eval expert {name(p)}" for p in pairs)))
    return stages


# --- in the worker --------------------------------------------------------------------------

_experiments: dict = {}
"""Per worker process: the Experiment of each (config, folder) it has run stages of."""


def _experiment(config: dict, cwd: str):
    from .config import ExperimentConfig, digest
    from .runner import Experiment
    key = digest(config, cwd)
    if key not in _experiments:
        _experiments[key] = Experiment(ExperimentConfig.model_validate(config),
                                       show_progress=False)
    return _experiments[key]


def _setting_pairs(exp, setting: str) -> list[tuple[str, str]]:
    for name, _, pairs in exp.config.setting_pairs():
        if name == setting:
            return pairs
    raise LorsError(f"no setting {setting!r} in the experiment config")


def _base_eval(exp) -> None:
    exp.test_results("base", exp.base, exp.config.pairs())


def _expert(exp, pair) -> None:
    exp.expert(tuple(pair))


def _expert_eval(exp, pair) -> None:
    from .runner import expert_results
    expert_results(exp, pair)


def _baseline(exp, baseline: str, setting: str) -> None:
    from .runner import baseline_results
    baseline_results(exp, baseline, setting, _setting_pairs(exp, setting))


def _setting(exp, setting: str) -> None:
    from .runner import setting_cosines, setting_search
    setting_cosines(exp, setting_search(exp, setting, _setting_pairs(exp, setting)))


def _method(exp, setting: str, method: str) -> None:
    from .runner import method_results, setting_search
    method_results(exp, setting_search(exp, setting, _setting_pairs(exp, setting)), method)


def _extensibility(exp) -> None:
    """The extensibility stages (its own search, merges, evaluations); the rows that quote
    the settings' results are assembled by the serial run."""
    from .extend import extensibility
    from .runner import expert_results
    pairs = exp.config.pairs()
    done = {pair: expert_results(exp, pair) for pair in pairs}
    expert_test = {pair: done[pair][1]["results"][0] for pair in pairs}
    settings = [{"name": name, "pairs": [list(p) for p in setting_pairs], "models": []}
                for name, _, setting_pairs in exp.config.setting_pairs()]
    extensibility(exp, exp.config.extensibility.language, {p: d[0] for p, d in done.items()},
                  expert_test, settings)


KINDS: dict[str, Callable] = {"base_eval": _base_eval, "expert": _expert,
                              "expert_eval": _expert_eval, "baseline": _baseline,
                              "setting": _setting, "method": _method,
                              "extensibility": _extensibility}


@contextlib.contextmanager
def _output_to(log: str | None):
    """Send this process's stdout and stderr (Python's and the C level's) to ``log``."""
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for handle in (fd, *saved):
            os.close(handle)


def run_stage(task: dict) -> dict:
    """Compute one stage in this worker: the task is ``{"stage", "kind", "args", "config",
    "cwd", "threads", "log"}``; returns where and how long it ran."""
    from ..threads import configure_threads
    if task.get("cwd") and os.path.isdir(task["cwd"]):
        os.chdir(task["cwd"])  # relative paths of the config mean what they meant there
    if task.get("threads"):
        configure_threads(task["threads"])
    started = time.perf_counter()
    with _output_to(task.get("log")):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {task['stage']} on "
              f"{socket.gethostname()} pid {os.getpid()} ({task.get('threads')} threads)",
              flush=True)
        try:
            KINDS[task["kind"]](_experiment(task["config"], task.get("cwd", "")),
                                *task["args"])
        except BaseException:
            traceback.print_exc()
            raise
        seconds = time.perf_counter() - started
        print(f"--- {task['stage']} done in {seconds:.1f} s", flush=True)
    return {"stage": task["stage"], "seconds": seconds, "host": socket.gethostname(),
            "pid": os.getpid()}


# --- the scheduler --------------------------------------------------------------------------

def log_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stage).strip("-") + ".log"


def run_stages(stages: list[Stage], executor, make_task: Callable[[Stage], tuple],
               retries: int = 2, say: Callable = lambda *a, **k: None,
               log_of: Callable[[Stage], str | None] = lambda stage: None,
               poll: float = 0.1) -> dict[str, dict]:
    """Run ``stages`` through ``executor``, each once its ``deps`` are done, at most
    ``executor.slots`` at a time; ``make_task(stage)`` gives ``(fn, *args)`` to submit. A
    failed stage is resubmitted up to ``retries`` times; then the others in flight are
    cancelled and LorsError names the stage, its error and its log. Returns each stage's
    result."""
    from .executors import job_log
    by_id = {stage.id: stage for stage in stages}
    for stage in stages:
        unknown = [d for d in stage.deps if d not in by_id]
        if unknown:
            raise LorsError(f"stage {stage.id} depends on unknown stages {unknown}")
    waiting = list(stages)
    running: dict[str, object] = {}
    finished: dict[str, dict] = {}
    failures: dict[str, int] = {}
    slots = getattr(executor, "slots", None)
    while waiting or running:
        for stage in list(waiting):
            if slots is not None and len(running) >= slots:
                break
            if all(d in finished for d in stage.deps):
                waiting.remove(stage)
                running[stage.id] = executor.submit(*make_task(stage))
        if not running:
            missing = sorted({d for s in waiting for d in s.deps} - set(finished))
            raise LorsError(f"stages wait for each other in a cycle: {missing}")
        time.sleep(poll)
        for stage_id, future in list(running.items()):
            if not future.done():
                continue
            del running[stage_id]
            try:
                finished[stage_id] = future.result() or {}
            except Exception as exc:  # noqa: BLE001 -- any failure of a stage is retried
                failures[stage_id] = failures.get(stage_id, 0) + 1
                stage = by_id[stage_id]
                where = log_of(stage) or job_log(future) or "no log"
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if failures[stage_id] > retries:
                    executor.shutdown(cancel=True)
                    raise LorsError(f"stage '{stage_id}' failed {failures[stage_id]} times; "
                                    f"last error: {type(exc).__name__}: {first}; log: {where}"
                                    ) from exc
                say(f"stage {stage_id} failed ({type(exc).__name__}: {first}); retrying "
                    f"({failures[stage_id]}/{retries}); log: {where}")
                waiting.insert(0, stage)
                continue
            seconds = finished[stage_id].get("seconds")
            where = finished[stage_id].get("host")
            say(f"[{len(finished)}/{len(stages)}] {stage_id}"
                + (f" ({seconds:.1f} s on {where})" if seconds is not None else ""))
    return finished


def make_executor(kind: str, *, jobs: int | None, threads: int, folder: Path,
                  ray_address: str | None = None, partition: str | None = None,
                  time_min: int = 240, gpus: int = 0, mem_gb: float | None = None):
    """The executor ``kind`` (local, ray, slurm, slurm-local) for ``jobs`` concurrent stages
    sharing ``threads`` CPU threads (ray, slurm: each job gets ``threads // jobs``, or
    ``threads`` without ``jobs``)."""
    from ..threads import share
    from .executors import LocalExecutor, RayExecutor, SubmititExecutor
    per_job = share(threads, jobs or 1)
    if kind == "local":
        return LocalExecutor(jobs or 1, threads)
    if kind == "ray":
        return RayExecutor(ray_address, threads=per_job, gpus=gpus, jobs=jobs,
                           cpus=max(threads, per_job))
    if kind in ("slurm", "slurm-local"):
        return SubmititExecutor(folder, local=kind == "slurm-local", threads=per_job, jobs=jobs,
                                partition=partition, time_min=time_min, gpus=gpus,
                                mem_gb=mem_gb)
    raise LorsError(f"unknown executor {kind!r}: choose local, ray, slurm or slurm-local")


def run_parallel(config, executor, *, retries: int = 2, show_progress: bool = True) -> dict:
    """Compute every stage of ``config`` through ``executor`` (see the module docstring),
    then assemble the experiment with :func:`.runner.run_experiment`; returns it. The
    executor is shut down at the end."""
    from .runner import Experiment, run_experiment
    say = print if show_progress else (lambda *a, **k: None)
    # here, once: validates the inputs and renders the speech the workers then find cached
    exp = Experiment(config, show_progress)
    logs = exp.out / "logs"
    stages = plan_stages(config)
    base = {"config": config.model_dump(mode="json"), "cwd": os.getcwd(),
            "threads": executor.threads}

    def make_task(stage: Stage) -> tuple:
        return (run_stage, {**base, "stage": stage.id, "kind": stage.kind,
                            "args": stage.args, "log": str(logs / log_name(stage.id))})

    say(f"{len(stages)} stages on {type(executor).__name__} ({executor.threads} threads per "
        f"stage{'' if executor.slots is None else f', {executor.slots} at a time'}); logs in "
        f"{logs}")
    try:
        run_stages(stages, executor, make_task, retries=retries, say=say,
                   log_of=lambda stage: str(logs / log_name(stage.id)))
    except BaseException:  # Ctrl-C, SIGTERM or a stage out of retries: stop the others
        executor.shutdown(cancel=True)
        raise
    executor.shutdown()
    say("assembling the report from the cache")
    return run_experiment(config, show_progress)


__all__ = ["KINDS", "Stage", "make_executor", "plan_stages", "run_parallel", "run_stage",
           "run_stages"]
