"""Tiny random Whisper models for mechanics tests: a base and experts fine-tuned from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from tiny_tokenizer import SPECIALS, write_tiny_tokenizer

N_MELS = 16


def tiny_config(**overrides) -> WhisperConfig:
    values = dict(vocab_size=300, num_mel_bins=N_MELS, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
                  max_target_positions=40, pad_token_id=256, bos_token_id=256,
                  eos_token_id=256, decoder_start_token_id=257)
    values.update(overrides)
    return WhisperConfig(**values)


def save_tiny_base(folder: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny Whisper with tokenizer and feature extractor files."""
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config(**overrides))
    special = {token: 256 + i for i, token in enumerate(SPECIALS)}
    generation = model.generation_config
    generation.max_length = 20
    generation.is_multilingual = True
    generation.begin_suppress_tokens = [special["<|endoftext|>"]]
    generation.no_timestamps_token_id = special["<|notimestamps|>"]
    generation.lang_to_id = {t: special[t] for t in ("<|en|>", "<|de|>", "<|fr|>")}
    generation.task_to_id = {"transcribe": special["<|transcribe|>"],
                             "translate": special["<|translate|>"]}
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=N_MELS, chunk_length=1).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


def save_expert(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """The base plus a random task vector on every trained float tensor (frozen ones untouched)."""
    model = WhisperForConditionalGeneration.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("encoder.embed_positions.weight"):
                continue
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """A tiny base and three experts fine-tuned from it (session-wide, read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_base(root / "base")
    experts = {f"e{i}": save_expert(base, root / f"e{i}", seed=10 + i) for i in range(3)}
    return {"base": base, "experts": experts, "root": root}


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
