"""The numpy CTranslate2 reader on small files this test writes itself (all six dtypes)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lors.checkpoint.ctranslate2 import Ct2Model, read_ctranslate2
from lors.errors import CheckpointError

F32, I8, I16, I32, F16, BF16 = range(6)


def _str(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _payload(arr: np.ndarray, dtype_id: int) -> bytes:
    if dtype_id == BF16:
        # bfloat16 = the upper 16 bits of the float32 pattern (exact for the values used).
        return (np.asarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    dtype = {F32: "<f4", I8: "i1", I16: "<i2", I32: "<i4", F16: "<f2"}[dtype_id]
    return np.asarray(arr).astype(dtype).tobytes()


def ct2_bytes(variables: list[tuple[str, np.ndarray, int]], aliases: dict[str, str] | None = None,
              version: int = 6, spec: str = "TinySpec", revision: int = 2) -> bytes:
    """Serialise a model in the CTranslate2 binary layout (version ``version``)."""
    out = [struct.pack("<I", version), _str(spec), struct.pack("<II", revision, len(variables))]
    for name, arr, dtype_id in variables:
        data = _payload(arr, dtype_id)
        out += [_str(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape)]
        out += [struct.pack("<BI", dtype_id, len(data)), data]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_str(alias), _str(target)]
    return b"".join(out)


RNG = np.random.default_rng(0)
W_F32 = RNG.standard_normal((2, 3)).astype(np.float32)
Q_I8 = RNG.integers(-127, 128, size=(3, 4)).astype(np.int8)
S_I8 = np.array([2.0, 0.5, 64.0], np.float32)
Q_I16 = np.array([-300, 0, 12345, 7], np.int16)
RAW_I16 = np.array([-2, 5], np.int16)
RAW_I32 = np.array([[1, -2], [2**31 - 1, -(2**31)]], np.int32)
V_F16 = np.array([0.5, -1.25, 65504.0, 1e-3], np.float16)
V_BF16 = np.array([1.5, -2.0, 0.15625, 2.0**100], np.float32)
VARIABLES = [
    ("enc/w", W_F32, F32),
    ("enc/q", Q_I8, I8),
    ("enc/q_scale", S_I8, F32),
    ("enc/q16", Q_I16, I16),
    ("enc/q16_scale", np.array(4.0, np.float32), F32),
    ("enc/raw16", RAW_I16, I16),
    ("enc/ids", RAW_I32, I32),
    ("dec/emb", V_F16, F16),
    ("dec/bf", V_BF16, BF16),
    ("dec/pre_norm", np.array(1, np.int8), I8),
    ("dec/logit_scale", np.array([0.25], np.float32), F32),
]
ALIASES = {"dec/proj": "dec/emb", "dec/proj2": "dec/proj"}


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(VARIABLES, ALIASES))
    return path


def test_round_trip_of_every_dtype(model_file: Path) -> None:
    model = read_ctranslate2(model_file)
    assert isinstance(model, Ct2Model)
    assert (model.version, model.spec_name, model.revision) == (6, "TinySpec", 2)
    v = model.variables
    np.testing.assert_array_equal(v["enc/w"], W_F32)
    assert v["enc/w"].dtype == np.float32
    np.testing.assert_array_equal(v["enc/raw16"], RAW_I16)
    assert v["enc/raw16"].dtype == np.int16
    np.testing.assert_array_equal(v["enc/ids"], RAW_I32)
    assert v["dec/emb"].dtype == np.float16 and v["dec/emb"].tolist() == V_F16.tolist()
    assert v["dec/bf"].dtype == np.float32
    np.testing.assert_array_equal(v["dec/bf"], V_BF16)
    assert v["dec/pre_norm"].shape == () and int(v["dec/pre_norm"]) == 1
    # A float that merely ends in "_scale" has no quantised partner and stays as it is.
    np.testing.assert_array_equal(v["dec/logit_scale"], [0.25])


def test_arrays_are_views_of_the_file_not_copies(model_file: Path) -> None:
    v = read_ctranslate2(model_file).variables
    for name in ("enc/w", "enc/ids", "dec/emb"):
        assert not v[name].flags.writeable and not v[name].flags.owndata


def test_quantised_tensors_are_dequantised_and_scales_consumed(model_file: Path) -> None:
    v = read_ctranslate2(model_file).variables
    assert v["enc/q"].dtype == np.float32
    np.testing.assert_allclose(v["enc/q"], Q_I8.astype(np.float32) / S_I8[:, None], rtol=1e-7)
    np.testing.assert_allclose(v["enc/q16"], Q_I16.astype(np.float32) / 4.0, rtol=1e-7)
    assert "enc/q_scale" not in v and "enc/q16_scale" not in v


def test_aliases_resolve_including_chains(model_file: Path) -> None:
    model = read_ctranslate2(model_file)
    assert model.aliases == ALIASES
    assert model.resolve("dec/proj") is model.variables["dec/emb"]
    assert model.resolve("dec/proj2") is model.variables["dec/emb"]
    assert "dec/proj2" in model and "nope" not in model
    with pytest.raises(CheckpointError, match="nope"):
        model.resolve("nope")


def test_alias_cycle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cycle.bin"
    path.write_bytes(ct2_bytes(VARIABLES[:1], {"a": "b", "b": "a"}))
    with pytest.raises(CheckpointError, match="cycle"):
        read_ctranslate2(path).resolve("a")


def _offsets(data: bytes) -> dict[str, int]:
    """Cut points inside each region of the file written by ``ct2_bytes``."""
    name_at = data.index(b"enc/q\0")
    return {"header": 3, "spec name": 8, "variable name": name_at + 2,
            "variable data": data.index(b"enc/w\0") + 6 + 1 + 8 + 5 + 7,
            "alias": len(data) - 5}


@pytest.mark.parametrize("region", ["header", "spec name", "variable name", "variable data", "alias"])
def test_truncated_file_names_file_and_offset(tmp_path: Path, region: str) -> None:
    data = ct2_bytes(VARIABLES, ALIASES)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: _offsets(data)[region]])
    with pytest.raises(CheckpointError) as info:
        read_ctranslate2(path)
    message = str(info.value)
    assert str(path) in message and "offset" in message and "truncated" in message


def test_truncated_data_names_the_variable(tmp_path: Path) -> None:
    data = ct2_bytes(VARIABLES, ALIASES)
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: _offsets(data)["variable data"]])
    with pytest.raises(CheckpointError, match="enc/w"):
        read_ctranslate2(path)


@pytest.mark.parametrize("version", [0, 5, 7, 2**31])
def test_unsupported_version_is_refused(tmp_path: Path, version: int) -> None:
    path = tmp_path / "v.bin"
    path.write_bytes(ct2_bytes(VARIABLES, ALIASES, version=version))
    with pytest.raises(CheckpointError, match=f"version {version} is not supported"):
        read_ctranslate2(path)


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    data = bytearray(ct2_bytes([("x/y", np.zeros(2, np.float32), F32)]))
    dtype_at = data.index(b"x/y\0") + 4 + 1 + 4  # name, rank, one dim
    data[dtype_at] = 9
    path = tmp_path / "dtype.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'x/y' has unknown CTranslate2 dtype id 9"):
        read_ctranslate2(path)


def test_size_mismatch_trailing_bytes_and_empty_files(tmp_path: Path) -> None:
    data = bytearray(ct2_bytes([("x/y", np.zeros(2, np.float32), F32)]))
    nbytes_at = data.index(b"x/y\0") + 4 + 1 + 4 + 1
    data[nbytes_at : nbytes_at + 4] = struct.pack("<I", 4)
    cases = {"size.bin": (bytes(data), "declares 4 bytes, expected 8"),
             "tail.bin": (ct2_bytes(VARIABLES) + b"junk", "4 unexpected bytes"),
             "empty.bin": (b"", "truncated")}
    for name, (payload, expected) in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=expected):
            read_ctranslate2(tmp_path / name)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent.bin"):
        read_ctranslate2(tmp_path / "absent.bin")
