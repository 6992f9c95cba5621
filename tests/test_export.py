"""`lors export` and `lors merge --export`: CTranslate2 and openai-whisper round trips on tiny
random models, every bad input refused before any weight is read."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lors.checkpoint.names import (config_to_openai_dims, hf_to_openai, openai_dims_to_config,
                                   openai_to_hf)
from lors.checkpoint.reader import open_checkpoint
from lors.cli import main
from lors.errors import CheckpointError, LorsError, OutputExistsError
from lors.export import export_model
from lors.tiny import N_MELS, save_tiny_base, save_tiny_expert

OPENAI_SHAPE = dict(encoder_ffn_dim=128, decoder_ffn_dim=128)  # openai's FFN is 4 x d_model
PROMPT = [257, 259, 262, 266]  # <|startoftranscript|> <|de|> <|transcribe|> <|notimestamps|>


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    """A tiny base openai's architecture can hold, with one expert fine-tuned from it."""
    root = tmp_path_factory.mktemp("tiny4")
    base = save_tiny_base(root / "base", **OPENAI_SHAPE)
    expert = save_tiny_expert(base, root / "expert", seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(base / name, expert / name)  # as a real fine-tune is saved
    return root


def _hf(folder: Path):
    from transformers import WhisperForConditionalGeneration
    return WhisperForConditionalGeneration.from_pretrained(folder).eval()


def _mel(n_mels: int = N_MELS, frames: int = 100) -> torch.Tensor:
    return torch.randn(1, n_mels, frames, generator=torch.Generator().manual_seed(0))


def test_names_round_trip_both_ways(tiny4):
    from whisper.model import ModelDimensions, Whisper
    hf_names = [n for n in _hf(tiny4 / "base").state_dict() if n != "proj_out.weight"]
    assert all(openai_to_hf(hf_to_openai(n)) == n for n in hf_names)
    dims = config_to_openai_dims(open_checkpoint(tiny4 / "base").config)
    openai_names = list(Whisper(ModelDimensions(**dims)).state_dict())
    assert all(hf_to_openai(openai_to_hf(n)) == n for n in openai_names)
    assert sorted(map(hf_to_openai, hf_names)) == sorted(openai_names)
    assert config_to_openai_dims(openai_dims_to_config(dims)) == dims


def test_ct2_round_trip_matches_transformers(tiny4, tmp_path):
    import ctranslate2
    summary = export_model(tiny4 / "expert", tmp_path / "ct2", "ct2")
    assert summary["quantization"] == "float32"
    assert {"model.bin", "tokenizer.json", "preprocessor_config.json"} <= set(summary["files"])
    model, mel = _hf(tiny4 / "expert"), _mel()
    ct2 = ctranslate2.models.Whisper(str(tmp_path / "ct2"))
    encoded = np.array(ct2.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
    with torch.no_grad():
        reference = model.model.encoder(mel).last_hidden_state.numpy()
        ids = PROMPT[:]
        for _ in range(12):  # greedy, no suppression: the plain argmax of the logits
            logits = model(input_features=mel, decoder_input_ids=torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    assert np.abs(encoded - reference).max() < 1e-4
    result = ct2.generate(ctranslate2.StorageView.from_array(mel.numpy()), [PROMPT],
                          beam_size=1, max_length=len(ids), suppress_blank=False,
                          suppress_tokens=[], return_no_speech_prob=False)
    generated = result[0].sequences_ids[0]
    assert generated == ids[len(PROMPT):len(PROMPT) + len(generated)] and len(generated) > 0


def test_ct2_carries_128_mel_bins_and_large_v3_vocabulary(tmp_path):
    """large-v3's shape: 128 mel bins, 51866 tokens. Through an openai .pt (no preprocessor
    file beside it) the feature size must still come out 128, for faster-whisper too."""
    from faster_whisper import WhisperModel
    base = save_tiny_base(tmp_path / "v3", num_mel_bins=128, vocab_size=51866, **OPENAI_SHAPE)
    pt_dir = tmp_path / "pt"
    export_model(base, pt_dir / "model.pt", "openai")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer, no preprocessor
        shutil.copy(base / name, pt_dir / name)
    for source in (base, pt_dir / "model.pt"):
        out = tmp_path / f"ct2-{Path(source).name}"
        export_model(source, out, "ct2", quantization="int8")
        assert json.loads((out / "preprocessor_config.json").read_text())["feature_size"] == 128
        loaded = WhisperModel(str(out), device="cpu", compute_type="int8")
        assert loaded.model.n_mels == 128 and loaded.feat_kwargs["feature_size"] == 128
        assert len(json.loads((out / "vocabulary.json").read_text())) == 51866


@pytest.mark.parametrize("quantization", ["float16", "bfloat16", "int8_float32", "int8_float16",
                                          "int8_bfloat16", "int16"])
def test_every_quantization_converts_and_loads(tiny4, tmp_path, quantization):
    summary = export_model(tiny4 / "base", tmp_path / "ct2", "ct2", quantization=quantization)
    assert summary["quantization"] == quantization  # loaded once by export_model's own check


def test_openai_round_trip_loads_and_matches_transformers(tiny4, tmp_path):
    import whisper
    export_model(tiny4 / "expert", tmp_path / "expert.pt", "openai")
    loaded = whisper.load_model(str(tmp_path / "expert.pt"), device="cpu")
    model, mel, tokens = _hf(tiny4 / "expert"), _mel(), torch.tensor([PROMPT + [40, 50, 60]])
    with torch.no_grad():
        ours = loaded(mel, tokens)
        reference = model(input_features=mel, decoder_input_ids=tokens).logits
    assert (ours - reference).abs().max() < 1e-4
    back, original = open_checkpoint(tmp_path / "expert.pt"), open_checkpoint(tiny4 / "expert")
    assert back.meta.keys() == original.meta.keys()
    assert all(torch.equal(back.read(n), original.read(n)) for n in original.meta)


def test_cli_export_and_merge_with_exports(tiny4, tmp_path, capsys):
    assert main(["export", str(tiny4 / "base"), "--format", "ct2", "--quantization", "int8",
                 "--out", str(tmp_path / "base-ct2")]) == 0
    assert "int8" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny4 / "base"), "--expert", f"a={tiny4 / 'expert'}",
                 "--method", "task_arithmetic", "--out", str(out), "--quiet",
                 "--export", "ct2", "--export", "openai"]) == 0
    assert (out / "config.json").is_file() and (tmp_path / "merged-ct2" / "model.bin").is_file()
    assert (tmp_path / "merged.pt").is_file()
    assert open_checkpoint(tmp_path / "merged.pt").meta.keys() == open_checkpoint(out).meta.keys()


