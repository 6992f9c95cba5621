"""The per-tensor merge core: plan -> task vectors -> op -> lambda -> (calibration) -> delta.

``lors merge`` (the streaming engine), the experiment's dev search (``TaskVectors``) and the
extensibility step all merge through these functions, so a search can never score a merge
that ``lors merge`` would not write: the same op per tensor, the same seeds, the same global
thresholds, the same lambda, the same finiteness checks.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, LorsWarning, MergeError
from . import primitives as P
from .global_topk import GlobalThreshold
from .groups import GROUPS, MATRIX_GROUPS, group_of
from .context import Known, OpContext, lors_settings
from .methods import OPS

_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.")
COPY = "copy"  # the op of tensors that are not merged (integer buffers): the base's, as stored


@dataclass(frozen=True)
class PlanEntry:
    name: str
    group: str
    op: str  # an OPS key, or COPY
    block: tuple[str, str] | None = None  # ("encoder" | "decoder", "lower" | "upper") of a layer


def blocks_of(names) -> dict[str, tuple[str, str]]:
    """(side, half) of every tensor inside an encoder or decoder layer: layers below half of
    that side's layer count are "lower", the rest "upper" (layer 2 of 4 is upper)."""
    layers = {name: (m.group(1), int(m.group(2))) for name in names
              if (m := _LAYER.match(name))}
    counts: dict[str, int] = {}
    for side, index in layers.values():
        counts[side] = max(counts.get(side, 0), index + 1)
    return {name: (side, "lower" if index < counts[side] / 2 else "upper")
            for name, (side, index) in layers.items()}


def lambda_for(entry: PlanEntry, params: dict) -> float:
    """The scale the core applies to ``entry``'s combination: 1 for ops lambda does not
    scale; else the most specific of ``params["lambdas"]`` (``GROUP.HALF``, ``GROUP``,
    ``SIDE.HALF``, ``SIDE``; see :func:`lors.merging.config.lambda_selectors`) that matches
    the tensor, else ``params["lambda"]``."""
    if not OPS[entry.op].lambda_scaled:
        return 1.0
    lambdas = params.get("lambdas") or {}
    keys = [entry.group]
    if entry.block is not None:
        side, half = entry.block
        keys = [f"{entry.group}.{half}", entry.group, f"{side}.{half}", side]
    for key in keys:
        if key in lambdas:
            return float(lambdas[key])
    return float(params["lambda"])


def plan_entries(meta: Mapping, group_ops: dict[str, str], params: dict
                 ) -> tuple[list[PlanEntry], dict[str, dict]]:
    """Every tensor of the base with its group and op, and per-group counts.

    ``meta`` maps names to objects with ``dtype`` and ``shape``. Raises ConfigError when a
    2-D-only op would meet a tensor of another shape; warns when a rank leaves some matrices
    unpruned (the rank-r part of a matrix with min(m, n) <= r is the whole matrix).
    """
    entries = []
    blocks = blocks_of(meta)
    counts = {g: {"op": group_ops[g], "tensors": 0, "parameters": 0} for g in GROUPS}
    for name, info in meta.items():
        group = group_of(name)
        op = group_ops[group] if info.dtype.is_floating_point else COPY
        if op != COPY and OPS[op].matrix_only and len(info.shape) != 2:
            raise ConfigError(f"op {op!r} works on 2-D matrices, but group {group!r} has tensor "
                              f"{name} of shape {list(info.shape)}; choose another op for it")
        entries.append(PlanEntry(name, group, op, blocks.get(name)))
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


def read_float(checkpoint, who: str, name: str, check: bool = True, buffers=None) -> Tensor:
    """Tensor ``name`` of ``checkpoint`` as float32; CheckpointError if it holds NaN or Inf
    (``check``; without it, the caller checks what it makes of the tensor instead, see
    :func:`check_inputs`). ``buffers`` (:class:`lors.merging.buffers.Buffers`): read into
    reused memory."""
    tensor = _read(checkpoint, name, buffers)
    if tensor.dtype != torch.float32 and buffers is not None:
        wide = buffers.empty(tensor.shape, torch.float32).copy_(tensor)
        buffers.give(tensor)
        tensor = wide
    tensor = tensor.float()
    # NaN and Inf propagate into the sum: one cheap pass instead of an isfinite mask.
    if check and not math.isfinite(float(tensor.sum())):
        raise CheckpointError(f"{who} ({checkpoint.source}): tensor {name} contains NaN or Inf; "
                              "fix or re-export that checkpoint")
    return tensor


def _read(checkpoint, name: str, buffers=None) -> Tensor:
    if buffers is None:
        return checkpoint.read(name)
    meta = checkpoint.meta[name]
    return checkpoint.read(name, out=buffers.empty(meta.shape, meta.dtype))


