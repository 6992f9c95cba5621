"""LoRS-Merging experts of the real pretrained Whisper base: the output is a working Whisper."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lors.base import ensure_base_model
from lors.merging import merge, validate_config

pytestmark = pytest.mark.slow


def _expert(base: Path, out: Path, seed: int) -> Path:
    """A stand-in expert: the base with a small random low-rank + sparse update on every FFN."""
    from transformers import WhisperForConditionalGeneration
    model = WhisperForConditionalGeneration.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("fc1.weight", "fc2.weight")):
                rows, cols = param.shape
                param.add_(1e-3 * torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g)
                           / cols ** 0.5)
    model.save_pretrained(out)
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


def test_lors_merge_of_real_base_experts_transcribes_like_the_base(tmp_path):
    import subprocess

    from transformers import pipeline

    from lors.data.audio import load_audio
    from lors.data.synth import check_espeak

    base = ensure_base_model(show_progress=False)
    experts = [_expert(base, tmp_path / f"e{i}", seed=i) for i in range(2)]
    config = validate_config({"base": str(base), "method": "lors",
                              "experts": [{"name": f"e{i}", "path": str(p)}
                                          for i, p in enumerate(experts)]})
    report = merge(config, tmp_path / "merged")
    assert report["groups"]["ffn"]["tensors"] == 24  # fc1 + fc2 in 6 + 6 layers and report["groups"]["ffn"]["op"] == "lors"
    assert report["resolved_config"]["parameters"]["lambda"] == pytest.approx(0.5)

    wav = tmp_path / "de.wav"
    subprocess.run([check_espeak(), "-v", "de", "-s", "120", "-g", "4", "-w", str(wav),
                    "Der Hund spielt im Garten mit dem Ball."], check=True)
    audio = {"raw": load_audio(wav), "sampling_rate": 16000}
    kwargs = {"language": "de", "task": "transcribe", "max_new_tokens": 40, "num_beams": 1}
    merged_text = pipeline("automatic-speech-recognition", model=str(tmp_path / "merged"))(
        dict(audio), generate_kwargs=kwargs)["text"]
    base_text = pipeline("automatic-speech-recognition", model=str(base))(
        dict(audio), generate_kwargs=kwargs)["text"]
    assert "Hund" in merged_text
    assert merged_text == base_text  # tiny expert updates must not derail the decoder
