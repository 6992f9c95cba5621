"""Corrupted-byte fuzzing of the safetensors reader (the CTranslate2 reader's:
test_reader_fuzz_ct2.py).

Every test starts from a small valid file, corrupts it (flipped bytes, truncation, appended
garbage, a rewritten header length or JSON header) and reads everything back. The reader
must either succeed (a flipped byte in tensor data is still a valid file, only the numbers
differ) or raise CheckpointError naming the file; any other exception fails. Runs are
derandomized, so a failure reproduces; the explicit cases at the end are the defects found
(by these properties or by reading the reader), kept as regression tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fuzz_helpers import FLIPS, FUZZ, TEXT, flip, workdir  # noqa: F401 (workdir: a fixture)
from lors.checkpoint.reader import open_checkpoint
from lors.checkpoint.safetensors_io import SafetensorsFile
from lors.errors import CheckpointError


# --------------------------------------------------------------------------- safetensors

def _tensors() -> dict[str, torch.Tensor]:
    """A few tensors of every dtype lors reads, including a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.encoder.conv1.weight": torch.randn(2, 3, generator=g),
        "model.encoder.conv1.bias": torch.randn(3, generator=g).half(),
        "encoder.layer_norm.weight": torch.randn(2, 2, generator=g).bfloat16(),  # no "model."
        "f64": torch.tensor([0.5, -2.0], dtype=torch.float64),
        "ids": torch.arange(3, dtype=torch.int64),
        "i32": torch.tensor(7, dtype=torch.int32),
        "i16": torch.tensor([-1, 2], dtype=torch.int16),
        "q": torch.tensor([[1, -2], [3, -4]], dtype=torch.int8),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


ST_VALID = save(_tensors(), metadata={"format": "pt"})
ST_HEADER_LEN = struct.unpack("<Q", ST_VALID[:8])[0]
ST_HEADER = json.loads(ST_VALID[8 : 8 + ST_HEADER_LEN])
ST_DATA = ST_VALID[8 + ST_HEADER_LEN :]
ST_NAMES = sorted(n for n in ST_HEADER if n != "__metadata__")


