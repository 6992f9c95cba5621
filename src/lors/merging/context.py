"""What an op may know about the tensor it merges: :class:`OpContext`, and :class:`Known`,
what an expert states about its own task vector beyond its values (LoRA factors, a LoRS
pruning it already carries), so that ops skip work whose result is known exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import primitives as P

Factors = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Known:
    """What one expert states about its task vector of one matrix.

    ``factors``: its exact thin SVD (U [m,q], S [q], Vh [q,n], singular values descending),
    e.g. of a LoRA delta scale * B @ A (q = the LoRA rank; q = 0 for an untouched matrix).
    ``pruned_with``: the LoRS settings (:func:`lors_settings`) its task vector was already
    pruned with (a compressed expert): the task vector *is* L + R_kept at those settings.
    """

    factors: Factors | None = None
    pruned_with: dict | None = None


def rank_for(params: dict, shape: Sequence[int]) -> int:
    """The rank r of a matrix's low-rank part: round(rank_ratio * min(m, n)), at least 1,
    when ``rank_ratio`` is set, else ``rank`` (not clipped to min(m, n))."""
    ratio = params.get("rank_ratio")
    if ratio is not None:
        return max(1, round(ratio * min(shape)))
    return int(params["rank"])


def lors_settings(params: dict, shape: Sequence[int]) -> dict:
    """Everything the LoRS pruning of a matrix of ``shape`` depends on besides its task
    vector and its name: rank, keep, SVD kind, and for the randomized SVD its oversampling,
    power iterations and seed. Two prunings with equal settings are identical."""
    settings = {"rank": rank_for(params, shape), "keep": float(params["keep"]),
                "svd": params["svd"]}
    if params["svd"] != "exact":
        settings.update(svd_oversample=int(params["svd_oversample"]),
                        svd_niter=int(params["svd_niter"]), seed=int(params["seed"]))
    return settings


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
    svd_cache: dict | None = None                    # factors reused across a search's points
    known: Sequence[Known | None] | None = None      # per expert: what it states (or None)
    # The randomized SVD's Gaussian sketch, the same for every expert: an expert's rank-r
    # factors then depend on its task vector, the settings, the seed and the tensor only,
    # not on its position among the experts (so a compressed expert made alone is the same
    # pruning as inside a merge). None: the expert's own generator.
    sketch_for: Callable[[], torch.Generator] | None = None
    # The caller reads the task vectors for this op only (the search; the engine keeps them
    # for calibration and diagnostics): an op that is done with an expert's task vector may
    # drop it from the list it was given (:meth:`release`), so it is freed at once.
    release_taus: bool = False
    # Reused memory for an op's temporaries (the engine's read buffers,
    # lors.merging.buffers.Buffers): fresh memory costs a page fault per 4 KiB page. None:
    # new memory, as everywhere else (the search).
    workspace: object | None = None

    def empty_like(self, tensor: Tensor) -> Tensor | None:
        """An uninitialised contiguous tensor of ``tensor``'s shape and dtype from the
        :attr:`workspace`, or None without one (the op then allocates as usual). Hand it
        back with :meth:`give` once nothing uses it."""
        if self.workspace is None or tensor.device.type != "cpu":
            return None
        return self.workspace.empty(tensor.shape, tensor.dtype)

    def give(self, *tensors: Tensor | None) -> None:
        """Return memory from :meth:`empty_like` to the workspace (anything else is ignored)."""
        if self.workspace is not None:
            self.workspace.give(*tensors)

    def release(self, taus: list, expert: int) -> None:
        """Drop ``taus[expert]`` from the list when :attr:`release_taus` (else nothing)."""
        if self.release_taus:
            taus[expert] = None

    def record(self, key: str, expert: int, value: float) -> None:
        """Store one expert's diagnostic (safe from worker threads: one slot per expert)."""
        self.stats.setdefault(key, [None] * len(self.weights))[expert] = value

    def rank_for(self, shape: tuple[int, ...]) -> int:
        return rank_for(self.params, shape)

    def known_for(self, expert: int) -> Known | None:
        return self.known[expert] if self.known is not None else None

    def is_low_rank(self, expert: int, shape: tuple[int, ...]) -> bool:
        """Whether the expert's task vector is known to have rank <= r: its rank-r part is
        then the task vector itself (and the LoRS residual exactly zero)."""
        known = self.known_for(expert)
        return (known is not None and known.factors is not None
                and known.factors[1].numel() <= self.rank_for(shape))

    def is_zero(self, expert: int) -> bool:
        """Whether the expert's task vector is known to be zero (factors of rank 0)."""
        known = self.known_for(expert)
        return known is not None and known.factors is not None and known.factors[1].numel() == 0

    def is_pruned(self, expert: int, shape: tuple[int, ...]) -> bool:
        """Whether the expert's task vector already is its LoRS pruning at this merge's
        settings (a compressed expert made with the same rank, keep, SVD and seed)."""
        known = self.known_for(expert)
        return (known is not None and known.pruned_with is not None
                and known.pruned_with == lors_settings(self.params, shape))

    def factors(self, expert: int, tau: Tensor, tag: tuple = ()) -> Factors:
        """The top-r singular triplets of ``tau`` (r from :meth:`rank_for`), exactly as
        :func:`primitives.truncated_svd` gives them for this expert and tensor; the exact
        ones, with no SVD computed, when the expert states its factors (a LoRA delta).

        ``tag`` names what ``tau`` is when it is not the expert's task vector itself (CART's
        centred matrix): it is part of the cache key, so different matrices never share one.

        With ``svd_cache`` (a search), a decomposition is computed once per (tensor, expert,
        rank, SVD settings) and cached in memory of its own: rank-r factors, never views of
        a full SVD's U and Vh, so the cache stays small (r (m + n + 1) per matrix and
        expert). Only the exact SVD is nested (its rank-r factors are the leading ones of
        any larger rank), so only it reuses a larger rank's factors: a randomized sketch of
        another size gives other factors, and reusing them would make the search score a
        merge that ``lors merge`` never writes.
        """
        rank = self.rank_for(tau.shape)
        known = self.known_for(expert) if not tag else None
        if known is not None and known.factors is not None:
            u, s, vh = known.factors
            return u[:, :rank], s[:rank], vh[:rank]
        options = self.svd_options(expert)
        if self.svd_cache is None:
            return P.truncated_svd(tau, rank, **options)
        if options["exact"]:
            key = (self.name, *tag, expert, "exact")
            cached = self.svd_cache.get(key)
            if cached is None or cached[1].numel() < min(rank, *tau.shape):
                cached = self.svd_cache[key] = _own(P.truncated_svd(tau, rank, **options))
            u, s, vh = cached
            return u[:, :rank], s[:rank], vh[:rank]
        key = (self.name, *tag, expert, rank, options["oversample"], options["niter"],
               self.params.get("seed"))
        if key not in self.svd_cache:
            self.svd_cache[key] = _own(P.truncated_svd(tau, rank, **options))
        return self.svd_cache[key]

    def svd_options(self, expert: int) -> dict:
        generator = self.sketch_for() if self.sketch_for else self.generator_for(expert)
        return {"exact": self.params["svd"] == "exact", "oversample": self.params["svd_oversample"],
                "niter": self.params["svd_niter"], "generator": generator}


def _own(factors: Factors) -> Factors:
    """``factors`` in memory of their own: the exact SVD's rank-r factors are views of the
    full U and Vh (as large as the matrix), which a cache would otherwise keep alive."""
    return tuple(t.clone() if t.untyped_storage().nbytes() > t.nbytes else t for t in factors)
