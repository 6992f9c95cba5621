"""LoRA and compressed experts on Whisper-base-shaped random weights: speed and size.

Prints, measured in one run on this machine:
  - LoRS merge of K LoRA adapters / the same adapters pre-merged into full checkpoints:
    seconds each and the speed-up (target >= 3), and the largest output difference
  - lors compress of K full experts: seconds; compressed file size / full checkpoint size
  - LoRS merge from the compressed experts / from the full experts (same settings): seconds,
    speed-up, and the largest output difference (the merges are equal)

    python benchmarks/bench_lora.py [--workdir DIR] [--experts 3] [--lora-rank 8] [--rank 8]
                                    [--repeats 3] [--no-diagnostics]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from random_whisper import random_base  # benchmarks/ is the script's own folder
from safetensors.torch import load_file, save_file

BASE = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
            decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
            vocab_size=51865, num_mel_bins=80)
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # as lors train --mode lora
FROZEN = "model.encoder.embed_positions.weight"


def save_model(folder: Path, tensors: dict, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    return folder


def make_models(root: Path, experts: int, lora_rank: int) -> dict:
    """A random Whisper-base base; K LoRA adapters on every attention/FFN matrix and each
    pre-merged into a full checkpoint (base + scale * B @ A, as merge_and_unload gives);
    K full experts with full-rank task vectors (rank-16 part + dense noise)."""
    config, shapes, base = random_base(BASE)
    g = torch.Generator().manual_seed(1)  # the experts' draws
    paths = {"base": save_model(root / "base", base, config), "lora": [], "premerged": [],
             "full": []}
    alpha = 2.0 * lora_rank
    for i in range(experts):
        factors, merged = {}, dict(base)
        for name, weight in base.items():
            if weight.dim() == 2 and name.rsplit(".", 2)[-2] in TARGETS:
                a = torch.randn(lora_rank, weight.shape[1], generator=g) * 0.01
                b = torch.randn(weight.shape[0], lora_rank, generator=g) * 0.01
                module = name.removesuffix(".weight")
                factors[f"base_model.model.{module}.lora_A.weight"] = a
                factors[f"base_model.model.{module}.lora_B.weight"] = b
                merged[name] = weight + (alpha / lora_rank) * (b @ a)
        adapter = root / f"lora{i}"
        adapter.mkdir()
        save_file(factors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": lora_rank, "lora_alpha": alpha,
            "target_modules": list(TARGETS), "base_model_name_or_path": str(root / "base")}))
        paths["lora"].append(adapter)
        paths["premerged"].append(save_model(root / f"premerged{i}", merged, config))
        full = {}
        for name, weight in base.items():
            delta = torch.randn(weight.shape, generator=g) * 1e-3
            if weight.dim() == 2:
                delta += (torch.randn(weight.shape[0], 16, generator=g)
                          @ torch.randn(16, weight.shape[1], generator=g)) * 1e-3
            full[name] = weight if name == FROZEN else weight + delta
        paths["full"].append(save_model(root / f"full{i}", full, config))
    return paths


def timed_merge(base: Path, experts: list, out: Path, diagnostics: bool, **parameters) -> float:
    from lors.merging import merge, validate_config
    config = validate_config({
        "base": str(base), "method": "lors", "parameters": parameters,
        "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)]})
    start = time.perf_counter()
    merge(config, out, force=True, diagnostics=diagnostics)
    return time.perf_counter() - start


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    """The best of ``repeats`` interleaved timings of each run (a shared machine's load
    varies from one run to the next; interleaving exposes every run to it alike)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: min(values) for name, values in times.items()}


def largest_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((x[n] - y[n]).abs().max()) for n in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--lora-rank", dest="lora_rank", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="LoRS rank r of the merges")
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per merge (best)")
    parser.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                        help="skip the merge diagnostics (lors merge computes them by default)")
    args = parser.parse_args()
    from lors.merging.compress import compress
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    paths = make_models(root, args.experts, args.lora_rank)
    print(f"models: Whisper-base shapes (random), {args.experts} experts, LoRA rank "
          f"{args.lora_rank} on {', '.join(TARGETS)}; made in {time.perf_counter() - started:.0f} s")
    settings = {"rank": args.rank, "keep": args.keep}
    what = "with" if args.diagnostics else "without"
    print(f"LoRS rank {args.rank}, keep {args.keep}, {what} diagnostics; best of "
          f"{args.repeats} interleaved runs")

    def merge_of(kind: str, experts: list):
        return lambda: timed_merge(paths["base"], experts, root / f"out-{kind}",
                                   args.diagnostics, **settings)
    times = best_times({"lora": merge_of("lora", paths["lora"]),
                        "premerged": merge_of("premerged", paths["premerged"])}, args.repeats)
    print(f"merge of {args.experts} LoRA adapters {times['lora']:.1f} s, of the same pre-merged "
          f"into full checkpoints {times['premerged']:.1f} s: "
          f"{times['premerged'] / times['lora']:.1f}x faster (target >= 3); largest difference "
          f"{largest_difference(root / 'out-lora', root / 'out-premerged'):.2e}")

    start = time.perf_counter()
    compressed = [compress(str(paths["base"]), str(p), root / f"full{i}.safetensors",
                           **settings)["out"] for i, p in enumerate(paths["full"])]
    seconds = time.perf_counter() - start
    small = sum(Path(p).stat().st_size for p in compressed)
    large = sum((p / "model.safetensors").stat().st_size for p in paths["full"])
    print(f"lors compress: {seconds / args.experts:.1f} s per expert; {small / 1e6:.0f} MB "
          f"compressed vs {large / 1e6:.0f} MB full checkpoints ({small / large:.1%})")
    times = best_times({"full": merge_of("full", paths["full"]),
                        "compressed": merge_of("compressed", compressed)}, args.repeats)
    print(f"merge from the compressed experts {times['compressed']:.1f} s, from the full "
          f"experts {times['full']:.1f} s: {times['full'] / times['compressed']:.1f}x faster; "
          "largest difference "
          f"{largest_difference(root / 'out-full', root / 'out-compressed'):.2e}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
