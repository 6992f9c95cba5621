"""Report figures: each function draws one small PNG (Agg canvas, no display) and returns its path.

Figures never touch pyplot's global state, so they are safe to draw from any thread.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..fsutil import atomic_file

DPI = 110
MAX_SWEEP_LINES = 6  # more lines than this are unreadable; plot the best over the others instead


def _figure(width: float = 6.0, height: float = 3.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically; return the path."""
    path = Path(path)
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _ordered(values) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def plot_method_bars(rows: list[dict], path: Path,
                     title: str = "Normalised performance (test)") -> Path:
    """Grouped bars of normalised performance: one group per setting, one bar per model.

    ``rows`` are ``{"setting", "model", "normalised"}``; rows whose ``normalised`` is None
    are skipped. Settings and models keep their first-seen order; a dashed line marks 100 %.
    Raises ValueError when no row has a value.
    """
    values = {(row["setting"], row["model"]): float(row["normalised"])
              for row in rows if row.get("normalised") is not None}
    if not values:
        raise ValueError("no normalised performance to plot")
    settings = _ordered(setting for setting, _ in values)
    models = _ordered(model for _, model in values)
    width = 0.8 / len(models)
    figure = _figure()
    axes = figure.add_subplot()
    for index, model in enumerate(models):
        slots = [(group, values[(setting, model)]) for group, setting in enumerate(settings)
                 if (setting, model) in values]
        xs = [group - 0.4 + width * (index + 0.5) for group, _ in slots]
        bars = axes.bar(xs, [value for _, value in slots], width, label=model,
                        color=f"C{index % 10}")
        axes.bar_label(bars, fmt="%.0f", fontsize=6)
    axes.axhline(100.0, color="0.3", linestyle="--", linewidth=0.8)
    axes.set_xticks(range(len(settings)), settings)
    axes.set_ylabel("normalised performance %")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def _line_key(params: dict, others: list[str]) -> str:
    return ", ".join(f"{name}={params.get(name)}" for name in others)


def _sweep_lines(points: list[dict], param: str) -> dict[str, dict]:
    """Line label -> {x value: best dev score}; lines are the other varying params' values.

    With more than MAX_SWEEP_LINES combinations, one line holds the best score per x value.
    """
    names = _ordered(name for point in points for name in point["params"] if name != param)
    others = [name for name in names
              if len({repr(point["params"].get(name)) for point in points}) > 1]
    labels = [_line_key(point["params"], others) for point in points]
    if len(set(labels)) > MAX_SWEEP_LINES:
        labels = ["best over " + ", ".join(others)] * len(points)
    lines: dict[str, dict] = {}
    for label, point in zip(labels, points):
        line = lines.setdefault(label or "dev", {})
        x = point["params"][param]
        line[x] = max(line.get(x, float("-inf")), float(point["dev_score"]))
    return lines


def plot_sweep(points: list[dict], param: str, path: Path, title: str = "") -> Path:
    """Dev score against hyper-parameter ``param``; one line per value of the other swept params.

    ``points`` are ``{"params": {...}, "dev_score": float}``; points without ``param`` or
    without a score are skipped. Params that take one value in all points do not split
    lines. Numeric ``param`` values go on a numeric axis, others on a categorical one.
    Repeated x values on a line keep the best score. Raises ValueError when nothing is left.
    """
    usable = [point for point in points
              if param in point.get("params", {}) and point.get("dev_score") is not None]
    if not usable:
        raise ValueError(f"no sweep points with parameter {param!r} to plot")
    xs_all = _ordered(point["params"][param] for point in usable)
    numeric = all(isinstance(x, Real) and not isinstance(x, bool) for x in xs_all)
    categories = {x: i for i, x in enumerate(sorted(xs_all, key=str))}
    figure = _figure()
    axes = figure.add_subplot()
    for index, (label, line) in enumerate(_sweep_lines(usable, param).items()):
        xs = sorted(line, key=(lambda x: x) if numeric else str)
        positions = xs if numeric else [categories[x] for x in xs]
        axes.plot(positions, [line[x] for x in xs], marker="o", markersize=3, linewidth=1,
                  label=label, color=f"C{index % 10}")
    if not numeric:
        axes.set_xticks(list(categories.values()), [str(x) for x in categories])
    axes.set_xlabel(param)
    axes.set_ylabel("dev score %")
    axes.set_title(title or f"dev score vs {param}", fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_cosine_heatmap(labels: list[str], matrix: list[list[float]], path: Path,
                        title: str = "Task-vector cosine similarity") -> Path:
    """Annotated heat map of the square cosine ``matrix`` between experts named by ``labels``.

    The colour scale is symmetric around 0 and spans the largest off-diagonal magnitude; the
    diagonal (always about 1) is grey so it does not wash out small cosines. Raises ValueError when the matrix
    is not square with one row per label.
    """
    size = len(labels)
    if size == 0 or len(matrix) != size or any(len(row) != size for row in matrix):
        raise ValueError(f"cosine matrix must be {size}x{size} to match its labels")
    off_diagonal = [abs(matrix[i][j]) for i in range(size) for j in range(size) if i != j]
    limit = max(off_diagonal, default=1.0) or 1.0
    side = min(5.0, 1.6 + 0.45 * size)
    figure = _figure(side + 1.0, side)
    axes = figure.add_subplot()
    values = np.ma.masked_array(np.asarray(matrix, dtype=float), mask=np.eye(size, dtype=bool))
    colours = matplotlib.colormaps["coolwarm"].with_extremes(bad="0.85")
    image = axes.imshow(values, cmap=colours, vmin=-limit, vmax=limit)
    fontsize = 7 if size <= 8 else 5
    for i in range(size):
        for j in range(size):
            axes.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=fontsize)
    axes.set_xticks(range(size), labels, rotation=45, ha="right", fontsize=7)
    axes.set_yticks(range(size), labels, fontsize=7)
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8).ax.tick_params(labelsize=7)
    return _save(figure, path)


def dev_curves(curves: dict[str, list], path: Path, title: str = "Dev score during training",
               ylabel: str = "dev score %", dashed: set[str] | None = None) -> Path:
    """Each model's dev curve: score (a fraction, drawn in percent) against optimizer step.

    ``curves`` maps a label to ``[[step, score], ...]``; points without a score are skipped,
    and so are labels left with none. Labels in ``dashed`` are drawn dashed (e.g. a
    sequential model's score on every pair seen so far). Raises ValueError when nothing is left.
    """
    lines = {label: [(step, 100.0 * float(score)) for step, score in points if score is not None]
             for label, points in curves.items()}
    lines = {label: points for label, points in lines.items() if points}
    if not lines:
        raise ValueError("no dev scores to plot")
    figure = _figure()
    axes = figure.add_subplot()
    for index, (label, points) in enumerate(lines.items()):
        axes.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                  linewidth=1, label=label, color=f"C{index % 10}",
                  linestyle="--" if label in (dashed or set()) else "-")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)
