"""A small safetensors reader and streaming writer that never maps whole files into memory.

Why our own: the merge engine reads one tensor at a time from 1 + T files. Reading through an
mmap leaves every touched page resident, so resident memory would grow with the number of
experts. Here each tensor is read with one ``readinto`` into its own buffer, and the writer
lays out the header up front (every output shape is known before merging) and then writes
each tensor at its offset as soon as it is ready, so no output is ever buffered.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes
of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` padded
with spaces, then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import CheckpointError
from .limits import MAX_RANK, checked_numel

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _is_count(value: object) -> bool:
    """True for a non-negative JSON integer (``true``/``false`` and ``2.0`` are not)."""
    return type(value) is int and value >= 0


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for json: a repeated key means two tensors claim one name
    (json would silently keep the last one)."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: corrupt headers can hold huge values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SafetensorsFile:
    """Header of one safetensors file, validated at open; tensors read on demand.

    Opening checks everything the header claims without touching tensor data: a UTF-8 JSON
    object; ``__metadata__`` absent or an object of strings; every other entry an object
    with a known ``dtype``, a ``shape`` of at most :data:`MAX_RANK` non-negative ints and
    ``data_offsets`` of two non-negative ints whose span is exactly numel x itemsize, inside
    the file; no two non-empty tensors overlapping. Any violation, and any read error, is a
    CheckpointError naming the file (and tensor).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata, self.tensors = self._read_header()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: {what}; the file is truncated or corrupt: re-download or re-save it"
        )

    def _read_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._fail("shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                # Checked before reading, so a corrupt length never sizes an allocation.
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._fail(f"header length {header_len} does not fit the file ({size} bytes)")
                raw = handle.read(header_len)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc})") from exc
        header = self._parse_json(raw)
        if not isinstance(header, dict):
            raise self._fail(f"header is a JSON {type(header).__name__}, not an object")
        metadata = self._metadata(header.pop("__metadata__", None))
        data_start = 8 + header_len
        tensors = {name: self._entry(name, spec, data_start, size) for name, spec in header.items()}
        self._check_overlaps(tensors)
        return metadata, tensors

    def _parse_json(self, raw: bytes) -> object:
        """The header as JSON; the format requires UTF-8 (json would guess UTF-16/32)."""
        try:
            return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        # ValueError covers bad JSON, bad UTF-8, repeated keys and integers too long to
        # convert; RecursionError deeply nested arrays.
        except (ValueError, RecursionError) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from exc

    def _metadata(self, value: object) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail("__metadata__ is not an object of strings")
        return value

    def _entry(self, name: str, spec: object, data_start: int, size: int) -> TensorInfo:
        """Validate one header entry; ``size`` is the file's length in bytes."""
        if not isinstance(spec, dict):
            raise self._fail(f"header entry for tensor {name!r} is not an object")
        dtype_name, shape, offsets = (spec.get(k) for k in ("dtype", "shape", "data_offsets"))
        if not isinstance(dtype_name, str):
            raise self._fail(f"tensor {name!r} has dtype {_brief(dtype_name)}, not a string")
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unknown dtype {_brief(dtype_name)} (lors "
                f"reads {', '.join(DTYPES)}); re-save the model in one of these, or re-download it"
            )
        if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(map(_is_count, shape))):
            raise self._fail(f"tensor {name!r} has shape {_brief(shape)}, not a list of at most "
                             f"{MAX_RANK} dimensions that are non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise self._fail(f"tensor {name!r} has data_offsets {_brief(offsets)}, not "
                             "[begin, end] with integers 0 <= begin <= end")
        dtype = DTYPES[dtype_name]
        numel = checked_numel(tuple(shape))
        if numel is None:
            raise self._fail(f"tensor {name!r} has shape {_brief(shape)}, too large for any tensor")
        nbytes = numel * _element_size(dtype)
        begin, end = offsets
        if end - begin != nbytes:
            raise self._fail(f"tensor {name!r} spans {_brief(end - begin)} bytes, its shape needs "
                             f"{nbytes}")
        if data_start + end > size:
            raise self._fail(f"tensor {name!r} data ends at byte {_brief(data_start + end)} but "
                             f"the file has {size} bytes")
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, nbytes)

    def _check_overlaps(self, tensors: dict[str, TensorInfo]) -> None:
        """Refuse two tensors sharing bytes (as the safetensors library does)."""
        spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self._fail(f"tensors {first!r} and {second!r} overlap in the data buffer")

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (no mmap), or into ``out`` (a contiguous CPU
        tensor of the stored dtype and shape, e.g. a reused buffer); dtype and shape as
        stored.

        Raises CheckpointError if the file cannot be read or is now shorter than at open.
        """
        info = self.tensors[name]
        # torch's allocator, not a bytearray: no zero-filling pass
        tensor = torch.empty(info.shape, dtype=info.dtype) if out is None else out
        if (tensor.dtype, tuple(tensor.shape)) != (info.dtype, info.shape):
            raise ValueError(f"out is {tensor.dtype} {list(tensor.shape)}, tensor {name!r} "
                             f"is {info.dtype} {list(info.shape)}")
        if info.nbytes == 0:
            return tensor
        try:
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            got = 0
            with open(self.path, "rb", buffering=0) as handle:
                handle.seek(info.begin)
                while got < info.nbytes:  # one read returns at most ~2 GiB on Linux
                    count = handle.readinto(view[got:])
                    if not count:
                        break
                    got += count
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({exc}); check "
                                  "that the file still exists and is readable") from exc
        if got != info.nbytes:
            raise self._fail(f"tensor {name!r} is cut short (was the file changed after opening?)")
        return tensor


class SafetensorsWriter:
    """Write tensors whose names, dtypes and shapes are declared up front, one at a time.

    The header is written at construction; ``write`` must then be called once per declared
    tensor in declaration order. ``close`` fails if any declared tensor is missing.
    """

    def __init__(self, path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._order: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * _element_size(dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, nbytes = self._order[self._next]
        if name != expected_name:
            raise RuntimeError(f"expected tensor {expected_name!r} next, got {name!r}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise RuntimeError(f"tensor {name!r} has {data.nbytes} bytes, declared {nbytes}")
        self._handle.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            self._handle.close()
            raise RuntimeError(f"tensor {missing!r} was declared but never written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
