"""Normalised performance by hand, and the experiment report (Markdown, HTML, PNGs, summary)."""

from __future__ import annotations

import pytest

from lors.experiment.normalised import BLEU_FLOOR, WER_FLOOR, normalised_performance
from lors.experiment.report import format_summary_table, write_report

EXPERTS = {("de", "asr"): {"language": "de", "task": "asr", "wer": 0.2},
           ("de", "st"): {"language": "de", "task": "st", "bleu": 20.0}}


def test_normalised_performance_by_hand():
    method = [{"language": "de", "task": "asr", "wer": 0.25},
              {"language": "de", "task": "st", "bleu": 10.0}]
    result = normalised_performance(method, EXPERTS)
    assert [pair["ratio"] for pair in result["pairs"]] == pytest.approx([0.8, 0.5])
    assert result["percent"] == pytest.approx(65.0)
    assert result["pairs"][0]["language"] == "de" and result["pairs"][1]["task"] == "st"


def test_experts_normalise_to_100():
    assert normalised_performance(list(EXPERTS.values()), EXPERTS)["percent"] == pytest.approx(100)


def test_zero_scores_are_floored():
    perfect = [{"language": "de", "task": "asr", "wer": 0.0}]
    assert normalised_performance(perfect, EXPERTS)["percent"] == pytest.approx(100 * 0.2 / WER_FLOOR)
    zero_experts = {("de", "asr"): {"wer": 0.0}, ("de", "st"): {"bleu": 0.0}}
    both_zero = [{"language": "de", "task": "asr", "wer": 0.0},
                 {"language": "de", "task": "st", "bleu": 0.0}]
    assert normalised_performance(both_zero, zero_experts)["percent"] == pytest.approx(100)
    some_bleu = [{"language": "de", "task": "st", "bleu": 5.0}]
    ratio = normalised_performance(some_bleu, zero_experts)["pairs"][0]["ratio"]
    assert ratio == pytest.approx(5.0 / BLEU_FLOOR)


def test_missing_expert_names_the_pair():
    with pytest.raises(ValueError, match="fr.*asr"):
        normalised_performance([{"language": "fr", "task": "asr", "wer": 0.3}], EXPERTS)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no method results"):
        normalised_performance([], EXPERTS)
    with pytest.raises(ValueError, match="'wer'"):
        normalised_performance([{"language": "de", "task": "asr"}], EXPERTS)


def _model(name, kind, scores, normalised, params=None):
    results = [{"language": lang, "task": "asr", "n": 10, "wer": value / 100, "cer": 0.1}
               if task == "asr" else
               {"language": lang, "task": "st", "n": 10, "bleu": value, "chrf": 40.0}
               for (lang, task), value in scores.items()]
    model = {"name": name, "kind": kind, "results": results, "normalised": normalised,
             "cost": {"train_s": 12.5, "merge_s": None, "eval_s": 3.0, "device": "cpu"}}
    if params:
        model["params"] = params
    return model


def _experiment() -> dict:
    pairs = [("de", "asr"), ("fr", "asr"), ("de", "st")]
    models = [_model("base", "zero-shot", dict(zip(pairs, (40.0, 45.0, 5.0))), 40.0),
              _model("expert", "expert", dict(zip(pairs, (20.0, 22.0, 20.0))), 100.0),
              _model("mtl", "mtl", dict(zip(pairs, (21.0, 23.0, 18.0))), 93.0),
              _model("lors", "merge", dict(zip(pairs, (24.0, 25.0, 17.0))), 86.0,
                     {"lambda": 0.2, "rank": 7, "keep": 0.2}),
              _model("ties", "merge", dict(zip(pairs, (26.0, 27.0, 15.0))), None)]
    asr_models = [_model(m["name"], m["kind"], {("de", "asr"): 30.0}, 90.0) for m in models[:3]]
    sweeps = [{"setting": "all", "method": "lors", "params": {"lambda": 0.2, "rank": r, "keep": k},
               "dev_score": 80 + r - 10 * k} for r in (1, 3, 7) for k in (0.1, 0.2)]
    sweeps += [{"setting": "all", "method": "ties", "params": {"lambda": lam, "keep": 0.2},
                "dev_score": 70 + 10 * lam} for lam in (0.2, 0.5, 1.0)]
    return {
        "name": "synthetic | test",
        "size": {"languages": ["de", "fr"], "tasks": ["asr", "st"], "train_per_pair": 40,
                 "steps": 60, "mode": "freeze-encoder", "base": "runs/a|b"},
        "settings": [{"name": "asr", "title": "Multi-lingual ASR", "pairs": [["de", "asr"]],
                      "models": asr_models},
                     {"name": "all", "title": "All pairs", "pairs": [list(p) for p in pairs],
                      "models": models}],
        "sweeps": sweeps,
        "cosines": [{"setting": "all", "labels": ["de-asr", "fr-asr", "de-st"],
                     "matrix": [[1.0, 0.1, 0.3], [0.1, 1.0, -0.05], [0.3, -0.05, 1.0]]}],
        "extensibility": {"language": "it", "rows": [
            {"name": "add-to-merge", "normalised": 85.0, "cost_s": 2.0},
            {"name": "re-merge", "normalised": 86.0, "cost_s": 5.0},
            {"name": "retrain-mtl", "normalised": 92.0, "cost_s": 300.0}]},
        "notes": ["tiny run; numbers are not the paper's"],
    }


