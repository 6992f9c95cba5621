"""PEFT LoRA adapters as merge experts: an exact task vector, known in factored form.

A LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT's
``save_pretrained`` writes it and ``lors train --mode lora`` writes it in ``adapter/``)
changes its base by W' = W + scale * B @ A on each target matrix (scale = lora_alpha / r, or
lora_alpha / sqrt(r) with ``use_rslora``; r and alpha per module from ``rank_pattern`` and
``alpha_pattern`` when they match), replaces the tensors of ``modules_to_save`` (and trained
biases) by its own copies, and leaves everything else as it is. So its task vector is exact:
scale * B @ A, the saved copy minus the base's, or zero; and its SVD is known from the
factors (:func:`product_svd`) without forming any m x n matrix.

Everything is checked against the base when the adapter is opened (headers only): the
config, the LoRA type, module names and factor shapes. Errors name the file and what to do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .adapter_config import (CONFIG_NAME, MERGE_IT, check_modules_to_save, check_targets,
                             pattern_value, read_adapter_config, warn_other_base)
from .names import canonical_hf_name
from .reader import Checkpoint, _safe_torch_load, _sampled_sha256
from .safetensors_io import SafetensorsFile

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<kind>weight|bias)$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")


def product_svd(b: Tensor, a: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The exact thin SVD (U [m,q], S [q], Vh [q,n]) of scale * b @ a, b [m,r], a [r,n],
    never forming the m x n product: b = Q_b R_b and a^T = Q_a R_a (reduced QR), the small
    core scale * R_b R_a^T = U_c diag(S) V_c^T, then U = Q_b U_c and Vh = V_c^T Q_a^T.

    q = min(m, n, r) triplets, singular values descending (zeros included when the product
    has lower rank). Computed in float64 (cheap at these sizes), returned in float32.
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u_c, s, vh_c = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return (q_b @ u_c).float(), s.float(), (vh_c @ q_a.T).float()


@dataclass(frozen=True)
class LoraMatrix:
    """One target matrix: its factors' stored names, scale, and whether the delta is
    (B @ A)^T (an embedding: A is [r, rows], B [columns, r])."""

    a: str
    b: str
    scale: float
    transposed: bool


class AdapterExpert:
    """A LoRA adapter on ``base``, with a Checkpoint's ``source``, ``kind``, ``config``,
    ``meta`` (the base's) and ``fingerprint()``, plus the exact task vector
    (:meth:`delta`) and its factors (:meth:`factors`)."""

    kind = "lora_adapter"

    def __init__(self, folder: Path, source: str, base: Checkpoint, weights: Path,
                 read, matrices: dict[str, LoraMatrix], saved: dict[str, str],
                 lora_biases: dict[str, LoraMatrix]):
        self.source, self.folder, self.files = source, folder, [folder / CONFIG_NAME, weights]
        self.config, self.meta = base.config, base.meta
        self._read = read
        self.matrices, self.saved, self.lora_biases = matrices, saved, lora_biases

    def fingerprint(self) -> dict:
        return {str(path): _sampled_sha256(path) for path in self.files}

    def delta(self, name: str, base_tensor: Tensor) -> Tensor:
        """The exact float32 task vector of tensor ``name``: the saved copy minus
        ``base_tensor`` (a module to save, a trained bias, a targeted embedding's own
        weight), plus scale * B @ A on a target matrix (transposed for an embedding) and
        scale * B's bias on its bias (``lora_bias``); zero for every other tensor.
        CheckpointError if the adapter holds NaN or Inf there."""
        if name in self.matrices and name not in self.saved:  # the usual case: no copy
            return self._product(name)
        delta = (self._finite(self.saved[name]).sub_(base_tensor) if name in self.saved
                 else torch.zeros_like(base_tensor))
        if name in self.matrices:  # PEFT also saves a targeted embedding's own weight
            delta.add_(self._product(name))
        if name in self.lora_biases:
            bias = self.lora_biases[name]
            delta.add_(self._finite(bias.b), alpha=bias.scale)
        return delta

    def _product(self, name: str) -> Tensor:
        a, b, lora = self._factors(name)
        b = b * lora.scale  # scaling the m x r factor, not the m x n product
        return torch.mm(a.T, b.T) if lora.transposed else torch.mm(b, a)

    def _factors(self, name: str) -> tuple[Tensor, Tensor, LoraMatrix]:
        """(A, B) of matrix ``name`` as float32, checked finite (a finite product then
        needs no pass of its own: the merged output is checked before it is written)."""
        lora = self.matrices[name]
        return self._finite(lora.a), self._finite(lora.b), lora

    def _finite(self, stored: str) -> Tensor:
        tensor = self._read(stored).float()
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.source}: tensor {stored} contains NaN or Inf; fix or "
                                  "re-export the adapter")
        return tensor

    def factors(self, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """The exact thin SVD of the task vector of matrix ``name`` (:func:`product_svd`):
        rank <= the LoRA rank on a target matrix, rank 0 on an untouched one; None where
        the rank is not known (a saved module's copy, and tensors that are not 2-D)."""
        shape = self.meta[name].shape
        if len(shape) != 2 or name in self.saved:
            return None
        if name not in self.matrices:
            return torch.zeros(shape[0], 0), torch.zeros(0), torch.zeros(0, shape[1])
        a, b, lora = self._factors(name)
        u, s, vh = product_svd(b, a, lora.scale)
        return (vh.T.contiguous(), s, u.T.contiguous()) if lora.transposed else (u, s, vh)


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter config."""
    return (Path(path) / CONFIG_NAME).is_file()


def open_adapter(path: str | Path, base: Checkpoint) -> AdapterExpert:
    """Open the LoRA adapter in folder ``path`` against ``base`` (no weights read)."""
    folder = Path(path)
    config = read_adapter_config(folder / CONFIG_NAME)
    weights, shapes, read = _open_weights(folder)
    where = f"{folder / weights.name}"
    modules = {name.rsplit(".", 1)[0] for name in base.meta}
    check_targets(config, modules, folder, base)
    matrices, lora_biases, saved = {}, {}, {}
    factor_keys: dict[str, dict[str, str]] = {}  # module -> {"A" | "B" | "B.bias": key}
    embeddings = set()
    for key in shapes:
        stored = key.removeprefix(_PREFIX)
        match = _LORA.match(stored) or _EMBEDDING.match(stored)
        if match:
            part = match["part"]
            if part.startswith("lora_embedding"):
                embeddings.add(match["module"])
            slot = part[-1] + (".bias" if match.groupdict().get("kind") == "bias" else "")
            factor_keys.setdefault(match["module"], {})[slot] = key
        elif "lora_" in stored:
            raise CheckpointError(f"{where}: tensor {key!r} is not a LoRA factor lors knows "
                                  f"(lora_A / lora_B / lora_embedding_A / _B); {MERGE_IT}")
        else:  # a module_to_save's copy, or a trained bias (bias: all / lora_only)
            name = _base_name(stored.replace(".base_layer.", "."), base, where, key)
            _check_shape(shapes[key], name, base, where, key)
            saved[name] = key
    for module, parts in factor_keys.items():
        name = _base_name(f"{module}.weight", base, where, module)
        lora = _lora_matrix(module, name, parts, shapes, base, config, where,
                            module in embeddings)
        matrices[name] = lora
        if "B.bias" in parts:
            bias = _base_name(f"{module}.bias", base, where, parts["B.bias"])
            _check_shape(shapes[parts["B.bias"]], bias, base, where, parts["B.bias"])
            lora_biases[bias] = LoraMatrix(lora.a, parts["B.bias"], lora.scale, False)
    check_modules_to_save(config, saved, folder)
    warn_other_base(config, base, folder)  # only once everything fits this base
    return AdapterExpert(folder, str(path), base, weights, read, matrices, saved, lora_biases)


def _open_weights(folder: Path):
    """(weights file, {stored name: shape}, read(stored name) -> tensor); headers only for
    safetensors, a weights-only torch.load for the pickled form."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        handle = SafetensorsFile(path)
        return path, {n: i.shape for n, i in handle.tensors.items()}, handle.read
    pickled = folder / PICKLED_WEIGHTS_NAME
    if pickled.is_file():
        state = _safe_torch_load(pickled)  # weights_only=True: a pickle needing code is refused
        if not isinstance(state, dict):
            raise CheckpointError(f"{pickled}: not a state dict of tensors")
        state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        # a copy per read, as the safetensors read: callers modify what they read in place
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        return pickled, shapes, lambda stored: state[stored].clone()
    raise CheckpointError(
        f"{folder}: {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter's weights are missing (an "
        f"{PICKLED_WEIGHTS_NAME} would be loaded with torch.load(weights_only=True) only, "
        "refusing pickles that need code execution): copy the complete adapter folder")


def _base_name(stored: str, base: Checkpoint, where: str, key: str) -> str:
    name = canonical_hf_name(stored)
    if name not in base.meta:
        tied = name == "proj_out.weight"
        raise CheckpointError(
            f"{where}: tensor {key!r} changes {name}, which "
            + ("this base ties to the token embedding (lors cannot merge a separately trained "
               "output projection: train without modules_to_save proj_out)" if tied else
               f"the base ({base.source}) does not have: this adapter was made for another "
               "model; pass the base it was trained on"))
    return name


def _check_shape(shape, name: str, base: Checkpoint, where: str, key: str) -> None:
    if tuple(shape) != tuple(base.meta[name].shape):
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(shape)}, the base's "
                              f"{name} {list(base.meta[name].shape)}; was the adapter trained "
                              f"on another model size ({base.source})?")


