"""What every export reads: the checkpoint as a transformers model, and its side files.

A checkpoint is anything :func:`lors.checkpoint.reader.open_checkpoint` opens. Its tokenizer,
generation config and feature-extractor settings come from the folder beside the weights;
an openai ``.pt`` file or a bare weights folder has none, and then the embedded base's
tokenizer and generation config are used when the vocabulary is the multilingual one they
describe (51865 tokens, every multilingual Whisper up to large-v2).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from ..checkpoint.reader import TIED_OUTPUT, Checkpoint
from ..errors import CheckpointError, LorsWarning

MULTILINGUAL_VOCAB = 51865
"""Vocabulary size of the embedded base's tokenizer (and of every multilingual Whisper up to
large-v2; large-v3 has 51866, the English-only models 51864)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "normalizer.json", "added_tokens.json", "special_tokens_map.json")
PREPROCESSOR = "preprocessor_config.json"
GENERATION = "generation_config.json"


def whisper_config(checkpoint: Checkpoint):
    """The checkpoint's ``WhisperConfig`` (every field, defaults filled in)."""
    from transformers import WhisperConfig
    return WhisperConfig(**checkpoint.config)


def load_model(checkpoint: Checkpoint):
    """``WhisperForConditionalGeneration`` holding the checkpoint's tensors as stored (no
    random initialisation: the model is built on the meta device and the tensors assigned).
    CheckpointError when a tensor is missing, extra, or of the wrong shape."""
    from transformers import WhisperForConditionalGeneration
    config = whisper_config(checkpoint)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = {name: checkpoint.read(name) for name in checkpoint.meta}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that the config does not describe
        raise CheckpointError(f"{checkpoint.source}: tensors do not fit its config: {exc}") from exc
    missing = set(result.missing_keys) - {TIED_OUTPUT}
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{checkpoint.source}: not a complete Whisper checkpoint (missing "
                              f"{sorted(missing)[:5]}, unexpected "
                              f"{sorted(result.unexpected_keys)[:5]})")
    if config.tie_word_embeddings or TIED_OUTPUT in result.missing_keys:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    return model.eval()


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and ((folder / "tokenizer.json").is_file()
                                   or (folder / "vocab.json").is_file())


def side_files_folder(checkpoint: Checkpoint) -> Path:
    """The folder whose tokenizer and generation config describe ``checkpoint``: its own, or
    the embedded base's (with a warning) when it has none and the vocabulary is the
    multilingual one. CheckpointError otherwise, saying which files to copy where."""
    if _has_tokenizer(checkpoint.aux_dir):
        return Path(checkpoint.aux_dir)
    vocab = int(whisper_config(checkpoint).vocab_size)
    where = checkpoint.aux_dir or Path(checkpoint.files[0]).parent
    if vocab != MULTILINGUAL_VOCAB:
        raise CheckpointError(
            f"{checkpoint.source}: no tokenizer files (tokenizer.json, or vocab.json and "
            f"merges.txt) beside the weights, and its {vocab}-token vocabulary is not the "
            f"multilingual one lors ships; copy the tokenizer files of the model it was "
            f"fine-tuned from into {where}")
    from ..base import ensure_base_model
    warnings.warn(f"{checkpoint.source} has no tokenizer files; using the embedded base's "
                  f"multilingual tokenizer and generation config (same {vocab}-token "
                  "vocabulary)", LorsWarning, stacklevel=3)
    return ensure_base_model(show_progress=False)


def generation_dict(folder: Path) -> dict | None:
    """``generation_config.json`` of ``folder`` without ``_from_model_config`` (transformers 5
    drops Whisper's ``lang_to_id`` and ``task_to_id`` from a file flagged so), or None."""
    path = folder / GENERATION
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("_from_model_config", None)
    return data


def feature_extractor_dict(checkpoint: Checkpoint, num_mel_bins: int) -> dict:
    """The checkpoint's feature-extractor settings, with ``feature_size`` equal to the model's
    mel bins (128 for large-v3): its own ``preprocessor_config.json`` when it has one (a
    different ``feature_size`` there is an error), else Whisper's defaults."""
    own = checkpoint.aux_dir and Path(checkpoint.aux_dir) / PREPROCESSOR
    if own and own.is_file():
        data = json.loads(own.read_text(encoding="utf-8"))
        if int(data.get("feature_size", num_mel_bins)) != num_mel_bins:
            raise CheckpointError(f"{own}: feature_size {data.get('feature_size')} but the model "
                                  f"takes {num_mel_bins} mel bins; fix or remove the file")
        return {**data, "feature_size": num_mel_bins}
    from transformers import WhisperFeatureExtractor
    return WhisperFeatureExtractor(feature_size=num_mel_bins).to_dict()


def write_side_files(checkpoint: Checkpoint, folder: Path) -> list[str]:
    """Write into ``folder`` what a runtime needs beside the weights: ``config.json``,
    ``tokenizer.json`` (built from vocab.json + merges.txt when only those exist), the other
    tokenizer files, ``preprocessor_config.json`` and ``generation_config.json``; return
    their names."""
    config = whisper_config(checkpoint)
    config.save_pretrained(folder)
    source = side_files_folder(checkpoint)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    features = feature_extractor_dict(checkpoint, config.num_mel_bins)
    (folder / PREPROCESSOR).write_text(json.dumps(features, indent=2), encoding="utf-8")
    generation = generation_dict(source)
    if generation is not None:
        (folder / GENERATION).write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return sorted(p.name for p in folder.iterdir())