def test_write_report_writes_self_contained_outputs(tmp_path):
    experiment = _experiment()
    written = write_report(experiment, tmp_path / "report")
    markdown = written["markdown"].read_text()
    page = written["html"].read_text()
    assert written["plots"] and all(path.is_file() and path.suffix == ".png"
                                    for path in written["plots"])
    assert all(path.parent == tmp_path / "report" / "plots" for path in written["plots"])
    for path in written["plots"]:
        assert f"(plots/{path.name})" in markdown
    assert page.count("data:image/png;base64,") == len(written["plots"])
    assert 'src="http' not in page and "href=" not in page and "<link" not in page
    names = {model["name"] for setting in experiment["settings"] for model in setting["models"]}
    for name in names | {"add-to-merge", "re-merge", "retrain-mtl"}:
        assert name in markdown and name in page
    assert "de asr WER%" in markdown and "de st BLEU" in markdown
    assert "**20.0**" in markdown  # best de asr WER (expert) and best de st BLEU (expert)
    assert "<strong>100.0</strong>" in page
    assert "runs/a\\|b" in markdown  # pipes in cells are escaped in Markdown
    assert not [p for p in (tmp_path / "report").rglob(".*tmp*")]  # no temporary files left
    sweeps = [path.name for path in written["plots"] if path.name.startswith("sweep")]
    assert {"sweep-all-lors-rank.png", "sweep-all-lors-keep.png",
            "sweep-all-ties-lambda.png"} <= set(sweeps)
    assert "sweep-all-lors-lambda.png" not in sweeps  # lambda was not swept for lors


def test_write_report_omits_missing_sections(tmp_path):
    minimal = {"name": "bare", "settings": [{"name": "asr", "models": [
        _model("base", "zero-shot", {("de", "asr"): 40.0}, None)]}]}
    written = write_report(minimal, tmp_path)
    markdown = written["markdown"].read_text()
    assert written["plots"] == []
    assert "base" in markdown and "40.0" in markdown
    assert "Hyper-parameter" not in markdown and "Notes" not in markdown


def test_summary_table_lists_every_model_of_the_most_complete_setting():
    table = format_summary_table(_experiment())
    lines = table.splitlines()
    assert lines[0].split() == ["model", "de", "asr", "WER%", "fr", "asr", "WER%",
                                "de", "st", "BLEU", "normalised", "%"]
    for name in ("base", "expert", "mtl", "lors", "ties"):
        assert any(line.startswith(name + " ") for line in lines[1:])
    assert "24.0" in table and "86.0" in table
    assert format_summary_table({"name": "empty"}) == "no results"


def test_plots_edge_cases(tmp_path):
    from lors.experiment.plots import plot_cosine_heatmap, plot_method_bars, plot_sweep

    many = [{"params": {"rank": r, "keep": k, "lambda": lam}, "dev_score": len(r) + k + lam}
            for r in ("low", "high") for k in (0.1, 0.2, 0.3) for lam in (0.2, 0.5, 1.0)]
    assert plot_sweep(many, "rank", tmp_path / "many.png").stat().st_size > 0  # best-over line
    with pytest.raises(ValueError, match="rank"):
        plot_sweep([{"params": {"keep": 0.1}, "dev_score": 1.0}], "rank", tmp_path / "x.png")
    with pytest.raises(ValueError, match="2x2"):
        plot_cosine_heatmap(["a", "b"], [[1.0, 0.0]], tmp_path / "c.png")
    with pytest.raises(ValueError, match="no normalised"):
        plot_method_bars([{"setting": "s", "model": "m", "normalised": None}], tmp_path / "b.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "c.png").exists()


def test_pairs_come_from_results_when_the_setting_lists_none():
    experiment = {"settings": [{"name": "st", "models": [
        _model("a", "merge", {("fr", "st"): 12.0}, 60.0),
        _model("b", "merge", {("fr", "st"): 12.0}, 70.0)]}]}
    header, first, second = format_summary_table(experiment).splitlines()
    assert header.split() == ["model", "fr", "st", "BLEU", "normalised", "%"]
    assert first.split() == ["a", "12.0", "60.0"] and second.split() == ["b", "12.0", "70.0"]
