"""Open an expert of a merge: a full checkpoint, a PEFT LoRA adapter, or a compressed task
vector. All three give ``source``, ``kind``, ``config``, ``meta`` and ``fingerprint()``; the
last two also their exact task vector, ``delta(name, base_tensor)``, and what they know
about it (``factors(name)``, ``pruned_with(name)``), which :mod:`lors.merging.core` uses."""

from __future__ import annotations

import os

from .adapter import AdapterExpert, is_adapter, open_adapter
from .compressed import CompressedExpert, is_compressed, open_compressed
from .reader import Checkpoint, open_checkpoint

Expert = Checkpoint | AdapterExpert | CompressedExpert


def open_expert(ref: str | os.PathLike, base: Checkpoint) -> Expert:
    """A folder with ``adapter_config.json`` is a LoRA adapter, a safetensors file written by
    ``lors compress`` a compressed expert (both checked against ``base`` here, headers
    only); anything else is opened as a checkpoint (:func:`open_checkpoint`)."""
    if is_adapter(ref):
        return open_adapter(ref, base)
    if is_compressed(ref):
        return open_compressed(ref, base)
    return open_checkpoint(ref)


def is_full(expert: Expert) -> bool:
    """Whether ``expert`` is a full checkpoint (its weights are read and compared with the
    base's; the others are built on the base and checked when opened)."""
    return isinstance(expert, Checkpoint)