def task_vectors(experts: Mapping, name: str, base_tensor: Tensor,
                 map: Callable = map, check: bool = True, buffers=None) -> list[Tensor]:
    """tau_i = theta_i - theta_0 of tensor ``name`` for each expert, float32: read minus
    base for a checkpoint (CheckpointError if the read tensor holds NaN or Inf, with
    ``check``; read into reused memory with ``buffers``); the expert's own exact delta for
    a LoRA adapter or a compressed expert (anything with ``delta(name, base_tensor)``,
    which checks its parts for NaN and Inf itself; see lors.checkpoint.experts)."""
    def one(item) -> Tensor:
        expert, source = item
        if hasattr(source, "delta"):
            return source.delta(name, base_tensor)
        if check:
            return read_float(source, f"expert {expert!r}", name,
                              buffers=buffers).sub_(base_tensor)
        stored = _read(source, name, buffers)
        if stored.dtype not in (torch.float16, torch.bfloat16):
            return stored.float().sub_(base_tensor)
        # widened as it is subtracted: one pass, the same values as widening first
        if buffers is None:
            return torch.sub(stored, base_tensor)
        tau = torch.sub(stored, base_tensor, out=buffers.empty(stored.shape, torch.float32))
        buffers.give(stored)
        return tau
    return list(map(one, experts.items()))


def check_inputs(base, experts: Mapping, name: str) -> None:
    """Read tensor ``name`` of the base and of every expert again, checked: raises the
    CheckpointError of :func:`read_float` (or of an expert's own ``delta``) for the first
    that holds NaN or Inf; returns when all are finite. The engine merges unchecked reads
    and calls this only when a merged tensor is not finite (or the op failed), so that the
    error names the input at fault rather than the merge."""
    task_vectors(experts, name, read_float(base, "base", name), check=True)


# Ops whose merged tensor does not depend on the task vectors' values, so that a NaN or Inf
# in an input would not reach it: the engine checks their inputs as it reads them. Every
# other op carries a NaN or Inf of its inputs into its result (or fails on it), and the
# engine checks its merged tensor instead (:func:`check_inputs` then names the input).
BLIND_OPS = frozenset({"keep_base"})


def known_parts(experts: Mapping, name: str) -> list[Known | None] | None:
    """What each expert states about its task vector of ``name`` beyond its values: its
    exact factors (``factors(name)``, a LoRA adapter) or the LoRS settings it is already
    pruned with (``pruned_with(name)``, a compressed expert); see :class:`Known`. None when
    no expert states anything (full checkpoints never do)."""
    known = []
    for source in experts.values():
        factors = source.factors(name) if hasattr(source, "factors") else None
        pruned = source.pruned_with(name) if hasattr(source, "pruned_with") else None
        known.append(None if factors is None and pruned is None else Known(factors, pruned))
    return known if any(k is not None for k in known) else None


