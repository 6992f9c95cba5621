"""Exact top-k thresholds over many tensors (TIES / magnitude with ``scope: global``).

A whole model's task vector never fits in memory comfortably, so the k-th largest magnitude
over all of an expert's tensors is found in two streaming passes with a two-level radix
histogram on the float32 bit patterns (for non-negative floats, bit order is value order):
pass 1 counts the top 16 bits, pass 2 the low 15 bits inside the one bucket that holds the
k-th value. Exact, and memory is two small histograms per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_BITS = 15
_HIGH_BUCKETS = 1 << 16  # float32 magnitudes have the sign bit clear: 31 bits = 16 + 15
_LOW_BUCKETS = 1 << _LOW_BITS


def _bits(x: Tensor) -> Tensor:
    return x.detach().float().abs().reshape(-1).view(torch.int32)


class GlobalThreshold:
    """Accumulates one expert's magnitudes over two passes; then ``value`` is the k-th largest."""

    def __init__(self) -> None:
        self.high = torch.zeros(_HIGH_BUCKETS, dtype=torch.int64)
        self.low = torch.zeros(_LOW_BUCKETS, dtype=torch.int64)
        self.total = 0
        self.k = 0
        self.bucket: int | None = None
        self.rank_in_bucket = 0

    def first_pass(self, x: Tensor) -> None:
        bits = _bits(x)
        self.total += bits.numel()
        self.high += torch.bincount(bits >> _LOW_BITS, minlength=_HIGH_BUCKETS)

    def choose_bucket(self, keep: float) -> None:
        """After pass 1: find the bucket of the k-th largest, k = floor(keep * total)."""
        self.k = int(keep * self.total)
        if self.k <= 0 or self.k >= self.total:
            return
        from_top = torch.flip(self.high, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(self.k)))
        self.bucket = _HIGH_BUCKETS - 1 - index
        above = int(from_top[index - 1]) if index > 0 else 0
        self.rank_in_bucket = self.k - above  # the k-th overall is this-th largest in the bucket

    def second_pass(self, x: Tensor) -> None:
        if self.bucket is None:
            return
        bits = _bits(x)
        inside = bits[(bits >> _LOW_BITS) == self.bucket]
        self.low += torch.bincount(inside & (_LOW_BUCKETS - 1), minlength=_LOW_BUCKETS)

    def value(self) -> float:
        """The k-th largest magnitude (0 keeps everything, +inf keeps nothing)."""
        if self.k <= 0:
            return float("inf")
        if self.k >= self.total:
            return 0.0
        from_top = torch.flip(self.low, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(self.rank_in_bucket)))
        bits = (self.bucket << _LOW_BITS) | (_LOW_BUCKETS - 1 - index)
        return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))
