"""The per-tensor merge core: plan -> task vectors -> op -> lambda -> merged delta.

``lors merge`` (the streaming engine), the experiment's dev search (``TaskVectors``) and the
extensibility step all merge through these functions, so a search can never score a merge
that ``lors merge`` would not write: the same op per tensor, the same seeds, the same global
thresholds, the same lambda, the same finiteness checks.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, LorsWarning, MergeError
from .global_topk import GlobalThreshold
from .groups import GROUPS, group_of
from .methods import OPS, OpContext

COPY = "copy"  # the op of tensors that are not merged (integer buffers): the base's, as stored


@dataclass(frozen=True)
class PlanEntry:
    name: str
    group: str
    op: str  # an OPS key, or COPY


def plan_entries(meta: Mapping, group_ops: dict[str, str], params: dict
                 ) -> tuple[list[PlanEntry], dict[str, dict]]:
    """Every tensor of the base with its group and op, and per-group counts.

    ``meta`` maps names to objects with ``dtype`` and ``shape``. Raises ConfigError when a
    2-D-only op would meet a tensor of another shape; warns when a rank leaves some matrices
    unpruned (the rank-r part of a matrix with min(m, n) <= r is the whole matrix).
    """
    entries = []
    counts = {g: {"op": group_ops[g], "tensors": 0, "parameters": 0} for g in GROUPS}
    for name, info in meta.items():
        group = group_of(name)
        op = group_ops[group] if info.dtype.is_floating_point else COPY
        if op != COPY and OPS[op].matrix_only and len(info.shape) != 2:
            raise ConfigError(f"op {op!r} works on 2-D matrices, but group {group!r} has tensor "
                              f"{name} of shape {list(info.shape)}; choose another op for it")
        entries.append(PlanEntry(name, group, op))
        counts[group]["tensors"] += 1
        counts[group]["parameters"] += torch.Size(info.shape).numel()
    _warn_full_rank(entries, meta, params)
    return entries, counts


def _warn_full_rank(entries: list[PlanEntry], meta: Mapping, params: dict) -> None:
    if params.get("rank") is None:
        return
    low_rank = [e for e in entries if e.op in ("lors", "svd")]
    full = [e for e in low_rank if min(meta[e.name].shape) <= params["rank"]]
    if full:
        shape = "x".join(map(str, meta[full[0].name].shape))
        warnings.warn(f"rank {params['rank']} >= min(m, n) for {len(full)} of {len(low_rank)} "
                      f"pruned matrices (e.g. {full[0].name}, {shape}): their rank-r part is the "
                      "whole task vector, so nothing is pruned there", LorsWarning, stacklevel=3)


def read_float(checkpoint, who: str, name: str) -> Tensor:
    """Tensor ``name`` of ``checkpoint`` as float32; CheckpointError if it holds NaN or Inf."""
    tensor = checkpoint.read(name).float()
    # NaN and Inf propagate into the sum: one cheap pass instead of an isfinite mask.
    if not math.isfinite(float(tensor.sum())):
        raise CheckpointError(f"{who} ({checkpoint.source}): tensor {name} contains NaN or Inf; "
                              "fix or re-export that checkpoint")
    return tensor


def task_vectors(experts: Mapping, name: str, base_tensor: Tensor,
                 map: Callable = map) -> list[Tensor]:
    """tau_i = theta_i - theta_0 of tensor ``name`` for each expert checkpoint, float32."""
    def one(item) -> Tensor:
        expert, checkpoint = item
        return read_float(checkpoint, f"expert {expert!r}", name).sub_(base_tensor)
    return list(map(one, experts.items()))


def expert_generator(seed: int, expert: int, name: str) -> torch.Generator:
    """The generator of expert position ``expert`` on tensor ``name`` (DARE, SVD sketches)."""
    digest = hashlib.sha256(f"{seed}/{expert}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def lambda_for(op: str, params: dict) -> float:
    """The scale the core applies to ``op``'s combination: lambda, or 1 for unscaled ops."""
    return float(params["lambda"]) if OPS[op].lambda_scaled else 1.0


def combine(entry: PlanEntry, taus: Sequence[Tensor], weights: Sequence[float], params: dict, *,
            thresholds: Sequence[float] | None = None, map: Callable = map,
            svd_cache: dict | None = None) -> tuple[Tensor, dict]:
    """``entry.op``'s combination of ``taus`` before lambda, and what the op recorded.

    Never returns one of the inputs, so the caller may scale it in place.
    """
    spec = OPS[entry.op]
    ctx = OpContext(entry.name, list(weights), params,
                    lambda i: expert_generator(params["seed"], i, entry.name),
                    thresholds if spec.global_scope else None, map=map, svd_cache=svd_cache)
    return spec.combine(taus, ctx), ctx.stats


def merged_delta(entry: PlanEntry, taus: Sequence[Tensor], weights: Sequence[float],
                 params: dict, **options) -> tuple[Tensor, dict]:
    """The delta ``lors merge`` adds to the base tensor: lambda * combination (see
    :func:`combine` for ``options``), and the op's records."""
    combined, stats = combine(entry, taus, weights, params, **options)
    return combined.mul_(lambda_for(entry.op, params)), stats


def check_finite(tensor: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """``tensor`` unchanged; MergeError if the merge made it NaN or Inf (before writing)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"merged tensor {name} contains NaN or Inf in "
                         f"{str(dtype).removeprefix('torch.')}: lambda or the weights are too "
                         "large for this dtype (or an input overflowed); lower them or use "
                         "--dtype float32. Nothing was written")
    return tensor


def global_thresholds(entries: Sequence[PlanEntry], params: dict, experts: int,
                      taus_of: Callable[[str], list[Tensor]]) -> list[float] | None:
    """Per-expert k-th largest |tau| over all tensors of global-scope ops (``scope: global``),
    k = floor(keep * their total size); ``taus_of(name)`` gives the task vectors of a tensor
    (read twice: two exact radix passes)."""
    if params.get("scope") != "global":
        return None
    names = [e.name for e in entries if e.op != COPY and OPS[e.op].global_scope]
    if not names:
        return None
    accumulators = [GlobalThreshold() for _ in range(experts)]
    for step in (GlobalThreshold.first_pass, GlobalThreshold.second_pass):
        for name in names:
            for accumulator, tau in zip(accumulators, taus_of(name)):
                step(accumulator, tau)
        if step is GlobalThreshold.first_pass:
            for accumulator in accumulators:
                accumulator.choose_bucket(params["keep"])
    return [accumulator.value() for accumulator in accumulators]