def _with_header(header: object, data: bytes = ST_DATA) -> bytes:
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _with_raw_header(raw: bytes, data: bytes = ST_DATA) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def read_safetensors(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` and read every tensor; False if it raised CheckpointError."""
    path.write_bytes(data)
    try:
        handle = SafetensorsFile(path)
        for name, info in handle.tensors.items():
            tensor = handle.read(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (info.dtype, info.shape)
    except CheckpointError as exc:
        assert str(path) in str(exc), f"the message does not name the file: {exc}"
        return False
    return True


def read_folder(folder: Path, data: bytes) -> bool:
    """Like :func:`read_safetensors`, through ``open_checkpoint`` on a Whisper folder."""
    (folder / "model.safetensors").write_bytes(data)
    try:
        checkpoint = open_checkpoint(folder)
        for name, meta in checkpoint.meta.items():
            tensor = checkpoint.read(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (meta.dtype, meta.shape)
    except CheckpointError as exc:
        assert str(folder) in str(exc), f"the message does not name the file: {exc}"
        return False
    return True


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), TEXT,
    st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "f32", ""]),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8)
DIMS = st.one_of(st.integers(-3, 6), st.integers(-(2**63), 2**64),
                 st.sampled_from([0, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64]))
SHAPES = st.one_of(st.lists(DIMS, max_size=6), st.lists(st.sampled_from([0, 1, 2**40]),
                                                        min_size=60, max_size=70))
OFFSETS = st.lists(st.integers(-8, len(ST_DATA) + 8) | st.integers(-(2**64), 2**64), max_size=3)
KEEP = st.just("keep")


@FUZZ
@given(flips=FLIPS)
def test_safetensors_flipped_bytes_anywhere(workdir, flips):
    read_safetensors(workdir / "flip.safetensors", flip(ST_VALID, 0, len(ST_VALID), flips))


@FUZZ
@given(flips=FLIPS)
def test_safetensors_flipped_header_bytes(workdir, flips):
    data = flip(ST_VALID, 8, 8 + ST_HEADER_LEN, flips)
    read_safetensors(workdir / "header.safetensors", data)


@FUZZ
@given(flips=FLIPS)
def test_safetensors_flipped_data_bytes_still_read(workdir, flips):
    # The header is intact, so the file stays valid: only the numbers change.
    data = flip(ST_VALID, 8 + ST_HEADER_LEN, len(ST_VALID), flips)
    assert read_safetensors(workdir / "data.safetensors", data)


@settings(FUZZ, max_examples=60)
@given(length=st.integers(0, len(ST_VALID) - 1))
def test_safetensors_truncated_is_refused(workdir, length):
    assert not read_safetensors(workdir / "cut.safetensors", ST_VALID[:length])


@settings(FUZZ, max_examples=40)
@given(garbage=st.binary(min_size=1, max_size=64))
def test_safetensors_appended_garbage(workdir, garbage):
    read_safetensors(workdir / "tail.safetensors", ST_VALID + garbage)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, len(ST_VALID) + 8))
@example(length=2**64 - 1)
@example(length=len(ST_VALID) - 8)
@example(length=ST_HEADER_LEN - 1)  # drops a padding space: valid, data shifted by a byte
def test_safetensors_header_length_rewritten(workdir, length):
    ok = read_safetensors(workdir / "len.safetensors", struct.pack("<Q", length) + ST_VALID[8:])
    if length == ST_HEADER_LEN:
        assert ok
    if length < len(ST_VALID[8 : 8 + ST_HEADER_LEN].rstrip()):
        assert not ok  # cut before the closing brace: never JSON


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(ST_NAMES),
       field=st.sampled_from(["dtype", "shape", "data_offsets", "entry", "-dtype", "-shape",
                              "-data_offsets"]),
       value=JSON_VALUES | SHAPES | OFFSETS | SCALARS)
def test_safetensors_header_field_corrupted(workdir, name, field, value):
    header = json.loads(json.dumps(ST_HEADER))
    if field == "entry":
        header[name] = value
    elif field.startswith("-"):
        del header[name][field[1:]]
    else:
        header[name][field] = value
    read_safetensors(workdir / "entry.safetensors", _with_header(header))


ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}


@settings(FUZZ, max_examples=200)
@given(name=st.sampled_from(ST_NAMES), shape=SHAPES | st.lists(DIMS | SCALARS, max_size=4),
       dtype=st.sampled_from(sorted(ITEMSIZE)))
def test_safetensors_shape_with_matching_offsets(workdir, name, shape, dtype):
    # The byte count agrees with the (possibly absurd) shape, so only shape checks can refuse.
    header = json.loads(json.dumps(ST_HEADER))
    begin = header[name]["data_offsets"][0]
    size = ITEMSIZE[dtype]
    for dim in shape:
        size = size * dim if isinstance(dim, (int, float)) and abs(size) < 2**80 else size
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
    read_safetensors(workdir / "shape.safetensors", _with_header(header))


@FUZZ
@given(moved=st.sampled_from(ST_NAMES), onto=st.sampled_from(ST_NAMES),
       shift=st.integers(-16, 16) | st.sampled_from([len(ST_DATA), 2**62]))
def test_safetensors_offsets_overlapping_or_out_of_range(workdir, moved, onto, shift):
    header = json.loads(json.dumps(ST_HEADER))
    begin, end = header[moved]["data_offsets"]
    start = header[onto]["data_offsets"][0] + shift
    header[moved]["data_offsets"] = [start, start + end - begin]
    read_safetensors(workdir / "moved.safetensors", _with_header(header))


@FUZZ
@given(header=JSON_VALUES | st.dictionaries(TEXT, JSON_VALUES, max_size=4),
       metadata=KEEP | JSON_VALUES)
def test_safetensors_header_replaced(workdir, header, metadata):
    if not (isinstance(metadata, str) and metadata == "keep") and isinstance(header, dict):
        header["__metadata__"] = metadata
    read_safetensors(workdir / "replaced.safetensors", _with_header(header))


@FUZZ
@given(start=st.integers(0, ST_HEADER_LEN), size=st.integers(0, 12),
       junk=st.binary(max_size=8) | TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_safetensors_header_text_spliced(workdir, start, size, junk):
    raw = ST_VALID[8 : 8 + ST_HEADER_LEN]
    read_safetensors(workdir / "spliced.safetensors",
                     _with_raw_header(raw[:start] + junk + raw[start + size :]))


MUTANTS = st.one_of(
    FLIPS.map(lambda f: flip(ST_VALID, 0, len(ST_VALID), f)),
    st.integers(0, len(ST_VALID) - 1).map(lambda n: ST_VALID[:n]),
    st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + ST_VALID[8:]),
    st.tuples(st.sampled_from(ST_NAMES), SHAPES).map(
        lambda ns: _with_header({**ST_HEADER, ns[0]: {**ST_HEADER[ns[0]], "shape": ns[1]}})),
)


@settings(FUZZ, max_examples=100)
@given(data=MUTANTS)
def test_open_checkpoint_on_a_corrupted_folder(workdir, data):
    read_folder(workdir, data)


def test_unchanged_files_read_back_exactly(workdir):
    path = workdir / "valid.safetensors"
    assert read_safetensors(path, ST_VALID) and read_folder(workdir, ST_VALID)
    handle = SafetensorsFile(path)
    for name, tensor in _tensors().items():
        assert torch.equal(handle.read(name), tensor)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# Defects of the reader before it was hardened, kept as regression cases. Each comment says
# what happened then, and whether the properties above (fuzz) or reading the code (review)
# found it first.
HEADER_CASES = {
    # (fuzz) ValueError: negative count, from bytearray(-4)
    "negative size": (json.dumps({"x": _entry(shape=(-1,), offsets=(8, 4))}).encode(), "shape"),
    # (fuzz) OverflowError: cannot fit 'int' into an index-sized integer, from bytearray
    "huge negative size": (json.dumps({"x": _entry(shape=(-1, 2**62), offsets=(2**64, 0))})
                           .encode(), "shape"),
    # (fuzz) RuntimeError from torch.empty: negative dimension
    "negative dim of an empty tensor": (json.dumps({"x": _entry(shape=(0, -1), offsets=(0, 0))})
                                        .encode(), "shape"),
    # (review) RuntimeError from torch reshape: invalid shape dimension -2
    "negative dims": (json.dumps({"x": _entry(shape=(-1, -2))}).encode(), "shape"),
    # (review) RuntimeError from torch.empty: Stride calculation overflowed
    "huge empty tensor": (json.dumps({"x": _entry(shape=(0, 2**62, 2**62), offsets=(0, 0))})
                          .encode(), "shape"),
    # (review) RecursionError from json
    "deeply nested": (b"[" * 100_000, "header is not valid JSON"),
    # (review) ValueError: Exceeds the limit (4300 digits) for integer string conversion
    "5000-digit number": (b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], '
                          b'"data_offsets": [0, 8]}}', "header is not valid JSON"),
    # (review) OverflowError: cannot convert float infinity to integer
    "infinite dim": (b'{"x": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}',
                     "shape"),
    # (review) accepted as shape (2,): int() of each character of "2"
    "shape is a string": (json.dumps({"x": _entry(shape="2")}).encode(), "shape"),
    # (review) accepted: int(2.5) == 2
    "fractional dim": (json.dumps({"x": _entry(shape=(2.5,))}).encode(), "shape"),
    # (review) accepted: int(True) == 1
    "boolean offset": (json.dumps({"x": _entry(shape=(), dtype="I8", offsets=(False, True))})
                       .encode(), "data_offsets"),
    # (review) accepted: both tensors read the same 8 bytes
    "overlapping tensors": (json.dumps({"x": _entry(), "y": _entry()}).encode(), "overlap"),
    # (review) accepted: json kept the second entry and dropped the first
    "duplicate name": (b'{"x": ' + json.dumps(_entry()).encode() + b', "x": '
                       + json.dumps(_entry(offsets=(8, 16))).encode() + b"}", "twice"),
    # (review) accepted: json.loads guesses UTF-16 from the NUL bytes; the format is UTF-8
    "UTF-16 header": (json.dumps({"x": _entry()}).encode("utf-16-le"), "not valid JSON"),
    # (review) accepted as metadata
    "metadata not an object": (json.dumps({"__metadata__": [1], "x": _entry()}).encode(),
                               "__metadata__"),
    # (review) accepted; torch copes, numpy 1.x (which lors supports) allows 32 dimensions
    "rank above 32": (json.dumps({"x": _entry(shape=[1] * 33 + [2])}).encode(), "dimensions"),
    # Already CheckpointErrors; kept to pin the clearer messages.
    "unknown dtype": (json.dumps({"x": _entry(dtype="F8_E4M3")}).encode(), "unknown dtype"),
    "end before begin": (json.dumps({"x": _entry(offsets=(8, 0))}).encode(), "data_offsets"),
    "past the end": (json.dumps({"x": _entry(offsets=(16, 24))}).encode(), "ends at byte"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_safetensors_header_defects_stay_fixed(workdir, case):
    raw, message = HEADER_CASES[case]
    path = workdir / "case.safetensors"
    path.write_bytes(_with_raw_header(raw, bytes(16)))
    with pytest.raises(CheckpointError, match=message) as info:
        handle = SafetensorsFile(path)
        for name in handle.tensors:
            handle.read(name)
    assert str(path) in str(info.value)


def test_safetensors_file_removed_after_open(workdir):
    # (review) FileNotFoundError before.
    path = workdir / "gone.safetensors"
    path.write_bytes(ST_VALID)
    handle = SafetensorsFile(path)
    path.unlink()
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        handle.read(ST_NAMES[0])