def _lora_matrix(module: str, name: str, parts: dict, shapes: dict, base: Checkpoint,
                 config: dict, where: str, embedding: bool) -> LoraMatrix:
    if "A" not in parts or "B" not in parts:
        have, lack = ("A", "B") if "A" in parts else ("B", "A")
        raise CheckpointError(f"{where}: module {module} has lora_{have} but not lora_{lack}; "
                              "the file is incomplete: re-save the adapter")
    a, b = shapes[parts["A"]], shapes[parts["B"]]
    target = base.meta[name].shape
    if len(a) != 2 or len(b) != 2 or len(target) != 2:
        raise CheckpointError(f"{where}: module {module}: LoRA on a {len(target)}-D tensor "
                              f"(A {list(a)}, B {list(b)}) is not supported, only on linear "
                              f"and embedding matrices: {MERGE_IT}")
    rows, columns = (target[1], target[0]) if embedding else target
    rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if a[0] != rank or b[1] != rank or a[1] != columns or b[0] != rows:
        raise CheckpointError(
            f"{where}: module {module}: A {list(a)} and B {list(b)} do not fit the base's "
            f"{name} {list(target)} with rank {rank} (adapter_config r / rank_pattern): "
            f"expected A [{rank}, {columns}] and B [{rows}, {rank}]; was it trained on "
            f"another model size ({base.source})?")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraMatrix(parts["A"], parts["B"], float(scale), embedding)
