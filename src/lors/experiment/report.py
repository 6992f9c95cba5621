"""Write the experiment report: ``report.md``, self-contained ``report.html`` and ``plots/*.png``.

Sections whose data the experiment dict lacks are left out. The per-setting tables are in
:mod:`.report_sections`, the figures in :mod:`.plots`, rendering in :mod:`.report_document`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..fsutil import atomic_file
from . import plots
from .report_document import (Block, Bullets, Heading, Image, Paragraph, render_html,
                              render_markdown, render_plain)
from .report_sections import (best_sweep_line, bootstrap_note, chosen_params, cost_table,
                              excluded_note, extensibility_table, paired_table, score_table,
                              significance_lines, size_table, summary_setting,
                              sweeps_by_method, swept_params)


class _PlotFolder:
    """Hands out unique, file-system-safe PNG names under one ``plots`` folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.used: set[str] = set()

    def path(self, *parts: str) -> Path:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-.") or "plot"
        name, counter = stem, 2
        while name in self.used:
            name, counter = f"{stem}-{counter}", counter + 1
        self.used.add(name)
        return self.folder / f"{name}.png"


def _image(path: Path, caption: str) -> Image:
    return Image(path, f"plots/{path.name}", caption)


def _setting_label(setting: dict) -> str:
    title, name = setting.get("title"), setting.get("name", "?")
    return f"{title} ({name})" if title and title != name else name


def _overview(experiment: dict, folder: _PlotFolder) -> list[Block]:
    """The bar chart of every model's normalised performance per setting."""
    rows = [{"setting": setting.get("name", "?"), "model": model["name"],
             "normalised": model.get("normalised")}
            for setting in experiment.get("settings") or [] for model in setting.get("models", [])]
    if not any(row["normalised"] is not None for row in rows):
        return []
    path = plots.plot_method_bars(rows, folder.path("normalised-bars"))
    return [Heading(2, "Normalised performance"),
            Paragraph("Each pair's score relative to that pair's own expert, averaged over the "
                      "setting's pairs; 100 % = as good as every expert at once."),
            _image(path, "Normalised performance per setting and model (test)")]


def _setting_section(setting: dict) -> list[Block]:
    """Scores, chosen hyper-parameters and cost of one setting's models."""
    blocks: list[Block] = [Heading(2, _setting_label(setting))]
    if not setting.get("models"):
        return blocks + [Paragraph("No models were evaluated in this setting.")]
    blocks.append(score_table(setting))
    legend = "WER in percent (lower is better), BLEU (higher is better); best per column in bold."
    if any(model.get("kind") == "expert" for model in setting["models"]):
        legend += " The expert row shows each pair's own expert (one model per pair)."
    blocks.append(Paragraph(legend))
    blocks += [Paragraph(note) for note in (bootstrap_note(setting), excluded_note(setting))
               if note]
    paired = paired_table(setting)
    if paired is not None:
        blocks += [Heading(3, "Paired tests"),
                   Paragraph("Difference in normalised % (model - reference) over the same "
                             "bootstrap resamples; significant = its interval excludes 0; "
                             "p = two-sided bootstrap p-value."),
                   paired, Paragraph("Significant: " + "; ".join(significance_lines(setting))
                                     + ".")]
    if chosen_params(setting):
        blocks += [Paragraph("Hyper-parameters chosen on dev:"), Bullets(chosen_params(setting))]
    costs = cost_table(setting)
    if costs is not None:
        blocks += [Heading(3, "Cost"), costs]
    return blocks


def _sweep_section(experiment: dict, folder: _PlotFolder) -> list[Block]:
    """Per setting and method: the best dev point and dev score against each swept parameter."""
    sweeps = experiment.get("sweeps") or []
    blocks: list[Block] = []
    for setting in dict.fromkeys(point.get("setting") for point in sweeps):
        groups = sweeps_by_method(sweeps, setting)
        blocks += [Heading(3, f"Setting {setting}"),
                   Bullets([best_sweep_line(method, points) for method, points in groups.items()])]
        for method, points in groups.items():
            points = [p for p in points if not p.get("blocks")]  # grid axes; blocks are random
            for param in swept_params(points):
                path = plots.plot_sweep(points, param, folder.path("sweep", setting, method, param),
                                        title=f"{method} on {setting}: dev score vs {param}")
                blocks.append(_image(path, f"{method} ({setting}): dev score vs {param}"))
    return [Heading(2, "Hyper-parameter search (dev)")] + blocks if blocks else []


