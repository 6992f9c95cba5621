"""The wider voice plan and the seeded degradation (noise, reverberation) of synthetic speech.

Tests that render need the ``espeak-ng`` binary: skipped where it is absent, except in CI
(``CI`` set), where a missing espeak-ng is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import TEMPLATES, need_espeak
from lors.cli import main
from lors.data import synth
from lors.data.audio import (PEAK, coloured_noise, load_audio, room_impulse_response,
                             wav_comment, write_wav)
from lors.data.manifest import FIELDS, OPTIONAL_FIELDS, Utterance, read_manifest, write_manifest
from lors.errors import ConfigError, LorsError
from lors.experiment.config import load_experiment

KW = dict(limit_per_split=1, jobs=2, show_progress=False)


def _read(path) -> np.ndarray:
    samples, rate = sf.read(str(path), dtype="float64")
    assert rate == 16000 and samples.ndim == 1
    return samples


def _snr_against(noisy: np.ndarray, clean: np.ndarray) -> float:
    """SNR of ``noisy`` = g * clean + noise, g fitted by least squares (the degraded clip is
    peak-normalised, the clean one is not)."""
    gain = np.dot(noisy, clean) / np.dot(clean, clean)
    residual = noisy - gain * clean
    return 10 * np.log10(np.sum((gain * clean) ** 2) / np.sum(residual ** 2))


# --- the voice plan -----------------------------------------------------------------------

def test_wider_voice_plan_is_deterministic_and_disjoint():
    assert len(synth.TRAIN_VARIANTS) >= 12 and len(synth.HELDOUT_VARIANTS) >= 6
    assert not set(synth.TRAIN_VARIANTS) & set(synth.HELDOUT_VARIANTS)
    assert not set(synth.TRAIN_RATES) & set(synth.HELDOUT_RATES)
    assert not set(synth.TRAIN_PITCHES) & set(synth.HELDOUT_PITCHES)
    assert max(synth.TRAIN_RATES) - min(synth.TRAIN_RATES) >= 60
    langs = sorted(synth.ESPEAK_VOICES)
    train = [synth.voice_plan(f"s{i}", lang, "train") for i in range(300) for lang in langs]
    held = [synth.voice_plan(f"s{i}", lang, split) for i in range(300) for lang in langs
            for split in ("dev", "test")]
    variant = lambda plan: plan.voice.split("+")[1]  # noqa: E731
    assert {variant(p) for p in train} == set(synth.TRAIN_VARIANTS)
    assert {variant(p) for p in held} == set(synth.HELDOUT_VARIANTS)
    assert {p.rate for p in train} == set(synth.TRAIN_RATES)
    assert {p.rate for p in held} == set(synth.HELDOUT_RATES)
    assert {p.pitch for p in train} == set(synth.TRAIN_PITCHES)
    assert {p.pitch for p in held} == set(synth.HELDOUT_PITCHES)
    assert {p.gap for p in train + held} == set(synth.GAPS)
    again = [synth.voice_plan(f"s{i}", lang, "train") for i in range(300) for lang in langs]
    assert again == train
    # seeded per (sentence, language): languages of one sentence get different voices
    assert len({synth.voice_plan("s1", lang, "train") for lang in langs}) > 1


@pytest.mark.slow
def test_every_variant_changes_the_voice_of_every_language():
    """espeak-ng silently ignores a variant it cannot apply (it did after fr-fr): every
    variant of the plan must give each language audibly different audio."""
    need_espeak()
    for language, voice in synth.ESPEAK_VOICES.items():
        text = TEMPLATES[language].format(name="Anna").encode()
        digests = {}
        for variant in ("", *synth.TRAIN_VARIANTS, *synth.HELDOUT_VARIANTS):
            name = f"{voice}+{variant}" if variant else voice
            out = subprocess.run(["espeak-ng", "-b", "1", "-v", name, "--stdout"], input=text,
                                 capture_output=True, check=True, timeout=60).stdout
            digest = hashlib.sha256(out).hexdigest()
            assert digest not in digests, f"{name} renders like {digests.get(digest)}"
            digests[digest] = name


# --- degradation building blocks (no espeak-ng) -------------------------------------------

def _speechlike(seconds: float = 1.5) -> np.ndarray:
    """Bursts of a harmonic tone with silences: speech-like enough for levels and decays."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    gate = (np.sin(2 * np.pi * 2.5 * t) > 0.2).astype(float)
    gate[int(len(t) * 0.8):] = 0.0  # trailing silence, like espeak-ng's
    return (0.3 * tone * gate).astype(np.float32)


