"""Random Whisper weights of a real model's shapes, shared by the merge benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def whisper_shapes(config_kwargs: dict):
    """(WhisperConfig, {name: shape}) of every tensor but the tied output projection (read on
    the meta device: nothing is allocated)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(**config_kwargs)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in WhisperForConditionalGeneration(config).state_dict().items()
                  if n != "proj_out.weight"}
    return config, shapes


def random_base(config_kwargs: dict, seed: int = 0):
    """(WhisperConfig, {name: shape}, {name: tensor}): every tensor but the tied output
    projection, drawn N(0, 0.02^2) with a seeded generator (shapes read on the meta device)."""
    config, shapes = whisper_shapes(config_kwargs)
    g = torch.Generator().manual_seed(seed)
    return config, shapes, {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}


def _expert_tensor(base: torch.Tensor, name: str, g: torch.Generator) -> torch.Tensor:
    """base + dense noise + a rank-8 part per matrix (both of scale 1e-3), float32; the
    encoder's fixed sinusoidal position table is left as the base's, as fine-tuning leaves it."""
    if name == "model.encoder.embed_positions.weight":
        return base.float()
    delta = torch.randn(base.shape, generator=g).mul_(1e-3)
    if base.dim() == 2:
        delta.addmm_(torch.randn(base.shape[0], 8, generator=g),
                     torch.randn(8, base.shape[1], generator=g), alpha=1e-3)
    return delta.add_(base)


def _save(folder: Path, tensors_of, names: list[str], shapes: dict, dtype: torch.dtype,
          shard_bytes: int | None) -> None:
    """Write ``tensors_of(name)`` for every name as ``folder/model.safetensors``, or, with
    ``shard_bytes``, as Hugging Face shards of about that size plus their index; one shard's
    tensors are in memory at a time."""
    from safetensors.torch import save_file
    size = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        nbytes = shapes[name].numel() * size
        if shard_bytes and groups[-1] and filled + nbytes > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for file, group in zip(files, groups):
        save_file({n: tensors_of(n) for n in group}, folder / file, metadata={"format": "pt"})
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(shapes[n].numel() * size for n in names)},
                 "weight_map": {n: f for f, group in zip(files, groups) for n in group}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_random_experts(root, config_kwargs: dict, experts: int, *,
                         dtype: torch.dtype = torch.float32,
                         shard_bytes: int | None = None) -> dict:
    """Write ``root/base`` and ``root/e0..`` as HF Whisper folders stored in ``dtype`` (in
    safetensors shards of about ``shard_bytes`` when given): a random base and experts = base
    + dense noise + a rank-8 part per matrix (both of scale 1e-3); the encoder's fixed
    sinusoidal position table is left as the base's, as fine-tuning leaves it. Every tensor
    is drawn with a generator of its own (seeded by model and tensor), so a model is written
    one shard at a time whatever its size. Returns the base tensors (in ``dtype``)."""
    root = Path(root)
    config, shapes = whisper_shapes(config_kwargs)
    names = list(shapes)
    base: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        g = torch.Generator().manual_seed(index)
        base[name] = torch.randn(shapes[name], generator=g).mul_(0.02).to(dtype)
    for folder in ["base"] + [f"e{i}" for i in range(experts)]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(root / folder)
        if folder == "base":
            _save(root / folder, base.__getitem__, names, shapes, dtype, shard_bytes)
            continue
        expert = int(folder[1:])

        def tensor_of(name: str, expert: int = expert) -> torch.Tensor:
            g = torch.Generator().manual_seed((expert + 1) * 1_000_003 + names.index(name))
            return _expert_tensor(base[name], name, g).to(dtype)
        _save(root / folder, tensor_of, names, shapes, dtype, shard_bytes)
    return base
