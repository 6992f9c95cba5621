"""Data-parallel training under a real launcher: two CPU processes (gloo) on a tiny Whisper.

Each launch costs interpreter and torch start-up, so the file runs three: a driver script
(an uninterrupted run, a plateau run with process-dependent dev scores, and a run interrupted
at step 3), ``lors train`` resuming the interrupted run, and ``lors train`` in bf16.

The launcher is ``accelerate launch --multi_gpu --num_processes 2``: despite its name it only
starts the processes (through torch.distributed.run), and lors runs them on the CPU when no
GPU is there. ``accelerate launch --cpu --num_processes 2`` starts a single process unless
given an MPI host file (accelerate 1.x), so it cannot be used for this.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import load_state, make_tiny_speech
from lors.data.manifest import write_manifest
from lors.tiny import save_tiny_base
from lors.training import TrainConfig, train

if not torch.distributed.is_available():  # pragma: no cover - every Linux/macOS torch has gloo
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

PROCESSES = 2
LAUNCH_TIMEOUT_S = 300
# batch 5 over 2 processes: an uneven split (3 + 2) with different token counts, which a
# mean of per-process means would weigh wrongly; one dev evaluation at the last step, so
# the exported model is the last step's in every run; checkpoints at steps 2 and 4
SETTINGS = dict(pairs=[("de", "asr")], max_steps=6, batch_size=5, learning_rate=3e-3,
                eval_times=1, save_every=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    utterances = make_tiny_speech(root, {"train": 8, "dev": 4}, languages=("de",))
    manifest = write_manifest(root / "manifest.jsonl", utterances)
    return {"root": root, "base": base, "manifest": manifest, "cache": root / "cache",
            "runs": root / "runs"}


def settings(setup, out: Path, **overrides) -> dict:
    """TrainConfig values as ``lors train`` builds them from the flags of :func:`cli_args`."""
    values = dict(base=str(setup["base"]), manifest=str(setup["manifest"]), out=str(out),
                  cache_dir=str(setup["cache"]), show_progress=False, **SETTINGS)
    values.update(overrides)
    return values


def cli_args(values: dict) -> list[str]:
    return ["train", "--base", values["base"], "--manifest", values["manifest"],
            "--pairs", ",".join(f"{l}-{t}" for l, t in values["pairs"]),
            "--out", values["out"], "--max-steps", str(values["max_steps"]),
            "--batch-size", str(values["batch_size"]), "--lr", str(values["learning_rate"]),
            "--eval-times", str(values["eval_times"]), "--save-every", str(values["save_every"]),
            "--cache-dir", values["cache_dir"], "--quiet"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(setup, program: list[str], precision: str = "no") -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``program`` in PROCESSES CPU processes; fails the test on a
    non-zero exit, showing the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # no user accelerate config (it lives under HF_HOME) may change the launch
           "HF_HOME": str(setup["root"] / "hf-home"), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(PROCESSES), "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *program]
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S, cwd=setup["root"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\n{output[-6000:]}"
    return result


DRIVER = textwrap.dedent('''
    """Run by every process: train() three times, recording what each process saw."""
    import json, os, sys
    from pathlib import Path

    from lors.training import TrainConfig, loop, train

    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = Path(sys.argv[2])
    rank = int(os.environ["RANK"])

    def record(name, value):
        (results / f"{name}-{rank}.json").write_text(json.dumps(value))

    # 1. an uninterrupted run
    summary = train(TrainConfig(**jobs["whole"]))
    record("whole", summary)

    # 2. dev scores that differ between processes: the main process's must decide. Alone,
    # process 1 (no improvement after its first evaluation, patience 1) would stop at step 2
    # while process 0 (always improving) trains on: a hang or a crash without the broadcast.
    original, calls, steps = loop.pair_dev_scores, [], []

    def pair_dev_scores(select, model, whisper, processor, examples, *rest):
        calls.append(1)
        value = 0.1 * len(calls) if rank == 0 else 0.5
        return {f"{e.language}-{e.task}": value for e in examples}
    loop.pair_dev_scores = pair_dev_scores
    summary = train(TrainConfig(**jobs["plateau"]), on_step=lambda step, rec: steps.append(step))
    loop.pair_dev_scores = original
    record("plateau", {"summary": summary, "steps": steps, "evaluations": len(calls)})

    # 3. interrupted after step 3 (the checkpoint of step 2 stays), resumed by `lors train`
    def stop_at_three(step, rec):
        if step == 3:
            raise KeyboardInterrupt
    try:
        train(TrainConfig(**jobs["interrupted"]), on_step=stop_at_three)
    except KeyboardInterrupt:
        record("interrupted", "stopped at step 3")
''')


@pytest.fixture(scope="module")
def single(setup) -> Path:
    """The reference: the same run in one process (in this test process)."""
    out = setup["runs"] / "one"
    train(TrainConfig(**settings(setup, out, cpu=True)))
    return out


@pytest.fixture(scope="module")
def driver(setup) -> dict:
    runs, results = setup["runs"], setup["root"] / "results"
    runs.mkdir(exist_ok=True)
    results.mkdir()
    jobs = {"whole": settings(setup, runs / "two"),
            "plateau": settings(setup, runs / "plateau", max_steps=4, eval_times=None,
                                eval_every=1, patience=1, save_every=None),
            "interrupted": settings(setup, runs / "resumed")}
    (setup["root"] / "jobs.json").write_text(json.dumps(jobs))
    (setup["root"] / "driver.py").write_text(DRIVER)
    launch(setup, [str(setup["root"] / "driver.py"), str(setup["root"] / "jobs.json"),
                   str(results)])
    return {name: [json.loads((results / f"{name}-{rank}.json").read_text())
                   for rank in range(PROCESSES)]
            for name in ("whole", "plateau", "interrupted")}


@pytest.fixture(scope="module")
def resumed(setup, driver) -> dict:
    """``lors train`` under two processes, resuming the run the driver interrupted."""
    out = setup["runs"] / "resumed"
    partial = out.with_name("resumed.partial")
    found = {"checkpoints": sorted(p.name for p in (partial / "checkpoints").iterdir()),
             "logged": [json.loads(line)["step"] for line
                        in (partial / "train_log.jsonl").read_text().splitlines()]}
    result = launch(setup, ["-m", "lors.cli", *cli_args(settings(setup, out))])
    return {"out": out, "before": found, "stdout": result.stdout}


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (folder / "train_log.jsonl").read_text()
                                   .splitlines()) if "loss" in r]


def assert_same_weights(a: Path, b: Path, rtol: float, atol: float) -> float:
    """Assert the two models' tensors agree; return the largest absolute difference."""
    left, right = load_state(a), load_state(b)
    assert left.keys() == right.keys()
    worst = 0.0
    for name, tensor in left.items():
        torch.testing.assert_close(right[name], tensor, rtol=rtol, atol=atol, msg=name)
        worst = max(worst, float((right[name] - tensor).abs().max()))
    return worst


