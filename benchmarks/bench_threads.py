"""How much a second busy process slows a 768 x 768 SVD, with torch's default threads vs the
lors thread setting (lors.threads: OMP_WAIT_POLICY=PASSIVE and the CPUs this process may use).

Each measurement runs in a fresh process, since OpenMP reads its variables when torch is
imported. Per setting: the SVD time alone, then while a second process with the same setting
runs the same SVDs in a loop; printed with the slowdown ratio (busy / alone).

    python benchmarks/bench_threads.py [--repeats 20] [--modes default,lors,lors-half]

Modes: ``default`` (torch as installed: one thread per core, OpenMP's default spin-wait),
``lors`` (``configure_threads()``: every CPU this process may use, passive waiting),
``lors-half`` (``configure_threads(cpus // 2)``: what two ``--jobs 2`` workers get).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SIZE = 768
CLEAN = ("LORS_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
         "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def setup(mode: str) -> int:
    """Apply ``mode`` before torch is imported; return torch's thread count."""
    if mode != "default":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
        from lors.threads import available_cpus, configure_threads
        configure_threads(max(1, available_cpus() // 2) if mode == "lors-half" else None)
    import torch
    return torch.get_num_threads()


def svd_seconds(repeats: int) -> float:
    import torch
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(SIZE, SIZE, generator=generator)
    torch.linalg.svd(matrix, full_matrices=False)  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.linalg.svd(matrix, full_matrices=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def child(mode: str, repeats: int, busy: bool) -> None:
    threads = setup(mode)
    if busy:
        print("ready", flush=True)
        while True:
            svd_seconds(5)
    print(f"{threads} {svd_seconds(repeats)}", flush=True)


def environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in CLEAN}


def measure(mode: str, repeats: int) -> tuple[int, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--repeats", str(repeats)],
                         env=environment(), check=True, capture_output=True, text=True).stdout
    threads, seconds = out.split()
    return int(threads), float(seconds)


def measure_busy(mode: str, repeats: int) -> tuple[int, float]:
    neighbour = subprocess.Popen([sys.executable, __file__, "--child", mode, "--busy"],
                                 env=environment(), stdout=subprocess.PIPE, text=True)
    try:
        assert neighbour.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let it get going
        return measure(mode, repeats)
    finally:
        neighbour.kill()
        neighbour.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="SVDs per measurement")
    parser.add_argument("--modes", default="default,lors,lors-half")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeats, args.busy)
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{SIZE} x {SIZE} float32 SVD (torch.linalg.svd), median of {args.repeats}; "
          f"{cpus} CPUs; alone vs while a second process with the same setting runs SVDs")
    print(f"{'mode':<12}{'threads':>8}{'alone s':>10}{'busy s':>10}{'slowdown':>10}")
    for mode in args.modes.split(","):
        threads, alone = measure(mode, args.repeats)
        _, busy = measure_busy(mode, args.repeats)
        print(f"{mode:<12}{threads:>8}{alone:>10.4f}{busy:>10.4f}{busy / alone:>9.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
