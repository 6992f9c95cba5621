"""Sizes a checkpoint reader accepts before it allocates anything (shared by every reader)."""

from __future__ import annotations

MAX_RANK = 32
"""Most dimensions a tensor may have: numpy 1.x's limit (Whisper tensors have at most 3)."""
MAX_ELEMENTS = 2**60
"""torch and numpy index bytes in int64: room for widening to 8-byte dtypes."""


def checked_numel(shape: tuple[int, ...]) -> int | None:
    """Elements in a tensor of ``shape`` (non-negative dims), or None when the product of
    its non-zero dims reaches :data:`MAX_ELEMENTS`.

    Even an empty tensor needs that product as an int64 stride, and torch and numpy refuse
    (or overflow on) it when it is too large; stopping early keeps absurd dims cheap.
    """
    bound = 1
    for dim in shape:
        bound *= max(dim, 1)
        if bound >= MAX_ELEMENTS:
            return None
    return 0 if 0 in shape else bound
