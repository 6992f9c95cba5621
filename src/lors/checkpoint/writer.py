"""Write a merged model as a standard Hugging Face Whisper directory, one tensor at a time.

Shards are planned up front from the base's names, shapes and the output dtype, so each merged
tensor is written to disk as soon as it exists and nothing is buffered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from .safetensors_io import SafetensorsWriter

# Files copied from the base beside the weights: tokenizer, feature extractor, generation.
AUX_FILES = (
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
    "added_tokens.json", "special_tokens_map.json", "chat_template.json",
)


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (one tensor may exceed it)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = torch.Size(spec[2]).numel() * torch.empty((), dtype=spec[1]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


class ShardedModelWriter:
    """Writes ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus the index."""

    def __init__(self, folder: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.shard_of = {spec[0]: i for i, shard in enumerate(self.shards) for spec in shard}
        self._open: tuple[int, SafetensorsWriter] | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index = self.shard_of[name]
        if self._open is None or self._open[0] != index:
            if self._open is not None:
                self._open[1].close()
            self._open = (index, SafetensorsWriter(self.folder / self.files[index],
                                                   self.shards[index]))
        self._open[1].write(name, tensor)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        if len(self.files) > 1:
            total = sum(torch.Size(s[2]).numel() * torch.empty((), dtype=s[1]).element_size()
                        for shard in self.shards for s in shard)
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: self.files[i] for name, i in self.shard_of.items()}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_config(folder: Path, config: dict, dtype: torch.dtype) -> None:
    """config.json from the base's, stating ``dtype``, the dtype of the written weights.

    The base's own statement is replaced, never kept (a float16 base merged to float32 used to
    keep ``dtype: float16`` beside a new ``torch_dtype``, and transformers 5 loaded float16).
    transformers >= 4.56 writes and reads ``dtype`` (5.x prefers it when both keys exist);
    older versions read only ``torch_dtype``. Both keys are written with the same value, so
    every version loads the written dtype with ``dtype="auto"`` (the default in 5.x).
    """
    config = dict(config)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = name
    config.setdefault("architectures", ["WhisperForConditionalGeneration"])
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def copy_aux_files(source: Path | None, folder: Path) -> list[str]:
    """Copy tokenizer, preprocessor and generation files that exist in ``source``."""
    if source is None:
        return []
    copied = []
    for name in AUX_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(folder) / name)
            copied.append(name)
    return copied


def write_json(path: Path, payload: object) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))


def float_specs(names: Iterable[str], meta: dict, dtype: torch.dtype | None):
    """(name, dtype, shape) for the output: float tensors cast to ``dtype`` when given."""
    return [(n, dtype if (dtype is not None and meta[n].dtype.is_floating_point)
             else meta[n].dtype, meta[n].shape) for n in names]
