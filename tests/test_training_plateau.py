"""Plateau stopping, equal dev checks, per-batch encoder windows and equal-compute MTL, on a
tiny random Whisper (a 10 s window; each run takes seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_speech
from lors.data.audio import SAMPLE_RATE, write_wav
from lors.data.manifest import Utterance, write_manifest
from lors.evaluation.window import window_for
from lors.tiny import save_tiny_base
from lors.training import TrainConfig, train
from lors.training import loop
from lors.training.schedule import batches, evaluation_steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny base (10 s window = 500 positions) and de/fr clips of 0.4-0.9 s."""
    root = tmp_path_factory.mktemp("plateau")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    utterances = make_tiny_speech(root, {"train": 8, "dev": 4, "test": 2})
    manifest = write_manifest(root / "manifest.jsonl", utterances)
    return {"root": root, "base": base, "manifest": manifest, "utterances": utterances}


def config(setup, out: Path, **overrides) -> TrainConfig:
    values = dict(base=str(setup["base"]), manifest=str(setup["manifest"]), pairs=[("de", "asr")],
                  out=str(out), max_steps=12, batch_size=4, learning_rate=3e-3, eval_every=2,
                  cache_dir=str(setup["root"] / "cache"), show_progress=False, cpu=True)
    values.update(overrides)
    return TrainConfig(**values)


def fake_dev(monkeypatch, scores) -> list:
    """Replace the dev score: ``scores`` is a list (one value per evaluation, in call order;
    the last repeats) or a constant; returns the list of the evaluations' pair names."""
    calls = []

    def pair_dev_scores(select, model, whisper, processor, examples, *rest):
        names = [f"{e.language}-{e.task}" for e in examples]
        calls.append(names)
        value = scores[min(len(calls), len(scores)) - 1] if isinstance(scores, list) else scores
        return {name: value for name in names}
    monkeypatch.setattr(loop, "pair_dev_scores", pair_dev_scores)
    return calls


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_training_stops_patience_evaluations_after_the_best(setup, tmp_path, monkeypatch):
    # evaluations at steps 2, 4, 6, ...: best at step 4 (a tie is no improvement), then two
    # evaluations without improvement: stop at step 8 of the 12-step cap
    fake_dev(monkeypatch, [0.1, 0.3, 0.3, 0.2, 0.9])
    out = tmp_path / "expert"
    summary = train(config(setup, out, patience=2))
    assert summary["steps"] == 8 == 4 + 2 * 2 and summary["max_steps"] == 12
    assert summary["stopped_early"] is True and summary["best_step"] == 4
    assert summary["samples"] == 8 * 4
    assert summary["dev_curve"] == [[2, 0.1], [4, 0.3], [6, 0.3], [8, 0.2]]
    assert summary["best_dev_pairs"] == {"de-asr": 0.3}
    saved = json.loads((out / "training.json").read_text())
    assert saved["stopped_early"] is True and saved["steps"] == 8 and saved["dev_curve"] == summary["dev_curve"]
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["evals_without_improvement"] for r in log if "dev_pairs" in r] == [0, 0, 1, 2]


def test_without_patience_or_at_the_cap_nothing_stops_early(setup, tmp_path, monkeypatch):
    fake_dev(monkeypatch, 0.5)
    summary = train(config(setup, tmp_path / "off", max_steps=6))
    assert summary["steps"] == 6 and summary["stopped_early"] is False
    assert [s for s, _ in summary["dev_curve"]] == [2, 4, 6]
    # the third evaluation without improvement would fall on the last step: not "early"
    summary = train(config(setup, tmp_path / "cap", max_steps=8, patience=3))
    assert summary["steps"] == 8 and summary["stopped_early"] is False


def test_a_resumed_run_keeps_the_plateau_counter(setup, tmp_path, monkeypatch):
    fake_dev(monkeypatch, 0.5)  # best at step 2; stop after 2 more evaluations (step 6)
    whole = train(config(setup, tmp_path / "whole", patience=2, save_every=2))
    assert whole["steps"] == 6 and whole["stopped_early"]

    def stop_at_five(step, record):
        if step == 5:
            raise KeyboardInterrupt
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config(setup, resumed, patience=2, save_every=2), on_step=stop_at_five)
    state = json.loads((tmp_path / "resumed.partial" / "checkpoints" / "step-0000004"
                        / "trainer_state.json").read_text())
    assert state["evals_without_improvement"] == 1 and state["dev_curve"] == [[2, 0.5], [4, 0.5]]
    summary = train(config(setup, resumed, patience=2, save_every=2))
    assert summary["steps"] == 6 and summary["stopped_early"]  # not 8: the count survived
    assert summary["dev_curve"] == whole["dev_curve"] and summary["best_step"] == 2
    assert summary["samples"] == whole["samples"] == 24


