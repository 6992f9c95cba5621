"""Shared fixtures: tiny random Whisper models (a base and experts fine-tuned from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from lors.tiny import save_tiny_base, save_tiny_expert



@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """A tiny base and three experts fine-tuned from it (session-wide, read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_base(root / "base")
    experts = {f"e{i}": save_tiny_expert(base, root / f"e{i}", seed=10 + i) for i in range(3)}
    return {"base": base, "experts": experts, "root": root}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["load_state", "read_json", "save_tiny_base"]


TINY_WORDS = ["hallo welt", "guten tag", "ein hund", "das haus", "bonjour", "le chat", "un pain",
              "la mer", "gut", "oui", "rot", "vert"]


def make_tiny_speech(root: Path, counts: dict[str, int], languages=("de", "fr")) -> list:
    """Short clips (a tone plus noise, 0.4-0.9 s) with short transcripts and translations,
    for the tiny Whisper's languages; ``counts`` is clips per split, e.g. {"train": 8}."""
    import numpy as np

    from lors.data.audio import write_wav
    from lors.data.manifest import Utterance
    rng = np.random.default_rng(0)
    utterances = []
    for language in languages:
        for split, count in counts.items():
            for i in range(count):
                seconds = 0.4 + 0.5 * rng.random()
                t = np.arange(int(seconds * 16000)) / 16000
                audio = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
                path = root / "audio" / f"{language}-{split}-{i}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_wav(path, audio.astype(np.float32))
                text = TINY_WORDS[(i + (6 if language == "fr" else 0)) % len(TINY_WORDS)]
                utterances.append(Utterance(id=f"{language}-{split}-{i}", language=language,
                                            split=split, audio=str(path), duration=seconds,
                                            transcript=text, translation=f"the {text}"))
    return utterances