def _cosine_section(experiment: dict, folder: _PlotFolder) -> list[Block]:
    """One heat map of task-vector cosines per entry."""
    blocks: list[Block] = []
    for entry in experiment.get("cosines") or []:
        setting = entry.get("setting", "?")
        path = plots.plot_cosine_heatmap(entry["labels"], entry["matrix"],
                                         folder.path("cosine", setting),
                                         title=f"Task-vector cosines ({setting})")
        blocks.append(_image(path, f"Cosine similarity of the experts' task vectors ({setting})"))
    return [Heading(2, "Task-vector similarity")] + blocks if blocks else []


def _extensibility_section(experiment: dict) -> list[Block]:
    extensibility = experiment.get("extensibility")
    if not extensibility or not extensibility.get("rows"):
        return []
    language = extensibility.get("language", "?")
    blocks = [Heading(2, f"Adding a language ({language})"), extensibility_table(extensibility)]
    if extensibility.get("note"):
        blocks.append(Paragraph(extensibility["note"]))
    return blocks


def _undertrained_experts(entries: list[dict]) -> list[str]:
    """One line per pair whose own expert has a lower best dev score than an MTL model's dev
    score on that pair at the MTL model's best step (the same dev clips and dev score)."""
    experts = {}
    for entry in entries:
        if entry.get("kind") == "expert" and len(entry.get("pairs") or []) == 1:
            pair = "-".join(entry["pairs"][0])
            score = (entry.get("best_dev_pairs") or {}).get(pair, entry.get("best_dev_score"))
            experts[pair] = (score, entry.get("select"))
    lines = []
    for entry in entries:
        if entry.get("kind") not in ("mtl", "mtl_plateau"):
            continue
        for pair, score in (entry.get("best_dev_pairs") or {}).items():
            own, select = experts.get(pair, (None, None))
            if own is not None and score is not None and select == entry.get("select") \
                    and score > own:
                where = f" ({entry['setting']})" if entry.get("setting") else ""
                lines.append(f"{pair}: its expert reaches {100 * own:.1f} % dev {select}, "
                             f"{entry.get('name', 'the MTL model')}{where} {100 * score:.1f} %")
    return lines


def _training_section(experiment: dict, folder: _PlotFolder) -> list[Block]:
    """Optimizer steps, samples and dev checks of every trained model, their dev curves, and
    the under-trained experts (a pair whose own expert an MTL model beats on dev).

    Reads ``experiment["training"]``, one entry per trained model: what
    ``stages.trained_model`` returns (``steps``, ``samples``, ``stopped_early``,
    ``dev_curve``, ``select``, ``best_step``, ``best_dev_score``, ``best_dev_pairs``,
    ``train_s``; ``dev_seen_curve`` for a sequential model) plus ``name``, ``kind``
    (``expert``, ``mtl``, ``mtl_plateau``, ``sequential``), ``setting`` (None for an expert)
    and ``pairs``. Left out when absent.
    """
    from .report_document import Table
    from .report_sections import fmt

    entries = experiment.get("training") or []
    if not entries:
        return []
    rows = []
    for entry in entries:
        curve = entry.get("dev_curve") or []
        best = entry.get("best_dev_score")
        rows.append([entry.get("name", "?"), entry.get("setting") or "-",
                     "-" if entry.get("steps") is None else str(entry["steps"]),
                     "-" if entry.get("samples") is None else str(entry["samples"]),
                     str(len(curve)), "-" if entry.get("best_step") is None
                     else str(entry["best_step"]), fmt(None if best is None else 100 * best),
                     "yes" if entry.get("stopped_early") else "no", fmt(entry.get("train_s"))])
    select = next((e["select"] for e in entries if e.get("select")), "score")
    blocks: list[Block] = [
        Heading(2, "Training"),
        Paragraph("Optimizer steps and samples each model was trained on, its dev checks, the "
                  f"step and dev {select} of the checkpoint kept, and whether it stopped on a "
                  "dev plateau before its cap. A sequential model's dev checks are its "
                  "stages', each judged on its own pair."),
        Table(["model", "setting", "steps", "samples", "dev checks", "best step",
               f"best dev {select} %", "stopped early", "train s"], rows, left_columns=2)]
    flags = _undertrained_experts(entries)
    blocks.append(Heading(3, "Under-trained experts"))
    blocks.append(Bullets(flags) if flags else Paragraph(
        "No expert is beaten on its own pair's dev set by an MTL model."))
    if flags:
        blocks.append(Paragraph("An MTL model scoring higher on a pair's dev set than that "
                                "pair's own expert suggests the expert stopped short of what "
                                "its data allows; normalised scores against it flatter the "
                                "other models."))
    groups = {"experts": [e for e in entries if e.get("kind") == "expert"]}
    for entry in entries:
        if entry.get("kind") != "expert":
            groups.setdefault(entry.get("setting") or "?", []).append(entry)
    for group, members in groups.items():
        curves, dashed = {}, set()
        for entry in members:
            curves[entry.get("name", "?")] = entry.get("dev_curve") or []
            if entry.get("dev_seen_curve"):
                label = f"{entry.get('name', '?')} (all pairs seen)"
                curves[label] = entry["dev_seen_curve"]
                dashed.add(label)
        if not any(score is not None for points in curves.values() for _, score in points):
            continue
        title = "Experts" if group == "experts" else f"Setting {group}"
        path = plots.dev_curves(curves, folder.path("dev-curves", group),
                                title=f"{title}: dev {select} during training",
                                ylabel=f"dev {select} %", dashed=dashed)
        blocks.append(_image(path, f"Dev curves: {title}"))
    return blocks


