"""One training run (an expert, the MTL model, or one sequential stage), resumable.

Data path: selected utterances -> prompts/labels -> deterministic balanced batches -> features
on each batch's short encoder window (or cached encoder outputs) -> AdamW with warmup and
linear decay, through accelerate (one CPU process, or several processes under
``accelerate launch`` / ``torchrun``) -> dev metric at the scheduled evaluations -> best
weights (stopping early on a dev plateau with ``patience``) -> a standard Whisper folder.

Several processes (data parallel, see docs/distributed-training.md): ``batch_size`` is the
global batch of an optimizer step. Every process computes the same plan of global batches and
takes its own slice of each (process k: items k, k + N, k + 2N, ... of N processes); its loss
is its share of the global batch's summed token loss, divided by the global batch's label
tokens and multiplied by N, so the gradient averaged by DistributedDataParallel is exactly
the single-process gradient of the global batch. The data order, the steps, the learning
rate schedule and the result therefore do not depend on the number of processes (up to
float rounding). Dev evaluation runs on every process and the main process's scores are
broadcast, so the best step and the plateau decision are the same everywhere; only the main
process writes the log, best weights and the model, and checkpoints are shared.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutput

from ..data.audio import SAMPLE_RATE
from ..data.manifest import Utterance
from ..errors import LorsError
from ..evaluation.window import encoder_window
from ..fsutil import publish
from . import checkpoints, schedule
from .batching import collate, tokenize_pairs
from .config import TrainConfig
from .data import PairData
from .dev import mean_score, pair_dev_scores
from .inputs import cached_encoder_outputs, clip_features, clip_positions, fit_window
from .modes import export_model, load_whisper, prepare_model, trainable_state
from .prompts import IGNORE_INDEX

StepHook = Callable[[int, dict], None]
"""Called after every optimizer step with (steps done, the step's log record)."""


def _warmup_linear(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class _JsonlLog:
    """Append-only JSONL log; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def train_stage(config: TrainConfig, accelerator, base_dir: Path, pairs: list[PairData],
                out: Path, stage: str = "", on_step: StepHook | None = None,
                seen: Sequence[PairData] = ()) -> dict:
    """Train from ``base_dir`` on ``pairs`` and write the best model to ``out``.

    Work happens in ``<out>.partial``; a re-run with the same settings resumes from its
    newest checkpoint (the plateau counter and the dev curve included), and ``out`` appears
    (published) only once complete. ``seen``: pairs trained on before (a sequential run's
    earlier stages); their dev sets are scored too at every dev evaluation and logged with
    the score over all pairs seen so far, while the best step and plateau stopping follow
    ``pairs``' own dev score. Returns the summary also written to ``out/training.json``.
    """
    work = out.with_name(out.name + ".partial")
    whisper, processor = load_whisper(base_dir)
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    full, hop = whisper.config.max_source_positions, extractor.hop_length
    examples = tokenize_pairs(tokenizer, pairs, whisper.config.max_target_positions)
    earlier = [PairData(p.language, p.task, [], p.dev) for p in seen]
    earlier_examples = tokenize_pairs(tokenizer, earlier, whisper.config.max_target_positions)
    sizes = [len(p.train) for p in examples]
    steps = config.max_steps or schedule.steps_for_epochs(sizes, config.epochs, config.batch_size)
    evaluations = set(schedule.evaluation_steps(steps, config.eval_every, config.eval_times))
    fingerprint = config.fingerprint(base=str(base_dir), stage=stage, steps=steps,
                                     data=[p.train_ids + p.dev_ids for p in examples],
                                     precision=accelerator.mixed_precision)
    _claim_work_dir(work, fingerprint, config.force, accelerator)
    show = config.show_progress and accelerator.is_local_main_process

    plan = schedule.batches(sizes, config.seed, steps, config.batch_size)
    # one encoder window per (global) batch: evaluation's window for its longest clip
    windows = [clip_positions([pairs[p].train[i] for p, i in batch], full, hop) for batch in plan]
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [batch[rank::world] for batch in plan]  # this process's slice of every batch
    # label tokens of every global batch: each process divides its summed loss by these
    tokens = [sum(_label_tokens(examples[p].train[i]) for p, i in batch) for batch in plan]
    cached = config.mode == "freeze-encoder"
    cache = None
    if cached:
        cache = Path(config.cache_dir) if config.cache_dir else _default_cache()
        cache = cache / "encoder-outputs"
        whisper.to(accelerator.device)
    inputs = _Inputs(extractor, whisper, pairs, earlier, mine, windows, full, cache, show)

    model = prepare_model(whisper, config.mode, config.lora_rank, config.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_fraction * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_linear(warmup, steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = {"step": 0, "best_score": None, "best_step": None, "train_seconds": 0.0,
             "samples": 0, "best_pairs": None, "evals_without_improvement": 0,
             "dev_curve": [], "dev_seen_curve": [], "stopped_early": False,
             "process_samples": [0] * world}
    latest = checkpoints.latest_checkpoint(work / "checkpoints")
    if latest is not None:
        state.update(checkpoints.load_checkpoint(accelerator, latest))
    # examples this process has trained on (restored from the checkpoint; recomputed from the
    # plan when the checkpoint was written by another number of processes)
    counted = state.get("process_samples") or []
    my_samples = (counted[rank] if len(counted) == world
                  else sum(len(batch) for batch in mine[:state["step"]]))
    log = _JsonlLog(work / "train_log.jsonl", state["step"], accelerator.is_main_process)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metric = config.select.replace("-", "_")

    def batch_for(step: int) -> dict:
        chosen = [(examples[p].train_ids[i], examples[p].train[i]) for p, i in mine[step]]
        batch = collate([inputs.train(uid, windows[step]) for uid, _ in chosen],
                        [e for _, e in chosen], pad_id)
        batch["positions"] = windows[step]
        return batch

    def summed_loss(batch: dict) -> torch.Tensor:
        """This process's summed token cross-entropy (float32) on its slice of a batch."""
        device = accelerator.device
        decoder = batch["decoder_input_ids"].to(device)
        if cached:
            hidden = batch["inputs"].to(device)
            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                           decoder_input_ids=decoder).logits
        else:
            with encoder_window(whisper, batch["positions"]):
                logits = model(input_features=batch["inputs"].to(device),
                               decoder_input_ids=decoder).logits
        labels = batch["labels"].to(device)
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")

    def scores(examples_, pairs_) -> dict[str, float | None]:
        """Dev scores, computed on every process; the main process's are used everywhere,
        so every process takes the same best-step and stopping decisions."""
        local = pair_dev_scores(config.select, accelerator.unwrap_model(model), whisper,
                                processor, examples_, inputs.dev, pairs_, cached, pad_id,
                                accelerator.device)
        return broadcast_object_list([local])[0] if world > 1 else local

    best, best_info = None, None  # a best-so-far snapshot not yet on disk
    bar = tqdm(total=steps, initial=state["step"], desc=f"train {stage}".strip(), unit="step",
               disable=not show, dynamic_ncols=True)
    while state["step"] < steps:
        step = state["step"]
        model.train()
        batch = batch_for(step)
        started = time.perf_counter()
        summed = summed_loss(batch)
        # DDP averages gradients over processes: scaled by ``world``, the average is the
        # gradient of the global batch's mean token loss
        accelerator.backward(summed * (world / tokens[step]))
        my_samples += len(mine[step])
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        samples = len(plan[step])
        state.update(step=step + 1, train_seconds=state["train_seconds"] + seconds,
                     samples=state["samples"] + samples)
        loss = summed.detach()
        if world > 1:
            loss = accelerator.reduce(loss, reduction="sum")
        loss = loss.item() / tokens[step]  # the global batch's mean token loss
        record = {"step": step + 1, "loss": round(loss, 6),
                  "lr": scheduler.get_last_lr()[0], "samples_per_second": samples / seconds,
                  "step_seconds": seconds, "encoder_positions": windows[step], "stage": stage}
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{samples / seconds:.1f}")
        bar.update(1)
        done, stop = state["step"], False
        if done in evaluations:
            own = scores(examples, pairs)
            score = mean_score(own.values())
            dev = {"step": done, "dev_" + metric: score, "dev_pairs": own}
            state["dev_curve"].append([done, score])
            if earlier_examples:  # judged on every pair seen so far too (logged only)
                everything = {**scores(earlier_examples, earlier), **own}
                seen_score = mean_score(everything.values())
                dev.update({"dev_seen_" + metric: seen_score, "dev_seen_pairs": everything})
                state["dev_seen_curve"].append([done, seen_score])
            improved = score is not None and (state["best_score"] is None
                                              or score > state["best_score"])
            if improved or (score is None and done == steps):
                state.update(best_score=score, best_step=done, best_pairs=own)
                # kept in memory (by the main process, which alone writes it); written to
                # disk only with the next checkpoint (below)
                if accelerator.is_main_process:
                    best = trainable_state(accelerator.unwrap_model(model))
                best_info = {"step": done, "score": score, "metric": config.select}
            if improved:
                state["evals_without_improvement"] = 0
            elif score is not None:
                state["evals_without_improvement"] += 1
            stop = (config.patience is not None and done < steps
                    and state["evals_without_improvement"] >= config.patience)
            state["stopped_early"] = stop
            dev.update(best_step=state["best_step"],
                       evals_without_improvement=state["evals_without_improvement"])
            log.write(dev)
        saving = done % config.save_every == 0 if config.save_every else done in evaluations
        if saving and done < steps and not stop:
            if best is not None and accelerator.is_main_process:
                checkpoints.save_best(work, best, best_info)  # before the checkpoint naming it
                best = None
            state["process_samples"] = _gathered(accelerator, my_samples)
            checkpoints.save_checkpoint(accelerator, work / "checkpoints", done, state)
        if on_step is not None:
            on_step(done, record)
        if stop:
            break
    bar.close()
    state["process_samples"] = _gathered(accelerator, my_samples)
    return _finish(config, accelerator, model, base_dir, work, out, state, steps,
                   windows[:state["step"]], inputs.dev_windows, hop, pairs, stage, best)


def _label_tokens(example) -> int:
    return sum(1 for label in example.labels if label != IGNORE_INDEX)


def _gathered(accelerator, count: int) -> list[int]:
    """``count`` of every process, in process order (all processes must call this)."""
    if accelerator.num_processes == 1:
        return [count]
    value = torch.tensor([count], dtype=torch.long, device=accelerator.device)
    return [int(v) for v in accelerator.gather(value).cpu().tolist()]


class _Inputs:
    """The model inputs of a run: every train clip on the windows of the batches it is in,
    every dev clip on its own window (as evaluation decodes it).

    Log-mel features are computed once per clip on its own window and padded to a batch's
    window when asked (exact, see :func:`fit_window`); with the encoder frozen, its outputs
    are computed (or read from the disk cache) once per clip and window.
    """

    def __init__(self, extractor, whisper, pairs: list[PairData], earlier: list[PairData],
                 plan: list, windows: list[int], full: int, cache: Path | None,
                 show: bool) -> None:
        """``plan``: the (pair, example) items of each step this process trains on (its
        slice of the global batches); only those train clips are prepared."""
        hop = extractor.hop_length
        dev = {u.id: u for p in pairs + earlier for u in p.dev}
        self.own = {uid: clip_positions([u], full, hop) for uid, u in dev.items()}
        self.dev_windows = sorted(set(self.own.values()))
        self.encoded: dict[tuple[str, int], torch.Tensor] | None = None
        if cache is None:
            train = {pairs[p].train[i].id: pairs[p].train[i] for batch in plan for p, i in batch}
            utterances = train | dev
            self.features = clip_features(extractor, list(utterances.values()), full, show)
            self.dev = {uid: self.features[uid] for uid in dev}
            return
        needed: dict[int, dict[str, Utterance]] = {}
        for batch, window in zip(plan, windows):
            for p, i in batch:
                needed.setdefault(window, {})[pairs[p].train[i].id] = pairs[p].train[i]
        for uid, utt in dev.items():
            needed.setdefault(self.own[uid], {})[uid] = utt
        self.encoded = {}
        for window, group in sorted(needed.items()):
            outputs = cached_encoder_outputs(whisper, extractor, list(group.values()), window,
                                             cache, show_progress=show)
            self.encoded.update({(uid, window): value for uid, value in outputs.items()})
        self.dev = {uid: self.encoded[(uid, self.own[uid])] for uid in dev}

    def train(self, uid: str, window: int) -> torch.Tensor:
        """The input of train clip ``uid`` in a batch of encoder window ``window``."""
        if self.encoded is not None:
            return self.encoded[(uid, window)]
        return fit_window(self.features[uid], window)


def _finish(config, accelerator, model, base_dir, work, out, state, steps, batch_windows,
            dev_windows, hop_length, pairs, stage, best) -> dict:
    """Load the best weights (in memory, else the last saved), export the model into
    ``work/model`` and publish it at ``out`` (an existing one, under --force, is deleted only
    once the new one is in place). ``batch_windows``: the encoder window of every step taken;
    ``dev_windows``: those of the dev clips."""
    accelerator.wait_for_everyone()  # every process is done with the last step
    positions = max(batch_windows + dev_windows)
    seconds: dict[str, int] = {}  # steps per window length
    for window in batch_windows:
        key = f"{2 * window * hop_length / SAMPLE_RATE:g}"
        seconds[key] = seconds.get(key, 0) + 1
    summary = {"stage": stage, "pairs": [[p.language, p.task] for p in pairs],
               "mode": config.mode, "steps": state["step"], "max_steps": steps,
               "stopped_early": state["stopped_early"], "patience": config.patience,
               "best_step": state["best_step"], "best_dev_score": state["best_score"],
               "best_dev_pairs": state["best_pairs"], "select": config.select,
               "dev_curve": state["dev_curve"], "samples": state["samples"],
               "train_seconds": round(state["train_seconds"], 3),
               "samples_per_second": state["samples"] / max(state["train_seconds"], 1e-9),
               "window_seconds": 2 * positions * hop_length / SAMPLE_RATE,
               "encoder_positions": positions, "batch_windows_seconds": seconds,
               "base": str(base_dir), "seed": config.seed,
               "learning_rate": config.lr, "batch_size": config.batch_size,
               "mixed_precision": accelerator.mixed_precision,
               "train_utterances": {f"{p.language}-{p.task}": len(p.train) for p in pairs},
               "dev_utterances": {f"{p.language}-{p.task}": len(p.dev) for p in pairs},
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "device": str(accelerator.device), "processes": accelerator.num_processes,
               # the global batch split: examples per process in a full batch, and examples
               # each process trained on (counted by each process itself)
               "process_batch": [len(range(k, config.batch_size, accelerator.num_processes))
                                 for k in range(accelerator.num_processes)],
               "process_samples": state["process_samples"]}
    if state["dev_seen_curve"]:
        summary["dev_seen_curve"] = state["dev_seen_curve"]
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if accelerator.is_main_process:  # the only writer; the others wait at the barrier below
        unwrapped = accelerator.unwrap_model(model)
        best = best if best is not None else checkpoints.load_best(work)
        if best is not None:
            unwrapped.load_state_dict(best, strict=False)
        folder = work / "model"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        summary["files"] = export_model(unwrapped, config.mode, base_dir, folder)
        (folder / "training.json").write_text(json.dumps(summary, indent=2))
        shutil.copy2(work / "train_log.jsonl", folder / "train_log.jsonl")
        publish(folder, out, force=config.force)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    # forget this stage's model and optimizer, so the next sequential stage's checkpoints
    # hold only its own (a resumed stage registers exactly one of each)
    accelerator.free_memory()
    return summary


def _claim_work_dir(work: Path, fingerprint: str, force: bool, accelerator) -> None:
    """Create ``work`` or reuse it when it holds an interrupted run of the same settings."""
    marker = work / "run.json"
    if accelerator.is_main_process:
        if marker.is_file():
            previous = json.loads(marker.read_text()).get("fingerprint")
            if previous != fingerprint:
                if not force:
                    raise LorsError(f"{work} holds an interrupted run with other settings; "
                                    "delete it, or pass --force to discard it and start over")
                shutil.rmtree(work)
        elif work.exists() and any(work.iterdir()):
            if not force:
                raise LorsError(f"{work} exists but is not a lors training run; delete it or "
                                "choose another --out")
            shutil.rmtree(work)
        (work / "checkpoints").mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": fingerprint}))
    accelerator.wait_for_everyone()


def _default_cache() -> Path:
    from ..base import default_cache_dir

    return default_cache_dir()
