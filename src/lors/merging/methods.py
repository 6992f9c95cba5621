"""The merge methods: a registry from method name to per-tensor operation and group policy.

Every task-vector method is one "sparsify -> (elect) -> combine" pass over the experts' task
vectors of a single tensor (:func:`sparsify_elect_combine`); TSV and Iso-C combine whole
matrices instead. An op returns the merged delta, already scaled by lambda; the engine adds it
to the base tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import primitives as P
from .groups import MATRIX_GROUPS


@dataclass
class OpContext:
    """What an op may know about the tensor it merges (never the file it came from)."""

    name: str
    weights: Sequence[float]
    params: dict
    generator_for: Callable[[int], torch.Generator]  # a seeded generator per expert and tensor
    thresholds: Sequence[float] | None = None        # global top-k thresholds, one per expert
    stats: dict = field(default_factory=dict)        # per-expert diagnostics the op records
    map: Callable = map                              # the engine passes a thread pool's map
    svd_cache: dict | None = None                    # (tensor, expert) -> factors, for searches

    def record(self, key: str, expert: int, value: float) -> None:
        """Store one expert's diagnostic (safe from worker threads: one slot per expert)."""
        self.stats.setdefault(key, [None] * len(self.weights))[expert] = value

    def rank_for(self, shape: tuple[int, ...]) -> int:
        ratio = self.params.get("rank_ratio")
        if ratio is not None:
            return max(1, round(ratio * min(shape)))
        return int(self.params["rank"])

    def factors(self, expert: int, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The top-r singular triplets of ``tau`` (r from :meth:`rank_for`).

        With ``svd_cache`` (a hyper-parameter search), each (tensor, expert) is decomposed
        once, at the largest rank asked for so far, and smaller ranks are its leading
        triplets: a search over ranks costs one decomposition, not one per rank.
        """
        rank = self.rank_for(tau.shape)
        if self.svd_cache is None:
            return P.truncated_svd(tau, rank, **self.svd_options(expert))
        key = (self.name, expert)
        cached = self.svd_cache.get(key)
        if cached is None or cached[1].numel() < min(rank, *tau.shape):
            cached = P.truncated_svd(tau, rank, **self.svd_options(expert))
            self.svd_cache[key] = cached
        u, s, vh = cached
        return u[:, :rank], s[:rank], vh[:rank]

    def svd_options(self, expert: int) -> dict:
        return {"exact": self.params["svd"] == "exact", "oversample": self.params["svd_oversample"],
                "niter": self.params["svd_niter"], "generator": self.generator_for(expert)}


Sparsify = Callable[[int, Tensor, OpContext], Tensor]


def sparsify_elect_combine(taus: Sequence[Tensor], ctx: OpContext, sparsify: Sparsify | None,
                           elect: bool, scale: float) -> Tensor:
    """scale * combine_i(w_i * sparsify(tau_i)); combine = sum, or TIES' elected disjoint mean.

    The inputs are never modified. With elect, the sign is elected on the weighted values, so
    an expert's weight is also its say in the election.
    """
    # Experts are pruned independently, so the engine's workers may prune them concurrently.
    parts = (ctx.map(lambda item: sparsify(item[0], item[1], ctx), enumerate(taus))
             if sparsify else iter(taus))
    if elect:
        stacked = torch.stack(list(parts))
        stacked *= torch.tensor(list(ctx.weights)).reshape(-1, *([1] * (stacked.dim() - 1)))
        return P.disjoint_mean(stacked, P.elect_sign(stacked)).mul_(scale)
    merged = None
    for part, tau, weight in zip(parts, taus, ctx.weights):
        if merged is None:  # the first part becomes the accumulator; never an input tensor
            merged = part * (weight * scale) if part is tau else part.mul_(weight * scale)
        else:
            merged.add_(part, alpha=weight * scale)
    return merged


def _magnitude(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    if ctx.thresholds is not None:  # global scope: one threshold per expert for the whole model
        return tau * (tau.abs() >= ctx.thresholds[i])
    return P.magnitude_prune(tau, ctx.params["keep"])


def _low_rank(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    u, s, vh = ctx.factors(i, tau)
    _record_energy(ctx, i, s, tau)
    return (u * s) @ vh


def _lors(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    u, s, vh = ctx.factors(i, tau)
    scaled_u = u * s
    residual = torch.addmm(tau, scaled_u, vh, alpha=-1.0)  # R = tau - L in one pass
    kept = P.magnitude_mask(residual, ctx.params["keep"])
    P.zero_outside_(residual, kept).addmm_(scaled_u, vh)   # R_kept + L, L never materialised
    _record_energy(ctx, i, s, tau)
    ctx.record("residual_density", i, int(np.count_nonzero(kept.numpy())) / max(1, tau.numel()))
    return residual


def _record_energy(ctx: OpContext, expert: int, singular_values: Tensor, tau: Tensor) -> None:
    # ||L||_F^2 = sum of its squared singular values: no pass over the matrix needed.
    flat = tau.reshape(-1)
    total = float(torch.dot(flat, flat))
    kept = float(singular_values.square().sum())
    ctx.record("energy_kept_low_rank", expert, kept / total if total > 0 else 1.0)


def _dare(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    return P.dare_drop(tau, ctx.params["keep"], ctx.generator_for(i))


def op_task_arithmetic(taus, ctx):
    return sparsify_elect_combine(taus, ctx, None, False, ctx.params["lambda"])


def op_average(taus, ctx):
    return sparsify_elect_combine(taus, ctx, None, False, 1.0 / sum(ctx.weights))


def op_magnitude(taus, ctx):
    return sparsify_elect_combine(taus, ctx, _magnitude, False, ctx.params["lambda"])


def op_svd(taus, ctx):
    return sparsify_elect_combine(taus, ctx, _low_rank, False, ctx.params["lambda"])


def op_lors(taus, ctx):
    return sparsify_elect_combine(taus, ctx, _lors, False, ctx.params["lambda"])


def op_ties(taus, ctx):
    return sparsify_elect_combine(taus, ctx, _magnitude, True, ctx.params["lambda"])


def op_dare(taus, ctx):
    elect = ctx.params["dare_combine"] == "ties"
    return sparsify_elect_combine(taus, ctx, _dare, elect, ctx.params["lambda"])


def op_tsv(taus, ctx):
    return P.tsv_combine([w * t for t, w in zip(taus, ctx.weights)]).mul_(ctx.params["lambda"])


def op_iso_c(taus, ctx):
    summed = sparsify_elect_combine(taus, ctx, None, False, 1.0)
    return P.iso_c_combine(summed).mul_(ctx.params["lambda"])


def op_keep_base(taus, ctx):
    return torch.zeros_like(taus[0])


OPS: dict[str, Callable[[Sequence[Tensor], OpContext], Tensor]] = {
    "task_arithmetic": op_task_arithmetic, "average": op_average, "magnitude": op_magnitude,
    "svd": op_svd, "lors": op_lors, "ties": op_ties, "dare": op_dare, "tsv": op_tsv,
    "iso_c": op_iso_c, "keep_base": op_keep_base,
}
# Ops that only make sense on 2-D matrices: elsewhere the method's fallback op is used.
MATRIX_ONLY_OPS = frozenset({"svd", "lors", "tsv", "iso_c"})
# Ops whose global scope needs the whole-model threshold passes.
GLOBAL_SCOPE_OPS = frozenset({"magnitude", "ties"})


@dataclass(frozen=True)
class MethodSpec:
    """A method: its op on the 2-D attention/FFN weights, its op elsewhere, its defaults."""

    summary: str
    matrix_op: str
    other_op: str
    defaults: dict
    default_lambda: str | float = "1/T"  # "1/T": one over the number of experts (the average)

    def op_for_group(self, group: str) -> str:
        return self.matrix_op if group in MATRIX_GROUPS else self.other_op


METHODS: dict[str, MethodSpec] = {
    "lors": MethodSpec("LoRS-Merging: rank-r part + top-k of the residual per matrix",
                       "lors", "task_arithmetic", {"rank": 7, "keep": 0.2}),
    "task_arithmetic": MethodSpec("theta_0 + lambda * sum_i w_i tau_i",
                                  "task_arithmetic", "task_arithmetic", {}),
    "average": MethodSpec("weighted mean of the experts' task vectors", "average", "average", {},
                          default_lambda=1.0),
    "ties": MethodSpec("TIES: trim to top-k, elect sign by mass, disjoint mean",
                       "ties", "ties", {"keep": 0.2, "scope": "tensor"}, default_lambda=1.0),
    "dare": MethodSpec("DARE: random drop with rescale, then task arithmetic or TIES",
                       "dare", "dare", {"keep": 0.5, "dare_combine": "linear"}),
    "magnitude": MethodSpec("sparse-only ablation: top-k per matrix, then task arithmetic",
                            "magnitude", "task_arithmetic", {"keep": 0.2, "scope": "tensor"}),
    "svd": MethodSpec("low-rank-only ablation: rank-r per matrix, then task arithmetic",
                      "svd", "task_arithmetic", {"rank": 7}),
    "tsv": MethodSpec("TSV-Merge: per-task top 1/T singular triplets, orthogonalised",
                      "tsv", "average", {}, default_lambda=1.0),
    "iso_c": MethodSpec("Iso-C: isotropic spectrum of the summed task matrix",
                        "iso_c", "average", {}, default_lambda=1.0),
}
METHOD_ALIASES = {"dare_linear": ("dare", {"dare_combine": "linear"}),
                  "dare_ties": ("dare", {"dare_combine": "ties"}), "ta": ("task_arithmetic", {})}
