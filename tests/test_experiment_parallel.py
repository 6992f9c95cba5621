"""Parallel experiments: worker processes, a local Ray and submitit's local executor give the
serial run's experiment.json; stage locks, retries of failed stages, and the thread setting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_speech
from parallel_helpers import flaky, slow_stage, worker_threads
from lors.data.manifest import write_manifest
from lors.errors import LorsError
from lors.experiment.config import load_experiment
from lors.experiment.executors import LocalExecutor
from lors.experiment.locks import lock_path
from lors.experiment.parallel import Stage, make_executor, plan_stages, run_parallel, run_stages
from lors.experiment.runner import run_experiment
from lors.experiment.stages import cached_json
from lors.tiny import save_tiny_base

THREADS = 1  # per worker on 2 cores; the serial reference uses as many (same float rounding)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    manifest = write_manifest(root / "manifest.jsonl",
                              make_tiny_speech(root, {"train": 4, "dev": 2, "test": 2}))
    return root, base, manifest


def write_config(root: Path, name: str, base, manifest, **changes) -> Path:
    raw = {"name": "tiny", "base": str(base), "languages": ["de", "fr"], "tasks": ["asr"],
           "settings": ["all"], "baselines": ["mtl"], "data": {"manifest": str(manifest)},
           "training": {"mode": "full", "max_steps": 2, "batch_size": 4,
                        "learning_rate": 3e-3},
           "evaluation": {"max_new_tokens": 6},
           "methods": {"lors": {"rank": [1], "keep": [0.2], "lambda": [0.5, 1.0]},
                       "task_arithmetic": {"lambda": [0.5, 1.0]},
                       "ties": {"keep": [0.2], "lambda": [0.5, 1.0]}},
           "search": {"equal_budget": False, "widen_edges": 0},
           "extensibility": {"language": "fr"}, "out": str(root / name)}
    raw.update(changes)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def serial(path: Path) -> dict:
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        run_experiment(load_experiment(path), show_progress=False)
    finally:
        torch.set_num_threads(previous)
    return comparable(Path(load_experiment(path).out))


_TIMING = re.compile(r"(_s|seconds|_per_second)$")


def comparable(out: Path) -> dict:
    """experiment.json without timings and with the experiment folder written as OUT."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not _TIMING.search(k)}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):  # the extensibility note quotes a training time
            return re.sub(r"\(\d+ s\)", "(N s)", value.replace(str(out), "OUT"))
        return value
    return clean(json.loads((out / "experiment.json").read_text()))


@pytest.fixture(scope="module")
def reference(inputs):
    root, base, manifest = inputs
    return serial(write_config(root, "serial", base, manifest))


def test_the_stage_plan_follows_the_runner(inputs):
    root, base, manifest = inputs
    config = load_experiment(write_config(root, "plan", base, manifest,
                                          baselines=["mtl", "sequential"]))
    stages = {s.id: s for s in plan_stages(config)}
    assert stages["mtl all"].deps == ("expert de-asr", "expert fr-asr")  # the experts' steps
    assert stages["sequential all"].deps == ()
    assert stages["merge all lors"].deps == ("dev all",)
    assert set(stages["extensibility"].deps) == {"eval expert de-asr", "eval expert fr-asr"}
    assert len(stages) == 1 + 2 + 2 + 2 + 1 + 3 + 1


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_parallel_run_equals_the_serial_run(inputs, reference, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    root, base, manifest = inputs
    path = write_config(root, executor, base, manifest)
    config = load_experiment(path)
    run_parallel(config, make_executor(executor, jobs=2, threads=2 * THREADS,
                                       folder=root / executor / "logs"),
                 show_progress=False)
    out = Path(config.out)
    assert comparable(out) == reference
    logs = {p.name for p in (out / "logs").glob("*.log")}
    assert {"expert-de-asr.log", "merge-all-lors.log", "extensibility.log"} <= logs
    assert not list(out.rglob("*.lock"))
    # every stage is cached: the serial run afterwards computes nothing (files keep mtimes)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")
              if "report" not in p.parts and p.name != "experiment.json"}
    run_experiment(config, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_submitit_local_executor_equals_the_serial_run(inputs):
    """The SLURM path with submitit's LocalExecutor (one process per stage: a smaller
    experiment, since every job starts Python and torch anew)."""
    pytest.importorskip("submitit")
    root, base, manifest = inputs
    small = dict(languages=["de"], baselines=[], methods={"task_arithmetic": {"lambda": [0.5]}},
                 extensibility=None)
    expected = serial(write_config(root, "serial-small", base, manifest, **small))
    config = load_experiment(write_config(root, "slurm", base, manifest, **small))
    executor = make_executor("slurm-local", jobs=2, threads=2 * THREADS,
                             folder=root / "slurm" / "logs" / "submitit")
    run_parallel(config, executor, show_progress=False)
    assert comparable(Path(config.out)) == expected
    assert list((root / "slurm" / "logs" / "submitit").glob("*_log.out"))


# --- stage locks -----------------------------------------------------------------------------

def test_two_workers_asking_for_one_stage_compute_it_once(tmp_path):
    executor = LocalExecutor(2, threads=2, pin=False)
    try:
        path, counter = tmp_path / "stage" / "out.json", tmp_path / "counter"
        futures = [executor.submit(slow_stage, str(path), str(counter)) for _ in range(2)]
        assert [f.result(timeout=120) for f in futures] == [{"value": 42}] * 2
    finally:
        executor.shutdown()
    assert len(counter.read_text().split()) == 1
    assert not lock_path(path).exists()


def test_cached_json_computes_a_stage_once_for_two_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    calls = []

    def compute() -> dict:
        calls.append(1)
        time.sleep(0.5)
        return {"value": 7}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cached_json(tmp_path / "s" / "out.json", compute),
                                range(2)))
    assert results == [{"value": 7}] * 2 and len(calls) == 1


