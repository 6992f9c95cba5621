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