def report_blocks(experiment: dict, plots_dir: Path) -> list[Block]:
    """The whole report as blocks; draws its figures into ``plots_dir`` on the way."""
    folder = _PlotFolder(Path(plots_dir))
    blocks: list[Block] = [Heading(1, f"Experiment: {experiment.get('name', 'unnamed')}")]
    if experiment.get("size"):
        blocks += [Heading(2, "Run size"), size_table(experiment["size"])]
    blocks += _overview(experiment, folder)
    for setting in experiment.get("settings") or []:
        blocks += _setting_section(setting)
    blocks += _training_section(experiment, folder)
    blocks += _sweep_section(experiment, folder)
    blocks += _cosine_section(experiment, folder)
    blocks += _extensibility_section(experiment)
    if experiment.get("notes"):
        blocks += [Heading(2, "Notes"), Bullets([str(note) for note in experiment["notes"]])]
    return blocks


def _write_text(path: Path, text: str) -> Path:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def write_report(experiment: dict, out_dir: Path) -> dict:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` under ``out_dir`` (each atomically).

    Returns ``{"markdown": Path, "html": Path, "plots": [Path, ...]}``. The Markdown links
    the PNGs as ``plots/<name>.png``; the HTML embeds them and references nothing outside.
    Existing files of the same names are replaced; other files in ``plots/`` are left alone.
    """
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(experiment, plots_dir)
    title = f"Experiment: {experiment.get('name', 'unnamed')}"
    markdown = _write_text(out_dir / "report.md", render_markdown(blocks))
    page = _write_text(out_dir / "report.html", render_html(blocks, title))
    images = [block.path for block in blocks if isinstance(block, Image)]
    return {"markdown": markdown, "html": page, "plots": images}


def format_summary_table(experiment: dict) -> str:
    """Plain-text table of the most complete setting (see :func:`summary_setting`).

    One row per model: ``model``, one column per pair (``de asr WER%``, ``de st BLEU``) and
    ``normalised %`` (``value [lo, hi]`` and a ``geometric %`` column when the bootstrap ran).
    Below the table, when present: how the intervals were made and the test size per pair,
    the excluded pairs, and the significant paired differences (against lors and mtl).
    Returns ``"no results"`` when the experiment has no settings.
    """
    setting = summary_setting(experiment)
    if setting is None:
        return "no results"
    lines = [render_plain(score_table(setting))]
    lines += [note for note in (bootstrap_note(setting), excluded_note(setting)) if note]
    significant = significance_lines(setting)
    if significant:
        lines.append("paired tests of normalised % (significant differences): "
                     + "; ".join(significant))
    return "\n".join(lines)
