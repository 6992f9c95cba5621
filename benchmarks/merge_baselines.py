"""What bench_merge.py measures lors' merges against: the I/O floor (the simplest streaming
loop that reads every input tensor and writes one file) and LoRS as research code writes it
(whole models in memory, full SVD, sort-based top-k)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def model_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (single file or HF shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return {n: folder / "model.safetensors" for n in handle.keys()}


def run_floor(root: Path, experts: int, out: Path) -> dict:
    """The I/O floor: read every input tensor, one accumulate per expert, write one file."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import save_file
    start = time.perf_counter()
    with ExitStack() as stack:
        models = []
        for folder in ["base"] + [f"e{i}" for i in range(experts)]:
            files = model_files(root / folder)
            handles = {f: stack.enter_context(safe_open(f, framework="pt"))
                       for f in set(files.values())}
            models.append({n: handles[f] for n, f in files.items()})
        merged = {}
        for name, handle in models[0].items():
            total = handle.get_tensor(name)
            for model in models[1:]:
                total += model[name].get_tensor(name)
            merged[name] = total
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    with open(out / "model.safetensors", "rb") as handle:
        os.fsync(handle.fileno())
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
