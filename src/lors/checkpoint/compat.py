"""Checks that every expert fits the base, run before any heavy work.

What is checked: the architecture fields of the configs; identical tensor names, shapes and
floating-point-ness; frozen tables (the encoder position table) equal to the base's, which
proves an expert was fine-tuned from this base and not from another checkpoint.
"""

from __future__ import annotations

import torch

from ..errors import CompatibilityError
from ..merging.groups import FROZEN_TENSORS
from .reader import Checkpoint

ARCHITECTURE_FIELDS = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins",
    "vocab_size", "max_source_positions", "max_target_positions",
)


def check_experts(base: Checkpoint, experts: dict[str, Checkpoint]) -> None:
    """Raise CompatibilityError naming the expert, file and tensor at the first mismatch."""
    for name, expert in experts.items():
        _check_config(base, name, expert)
        _check_tensors(base, name, expert)
    for name, expert in experts.items():
        _check_same_base(base, name, expert)


def _check_config(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    for key in ARCHITECTURE_FIELDS:
        ours, theirs = base.config.get(key), expert.config.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): config {key} = {theirs}, base "
                f"({base.source}) has {ours}; experts must share the base's architecture "
                "(a different model size, mel bins or vocabulary cannot be merged)")


def _check_tensors(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    missing = sorted(set(base.meta) - set(expert.meta))
    extra = sorted(set(expert.meta) - set(base.meta))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
        raise CompatibilityError(f"expert {name!r} ({expert.source}) " + " and ".join(parts)
                                 + "; was it saved from the same Whisper architecture?")
    for tensor, meta in base.meta.items():
        other = expert.meta[tensor]
        if other.shape != meta.shape:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): tensor {tensor} has shape "
                f"{list(other.shape)}, base has {list(meta.shape)}")
        if other.dtype.is_floating_point != meta.dtype.is_floating_point:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): tensor {tensor} is {other.dtype}, "
                f"base has {meta.dtype}")


def _check_same_base(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    for tensor in FROZEN_TENSORS:
        if tensor not in base.meta:
            continue
        ours = base.read(tensor).float()
        theirs = expert.read(tensor).float()
        # Stored precision differs between fp16/fp32 copies; anything beyond that is foreign.
        tolerance = 1e-3 * max(1.0, float(ours.abs().max()))
        if not torch.allclose(ours, theirs, atol=tolerance, rtol=0):
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): its frozen tensor {tensor} differs from "
                f"the base's (max difference {float((ours - theirs).abs().max()):.3g}); the "
                "expert was not fine-tuned from this base. Merge only experts trained from "
                f"{base.source}")
