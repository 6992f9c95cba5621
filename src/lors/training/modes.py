"""What each training mode trains, and how its result becomes an ordinary Whisper folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.writer import copy_aux_files

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
"""Every attention projection and feed-forward matrix, encoder and decoder: the same
matrices LoRS-Merging prunes, so a merged LoRA expert's task vector lives where merging acts."""


def load_whisper(model_dir: Path):
    """Whisper model (float32) and processor from ``model_dir``, with Whisper's generation
    fields (``lang_to_id``...) kept even when the file is flagged as derived from the config."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..evaluation.decode import _quiet, _restore_whisper_generation_fields

    with _quiet():
        model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        processor = WhisperProcessor.from_pretrained(model_dir)
    _restore_whisper_generation_fields(model, Path(model_dir))
    return model, processor


def prepare_model(whisper, mode: str, lora_rank: int = 8, lora_alpha: float = 16.0):
    """The module to optimise: ``whisper`` itself (full, freeze-encoder) or a peft LoRA wrapper.

    full: everything trains except the encoder's fixed sinusoidal position table, frozen
    here explicitly: transformers 5 loads it with ``requires_grad=True``, and a trainable
    parameter that never gets a gradient (the table gets none through the short view
    ``encoder_window`` swaps in) stops DistributedDataParallel at the second step.
    freeze-encoder: the encoder is frozen (its outputs are cached elsewhere). lora: only the
    LoRA factors train (dropout 0, so runs are deterministic).
    """
    whisper.model.encoder.embed_positions.requires_grad_(False)
    if mode == "freeze-encoder":
        whisper.model.encoder.requires_grad_(False)
        return whisper
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                            target_modules=LORA_TARGETS)
        return get_peft_model(whisper, config)
    return whisper


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable parameters: what a best-so-far snapshot needs to hold."""
    return {name: param.detach().to("cpu", copy=True).contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def export_model(model, mode: str, base_dir: Path, folder: Path) -> list[str]:
    """Write the trained model as a standard Whisper folder (and ``adapter/`` for LoRA).

    The encoder's full position table and ``max_source_positions`` are untouched by
    training (the short window is only a view during each step), so the config and
    tensors are those of an ordinary checkpoint of the base's shape. Tokenizer,
    preprocessor and generation config are copied from the base. Returns the files written.
    """
    whisper = model
    if mode == "lora":
        model.save_pretrained(folder / "adapter")
        _point_adapter_at_base(folder / "adapter", base_dir)
        whisper = model.merge_and_unload()
    whisper.generation_config._from_model_config = False
    whisper.save_pretrained(folder)
    copy_aux_files(base_dir, folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _point_adapter_at_base(adapter: Path, base_dir: Path) -> None:
    """Record the base folder in adapter_config.json so PeftModel.from_pretrained finds it."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    path.write_text(json.dumps(config, indent=2))
