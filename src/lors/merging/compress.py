"""``lors compress``: one expert's LoRS pruning stored as a compressed task vector.

The file (format: :mod:`lors.checkpoint.compressed`) holds, per 2-D attention/FFN matrix,
the rank-r factors and the kept residual of exactly the pruning ``lors merge --method lors``
computes with the same settings (the same core function, sketch and top-k), and every other
tensor's dense task vector. A LoRS merge with those settings uses it as it is.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable

from torch import Tensor

from .. import __version__
from ..checkpoint.compressed import (DENSE, FORMAT, PARTS, base_fingerprint, is_compressed,
                                     spool, write_spooled)
from ..checkpoint.reader import Checkpoint
from ..errors import ConfigError
from ..fsutil import atomic_path, check_output_free
from . import core
from .config import validate_config
from .context import lors_settings
from .engine import default_workers, plan_merge, worker_pool

STORED_DTYPE = "float32"  # factors, residual values and dense deltas: the merge's precision


def compress(base: str | None, expert: str, out: str | Path, *, rank: int = 7,
             keep: float = 0.2, svd: str = "randomized", seed: int = 0, force: bool = False,
             progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write ``expert``'s (a checkpoint or a LoRA adapter) LoRS pruning against ``base`` to
    the new safetensors file ``out``; returns sizes and settings. Everything is checked
    before any weight is read; ``out`` appears only when complete (refused if it exists,
    unless ``force``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"output {out}: a compressed expert is one .safetensors file (lors "
                          "merge recognises it by that); name it F.safetensors")
    check_output_free(out, force, inputs=[i for i in (base, expert) if i])
    if is_compressed(expert):
        raise ConfigError(f"{expert} is already a compressed expert; compress the full expert "
                          "(or the LoRA adapter) it was made from")
    raw = {"experts": [{"name": "expert", "path": str(expert)}], "method": "lors",
           "parameters": {"rank": rank, "keep": keep, "svd": svd, "seed": seed}}
    plan = plan_merge(validate_config({**raw, **({"base": base} if base else {})},
                                      source="lors compress"))
    source = plan.experts["expert"]
    started = time.perf_counter()
    zero: list[str] = []
    floats = [e for e in plan.entries if e.op != core.COPY]
    workers = default_workers(len(floats))
    # one torch thread per pruning, as lors merge's workers prune: BLAS rounds differently
    # with another thread count, which could move an entry across the top-k threshold
    with atomic_path(out) as tmp, tempfile.TemporaryFile(dir=tmp.parent) as body, \
            worker_pool(workers) as pool:
        parts = _in_order(pool, lambda entry: _compress_one(plan, entry), floats, workers)
        entries = spool(_spooled(floats, parts, zero, progress), body)
        metadata = {
            "format": FORMAT, "lors_version": __version__, "source": str(source.source),
            "expert_kind": source.kind, "base_source": str(plan.base.source),
            "base_fingerprint": base_fingerprint(plan.base), "dtype": STORED_DTYPE,
            "settings": json.dumps(lors_settings(plan.params, (rank, rank))),
            "zero": json.dumps(zero), "created_unix": f"{time.time():.3f}"}
        with open(tmp, "wb") as handle:
            write_spooled(handle, entries, metadata, body)
    return {"out": str(out), "bytes": out.stat().st_size, "full_bytes": full_size(source, plan.base),
            "expert_bytes": sum(Path(f).stat().st_size for f in source.files),
            "settings": json.loads(metadata["settings"]), "zero_tensors": len(zero),
            "seconds": round(time.perf_counter() - started, 3)}


def _compress_one(plan, entry) -> list[tuple[str, Tensor]]:
    """(stored name, float32 tensor) of one tensor's compressed task vector: the LoRS parts
    of a pruned matrix, or the dense delta; none for an exactly-zero task vector."""
    base_tensor = core.read_float(plan.base, "base", entry.name)
    tau = core.task_vectors(plan.experts, entry.name, base_tensor)[0]
    if not bool(tau.any()):
        return []
    if entry.op == "lors":
        known = core.known_parts(plan.experts, entry.name)
        parts = core.lors_parts(entry, tau, plan.params, known[0] if known else None)
        return list(zip((f"{entry.name}:{p}" for p in PARTS), parts))
    return [(f"{entry.name}:{DENSE}", tau)]


def _spooled(floats, parts, zero: list[str], progress):
    """Every tensor's parts in the base's order; names of zero task vectors go to ``zero``."""
    for done, (entry, stored) in enumerate(zip(floats, parts)):
        if not stored:
            zero.append(entry.name)
        yield from stored
        if progress:
            progress(done + 1, len(floats), entry.name)


def _in_order(pool, function, items, ahead: int):
    """``function(item)`` of each item, in order, computed on ``pool`` at most ``ahead``
    items in advance (so at most that many results wait in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def full_size(source, base: Checkpoint) -> int:
    """Bytes of the full checkpoint the expert stands for: its weight files, or for a LoRA
    adapter the base's (the adapter merged into it has the base's size)."""
    files = source.files if isinstance(source, Checkpoint) else base.files
    return sum(Path(f).stat().st_size for f in files)
