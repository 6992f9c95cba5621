"""Compressed task vectors: one expert's LoRS pruning in one safetensors file.

Written by ``lors compress`` and accepted by ``lors merge --expert NAME=F.safetensors``.
Per tensor NAME of the base, exactly one of:

- ``NAME:us`` [m, r] = U_r diag(S_r), ``NAME:vh`` [r, n] = V_r^T, ``NAME:index`` [k] (int32,
  or int64 when m * n >= 2**31; flat row-major positions) and ``NAME:value`` [k]: a 2-D
  attention/FFN matrix, whose task vector is L + R_kept = us @ vh + the values at those
  positions (LoRS' pruned task vector);
- ``NAME:delta``: the dense task vector (every other tensor);
- NAME listed in the metadata's ``zero``: a task vector that is exactly zero.

Every stored tensor is float32 (the precision merges work in), whatever the expert's
dtype. The metadata (``__metadata__``, strings) holds ``format``, the base's fingerprint,
the LoRS ``settings`` (rank, keep, svd, and for the randomized SVD oversampling, power
iterations and seed), the lors version and the expert's source.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import torch
from torch import Tensor

from ..errors import CheckpointError
from .reader import Checkpoint, _sampled_sha256
from .safetensors_io import DTYPE_NAMES, SafetensorsFile

FORMAT = "lors-compressed-task-vector/1"
PARTS = ("us", "vh", "index", "value")
DENSE = "delta"
_SETTING_TYPES = {"rank": int, "keep": float, "svd": str, "svd_oversample": int,
                  "svd_niter": int, "seed": int}


def base_fingerprint(base: Checkpoint) -> str:
    """A digest of the base's weight files' sizes and sampled SHA-256 (their content, not
    their paths): the same base anywhere gives the same digest; a re-saved copy does not."""
    files = sorted(json.dumps(v, sort_keys=True) for v in base.fingerprint().values())
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def lors_join(scaled_u: Tensor, vh: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """scaled_u @ vh + R_kept, R_kept the m x n matrix holding ``values`` at the flat
    row-major positions ``index`` and zero elsewhere (float32): the inverse of
    :func:`lors.merging.core.lors_parts`, with the same float operations as
    :func:`lors.merging.primitives.lors_prune`."""
    dense = torch.zeros(scaled_u.shape[0] * vh.shape[1], dtype=torch.float32)
    dense[index.long()] = values.float()
    return dense.reshape(scaled_u.shape[0], vh.shape[1]).addmm_(scaled_u.float(), vh.float())


def is_compressed(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by ``lors compress`` (CheckpointError
    when it is a corrupt safetensors file: whatever it was meant to be, it cannot be read)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    return SafetensorsFile(path).metadata.get("format") == FORMAT


class CompressedExpert:
    """A compressed expert on ``base``, with a Checkpoint's ``source``, ``kind``,
    ``config``, ``meta`` (the base's) and ``fingerprint()``, plus its task vector
    (:meth:`delta`) and the LoRS ``settings`` it is pruned with (:meth:`pruned_with`)."""

    kind = "lors_compressed"

    def __init__(self, path: Path, base: Checkpoint, handle: SafetensorsFile, settings: dict,
                 zero: set[str]):
        self.source, self.files, self._handle = str(path), [path], handle
        self.config, self.meta, self.settings, self._zero = base.config, base.meta, settings, zero
        self.metadata = handle.metadata

    def fingerprint(self) -> dict:
        return {str(path): _sampled_sha256(path) for path in self.files}

    def pruned_with(self, name: str) -> dict | None:
        """The LoRS settings matrix ``name`` is pruned with (a zero matrix is its own LoRS
        pruning at any settings); None for a tensor stored dense."""
        pruned = f"{name}:us" in self._handle.tensors or (
            name in self._zero and len(self.meta[name].shape) == 2)
        return self.settings if pruned else None

    def delta(self, name: str, base_tensor: Tensor) -> Tensor:
        """The stored task vector of ``name`` as a new float32 tensor: L + R_kept, the dense
        delta, or zeros. CheckpointError if a stored part holds NaN or Inf, or an index
        points outside the matrix."""
        if name in self._zero:
            return torch.zeros_like(base_tensor)
        if f"{name}:{DENSE}" in self._handle.tensors:
            return self._finite(f"{name}:{DENSE}")
        us, vh, values = (self._finite(f"{name}:{p}") for p in ("us", "vh", "value"))
        index = self._handle.read(f"{name}:index")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= base_tensor.numel()):
            raise CheckpointError(f"{self.source}: {name}:index points outside the "
                                  f"{list(base_tensor.shape)} matrix; the file is corrupt: "
                                  "compress the expert again")
        return lors_join(us, vh, index, values)

    def _finite(self, stored: str) -> Tensor:
        tensor = self._handle.read(stored).float()
        # NaN and Inf propagate into the sum: one cheap pass instead of an isfinite mask
        if not math.isfinite(float(tensor.sum())):
            raise CheckpointError(f"{self.source}: tensor {stored} contains NaN or Inf; the "
                                  "file is corrupt: compress the expert again")
        return tensor


def open_compressed(path: str | Path, base: Checkpoint) -> CompressedExpert:
    """Open a compressed expert against ``base``: its format, settings, base fingerprint,
    and every tensor's parts and shapes are checked (headers only; no weights read)."""
    path = Path(path)
    handle = SafetensorsFile(path)
    metadata = handle.metadata
    if metadata.get("base_fingerprint") != base_fingerprint(base):
        raise CheckpointError(
            f"{path}: compressed on another base ({metadata.get('base_source', '?')}), not "
            f"{base.source} (the weight files' content fingerprints differ; a re-saved copy "
            "differs too): compress the expert again against this base, or merge onto the "
            "base it was compressed with")
    settings, zero = _settings(path, metadata), _zero(path, metadata)
    expected = set()
    for name, info in base.meta.items():
        if info.dtype.is_floating_point and name not in zero:
            expected |= _check_parts(path, handle, name, tuple(info.shape))
    extra = sorted(set(handle.tensors) - expected)
    if extra or not zero <= set(base.meta):
        what = extra[:3] or sorted(zero - set(base.meta))[:3]
        raise CheckpointError(f"{path}: {what} belong to no tensor of the base ({base.source}); "
                              "the file is corrupt or for another model: compress it again")
    return CompressedExpert(path, base, handle, settings, zero)


def _settings(path: Path, metadata: dict) -> dict:
    """The stored LoRS settings, as :func:`lors.merging.context.lors_settings` gives them."""
    try:
        settings = json.loads(metadata["settings"])
        keys = [k for k in _SETTING_TYPES
                if k in ("rank", "keep", "svd") or settings["svd"] == "randomized"]
        settings = {k: _SETTING_TYPES[k](settings[k]) for k in keys
                    if type(settings[k]) in (_SETTING_TYPES[k], int)}
        ok = (len(settings) == len(keys) and settings["svd"] in ("exact", "randomized")
              and settings["rank"] >= 1 and 0 < settings["keep"] <= 1)
    except (KeyError, TypeError, ValueError):  # JSONDecodeError is a ValueError
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: metadata 'settings' is missing or corrupt (expected "
                              f"JSON with {', '.join(_SETTING_TYPES)}): compress the expert again")
    return settings


def _zero(path: Path, metadata: dict) -> set[str]:
    try:
        zero = json.loads(metadata.get("zero", "[]"))
    except json.JSONDecodeError:
        zero = None
    if not isinstance(zero, list) or not all(isinstance(n, str) for n in zero):
        raise CheckpointError(f"{path}: metadata 'zero' is not a JSON list of tensor names; "
                              "the file is corrupt: compress the expert again")
    return set(zero)


def _check_parts(path: Path, handle: SafetensorsFile, name: str, shape: tuple) -> set[str]:
    """The stored names of tensor ``name``'s task vector, checked against its shape."""
    tensors = handle.tensors
    dense = f"{name}:{DENSE}"
    if dense in tensors:
        if tensors[dense].shape != shape or tensors[dense].dtype != torch.float32:
            raise _bad(path, dense, f"is {tensors[dense].dtype} {list(tensors[dense].shape)}, "
                                    f"expected float32 {list(shape)}")
        return {dense}
    parts = [f"{name}:{p}" for p in PARTS]
    if not all(p in tensors for p in parts):
        raise CheckpointError(f"{path}: tensor {name} of the base is missing (no {dense}, no "
                              f"complete {'/'.join(parts)}, not listed as zero); the file is "
                              "incomplete: compress the expert again")
    us, vh, index, value = (tensors[p] for p in parts)
    rank = us.shape[1] if len(us.shape) == 2 else -1
    if (len(shape) != 2 or us.shape != (shape[0], rank) or vh.shape != (rank, shape[1])
            or len(index.shape) != 1 or index.shape != value.shape
            or index.dtype not in (torch.int32, torch.int64) or index.shape[0] > shape[0] * shape[1]
            or not all(tensors[p].dtype == torch.float32 for p in (parts[0], parts[1], parts[3]))):
        raise _bad(path, name, f"parts us {list(us.shape)}, vh {list(vh.shape)}, index "
                               f"{list(index.shape)}, value {list(value.shape)} do not fit the "
                               f"base's {list(shape)}")
    return set(parts)


def _bad(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {name} {what}; the file is corrupt or for another model: "
                           "compress the expert again")


def spool(tensors: Iterable[tuple[str, Tensor]], body: BinaryIO) -> dict[str, dict]:
    """Write each tensor's bytes to the scratch file ``body`` as it comes (their sizes are
    known only once computed: the kept residual's k is known only once pruned); return the
    safetensors header entries. Memory holds one tensor at a time."""
    entries: dict[str, dict] = {}
    offset = 0
    for name, tensor in tensors:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + data.nbytes]}
        body.write(memoryview(data))
        offset += data.nbytes
    return entries


def write_spooled(handle: BinaryIO, entries: dict[str, dict], metadata: dict[str, str],
                  body: BinaryIO) -> None:
    """Write the safetensors file: header (``entries`` and ``metadata``), then ``body``."""
    raw = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes
    handle.write(struct.pack("<Q", len(raw)) + raw)
    body.seek(0)
    shutil.copyfileobj(body, handle, 1 << 24)