def test_two_processes_split_the_global_batch_and_match_one(setup, single, driver):
    two = setup["runs"] / "two"
    summaries = driver["whole"]
    # the global batch of 5 is split 3 + 2, each process counting what it trained on
    for summary in summaries:
        assert summary["processes"] == 2 and summary["batch_size"] == 5
        assert summary["process_batch"] == [3, 2]
        assert summary["process_samples"] == [18, 12]
        assert summary["samples"] == 30 == 6 * 5 and summary["steps"] == 6
    saved = json.loads((two / "training.json").read_text())
    reference = json.loads((single / "training.json").read_text())
    assert saved["process_samples"] == [18, 12] and reference["process_samples"] == [30]
    assert reference["processes"] == 1 and reference["process_batch"] == [5]
    # one model, written once, atomically: no partial folder or temporary left behind
    assert sorted(p.name for p in setup["runs"].iterdir() if p.name.startswith(("two", ".two"))) \
        == ["two"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir())
    # the same global batches in the same order: the same loss curve and weights up to
    # float rounding (the loss is logged rounded to 1e-6)
    one_curve, two_curve = losses(single), losses(two)
    assert len(one_curve) == len(two_curve) == 6
    assert max(abs(a - b) for a, b in zip(one_curve, two_curve)) <= 2e-5, (one_curve, two_curve)
    assert saved["dev_curve"][0][0] == 6
    assert saved["dev_curve"][0][1] == pytest.approx(reference["dev_curve"][0][1], abs=1e-6)
    assert_same_weights(single, two, rtol=1e-4, atol=1e-5)
    base = load_state(setup["base"])
    assert any(not torch.equal(base[n], t) for n, t in load_state(two).items())  # it trained


def test_the_main_process_dev_scores_decide_the_plateau_stop(driver):
    records = driver["plateau"]
    for record in records:
        # process 0's scores 0.1, 0.2, 0.3, 0.4 always improve: no early stop on any process
        assert record["steps"] == [1, 2, 3, 4] and record["evaluations"] == 4
        summary = record["summary"]
        assert summary["steps"] == 4 and summary["stopped_early"] is False
        assert [score for _, score in summary["dev_curve"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
        assert summary["best_step"] == 4


def test_an_interrupted_two_process_run_resumes_to_the_same_result(setup, single, driver,
                                                                     resumed):
    assert driver["interrupted"] == ["stopped at step 3"] * 2
    assert resumed["before"]["checkpoints"] == ["step-0000002"]
    assert resumed["before"]["logged"] == [1, 2, 3]
    out = resumed["out"]
    assert not out.with_name("resumed.partial").exists()
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 6 and summary["samples"] == 30
    # counts restored from the step-2 checkpoint, then counted on by each process
    assert summary["process_samples"] == [18, 12] and summary["processes"] == 2
    logged = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text()
              .splitlines() if "loss" in json.loads(line)]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 3, replayed, is logged once
    assert resumed["stdout"].count("trained de-asr") == 1  # one report, by the main process
    assert max(abs(a - b) for a, b in zip(losses(out), losses(single))) <= 2e-5
    assert_same_weights(setup["runs"] / "two", out, rtol=1e-5, atol=1e-6)
    assert_same_weights(single, out, rtol=1e-4, atol=1e-5)


def cpu_bf16_autocast() -> str | None:
    """Why CPU bf16 autocast cannot run here, or None when it can."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    except (RuntimeError, TypeError) as exc:
        return f"torch {torch.__version__} has no CPU bf16 autocast: {exc}"
    if value.dtype != torch.bfloat16:
        return f"torch {torch.__version__} CPU autocast does not run linear layers in bf16"
    return None


def test_bf16_mixed_precision_from_the_launcher_on_cpu(setup):
    reason = cpu_bf16_autocast()
    if reason:
        pytest.skip(reason)
    from safetensors import safe_open
    out = setup["runs"] / "bf16"
    # no --mixed-precision flag: lors takes the launcher's setting
    launch(setup, ["-m", "lors.cli", *cli_args(settings(setup, out, max_steps=3))],
           precision="bf16")
    summary = json.loads((out / "training.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["processes"] == 2
    curve = losses(out)
    assert len(curve) == 3 and all(math.isfinite(v) and v > 0 for v in curve)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"F32"}  # autocast computes in bf16; the weights stay float32
