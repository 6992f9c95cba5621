"""CTranslate2 export: a folder that ``faster_whisper.WhisperModel(folder)`` loads offline.

The conversion is CTranslate2's own (``ctranslate2.converters.TransformersConverter``), fed
the checkpoint's tensors directly (no temporary Hugging Face copy of the weights). Beside
``model.bin``, ``config.json`` and ``vocabulary.json`` it writes ``tokenizer.json`` (without
it faster-whisper downloads openai/whisper-tiny's) and ``preprocessor_config.json`` with the
model's mel bins as ``feature_size`` (without it faster-whisper assumes 80, wrong for
large-v3's 128).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..checkpoint.reader import Checkpoint
from ..errors import CheckpointError
from .source import GENERATION, PREPROCESSOR, load_model, whisper_config, write_side_files

COPIED = ("tokenizer.json", PREPROCESSOR)
"""Files copied from the staged side files into the CTranslate2 folder."""


def _converter(staged: Path, model):
    """A TransformersConverter that reads the config and tokenizer from ``staged`` and takes
    ``model`` as it is instead of loading weights from disk."""
    from ctranslate2.converters import TransformersConverter

    class _InMemory(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model

    return _InMemory(str(staged), copy_files=list(COPIED))


def _attach_generation_config(model, staged: Path) -> None:
    """Give ``model`` the staged generation config: the converter reads the language ids,
    suppressed tokens and alignment heads from it."""
    from transformers import GenerationConfig
    path = staged / GENERATION
    if path.is_file():
        model.generation_config = GenerationConfig.from_dict(json.loads(path.read_text()))


def check_loads(folder: Path, num_mel_bins: int) -> None:
    """Load the written model with ctranslate2 on the CPU and check its mel bins; a model
    that CTranslate2 cannot load or that takes other features is a CheckpointError."""
    import ctranslate2
    try:
        loaded = ctranslate2.models.Whisper(str(folder), device="cpu")
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"the CTranslate2 model written to {folder} does not load: "
                              f"{exc}") from exc
    if loaded.n_mels != num_mel_bins:
        raise CheckpointError(f"the CTranslate2 model takes {loaded.n_mels} mel bins, the "
                              f"source {num_mel_bins}")


def write_ct2(checkpoint: Checkpoint, folder: Path, quantization: str) -> dict:
    """Convert ``checkpoint`` into the existing, empty ``folder`` with weights stored as
    ``quantization`` (a CTranslate2 quantization name); returns a summary for the report."""
    num_mel_bins = int(whisper_config(checkpoint).num_mel_bins)
    with tempfile.TemporaryDirectory(prefix="lors-ct2-side-") as scratch:
        staged = Path(scratch)
        write_side_files(checkpoint, staged)
        model = load_model(checkpoint)
        _attach_generation_config(model, staged)
        # force: ``folder`` exists (our atomic temporary); the converter recreates it
        _converter(staged, model).convert(str(folder), quantization=quantization, force=True)
        del model
    check_loads(folder, num_mel_bins)
    return {"format": "ct2", "quantization": quantization, "num_mel_bins": num_mel_bins,
            "files": sorted(p.name for p in folder.iterdir())}
