"""Experts' task vectors held in memory, merged at many hyper-parameter points cheaply.

The streaming engine (``lors merge``) reads every file per merge; a search merges the same
experts dozens of times, so here the task vectors are read once (through the engine's checks
and reader). Each point is merged by the engine's per-tensor core (:mod:`lors.merging.core`):
the same ops, seeds, global thresholds and lambda. Every op is linear in lambda, so the
combination is computed once per point of the other parameters and each lambda is one scaled
add; SVD factors are cached per (tensor, expert, rank) across points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..merging import core, validate_config
from ..merging.config import resolve_method
from ..merging.engine import plan_merge
from ..merging.methods import OPS


@dataclass
class SearchDelta:
    """The merged combination (before lambda) of every merged tensor at one point.

    ``scaled[name]`` says whether lambda scales that tensor's combination; ``lambda_default``
    is the lambda the engine would use when the point gives none.
    """

    combined: dict[str, torch.Tensor]
    scaled: dict[str, bool]
    lambda_default: float


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
        for entry in plan.entries:
            if entry.op == core.COPY:
                self.base[entry.name] = plan.base.read(entry.name)
                continue
            self.base[entry.name] = core.read_float(plan.base, "base", entry.name)
            self.taus[entry.name] = core.task_vectors(plan.experts, entry.name,
                                                      self.base[entry.name])
        self.svd_cache: dict = {}

    def delta(self, method: str, params: dict, groups: dict[str, str] | None = None
              ) -> SearchDelta:
        """The merge of ``method`` at ``params`` with per-group op overrides ``groups``, as
        ``lors merge`` resolves them (lambda, if given, only sets the default)."""
        weights = [1.0] * len(self.names)
        _, resolved, group_ops = resolve_method(method, params, groups or {}, weights)
        entries, _ = core.plan_entries(self.meta, group_ops, resolved)
        thresholds = core.global_thresholds(entries, resolved, len(self.names),
                                            self.taus.__getitem__)
        combined, scaled = {}, {}
        for entry in entries:
            if entry.op == core.COPY:
                continue
            combined[entry.name], _ = core.combine(entry, self.taus[entry.name], weights,
                                                   resolved, thresholds=thresholds,
                                                   svd_cache=self.svd_cache)
            scaled[entry.name] = OPS[entry.op].lambda_scaled
        return SearchDelta(combined, scaled, float(resolved["lambda"]))

    def state(self, delta: SearchDelta, lam: float | None = None) -> dict[str, torch.Tensor]:
        """Base + lambda * combination (``lam`` None: the method's default lambda), exactly
        as the engine adds it; unscaled combinations are added as they are."""
        lam = delta.lambda_default if lam is None else lam
        state = dict(self.base)
        for name, value in delta.combined.items():
            state[name] = self.base[name] + (value * lam if delta.scaled[name] else value)
        return state

    def cosines(self) -> list[list[float]]:
        """Cosine similarity between the experts' whole task vectors (all merged tensors)."""
        count = len(self.names)
        gram = torch.zeros(count, count, dtype=torch.float64)
        for taus in self.taus.values():
            flat = torch.stack([t.reshape(-1) for t in taus]).double()
            gram += flat @ flat.T
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        return (gram / norms[:, None] / norms[None, :]).tolist()
