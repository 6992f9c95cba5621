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


class SafetensorsFile:
    """Header of one safetensors file, validated at open; tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata, self.tensors = self._read_header()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: {what}; the file is truncated or corrupt: re-download or re-save it"
        )

    def _read_header(self) -> tuple[dict, dict[str, TensorInfo]]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise self._fail("shorter than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._fail(f"header length {header_len} does not fit the file ({size} bytes)")
                header = json.loads(handle.read(header_len))
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read ({exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        tensors = {name: self._entry(name, spec, data_start) for name, spec in header.items()}
        end = max((t.begin + t.nbytes for t in tensors.values()), default=data_start)
        if end > size:
            raise self._fail(f"tensor data ends at byte {end} but the file has {size} bytes")
        return metadata, tensors

    def _entry(self, name: str, spec: object, data_start: int) -> TensorInfo:
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._fail(f"bad header entry for tensor {name!r} ({exc!r})") from exc
        expected = math.prod(shape) * _element_size(dtype)
        if end - begin != expected or begin < 0:
            raise self._fail(f"tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        return TensorInfo(name, dtype, shape, data_start + begin, expected)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (no mmap); dtype and shape as stored."""
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        with open(self.path, "rb") as handle:
            handle.seek(info.begin)
            if handle.readinto(buffer) != info.nbytes:
                raise self._fail(f"tensor {name!r} is cut short")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


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