def test_sequential_stages_each_restart_the_count_and_score_every_pair_seen(setup, tmp_path,
                                                                           monkeypatch):
    calls = fake_dev(monkeypatch, 0.5)
    out = tmp_path / "seq"
    summary = train(config(setup, out, sequential=True, max_steps=6, patience=1,
                           pairs=[("de", "asr"), ("fr", "asr")]))
    assert [s["steps"] for s in summary["stages"]] == [4, 4]  # best at 2, stop at 4, twice
    assert summary["steps"] == 8 and summary["samples"] == 32 and summary["stopped_early"]
    assert [s for s, _ in summary["dev_curve"]] == [2, 4, 6, 8]  # stages one after another
    assert calls == [["de-asr"]] * 2 + [["fr-asr"], ["de-asr"]] * 2  # stage 2 also on de
    stage_two = read_log(out / "stages" / "02-fr-asr")
    dev = [r for r in stage_two if "dev_pairs" in r]
    assert all(r["dev_pairs"] == {"fr-asr": 0.5} for r in dev)
    assert all(r["dev_seen_pairs"] == {"de-asr": 0.5, "fr-asr": 0.5} for r in dev)
    assert all(r["dev_seen_token_accuracy"] == 0.5 for r in dev)
    assert summary["stages"][1]["dev_seen_curve"] == [[2, 0.5], [4, 0.5]]


def test_real_dev_scores_of_a_sequential_stage_cover_both_pairs(setup, tmp_path):
    summary = train(config(setup, tmp_path / "seq", sequential=True, max_steps=2,
                           pairs=[("de", "asr"), ("fr", "asr")]))
    second = summary["stages"][1]
    log = [r for r in read_log(tmp_path / "seq" / "stages" / "02-fr-asr") if "dev_pairs" in r]
    seen = log[-1]["dev_seen_pairs"]
    assert set(seen) == {"de-asr", "fr-asr"} and seen["fr-asr"] == log[-1]["dev_pairs"]["fr-asr"]
    assert log[-1]["dev_seen_token_accuracy"] == pytest.approx(sum(seen.values()) / 2)
    assert second["best_dev_score"] == log[-1]["dev_token_accuracy"]


@pytest.mark.parametrize("steps, times", [(3, 3), (7, 3), (10, 3), (10, 4), (2, 5)])
def test_eval_times_spreads_exactly_n_evaluations(steps, times):
    at = evaluation_steps(steps, every=1, times=times)
    assert len(at) == min(steps, times) and at[-1] == steps
    assert at == sorted(set(at)) and at[0] >= 1
    gaps = np.diff([0] + at)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert evaluation_steps(12, every=5) == [5, 10, 12]


def test_eval_times_gives_every_run_length_the_same_number_of_checks(setup, tmp_path):
    curves = {}
    for steps in (3, 5, 8):
        summary = train(config(setup, tmp_path / f"run{steps}", max_steps=steps, eval_every=1,
                               eval_times=3))
        curves[steps] = [s for s, _ in summary["dev_curve"]]
    assert curves == {3: [1, 2, 3], 5: [2, 4, 5], 8: [3, 6, 8]}
    # with epochs: an expert (8 clips) and the MTL model (two pairs: twice the steps) alike
    expert = train(config(setup, tmp_path / "e", max_steps=None, epochs=1, eval_times=2))
    mtl = train(config(setup, tmp_path / "m", max_steps=None, epochs=1, eval_times=2,
                       pairs=[("de", "asr"), ("fr", "asr")]))
    assert (expert["steps"], mtl["steps"]) == (2, 4)
    assert len(expert["dev_curve"]) == len(mtl["dev_curve"]) == 2


# --- per-batch encoder windows ------------------------------------------------------------

TRAIN_SECONDS = [1.0, 6.5, 7.5, 3.0, 0.5, 6.2, 2.0, 7.8]  # own windows 8, 9, 10, 8, 8, 9, 8, 10 s
DEV_SECONDS = [1.0, 6.6]  # 8 and 9 s


@pytest.fixture(scope="module")
def varied(tmp_path_factory, setup) -> dict:
    """de clips of 0.5-7.8 s, so batches need windows of 8, 9 and 10 s."""
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(1)
    utterances = []
    for split, lengths in (("train", TRAIN_SECONDS), ("dev", DEV_SECONDS)):
        for i, seconds in enumerate(lengths):
            t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
            audio = 0.3 * np.sin(2 * np.pi * (220 + 30 * i) * t) + 0.05 * rng.standard_normal(t.size)
            path = root / f"de-{split}-{i}.wav"
            write_wav(path, audio.astype(np.float32))
            utterances.append(Utterance(id=f"de-{split}-{i}", language="de", split=split,
                                        audio=str(path), duration=seconds,
                                        transcript="hallo welt", translation="hello world"))
    manifest = write_manifest(root / "manifest.jsonl", utterances)
    return {**setup, "root": root, "manifest": manifest, "utterances": utterances}


