"""The merge ops and methods: one declarative record each.

An op combines the experts' float32 task vectors of one tensor into one merged delta *before*
lambda. Every task-vector op is one "sparsify -> (elect) -> combine" pass
(:func:`sparsify_elect_combine`); TSV, Iso-C, Iso-CTS and CART combine whole matrices instead.
Its :class:`OpSpec` states which parameters it reads, whether it works on 2-D matrices only, whether
its top-k may be global, whether lambda scales it, and its default lambda. Lambda itself is
applied by the per-tensor core (:mod:`lors.merging.core`), the one place that the engine, the
experiment's search and the extensibility step all call.

A method (:class:`MethodSpec`) names the op for the 2-D attention/FFN matrices and the op for
every other group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import primitives as P
from .context import OpContext
from .groups import MATRIX_GROUPS

SVD_PARAMETERS = frozenset({"svd", "svd_oversample", "svd_niter"})


Sparsify = Callable[[int, Tensor, OpContext], Tensor]


def sparsify_elect_combine(taus: Sequence[Tensor], ctx: OpContext, sparsify: Sparsify | None,
                           elect: bool) -> Tensor:
    """combine_i(w_i * sparsify(tau_i)); combine = sum, or TIES' elected disjoint mean.

    The inputs are never modified (with ``ctx.release_taus``, the list's entries are dropped
    once merged, see :class:`OpContext`). With elect, the sign is elected on the weighted
    values, so an expert's weight is also its say in the election.
    """
    # Experts are pruned independently, so the engine's workers may prune them concurrently.
    if elect:
        return _elect_combine(taus, ctx, sparsify)
    shape, like = taus[0].shape, {"dtype": taus[0].dtype, "device": taus[0].device}
    parts = (ctx.map(lambda item: sparsify(item[0], item[1], ctx), enumerate(taus))
             if sparsify else iter(taus))
    merged = None
    for i, (part, tau, weight) in enumerate(zip(parts, taus, ctx.weights)):
        if ctx.is_zero(i):  # known to be zero (a matrix a LoRA leaves alone): adds nothing
            pass
        elif merged is None:  # the first part becomes the accumulator; never an input tensor
            merged = part * weight if part is tau else part.mul_(weight)
        else:
            merged.add_(part, alpha=weight)
            if part is not tau:
                ctx.give(part)  # a pruned copy, added: its memory may serve the next one
        ctx.release(taus, i)
        del part, tau
    return merged if merged is not None else torch.zeros(shape, **like)


ELECT_BLOCK = 1 << 22  # entries of all experts' parts elected at once (16 MiB in float32)


def _elect_combine(taus: Sequence[Tensor], ctx: OpContext, sparsify: Sparsify | None
                   ) -> Tensor:
    """TIES' elected disjoint mean of the weighted sparsified task vectors, over blocks of
    rows: rows [a:b] of every expert's weighted part are stacked, elected
    (:func:`primitives.elect_sign`) and averaged (:func:`primitives.disjoint_mean`) into
    rows [a:b] of the result, block after block (concurrently on ``ctx.map``). Both reduce
    over the experts entry by entry, so the result is the one of stacking whole tensors,
    bit for bit, but the T-high stack of a whole tensor never exists: besides the inputs
    and the result, the working set is a few blocks of about :data:`ELECT_BLOCK` entries.

    Magnitude pruning (TIES) is cut per block too: each expert's top-k threshold is taken
    over its whole task vector first (:func:`primitives.magnitude_threshold`, or the global
    one), then applied to each block, so no pruned copy of a task vector is made. Other
    sparsifiers (DARE's random drop) make each expert's whole part first. The inputs are
    released (``ctx.release_taus``) once every block is done.
    """
    count, shape = len(taus), taus[0].shape
    merged = torch.empty_like(taus[0], memory_format=torch.contiguous_format)
    rows_of = _sparsified_rows(taus, ctx, sparsify)  # may release the inputs (DARE)
    flat = merged.reshape(-1) if merged.dim() == 0 else merged
    height = flat.shape[0]
    per_row = max(1, flat[0].numel()) if height else 1
    step = max(1, ELECT_BLOCK // (count * per_row))
    weights = torch.tensor(list(ctx.weights), dtype=merged.dtype, device=merged.device)
    weights = weights.reshape(-1, *([1] * flat.dim()))

    def elect(start: int) -> None:
        stop = min(height, start + step)
        stacked = flat.new_empty((count, stop - start, *flat.shape[1:]))
        for i in range(count):
            rows_of(i, start, stop, stacked[i])
        stacked *= weights
        flat[start:stop] = P.disjoint_mean(stacked, P.elect_sign(stacked), inplace=True)
    for _ in ctx.map(elect, range(0, height, step)):
        pass
    for i in range(count):
        ctx.release(taus, i)
    return merged.reshape(shape)


def _sparsified_rows(taus: Sequence[Tensor], ctx: OpContext, sparsify: Sparsify | None
                     ) -> Callable[[int, int, int, Tensor], None]:
    """``rows(i, a, b, out)`` writes rows [a:b] (along dim 0; entries of a 1-D tensor) of
    ``sparsify(i, taus[i], ctx)`` into ``out``, the same values as the whole part's."""
    if sparsify is _magnitude:
        if ctx.thresholds is not None:  # global scope: one cut per expert for the whole model
            cuts = ctx.thresholds
        else:
            keep = ctx.params["keep"]
            cuts = list(ctx.map(lambda tau: P.magnitude_threshold(tau, keep), taus))

        def rows(i: int, start: int, stop: int, out: Tensor) -> None:
            P.keep_at_least(_rows(taus[i], start, stop), cuts[i], out=out)
        return rows
    parts = list(taus)
    if sparsify is not None:
        def part(i: int) -> Tensor:
            made = sparsify(i, taus[i], ctx)
            ctx.release(taus, i)
            return made
        parts = list(ctx.map(part, range(len(taus))))
    return lambda i, start, stop, out: out.copy_(_rows(parts[i], start, stop))


def _rows(tensor: Tensor, start: int, stop: int) -> Tensor:
    return (tensor.reshape(-1) if tensor.dim() == 0 else tensor)[start:stop]


def _magnitude(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    if ctx.thresholds is not None:  # global scope: one threshold per expert for the whole model
        return P.keep_at_least(tau, ctx.thresholds[i])
    return P.magnitude_prune(tau, ctx.params["keep"])


def _low_rank(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    u, s, vh = ctx.factors(i, tau)
    _record_energy(ctx, i, s, tau)
    if ctx.is_low_rank(i, tau.shape):  # e.g. a LoRA delta of rank <= r: its own rank-r part
        return tau
    return (u * s) @ vh


def _lors(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    if ctx.is_pruned(i, tau.shape):  # a compressed expert: already L + R_kept at these settings
        return tau
    factors = ctx.factors(i, tau)
    _record_energy(ctx, i, factors[1], tau)
    if ctx.is_low_rank(i, tau.shape):  # L is the task vector itself: the residual is zero
        return tau
    scratch = ctx.empty_like(tau)
    pruned = P.lors_prune(tau, len(factors[1]), ctx.params["keep"], factors=factors,
                          out=ctx.empty_like(tau), scratch=scratch)
    ctx.give(scratch)
    return pruned


def _record_energy(ctx: OpContext, expert: int, singular_values: Tensor, tau: Tensor) -> None:
    if ctx.is_low_rank(expert, tau.shape):  # L = tau
        ctx.record("energy_kept_low_rank", expert, 1.0)
        return
    # ||L||_F^2 = sum of its squared singular values: no pass over the matrix needed.
    flat = tau.reshape(-1)
    total = float(torch.dot(flat, flat))
    kept = float(singular_values.square().sum())
    ctx.record("energy_kept_low_rank", expert, kept / total if total > 0 else 1.0)


def _dare(i: int, tau: Tensor, ctx: OpContext) -> Tensor:
    return P.dare_drop(tau, ctx.params["keep"], ctx.generator_for(i))


def _weighted_mean(taus: Sequence[Tensor], ctx: OpContext) -> Tensor:
    return sparsify_elect_combine(taus, ctx, None, False).div_(sum(ctx.weights))


def _iso_c(taus: Sequence[Tensor], ctx: OpContext) -> Tensor:
    return P.iso_c_combine(sparsify_elect_combine(taus, ctx, None, False))


def _tsv(taus: Sequence[Tensor], ctx: OpContext) -> Tensor:
    return P.tsv_combine([w * t for t, w in zip(taus, ctx.weights)])


def _cart(taus: Sequence[Tensor], ctx: OpContext) -> tuple[Tensor, Tensor]:
    return P.cart_combine(taus, ctx.rank_for(taus[0].shape), ctx.weights,
                          factors=_centred_factors(ctx))


def _lors_centred(taus: Sequence[Tensor], ctx: OpContext) -> tuple[Tensor, Tensor]:
    return P.lors_centred_combine(taus, ctx.rank_for(taus[0].shape), ctx.params["keep"],
                                  ctx.weights, factors=_centred_factors(ctx))


def _centred_factors(ctx: OpContext):
    # The centred matrices depend on every expert and weight: both are in the cache key (and
    # CART and lors_centred decompose the same matrices, so a search shares them).
    tag = ("centred", tuple(ctx.weights))
    return lambda i, centred: ctx.factors(i, centred, tag)


def _iso_cts(taus: Sequence[Tensor], ctx: OpContext) -> Tensor:
    return P.iso_cts_combine([w * t for t, w in zip(taus, ctx.weights)],
                             ctx.params["common_ratio"])


Combine = Callable[[Sequence[Tensor], OpContext], Tensor | tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class OpSpec:
    """One op: its combination (before lambda) and the facts every caller needs about it.

    ``default_lambda`` is "1/T" for sums (one over the number of experts: their average) and
    1.0 for means and spectra; a callable decides from the resolved parameters. A ``split``
    op's combine returns (scaled, fixed): its delta is lambda * scaled + fixed (CART's mean
    is not scaled); every other op's delta is lambda * combination.
    """

    combine: Combine
    parameters: frozenset[str]
    defaults: dict = field(default_factory=dict)
    matrix_only: bool = False         # 2-D matrices only (SVD-based)
    global_scope: bool = False        # its top-k may use one whole-model threshold per expert
    lambda_scaled: bool = True        # False: the delta is used as it is (mean, base)
    default_lambda: str | float | Callable[[dict], str | float] = "1/T"
    split: bool = False               # combine returns (part lambda scales, part it does not)

    def lambda_default(self, params: dict) -> str | float:
        return self.default_lambda(params) if callable(self.default_lambda) else self.default_lambda


def _spec(combine: Combine, parameters: set[str], defaults: dict | None = None,
          **facts) -> OpSpec:
    return OpSpec(combine, frozenset(parameters), defaults or {}, **facts)


OPS: dict[str, OpSpec] = {
    "task_arithmetic": _spec(lambda taus, ctx: sparsify_elect_combine(taus, ctx, None, False),
                             {"lambda"}),
    "average": _spec(_weighted_mean, set(), lambda_scaled=False, default_lambda=1.0),
    "magnitude": _spec(lambda taus, ctx: sparsify_elect_combine(taus, ctx, _magnitude, False),
                       {"lambda", "keep", "scope"}, {"keep": 0.2, "scope": "tensor"},
                       global_scope=True),
    "svd": _spec(lambda taus, ctx: sparsify_elect_combine(taus, ctx, _low_rank, False),
                 {"lambda", "rank", "rank_ratio", *SVD_PARAMETERS}, {"rank": 7},
                 matrix_only=True),
    "lors": _spec(lambda taus, ctx: sparsify_elect_combine(taus, ctx, _lors, False),
                  {"lambda", "rank", "rank_ratio", "keep", *SVD_PARAMETERS},
                  {"rank": 7, "keep": 0.2}, matrix_only=True),
    "ties": _spec(lambda taus, ctx: sparsify_elect_combine(taus, ctx, _magnitude, True),
                  {"lambda", "keep", "scope"}, {"keep": 0.2, "scope": "tensor"},
                  global_scope=True, default_lambda=1.0),
    "dare": _spec(lambda taus, ctx: sparsify_elect_combine(
                      taus, ctx, _dare, ctx.params["dare_combine"] == "ties"),
                  {"lambda", "keep", "dare_combine"}, {"keep": 0.5, "dare_combine": "linear"},
                  # the elected disjoint mean is a mean: scale 1, like TIES
                  default_lambda=lambda p: 1.0 if p.get("dare_combine") == "ties" else "1/T"),
    "tsv": _spec(_tsv, {"lambda"}, matrix_only=True, default_lambda=1.0),
    "iso_c": _spec(_iso_c, {"lambda"}, matrix_only=True, default_lambda=1.0),
    # CART: mean + lambda * sum of rank-k centred task vectors; k about 8% of min(m, n) is
    # the paper's recommendation
    "cart": _spec(_cart, {"lambda", "rank", "rank_ratio", *SVD_PARAMETERS},
                  {"rank_ratio": 0.08}, matrix_only=True, default_lambda=1.0, split=True),
    "lors_centred": _spec(_lors_centred, {"lambda", "rank", "rank_ratio", "keep",
                                          *SVD_PARAMETERS},
                          {"rank": 7, "keep": 0.2}, matrix_only=True, default_lambda=1.0,
                          split=True),
    "iso_cts": _spec(_iso_cts, {"lambda", "common_ratio"}, {"common_ratio": 0.8},
                     matrix_only=True, default_lambda=1.0),
    "keep_base": _spec(lambda taus, ctx: torch.zeros_like(taus[0]), set(), lambda_scaled=False,
                       default_lambda=1.0),
}


@dataclass(frozen=True)
class MethodSpec:
    """A method: its op on the 2-D attention/FFN weights, its op elsewhere, and the
    post-step on the merged 2-D matrices it applies unless told otherwise (``calibrate``)."""

    summary: str
    matrix_op: str
    other_op: str
    calibrate: str | None = None

    def op_for_group(self, group: str) -> str:
        return self.matrix_op if group in MATRIX_GROUPS else self.other_op


METHODS: dict[str, MethodSpec] = {
    "lors": MethodSpec("LoRS-Merging: rank-r part + top-k of the residual per matrix",
                       "lors", "task_arithmetic"),
    "task_arithmetic": MethodSpec("theta_0 + lambda * sum_i w_i tau_i",
                                  "task_arithmetic", "task_arithmetic"),
    "average": MethodSpec("weighted mean of the experts' task vectors", "average", "average"),
    "ties": MethodSpec("TIES: trim to top-k, elect sign by mass, disjoint mean", "ties", "ties"),
    "dare": MethodSpec("DARE: random drop with rescale, then task arithmetic or TIES",
                       "dare", "dare"),
    "magnitude": MethodSpec("sparse-only ablation: top-k per matrix, then task arithmetic",
                            "magnitude", "task_arithmetic"),
    "svd": MethodSpec("low-rank-only ablation: rank-r per matrix, then task arithmetic",
                      "svd", "task_arithmetic"),
    "tsv": MethodSpec("TSV-Merge: per-task top 1/T singular triplets, orthogonalised",
                      "tsv", "average"),
    "iso_c": MethodSpec("Iso-C: isotropic spectrum of the summed task matrix", "iso_c", "average"),
    "lors_centred": MethodSpec("lors' variant: mean + lambda * sum of LoRS-pruned centred task "
                               "vectors (shared direction added once)", "lors_centred", "average"),
    "cart": MethodSpec("CART: weight average + lambda * sum of rank-k centred task vectors",
                       "cart", "average"),
    "iso_cts": MethodSpec("Iso-CTS: isotropic spectrum on common + task-specific subspaces",
                          "iso_cts", "average"),
    "svc": MethodSpec("task arithmetic, then singular value calibration of each matrix",
                      "task_arithmetic", "task_arithmetic", calibrate="svc"),
}
CALIBRATIONS = ("svc",)  # post-steps on the merged 2-D matrices (config field ``calibrate``)
METHOD_ALIASES = {"lors_exact": ("lors", {"svd": "exact"}),
                  "dare_linear": ("dare", {"dare_combine": "linear"}),
                  "dare_ties": ("dare", {"dare_combine": "ties"}), "ta": ("task_arithmetic", {})}


def method_defaults(method: MethodSpec) -> dict:
    """The method's default parameters: those of its matrix op, then of its other op."""
    return {**OPS[method.other_op].defaults, **OPS[method.matrix_op].defaults}