def _refused(tmp_path: Path, call, error, match: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=match):
        call()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("fmt, quantization, out, match", [
    ("onnx", None, "x", r"unknown export format 'onnx'; choose from ct2, openai"),
    ("ct2", "int4", "x", r"unknown quantization 'int4'; choose from float32"),
    ("openai", "int8", "x.pt", r"--quantization applies to --format ct2 only"),
    ("openai", None, "x.bin", r"name it with \.pt"),
])
def test_bad_requests_are_refused(tiny4, tmp_path, fmt, quantization, out, match):
    _refused(tmp_path, lambda: export_model(tiny4 / "base", tmp_path / out, fmt,
                                            quantization=quantization), LorsError, match)


@pytest.mark.parametrize("fmt, module, install", [
    ("ct2", "ctranslate2", "pip install ctranslate2"),
    ("openai", "whisper", "pip install --no-deps openai-whisper"),
])
def test_missing_package_says_what_to_install(tiny4, tmp_path, monkeypatch, fmt, module, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    out = tmp_path / ("x.pt" if fmt == "openai" else "x")
    _refused(tmp_path, lambda: export_model(tiny4 / "base", out, fmt), LorsError,
             rf"needs the {module} package.*{install}")


def test_bad_models_and_outputs_are_refused(tiny4, tiny_models, tmp_path):
    (tmp_path / "taken").mkdir()
    _refused(tmp_path, lambda: export_model(tiny4 / "base", tmp_path / "taken", "ct2"),
             OutputExistsError, "already exists; choose another path or pass --force")
    _refused(tmp_path, lambda: export_model(tmp_path / "nowhere", tmp_path / "x", "ct2"),
             CheckpointError, "nowhere: no such directory")
    _refused(tmp_path, lambda: export_model(tiny_models["base"], tmp_path / "x.pt", "openai"),
             CheckpointError, r"openai-whisper cannot represent this model: FFN widths 64/64")
    bare = tmp_path / "bare"  # weights and config only, a vocabulary lors has no tokenizer for
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny4 / "base" / name, bare / name)
    _refused(tmp_path, lambda: export_model(bare, tmp_path / "x", "ct2"), CheckpointError,
             r"no tokenizer files .* copy the tokenizer files")
    odd = tmp_path / "odd"
    shutil.copytree(tiny4 / "base", odd)
    (odd / "preprocessor_config.json").write_text(json.dumps({"feature_size": 80}))
    _refused(tmp_path, lambda: export_model(odd, tmp_path / "x", "ct2"), CheckpointError,
             f"feature_size 80 but the model takes {N_MELS} mel bins")


