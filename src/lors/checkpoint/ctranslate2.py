"""Read CTranslate2 ``model.bin`` files with numpy alone (no ``ctranslate2`` package needed).

Binary layout (version 6, little-endian)::

    u32 version | str spec_name | u32 revision | u32 n_vars
    n_vars x {str name | u8 rank | rank x u32 dims | u8 dtype | u32 nbytes | data}
    u32 n_aliases | n_aliases x {str alias | str target}

where ``str`` is a u16 byte length (counting the trailing NUL), the UTF-8 bytes and a NUL.
Dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Quantised weights (int8 per row, int16 per tensor) come with a ``<name>_scale`` variable;
the real value is ``q / scale``. The reader dequantises them to float32 and drops the scale.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .limits import MAX_RANK, checked_numel

SUPPORTED_VERSIONS = (6,)
"""Binary versions whose layout this reader implements (the one documented above)."""

_BFLOAT16 = "bfloat16"
_DTYPES: dict[int, np.dtype | str] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: _BFLOAT16,  # numpy has no bfloat16: stored as u16, widened to float32 on read
}
_SCALE_SUFFIX = "_scale"


@dataclass
class Ct2Model:
    """A parsed CTranslate2 model file.

    ``variables`` maps names to arrays: float32/float16/int8/int16/int32 as stored (read-only
    views of the file where possible); bfloat16 widened to float32; quantised integer tensors
    that had a ``<name>_scale`` entry dequantised to float32 (the scale entries removed).
    ``aliases`` maps an alias name to the variable (or alias) it stands for.
    """

    version: int
    spec_name: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str) -> np.ndarray:
        """Return the array for ``name``, following aliases (chains allowed, cycles refused)."""
        seen = []
        while name not in self.variables:
            if name not in self.aliases:
                raise CheckpointError(
                    f"CTranslate2 model ({self.spec_name}) has no variable or alias {name!r}"
                )
            if name in seen:
                raise CheckpointError(f"CTranslate2 alias cycle: {' -> '.join(seen + [name])}")
            seen.append(name)
            name = self.aliases[name]
        return self.variables[name]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases


class _Cursor:
    """Sequential little-endian reader over a buffer that reports where it failed."""

    def __init__(self, buf, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: truncated or corrupt CTranslate2 file: {what} needs {n} bytes at "
                f"offset {self.pos} but the file has {len(self.buf)} bytes; re-create or "
                "re-download it"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self._need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def u8(self, what: str) -> int:
        return self.unpack("<B", what)[0]

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", f"length of {what}")
        self._need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        if length == 0 or raw[-1] != 0:
            raise CheckpointError(
                f"{self.path}: corrupt CTranslate2 file: {what} at offset {self.pos} is not "
                "NUL-terminated; re-create or re-download it"
            )
        self.pos += length
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(
                f"{self.path}: corrupt CTranslate2 file: {what} at offset {self.pos - length} "
                f"is not UTF-8 ({exc})"
            ) from None

    def array(self, dtype: np.dtype, shape: tuple[int, ...], nbytes: int, what: str) -> np.ndarray:
        self._need(nbytes, what)
        arr = np.frombuffer(self.buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=self.pos)
        self.pos += nbytes
        return arr.reshape(shape)


def _read_variable(cur: _Cursor, index: int) -> tuple[str, np.ndarray]:
    """Read one variable record; widen bfloat16 to float32."""
    name = cur.string(f"name of variable #{index}")
    rank = cur.u8(f"rank of {name!r}")
    if rank > MAX_RANK:
        raise CheckpointError(
            f"{cur.path}: corrupt CTranslate2 file: variable {name!r} has {rank} dimensions, "
            f"more than the {MAX_RANK} an array may have (offset {cur.pos - 1}); re-create or "
            "re-download it"
        )
    shape = cur.unpack(f"<{rank}I", f"shape of {name!r}") if rank else ()
    type_id = cur.u8(f"dtype of {name!r}")
    nbytes = cur.u32(f"byte size of {name!r}")
    if type_id not in _DTYPES:
        raise CheckpointError(
            f"{cur.path}: variable {name!r} has unknown CTranslate2 dtype id {type_id} "
            f"(at offset {cur.pos - 5}); known ids are {sorted(_DTYPES)}"
        )
    dtype = _DTYPES[type_id]
    bf16 = dtype == _BFLOAT16
    np_dtype = np.dtype("<u2") if bf16 else dtype
    numel = checked_numel(shape)
    if numel is None:
        raise CheckpointError(
            f"{cur.path}: corrupt CTranslate2 file: variable {name!r} has shape {list(shape)}, "
            f"too large for any array (offset {cur.pos}); re-create or re-download it"
        )
    # Python ints: np.prod in int64 wraps around on corrupt dims.
    expected = numel * np_dtype.itemsize
    if nbytes != expected:
        raise CheckpointError(
            f"{cur.path}: corrupt CTranslate2 file: variable {name!r} of shape {list(shape)} "
            f"declares {nbytes} bytes, expected {expected} (offset {cur.pos})"
        )
    arr = cur.array(np_dtype, shape, nbytes, f"data of {name!r}")
    if bf16:
        # bfloat16 is the upper half of a float32: shift the bits back into place.
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return name, arr


def _dequantize(variables: dict[str, np.ndarray], path: Path) -> None:
    """Replace int8/int16 tensors that have ``<name>_scale`` by float32 ``q / scale``.

    Raises CheckpointError when a scale fits neither one value nor one per row, or holds
    a zero, NaN or a value so small that ``q / scale`` would overflow float32.
    """
    for scale_name in [n for n in variables if n.endswith(_SCALE_SUFFIX)]:
        name = scale_name[: -len(_SCALE_SUFFIX)]
        q = variables.get(name)
        if q is None or q.dtype not in (np.int8, np.int16):
            continue  # a float variable that merely ends in "_scale"
        scale = variables[scale_name].astype(np.float32)
        if scale.size == 1:
            scale = scale.reshape(())
        elif scale.shape == q.shape[:1]:
            # One scale per output row: broadcast over the remaining axes.
            scale = scale.reshape(scale.shape + (1,) * (q.ndim - 1))
        else:
            raise CheckpointError(
                f"{path}: scale {scale_name!r} has shape {list(scale.shape)}, which fits "
                f"neither one value nor one per row of {name!r} {list(q.shape)}"
            )
        # CTranslate2 writes scale = 127 / max|w| (int8, per row) or 2**10 / max|w| (int16),
        # so real scales keep q / scale within float32 (only int16 weights above ~1e37 would
        # be refused); an all-zero int16 tensor gets scale Inf, harmless as 0 / Inf = 0. A
        # NaN, zero or tinier scale comes from corruption and would make NaN or Inf weights.
        smallest = np.iinfo(q.dtype).max / np.finfo(np.float32).max
        if np.any(np.isnan(scale) | (np.abs(scale) < smallest)):
            raise CheckpointError(
                f"{path}: scale {scale_name!r} contains zeros, NaN or values below "
                f"{smallest:.3g} (dividing by them overflows); the file is corrupt: re-create "
                "or re-download it"
            )
        variables[name] = q.astype(np.float32) / scale
        del variables[scale_name]


def _open_buffer(path: Path):
    """Map ``path`` read-only (empty files cannot be mapped: return empty bytes)."""
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                return b""
            # The mapping outlives the file handle; arrays keep it alive as long as needed.
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CheckpointError(f"cannot read CTranslate2 model {path}: {exc}") from exc


def read_ctranslate2(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6).

    Arrays are read-only views of a memory map (no copy) except where a conversion
    (bfloat16, dequantisation) creates new float32 arrays. Raises CheckpointError on an
    unreadable, truncated or corrupt file, an unsupported version or an unknown dtype.
    """
    path = Path(path)
    cur = _Cursor(_open_buffer(path), path)
    version = cur.u32("format version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: CTranslate2 binary version {version} is not supported (this reader "
            f"handles {list(SUPPORTED_VERSIONS)}); re-convert the model with ctranslate2>=3"
        )
    spec_name = cur.string("spec name")
    revision = cur.u32("spec revision")
    n_vars = cur.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    for index in range(n_vars):
        name, arr = _read_variable(cur, index)
        if name in variables:
            raise CheckpointError(f"{path}: variable {name!r} appears twice; file is corrupt")
        variables[name] = arr
    aliases: dict[str, str] = {}
    for index in range(cur.u32("alias count")):
        alias = cur.string(f"alias #{index}")
        aliases[alias] = cur.string(f"target of alias {alias!r}")
    if cur.pos != len(cur.buf):
        raise CheckpointError(
            f"{path}: {len(cur.buf) - cur.pos} unexpected bytes after the aliases at offset "
            f"{cur.pos}; the file is corrupt or not a CTranslate2 version {version} model"
        )
    _dequantize(variables, path)
    return Ct2Model(version, spec_name, revision, variables, aliases)
