"""What the corrupted-byte fuzz tests of the readers share: hypothesis settings, the text
and byte-flip strategies, and a module-wide work folder (test_reader_fuzz.py for
safetensors, test_reader_fuzz_ct2.py for CTranslate2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# too_slow: generation time varies on a loaded 2-core machine; the run stays bounded anyway.
FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow])
# A fixed alphabet keeps hypothesis from building (and caching on disk) its unicode tables,
# while still covering quotes, escapes, NUL, non-ASCII and a lone surrogate.
UTF8_CHARS = list('ab_./0"\\\0\n é€\U0001f600')
TEXT = st.text(alphabet=st.sampled_from(UTF8_CHARS + ["\ud800"]), max_size=6)
UTF8_TEXT = st.text(alphabet=st.sampled_from(UTF8_CHARS), max_size=6)  # CTranslate2 names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One folder per module; every example overwrites its own file in it."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    return folder


FLIPS = st.lists(st.tuples(st.integers(0, 2**20),
                           st.integers(0, 255) | st.sampled_from([0x00, 0x20, 0x22, 0x7B, 0xFF])),
                 min_size=1, max_size=6)


def flip(data: bytes, lo: int, hi: int, flips: list[tuple[int, int]]) -> bytes:
    """``data`` with byte ``lo + p % (hi - lo)`` set to ``v`` for each ``(p, v)``."""
    out = bytearray(data)
    for pos, value in flips:
        out[lo + pos % (hi - lo)] = value
    return bytes(out)
