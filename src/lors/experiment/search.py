"""The dev-set hyper-parameter search of one merge method in one setting."""

from __future__ import annotations

import time

import numpy as np
from pathlib import Path

from ..merging.methods import METHOD_ALIASES, METHODS, OPS
from .config import digest
from .devscore import DevScorer, normalised_dev_score
from .stages import cached_json
from .taskvectors import TaskVectors


def _largest_rank_first(points: list[dict]) -> list[dict]:
    """Decompose at the largest rank first so smaller ranks reuse its factors."""
    return sorted(points, key=lambda p: -(p.get("rank") or 0))


def _scaling_free(point: dict) -> dict:
    """``point`` without what only scales the combination (lambda, per-block lambdas)."""
    return {k: v for k, v in point.items() if k not in ("lambda", "lambdas")}


def search_method(folder: Path, setting: str, method: str, grid: list[dict],
                  vectors: "Lazy", scorer: "Lazy", expert_dev: dict, metric: str,
                  key: str, groups: dict[str, str] | None = None) -> list[dict]:
    """Dev score of every grid point (each cached on its own); returns the points.

    ``vectors``/``scorer`` are built on first use only, so a fully cached search loads no
    weights. ``groups`` are per-group op overrides (part of ``key``, which names the cache).
    Points that differ only in ``lambda`` and ``lambdas`` (per-block lambdas) share one
    combination. Each point is ``{"setting", "method", "params", "dev_score", "seconds"}``.
    """
    by_rest: dict[str, list[dict]] = {}
    for point in grid:
        by_rest.setdefault(digest(_scaling_free(point)), []).append(point)
    points = []
    for group in _largest_rank_first([g[0] for g in by_rest.values()]):
        rest = _scaling_free(group)
        members = by_rest[digest(rest)]
        delta = None
        for point in members:
            path = folder / f"{setting}-{method}-{digest(point, key)}.json"

            def run(point=point) -> dict:
                nonlocal delta
                started = time.perf_counter()
                if delta is None:
                    delta = vectors().delta(method, rest, groups)
                # no lambda in the grid: the method's default, as `lors merge` would use
                scorer().load(vectors().state(delta, point.get("lambda"),
                                              point.get("lambdas")))
                results = scorer().results()
                score = normalised_dev_score(results, expert_dev, metric)
                return {"setting": setting, "method": method, "params": point,
                        "dev_score": score, "seconds": time.perf_counter() - started}
            points.append(cached_json(path, run))
    return points


BLOCKS = ("encoder.lower", "encoder.upper", "decoder.lower", "decoder.upper",
          "cross_attention.lower", "cross_attention.upper")
"""The blocks a per-block lambda search varies: each half of the encoder's and decoder's
layers, and of the cross-attention (its own lambda inside the decoder's)."""


class SettingSearch:
    """The dev search of every method over one set of pairs (their experts and dev sets).

    Task vectors and the dev scorer are built on first use and shared by all methods; the
    experts' own dev scores (the normalisers) are cached. ``name`` names the cache files.
    """

    def __init__(self, exp, name: str, pairs: list[tuple[str, str]], experts: dict) -> None:
        config = exp.config
        self.exp, self.name, self.pairs = exp, name, [tuple(p) for p in pairs]
        self.metric = config.search.metric
        self.groups = config.group_ops()
        self.key = digest(exp.train_key, self.metric, self.groups)
        self.expert_paths = {f"{l}-{t}": experts[(l, t)]["path"] for l, t in self.pairs}
        dev_by_language = {p.language: p.dev for p in exp.selection.pairs}
        dev = {pair: dev_by_language[pair[0]] for pair in self.pairs}
        self.scorer = Lazy(lambda: DevScorer(exp.base, dev, self.metric))
        self.vectors = Lazy(lambda: TaskVectors(str(exp.base), self.expert_paths))
        path = exp.out / "search" / f"{name}-experts-{digest(exp.train_key, self.metric)}.json"
        scores = cached_json(path, lambda: self._expert_dev(experts))
        self.expert_dev = {tuple(k.split("|")): v for k, v in scores.items()}

    def _expert_dev(self, experts: dict) -> dict:
        out = {}
        for pair in self.pairs:
            self.scorer().load(model_dir=Path(experts[pair]["path"]))
            out["|".join(pair)] = self.scorer().results()[pair]
        return out

    def points(self, method: str, grid: list[dict], widen: int = 0) -> list[dict]:
        """Every grid point of ``method`` with its dev score (see :func:`search_method`),
        then up to ``widen`` points past the grid's lambda edge while the best lambda sits
        on it (each marked ``"widened": True``)."""
        points = self._score(method, grid)
        for _ in range(widen):
            beyond = lambda_past_edge(points)
            if beyond is None:
                break
            added = self._score(method, [{**best_point(points)["params"], "lambda": beyond}])
            points += [{**point, "widened": True} for point in added]
        return points

    def block_lambdas(self, method: str, points: list[dict], count: int,
                      seed: int = 0) -> list[dict]:
        """``count`` random points around the best one, each with a lambda per block
        (:data:`BLOCKS`) drawn log-uniformly within a factor 2 of the best lambda; marked
        ``"blocks": True``. The same count for every method keeps budgets equal."""
        name = METHOD_ALIASES.get(method, (method,))[0]
        if not any(OPS[op].lambda_scaled for op in (METHODS[name].matrix_op,
                                                    METHODS[name].other_op)):
            return []  # nothing of this method is scaled by lambda
        best = best_point(points)["params"]
        lam = best.get("lambda")
        if lam is None:
            lam = self.vectors().delta(method, _scaling_free(best), self.groups).lambda_default
        rng = np.random.default_rng([seed, int(digest(self.name, method), 16) % 2**32])
        grid = [{**best, "lambdas": {block: round(float(lam * 2.0 ** rng.uniform(-1, 1)), 6)
                                     for block in BLOCKS}} for _ in range(count)]
        return [{**point, "blocks": True} for point in self._score(method, grid)]

    def _score(self, method: str, grid: list[dict]) -> list[dict]:
        return search_method(self.exp.out / "search", self.name, method, grid, self.vectors,
                             self.scorer, self.expert_dev, self.metric, self.key, self.groups)


def lambda_past_edge(points: list[dict]) -> float | None:
    """The next lambda past the grid's edge when the best point's lambda is on it, else None.

    Past the largest: one more step of the last spacing; past the smallest: one step less,
    or half of it when that would not be positive.
    """
    values = sorted({p["params"]["lambda"] for p in points if "lambda" in p["params"]})
    best = best_point(points)["params"].get("lambda")
    if best is None or len(values) < 2:
        return None
    if best == values[-1]:
        return round(values[-1] + (values[-1] - values[-2]), 6)
    if best == values[0]:
        lower = values[0] - (values[1] - values[0])
        return round(lower if lower > 0 else values[0] / 2, 6)
    return None


class Lazy:
    """A value built on first call (task vectors and the dev scorer are expensive)."""

    def __init__(self, build) -> None:
        self.build, self.value = build, None

    def __call__(self):
        if self.value is None:
            self.value = self.build()
        return self.value


def best_point(points: list[dict]) -> dict:
    """The highest dev score; ties go to the earliest grid point."""
    return max(points, key=lambda p: p["dev_score"])


__all__ = ["DevScorer", "Lazy", "SettingSearch", "TaskVectors", "best_point",
           "search_method"]
