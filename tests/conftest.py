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
