"""Corrupted-byte fuzzing of the CTranslate2 reader, as test_reader_fuzz.py does for
safetensors: flipped bytes, truncation, appended garbage, rewritten sizes, counts and dtype
ids, random models and absurd shapes. The reader must succeed or raise CheckpointError
naming the file; the explicit cases at the end are the defects found, kept as regression
tests.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_helpers import FLIPS, FUZZ, UTF8_TEXT, flip, workdir  # noqa: F401 (workdir: a fixture)
from lors.checkpoint.ctranslate2 import read_ctranslate2
from lors.errors import CheckpointError
from test_ctranslate2_reader import ALIASES, VARIABLES, ct2_bytes


# --------------------------------------------------------------------------- CTranslate2

CT2_VALID = ct2_bytes(VARIABLES, ALIASES)


def _ct2_fields(data: bytes) -> list[tuple[int, str]]:
    """``(offset, struct format)`` of every number in a valid file: sizes, counts, ids."""
    fields, pos = [], 0

    def take(fmt: str) -> int:
        nonlocal pos
        fields.append((pos, fmt))
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def skip(count: int) -> None:
        nonlocal pos
        pos += count

    take("<I")
    skip(take("<H"))  # spec name
    take("<I")
    for _ in range(take("<I")):
        skip(take("<H"))  # variable name
        for _ in range(take("<B")):
            take("<I")
        take("<B")
        skip(take("<I"))  # data
    for _ in range(take("<I")):
        skip(take("<H"))
        skip(take("<H"))
    assert pos == len(data)
    return fields


CT2_FIELDS = _ct2_fields(CT2_VALID)


def read_ct2(path: Path, data: bytes) -> bool:
    """Write ``data``, parse it, touch every array and alias; False on CheckpointError."""
    path.write_bytes(data)
    try:
        model = read_ctranslate2(path)
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the message does not name the file: {exc}"
        return False
    for arr in model.variables.values():
        np.array(arr, copy=True)
    for alias in model.aliases:
        try:
            model.resolve(alias)
        except CheckpointError:
            pass  # a flipped alias name or target: resolve says which is missing
    return True


@settings(FUZZ, max_examples=300)
@given(flips=FLIPS)
def test_ct2_flipped_bytes(workdir, flips):
    read_ct2(workdir / "flip.bin", flip(CT2_VALID, 0, len(CT2_VALID), flips))


@settings(FUZZ, max_examples=60)
@given(length=st.integers(0, len(CT2_VALID) - 1))
def test_ct2_truncated_is_refused(workdir, length):
    assert not read_ct2(workdir / "cut.bin", CT2_VALID[:length])


@settings(FUZZ, max_examples=30)
@given(garbage=st.binary(min_size=1, max_size=64))
def test_ct2_appended_garbage_is_refused(workdir, garbage):
    assert not read_ct2(workdir / "tail.bin", CT2_VALID + garbage)


@settings(FUZZ, max_examples=300)
@given(index=st.integers(0, len(CT2_FIELDS) - 1), value=st.integers(0, 2**32 - 1)
       | st.integers(0, 300) | st.sampled_from([65, 255, 2**16 - 1, 2**31, 2**32 - 1]))
def test_ct2_size_count_or_id_rewritten(workdir, index, value):
    offset, fmt = CT2_FIELDS[index]
    data = bytearray(CT2_VALID)
    struct.pack_into(fmt, data, offset, value % (1 << (8 * struct.calcsize(fmt))))
    read_ct2(workdir / "field.bin", bytes(data))


# Arrays ct2_bytes takes per dtype id (bfloat16, id 5, is cut from float32 values).
_NP_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "<f4"}


@st.composite
def ct2_variables(draw) -> list[tuple[str, np.ndarray, int]]:
    """Valid files with random names (scale pairs likely), shapes, dtypes and bit patterns."""
    variables = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["w", "w_scale", "w_scale_scale", "v_scale"]) | UTF8_TEXT)
        dtype_id = draw(st.integers(0, 5))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        size = int(np.prod(shape)) * np.dtype(_NP_DTYPES[dtype_id]).itemsize
        raw = draw(st.binary(min_size=size, max_size=size))
        variables.append((name, np.frombuffer(raw, _NP_DTYPES[dtype_id]).reshape(shape),
                          dtype_id))
    return variables


@settings(FUZZ, max_examples=150)
@given(variables=ct2_variables(), aliases=st.dictionaries(UTF8_TEXT, UTF8_TEXT, max_size=3))
def test_ct2_random_models(workdir, variables, aliases):
    data = ct2_bytes(variables, aliases)
    read_ct2(workdir / "random.bin", data)


def _ct2_record(name: str, shape: tuple[int, ...], dtype_id: int, nbytes: int) -> bytes:
    """One variable record declaring ``shape`` and ``nbytes``, followed by ``nbytes`` bytes."""
    raw = name.encode() + b"\0"
    return (struct.pack("<H", len(raw)) + raw + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
            + struct.pack("<BI", dtype_id, nbytes) + bytes(range(256)) * (nbytes // 256)
            + bytes(range(nbytes % 256)))


def _ct2_file(record: bytes) -> bytes:
    """A version-6 file holding ``record`` as its only variable, and no aliases."""
    return struct.pack("<IH", 6, 2) + b"S\0" + struct.pack("<II", 1, 1) + record + bytes(4)


@settings(FUZZ, max_examples=200)
@given(rank=st.integers(0, 3) | st.integers(0, 255),
       dims=st.lists(st.sampled_from([0, 1, 2, 3, 2**16, 2**31, 2**32 - 1])
                     | st.integers(0, 2**32 - 1), max_size=255),
       dtype_id=st.integers(0, 5) | st.integers(0, 255), nbytes=st.none() | st.integers(0, 64))
def test_ct2_variable_record_with_absurd_shape(workdir, rank, dims, dtype_id, nbytes):
    shape = tuple((dims + [1] * rank)[:rank])
    if nbytes is None:
        # The size the shape needs (when small), so only the shape checks can refuse it.
        needed = {0: 4, 1: 1, 2: 2, 3: 4, 4: 2, 5: 2}.get(dtype_id, 4) * math.prod(shape)
        nbytes = needed if needed <= 4096 else 0
    read_ct2(workdir / "record.bin", _ct2_file(_ct2_record("x", shape, dtype_id, nbytes)))


# Defects of the reader before it was hardened, as for HEADER_CASES.
CT2_CASES = {
    # (fuzz) ValueError: maximum supported dimension for an ndarray is currently 64, found 65
    "rank 65": (_ct2_record("x", (1,) * 65, 0, 4), "dimensions"),
    # (fuzz) ValueError: array is too big (an empty array with huge dims)
    "huge empty tensor": (_ct2_record("x", (0, 2**32 - 1, 2**32 - 1), 0, 0), "shape"),
    # (review) ValueError: cannot reshape array of size 0: np.prod in int64 wrapped
    # 2**31 * 2**31 * 4 around to 0, which matched the declared 0 bytes
    "size overflows int64": (_ct2_record("x", (2**31, 2**31, 4), 1, 0), "shape"),
    # (review) accepted; numpy 1.x (which lors supports) allows 32 dimensions
    "rank 33": (_ct2_record("x", (1,) * 33, 0, 4), "dimensions"),
}


@pytest.mark.parametrize("case", sorted(CT2_CASES))
def test_ct2_shape_defects_stay_fixed(workdir, case):
    record, message = CT2_CASES[case]
    path = workdir / "case.bin"
    path.write_bytes(_ct2_file(record))
    with pytest.raises(CheckpointError, match=message) as info:
        read_ctranslate2(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("scale", [0.0, float("nan"), 1e-38, -1e-40])
def test_ct2_corrupt_scales_are_refused(workdir, scale):
    # (fuzz) a flipped scale byte gave a denormal scale: RuntimeWarning "overflow encountered
    # in divide" and Inf weights (an exception under -W error); (review) NaN gave NaN weights.
    q = np.array([[127, -1], [3, 4]], np.int8)
    path = workdir / "scale.bin"
    path.write_bytes(ct2_bytes([("w", q, 1), ("w_scale", np.array([2.0, scale], np.float32), 0)]))
    with pytest.raises(CheckpointError, match=r"scale 'w_scale' contains zeros, NaN or values"):
        read_ctranslate2(path)


def test_ct2_infinite_scale_of_an_all_zero_tensor_reads_as_zeros(workdir):
    # CTranslate2 writes scale = 2**10 / max|w| for int16, which is Inf for an all-zero tensor.
    path = workdir / "zeros.bin"
    path.write_bytes(ct2_bytes([("w", np.zeros(3, np.int16), 2),
                                ("w_scale", np.array(np.inf, np.float32), 0)]))
    assert read_ctranslate2(path).variables["w"].tolist() == [0.0, 0.0, 0.0]
