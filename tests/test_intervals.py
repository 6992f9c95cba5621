"""Bootstrap intervals, paired tests, weak-expert exclusion and `lors eval A B` (intervals.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_tiny_speech
from lors.evaluation.metrics import bleu, wer
from lors.experiment.intervals import (asr_statistics, bootstrap_normalised, compare_models,
                                       corpus_score, paired_test, percentile_interval,
                                       resample_counts, st_statistics)
from lors.experiment.normalised import (geometric_mean, normalised_performance,
                                        pair_ratio)
from lors.experiment.report import format_summary_table, write_report

WORDS = "eins zwei drei vier fünf sechs sieben acht neun zehn".split()
SENTENCES = ["the quick brown fox jumps over the lazy dog",
             "a small cat sleeps on the warm red mat",
             "we walked along the river in the early morning",
             "she reads a long book about old ships",
             "the train to the city leaves at nine"]


def _asr(edits: list[int], copies: int = 1) -> list[dict]:
    """Records of 4-word references whose hypotheses have ``edits[i]`` substitutions."""
    records = []
    for c in range(copies):
        for i, k in enumerate(edits):
            ref = WORDS[i:i + 4]
            hyp = ["falsch"] * k + ref[k:]
            records.append({"id": f"a{c}-{i}", "reference": " ".join(ref),
                            "hypothesis": " ".join(hyp)})
    return records


def _st(wrong: list[int], copies: int = 1) -> list[dict]:
    """Records whose hypotheses replace the first ``wrong[i]`` words of the reference."""
    records = []
    for c in range(copies):
        for i, k in enumerate(wrong):
            ref = SENTENCES[i].split()
            hyp = ["zzz"] * k + ref[k:]
            records.append({"id": f"s{c}-{i}", "reference": " ".join(ref),
                            "hypothesis": " ".join(hyp)})
    return records


EXPERT = {"asr": [0, 1, 2, 1, 0], "st": [1, 0, 2, 1, 0]}
GOOD = {"asr": [0, 1, 1, 0, 0], "st": [0, 0, 1, 0, 0]}
BAD = {"asr": [2, 3, 2, 3, 4], "st": [5, 4, 6, 5, 4]}
PAIRS = [("de", "asr"), ("de", "st")]


def _by_pair(spec: dict, copies: int = 1) -> dict:
    return {("de", "asr"): _asr(spec["asr"], copies), ("de", "st"): _st(spec["st"], copies)}


def _results(by_pair: dict) -> list[dict]:
    """The corpus scores the evaluation reports (metrics.wer / metrics.bleu)."""
    out = []
    for (language, task), records in by_pair.items():
        refs = [r["reference"] for r in records]
        hyps = [r["hypothesis"] for r in records]
        score = {"wer": wer(refs, hyps, language)} if task == "asr" else {"bleu": bleu(refs, hyps)}
        out.append({"language": language, "task": task, **score})
    return out


def _setting(copies: int = 1, **kwargs) -> dict:
    models = {"lors": _by_pair(GOOD, copies), "mtl": _by_pair(BAD, copies),
              "copy": _by_pair(GOOD, copies), "expert": _by_pair(EXPERT, copies)}
    return bootstrap_normalised(models, _by_pair(EXPERT, copies), **kwargs)


# ---------------------------------------------------------------- statistics = corpus scores


MESSY_REFS = ["Das ist ein Test.", "", "Hallo, Welt!", "eins zwei drei vier", "Ünd   jetzt?",
              "the cat sat on the mat .", "It's 5 o'clock"]
MESSY_HYPS = ["das ist kein test", "oh nein", "", "eins zwei drei", "und jetzt",
              "the cat sat on a mat", "it is five o'clock"]


@pytest.mark.parametrize("language", ["de", "en", None])
def test_asr_statistics_sum_to_the_reported_wer(language):
    stats = asr_statistics(MESSY_REFS, MESSY_HYPS, language)
    assert stats.shape == (len(MESSY_REFS), 2) and stats[1, 1] == 0 and stats[1, 0] == 2
    assert corpus_score("asr", stats.sum(axis=0)) == pytest.approx(
        wer(MESSY_REFS, MESSY_HYPS, language), abs=1e-9)
    for i, (ref, hyp) in enumerate(zip(MESSY_REFS, MESSY_HYPS)):
        if stats[i, 1]:  # one utterance alone: its own WER
            assert stats[i, 0] / stats[i, 1] == pytest.approx(wer([ref], [hyp], language),
                                                              abs=1e-9)


def test_st_statistics_sum_to_the_reported_bleu():
    stats = st_statistics(MESSY_REFS, MESSY_HYPS)
    assert stats.shape == (len(MESSY_REFS), 10)
    assert corpus_score("st", stats.sum(axis=0)) == pytest.approx(
        bleu(MESSY_REFS, MESSY_HYPS), abs=1e-6)
    records = _st(BAD["st"], copies=3)
    refs, hyps = [r["reference"] for r in records], [r["hypothesis"] for r in records]
    assert corpus_score("st", st_statistics(refs, hyps).sum(axis=0)) == pytest.approx(
        bleu(refs, hyps), abs=1e-6)
    assert corpus_score("st", st_statistics(["a b"], [""]).sum(axis=0)) == 0.0


# ---------------------------------------------------------------- normalised.py


def test_geometric_mean_beside_the_arithmetic_mean():
    experts = {("de", "asr"): {"wer": 0.2}, ("de", "st"): {"bleu": 20.0}}
    method = [{"language": "de", "task": "asr", "wer": 0.25},
              {"language": "de", "task": "st", "bleu": 10.0}]
    result = normalised_performance(method, experts)
    assert result["percent"] == pytest.approx(65.0)
    assert result["geometric"] == pytest.approx(100 * math.sqrt(0.8 * 0.5))
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert result["excluded"] == [] and not result["all_excluded"]


def test_pairs_with_a_weak_expert_are_flagged_and_excluded():
    experts = {("de", "asr"): {"wer": 0.2}, ("de", "st"): {"bleu": 3.0},
               ("fr", "asr"): {"wer": 1.5}}
    method = [{"language": "de", "task": "asr", "wer": 0.4},
              {"language": "de", "task": "st", "bleu": 6.0},
              {"language": "fr", "task": "asr", "wer": 0.9}]
    result = normalised_performance(method, experts)
    assert result["percent"] == pytest.approx(50.0) and result["geometric"] == pytest.approx(50.0)
    assert [p["excluded"] for p in result["pairs"]] == [False, True, True]
    assert result["pairs"][1]["ratio"] == pytest.approx(2.0)  # still reported
    assert [(e["language"], e["task"]) for e in result["excluded"]] == [("de", "st"), ("fr", "asr")]
    assert "BLEU 3.0 < 5" in result["excluded"][0]["reason"]
    assert "150.0 % > 100 %" in result["excluded"][1]["reason"]
    # the floors are parameters; None disables one
    looser = normalised_performance(method, experts, min_expert_bleu=2.0, max_expert_wer=None)
    assert looser["percent"] == pytest.approx(100 * (0.5 + 2.0 + 1.5 / 0.9) / 3)
    # every expert below the floor: flagged, the means fall back to all pairs
    weak = normalised_performance(method[1:], experts)
    assert weak["all_excluded"] and weak["percent"] == pytest.approx(100 * (2.0 + 1.5 / 0.9) / 2)
    assert pair_ratio(method[0], experts[("de", "asr")]) == pytest.approx(0.5)


# ---------------------------------------------------------------- the bootstrap


def test_point_values_equal_normalised_performance_of_the_reported_scores():
    out = _setting()
    experts = {(r["language"], r["task"]): r for r in _results(_by_pair(EXPERT))}
    for name, spec in (("lors", GOOD), ("mtl", BAD)):
        expected = normalised_performance(_results(_by_pair(spec)), experts)
        assert out[name]["normalised"] == pytest.approx(expected["percent"], abs=1e-9)
        assert out[name]["normalised_geometric"] == pytest.approx(expected["geometric"], abs=1e-9)
    assert out["expert"]["normalised"] == pytest.approx(100.0)
    assert out["expert"]["normalised_interval"] == pytest.approx([100.0, 100.0])
    assert out["lors"]["test_per_pair"] == {"de-asr": 5, "de-st": 5}
    assert out["lors"]["bootstrap"] == {"replicates": 1000, "confidence": 0.9, "seed": 0}
    assert json.loads(json.dumps(out)) == out  # plain JSON types only


def test_intervals_contain_the_point_and_shrink_with_more_utterances():
    small, large = _setting(copies=1), _setting(copies=20)
    for out in (small, large):
        for name in ("lors", "mtl"):
            lo, hi = out[name]["normalised_interval"]
            assert lo <= out[name]["normalised"] <= hi and lo < hi
            glo, ghi = out[name]["normalised_geometric_interval"]
            assert glo <= out[name]["normalised_geometric"] <= ghi
    for name in ("lors", "mtl"):
        small_lo, small_hi = small[name]["normalised_interval"]
        large_lo, large_hi = large[name]["normalised_interval"]
        assert large_hi - large_lo < 0.5 * (small_hi - small_lo)
    assert large["lors"]["test_per_pair"] == {"de-asr": 100, "de-st": 100}


def test_a_model_against_itself_differs_by_exactly_zero():
    out = _setting(references=("lors", "mtl"))
    same = out["copy"]["paired"]["lors"]
    assert same == {"difference": 0.0, "interval": [0.0, 0.0], "p_value": 1.0,
                    "significant": False}
    assert "lors" not in out["lors"]["paired"] and set(out["lors"]["paired"]) == {"mtl"}
    assert set(out["expert"]["paired"]) == {"lors", "mtl"}


def test_a_clearly_better_model_is_significant():
    out = _setting(copies=4)
    worse = out["mtl"]["paired"]["lors"]
    assert worse["significant"] and worse["difference"] < 0 and worse["interval"][1] < 0
    assert worse["p_value"] < 0.01
    assert worse["difference"] == pytest.approx(out["mtl"]["normalised"]
                                                - out["lors"]["normalised"])
    better = out["lors"]["paired"]["mtl"]
    assert better["significant"] and better["interval"][0] > 0
    assert better["difference"] == pytest.approx(-worse["difference"])


def test_the_bootstrap_is_seeded():
    assert _setting(seed=3) == _setting(seed=3)
    interval = _setting(seed=3)["lors"]["normalised_interval"]
    assert interval != _setting(seed=4)["lors"]["normalised_interval"]
    fewer = _setting(replicates=50, confidence=0.5)
    assert fewer["lors"]["bootstrap"] == {"replicates": 50, "confidence": 0.5, "seed": 0}


def test_a_weak_expert_pair_is_excluded_from_the_bootstrap_means():
    experts = _by_pair(EXPERT)
    experts[("de", "st")] = _st([9, 9, 9, 8, 8])  # expert BLEU ~0: below the floor
    models = {"lors": _by_pair(GOOD), "mtl": _by_pair(BAD)}
    out = bootstrap_normalised(models, experts)
    assert [(e["language"], e["task"]) for e in out["lors"]["excluded_pairs"]] == [("de", "st")]
    assert not out["lors"]["all_pairs_excluded"]
    asr = {("de", "asr"): experts[("de", "asr")]}
    only_asr = bootstrap_normalised(
        {name: {("de", "asr"): by_pair[("de", "asr")]} for name, by_pair in models.items()}, asr)
    assert out["lors"]["normalised"] == pytest.approx(only_asr["lors"]["normalised"])
    assert out["lors"]["normalised"] == pytest.approx(100 * 0.2 / 0.1)
    kept = bootstrap_normalised(models, experts, min_expert_bleu=None)
    assert kept["lors"]["excluded_pairs"] == []
    assert kept["lors"]["normalised"] != out["lors"]["normalised"]


def test_mismatched_test_sets_are_refused():
    models = {"lors": _by_pair(GOOD)}
    models["lors"][("de", "asr")] = models["lors"][("de", "asr")][:4]
    with pytest.raises(ValueError, match="de-asr.*same test set"):
        bootstrap_normalised(models, _by_pair(EXPERT))
    with pytest.raises(ValueError, match="no results for pair"):
        bootstrap_normalised({"lors": {("de", "asr"): _asr(GOOD["asr"])}}, _by_pair(EXPERT))


def test_interval_and_paired_test_definitions():
    assert percentile_interval(np.arange(101), 0.9) == pytest.approx([5.0, 95.0])
    assert percentile_interval([np.nan, 1.0, 3.0], 0.5) == pytest.approx([1.5, 2.5])
    test = paired_test(np.arange(1, 11, dtype=float), np.zeros(10), 5.0, 0.9)
    assert test["significant"] and test["p_value"] == pytest.approx(2 / 11)
    mixed = paired_test(np.array([-1.0, 1.0, 2.0, 3.0]), np.zeros(4), 1.0, 0.9)
    assert not mixed["significant"] and mixed["p_value"] == pytest.approx(min(1, 2 * 2 / 5))
    counts = resample_counts(7, 30, np.random.default_rng(0))
    assert counts.shape == (30, 7) and (counts.sum(axis=1) == 7).all()


def test_compare_models_per_pair():
    models = {"ref": _by_pair(GOOD, 4), "same": _by_pair(GOOD, 4), "worse": _by_pair(BAD, 4)}
    out = compare_models(models, replicates=300)
    assert out["reference"] == "ref" and out["replicates"] == 300
    assert [(p["language"], p["task"], p["n"], p["metric"]) for p in out["pairs"]] == [
        ("de", "asr", 20, "wer"), ("de", "st", 20, "bleu")]
    for pair, expected in zip(out["pairs"], _results(_by_pair(GOOD, 4))):
        ref, same, worse = pair["models"]
        assert ref["difference"] is None and ref["significant"] is None
        key = pair["metric"]
        assert ref["score"] == pytest.approx(expected[key], abs=1e-6)
        assert ref["interval"][0] <= ref["score"] <= ref["interval"][1]
        assert same["difference"] == 0.0 and same["p_value"] == 1.0 and not same["significant"]
        assert worse["significant"]
        assert (worse["difference"] > 0) == (key == "wer")  # worse: higher WER, lower BLEU


# ---------------------------------------------------------------- report


def _experiment_with_intervals() -> dict:
    intervals = _setting()
    models = []
    for name, spec in (("expert", EXPERT), ("lors", GOOD), ("mtl", BAD)):
        experts = {(r["language"], r["task"]): r for r in _results(_by_pair(EXPERT))}
        results = _results(_by_pair(spec))
        model = {"name": name, "kind": name, "results": results,
                 "normalised": normalised_performance(results, experts)["percent"]}
        model.update({k: v for k, v in intervals[name].items() if k != "normalised"})
        models.append(model)
    return {"name": "intervals", "settings": [{"name": "all", "pairs": [list(p) for p in PAIRS],
                                                "models": models}]}


def test_report_and_summary_print_intervals_sizes_and_paired_tests(tmp_path):
    experiment = _experiment_with_intervals()
    lors = experiment["settings"][0]["models"][1]
    lo, hi = lors["normalised_interval"]
    table = format_summary_table(experiment)
    header = table.splitlines()[0]
    assert "normalised %" in header and "geometric %" in header
    assert f"{lors['normalised']:.1f} [{lo:.1f}, {hi:.1f}]" in table
    assert "1000 replicates" in table and "de-asr 5, de-st 5" in table
    assert "paired tests" in table
    markdown = write_report(experiment, tmp_path)["markdown"].read_text()
    assert "Paired tests" in markdown and "| lors | mtl |" in markdown
    assert f"{lors['normalised']:.1f} [{lo:.1f}, {hi:.1f}]" in markdown
    assert "Test utterances per pair: de-asr 5, de-st 5" in markdown


def test_report_names_excluded_pairs():
    experiment = _experiment_with_intervals()
    for model in experiment["settings"][0]["models"]:
        model["excluded_pairs"] = [{"language": "de", "task": "st",
                                    "reason": "expert BLEU 1.0 < 5"}]
    assert "de-st (expert BLEU 1.0 < 5)" in format_summary_table(experiment)
    for model in experiment["settings"][0]["models"]:
        model["all_pairs_excluded"] = True
    table = format_summary_table(experiment)
    assert "not meaningful" in table and "†" in table


# ---------------------------------------------------------------- lors eval A B


def test_cli_eval_compares_several_models(tmp_path, capsys):
    from lors.cli import main
    from lors.data.manifest import write_manifest
    from lors.tiny import save_tiny_base

    first = save_tiny_base(tmp_path / "a")
    second = save_tiny_base(tmp_path / "b", seed=1, init_std=0.5)
    manifest = write_manifest(tmp_path / "manifest.jsonl", make_tiny_speech(tmp_path, {"test": 3}))
    out = tmp_path / "compare.json"
    argv = ["eval", str(first), str(second), str(first), "--manifest", str(manifest),
            "--tasks", "asr,st", "--max-new-tokens", "3", "--replicates", "100",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "diff vs ref" in printed and "significant" in printed and "100 bootstrap" in printed
    saved = json.loads(out.read_text())
    assert [m["model"] for m in saved["models"]] == [str(first), str(second), str(first)]
    comparison = saved["comparison"]
    assert comparison["reference"] == str(first) and comparison["replicates"] == 100
    assert {(p["language"], p["task"]) for p in comparison["pairs"]} == {
        ("de", "asr"), ("de", "st"), ("fr", "asr"), ("fr", "st")}
    for pair in comparison["pairs"]:
        ref, other, again = pair["models"]
        assert pair["n"] == 3 and [m["model"] for m in pair["models"]] == [
            str(first), str(second), f"{first} (2)"]
        result = next(r for r in saved["models"][0]["results"]
                      if (r["language"], r["task"]) == (pair["language"], pair["task"]))
        assert ref["score"] == pytest.approx(result[pair["metric"]], abs=1e-6)
        assert other["p_value"] is not None and other["difference_interval"] is not None
        assert again["difference"] == 0.0 and again["p_value"] == 1.0
    # an existing --out is refused before anything is decoded
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err