def test_degradation_is_seeded_by_the_utterance_id():
    augment = synth.Augmentation(noise_snr=(0, 30), reverb_rt60=(0.2, 1.0))
    first, again = augment.draw("de-train-s0001"), augment.draw("de-train-s0001")
    assert first == again
    audio = _speechlike()
    assert np.array_equal(first.apply(audio), again.apply(audio))  # identical samples
    draws = [augment.draw(f"de-train-s{i:04d}") for i in range(200)]
    assert len({d.noise_snr for d in draws}) > 50 and len({d.reverb_rt60 for d in draws}) > 30
    assert all(0 <= d.noise_snr <= 30 and 0.2 <= d.reverb_rt60 <= 1.0 for d in draws)
    assert all(d.noise_snr == round(d.noise_snr, 1) and d.reverb_rt60 == round(d.reverb_rt60, 2)
               for d in draws)
    assert {d.noise_colour for d in draws} == {"white", "pink", "brown"}
    other = augment.draw("de-train-s0002")
    assert not np.array_equal(other.apply(audio)[:1000], first.apply(audio)[:1000])
    # noise and room come from their own streams: switching one on keeps the other's draw
    noise_only = synth.Augmentation(noise_snr=(0, 30)).draw("de-train-s0001")
    assert (noise_only.noise_snr, noise_only.noise_colour, noise_only.reverb_rt60) == \
        (first.noise_snr, first.noise_colour, None)
    assert synth.Augmentation().draw("x") is None and not synth.Augmentation()


def test_noise_hits_the_drawn_snr_and_never_clips():
    audio = _speechlike()
    for i in range(12):
        d = synth.Augmentation(noise_snr=(-5, 40)).draw(f"fr-test-s{i:04d}")
        noisy = d.apply(audio).astype(np.float64)
        assert len(noisy) == len(audio)
        assert abs(_snr_against(noisy, audio.astype(np.float64)) - d.noise_snr) < 0.5, d
        assert np.max(np.abs(noisy)) == pytest.approx(PEAK, abs=1e-6)
    loud = np.clip(audio * 10, -1, 1)  # a clipped, full-scale input, then reverb and noise
    out = synth.Augmentation(noise_snr=(-5, -5), reverb_rt60=(2, 2)).draw("x").apply(loud)
    assert np.max(np.abs(out)) <= PEAK + 1e-6 < 1.0


def test_room_response_decays_by_60_db_in_rt60():
    for rt60 in (0.2, 0.5, 1.2):
        rir = room_impulse_response(rt60, np.random.default_rng(1))
        assert len(rir) == round(rt60 * 16000) and np.sum(rir ** 2) == pytest.approx(1.0)
        # Schroeder backward integration, T20 fit (-5 to -25 dB) extrapolated to -60 dB
        edc = 10 * np.log10(np.cumsum(rir[::-1] ** 2)[::-1] / np.sum(rir ** 2))
        fit = (edc <= -5) & (edc >= -25)
        slope = np.polyfit(np.arange(len(rir))[fit] / 16000, edc[fit], 1)[0]
        assert -60 / slope == pytest.approx(rt60, rel=0.1)


def test_coloured_noise_spectra():
    rng = np.random.default_rng(0)
    low_high = {}
    for colour in ("white", "pink", "brown"):
        noise = coloured_noise(32000, colour, rng)
        assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0) and abs(noise.mean()) < 1e-9
        power = np.abs(np.fft.rfft(noise)) ** 2
        freqs = np.fft.rfftfreq(32000, 1 / 16000)
        low_high[colour] = power[(freqs > 100) & (freqs < 500)].mean() / \
            power[(freqs > 4000) & (freqs < 8000)].mean()
    assert 0.7 < low_high["white"] < 1.4 < low_high["pink"] < low_high["brown"]
    with pytest.raises(LorsError, match="unknown noise colour"):
        coloured_noise(10, "purple", rng)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_snr="20,5"), r"noise_snr 20,5 is not a range LO <= HI within -20\.\.80 dB"),
    (dict(noise_snr="loud"), r"noise_snr expects LO,HI"),
    (dict(noise_snr="1,2,3"), r"noise_snr expects LO,HI"),
    (dict(noise_snr=[5, float("nan")]), r"not a range"),
    (dict(noise_snr=(0, 200)), r"within -20\.\.80 dB"),
    (dict(reverb_rt60="0,0.5"), r"reverb_rt60 0,0.5 is not a range .* 0\.05\.\.3 s"),
    (dict(reverb_rt60=[True, 1]), r"reverb_rt60 expects LO,HI"),
])
def test_bad_ranges_are_refused(kwargs, message):
    with pytest.raises(LorsError, match=message):
        synth.Augmentation(**kwargs)


