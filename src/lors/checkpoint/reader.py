"""Open a Whisper checkpoint lazily: names, dtypes and shapes first, tensors one at a time.

Accepted: a Hugging Face Whisper directory (safetensors, sharded or not, or pytorch_model.bin
loaded with ``weights_only=True``), an openai-whisper ``.pt`` file (dims + model_state_dict),
a hub id (through the local Hugging Face cache when offline; see :mod:`.locate`), and
``base`` (or nothing) for lors' embedded default.
All names are canonical Hugging Face names (see :mod:`lors.checkpoint.names`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .locate import resolve_missing
from .names import canonical_hf_name, openai_dims_to_config, openai_to_hf
from .safetensors_io import SafetensorsFile

TIED_OUTPUT = "proj_out.weight"


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """One model: its config, its tensors' metadata, and a way to read each tensor."""

    source: str                      # what the user named (path or hub id)
    kind: str                        # "safetensors" | "pytorch_bin" | "openai_pt"
    config: dict
    meta: dict[str, TensorMeta]
    files: list[Path]
    aux_dir: Path | None             # folder holding tokenizer / preprocessor / generation files
    _safetensors: dict[str, tuple[SafetensorsFile, str]] = field(default_factory=dict, repr=False)
    _loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` as stored (dtype unchanged), in fresh memory the caller owns
        (or in ``out``, a contiguous tensor of that dtype and shape, e.g. a reused buffer):
        callers modify it in place (``read_float(...).sub_(base)``), and a tensor read again
        (a search's next point, global thresholds' second pass) must be the stored one."""
        if name in self._safetensors:
            handle, stored = self._safetensors[name]
            return handle.read(stored, out)
        return self._loaded[name].clone() if out is None else out.copy_(self._loaded[name])

    def fingerprint(self) -> dict:
        """A cheap content fingerprint: size and sha256 of each file's head, tail and 16 samples."""
        return {str(path): _sampled_sha256(path) for path in self.files}


def _sampled_sha256(path: Path, block: int = 1 << 16, samples: int = 16) -> dict:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for i in range(samples + 1):
            handle.seek(max(0, min(size - block, (size - block) * i // samples)))
            digest.update(handle.read(block))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def open_checkpoint(ref: str | os.PathLike | None) -> Checkpoint:
    """Open ``ref`` without reading any tensor data. Raises CheckpointError with what to do."""
    if ref is None or str(ref) == "base":
        from ..base import resolve_model_reference  # the embedded default; fetched on first use
        ref = resolve_model_reference(None if ref is None else str(ref))
    path = Path(ref)
    if not path.exists():  # a hub id (resolved to its snapshot) or a mistyped path (error)
        return open_checkpoint(resolve_missing(str(ref)))
    if path.is_file() and path.suffix == ".pt":
        return _open_openai(path)
    folder = path if path.is_dir() else path.parent
    config = _read_config(folder, ref)
    if path.is_file():
        weight_files = [path]
    else:
        weight_files = _weight_files(folder)
    if weight_files[0].suffix == ".safetensors":
        return _open_safetensors(str(ref), config, weight_files, folder)
    return _open_pytorch_bin(str(ref), config, weight_files, folder)


def _read_config(folder: Path, ref) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{ref}: no config.json in {folder}; a Hugging Face Whisper "
                              "directory needs one (save it with model.save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable config ({exc})") from exc
    if config.get("model_type") != "whisper":
        raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, "
                              "lors merges Whisper models only")
    return config


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
            missing = [n for n in shard_names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard(s) {missing} listed but not present in "
                                      f"{folder}; copy the complete checkpoint")
            return [folder / n for n in shard_names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: no model.safetensors, sharded index or pytorch_model.bin found")


def _open_safetensors(source: str, config: dict, files: list[Path], folder: Path) -> Checkpoint:
    meta: dict[str, TensorMeta] = {}
    handles: dict[str, tuple[SafetensorsFile, str]] = {}
    for path in files:
        handle = SafetensorsFile(path)
        for stored, info in handle.tensors.items():
            name = canonical_hf_name(stored)
            if name in meta:
                raise CheckpointError(f"{path}: tensor {name!r} appears in more than one shard")
            meta[name] = TensorMeta(info.dtype, info.shape)
            handles[name] = (handle, stored)
    _drop_tied_output(meta, config)
    if TIED_OUTPUT not in meta:
        handles.pop(TIED_OUTPUT, None)
    return Checkpoint(source, "safetensors", config, meta, files, folder, _safetensors=handles)


def _safe_torch_load(path: Path) -> dict:
    """torch.load that refuses pickles needing code execution (weights_only=True)."""
    try:
        # mmap only works (and only helps) for the zip format that torch.save writes today
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        if "weights_only" in str(exc) or isinstance(exc, pickle.UnpicklingError):
            raise CheckpointError(
                f"{path}: this pickle needs code execution to load, which lors refuses for "
                "safety; re-save the weights as safetensors (model.save_pretrained) from a "
                "trusted environment") from exc
        raise CheckpointError(f"{path}: cannot load ({exc}); the file may be corrupt") from exc
    except (EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load ({exc}); the file may be truncated") from exc


def _open_pytorch_bin(source: str, config: dict, files: list[Path], folder: Path) -> Checkpoint:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        state = _safe_torch_load(path)
        tensors.update({canonical_hf_name(k): v for k, v in state.items()
                        if isinstance(v, torch.Tensor)})
    return _from_state_dict(source, "pytorch_bin", config, tensors, files, folder)


def _open_openai(path: Path) -> Checkpoint:
    payload = _safe_torch_load(path)
    if not isinstance(payload, dict) or "dims" not in payload or "model_state_dict" not in payload:
        raise CheckpointError(f"{path}: not an openai-whisper checkpoint (expected a dict with "
                              "'dims' and 'model_state_dict')")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in payload["model_state_dict"].items():
        hf_name = openai_to_hf(name)
        if hf_name is None:
            raise CheckpointError(f"{path}: tensor {name!r} has no Hugging Face Whisper "
                                  "counterpart; is this a Whisper checkpoint?")
        tensors[hf_name] = tensor
    config = openai_dims_to_config(payload["dims"])
    for side in ("encoder", "decoder"):  # read FFN widths off the tensors, not assumed 4 x d
        fc1 = tensors.get(f"model.{side}.layers.0.fc1.weight")
        if fc1 is not None:
            config[f"{side}_ffn_dim"] = int(fc1.shape[0])
    folder = path.parent if (path.parent / "tokenizer_config.json").is_file() else None
    return _from_state_dict(str(path), "openai_pt", config, tensors, [path], folder)


def _from_state_dict(source, kind, config, tensors, files, folder) -> Checkpoint:
    meta = {n: TensorMeta(t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    _drop_tied_output(meta, config)
    tensors = {n: t for n, t in tensors.items() if n in meta}
    return Checkpoint(source, kind, config, meta, list(files), folder, _loaded=tensors)


def _drop_tied_output(meta: dict[str, TensorMeta], config: dict) -> None:
    # The output projection is tied to the token embedding: merging it separately would only
    # duplicate work, and HF's save_pretrained omits it anyway.
    if config.get("tie_word_embeddings", True):
        meta.pop(TIED_OUTPUT, None)
