"""The streaming merge: checkpoint -> task vectors -> op -> base + delta -> writer -> report.

One tensor name at a time: the base tensor and each expert's copy are read, turned into float32
task vectors, merged by the op the tensor's group calls for, added back to the base, cast to the
output dtype and written. Memory is bounded by about one tensor per expert plus the base's, no
matter how many experts there are. Everything is checked before the first tensor is merged, and
the output directory appears only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from .. import __version__
from ..checkpoint.compat import check_experts
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..checkpoint.writer import (ShardedModelWriter, copy_aux_files, float_specs, write_config,
                                 write_json)
from ..errors import CheckpointError, ConfigError
from ..fsutil import atomic_directory, check_output_free
from .config import MergeConfig, resolve
from .diagnostics import Diagnostics
from .global_topk import GlobalThreshold
from .groups import GROUPS, group_of, layer_of
from .methods import GLOBAL_SCOPE_OPS, MATRIX_ONLY_OPS, OPS, OpContext

Progress = Callable[[int, int, str], None]
REPORT_NAME = "merge_report.json"
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PlanEntry:
    name: str
    group: str
    op: str  # an OPS key, or "copy" for tensors that are not merged (integer buffers)


@dataclass
class MergePlan:
    method: str
    params: dict
    group_ops: dict[str, str]
    base: Checkpoint
    experts: dict[str, Checkpoint]
    weights: list[float]
    entries: list[PlanEntry]
    group_counts: dict[str, dict] = field(default_factory=dict)

    def resolved_config(self) -> dict:
        return {"method": self.method, "parameters": self.params, "group_ops": self.group_ops,
                "base": self.base.source,
                "experts": [{"name": n, "path": c.source, "weight": w}
                            for (n, c), w in zip(self.experts.items(), self.weights)]}


def plan_merge(config: MergeConfig) -> MergePlan:
    """Resolve the config, open every checkpoint and check compatibility; reads no weights
    except the frozen tables used to prove a shared base."""
    method, params, group_ops = resolve(config)
    base = open_checkpoint(config.base)
    experts = {e.name: open_checkpoint(e.path) for e in config.experts}
    check_experts(base, experts)
    entries = []
    counts = {g: {"op": group_ops[g], "tensors": 0, "parameters": 0} for g in GROUPS}
    for name, meta in base.meta.items():
        group = group_of(name)
        op = group_ops[group] if meta.dtype.is_floating_point else "copy"
        if op in MATRIX_ONLY_OPS and len(meta.shape) != 2:
            raise ConfigError(f"op {op!r} works on 2-D matrices, but group {group!r} has tensor "
                              f"{name} of shape {list(meta.shape)}; choose another op for it")
        entries.append(PlanEntry(name, group, op))
        counts[group]["tensors"] += 1
        counts[group]["parameters"] += torch.Size(meta.shape).numel()
    return MergePlan(method, params, group_ops, base, experts,
                     [e.weight for e in config.experts], entries, counts)


def _seed(seed: int, expert: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{expert}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _read_float(checkpoint: Checkpoint, who: str, name: str) -> torch.Tensor:
    tensor = checkpoint.read(name).float()
    # NaN and Inf propagate into the sum: one cheap pass instead of an isfinite mask.
    if not math.isfinite(float(tensor.sum())):
        raise CheckpointError(f"{who} ({checkpoint.source}): tensor {name} contains NaN or Inf; "
                              "fix or re-export that checkpoint")
    return tensor


def _task_vectors(plan: MergePlan, name: str, base_tensor: torch.Tensor,
                  pool: Executor | None = None) -> list[torch.Tensor]:
    def one(item) -> torch.Tensor:
        expert, ckpt = item
        return _read_float(ckpt, f"expert {expert!r}", name).sub_(base_tensor)
    return list((pool.map if pool else map)(one, plan.experts.items()))


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Threads that read and prune experts concurrently, each with one torch thread.

    One intra-op thread per worker keeps every core busy in the single-threaded parts (file
    reads, introselect) and avoids OpenMP spin-waiting when the machine is shared.
    """
    if workers <= 1:
        yield None
        return
    # The main thread combines while workers still prune: it gets one thread too.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(previous)


def global_thresholds(plan: MergePlan) -> list[float] | None:
    """Per-expert k-th largest |tau| over all tensors of global-scope ops (two read passes)."""
    if plan.params.get("scope") != "global":
        return None
    names = [e.name for e in plan.entries if e.op in GLOBAL_SCOPE_OPS]
    if not names:
        return None
    accumulators = [GlobalThreshold() for _ in plan.experts]

    def stream(step) -> None:
        for name in names:
            base_tensor = _read_float(plan.base, "base", name)
            for acc, tau in zip(accumulators, _task_vectors(plan, name, base_tensor)):
                step(acc, tau)

    stream(GlobalThreshold.first_pass)
    for acc in accumulators:
        acc.choose_bucket(plan.params["keep"])
    stream(GlobalThreshold.second_pass)
    return [acc.value() for acc in accumulators]


