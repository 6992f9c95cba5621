"""Peak memory and time per point of the experiment's dev search (``TaskVectors``) with 10
experts of Whisper-base shape (random weights).

Builds a base and ``--experts`` experts (base + low-rank-plus-noise task vectors) as Hugging
Face folders in a temporary directory, then, in a child process per implementation (so its
peak resident memory, ``ru_maxrss``, is its own), builds ``TaskVectors`` and merges a few
points through ``delta()`` + ``state()``: task arithmetic, TIES (keep 0.2), LoRS (rank 16,
keep 0.2) and LoRS again at keep 0.1 (its SVD factors come from the search's cache), then
the experts' cosine similarities (as the experiment's runner asks for them).

Prints, per implementation: peak RSS (GiB and in models of float32 weights), the time to
build the task vectors and each point's time. ``--compare FILE`` also runs another version
of ``lors/experiment/taskvectors.py`` (e.g. the committed one) in the same run and prints
the ratios:

    git show HEAD:src/lors/experiment/taskvectors.py > /tmp/taskvectors_old.py
    python benchmarks/bench_search_memory.py --compare /tmp/taskvectors_old.py

The compared file runs on the current merge core (ops, reader). To measure a whole older
tree, keep the models (``--models DIR``) and run the child on that tree:

    git archive HEAD src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src python benchmarks/bench_search_memory.py --child DIR --experts 10

Target: peak RSS <= 3 GiB with 10 experts (the search holds one model, not one per expert).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_whisper import write_random_experts  # benchmarks/ is the script's own folder

BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
            vocab_size=51865, num_mel_bins=80, max_source_positions=1500,
            max_target_positions=448)
POINTS = [("task_arithmetic", {}), ("ties", {"keep": 0.2}),
          ("lors", {"rank": 16, "keep": 0.2}), ("lors", {"rank": 16, "keep": 0.1})]
LAMBDA = 0.3


def make_models(root: Path, experts: int) -> int:
    """A random Whisper-base base and ``experts`` experts; returns the float32 bytes of one
    model's weights."""
    base = write_random_experts(root, BASE, experts)
    return sum(t.numel() * 4 for t in base.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load_task_vectors(module: str | None):
    """``TaskVectors`` of the installed lors, or of the file ``module`` (another version of
    lors/experiment/taskvectors.py, loaded inside the lors.experiment package)."""
    if module is None:
        from lors.experiment.taskvectors import TaskVectors
        return TaskVectors
    importlib.import_module("lors.experiment")  # the package the file is loaded into
    spec = importlib.util.spec_from_file_location("lors.experiment._bench_taskvectors", module)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    return loaded.TaskVectors


def child(root: Path, experts: int, module: str | None) -> None:
    """Build the task vectors and merge every point; print one JSON line."""
    task_vectors = load_task_vectors(module)
    started = time.perf_counter()
    vectors = task_vectors(str(root / "base"), {f"e{i}": str(root / f"e{i}")
                                                for i in range(experts)})
    built = time.perf_counter() - started
    after_build = peak_rss_bytes()
    seconds, peaks = [], []
    for method, params in POINTS:
        started = time.perf_counter()
        state = vectors.state(vectors.delta(method, params), LAMBDA)
        seconds.append(time.perf_counter() - started)
        peaks.append(peak_rss_bytes())
        del state
    started = time.perf_counter()
    vectors.cosines()  # the runner's similarity matrix: every task vector read once more
    cosines = time.perf_counter() - started
    print(json.dumps({"build_s": built, "points_s": seconds, "peak_after_build": after_build,
                      "peaks": peaks, "cosines_s": cosines, "peak": peak_rss_bytes()}))


def run_child(root: Path, experts: int, module: str | None) -> dict:
    command = [sys.executable, __file__, "--child", str(root), "--experts", str(experts)]
    if module is not None:
        command += ["--module", module]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(label: str, result: dict, model_bytes: int) -> None:
    gib = 1024 ** 3
    points = ", ".join(f"{method} {json.dumps(params)} {s:.2f} s (peak so far {p / gib:.2f} GiB)"
                       for (method, params), s, p
                       in zip(POINTS, result["points_s"], result["peaks"]))
    print(f"{label}: peak RSS {result['peak'] / gib:.2f} GiB "
          f"({result['peak'] / model_bytes:.1f} models; {result['peak_after_build'] / gib:.2f} "
          f"GiB after building), build {result['build_s']:.1f} s; per point: {points}; "
          f"cosines {result['cosines_s']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temp dir)")
    parser.add_argument("--models", type=Path,
                        help="keep the models in this folder (reused when already there)")
    parser.add_argument("--compare", help="another taskvectors.py to measure in the same run")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.experts, args.module)
    root = args.models or Path(tempfile.mkdtemp(prefix="lors-search-", dir=args.workdir))
    done = root / "models.json"
    try:
        started = time.perf_counter()
        if done.is_file() and json.loads(done.read_text())["experts"] == args.experts:
            model_bytes = json.loads(done.read_text())["model_bytes"]
        else:
            model_bytes = make_models(root, args.experts)
            done.write_text(json.dumps({"experts": args.experts, "model_bytes": model_bytes}))
        print(f"{args.experts} experts of Whisper-base shape, {model_bytes / 1024 ** 3:.2f} GiB "
              f"of float32 weights each, ready in {time.perf_counter() - started:.0f} s")
        results = {"current": run_child(root, args.experts, None)}
        describe("current", results["current"], model_bytes)
        if args.compare:
            results["compared"] = run_child(root, args.experts, args.compare)
            describe(f"compared ({args.compare})", results["compared"], model_bytes)
            new, old = results["current"], results["compared"]
            print(f"peak RSS current / compared: {new['peak'] / old['peak']:.2f}")
            print("time per point current / compared: " + ", ".join(
                f"{method} {a / b:.2f}" for (method, _), a, b
                in zip(POINTS, new["points_s"], old["points_s"])))
            print(f"build time current / compared: {new['build_s'] / old['build_s']:.2f}")
        met = results["current"]["peak"] <= 3 * 1024 ** 3
        print(f"target peak RSS <= 3 GiB: {'met' if met else 'MISSED'}")
    finally:
        if args.models is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
