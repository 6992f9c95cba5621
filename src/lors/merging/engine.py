"""The streaming merge: checkpoint -> task vectors -> op -> base + delta -> writer -> report.

One tensor name at a time: the base tensor and each expert's copy are read, turned into float32
task vectors, merged by the op the tensor's group calls for, added back to the base, cast to the
output dtype and written. Memory is bounded by about one tensor per expert plus the base's, no
matter how many experts there are. Everything is checked before the first tensor is merged, and
the output directory appears only when complete.

Near the I/O floor: tensors are read into the buffers of tensors already written
(:mod:`.buffers`), and the inputs are not checked for NaN or Inf one by one: the merged tensor
is (one sum), and only when it is not finite (or the op fails) are its inputs read again and
checked, so that the error still names the expert and tensor at fault. With ``device="cuda"``
each tensor's inputs are moved to the GPU after reading and the merged tensor back before it
is written: SVDs, top-k and elections run there, streamed as on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from .. import __version__
from ..checkpoint.compat import check_experts
from ..checkpoint.experts import Expert, is_full, open_expert
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..checkpoint.writer import (ShardedModelWriter, copy_aux_files, float_specs, write_config,
                                 write_json)
from ..errors import ConfigError, LorsWarning
from ..fsutil import atomic_directory, check_output_free
from . import core
from .buffers import Buffers
from .config import MergeConfig, resolve
from .context import Known
from .core import COPY, PlanEntry
from .diagnostics import Diagnostics
from .groups import layer_of

Progress = Callable[[int, int, str], None]
REPORT_NAME = "merge_report.json"
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergePlan:
    method: str
    params: dict
    group_ops: dict[str, str]
    base: Checkpoint
    experts: dict[str, Expert]
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
    except the sample of tensors that shows each full expert is close to the base (LoRA
    adapters and compressed experts are checked against the base as they are opened)."""
    method, params, group_ops = resolve(config)
    base = open_checkpoint(config.base)
    experts = {e.name: open_expert(e.path, base) for e in config.experts}
    _warn_same_path(config)
    check_experts(base, {n: e for n, e in experts.items() if is_full(e)},
                  allow_other_base=config.allow_other_base)
    entries, counts = core.plan_entries(base.meta, group_ops, params)
    core.warn_repruned(experts, entries, base.meta, params)
    return MergePlan(method, params, group_ops, base, experts,
                     [e.weight for e in config.experts], entries, counts)


def _warn_same_path(config: MergeConfig) -> None:
    seen: dict[str, str] = {}
    for expert in config.experts:
        where = os.path.realpath(expert.path)
        if where in seen:
            warnings.warn(f"experts {seen[where]!r} and {expert.name!r} are the same checkpoint "
                          f"({expert.path}): it counts twice in the merge", LorsWarning,
                          stacklevel=3)
        seen.setdefault(where, expert.name)


