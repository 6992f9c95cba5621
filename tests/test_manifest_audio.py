"""Manifest round trips and audio decoding (fast: no espeak-ng, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lors.data.audio import is_valid_wav, load_audio, resample, write_wav
from lors.data.manifest import FIELDS, Utterance, read_manifest, to_hf_dataset, write_manifest
from lors.errors import LorsError


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _utts(tmp_path: Path) -> list[Utterance]:
    inside = tmp_path / "corpus" / "de" / "test" / "s1.wav"
    outside = tmp_path / "elsewhere" / "s2.wav"
    for path in (inside, outside):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _tone(0.5, 16000), 16000)
    return [
        Utterance("de-test-s1", "de", "test", str(inside), 0.5, "Grüß Gott, „Welt“!",
                  "Hello, world!", "de+m7 s125 p50 g4"),
        Utterance("sv-test-s2", "sv", "test", str(outside), 0.5, "Hej då", None, None),
    ]


def test_manifest_round_trip_with_relative_paths(tmp_path):
    utts = _utts(tmp_path)
    manifest = write_manifest(tmp_path / "corpus" / "manifest.jsonl", utts)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [list(r) for r in records] == [list(FIELDS)] * 2
    assert records[0]["audio"] == "de/test/s1.wav"  # inside the folder: relative
    assert records[1]["audio"] == str(tmp_path / "elsewhere" / "s2.wav")  # outside: absolute
    assert "Grüß" in lines[0]  # UTF-8 kept readable, not \u-escaped
    assert read_manifest(manifest) == utts


def test_manifest_moves_with_its_folder(tmp_path):
    utts = _utts(tmp_path)[:1]
    write_manifest(tmp_path / "corpus" / "manifest.jsonl", utts)
    os.rename(tmp_path / "corpus", tmp_path / "moved")
    (loaded,) = read_manifest(tmp_path / "moved" / "manifest.jsonl")
    assert loaded.audio == str(tmp_path / "moved" / "de" / "test" / "s1.wav")
    assert load_audio(loaded.audio).shape == (8000,)


def test_manifest_without_translation_and_voice_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    record = {"id": "a", "language": "it", "split": "dev", "audio": "a.wav",
              "duration": 1, "transcript": "ciao"}
    path.write_text("\n" + json.dumps(record) + "\n\n", encoding="utf-8")
    (utt,) = read_manifest(path)
    assert (utt.translation, utt.voice, utt.duration) == (None, None, 1.0)
    assert utt.audio == str(tmp_path / "a.wav")


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "language": "it"', "invalid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"id": "b", "language": "it", "split": "dev", "audio": "b.wav", "duration": 1}',
     "missing field(s) transcript"),
    ('{"id": "b", "language": "it", "split": "dev", "audio": "b.wav", "duration": 1, '
     '"transcript": "  "}', "'transcript' must be a non-empty string"),
    ('{"id": "b", "language": "it", "split": "dev", "audio": "b.wav", "duration": "1s", '
     '"transcript": "x"}', "'duration'"),
    ('{"id": "a", "language": "it", "split": "dev", "audio": "b.wav", "duration": 1, '
     '"transcript": "x"}', "duplicate id 'a' (first on line 1)"),
])
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, message):
    good = {"id": "a", "language": "it", "split": "dev", "audio": "a.wav",
            "duration": 1.5, "transcript": "ciao", "translation": "hi", "voice": None}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(LorsError) as info:
        read_manifest(path)
    assert f"manifest {path}, line 2" in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_manifests_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(LorsError, match="holds no utterances"):
        read_manifest(empty)
    with pytest.raises(LorsError, match="cannot read manifest"):
        read_manifest(tmp_path / "absent.jsonl")


def test_write_manifest_rejects_duplicate_ids_and_leaves_no_file(tmp_path):
    utt = _utts(tmp_path)[0]
    target = tmp_path / "dup.jsonl"
    with pytest.raises(LorsError, match="duplicate utterance id"):
        write_manifest(target, [utt, utt])
    assert not target.exists()


def test_to_hf_dataset_columns(tmp_path):
    utts = _utts(tmp_path)
    manifest = write_manifest(tmp_path / "corpus" / "manifest.jsonl", utts)
    for source in (manifest, utts):
        ds = to_hf_dataset(source)
        assert ds.column_names == list(FIELDS)
        assert ds.num_rows == 2
        assert ds[0]["audio"] == utts[0].audio and Path(ds[0]["audio"]).is_absolute()
        assert ds[1]["translation"] is None and ds[0]["duration"] == 0.5
    datasets = pytest.importorskip("datasets")
    cast = to_hf_dataset(manifest, cast_audio=True)
    assert isinstance(cast.features["audio"], datasets.Audio)
    assert cast.features["audio"].sampling_rate == 16000


def test_load_audio_resamples_22050_to_16k(tmp_path):
    path = tmp_path / "espeak_like.wav"
    sf.write(path, _tone(1.5, 22050), 22050, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 24000  # 1.5 s at 16 kHz exactly (22050 -> 16000 is 320/441)
    # the 440 Hz tone survives resampling: its spectral peak stays at 440 Hz
    peak = np.argmax(np.abs(np.fft.rfft(audio))) * 16000 / len(audio)
    assert abs(peak - 440) < 2


def test_load_audio_downmixes_stereo_44100(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = _tone(2.0, 44100, 300), np.zeros(88200, dtype=np.float32)
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.shape == (32000,)
    # averaging the channels halves the amplitude of a tone present in one channel only
    assert abs(np.max(np.abs(audio[1000:-1000])) - 0.25) < 0.01


def test_write_wav_is_valid_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "out.wav"
    samples = _tone(0.25, 16000) * 3  # overflows: must be clipped, not wrapped around
    write_wav(path, samples)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16",
                                                                           4000)
    assert is_valid_wav(path)
    back = load_audio(path)
    # equal to the clipped input up to 16-bit quantisation (wrapping would differ by ~2)
    assert np.max(np.abs(back - np.clip(samples, -1, 1))) < 1e-3
    assert [p.name for p in path.parent.iterdir()] == ["out.wav"]  # no temp left over


def test_corrupt_audio_errors_name_the_file(tmp_path):
    good = tmp_path / "good.wav"
    write_wav(good, _tone(1.0, 16000))
    data = good.read_bytes()
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 20)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(data[:30])
    for bad in (garbage, truncated, header_only):
        assert not is_valid_wav(bad)
        with pytest.raises(LorsError) as info:
            load_audio(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(LorsError, match="truncated: the header declares 16000 frames"):
        load_audio(truncated)
    with pytest.raises(LorsError, match="does not exist"):
        load_audio(tmp_path / "absent.wav")
    assert is_valid_wav(good) and not is_valid_wav(tmp_path / "absent.wav")


def test_streamed_wav_with_placeholder_sizes_still_loads(tmp_path):
    # espeak-ng --stdout writes 0x7ffff000 as the data size because it cannot seek back
    good = tmp_path / "good.wav"
    write_wav(good, _tone(0.5, 16000))
    data = bytearray(good.read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = (0x7FFFF000).to_bytes(4, "little")
    streamed = tmp_path / "streamed.wav"
    streamed.write_bytes(bytes(data))
    assert len(load_audio(streamed)) == 8000
    assert not is_valid_wav(streamed)  # our own finished files must have exact sizes


def test_resample_uses_exact_ratio():
    x = np.ones(441, dtype=np.float32)
    assert len(resample(x, 22050, 16000)) == 320
    assert resample(x, 16000, 16000) is not None and len(resample(x, 16000)) == 441
