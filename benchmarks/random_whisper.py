"""Random Whisper weights of a real model's shapes, shared by the merge benchmarks."""

from __future__ import annotations

import torch


def random_base(config_kwargs: dict, seed: int = 0):
    """(WhisperConfig, {name: shape}, {name: tensor}): every tensor but the tied output
    projection, drawn N(0, 0.02^2) with a seeded generator (shapes read on the meta device)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(**config_kwargs)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in WhisperForConditionalGeneration(config).state_dict().items()
                  if n != "proj_out.weight"}
    g = torch.Generator().manual_seed(seed)
    return config, shapes, {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}


def write_random_experts(root, config_kwargs: dict, experts: int) -> dict:
    """Write ``root/base`` and ``root/e0..`` as HF Whisper folders: a random base and experts
    = base + dense noise + a rank-8 part per matrix (both of scale 1e-3); the encoder's fixed
    sinusoidal position table is left as the base's, as fine-tuning leaves it. Returns the
    base tensors."""
    from pathlib import Path

    from safetensors.torch import save_file
    root = Path(root)
    config, _, base = random_base(config_kwargs)
    g = torch.Generator().manual_seed(1)  # the experts' draws
    for folder, tensors in [("base", base)] + [(f"e{i}", None) for i in range(experts)]:
        if tensors is None:
            tensors = {}
            for n, b in base.items():
                delta = torch.randn(b.shape, generator=g) * 1e-3
                if b.dim() == 2 and "embed_positions" not in n:
                    delta += (torch.randn(b.shape[0], 8, generator=g)
                              @ torch.randn(8, b.shape[1], generator=g)) * 1e-3
                tensors[n] = b + (0 if n == "model.encoder.embed_positions.weight" else delta)
        (root / folder).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / folder / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(root / folder)
        del tensors
    return base