def expected_windows(steps: int, batch_size: int) -> list[int]:
    return [window_for(round(max(TRAIN_SECONDS[i] for _, i in batch) * SAMPLE_RATE), None, 500,
                       160).positions for batch in batches([8], 0, steps, batch_size)]


def test_each_batch_is_padded_to_its_own_longest_clip(varied, tmp_path, monkeypatch):
    from lors.training import dev
    shapes = {"train": [], "dev": []}
    for name, module in (("train", loop), ("dev", dev)):
        original = module.collate

        def recording(inputs, examples, pad_id, _original=original, _name=name):
            shapes[_name].append(tuple(inputs[0].shape))
            assert len({tuple(t.shape) for t in inputs}) == 1
            return _original(inputs, examples, pad_id)
        monkeypatch.setattr(module, "collate", recording)
    summary = train(config(varied, tmp_path / "expert", max_steps=6, batch_size=2, eval_every=6))
    windows = expected_windows(6, 2)
    assert len(set(windows)) > 1  # the plan mixes windows, so the check means something
    assert [frames for _, frames in shapes["train"]] == [2 * w for w in windows]
    assert [r["encoder_positions"] for r in read_log(tmp_path / "expert") if "loss" in r] == windows
    assert sorted(frames for _, frames in shapes["dev"]) == [800, 900]  # each dev clip its own
    assert summary["encoder_positions"] == max(windows + [450])


def test_padding_features_to_a_larger_window_is_exact(varied):
    from transformers import WhisperFeatureExtractor

    from lors.training.inputs import clip_features, fit_window, log_mel
    extractor = WhisperFeatureExtractor.from_pretrained(varied["base"])
    clips = [u for u in varied["utterances"] if u.split == "train"]
    own = clip_features(extractor, clips, 500)
    wide = log_mel(extractor, clips, 500)
    for utt in clips:
        assert own[utt.id].shape[-1] == 2 * window_for(round(utt.duration * SAMPLE_RATE), None,
                                                       500, 160).positions
        torch.testing.assert_close(fit_window(own[utt.id], 500), wide[utt.id], rtol=0, atol=1e-6)


def test_frozen_encoder_cache_is_per_clip_and_window(varied, tmp_path):
    cache = tmp_path / "cache"
    args = dict(mode="freeze-encoder", cache_dir=str(cache), max_steps=6, batch_size=2,
                eval_every=6)
    train(config(varied, tmp_path / "a", **args))
    windows = expected_windows(6, 2)
    needed = {}
    for batch, window in zip(batches([8], 0, 6, 2), windows):
        needed.setdefault(window, set()).update(i for _, i in batch)
    needed.setdefault(400, set()).add("dev-0")
    needed.setdefault(450, set()).add("dev-1")
    folders = sorted((cache / "encoder-outputs").iterdir())
    assert len(folders) == len(needed)
    assert sorted(len(list(f.glob("*.npy"))) for f in folders) == sorted(map(len, needed.values()))
    shapes = {np.load(next(f.glob("*.npy"))).shape[0] for f in folders}
    assert shapes == set(needed)  # one folder per window, outputs of that many positions
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    train(config(varied, tmp_path / "b", **args))  # a second model reads them back
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == stamps


# --- the experiment: MTL on the experts' actual steps, MTL to its own plateau ------------

@pytest.fixture()
def unequal(setup, tmp_path) -> tuple:
    """An experiment whose pairs differ in size (de 8 train clips, fr 4), trained by epochs."""
    from lors.experiment.config import load_experiment
    utterances = [u for u in setup["utterances"]
                  if not (u.language == "fr" and u.split == "train" and int(u.id.split("-")[-1]) >= 4)]
    manifest = write_manifest(tmp_path / "manifest.jsonl", utterances)
    raw = {"name": "unequal", "base": str(setup["base"]), "languages": ["de", "fr"],
           "tasks": ["asr"], "settings": ["asr"], "data": {"manifest": str(manifest)},
           "training": {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "eval_times": 2,
                        "patience": 1},
           "methods": {"task_arithmetic": {"lambda": [0.5]}}, "out": str(tmp_path / "out")}
    import yaml
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_experiment(path), tmp_path