def test_augmentation_parsing_and_folder_suffix():
    a = synth.Augmentation.coerce({"noise_snr": "5,20", "reverb_rt60": [0.3, 0.9]})
    assert a == synth.Augmentation((5.0, 20.0), (0.3, 0.9))
    assert a.as_dict() == {"noise_snr": [5.0, 20.0], "reverb_rt60": [0.3, 0.9]}
    assert a.suffix == "-snr5_20-rt60_0.3_0.9"
    assert synth.Augmentation.coerce({"noise_snr": "10"}).noise_snr == (10.0, 10.0)
    assert synth.Augmentation.coerce({"noise_snr": None, "reverb_rt60": None}).suffix == ""
    assert synth.Augmentation.coerce(None) == synth.Augmentation()
    with pytest.raises(LorsError, match="unknown augment setting.*snr"):
        synth.Augmentation.coerce({"snr": [1, 2]})


def test_manifest_optional_degradation_fields(tmp_path):
    wav = tmp_path / "a.wav"
    write_wav(wav, _speechlike(0.2))
    utts = [Utterance("a", "de", "test", str(wav), 0.2, "hallo", "hello", "de+m3 s130 p50 g4",
                      noise_snr=12.5, reverb_rt60=0.45),
            Utterance("b", "de", "test", str(wav), 0.2, "hallo", None, None, noise_snr=-3.0)]
    path = write_manifest(tmp_path / "m.jsonl", utts)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(records[0]) == [*FIELDS, *OPTIONAL_FIELDS]
    assert list(records[1]) == [*FIELDS, "noise_snr"]
    assert read_manifest(path) == utts
    from lors.data.manifest import to_hf_dataset
    table = to_hf_dataset(utts)
    assert table.column_names == [*FIELDS, *OPTIONAL_FIELDS]
    assert table["noise_snr"] == [12.5, -3.0] and table["reverb_rt60"] == [0.45, None]
    assert to_hf_dataset(utts[1:]).column_names == [*FIELDS, "noise_snr"]
    bad = dict(records[0], reverb_rt60="0.4 s")
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(LorsError, match="line 1: field 'reverb_rt60' must be a number"):
        read_manifest(path)


# --- the experiment config and the CLI ----------------------------------------------------

def _experiment(**data):
    return load_experiment(None, languages=["de"], methods={"task_arithmetic": {"lambda": 0.5}},
                           data=data)


def test_config_augment_field_is_validated():
    config = _experiment(augment={"noise_snr": [5, 20], "reverb_rt60": [0.2, 0.8]})
    assert config.data.augment == {"noise_snr": [5.0, 20.0], "reverb_rt60": [0.2, 0.8]}
    assert _experiment(augment={"reverb_rt60": [0.5, 0.5]}).data.augment == \
        {"reverb_rt60": [0.5, 0.5]}
    assert _experiment().data.augment is None and _experiment(augment={}).data.augment is None
    # the data spec is part of the experiment's cache keys: degraded != clean
    assert config.data.model_dump() != _experiment().data.model_dump()
    for augment, message in (({"noise_snr": [20, 5]}, r"data\.augment.*noise_snr 20,5"),
                             ({"reverb_rt60": [0.1, 9]}, r"data\.augment.*reverb_rt60"),
                             ({"noise": [1, 2]}, r"data\.augment.*unknown augment setting"),
                             ("5,20", r"data\.augment")):
        with pytest.raises(ConfigError, match=message):
            _experiment(augment=augment)
    with pytest.raises(ConfigError, match="does not apply to a given manifest"):
        _experiment(manifest="m.jsonl", augment={"noise_snr": [5, 20]})


