"""The order examples are seen in: deterministic from the seed, balanced across pairs.

The example stream is a pure function of (seed, pair sizes), so a resumed run recomputes it
and skips what was already trained on instead of storing sampler state. Balanced sampling:
the stream goes round by round; each round takes one example from every pair, in a shuffled
pair order, and each pair walks through its own reshuffled epochs. Every pair therefore gets
the same share of the updates whatever its size.
"""

from __future__ import annotations

import math

import numpy as np


def example_stream(pair_sizes: list[int], seed: int, count: int) -> list[tuple[int, int]]:
    """The first ``count`` (pair index, example index) items of the balanced stream."""
    if not pair_sizes or min(pair_sizes) < 1:
        raise ValueError(f"every pair needs at least one example, got sizes {pair_sizes}")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) for n in pair_sizes]
    positions = [0] * len(pair_sizes)
    stream: list[tuple[int, int]] = []
    while len(stream) < count:
        for pair in rng.permutation(len(pair_sizes)):
            if positions[pair] == pair_sizes[pair]:
                orders[pair], positions[pair] = rng.permutation(pair_sizes[pair]), 0
            stream.append((int(pair), int(orders[pair][positions[pair]])))
            positions[pair] += 1
    return stream[:count]


def batches(pair_sizes: list[int], seed: int, steps: int,
            batch_size: int) -> list[list[tuple[int, int]]]:
    """The global batch of each of ``steps`` optimizer steps."""
    stream = example_stream(pair_sizes, seed, steps * batch_size)
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def steps_for_epochs(pair_sizes: list[int], epochs: float, batch_size: int) -> int:
    """Steps for the largest pair to be seen ``epochs`` times under balanced sampling."""
    return max(1, math.ceil(epochs * max(pair_sizes) * len(pair_sizes) / batch_size))


def evaluation_steps(steps: int, every: int | None = None, times: int | None = None) -> list[int]:
    """The steps (1-based, ascending) after which the dev set is scored in a run of ``steps``.

    ``times``: that many evaluations spread evenly, the k-th after step ceil(k * steps / times)
    (so the last is the last step; at most one per step), whatever the run's length, so runs
    of different lengths get the same number of checks. Else every ``every`` steps (default a
    tenth of the run) and the last step.
    """
    if times is not None:
        count = min(times, steps)
        return [-(-k * steps // count) for k in range(1, count + 1)]
    every = every or max(1, steps // 10)
    return sorted(set(range(every, steps + 1, every)) | {steps})
