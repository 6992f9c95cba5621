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
                  key: str) -> list[dict]:
    """Dev score of every grid point (each cached on its own); returns the points.

    ``vectors``/``scorer`` are built on first use only, so a fully cached search loads no
    weights. Each point is ``{"setting", "method", "params", "dev_score", "seconds"}``.
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
                    delta = vectors().delta(method, rest)
                # no lambda in the grid: the method's default, as `lors merge` would use
                scorer().load(vectors().state(delta, point.get("lambda")))
                results = scorer().results()
                score = normalised_dev_score(results, expert_dev, metric)
                return {"setting": setting, "method": method, "params": point,
                        "dev_score": score, "seconds": time.perf_counter() - started}
            points.append(cached_json(path, run))
    return points


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


__all__ = ["DevScorer", "Lazy", "TaskVectors", "best_point", "search_method"]
