"""The dev-set hyper-parameter search of one merge method in one setting."""

from __future__ import annotations

import time
from pathlib import Path

from .config import digest
from .devscore import DevScorer, normalised_dev_score
from .stages import cached_json
from .taskvectors import TaskVectors


def _largest_rank_first(points: list[dict]) -> list[dict]:
    """Decompose at the largest rank first so smaller ranks reuse its factors."""
    return sorted(points, key=lambda p: -(p.get("rank") or 0))


def search_method(folder: Path, setting: str, method: str, grid: list[dict],
                  vectors: "Lazy", scorer: "Lazy", expert_dev: dict, metric: str,
                  key: str, groups: dict[str, str] | None = None) -> list[dict]:
    """Dev score of every grid point (each cached on its own); returns the points.

    ``vectors``/``scorer`` are built on first use only, so a fully cached search loads no
    weights. ``groups`` are per-group op overrides (part of ``key``, which names the cache). Each point is ``{"setting", "method", "params", "dev_score", "seconds"}``.
    """
    by_rest: dict[str, list[dict]] = {}
    for point in grid:
        rest = {k: v for k, v in point.items() if k != "lambda"}
        by_rest.setdefault(digest(rest), []).append(point)
    points = []
    for group in _largest_rank_first([g[0] for g in by_rest.values()]):
        rest = {k: v for k, v in group.items() if k != "lambda"}
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
                scorer().load(vectors().state(delta, point.get("lambda")))
                results = scorer().results()
                score = normalised_dev_score(results, expert_dev, metric)
                return {"setting": setting, "method": method, "params": point,
                        "dev_score": score, "seconds": time.perf_counter() - started}
            points.append(cached_json(path, run))
    return points


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