def test_mtl_gets_exactly_the_experts_total_steps(unequal):
    from lors.experiment.runner import Experiment
    config, _ = unequal
    exp = Experiment(config, show_progress=False)
    pairs = [("de", "asr"), ("fr", "asr")]
    experts = [exp.expert(pair) for pair in pairs]
    assert [e["steps"] for e in experts] == [2, 1]  # 8 and 4 clips, one epoch, batches of 4
    assert all(len(e["dev_curve"]) == min(2, e["steps"]) for e in experts)
    mtl = exp.mtl("asr", pairs)
    assert mtl["steps"] == 3 and mtl["samples"] == 12  # not the 4 steps one epoch would take
    saved = json.loads((Path(mtl["path"]) / "training.json").read_text())
    assert saved["max_steps"] == 3 and saved["stopped_early"] is False and saved["patience"] is None
    assert len(mtl["dev_curve"]) == 2 and set(mtl["best_dev_pairs"]) == {"de-asr", "fr-asr"}
    again = exp.mtl("asr", pairs)  # cached: the same model, no retraining
    assert again["path"] == mtl["path"] and again["train_s"] == mtl["train_s"]


def test_mtl_plateau_trains_to_its_own_plateau_under_a_larger_cap(unequal, monkeypatch):
    from lors.experiment.runner import Experiment
    config, _ = unequal
    exp = Experiment(config.model_copy(update={"training": config.training.model_copy(
        update={"eval_times": 4})}), show_progress=False)
    fake_dev(monkeypatch, 0.5)
    result = exp.mtl_plateau("asr", [("de", "asr"), ("fr", "asr")])
    saved = json.loads((Path(result["path"]) / "training.json").read_text())
    # cap: 1 epoch x 2 pairs = 2 epochs of the largest pair (8 clips) under balanced
    # sampling: 2 * 8 * 2 / 4 = 8 steps; evaluations at 2, 4, 6, 8; patience 1: stop at 4
    assert saved["max_steps"] == 8 and saved["steps"] == 4 and saved["stopped_early"] is True
    assert result["stopped_early"] is True and result["steps"] == 4


# --- the report's training section ---------------------------------------------------------

def test_report_lists_training_and_flags_an_expert_beaten_by_mtl_on_dev(tmp_path):
    from lors.experiment.report import write_report
    entries = [
        {"name": "expert de-asr", "kind": "expert", "setting": None, "pairs": [["de", "asr"]],
         "steps": 30, "samples": 240, "stopped_early": True, "select": "token-accuracy",
         "dev_curve": [[10, 0.4], [20, 0.5], [30, 0.45]], "best_step": 20,
         "best_dev_score": 0.5, "best_dev_pairs": {"de-asr": 0.5}, "train_s": 12.0},
        {"name": "expert fr-asr", "kind": "expert", "setting": None, "pairs": [["fr", "asr"]],
         "steps": 30, "samples": 240, "stopped_early": False, "select": "token-accuracy",
         "dev_curve": [[10, 0.6], [20, 0.7], [30, 0.8]], "best_step": 30,
         "best_dev_score": 0.8, "best_dev_pairs": {"fr-asr": 0.8}, "train_s": 11.0},
        {"name": "mtl", "kind": "mtl", "setting": "asr", "pairs": [["de", "asr"], ["fr", "asr"]],
         "steps": 60, "samples": 480, "stopped_early": False, "select": "token-accuracy",
         "dev_curve": [[20, 0.5], [40, 0.6], [60, 0.65]], "best_step": 60,
         "best_dev_score": 0.65, "best_dev_pairs": {"de-asr": 0.55, "fr-asr": 0.75},
         "train_s": 20.0},
        {"name": "sequential", "kind": "sequential", "setting": "asr",
         "pairs": [["de", "asr"], ["fr", "asr"]], "steps": 50, "samples": 400,
         "stopped_early": True, "select": "token-accuracy",
         "dev_curve": [[10, 0.4], [20, 0.5], [35, 0.6], [50, 0.7]],
         "dev_seen_curve": [[10, 0.4], [20, 0.5], [35, 0.5], [50, 0.55]], "train_s": 18.0}]
    written = write_report({"name": "t", "training": entries}, tmp_path / "report")
    markdown = written["markdown"].read_text()
    assert "## Training" in markdown and "### Under-trained experts" in markdown
    assert "de-asr: its expert reaches 50.0 % dev token-accuracy, mtl (asr) 55.0 %" in markdown
    assert "fr-asr: its expert" not in markdown
    assert "| expert de-asr | - | 30 | 240 | 3 | 20 | 50.0 | yes |" in markdown
    names = sorted(p.name for p in written["plots"])
    assert names == ["dev-curves-asr.png", "dev-curves-experts.png"]
    assert all(p.stat().st_size > 0 for p in written["plots"])
    fine = [dict(e, best_dev_pairs={"de-asr": 0.4, "fr-asr": 0.7}) if e["kind"] == "mtl" else e
            for e in entries]
    markdown = write_report({"name": "t", "training": fine}, tmp_path / "r2")["markdown"].read_text()
    assert "No expert is beaten" in markdown