def test_default_speech_caches_degraded_apart_from_clean(tmp_path, monkeypatch):
    from lors.training.api import default_speech
    calls = []
    monkeypatch.setenv("LORS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synth, "synthesize",
                        lambda langs, splits, folder, **kw: calls.append((folder, kw)) or folder)
    clean = default_speech(["fr", "de"], False)
    noisy = default_speech(["de", "fr"], False, {"noise_snr": [5, 20]})
    both = default_speech(["de", "fr"], False, {"noise_snr": [5, 20], "reverb_rt60": [0.2, 0.8]})
    assert clean == tmp_path / "cache" / "speech" / "de-fr"
    assert noisy == tmp_path / "cache" / "speech" / "de-fr-snr5_20"
    assert both == tmp_path / "cache" / "speech" / "de-fr-snr5_20-rt60_0.2_0.8"
    assert [kw["augment"] for _, kw in calls] == [
        synth.Augmentation(), synth.Augmentation((5, 20)), synth.Augmentation((5, 20), (0.2, 0.8))]


def test_cli_passes_the_flags_and_refuses_bad_ranges(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(languages, splits, out, **kw):
        seen.update(kw)
        synth.Augmentation.coerce(kw["augment"])  # validated as the real synthesize does
        return out / "manifest.jsonl"

    monkeypatch.setattr(synth, "synthesize", fake)
    out = tmp_path / "o"
    assert main(["synth", "--out", str(out), "--noise-snr=-5,10", "--reverb-rt60", "0.3,0.6",
                 "--quiet"]) == 0
    assert seen["augment"] == {"noise_snr": "-5,10", "reverb_rt60": "0.3,0.6"}
    assert main(["synth", "--out", str(out), "--quiet"]) == 0
    assert seen["augment"] == {"noise_snr": None, "reverb_rt60": None}
    monkeypatch.undo()
    for flags, message in ((["--noise-snr", "30,10"], "noise_snr 30,10 is not a range"),
                           (["--noise-snr", "x,y"], "noise_snr expects LO,HI"),
                           (["--reverb-rt60", "0.5,7"], "reverb_rt60 0.5,7 is not a range")):
        assert main(["synth", "--out", str(out), "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lors: error: ") and message in err, err
    assert not out.exists()


# --- end to end with espeak-ng ------------------------------------------------------------

@pytest.mark.slow
def test_degraded_renders_end_to_end(bank, tmp_path):
    need_espeak()
    clean_m = synth.synthesize(["de", "fr"], ["train", "test"], tmp_path / "clean",
                               bank_dir=bank, **KW)
    augment = synth.Augmentation(noise_snr=(0, 25))
    noisy_m = synth.synthesize(["de", "fr"], ["train", "test"], tmp_path / ("s" + augment.suffix),
                               bank_dir=bank, augment=augment, **KW)
    reverb = synth.Augmentation(reverb_rt60=(0.4, 0.9))
    reverb_m = synth.synthesize(["de", "fr"], ["train", "test"], tmp_path / ("s" + reverb.suffix),
                                bank_dir=bank, augment=reverb, **KW)
    clean, noisy, reverbed = map(read_manifest, (clean_m, noisy_m, reverb_m))
    assert [u.id for u in clean] == [u.id for u in noisy] == [u.id for u in reverbed]
    # clean manifests keep the old format; degraded ones record what was applied
    assert all(list(json.loads(line)) == list(FIELDS)
               for line in clean_m.read_text().splitlines())
    for c, n, r in zip(clean, noisy, reverbed):
        assert c.voice == n.voice == r.voice and c.audio != n.audio != r.audio
        assert c.noise_snr is None and c.reverb_rt60 is None
        drawn = augment.draw(n.id)
        assert (n.noise_snr, n.reverb_rt60) == (drawn.noise_snr, None)
        assert (r.noise_snr, r.reverb_rt60) == (None, reverb.draw(r.id).reverb_rt60)
        dry, wet, room = _read(c.audio), _read(n.audio), _read(r.audio)
        # the noisy render's SNR, measured against the clean render, is the drawn one
        assert len(wet) == len(dry)
        assert abs(_snr_against(wet, dry) - n.noise_snr) < 0.5, (n.id, n.noise_snr)
        # no clipping: peak-normalised to -1 dBFS
        for x in (wet, room):
            assert np.max(np.abs(x)) == pytest.approx(PEAK, abs=1e-4)
        # reverberation keeps decaying energy after the dry speech has ended
        assert len(room) == len(dry) + round(r.reverb_rt60 * 16000) - 1
        assert r.duration == pytest.approx(len(room) / 16000)
        end = np.nonzero(np.abs(dry) > 0.01 * np.max(np.abs(dry)))[0][-1] + 800  # +50 ms
        dry_tail = np.sum(dry[end:] ** 2) / np.sum(dry ** 2)
        wet_tail = np.sum(room[end:] ** 2) / np.sum(room ** 2)
        assert wet_tail > 1e-4 and wet_tail > 100 * dry_tail, (r.id, wet_tail, dry_tail)
        last = lambda x: np.nonzero(np.abs(x) > 1e-3 * np.max(np.abs(x)))[0][-1]  # noqa: E731
        # the -60 dB (re peak) point of the reverberant clip comes well after the dry one's
        assert (last(room) - last(dry)) / 16000 > 0.4 * r.reverb_rt60
        assert wav_comment(r.audio) == synth.render_key(synth.voice_plan(
            r.id.split("-")[2], r.language, r.split), reverb.draw(r.id))
    # deterministic: a fresh render of the same settings is sample-identical
    again = synth.synthesize(["de", "fr"], ["train", "test"], tmp_path / "again",
                             bank_dir=bank, augment=augment, **KW)
    for a, b in zip(noisy, read_manifest(again)):
        assert Path(a.audio).read_bytes() == Path(b.audio).read_bytes()


@pytest.mark.slow
def test_rerun_re_renders_when_plan_or_degradation_changed(bank, tmp_path, monkeypatch):
    need_espeak()
    out = tmp_path / "synth"
    first = read_manifest(synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank, **KW))
    stamps = {u.audio: os.stat(u.audio).st_mtime_ns for u in first}
    assert read_manifest(synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank,
                                          **KW)) == first
    assert {u.audio: os.stat(u.audio).st_mtime_ns for u in first} == stamps  # kept

    # a WAV from before render keys (no INFO comment) is stale: rendered again
    old = Path(first[0].audio)
    write_wav(old, load_audio(old))
    assert wav_comment(old) is None
    synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank, **KW)
    assert wav_comment(old) == synth.render_key(synth.voice_plan(
        old.stem, "de", first[0].split))

    # another voice plan: every WAV is rendered again and the manifest names the new voice
    stamps = {u.audio: os.stat(u.audio).st_mtime_ns for u in first}
    monkeypatch.setattr(synth, "TRAIN_RATES", (200,))
    monkeypatch.setattr(synth, "HELDOUT_RATES", (205,))
    changed = read_manifest(synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank,
                                             **KW))
    assert [u.id for u in changed] == [u.id for u in first]
    assert all(u.voice.split()[1] in ("s200", "s205") for u in changed)
    for u, before in zip(changed, first):
        assert os.stat(u.audio).st_mtime_ns != stamps[u.audio]
        assert u.duration < before.duration  # faster speech
    monkeypatch.undo()

    # degradation into the same folder is a changed render key too: rendered, not reused
    noisy = read_manifest(synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank,
                                           augment={"noise_snr": [10, 10]}, **KW))
    assert all(u.noise_snr == 10.0 for u in noisy)
    assert all(wav_comment(u.audio).endswith(" noise 10 dB SNR") for u in noisy)
    back = read_manifest(synth.synthesize(["de"], ["train", "test"], out, bank_dir=bank, **KW))
    assert back == first
    assert all(wav_comment(u.audio).endswith("; clean") for u in back)


@pytest.mark.slow
def test_cli_renders_degraded_speech(tmp_path, capsys):
    need_espeak()
    out = tmp_path / "cli"
    assert main(["synth", "--languages", "it", "--splits", "test", "--limit", "1", "--out",
                 str(out), "--noise-snr", "15,15", "--reverb-rt60", "0.3,0.3", "--quiet"]) == 0
    assert f"manifest: {out / 'manifest.jsonl'}" in capsys.readouterr().out
    (utt,) = read_manifest(out / "manifest.jsonl")
    assert (utt.noise_snr, utt.reverb_rt60) == (15.0, 0.3)
    assert np.max(np.abs(_read(utt.audio))) < 1.0
