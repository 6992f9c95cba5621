"""Tiny random Whisper models: a base and experts "fine-tuned" from it, for tests and examples.

They load, generate and merge like real checkpoints (config, safetensors, a byte-level
tokenizer, a feature extractor and a generation config with language and task ids) but are a
few hundred kilobytes, so mechanics can be checked in seconds with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

N_MELS = 16
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>",
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
            "<|nospeech|>", "<|notimestamps|>"]
FIRST_SPECIAL = 256  # after the 256 byte-level symbols


def tiny_config(**overrides):
    from transformers import WhisperConfig
    values = dict(vocab_size=300, num_mel_bins=N_MELS, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=50,
                  max_target_positions=40, pad_token_id=256, bos_token_id=256,
                  eos_token_id=256, decoder_start_token_id=257)
    values.update(overrides)
    return WhisperConfig(**values)


def write_tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with Whisper's special tokens (ids 256...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperTokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({token: FIRST_SPECIAL + i for i, token in enumerate(SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = WhisperTokenizer(tokenizer_object=backend, unk_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_base(folder: Path, seed: int = 0, chunk_seconds: int = 1, **overrides) -> Path:
    """A randomly initialised tiny Whisper directory with tokenizer and feature extractor.

    Its full encoder window is ``chunk_seconds`` (50 encoder positions per second, as Whisper).
    """
    overrides.setdefault("max_source_positions", 50 * chunk_seconds)
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config(**overrides))
    special = {token: FIRST_SPECIAL + i for i, token in enumerate(SPECIALS)}
    generation = model.generation_config
    generation.max_length = 20
    # transformers 5 drops lang_to_id / task_to_id on load from a config marked as derived
    generation._from_model_config = False
    generation.is_multilingual = True
    generation.begin_suppress_tokens = [special["<|endoftext|>"]]
    generation.no_timestamps_token_id = special["<|notimestamps|>"]
    generation.lang_to_id = {t: special[t] for t in ("<|en|>", "<|de|>", "<|fr|>")}
    generation.task_to_id = {"transcribe": special["<|transcribe|>"],
                             "translate": special["<|translate|>"]}
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins,
                            chunk_length=chunk_seconds).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return Path(folder)


def save_tiny_expert(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """The base plus a random task vector on every trained tensor (frozen tables untouched)."""
    from transformers import WhisperForConditionalGeneration
    model = WhisperForConditionalGeneration.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("encoder.embed_positions.weight"):
                continue
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return Path(folder)


def write_tiny_example(folder: Path, experts: int = 3) -> dict[str, Path]:
    """A tiny base and ``experts`` experts under ``folder``; returns their paths by name."""
    folder = Path(folder)
    base = save_tiny_base(folder / "base")
    paths = {"base": base}
    for i in range(experts):
        paths[f"expert{i}"] = save_tiny_expert(base, folder / f"expert{i}", seed=100 + i)
    return paths