def output_dtype(config: MergeConfig, base: Checkpoint) -> torch.dtype:
    if config.dtype != "auto":
        return OUTPUT_DTYPES[config.dtype]
    floats = [m.dtype for m in base.meta.values() if m.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def default_workers(experts: int) -> int:
    return max(1, min(experts, os.cpu_count() or 1))


def merge(config: MergeConfig, out: Path, *, force: bool = False, diagnostics: bool = True,
          progress: Progress | None = None, workers: int | None = None) -> dict:
    """Merge as ``config`` says into the new directory ``out``; returns the report dict.

    ``workers`` threads read and prune experts concurrently (default: min(experts, CPUs)).
    """
    check_output_free(out, force)
    started = time.perf_counter()
    plan = plan_merge(config)
    dtype = output_dtype(config, plan.base)
    thresholds = global_thresholds(plan)
    stats = Diagnostics(list(plan.experts)) if diagnostics else None
    workers = workers or default_workers(len(plan.experts))
    with atomic_directory(out, force=force) as folder, worker_pool(workers) as pool:
        writer = ShardedModelWriter(folder, float_specs([e.name for e in plan.entries],
                                                        plan.base.meta, dtype),
                                    int(config.shard_size_mb * 1_000_000))
        for done, (entry, inputs) in enumerate(_prefetched(plan, pool)):
            writer.write(entry.name, _merge_one(plan, entry, inputs, dtype, thresholds, stats,
                                                pool))
            if progress:
                progress(done + 1, len(plan.entries), entry.name)
        writer.close()
        write_config(folder, plan.base.config, dtype)
        aux = copy_aux_files(plan.base.aux_dir, folder)
        report = build_report(plan, dtype, writer.files, aux, thresholds, stats,
                              time.perf_counter() - started)
        write_json(folder / REPORT_NAME, report)
    return report


Inputs = tuple[torch.Tensor, list[torch.Tensor] | None]  # base tensor, experts' task vectors


def _load_inputs(plan: MergePlan, entry: PlanEntry, pool: Executor | None = None) -> Inputs:
    """The base tensor as stored (for "copy"), or float32 base and task vectors."""
    if entry.op == "copy":
        return plan.base.read(entry.name), None
    base_tensor = _read_float(plan.base, "base", entry.name)
    return base_tensor, _task_vectors(plan, entry.name, base_tensor, pool)


def _prefetched(plan: MergePlan, pool: Executor | None) -> Iterator[tuple[PlanEntry, Inputs]]:
    """Each entry with its inputs; with a pool, the next entry's are read meanwhile.

    A reader thread loads tensor k+1 (the experts' copies through the pool's workers) while
    tensor k is pruned, combined and written, so reads overlap computation; at most one extra
    tensor per expert is in memory.
    """
    if pool is None:
        for entry in plan.entries:
            yield entry, _load_inputs(plan, entry)
        return
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as reader:
        pending = reader.submit(_load_inputs, plan, plan.entries[0], pool) if plan.entries else None
        for index, entry in enumerate(plan.entries):
            inputs = pending.result()
            if index + 1 < len(plan.entries):
                pending = reader.submit(_load_inputs, plan, plan.entries[index + 1], pool)
            yield entry, inputs


def _merge_one(plan: MergePlan, entry: PlanEntry, inputs: Inputs, dtype: torch.dtype,
               thresholds: list[float] | None, stats: Diagnostics | None,
               pool: Executor | None = None) -> torch.Tensor:
    base_tensor, taus = inputs
    if taus is None:
        return base_tensor
    ctx = OpContext(entry.name, plan.weights, plan.params,
                    lambda i: torch.Generator().manual_seed(_seed(plan.params["seed"], i,
                                                                  entry.name)),
                    thresholds if entry.op in GLOBAL_SCOPE_OPS else None)
    record = None
    if stats is not None:  # a worker computes the diagnostics while the others prune
        args = (entry.name, layer_of(entry.name), entry.group, entry.op, taus)
        record = pool.submit(stats.add, *args) if pool is not None else stats.add(*args)
    if pool is not None:
        ctx.map = pool.map
    delta = OPS[entry.op](taus, ctx)
    if record is not None:
        Diagnostics.attach(record.result() if pool is not None else record, ctx.stats)
    return base_tensor.add_(delta).to(dtype)


def library_versions() -> dict:
    import numpy
    import safetensors
    import transformers
    return {"lors": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": numpy.__version__}


def build_report(plan: MergePlan, dtype: torch.dtype, files: list[str], aux: list[str],
                 thresholds, stats: Diagnostics | None, seconds: float) -> dict:
    return {
        "lors_version": __version__,
        "created_unix": round(time.time(), 3),
        "resolved_config": plan.resolved_config(),
        "seed": plan.params["seed"],
        "inputs": {"base": {"source": plan.base.source, "kind": plan.base.kind,
                            "files": plan.base.fingerprint()},
                   "experts": {n: {"source": c.source, "kind": c.kind, "files": c.fingerprint()}
                               for n, c in plan.experts.items()}},
        "library_versions": library_versions(),
        "groups": plan.group_counts,
        "global_thresholds": thresholds,
        "output": {"dtype": str(dtype).removeprefix("torch."), "weight_files": files,
                   "copied_files": aux},
        "seconds": round(seconds, 3),
        "diagnostics": stats.summary() if stats is not None else None,
    }
