"""Experts' task vectors merged at many hyper-parameter points cheaply (the dev search).

The streaming engine (``lors merge``) reads every file per merge; a search merges the same
experts dozens of times. The base is read once and kept in memory (float32; the engine's
checks and reader). The experts' task vectors are not kept: they are read again, one tensor
at a time, whenever a point needs them (merged, calibrated, global thresholds, cosines),
through the engine's own :func:`core.task_vectors`, and dropped as soon as that tensor is
merged. Why: keeping them all, as this module once did (read once), holds one full model
per expert, O(experts x model) (with 10 Whisper-base experts the search peaked at 7.0 GiB,
benchmarks/bench_search_memory.py); now memory is O(one model + one tensor per expert)
whatever the number of experts (2.1 GiB there), a re-read costs a copy from the OS page
cache (a few seconds per point there), and the scores are the same. A LoRA adapter or a
compressed expert is read as its factors (its exact delta is rebuilt from them); what it
states about its task vectors (:func:`core.known_parts`: LoRA factors, LoRS settings) is
kept, small like the adapter.
(Pickled experts, ``pytorch_model.bin`` / openai ``.pt``, are held as ``torch.load`` gives
them, memory-mapped where the format allows: the reader has no other access to them.)

Each point is merged by the engine's per-tensor core (:mod:`lors.merging.core`): the same
ops, seeds, global thresholds and lambda, and, as in the engine, with the experts pruned on
worker threads of one torch thread each and the combination and calibration computed in
one torch thread (BLAS rounds differently with another thread count, which could move an
entry across a top-k threshold). Every op is affine in lambda (lambda * scaled part + a
part it does not scale, CART's mean), so the combination is computed once per point of the
other parameters and each lambda is one scaled add; SVD factors are cached per (tensor,
expert, rank) across points (rank-r factors: small, and all the search keeps besides the
base). Calibration (SVC) is not linear in lambda: a calibrated matrix is calibrated again
for each lambda, by the same core function the engine calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..merging import core, validate_config
from ..merging.config import resolve_method
from ..merging.engine import default_workers, one_torch_thread, plan_merge, worker_pool
from ..merging.methods import OPS


@dataclass
class SearchDelta:
    """The merged combination (before lambda) of every merged tensor at one point.

    ``combined[name]`` is the part lambda scales (the whole combination for most ops) and
    ``fixed[name]``, for ops like CART, the part it does not; ``scaled[name]`` says whether
    lambda scales that tensor's combination at all; ``lambda_default`` is the lambda the
    engine would use when the point gives none. ``entries`` and ``params`` (resolved) let
    :meth:`TaskVectors.state` finish each tensor as the engine does (calibration included).
    """

    combined: dict[str, torch.Tensor]
    scaled: dict[str, bool]
    lambda_default: float
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, core.PlanEntry] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


class TaskVectorReader(Mapping):
    """Tensor name -> each expert's float32 task vector of that tensor, read when asked
    (:func:`core.task_vectors`: read minus base, or an adapter's or compressed expert's own
    delta); nothing is kept between reads. ``map`` reads the experts (a pool's map reads
    them concurrently)."""

    def __init__(self, experts: Mapping, base: Mapping[str, torch.Tensor], names: list[str],
                 map: Callable = map) -> None:
        self.experts, self.base, self.names, self.map = experts, base, names, map
        self._known = set(names)

    def __getitem__(self, name: str) -> list[torch.Tensor]:
        if name not in self._known:
            raise KeyError(name)
        return core.task_vectors(self.experts, name, self.base[name], self.map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def using(self, map: Callable) -> "TaskVectorReader":
        return TaskVectorReader(self.experts, self.base, self.names, map)


class TaskVectors:
    """The base weights (float32 for every floating tensor) in memory, and the experts'
    task vectors read per tensor when a point needs them (``taus``, a
    :class:`TaskVectorReader`); see the module docstring."""

    def __init__(self, base: str, experts: dict[str, str], workers: int | None = None) -> None:
        config = validate_config({"base": base, "method": "task_arithmetic",
                                  "experts": [{"name": n, "path": p} for n, p in experts.items()]})
        plan = plan_merge(config)  # the engine's compatibility checks
        self.base_path, self.names = base, list(experts)
        self.meta = plan.base.meta
        self.sources = plan.experts  # opened (headers only): read from per tensor
        self.workers = workers or default_workers(len(self.names))
        self.base: dict[str, torch.Tensor] = {}
        self.known: dict[str, list | None] = {}  # what LoRA / compressed experts state
        merged = []
        for entry in plan.entries:
            if entry.op == core.COPY:
                self.base[entry.name] = plan.base.read(entry.name)
                continue
            self.base[entry.name] = core.read_float(plan.base, "base", entry.name)
            with one_torch_thread():  # LoRA factors' SVD as the engine's reader computes it
                self.known[entry.name] = core.known_parts(plan.experts, entry.name)
            merged.append(entry.name)
        self.taus = TaskVectorReader(self.sources, self.base, merged)
        self.svd_cache: dict = {}

    def delta(self, method: str, params: dict, groups: dict[str, str] | None = None, *,
              calibrate: str | None = None) -> SearchDelta:
        """The merge of ``method`` at ``params`` with per-group op overrides ``groups`` and
        the ``calibrate`` post-step (None: the method's own), as ``lors merge`` resolves them
        (lambda, if given, only sets the default). Each tensor's task vectors are read, merged
        and dropped before the next tensor's are read."""
        weights = self._weights()
        _, resolved, group_ops = resolve_method(method, params, groups or {}, weights,
                                                calibrate=calibrate)
        entries, _ = core.plan_entries(self.meta, group_ops, resolved)
        delta = SearchDelta({}, {}, float(resolved["lambda"]), params=resolved)
        with worker_pool(self.workers) as pool:  # as the engine prunes: one thread each
            taus = self.taus.using(pool.map)
            thresholds = core.global_thresholds(entries, resolved, len(self.names),
                                                taus.__getitem__)
            for entry in entries:
                if entry.op == core.COPY:
                    continue
                combination, _ = core.combine(entry, taus[entry.name], weights, resolved,
                                              thresholds=thresholds, map=pool.map,
                                              svd_cache=self.svd_cache,
                                              known=self.known[entry.name],
                                              release_taus=True)  # read for this op only
                delta.combined[entry.name] = combination.scaled
                if combination.fixed is not None:
                    delta.fixed[entry.name] = combination.fixed
                delta.scaled[entry.name] = OPS[entry.op].lambda_scaled
                delta.entries[entry.name] = entry
        return delta

    def state(self, delta: SearchDelta, lam: float | None = None,
              lambdas: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Base + lambda * scaled part + unscaled part (``lam`` None: the method's default
        lambda; ``lambdas``: per group/block lambdas, see :func:`core.lambda_for`), then
        calibrated where the merge calibrates (against the task vectors, read again), exactly
        as the engine adds it; combinations lambda does not scale are added as they are."""
        params = {**delta.params, "lambda": delta.lambda_default if lam is None else lam}
        if lambdas is not None:
            params["lambdas"] = lambdas
        state = dict(self.base)
        for name, value in delta.combined.items():
            combination = core.Combination(value, delta.fixed.get(name))
            entry = delta.entries.get(name)
            scale = (core.lambda_for(entry, params) if entry is not None
                     else params["lambda"] if delta.scaled[name] else 1.0)
            if entry is None:  # a SearchDelta built by hand: no calibration to apply
                finished = combination.delta(scale)
            elif core.calibrates(entry, params, value.shape):
                with one_torch_thread():  # the engine calibrates in one thread
                    finished = core.finish(entry, combination, scale, self.taus[name],
                                           self._weights(), params)
            else:
                finished = core.finish(entry, combination, scale, [], self._weights(), params)
            state[name] = self.base[name] + finished
        return state

    def _weights(self) -> list[float]:
        return [1.0] * len(self.names)  # the search merges its experts with equal weights

    def cosines(self, chunk: int = 1 << 20) -> list[list[float]]:
        """Cosine similarity between the experts' whole task vectors (all merged tensors).

        The Gram matrix is accumulated in float64 over ``chunk`` entries at a time, so no
        float64 copy of a whole tensor's task vectors is made (that would be twice their
        size: 2 GiB for Whisper-base's token embedding with 10 experts).
        """
        count = len(self.names)
        gram = torch.zeros(count, count, dtype=torch.float64)
        with worker_pool(self.workers) as pool:  # small products: one thread is enough
            taus = self.taus.using(pool.map)
            for name in taus:
                flat = [t.reshape(-1) for t in taus[name]]
                for start in range(0, flat[0].numel(), chunk):
                    block = torch.stack([t[start:start + chunk] for t in flat]).double()
                    gram += block @ block.T
                    del block
                del flat  # before the next tensor's are read
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        return (gram / norms[:, None] / norms[None, :]).tolist()
