"""Experts' task vectors held in memory, merged at many hyper-parameter points cheaply.

The streaming engine (``lors.merging.merge``) reads every file per merge; a search merges
the same experts dozens of times, so here the task vectors are read once. Each method's
merge is linear in lambda (every op returns lambda * combine(...)), so the combined delta is
computed once per point of the other parameters and every lambda is one scaled add. SVD
factors are cached per (tensor, expert) across points (:meth:`OpContext.factors`), so a
search over ranks and keeps decomposes each matrix once.
"""

from __future__ import annotations

import torch

from ..merging import validate_config
from ..merging.engine import _seed, plan_merge
from ..merging.groups import group_of
from ..merging.methods import OPS, OpContext
from .config import validate_and_resolve

LAMBDA_FREE_OPS = frozenset({"average", "keep_base"})
"""Ops whose scale does not come from lambda (the mean; the base itself)."""


class TaskVectors:
    """Base weights and each expert's task vector, float32, for every floating tensor."""

    def __init__(self, base: str, experts: dict[str, str]) -> None:
        config = validate_config({"base": base, "method": "task_arithmetic",
                                  "experts": [{"name": n, "path": p} for n, p in experts.items()]})
        plan = plan_merge(config)  # the engine's compatibility checks
        self.base_path, self.names = base, list(experts)
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, list[torch.Tensor]] = {}
        for entry in plan.entries:
            tensor = plan.base.read(entry.name)
            if entry.op == "copy":
                self.base[entry.name] = tensor
                continue
            self.base[entry.name] = tensor.float()
            self.taus[entry.name] = [ckpt.read(entry.name).float() - self.base[entry.name]
                                     for ckpt in plan.experts.values()]
        self.svd_cache: dict = {}

    def resolve(self, method: str, params: dict) -> tuple[str, dict, dict[str, str]]:
        """The engine's resolution of ``method`` and ``params`` (validated the same way)."""
        return validate_and_resolve(method, params, len(self.names), f"method {method}")

    def delta(self, method: str, params: dict) -> dict[str, tuple[torch.Tensor, bool]]:
        """Merged task vector at lambda = 1 for every merged tensor, with whether lambda
        scales it (not for the average's mean); lambda is applied by :meth:`state`."""
        _, resolved, group_ops = self.resolve(method, params)
        if set(group_ops.values()) - LAMBDA_FREE_OPS:  # lambda is read: apply it later instead
            _, resolved, group_ops = self.resolve(method, {**params, "lambda": 1.0})
        weights = [1.0] * len(self.names)
        out = {}
        for name, taus in self.taus.items():
            op = group_ops[group_of(name)]
            if op in ("lors", "svd", "tsv", "iso_c") and taus[0].dim() != 2:
                op = "task_arithmetic"
            ctx = OpContext(name, weights, resolved,
                            lambda i, n=name: torch.Generator().manual_seed(
                                _seed(resolved["seed"], i, n)),
                            svd_cache=self.svd_cache)
            out[name] = (OPS[op](taus, ctx), op not in LAMBDA_FREE_OPS)
        return out

    def state(self, delta: dict[str, tuple[torch.Tensor, bool]],
              lam: float) -> dict[str, torch.Tensor]:
        """Base + lambda * delta (deltas that lambda does not scale are added as they are)."""
        state = dict(self.base)
        for name, (value, scaled) in delta.items():
            state[name] = self.base[name] + (lam if scaled else 1.0) * value
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

