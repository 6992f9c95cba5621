"""How many passes LoRS's randomized SVD needs, on real task vectors.

LoRS's low-rank part comes from a randomized SVD with ``svd_niter`` power iterations (default
2: six products with each matrix). Fewer iterations are faster and less exact. For every 2-D
attention/FFN matrix whose task vector is not zero, and each rank, this prints, per number of
power iterations:
  - excess: ||tau - L||_F / ||tau - L*||_F - 1, with L* the exact rank-r truncation (0 = optimal)
  - pruned: ||P - P*||_F / ||P*||_F, where P is LoRS's pruned task vector (L + top-k of the
    residual, keep 0.2) made with that SVD and P* the one made with the exact SVD
  - CPU time per matrix entry on one thread, against the exact SVD's
as medians and maxima over matrices and experts.

    python benchmarks/bench_svd_passes.py --base BASE_DIR EXPERT_DIR [EXPERT_DIR ...]
        [--ranks 4 8 16] [--keep 0.2]

BASE_DIR and EXPERT_DIR are HF Whisper folders (model.safetensors) of one base.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

from lors.merging import primitives as P
from lors.merging.groups import MATRIX_GROUPS, group_of



def task_matrices(base: Path, expert: Path):
    """(name, float32 task vector) for every non-zero 2-D attention/FFN matrix."""
    with safe_open(base / "model.safetensors", framework="pt") as b, \
            safe_open(expert / "model.safetensors", framework="pt") as e:
        for name in b.keys():
            if group_of(name) not in MATRIX_GROUPS:
                continue
            tau = e.get_tensor(name).float() - b.get_tensor(name).float()
            if tau.abs().max() > 0:
                yield name, tau


def cpu_seconds(step) -> tuple[float, object]:
    start = time.process_time()
    result = step()
    return time.process_time() - start, result


def measure(tau: torch.Tensor, ranks: list[int], keep: float, niters: list[int]
            ) -> dict[int, dict]:
    """Per rank: the exact SVD's CPU per entry, and per niter the row described above."""
    seconds, (u_all, s_all, vh_all) = cpu_seconds(
        lambda: torch.linalg.svd(tau, full_matrices=False))
    return {rank: _measure(tau, rank, keep, niters, seconds,
                           (u_all[:, :rank], s_all[:rank], vh_all[:rank])) for rank in ranks}


def _measure(tau, rank, keep, niters, exact_seconds, exact) -> dict:
    u, s, vh = exact
    optimal = torch.linalg.norm(tau - (u * s) @ vh)
    pruned_exact = P.lors_prune(tau, rank, keep, factors=exact)
    row = {"exact_s": exact_seconds / tau.numel()}
    for niter in niters:
        seconds, factors = cpu_seconds(lambda: P.truncated_svd(
            tau, rank, niter=niter, generator=torch.Generator().manual_seed(0)))
        u, s, vh = factors
        error = torch.linalg.norm(tau - (u * s) @ vh)
        pruned = P.lors_prune(tau, rank, keep, factors=factors)
        row[niter] = {"excess": float(error / optimal - 1) if optimal > 0 else 0.0,
                      "pruned": float(torch.linalg.norm(pruned - pruned_exact)
                                      / torch.linalg.norm(pruned_exact)),
                      "s": seconds / tau.numel()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("experts", type=Path, nargs="+")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--niters", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each engine worker runs
    matrices = [tau for expert in args.experts for _, tau in task_matrices(args.base, expert)]
    print(f"{len(matrices)} non-zero matrices from {len(args.experts)} experts "
          f"(shapes {sorted({tuple(t.shape) for t in matrices})}); keep {args.keep}; one thread")
    print("rank  niter  excess median / max      pruned median / max      CPU vs exact SVD")
    measured = [measure(tau, args.ranks, args.keep, args.niters) for tau in matrices]
    for rank in args.ranks:
        rows = [m[rank] for m in measured]
        exact_s = statistics.median(r["exact_s"] for r in rows)
        for niter in args.niters:
            excess = [r[niter]["excess"] for r in rows]
            pruned = [r[niter]["pruned"] for r in rows]
            cost = statistics.median(r[niter]["s"] for r in rows)
            print(f"{rank:>4}  {niter:>5}  {statistics.median(excess):9.2e} / {max(excess):8.2e}"
                  f"     {statistics.median(pruned):9.2e} / {max(pruned):8.2e}"
                  f"     {cost / exact_s:5.2f}")


if __name__ == "__main__":
    main()