def _task_vectors(plan: MergePlan, name: str, base_tensor: torch.Tensor,
                  pool: Executor | None = None) -> list[torch.Tensor]:
    return core.task_vectors(plan.experts, name, base_tensor, pool.map if pool else map)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Threads that read and prune experts concurrently, each with one torch thread.

    One intra-op thread per worker keeps every core busy in the single-threaded parts (file
    reads, introselect) and avoids OpenMP spin-waiting when the machine is shared. It also
    makes the merge independent of the number of CPUs: BLAS rounds differently with another
    thread count, which can move an entry across a top-k threshold; with one thread per
    pruning, always (even with one worker), a merge and ``lors compress`` prune alike.
    """
    # The main thread combines while workers still prune: it gets one thread too.
    with one_torch_thread(), ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        yield pool


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread in this thread meanwhile (see :func:`worker_pool`), then
    the previous count again."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def global_thresholds(plan: MergePlan) -> list[float] | None:
    """Per-expert k-th largest |tau| over all tensors of global-scope ops (two read passes)."""
    def taus_of(name: str) -> list[torch.Tensor]:
        return _task_vectors(plan, name, core.read_float(plan.base, "base", name))
    return core.global_thresholds(plan.entries, plan.params, len(plan.experts), taus_of)


def output_dtype(config: MergeConfig, base: Checkpoint) -> torch.dtype:
    if config.dtype != "auto":
        return OUTPUT_DTYPES[config.dtype]
    floats = [m.dtype for m in base.meta.values() if m.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def default_workers(experts: int) -> int:
    from ..threads import thread_count  # --threads / LORS_THREADS, else the CPUs we may use
    return max(1, min(experts, thread_count()))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a merge computes on: ``cpu`` (the default), ``cuda`` or ``cuda:N``.
    ConfigError for any other name, and for CUDA when no CUDA device is visible."""
    name = "cpu" if device is None else str(device)
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: unknown device; use cpu, cuda or cuda:N (N, a "
                          "GPU index)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is visible "
                              "(torch.cuda.is_available() is False); drop --device or run on "
                              "a machine with a GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there is no GPU {resolved.index}; "
                              f"{torch.cuda.device_count()} visible (cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1})")
    return resolved


def merge(config: MergeConfig, out: Path, *, force: bool = False, diagnostics: bool = True,
          progress: Progress | None = None, workers: int | None = None,
          device: str | torch.device | None = None) -> dict:
    """Merge as ``config`` says into the new directory ``out``; returns the report dict.

    ``workers`` threads read and prune experts concurrently (default: min(experts, CPUs)).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``; default cpu) is where each tensor is merged:
    tensors are read on the CPU, moved there, merged (SVDs, top-k, elections) and moved
    back to be written, one tensor at a time as on the CPU.
    """
    device = resolve_device(device)  # before any work: a bad device is a one-line error
    check_output_free(out, force, inputs=[config.base, *(e.path for e in config.experts)])
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
        buffers = Buffers()  # tensors are read into the memory of those already written
        with ThreadPoolExecutor(1) as writing:  # tensor k is written while k + 1 merges
            written = None
            for done, (entry, inputs) in enumerate(_prefetched(plan, pool, device, buffers)):
                merged = _merge_one(plan, entry, inputs, dtype, thresholds, stats, pool,
                                    buffers)
                buffers.give(*(inputs[1] or ()))  # the task vectors: nothing uses them now
                if merged is not inputs[0]:
                    buffers.give(inputs[0])
                del inputs
                if written is not None:
                    written.result()  # at most one merged tensor waits to be written
                written = writing.submit(_write, writer, entry.name, merged, buffers)
                del merged
                if progress:
                    progress(done + 1, len(plan.entries), entry.name)
            if written is not None:
                written.result()
        writer.close()
        write_config(folder, plan.base.config, dtype)
        aux = copy_aux_files(plan.base.aux_dir, folder)
        report = build_report(plan, dtype, writer.files, aux, thresholds, stats,
                              time.perf_counter() - started)
        write_json(folder / REPORT_NAME, report)
    return report


def _write(writer: ShardedModelWriter, name: str, merged: torch.Tensor,
           buffers: Buffers) -> None:
    """Write one merged tensor (in the writing thread), then hand its memory back."""
    writer.write(name, merged)
    buffers.give(merged)
    buffers.tick()


# base tensor, experts' task vectors, what the experts know about them (core.known_parts)
Inputs = tuple[torch.Tensor, list[torch.Tensor] | None, list | None]