def expert_generator(seed: int, expert: int | str, name: str) -> torch.Generator:
    """The generator of expert position ``expert`` on tensor ``name`` (DARE's masks), or,
    with ``expert`` = "sketch", of the randomized SVD's sketch shared by all experts."""
    digest = hashlib.sha256(f"{seed}/{expert}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class Combination(NamedTuple):
    """An op's merge of one tensor before lambda: the delta is scale * scaled + fixed.

    ``fixed`` is the part lambda never scales (CART's weight average); None for most ops.
    Neither is ever one of the inputs, so :meth:`delta` may work in place.
    """

    scaled: Tensor
    fixed: Tensor | None = None

    def delta(self, scale: float, inplace: bool = False) -> Tensor:
        """scale * scaled + fixed; ``inplace`` reuses ``scaled`` (the engine, used once)."""
        value = self.scaled.mul_(scale) if inplace else self.scaled * scale
        return value if self.fixed is None else value.add_(self.fixed)


def combine(entry: PlanEntry, taus: Sequence[Tensor], weights: Sequence[float], params: dict, *,
            thresholds: Sequence[float] | None = None, map: Callable = map,
            svd_cache: dict | None = None, known: Sequence[Known | None] | None = None,
            release_taus: bool = False, workspace=None) -> tuple[Combination, dict]:
    """``entry.op``'s combination of ``taus`` before lambda, and what the op recorded;
    ``known`` is what the experts state about their task vectors (:func:`known_parts`).
    ``release_taus``: ``taus`` is a list read for this combination only, from which an op
    may drop each task vector once it is merged (freed early; the same result).
    ``workspace``: reused memory for the op's temporaries (see :class:`OpContext`)."""
    spec = OPS[entry.op]
    ctx = _context(entry, weights, params, thresholds if spec.global_scope else None,
                   map=map, svd_cache=svd_cache, known=known, release_taus=release_taus,
                   workspace=workspace)
    combined = spec.combine(taus, ctx)
    return (Combination(*combined) if spec.split else Combination(combined)), ctx.stats


def _context(entry: PlanEntry, weights: Sequence[float], params: dict,
             thresholds: Sequence[float] | None = None, **options) -> OpContext:
    seed = params["seed"]
    return OpContext(entry.name, list(weights), params,
                     lambda i: expert_generator(seed, i, entry.name), thresholds,
                     sketch_for=lambda: expert_generator(seed, "sketch", entry.name), **options)


def lors_parts(entry: PlanEntry, tau: Tensor, params: dict, known: Known | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One expert's LoRS pruning of matrix ``entry`` exactly as ``lors merge`` prunes it
    (the same factors, sketch and top-k), split as ``lors compress`` stores it:
    (U_r diag(S_r) [m,r], V_r^T [r,n], flat row-major indices of the kept residual entries,
    their values). L + R_kept = scaled_u @ vh plus the values at those indices
    (:func:`lors.checkpoint.compressed.lors_join`). Indices are int32 when numel < 2**31;
    a task vector of known rank <= r has no residual (no index, no value)."""
    ctx = _context(entry, [1.0], params, known=[known])
    u, s, vh = ctx.factors(0, tau)
    scaled_u, vh = (u * s).contiguous(), vh.contiguous()
    index_dtype = torch.int32 if tau.numel() < 2**31 else torch.int64
    if ctx.is_low_rank(0, tau.shape):
        return scaled_u, vh, torch.zeros(0, dtype=index_dtype), torch.zeros(0)
    # the same operations as primitives.lors_prune: R = tau - L, then its top-k by magnitude
    residual = torch.addmm(tau, scaled_u, vh, alpha=-1.0)
    index = P.magnitude_mask(residual, params["keep"]).reshape(-1).nonzero().squeeze(1)
    return scaled_u, vh, index.to(index_dtype), residual.reshape(-1)[index]


def warn_repruned(experts: Mapping, entries: Sequence[PlanEntry], meta: Mapping,
                  params: dict) -> None:
    """Warn for each compressed expert (one with ``settings``, its LoRS settings) whose
    matrices this merge prunes with LoRS at other settings: LoRS then prunes its
    decompressed task vector L + R_kept again, not the expert's original task vector."""
    for name, source in experts.items():
        stored = getattr(source, "settings", None)
        if stored is None:
            continue
        differing = [e.name for e in entries if e.op == "lors"
                     and lors_settings(params, meta[e.name].shape) != stored]
        if differing:
            ours = lors_settings(params, meta[differing[0]].shape)
            warnings.warn(
                f"expert {name!r} ({source.source}) is compressed with LoRS {stored}, but this "
                f"merge prunes {len(differing)} matrices with {ours}: they get LoRS of its "
                "decompressed task vector L + R_kept, which is not LoRS of the original task "
                "vector; compress the expert again with this merge's settings, or merge the "
                "full expert", LorsWarning, stacklevel=3)


def calibrates(entry: PlanEntry, params: dict, shape: Sequence[int]) -> bool:
    """Whether the merged delta of ``entry`` is calibrated: ``calibrate`` is set and the
    tensor is a 2-D attention/FFN matrix (biases, norms and embeddings never are)."""
    return (params.get("calibrate") is not None and entry.op != COPY
            and entry.group in MATRIX_GROUPS and len(shape) == 2)


def finish(entry: PlanEntry, combination: Combination, scale: float, taus: Sequence[Tensor],
           weights: Sequence[float], params: dict, inplace: bool = False) -> Tensor:
    """The delta added to the base tensor: scale * scaled + fixed, then the calibration
    post-step on a calibrated matrix (:func:`calibrates`): SVC against the experts' weighted
    task vectors w_i tau_i with alpha = ``svc_alpha``, on the final, lambda-scaled delta. The
    engine and the search both finish here, so they agree for every lambda."""
    delta = combination.delta(scale, inplace=inplace)
    if calibrates(entry, params, delta.shape):
        if params["calibrate"] != "svc":
            raise ConfigError(f"unknown calibration {params['calibrate']!r}; choices: svc")
        delta = P.svc_calibrate(delta, [w * t for t, w in zip(taus, weights)],
                                params["svc_alpha"])
    return delta


def merged_delta(entry: PlanEntry, taus: Sequence[Tensor], weights: Sequence[float],
                 params: dict, **options) -> tuple[Tensor, dict]:
    """The delta ``lors merge`` adds to the base tensor: lambda * scaled part + unscaled part
    of the combination (see :func:`combine` for ``options``), calibrated when asked (see
    :func:`finish`), and the op's records."""
    combination, stats = combine(entry, taus, weights, params, **options)
    return finish(entry, combination, lambda_for(entry, params), taus, weights, params,
                  inplace=True), stats


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of a floating ``tensor`` is finite. One sum (NaN and Inf
    propagate into it, several times cheaper than an isfinite mask); only when the sum is
    not finite (a NaN or Inf entry, or a sum that overflowed) the exact elementwise check."""
    wide = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
    return (math.isfinite(float(tensor.sum(dtype=wide)))
            or bool(torch.isfinite(tensor).all()))


def check_finite(tensor: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """``tensor`` unchanged; MergeError if the merge made it NaN or Inf (before writing)."""
    if tensor.is_floating_point() and not all_finite(tensor):
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
