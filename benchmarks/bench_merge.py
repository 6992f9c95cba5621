"""Merge speed and memory against the I/O floor, on Whisper-shaped models (random weights).

One run measures, on this machine:
  - the I/O floor: the simplest streaming loop with safetensors (for each tensor name: read
    the base's and every expert's copy, one accumulate, then write one output file, fsynced
    as lors fsyncs its output)
  - task arithmetic / floor                         (target <= 1.1, diagnostics off)
  - LoRS / task arithmetic, diagnostics off         (target <= 1.3)
  - LoRS / task arithmetic, diagnostics on          (target <= 1.5)
  - TIES / task arithmetic, diagnostics off         (target <= 2.0)
  - peak RSS TIES / peak RSS task arithmetic        (target <= 1.2)
  - peak RSS of each merge against the model size, the largest tensor and the runtime (a
    process that imports lors and merges nothing): memory must be bounded by a few tensors
    per expert plus the runtime, never by the model size.
  - LoRS's own CPU per matrix entry (randomized SVD, prune) on one thread, times the entries
    it prunes: the CPU LoRS must add to task arithmetic's, whatever the engine does
  - with --svd-niter-row N, also LoRS with N power iterations instead of 2 (fewer passes over
    each matrix: faster, and a different, less exact low-rank part)
  - with --device cuda, also task arithmetic, LoRS and TIES merged on the GPU (``lors merge
    --device cuda``: read on the CPU, merged on the GPU, written from the CPU) against the same
    merge on the CPU, the GPU's peak memory (a few tensors: the merge streams there too), and
    how close the GPU's merged LoRS and TIES are to the CPU's
Each merge (and the floor) runs in its own process, so its time and its peak resident memory
(VmHWM) are its own; times exclude interpreter start and imports. The machine is noisy, so
the runs alternate in rounds (floor, TA, LoRS, TIES, TA, LoRS with diagnostics) and each
ratio is the median over rounds of the ratio within a round (back-to-back runs).

    python benchmarks/bench_merge.py [--workdir DIR] [--experts 5] [--repeats 3]
    python benchmarks/bench_merge.py --shape large-v3 --dtype float16 --repeats 1
    python benchmarks/bench_merge.py --naive   # also the research-code LoRS (small only)
    python benchmarks/bench_merge.py --svd-niter-row 0
    python benchmarks/bench_merge.py --device cuda   # on a machine with a GPU

Models are written to --workdir (kept) or a temporary folder (removed at the end); large-v3
in float16 needs about 3.1 GB per model (6 models + one output: ~22 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from merge_baselines import run_floor, run_naive  # benchmarks/ is the script's own folder
from random_whisper import write_random_experts

SHAPES = {
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                  vocab_size=51865, num_mel_bins=80),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32,
                     encoder_attention_heads=20, decoder_attention_heads=20,
                     encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=51866,
                     num_mel_bins=128),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_BYTES = 2_000_000_000  # as lors (and HF) shard: large-v3 is two shards per model
TARGETS = {"ta/floor": 1.1, "lors/ta nodiag": 1.3, "lors/ta diag": 1.5, "ties/ta": 2.0,
           "ties/ta rss": 1.2}


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_lors(root: Path, method: str, experts: int, out: Path, diagnostics: bool,
             parameters: dict | None = None, device: str = "cpu") -> dict:
    from lors.merging import merge, validate_config
    cfg = validate_config({"base": str(root / "base"), "method": method,
                           "parameters": parameters or {},
                           "experts": [{"name": f"e{i}", "path": str(root / f"e{i}")}
                                       for i in range(experts)]})
    start = time.perf_counter()
    merge(cfg, out, force=True, diagnostics=diagnostics, device=device)
    return {"seconds": time.perf_counter() - start}


def child(args: argparse.Namespace) -> None:
    root, out = Path(args.workdir), Path(args.workdir) / f"out-{args.child.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)  # not timed: a merge into a fresh directory
    keep = args.child.endswith(":keep")  # the device comparison reads the merged model after
    if args.child != "runtime":
        import lors.merging  # noqa: F401  (imports are not counted in the CPU time either)
        import safetensors.torch  # noqa: F401
    usage = resource.getrusage(resource.RUSAGE_SELF)
    args.cpu_before = usage.ru_utime + usage.ru_stime
    if args.child == "runtime":  # what the interpreter, torch and lors hold before any merge
        import lors.merging  # noqa: F401
        result = {"seconds": 0.0}
    elif args.child == "floor":
        result = run_floor(root, args.experts, out)
    elif args.child == "naive":
        result = run_naive(root, args.experts, out)
    else:
        method, *flags = args.child.split(":")  # e.g. lors:nodiag:niter0
        parameters = {"svd": "exact"} if "exact" in flags else {}
        parameters.update({"svd_niter": int(f[5:]) for f in flags if f.startswith("niter")})
        device = "cuda" if "cuda" in flags else "cpu"
        if device == "cuda":  # CUDA's start-up is not the merge's time
            torch.zeros(1, device=device)
        result = run_lors(root, method, args.experts, out, diagnostics="nodiag" not in flags,
                          parameters=parameters, device=device)
        if device == "cuda":  # streamed: a few tensors on the GPU, never the model
            result["gpu_peak"] = torch.cuda.max_memory_allocated()
    result["peak_rss"] = peak_rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu"] = usage.ru_utime + usage.ru_stime - args.cpu_before
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    print("RESULT " + json.dumps(result))


def measure(args: argparse.Namespace, workdir: Path, what: str, experts: int) -> dict:
    """One run in a fresh process: its wall time and its own peak resident memory."""
    cmd = [sys.executable, __file__, "--workdir", str(workdir), "--experts", str(experts),
           "--child", what]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[7:])
    gpu = (f"  peak GPU memory {result['gpu_peak'] / 2**30:6.2f} GiB"
           if "gpu_peak" in result else "")
    print(f"  {what:<22} experts={experts}  {result['seconds']:8.2f} s  "
          f"(CPU {result['cpu']:6.2f} s)  peak RSS {result['peak_rss'] / 2**30:6.2f} GiB{gpu}",
          flush=True)
    return result


def matrix_entries(shape: dict) -> int:
    """Entries of the 2-D attention and FFN matrices LoRS prunes, per model."""
    d, enc, dec = shape["d_model"], shape["encoder_ffn_dim"], shape["decoder_ffn_dim"]
    return (shape["encoder_layers"] * (4 * d * d + 2 * d * enc)
            + shape["decoder_layers"] * (8 * d * d + 2 * d * dec))


def lors_step_costs(shape: dict, repeats: int = 5) -> dict[str, float]:
    """CPU seconds per matrix entry of LoRS's two steps on one FFN matrix, one torch thread
    (as each engine worker runs): the randomized SVD at the default rank (its 6 products with
    the matrix: sketch, 2 power iterations, projection) and the prune (residual, exact top-k,
    mask, adding L back). Medians over ``repeats``."""
    from lors.merging import primitives as P
    generator = torch.Generator().manual_seed(0)
    rows, cols = shape["encoder_ffn_dim"], shape["d_model"]
    spectrum = torch.arange(1, cols + 1, dtype=torch.float32) ** -0.5  # slowly decaying
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    matrix = ((u * spectrum) @ v.T).contiguous()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def cpu_time(step) -> float:
            times = []
            for _ in range(repeats):
                start = time.process_time()
                step()
                times.append(time.process_time() - start)
            return statistics.median(times) / matrix.numel()
        factors = P.truncated_svd(matrix, 7, generator=torch.Generator().manual_seed(1))
        return {"svd": cpu_time(lambda: P.truncated_svd(
                    matrix, 7, generator=torch.Generator().manual_seed(1))),
                "prune": cpu_time(lambda: P.lors_prune(matrix, 7, 0.2, factors=factors))}
    finally:
        torch.set_num_threads(previous)


def compare_devices(args: argparse.Namespace, workdir: Path, methods: list[str]) -> None:
    """Merge each method once on the CPU and once on the GPU and print how close the two
    merged models are: rounding differs between the devices, so a top-k may keep another
    entry at its threshold (the tests ask for 99.5 % of each tensor's entries within
    rtol 1e-4, atol 1e-5)."""
    from safetensors import safe_open
    print("\nGPU against CPU, merged models (entries within rtol 1e-4, atol 1e-5):")
    for method in methods:
        outs = {}
        for device in ("cpu", "cuda"):
            what = f"{method}:nodiag" + (":cuda" if device == "cuda" else "") + ":keep"
            measure(args, workdir, what, args.experts)
            outs[device] = workdir / f"out-{what.replace(':', '-')}"
        worst, worst_name, largest = 1.0, "", 0.0
        files = {device: [safe_open(f, "pt") for f in sorted(out.glob("*.safetensors"))]
                 for device, out in outs.items()}
        where = {device: {name: f for f in opened for name in f.keys()}
                 for device, opened in files.items()}
        for name, cpu_file in where["cpu"].items():
            expected = cpu_file.get_tensor(name).float()
            got = where["cuda"][name].get_tensor(name).float()
            close = torch.isclose(got, expected, rtol=1e-4, atol=1e-5).float().mean().item()
            largest = max(largest, (got - expected).abs().max().item())
            if close < worst:
                worst, worst_name = close, name
        del files, where
        print(f"  {method:<16} worst tensor {worst * 100:.3f} % close ({worst_name or 'all'}), "
              f"largest difference {largest:.2e}")
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def verdict(value: float, target: float) -> str:
    return f"(target <= {target}: {'met' if value <= target else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="storage dtype of the random models (and so of the merge)")
    parser.add_argument("--child")
    parser.add_argument("--naive", action="store_true",
                        help="also the research-code LoRS (whole models in memory; small only)")
    parser.add_argument("--no-ties", dest="ties", action="store_false")
    parser.add_argument("--no-diag-pair", dest="diag_pair", action="store_false",
                        help="skip the TA/LoRS pair with diagnostics on")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of back-to-back runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--svd-niter-row", type=int, metavar="N",
                        help="also LoRS with svd_niter N (fewer passes over each matrix; "
                             "a numerical change, the default is 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: also merge on the GPU and compare with the CPU's merge")
    args = parser.parse_args()
    if args.device == "cuda" and not args.child and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is "
                 "False); run it on a machine with a GPU, or drop --device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lors-bench-"))
    shape = SHAPES[args.shape]
    if not (workdir / f"e{args.experts - 1}" / "config.json").exists():
        print(f"writing {args.shape}-shaped base + {args.experts} experts ({args.dtype}) "
              f"to {workdir} ...", flush=True)
        start = time.perf_counter()
        write_random_experts(workdir, shape, args.experts, dtype=DTYPES[args.dtype],
                             shard_bytes=SHARD_BYTES)
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    size = model_bytes(workdir / "base")
    largest = shape["vocab_size"] * shape["d_model"] * 4  # the token embedding, float32
    print(f"{args.shape}, {args.dtype}, {args.experts} experts: model {size / 2**30:.2f} GiB, "
          f"largest tensor {largest / 2**20:.0f} MiB in float32; torch threads "
          f"{args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)
    runtime = measure(args, workdir, "runtime", args.experts)
    measure(args, workdir, "floor", args.experts)  # warms the page cache; not counted
    rounds = ["floor", "task_arithmetic:nodiag", "lors:nodiag"]
    rounds += ["ties:nodiag"] if args.ties else []
    rounds += ["task_arithmetic", "lors"] if args.diag_pair else []
    fewer_passes = f"lors:nodiag:niter{args.svd_niter_row}"
    rounds += [fewer_passes] if args.svd_niter_row is not None else []
    on_gpu = {m: f"{m}:nodiag:cuda" for m in ["task_arithmetic", "lors"]
              + (["ties"] if args.ties else [])} if args.device == "cuda" else {}
    rounds += list(on_gpu.values())
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for what in rounds:
            runs.setdefault(what, []).append(measure(args, workdir, what, args.experts))

    def ratios(top: str, bottom: str, key: str = "seconds") -> list[float]:
        return [a[key] / b[key] for a, b in zip(runs[top], runs[bottom])]

    def line(label: str, values: list[float], target: float | None = None,
             cpu: list[float] | None = None) -> None:
        listed = ", ".join(f"{v:.2f}" for v in values)
        median = statistics.median(values)
        print(f"  {label:<42} median {median:5.2f} over rounds [{listed}]  "
              + (verdict(median, target) if target else "")
              + (f"  CPU-time ratio {statistics.median(cpu):.2f}" if cpu else ""))

    print(f"\nresults ({args.shape}, {args.dtype}; same run, same machine)")
    floor = statistics.median(r["seconds"] for r in runs["floor"])
    print(f"  I/O floor: median {floor:.2f} s  (read {args.experts + 1} models of "
          f"{size / 2**30:.2f} GiB, one add each, write one file)")
    def pair(label: str, top: str, bottom: str, target: float | None = None) -> None:
        line(label, ratios(top, bottom), target, ratios(top, bottom, "cpu"))
    pair("task arithmetic / floor (diagnostics off)", "task_arithmetic:nodiag", "floor",
         TARGETS["ta/floor"])
    pair("LoRS / task arithmetic (diagnostics off)", "lors:nodiag", "task_arithmetic:nodiag",
         TARGETS["lors/ta nodiag"])
    if args.diag_pair:
        pair("LoRS / task arithmetic (diagnostics on)", "lors", "task_arithmetic",
             TARGETS["lors/ta diag"])
        pair("task arithmetic diagnostics on / off", "task_arithmetic", "task_arithmetic:nodiag")
    if args.svd_niter_row is not None:
        pair(f"LoRS svd_niter {args.svd_niter_row} / task arithmetic", fewer_passes,
             "task_arithmetic:nodiag")
    if args.ties:
        pair("TIES / task arithmetic (diagnostics off)", "ties:nodiag", "task_arithmetic:nodiag",
             TARGETS["ties/ta"])
        line("peak RSS TIES / task arithmetic", ratios("ties:nodiag", "task_arithmetic:nodiag",
                                                      "peak_rss"), TARGETS["ties/ta rss"])
    for method, gpu in on_gpu.items():
        pair(f"{method} on the GPU / on the CPU", gpu, f"{method}:nodiag")
    if on_gpu:
        compare_devices(args, workdir, [m for m in on_gpu if m != "task_arithmetic"])
    # Why LoRS / TA is where it is: its own steps' CPU, per entry, times the entries it prunes
    costs = lors_step_costs(shape)
    entries = matrix_entries(shape) * args.experts
    ta_cpu = statistics.median(r["cpu"] for r in runs["task_arithmetic:nodiag"])
    print(f"\nLoRS's own CPU (one thread, {entries / 1e6:.0f} M matrix entries of "
          f"{args.experts} experts): randomized SVD {costs['svd'] * 1e9:.1f} ns/entry = "
          f"{costs['svd'] * entries:.1f} s, prune {costs['prune'] * 1e9:.1f} ns/entry = "
          f"{costs['prune'] * entries:.1f} s; task arithmetic's whole merge {ta_cpu:.1f} s CPU: "
          f"LoRS / TA CPU >= {1 + (costs['svd'] + costs['prune']) * entries / ta_cpu:.2f} "
          "unless that work hides behind I/O")
    print(f"\nmemory: runtime (imports, no merge) {runtime['peak_rss'] / 2**30:.2f} GiB, "
          f"model {size / 2**30:.2f} GiB, largest tensor (float32) {largest / 2**20:.0f} MiB")
    for what, values in runs.items():
        peak = max(r["peak_rss"] for r in values)
        above = peak - runtime["peak_rss"]
        print(f"  {what:<24} peak RSS {peak / 2**30:5.2f} GiB = runtime + "
              f"{above / 2**30:5.2f} GiB = {above / size:4.2f} models = "
              f"{above / largest / (args.experts + 1):4.2f} largest tensors per input")
    if args.naive:
        naive = measure(args, workdir, "naive", args.experts)
        lors = min(r["seconds"] for r in runs["lors:nodiag"])
        print(f"  LoRS / naive full-SVD LoRS  {lors / naive['seconds']:.3f}  (target <= 0.2)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
