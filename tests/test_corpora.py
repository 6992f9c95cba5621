"""Corpus loaders over fixtures the tests build themselves (fast: no network)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from lors.data.audio import is_valid_wav, load_audio
from lors.data.corpora import load_covost2, load_generic, materialize
from lors.data.manifest import read_manifest
from lors.errors import LorsError

HEADER = "path\tsentence\ttranslation\tclient_id\n"


def _clip(path, seconds, rate=48000, channels=1):
    frames = int(seconds * rate)
    noise = np.random.default_rng(len(str(path))).uniform(-0.3, 0.3, (frames, channels))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, noise.astype(np.float32), rate)


@pytest.fixture()
def covost(tmp_path):
    """A CoVoST-style sv-SE fixture: TSVs in covost/, clips in cv/clips/."""
    tsv_dir, cv = tmp_path / "covost", tmp_path / "cv"
    tsv_dir.mkdir()
    rows = {
        "train": [("a.wav", "Hej då", "Goodbye", 1.0), ("b.wav", 'Han sa "ja"', 'He said "yes"',
                                                       0.5)],
        "dev": [("c.wav", "Tack så mycket", "Thank you very much", 2.0)],
        "test": [(f"t{i}.wav", f"Mening {i}", f"Sentence {i}", 0.25) for i in range(4)],
    }
    for split, items in rows.items():
        lines = [f"{p}\t{s}\t{t}\tclient{i}\n" for i, (p, s, t, _) in enumerate(items)]
        (tsv_dir / f"covost_v2.sv-SE_en.{split}.tsv").write_text(HEADER + "".join(lines),
                                                                 encoding="utf-8")
        for path, _, _, seconds in items:
            _clip(cv / "clips" / path, seconds)
    return tsv_dir, cv


def test_load_covost2_reads_splits_and_maps_language(covost):
    tsv_dir, cv = covost
    utts = load_covost2(tsv_dir, cv, "sv", ["train", "dev"])
    assert [u.id for u in utts] == ["sv-train-a", "sv-train-b", "sv-dev-c"]
    assert {u.language for u in utts} == {"sv"}
    first, quoted, dev = utts
    assert (first.transcript, first.translation, first.split) == ("Hej då", "Goodbye", "train")
    assert quoted.transcript == 'Han sa "ja"'  # unquoted TSV: quotes kept verbatim
    assert dev.duration == pytest.approx(2.0) and first.duration == pytest.approx(1.0)
    assert dev.audio == str((cv / "clips" / "c.wav").resolve()) and dev.voice is None
    assert load_covost2(tsv_dir, cv, "sv-SE", "dev") == [dev]  # CoVoST code accepted too
    assert len(load_covost2(tsv_dir, cv, "sv", "test", limit_per_split=2)) == 2


def test_load_covost2_missing_clips(covost):
    tsv_dir, cv = covost
    (cv / "clips" / "t2.wav").unlink()
    skipped: list[str] = []
    with pytest.warns(UserWarning, match="1 of 4 clips"):
        utts = load_covost2(tsv_dir, cv, "sv", ["test"], max_missing=0.25, skipped=skipped)
    assert [u.id for u in utts] == ["sv-test-t0", "sv-test-t1", "sv-test-t3"]
    assert skipped == ["t2.wav"]
    with pytest.raises(LorsError, match=r"1 of 4 clips .* missing or unreadable: t2\.wav"):
        load_covost2(tsv_dir, cv, "sv", ["test"])  # default threshold is 1 %
    (cv / "clips" / "t3.wav").write_bytes(b"not audio")  # unreadable counts as missing
    with pytest.raises(LorsError, match="2 of 4 clips"):
        load_covost2(tsv_dir, cv, "sv", ["test"], max_missing=0.25)


def test_load_covost2_bad_inputs(covost, tmp_path):
    tsv_dir, cv = covost
    with pytest.raises(LorsError, match=r"covost_v2\.de_en\.dev\.tsv does not exist"):
        load_covost2(tsv_dir, cv, "de", ["dev"])
    with pytest.raises(LorsError, match="unknown CoVoST split"):
        load_covost2(tsv_dir, cv, "sv", ["validation"])
    broken = tsv_dir / "covost_v2.fr_en.dev.tsv"
    broken.write_text(HEADER + "x.wav\tbonjour\n", encoding="utf-8")
    with pytest.raises(LorsError, match="line 2: 2 fields"):
        load_covost2(tsv_dir, cv, "fr", ["dev"])
    (tsv_dir / "covost_v2.it_en.dev.tsv").write_text("path\tsentence\n", encoding="utf-8")
    with pytest.raises(LorsError, match="lacks column"):
        load_covost2(tsv_dir, cv, "it", ["dev"])


def test_load_generic_tsv_and_csv(tmp_path):
    _clip(tmp_path / "audio" / "one.wav", 0.5, rate=16000)
    _clip(tmp_path / "audio" / "two.flac", 1.25, rate=22050, channels=2)
    tsv = tmp_path / "list.tsv"
    tsv.write_text("audio\ttranscript\ttranslation\tsplit\n"
                   "audio/one.wav\tHola, ¿qué tal?\tHi, how are you?\tdev\n"
                   "audio/two.flac\tAdiós\t\t\n", encoding="utf-8")
    one, two = load_generic(tsv, language="es")
    assert (one.id, one.language, one.split, one.translation) == (
        "list-000002", "es", "dev", "Hi, how are you?")
    assert (two.split, two.translation) == ("test", None)
    assert one.audio == str(tmp_path / "audio" / "one.wav")
    assert two.duration == pytest.approx(1.25, abs=1e-4)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text('id,audio,transcript,language\nx1,audio/one.wav,"uno, dos",ca\n',
                        encoding="utf-8")
    (utt,) = load_generic(csv_file)
    assert (utt.id, utt.transcript, utt.language) == ("x1", "uno, dos", "ca")


def test_load_generic_errors(tmp_path):
    tsv = tmp_path / "list.tsv"
    tsv.write_text("audio\ttranscript\nmissing.wav\thola\n", encoding="utf-8")
    with pytest.raises(LorsError, match=r"line 2: audio .*missing\.wav is missing"):
        load_generic(tsv, language="es")
    with pytest.raises(LorsError, match="no language"):
        load_generic(tsv)
    tsv.write_text("file\ttext\n", encoding="utf-8")
    with pytest.raises(LorsError, match="lacks column"):
        load_generic(tsv)
    with pytest.raises(LorsError, match="does not exist"):
        load_generic(tmp_path / "absent.tsv")


def test_materialize_decodes_to_16k_and_writes_manifest(covost, tmp_path):
    tsv_dir, cv = covost
    utts = load_covost2(tsv_dir, cv, "sv", ["train", "dev"])
    out = tmp_path / "wav16k"
    manifest = materialize(utts, out, jobs=2, show_progress=False)
    again = read_manifest(manifest)
    assert [u.id for u in again] == [u.id for u in utts]
    for before, after in zip(utts, again):
        assert after.audio == str(out / "sv" / before.split / f"{before.id}.wav")
        assert is_valid_wav(after.audio) and sf.info(after.audio).samplerate == 16000
        assert after.duration == pytest.approx(before.duration, abs=1e-3)
        assert len(load_audio(after.audio)) == round(before.duration * 16000)
    assert load_generic(manifest) == again  # JSONL goes through read_manifest


def test_covost_mp3_clips_load_and_materialize(tmp_path):
    # Common Voice ships MP3; libsndfile >= 1.1 reads (and here also writes) it.
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support")
    tsv_dir, clips = tmp_path / "covost", tmp_path / "cv" / "clips"
    tsv_dir.mkdir()
    clips.mkdir(parents=True)
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(48000 * 2) / 48000)
    sf.write(clips / "common_voice_de_1.mp3", tone.astype(np.float32), 48000,
             format="MP3", subtype="MPEG_LAYER_III")
    (tsv_dir / "covost_v2.de_en.test.tsv").write_text(
        HEADER + "common_voice_de_1.mp3\tGuten Morgen\tGood morning\tc1\n", encoding="utf-8")
    (utt,) = load_covost2(tsv_dir, tmp_path / "cv", "de", ["test"])
    assert utt.id == "de-test-common_voice_de_1"
    assert utt.duration == pytest.approx(2.0, abs=0.1)  # MP3 frame padding adds a little
    audio = load_audio(utt.audio)
    assert abs(len(audio) / 16000 - 2.0) < 0.1
    (wav,) = read_manifest(materialize([utt], tmp_path / "wav", show_progress=False))
    assert sf.info(wav.audio).format == "WAV" and sf.info(wav.audio).samplerate == 16000
    assert wav.duration == pytest.approx(len(audio) / 16000)
