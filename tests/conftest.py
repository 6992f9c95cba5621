"""Shared fixtures: tiny random Whisper models (a base and experts fine-tuned from it)."""

from __future__ import annotations

import json
import os
import shutil
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


# A tiny sentence bank in the real TSV format, for espeak-ng synthesis tests.
COLUMNS = ("sid", "en", "ca", "de", "es", "fr", "it", "id", "nl", "pt", "ru", "sv")
TEMPLATES = {
    "en": "It's a fine day, said {name}.",
    "ca": "Fa un bon dia, va dir {name}.",
    "de": "Es ist ein schöner Tag, sagte {name}.",
    "es": "Hace un buen día, dijo {name}.",
    "fr": "C'est une belle journée, a dit {name}.",
    "it": "È una bella giornata, disse {name}.",
    "id": "Hari yang indah, kata {name}.",
    "nl": "Het is een mooie dag, zei {name}.",
    "pt": "Está um belo dia, disse {name}.",
    "ru": "Прекрасный день, сказал {name}.",
    "sv": "Det är en fin dag, sa {name}.",
}
NAMES = ("Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ida", "Jonas",
         "Karin", "Lukas", "Maria", "Nils", "Olga", "Pablo", "Rita", "Simon", "Tina", "Ugo",
         "Vera", "Walter", "Xenia", "Yusuf", "Zoe", "Adam", "Bruno", "Carla", "Dora", "Emil")


def need_espeak() -> None:
    """Skip without espeak-ng, except in CI (``CI`` set), where it is a failure."""
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is required in CI: apt-get install espeak-ng")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture()
def bank(tmp_path) -> Path:
    """A bank of len(NAMES) sentences in the real bank's TSV format."""
    folder = tmp_path / "bank"
    folder.mkdir()
    lines = ["\t".join(COLUMNS)]
    for i, name in enumerate(NAMES):
        texts = [TEMPLATES[lang].format(name=name) for lang in COLUMNS[1:]]
        lines.append("\t".join([f"t{i:03d}", *texts]))
    (folder / "sentences-1.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
