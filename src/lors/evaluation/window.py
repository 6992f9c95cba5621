"""The encoder window: run Whisper's encoder on less than 30 s of features.

Whisper's encoder only accepts exactly ``2 * max_source_positions`` mel frames (30 s), but
its position table is a fixed sinusoid, so a prefix of it is exactly what the first
positions of a 30 s input would get. For short clips the encoder can therefore run with
``max_source_positions`` lowered and the table truncated, on features padded only to the
window. Encoder cost scales with the window (attention quadratically), and the decoder
cross-attends to fewer frames.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..data.audio import SAMPLE_RATE
from ..errors import LorsError


@dataclass(frozen=True)
class Window:
    """An encoder window: ``positions`` encoder positions = ``2 * positions`` mel frames."""

    positions: int
    hop_length: int

    @property
    def samples(self) -> int:
        """Audio samples the features are padded (or cut) to."""
        return 2 * self.positions * self.hop_length

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


AUTO_MARGIN_S = 2.0
"""Silence the automatic window keeps after the longest clip. Whisper learnt to end a
transcript where speech gives way to padding; with the window cut right after the speech
it often repeats the sentence until ``max_new_tokens`` instead (measured on espeak-ng
speech: Spanish WER 67 % with the window at the clip's end, 29 % at 8 s, 32 % at 30 s)."""

AUTO_MIN_S = 8.0
"""Shortest automatic window: measured as fast as tighter windows on 3-6 s clips (the
decoder, not the encoder, dominates there) and no less accurate than 30 s."""


def window_for(longest_samples: int, window_seconds: float | None, full_positions: int,
               hop_length: int) -> Window:
    """The encoder window for a batch whose longest clip has ``longest_samples`` samples.

    ``window_seconds=None`` means automatic: the longest clip plus :data:`AUTO_MARGIN_S`,
    rounded up to whole seconds, and at least :data:`AUTO_MIN_S`. A number is used as given
    (rounded up to a whole encoder position) when the clip fits in it; a longer clip gets
    the automatic window instead, since cut audio would be scored against its whole
    reference. Either is capped at the model's full window (``full_positions`` positions,
    30 s for Whisper); a clip longer than that needs long-form decoding.
    """
    if window_seconds is not None and window_seconds <= 0:
        raise LorsError(f"window_seconds must be positive (or None for automatic), got {window_seconds}")
    positions = None if window_seconds is None else _positions(window_seconds, hop_length)
    if positions is None or Window(positions, hop_length).samples < longest_samples:
        seconds = max(AUTO_MIN_S, math.ceil(longest_samples / SAMPLE_RATE + AUTO_MARGIN_S))
        positions = _positions(seconds, hop_length)
    return Window(min(positions, full_positions), hop_length)


def _positions(seconds: float, hop_length: int) -> int:
    """Encoder positions covering ``seconds`` of audio (two mel frames each), rounded up."""
    return math.ceil(round(seconds * SAMPLE_RATE / (2 * hop_length), 6))


@contextlib.contextmanager
def encoder_window(model, positions: int) -> Iterator[None]:
    """Run ``model``'s encoder with only the first ``positions`` positions inside the block.

    Sets ``config.max_source_positions`` (shared by the model, its encoder and ``generate``)
    and swaps in an embedding whose weight is a view of the first rows of the real table, so
    nothing is copied; both are restored afterwards, even on error.
    """
    encoder = model.model.encoder
    full_table, full_positions = encoder.embed_positions, model.config.max_source_positions
    if positions == full_positions:
        yield
        return
    short = nn.Embedding(positions, full_table.embedding_dim, _weight=full_table.weight[:positions],
                         _freeze=True, device=full_table.weight.device, dtype=full_table.weight.dtype)
    encoder.embed_positions = short
    model.config.max_source_positions = encoder.max_source_positions = positions
    try:
        yield
    finally:
        encoder.embed_positions = full_table
        model.config.max_source_positions = encoder.max_source_positions = full_positions
