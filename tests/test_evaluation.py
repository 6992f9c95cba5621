"""Evaluation: normalisers, metrics, batched short-window decoding and evaluation reports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperForConditionalGeneration

from lors.data.manifest import Utterance, read_manifest, write_manifest
from lors.errors import LorsError
from lors.evaluation import Decoder, bleu, cer, chrf, evaluate, format_table, normalize, wer
from lors.evaluation.decode import plan_batches
from lors.evaluation.window import encoder_window, window_for
from lors.tiny import save_tiny_base

# ---------------------------------------------------------------- normalisers


def test_basic_normalizer_drops_case_and_punctuation_keeps_diacritics():
    assert normalize("¿Dónde está el Río?", "es") == "dónde está el río"
    assert normalize("Meine  Großmutter, „wohnt“ hier!", "de") == "meine großmutter wohnt hier"
    assert normalize("Привет, Мир!", "ru") == "привет мир"
    assert normalize("?!", "fr") == ""


def test_english_normalizer_standardises_numbers_and_contractions():
    assert normalize("Hello, World!", "en") == "hello world"
    assert normalize("I have twenty-two apples.", "en") == "i have 22 apples"
    assert normalize("He's here", "en") == normalize("he is here", "en")


# ---------------------------------------------------------------- metrics


def test_wer_counts_edits_over_reference_words():
    # one substitution (sat -> sit) and one deletion (the) over six reference words
    assert wer(["the cat sat on the mat"], ["the cat sit on mat"]) == pytest.approx(2 / 6)
    # corpus level: (2 + 0) edits over (6 + 2) words, not the mean of per-pair rates
    assert wer(["the cat sat on the mat", "a dog"], ["the cat sit on mat", "a dog"]) \
        == pytest.approx(2 / 8)
    assert wer(["a b"], ["a b c d"]) == pytest.approx(1.0)  # two insertions over two words


def test_wer_normalises_only_when_a_language_is_given():
    assert wer(["Hello, World!"], ["hello world"]) == pytest.approx(1.0)
    assert wer(["Hello, World!"], ["hello world"], "en") == 0.0
    assert wer(["Guten Tag."], ["guten tag"], "de") == 0.0


def test_empty_references_count_insertions():
    assert wer(["a b", ""], ["a b", "x y"]) == pytest.approx(1.0)  # 2 insertions / 2 words
    assert wer([""], [""]) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        wer(["!!"], ["word"], "de")  # the only reference normalises to nothing


def test_cer_counts_characters_including_inner_spaces():
    assert cer(["abcd"], ["abxd"]) == pytest.approx(1 / 4)
    assert cer(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)  # the space was deleted
    assert cer(["Ab, CD!"], ["ab cd"], "de") == 0.0


def test_metrics_reject_mismatched_input():
    with pytest.raises(ValueError, match="2 references but 1"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        bleu([], [])


def test_bleu_and_chrf_bounds():
    refs = ["The cat sat on the mat.", "It is raining today."]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(refs, ["", ""]) == 0.0
    assert chrf(["abc"], ["xyz"]) == 0.0
    partial = ["The cat sat on a mat.", "It rains today."]
    assert 0.0 < bleu(refs, partial) < 100.0
    assert 0.0 < chrf(refs, partial) < 100.0
    assert chrf(refs, partial) > chrf(refs, ["The dog.", "Sun."])


# ---------------------------------------------------------------- batching and windows


def test_plan_batches_longest_first_covers_every_index_once():
    batches = plan_batches([1.0, 3.0, 2.0, 5.0, 4.0], batch_size=2)
    assert batches == [[3, 4], [1, 2], [0]]
    with pytest.raises(LorsError, match="batch size"):
        plan_batches([1.0], 0)


def test_plan_batches_never_mixes_groups():
    durations = [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    groups = [8, 8, 8, 9, 9, 8]
    assert plan_batches(durations, 3, groups) == [[3, 4], [5, 1, 2], [0]]


def test_window_for_adds_silence_rounds_up_and_caps():
    hop = 160
    assert window_for(16000 * 9 + 1, None, 1500, hop).positions == 600  # 9.0001 + 2 s -> 12 s
    assert window_for(16000 * 7, None, 1500, hop).seconds == 9.0
    assert window_for(100, None, 1500, hop).seconds == 8.0  # at least eight seconds
    assert window_for(16000 * 45, None, 1500, hop).positions == 1500  # capped at 30 s
    assert window_for(100, None, 50, hop).seconds == 1.0  # and at a tiny model's window
    assert window_for(10, 7.5, 1500, hop).positions == 375
    assert window_for(10, 30, 1500, hop).samples == 480000
    with pytest.raises(LorsError, match="positive"):
        window_for(10, 0, 1500, hop)


def test_encoder_window_matches_a_truncated_model_and_restores(tmp_path):
    """The swapped-in short window computes what a model built for that window computes."""
    full_dir = save_tiny_base(tmp_path / "full", max_source_positions=100)
    model = WhisperForConditionalGeneration.from_pretrained(full_dir).eval()
    short = WhisperForConditionalGeneration(replace_config(model.config, 40)).eval()
    state = model.state_dict()
    state["model.encoder.embed_positions.weight"] = state["model.encoder.embed_positions.weight"][:40]
    short.load_state_dict(state)
    features = torch.randn(2, model.config.num_mel_bins, 80)
    table = model.model.encoder.embed_positions
    with torch.no_grad(), encoder_window(model, 40):
        got = model.model.encoder(features).last_hidden_state
    want = short.model.encoder(features).last_hidden_state
    torch.testing.assert_close(got, want)
    assert model.config.max_source_positions == 100
    assert model.model.encoder.embed_positions is table
    with pytest.raises(RuntimeError), encoder_window(model, 40):
        raise RuntimeError("boom")
    assert model.config.max_source_positions == 100


def replace_config(config, positions: int):
    clone = config.__class__.from_dict(config.to_dict())
    clone.max_source_positions = positions
    return clone


# ---------------------------------------------------------------- tiny end to end


def _write_clips(folder: Path, languages=("de", "fr"), per_language: int = 3,
                 translation: bool = True) -> Path:
    """Noise-and-tone WAVs of distinct lengths plus a manifest describing them."""
    rng = np.random.default_rng(0)
    utterances = []
    for li, language in enumerate(languages):
        for i in range(per_language):
            seconds = 0.3 + 0.15 * i + 0.05 * li
            t = np.arange(int(16000 * seconds)) / 16000
            audio = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
            path = folder / f"{language}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, audio.astype(np.float32), 16000)
            utterances.append(Utterance(
                id=f"{language}-{i}", language=language, split="test", audio=str(path),
                duration=seconds, transcript=f"satz nummer {i}",
                translation=f"sentence number {i}" if translation else None))
    return write_manifest(folder / "manifest.jsonl", utterances)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("eval-tiny") / "base")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return _write_clips(tmp_path_factory.mktemp("eval-clips"))


def test_decode_keeps_input_order(tmp_path, clips):
    # a wider random init makes the tiny model's output depend on its input
    decoder = Decoder(save_tiny_base(tmp_path / "wide", seed=1, init_std=0.5))
    utts = read_manifest(clips)
    forward = decoder.decode(utts, "de", "asr", batch_size=2, max_new_tokens=6)
    backward = decoder.decode(utts[::-1], "de", "asr", batch_size=2, max_new_tokens=6)
    assert len(forward) == len(utts) and len(set(forward)) >= 2
    assert backward == forward[::-1]  # same batches (by duration), results mapped back
    assert all(isinstance(text, str) and text == text.strip() for text in forward)


def test_decode_uses_the_short_window_and_restores_the_model(tmp_path, clips):
    decoder = Decoder(save_tiny_base(tmp_path / "long", max_source_positions=600))  # 12 s
    frames: list[int] = []
    decoder.model.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: frames.append(kwargs["input_features"].shape[-1]),
        with_kwargs=True)
    utts = read_manifest(clips)
    auto = decoder.decode(utts, "de", "asr", batch_size=4, max_new_tokens=3)
    assert frames == [800, 800]  # clips under 1 s: the 8 s minimum window, both batches
    assert decoder.decode(utts, "de", "asr", batch_size=4, max_new_tokens=3,
                          window_seconds=8) == auto
    frames.clear()
    decoder.decode(utts[:1], "de", "asr", max_new_tokens=3, window_seconds=60)
    assert frames == [1200]  # capped at the model's full window
    assert decoder.model.config.max_source_positions == 600
    assert decoder.model.model.encoder.embed_positions.num_embeddings == 600


def test_decode_caps_new_tokens(tiny_base, clips):
    decoder = Decoder(tiny_base)
    utts = read_manifest(clips)[:2]
    assert decoder.token_budget(1000) == decoder.model.config.max_target_positions - 4
    for text in decoder.decode(utts, "fr", "st", max_new_tokens=2):
        assert len(decoder.processor.tokenizer(text, add_special_tokens=False).input_ids) <= 2


def test_evaluate_end_to_end_on_tiny(tiny_base, clips, tmp_path):
    out = tmp_path / "report" / "eval.json"
    report = evaluate(tiny_base, clips, tasks=("asr", "st"), out=out, batch_size=2,
                      max_new_tokens=6)
    assert json.loads(out.read_text(encoding="utf-8")) == report
    assert [(r["language"], r["task"]) for r in report["results"]] == [
        ("de", "asr"), ("de", "st"), ("fr", "asr"), ("fr", "st")]
    assert len(report["utterances"]) == 12
    for result in report["results"]:
        assert result["n"] == 3 and result["seconds"] > 0
        assert result["utterances_per_second"] == pytest.approx(3 / result["seconds"])
        records = [u for u in report["utterances"]
                   if (u["language"], u["task"]) == (result["language"], result["task"])]
        refs, hyps = [u["reference"] for u in records], [u["hypothesis"] for u in records]
        if result["task"] == "asr":
            assert refs[0].startswith("satz")
            assert result["wer"] == pytest.approx(wer(refs, hyps, result["language"]))
            assert result["cer"] == pytest.approx(cer(refs, hyps, result["language"]))
        else:
            assert refs[0].startswith("sentence")
            assert result["bleu"] == pytest.approx(bleu(refs, hyps))
            assert 0.0 <= result["chrf"] <= 100.0
    assert report["settings"]["batch_size"] == 2
    table = format_table(report).splitlines()
    assert table[0].split()[:3] == ["language", "task", "n"] and len(table) == 5
    assert table[2].split()[:2] == ["de", "st"] and table[2].split()[3] == "-"


def test_evaluate_filters_languages(tiny_base, clips):
    report = evaluate(tiny_base, clips, languages="fr", max_new_tokens=3)
    assert [(r["language"], r["task"]) for r in report["results"]] == [("fr", "asr")]
    assert {u["id"] for u in report["utterances"]} == {"fr-0", "fr-1", "fr-2"}


# ---------------------------------------------------------------- errors before decoding


def test_unknown_language_token_is_refused(tiny_base, tmp_path):
    manifest = _write_clips(tmp_path, languages=("es",), per_language=1)
    with pytest.raises(LorsError, match=r"no language token <\|es\|>.*de, en, fr"):
        evaluate(tiny_base, manifest)


def test_missing_translation_is_refused_before_decoding(tiny_base, tmp_path):
    manifest = _write_clips(tmp_path, per_language=2, translation=False)
    shutil.rmtree(tmp_path / "report", ignore_errors=True)
    (tmp_path / "de0.wav").unlink()  # decoding would fail on this; the check must come first
    with pytest.raises(LorsError, match=r"'de-0'.*no translation.*'st'"):
        evaluate(tiny_base, manifest, tasks=("asr", "st"))


def test_bad_selection_is_refused(tiny_base, clips):
    with pytest.raises(LorsError, match="no utterances in language"):
        evaluate(tiny_base, clips, languages=["de", "sv"])
    with pytest.raises(LorsError, match="unknown task"):
        evaluate(tiny_base, clips, tasks=["mt"])
    with pytest.raises(LorsError, match="split 'dev'"):
        evaluate(tiny_base, clips, split="dev")
    with pytest.raises(LorsError, match="not a directory"):
        evaluate(clips.parent / "nothing", clips)


# ---------------------------------------------------------------- the real base


@pytest.mark.slow
def test_base_transcribes_synthetic_german(tmp_path):
    from lors.data.synth import synthesize

    manifest = synthesize(["de"], ["test"], tmp_path, limit_per_split=3, show_progress=False)
    report = evaluate("base", manifest)
    (result,) = report["results"]
    assert result["n"] == 3 and result["wer"] < 1.0
    assert all(u["hypothesis"] for u in report["utterances"])
    assert math.isfinite(result["cer"])


def test_cli_eval_prints_table_and_writes_results(tiny_base, clips, tmp_path, capsys):
    from lors.cli import main
    out = tmp_path / "results.json"
    assert main(["eval", str(tiny_base), "--manifest", str(clips),
                 "--tasks", "asr,st", "--max-new-tokens", "3", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "WER %" in printed and "BLEU" in printed
    results = json.loads(out.read_text())
    pairs = {(r["language"], r["task"]) for r in results["results"]}
    assert pairs == {("de", "asr"), ("de", "st"), ("fr", "asr"), ("fr", "st")}
    assert all("hypothesis" in u and "reference" in u for u in results["utterances"])