def _fail() -> dict:
    raise RuntimeError("stage failed")


def test_a_failed_stage_leaves_no_lock_and_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        cached_json(tmp_path / "new" / "out.json", _fail)
    assert not (tmp_path / "new").exists()


def test_a_dead_workers_lock_is_taken_over(tmp_path, capfd):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "out.json"
    lock_path(path).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                           "time": 0, "token": "t"}))
    assert cached_json(path, lambda: {"value": 1}) == {"value": 1}
    assert "taking over the stale lock" in capfd.readouterr().err
    assert not lock_path(path).exists()


def test_a_lock_without_heartbeat_is_stale(tmp_path, monkeypatch):
    """A holder on another host that stopped refreshing its lock (its host died)."""
    monkeypatch.setenv("LORS_LOCK_STALE_S", "1")
    path = tmp_path / "out.json"
    lock_path(path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0,
                                           "token": "t"}))
    old = time.time() - 5
    os.utime(lock_path(path), (old, old))
    assert cached_json(path, lambda: {"value": 2}) == {"value": 2}


# --- retries ---------------------------------------------------------------------------------

def test_a_failed_stage_is_resubmitted(tmp_path):
    executor = LocalExecutor(2, threads=2, pin=False)
    stages = [Stage("raises", "x"), Stage("crashes", "x"), Stage("after", "x", deps=("raises",))]
    how = {"raises": "raise", "crashes": "crash", "after": "raise"}
    try:
        done = run_stages(stages, executor,
                          lambda s: (flaky, str(tmp_path / s.id), how[s.id]), retries=3)
    finally:
        executor.shutdown()
    # a dying worker breaks the pool: a stage running beside it may need one attempt more
    assert all(done[s.id]["attempts"] >= 2 for s in stages)
    assert done["after"] == {"attempts": 2}  # started only once "raises" had succeeded


def test_a_stage_out_of_retries_names_itself_and_its_log(tmp_path):
    executor = LocalExecutor(1, threads=1, pin=False)
    with pytest.raises(LorsError, match=r"stage 'broken' failed 2 times; last error: "
                                        r"RuntimeError: attempt 2 failed; log: .*broken\.log"):
        run_stages([Stage("broken", "x")], executor,
                   lambda s: (flaky, str(tmp_path / "m"), "always"), retries=1,
                   log_of=lambda s: str(tmp_path / "broken.log"))
    assert (tmp_path / "m").read_text() == "2"


# --- threads ---------------------------------------------------------------------------------

def test_the_thread_count(monkeypatch):
    from lors.threads import available_cpus, share, thread_count
    for variable in ("LORS_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    assert thread_count() == available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's own setting is kept
    assert thread_count() == 5
    monkeypatch.setenv("LORS_THREADS", "3")
    assert thread_count() == 3 and thread_count(2) == 2
    assert share(8, 3) == 2 and share(2, 4) == 1
    monkeypatch.setenv("LORS_THREADS", "zero")
    with pytest.raises(LorsError, match="LORS_THREADS='zero'"):
        thread_count()
    from lors.cli import main
    assert main(["methods"]) == 2  # refused before any command runs


def test_the_cli_applies_the_thread_setting_before_torch_starts():
    """``lors --threads N`` in a fresh process: torch's threads (even above the physical
    cores, which torch would cap) and passive OpenMP waiting."""
    code = ("import lors.cli as cli, sys; cli.COMMANDS['methods'] = lambda a: print("
            "'torch' in sys.modules, __import__('torch').get_num_threads(), __import__('os')"
            ".environ['OMP_WAIT_POLICY']) or 0; cli.main(['--threads', '3', 'methods'])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LORS_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    shown = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert shown == ["True", "3", "PASSIVE"]


def test_local_workers_get_their_share_of_threads_cpus_and_gpus():
    cpus = sorted(os.sched_getaffinity(0))
    executor = LocalExecutor(2, threads=len(cpus), gpus=["0", "1"])
    try:
        futures = [executor.submit(worker_threads) for _ in range(2)]  # one per worker
        results = {f.result(timeout=120) for f in futures}
    finally:
        executor.shutdown()
    share = max(1, len(cpus) // 2)
    assert {r[0] for r in results} == {share} and {r[1] for r in results} == {str(share)}
    assert {r[3] for r in results} == {"0", "1"}  # one GPU each
    assert {r[4] for r in results} == {"PASSIVE"}
    if len(cpus) >= 2:  # disjoint CPU sets
        sets = {r[2] for r in results}
        assert len(sets) == 2 and not set.intersection(*map(set, sets))
