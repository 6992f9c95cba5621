"""Per-tensor, per-layer and whole-model diagnostics of the experts' task vectors.

Collected while merging, written to ``merge_report.json``: task-vector norms, pairwise cosine
between experts (interference), sign-conflict rate, and what the op recorded (energy kept by
the rank-r part; the kept residual is floor(keep * numel) entries by construction).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

SIGN_SAMPLE = 1 << 16  # sign conflicts are estimated on at most this many strided entries


def sign_conflict_rate(taus: Sequence[Tensor]) -> float:
    """Among entries nonzero in at least two experts, the fraction whose signs disagree.

    Estimated on an evenly strided sample of at most 2**16 entries per tensor.
    """
    step = max(1, taus[0].numel() // SIGN_SAMPLE)
    sample = torch.stack([t.reshape(-1)[::step] for t in taus])
    positive = (sample > 0).sum(dim=0)
    negative = (sample < 0).sum(dim=0)
    shared = int(torch.count_nonzero(positive + negative >= 2))
    if shared == 0:
        return 0.0
    return int(torch.count_nonzero((positive > 0) & (negative > 0))) / shared


def gram(taus: Sequence[Tensor], chunk: int = 1 << 18) -> Tensor:
    """T x T matrix of dot products <tau_i, tau_j> in float64.

    Computed block by block (T x chunk slices, small enough for the cache), so each task
    vector is read from memory once instead of T times, and no stacked copy is kept.
    """
    flats = [t.reshape(-1) for t in taus]
    g = torch.zeros(len(flats), len(flats), dtype=torch.float64, device=flats[0].device)
    for start in range(0, flats[0].numel(), chunk):
        block = torch.stack([f[start:start + chunk] for f in flats])
        g += (block @ block.T).double()
    return g


def gram_of_factors(factors: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The T x T matrix <tau_i, tau_j> (float64) of task vectors given by their SVDs
    tau_i = U_i diag(S_i) Vh_i (e.g. LoRA deltas), without forming any of them:
    <tau_i, tau_j> = sum((diag(S_i) U_i^T U_j diag(S_j)) * (Vh_i Vh_j^T))."""
    scaled = [(u.double() * s.double(), vh.double()) for u, s, vh in factors]
    g = torch.zeros(len(scaled), len(scaled), dtype=torch.float64, device=scaled[0][0].device)
    for i, (us_i, vh_i) in enumerate(scaled):
        for j, (us_j, vh_j) in enumerate(scaled[: i + 1]):
            g[i, j] = g[j, i] = ((us_i.T @ us_j) * (vh_i @ vh_j.T)).sum()
    return g


def cosine_from_gram(g: Tensor) -> list[list[float]]:
    norms = g.diagonal().clamp(min=0).sqrt()
    denom = torch.outer(norms, norms)
    cos = torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.zeros_like(g))
    return [[round(float(v), 6) for v in row] for row in cos]


class Diagnostics:
    """Accumulates diagnostics tensor by tensor; ``summary`` gives the report section."""

    def __init__(self, expert_names: Sequence[str]):
        self.names = list(expert_names)
        self.tensors: list[dict] = []
        self.layer_gram: dict[str, Tensor] = defaultdict(lambda: torch.zeros(len(self.names),
                                                                            len(self.names),
                                                                            dtype=torch.float64))
        self.model_gram = torch.zeros(len(self.names), len(self.names), dtype=torch.float64)

    def add(self, name: str, layer: str, group: str, op: str, taus: Sequence[Tensor],
            known: Sequence | None = None) -> dict:
        """Record the task vectors' statistics for one tensor; returns its record. When every
        expert states its task vector's factors (``known``, see lors.merging.context.Known:
        LoRA adapters), the Gram matrix comes from them instead of a pass over the tensors."""
        if known is not None and all(k is not None and k.factors is not None for k in known):
            g = gram_of_factors([k.factors for k in known])
        else:
            g = gram(taus)
        g = g.cpu()  # the task vectors may be on a GPU (lors merge --device cuda)
        self.layer_gram[layer] += g
        self.model_gram += g
        record = {
            "name": name, "layer": layer, "group": group, "op": op,
            "task_vector_norms": [round(float(v), 6) for v in g.diagonal().clamp(min=0).sqrt()],
            "sign_conflict_rate": round(sign_conflict_rate(taus), 6) if len(taus) > 1 else 0.0,
        }
        if len(taus) > 1:
            record["cosine"] = cosine_from_gram(g)
        self.tensors.append(record)
        return record

    @staticmethod
    def attach(record: dict, op_stats: dict) -> None:
        """Add what the op recorded per expert (energy kept by the rank-r part) to a record;
        None for an expert the op did not measure (a compressed expert, already pruned)."""
        for key, values in op_stats.items():
            record[key] = [None if v is None else round(float(v), 6) for v in values]

    def summary(self) -> dict:
        return {
            "experts": self.names,
            "model": {
                "task_vector_norms": dict(zip(self.names, (round(float(v), 6) for v in
                                                           self.model_gram.diagonal().sqrt()))),
                "cosine": cosine_from_gram(self.model_gram),
            },
            "layers": {layer: {"task_vector_norms": [round(float(v), 6)
                                                     for v in g.diagonal().sqrt()],
                               "cosine": cosine_from_gram(g)}
                       for layer, g in self.layer_gram.items()},
            "tensors": self.tensors,
        }
