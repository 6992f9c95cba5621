"""espeak-ng synthesis end to end on a tiny sentence bank written by the test.

Needs the ``espeak-ng`` binary: skipped where it is absent, except in CI (``CI`` set),
where a missing espeak-ng is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from conftest import need_espeak
from lors import fsutil
from lors.data import synth
from lors.data.audio import is_valid_wav
from lors.data.manifest import read_manifest
from lors.data.sentences import SPLITS, select
from lors.errors import LorsError

def _voice_variant(voice: str) -> str:
    return voice.split()[0].split("+")[1]


@pytest.mark.slow
def test_synthesize_renders_wavs_and_manifest(bank, tmp_path):
    need_espeak()
    out = tmp_path / "synth"
    langs = ["de", "ru"]
    sentences = select(langs, list(SPLITS), limit_per_split=2, bank_dir=bank)
    splits = {s.split for s in sentences}
    assert "train" in splits and splits & {"dev", "test"}, \
        "the test bank must give both train and held-out sentences"
    manifest = synth.synthesize(",".join(langs), SPLITS, out, limit_per_split=2, jobs=2,
                                bank_dir=bank, show_progress=False)
    assert manifest == out / "manifest.jsonl"
    utts = read_manifest(manifest)
    # one utterance per (language, sentence), languages in the order given
    assert [(u.language, u.split, Path(u.audio).stem) for u in utts] == \
        [(lang, s.split, s.sid) for lang in langs for s in sentences]
    for utt, sentence in zip(utts, sentences * len(langs)):
        assert utt.id == f"{utt.language}-{utt.split}-{sentence.sid}"
        assert utt.audio == str(out / utt.language / utt.split / f"{sentence.sid}.wav")
        assert utt.transcript == sentence.text(utt.language)
        assert utt.translation == sentence.text("en")
        info = sf.info(utt.audio)
        assert (info.samplerate, info.channels) == (16000, 1) and is_valid_wav(utt.audio)
        assert utt.duration == pytest.approx(info.frames / 16000) and utt.duration > 0.5
        voice, rate, pitch, gap = utt.voice.split()
        assert voice.startswith(synth.ESPEAK_VOICES[utt.language] + "+")
        rates = synth.TRAIN_RATES if utt.split == "train" else synth.HELDOUT_RATES
        pitches = synth.TRAIN_PITCHES if utt.split == "train" else synth.HELDOUT_PITCHES
        assert int(rate[1:]) in rates and int(pitch[1:]) in pitches
        assert int(gap[1:]) in synth.GAPS
    train = {_voice_variant(u.voice) for u in utts if u.split == "train"}
    heldout = {_voice_variant(u.voice) for u in utts if u.split != "train"}
    assert train and heldout and not train & heldout


def test_voice_plan_is_deterministic_and_splits_are_disjoint():
    train = {synth.voice_plan(f"s{i}", lang, "train").voice
             for i in range(200) for lang in ("de", "fr")}
    heldout = {synth.voice_plan(f"s{i}", lang, split).voice
               for i in range(200) for lang in ("de", "fr") for split in ("dev", "test")}
    variants = lambda voices: {v.split("+")[1] for v in voices}  # noqa: E731
    assert variants(train) == set(synth.TRAIN_VARIANTS)
    assert variants(heldout) == set(synth.HELDOUT_VARIANTS)
    assert synth.voice_plan("s7", "fr", "dev") == synth.voice_plan("s7", "fr", "dev")
    plan = synth.voice_plan("s7", "fr", "dev")
    assert plan.label == f"{plan.voice} s{plan.rate} p{plan.pitch} g{plan.gap}"
    assert plan.voice.startswith("fr+")  # not fr-fr: espeak-ng ignores variants after it


@pytest.mark.slow
def test_rerun_is_idempotent_and_repairs_truncated_wavs(bank, tmp_path):
    need_espeak()
    out = tmp_path / "synth"
    kwargs = dict(limit_per_split=2, jobs=2, bank_dir=bank, show_progress=False)
    first = read_manifest(synth.synthesize(["fr"], ["train", "dev", "test"], out, **kwargs))
    stamps = {u.audio: os.stat(u.audio).st_mtime_ns for u in first}
    assert read_manifest(synth.synthesize(["fr"], ["train", "dev", "test"], out,
                                          **kwargs)) == first
    assert {u.audio: os.stat(u.audio).st_mtime_ns for u in first} == stamps

    victim = Path(first[0].audio)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # as if killed mid-write without atomicity
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid belongs to no live process now
    stale = victim.parent / f".{victim.name}.tmp-{finished.pid}-0123abcd"
    stale.write_bytes(b"partial")  # what a SIGKILLed atomic write leaves behind
    fsutil._stale.clear()  # a folder's dead temporaries are listed once per process
    assert not is_valid_wav(victim)
    again = read_manifest(synth.synthesize(["fr"], ["train", "dev", "test"], out, **kwargs))
    assert again == first  # same duration: deterministic voice and text
    assert victim.read_bytes() == data and not stale.exists()
    assert {u.audio: os.stat(u.audio).st_mtime_ns for u in first[1:]} == \
        {a: t for a, t in stamps.items() if a != str(victim)}


def test_bad_language_or_split_fails_before_writing(bank, tmp_path):
    out = tmp_path / "synth"
    with pytest.raises(LorsError, match=r"'xx'.*supported: ca, de, en, es, fr"):
        synth.synthesize(["de", "xx"], ["test"], out, bank_dir=bank, show_progress=False)
    with pytest.raises(LorsError, match="unknown split"):
        synth.synthesize(["de"], ["validation"], out, bank_dir=bank, show_progress=False)
    with pytest.raises(LorsError, match="no languages"):
        synth.synthesize(" , ", ["test"], out, bank_dir=bank, show_progress=False)
    assert not out.exists()


def test_missing_espeak_gives_install_command(bank, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(LorsError, match=r"apt-get install espeak-ng"):
        synth.check_espeak()
    out = tmp_path / "synth"
    with pytest.raises(LorsError, match=r"sudo apt-get install espeak-ng"):
        synth.synthesize(["de"], ["test"], out, bank_dir=bank, show_progress=False)
    assert not out.exists()
