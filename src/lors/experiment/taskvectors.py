"""Experts' task vectors held in memory, merged at many hyper-parameter points cheaply.

The streaming engine (``lors merge``) reads every file per merge; a search merges the same
experts dozens of times, so here the task vectors are read once (through the engine's checks
and reader). Each point is merged by the engine's per-tensor core (:mod:`lors.merging.core`):
the same ops, seeds, global thresholds and lambda. Every op is affine in lambda (lambda *
scaled part + a part it does not scale, CART's mean), so the combination is computed once per
point of the other parameters and each lambda is one scaled add; SVD factors are cached per
(tensor, expert, rank) across points. Calibration (SVC) is not linear in lambda: a calibrated
matrix is calibrated again for each lambda, by the same core function the engine calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..merging import core, validate_config
from ..merging.config import resolve_method
from ..merging.engine import plan_merge
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


class TaskVectors:
    """Base weights and each expert's task vector, float32, for every floating tensor."""

    def __init__(self, base: str, experts: dict[str, str]) -> None:
        config = validate_config({"base": base, "method": "task_arithmetic",
                                  "experts": [{"name": n, "path": p} for n, p in experts.items()]})
        plan = plan_merge(config)  # the engine's compatibility checks
        self.base_path, self.names = base, list(experts)
        self.meta = plan.base.meta
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, list[torch.Tensor]] = {}
        self.known: dict[str, list | None] = {}  # what LoRA / compressed experts state
        for entry in plan.entries:
            if entry.op == core.COPY:
                self.base[entry.name] = plan.base.read(entry.name)
                continue
            self.base[entry.name] = core.read_float(plan.base, "base", entry.name)
            self.taus[entry.name] = core.task_vectors(plan.experts, entry.name,
                                                      self.base[entry.name])
            self.known[entry.name] = core.known_parts(plan.experts, entry.name)
        self.svd_cache: dict = {}

    def delta(self, method: str, params: dict, groups: dict[str, str] | None = None, *,
              calibrate: str | None = None) -> SearchDelta:
        """The merge of ``method`` at ``params`` with per-group op overrides ``groups`` and
        the ``calibrate`` post-step (None: the method's own), as ``lors merge`` resolves them
        (lambda, if given, only sets the default)."""
        weights = self._weights()
        _, resolved, group_ops = resolve_method(method, params, groups or {}, weights,
                                                calibrate=calibrate)
        entries, _ = core.plan_entries(self.meta, group_ops, resolved)
        thresholds = core.global_thresholds(entries, resolved, len(self.names),
                                            self.taus.__getitem__)
        delta = SearchDelta({}, {}, float(resolved["lambda"]), params=resolved)
        for entry in entries:
            if entry.op == core.COPY:
                continue
            combination, _ = core.combine(entry, self.taus[entry.name], weights, resolved,
                                          thresholds=thresholds, svd_cache=self.svd_cache,
                                          known=self.known[entry.name])
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
        calibrated where the merge calibrates, exactly as the engine adds it; combinations
        lambda does not scale are added as they are."""
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
            else:
                finished = core.finish(entry, combination, scale, self.taus[name],
                                       self._weights(), params)
            state[name] = self.base[name] + finished
        return state

    def _weights(self) -> list[float]:
        return [1.0] * len(self.names)  # the search merges its experts with equal weights

    def cosines(self) -> list[list[float]]:
        """Cosine similarity between the experts' whole task vectors (all merged tensors)."""
        count = len(self.names)
        gram = torch.zeros(count, count, dtype=torch.float64)
        for taus in self.taus.values():
            flat = torch.stack([t.reshape(-1) for t in taus]).double()
            gram += flat @ flat.T
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        return (gram / norms[:, None] / norms[None, :]).tolist()
