"""Merge speed and memory on Whisper-small-shaped models (random weights), as ratios.

Prints, measured in one run on this machine:
  - lors LoRS time / lors task-arithmetic time            (target <= 1.5)
  - lors LoRS time / naive full-SVD LoRS time              (target <= 0.2)
  - peak RSS of a lors merge / (one model + one tensor per expert)   (target <= ~1.5)
  - peak RSS with 5 experts / peak RSS with 2 experts      (growth: one tensor per expert)
Each merge runs in its own process so its peak resident memory (VmHWM) is its own.

    python benchmarks/bench_merge.py [--workdir DIR] [--experts 5] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from random_whisper import write_random_experts  # benchmarks/ is the script's own folder

SMALL = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
             decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
             vocab_size=51865, num_mel_bins=80)


def make_models(root: Path, experts: int) -> None:
    """A random Whisper-small base and experts = base + low-rank-plus-noise task vectors."""
    write_random_experts(root, SMALL, experts)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_lors(root: Path, method: str, experts: int, out: Path, diagnostics: bool,
             exact: bool = False) -> dict:
    from lors.merging import merge, validate_config
    cfg = validate_config({"base": str(root / "base"), "method": method,
                           "parameters": {"svd": "exact"} if exact else {},
                           "experts": [{"name": f"e{i}", "path": str(root / f"e{i}")}
                                       for i in range(experts)]})
    start = time.perf_counter()
    merge(cfg, out, force=True, diagnostics=diagnostics)
    return {"seconds": time.perf_counter() - start}


def run_naive(root: Path, experts: int, out: Path) -> dict:
    """LoRS as research code writes it: whole models in memory, full SVD, sort-based top-k."""
    from safetensors.torch import load_file, save_file
    start = time.perf_counter()
    base = load_file(root / "base" / "model.safetensors")
    models = [load_file(root / f"e{i}" / "model.safetensors") for i in range(experts)]
    merged = {}
    for name, b in base.items():
        total = torch.zeros_like(b)
        for m in models:
            tau = m[name] - b
            if tau.dim() == 2 and ("_proj.weight" in name or ".fc" in name) and "layers" in name:
                u, s, vh = torch.linalg.svd(tau, full_matrices=True)
                low = u[:, :7] @ torch.diag(s[:7]) @ vh[:7, :]
                residual = tau - low
                k = int(0.2 * residual.numel())
                order = torch.sort(residual.abs().reshape(-1), descending=True).indices[:k]
                kept = torch.zeros(residual.numel())
                kept[order] = residual.reshape(-1)[order]
                tau = low + kept.reshape(tau.shape)
            total += tau
        merged[name] = b + total / experts
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors")
    return {"seconds": time.perf_counter() - start}


def child(args: argparse.Namespace) -> None:
    root, out = Path(args.workdir), Path(args.workdir) / f"out-{args.child}"
    if args.child == "naive":
        result = run_naive(root, args.experts, out)
    else:
        method, _, flag = args.child.partition(":")
        result = run_lors(root, method, args.experts, out, diagnostics=flag != "nodiag",
                          exact=flag == "exact")
    result["peak_rss"] = peak_rss_bytes()
    print("RESULT " + json.dumps(result))


def measure(workdir: Path, what: str, experts: int) -> dict:
    """One merge in a fresh process: its wall time and its own peak resident memory."""
    cmd = [sys.executable, __file__, "--workdir", str(workdir), "--experts", str(experts),
           "--child", what]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[7:])
    print(f"  {what:<24} experts={experts}  {result['seconds']:8.2f} s  "
          f"peak RSS {result['peak_rss'] / 2**30:6.2f} GiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--child")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back TA/LoRS pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lors-bench-"))
    if not (workdir / "base" / "model.safetensors").exists():
        print(f"writing Whisper-small-shaped base + {args.experts} experts to {workdir} ...")
        make_models(workdir, args.experts)
    model_bytes = (workdir / "base" / "model.safetensors").stat().st_size
    largest = 51865 * 768 * 4
    # TA and LoRS alternate, and each ratio comes from a back-to-back pair: slow drifts in the
    # machine's load then cancel out; the median over pairs is reported.
    pairs = {"diagnostics on": ("task_arithmetic", "lors"),
             "diagnostics off": ("task_arithmetic:nodiag", "lors:nodiag")}
    ratios: dict[str, list[float]] = {k: [] for k in pairs}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for label, (ta_name, lors_name) in pairs.items():
            ta_run = measure(workdir, ta_name, args.experts)
            lors_run = measure(workdir, lors_name, args.experts)
            ratios[label].append(lors_run["seconds"] / ta_run["seconds"])
            runs.setdefault(ta_name, []).append(ta_run)
            runs.setdefault(lors_name, []).append(lors_run)
    exact = measure(workdir, "lors:exact", args.experts)
    lors_two = measure(workdir, "lors", 2)
    lors = min(runs["lors"], key=lambda r: r["seconds"])
    ta = min(runs["task_arithmetic"], key=lambda r: r["seconds"])
    print("\nratios (same run, same machine)")
    for label, values in ratios.items():
        listed = ", ".join(f"{v:.2f}" for v in values)
        print(f"  LoRS / task arithmetic ({label}): median {statistics.median(values):.2f} "
              f"over pairs [{listed}]  (target <= 1.5)")
    print(f"  LoRS with exact SVD / task arithmetic     {exact['seconds'] / ta['seconds']:.2f}")
    budget = model_bytes + args.experts * largest
    peak = max(r["peak_rss"] for r in runs["lors"])
    print(f"  peak RSS LoRS / (one model + one tensor per expert)  "
          f"{peak / budget:.2f}  (target <= ~1.5; model {model_bytes / 2**30:.2f} GiB)")
    print(f"  peak RSS {args.experts} experts / 2 experts  {peak / lors_two['peak_rss']:.2f}")
    if not args.skip_naive:
        naive = measure(workdir, "naive", args.experts)
        print(f"  LoRS / naive full-SVD LoRS               {lors['seconds'] / naive['seconds']:.3f}  (target <= 0.2)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