def _load_inputs(plan: MergePlan, entry: PlanEntry, pool: Executor | None = None,
                 device: torch.device | None = None, buffers: Buffers | None = None
                 ) -> Inputs:
    """The base tensor as stored (for "copy"), or float32 base and task vectors, on
    ``device`` (read on the CPU, into ``buffers``, then moved). The reads are not checked
    for NaN or Inf (but for ops blind to their inputs, :data:`core.BLIND_OPS`): the merged
    tensor is."""
    if entry.op == COPY:
        return plan.base.read(entry.name), None, None
    check = entry.op in core.BLIND_OPS
    base_tensor = core.read_float(plan.base, "base", entry.name, check=check, buffers=buffers)
    taus = core.task_vectors(plan.experts, entry.name, base_tensor,
                             pool.map if pool else map, check=check, buffers=buffers)
    known = core.known_parts(plan.experts, entry.name)
    if device is not None and device.type != "cpu":
        read = (base_tensor, *taus)
        base_tensor, taus = base_tensor.to(device), [t.to(device) for t in taus]
        known = None if known is None else [_known_on(k, device) for k in known]
        if buffers is not None:
            buffers.give(*read)  # copied to the device
        del read
    return base_tensor, taus, known


def _known_on(known: Known | None, device: torch.device) -> Known | None:
    if known is None or known.factors is None:
        return known
    return Known(tuple(t.to(device) for t in known.factors), known.pruned_with)


def _prefetched(plan: MergePlan, pool: Executor | None, device: torch.device | None = None,
                buffers: Buffers | None = None) -> Iterator[tuple[PlanEntry, Inputs]]:
    """Each entry with its inputs; with a pool, the next entry's are read meanwhile.

    A reader thread loads tensor k+1 (the experts' copies through the pool's workers) while
    tensor k is pruned, combined and written, so reads overlap computation; at most one extra
    tensor per expert is in memory.
    """
    if pool is None:
        for entry in plan.entries:
            yield entry, _load_inputs(plan, entry, device=device, buffers=buffers)
        return
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as reader:
        pending = (reader.submit(_load_inputs, plan, plan.entries[0], pool, device, buffers)
                   if plan.entries else None)
        for index, entry in enumerate(plan.entries):
            inputs = pending.result()
            if index + 1 < len(plan.entries):
                pending = reader.submit(_load_inputs, plan, plan.entries[index + 1], pool,
                                        device, buffers)
            yield entry, inputs


def _merge_one(plan: MergePlan, entry: PlanEntry, inputs: Inputs, dtype: torch.dtype,
               thresholds: list[float] | None, stats: Diagnostics | None,
               pool: Executor | None = None, buffers: Buffers | None = None) -> torch.Tensor:
    """The merged tensor ``entry``, cast to ``dtype``, on the CPU. Its inputs were read
    unchecked: when it is not finite, or the op fails, they are read again and checked, so
    that the error names the expert (or base) and tensor at fault; a merged tensor that is
    not finite from finite inputs is a MergeError (lambda or weights too large)."""
    base_tensor, taus, known = inputs
    if taus is None:
        return base_tensor
    record = None
    if stats is not None:  # a worker computes the diagnostics while the others prune
        args = (entry.name, layer_of(entry.name), entry.group, entry.op, taus, known)
        record = pool.submit(stats.add, *args) if pool is not None else stats.add(*args)
    try:
        delta, op_stats = core.merged_delta(entry, taus, plan.weights, plan.params,
                                            thresholds=thresholds, known=known,
                                            map=pool.map if pool is not None else map,
                                            workspace=buffers)
        merged = base_tensor.add_(delta)
        if buffers is not None:
            buffers.give(delta)  # workspace memory the op merged into, when it did
        del delta
        if dtype != merged.dtype:  # the cast .to(dtype) makes, into a reused buffer
            merged = (buffers.empty(merged.shape, dtype) if buffers is not None and
                      merged.device.type == "cpu" else torch.empty_like(merged, dtype=dtype)
                      ).copy_(merged)
        finite = core.all_finite(merged)
    except Exception:
        core.check_inputs(plan.base, plan.experts, entry.name)  # raises naming the input
        raise
    if not finite:
        core.check_inputs(plan.base, plan.experts, entry.name)
        core.check_finite(merged, entry.name, dtype)  # finite inputs: the merge's fault
    if record is not None:
        Diagnostics.attach(record.result() if pool is not None else record, op_stats)
    return merged.cpu()


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