@pytest.mark.parametrize("extra, match", [
    (["--export", "onnx"], "unknown export format 'onnx'"),
    (["--quantization", "int8"], "add --export ct2"),
    (["--export", "openai", "--quantization", "int8"], "add --export ct2"),
])
def test_merge_export_errors_come_before_merging(tiny4, tmp_path, capsys, extra, match):
    args = ["merge", "--base", str(tiny4 / "base"), "--expert", f"a={tiny4 / 'expert'}",
            "--method", "task_arithmetic", "--out", str(tmp_path / "m"), "--quiet", *extra]
    assert main(args) == 2
    assert match in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_merge_refuses_an_existing_export_path_before_merging(tiny4, tiny_models, tmp_path, capsys):
    (tmp_path / "m-ct2").mkdir()
    assert main(["merge", "--base", str(tiny4 / "base"), "--expert", f"a={tiny4 / 'expert'}",
                 "--method", "task_arithmetic", "--out", str(tmp_path / "m"), "--quiet",
                 "--export", "ct2"]) == 2
    assert "m-ct2 already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-ct2"]
    base = str(tiny_models["base"])  # FFN 2 x d_model: openai cannot hold the merge
    assert main(["merge", "--base", base, "--expert", f"a={tiny_models['experts']['e0']}",
                 "--method", "task_arithmetic", "--out", str(tmp_path / "n"), "--quiet",
                 "--export", "openai"]) == 2
    assert "cannot represent" in capsys.readouterr().err and not (tmp_path / "n").exists()



def test_merge_without_tokenizer_files_is_refused_before_merging(tiny4, tmp_path, capsys):
    bare = tmp_path / "bare"  # a base with weights and config only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny4 / "base" / name, bare / name)
    assert main(["merge", "--base", str(bare), "--expert", f"a={tiny4 / 'expert'}",
                 "--method", "task_arithmetic", "--out", str(tmp_path / "m"), "--quiet",
                 "--export", "ct2"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err and not (tmp_path / "m").exists()

INT8_WER_MARGIN = 0.10
"""Largest |WER(int8) - WER(transformers)| accepted on the slow test's 6 clips (absolute). On
the demo's 30 test clips (benchmarks/bench_export.py) it measured -1.5 points, with 11 of 30
transcripts identical: int8 changes words, not accuracy."""


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """The first two test sentences of the demo's languages, spoken by espeak-ng."""
    from conftest import need_espeak
    from lors.data.audio import load_audio
    from lors.data.manifest import read_manifest
    from lors.data.synth import synthesize
    from lors.export.check import Clip
    need_espeak()
    folder = tmp_path_factory.mktemp("speech")
    utterances = read_manifest(synthesize(["de", "es", "fr"], ["test"], folder,
                                          limit_per_split=2, show_progress=False))
    return [Clip(load_audio(u.audio), u.language) for u in utterances], \
        [u.transcript for u in utterances]


@pytest.mark.slow
def test_real_base_exports_transcribe_like_transformers(real_clips, tmp_path):
    from lors.base import ensure_base_model
    from lors.errors import LorsWarning
    from lors.evaluation import wer
    from lors.evaluation.normalize import normalize
    from lors.export.check import faster_whisper_greedy, hf_greedy, openai_greedy
    clips, truth = real_clips
    base = ensure_base_model(show_progress=False)
    export_model("base", tmp_path / "f32", "ct2")
    export_model("base", tmp_path / "int8", "ct2", quantization="int8")
    export_model("base", tmp_path / "pt" / "base.pt", "openai")
    reference = hf_greedy(base, clips)
    assert faster_whisper_greedy(tmp_path / "f32", clips, compute_type="float32") == reference
    assert openai_greedy(tmp_path / "pt" / "base.pt", clips) == reference

    def error(texts):
        return wer([normalize(t, c.language) for t, c in zip(truth, clips)],
                   [normalize(h, c.language) for h, c in zip(texts, clips)])
    int8 = faster_whisper_greedy(tmp_path / "int8", clips, compute_type="int8")
    assert abs(error(int8) - error(reference)) <= INT8_WER_MARGIN
    # an openai .pt has no tokenizer: the embedded base's is used, and the model is the same
    with pytest.warns(LorsWarning, match="no tokenizer files; using the embedded base's"):
        export_model(tmp_path / "pt" / "base.pt", tmp_path / "f32-from-pt", "ct2")
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json"):
        assert (tmp_path / "f32-from-pt" / name).read_bytes() == \
            (tmp_path / "f32" / name).read_bytes()
