"""``train``: experts, the multi-task multi-lingual model, and sequential training.

Every check on the inputs (pairs, manifest, audio, references, durations, language tokens,
the output path) runs before a model is loaded or a step is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..base import default_cache_dir, resolve_model_reference
from ..data.manifest import Utterance, read_manifest
from ..errors import LorsError
from ..fsutil import check_output_free, publish
from .config import TrainConfig
from .data import PairData, Selection, select
from .loop import StepHook, train_stage


def default_speech(languages: list[str], show_progress: bool = True,
                   augment=None) -> Path:
    """The embedded default speech: the sentence bank rendered by espeak-ng (train, dev,
    test splits) into the lors cache; returns its manifest. ``augment`` (None, an
    ``Augmentation`` or a mapping like ``{"noise_snr": [5, 20], "reverb_rt60": [0.2, 0.8]}``)
    degrades it; degraded speech gets its own folder, named after the settings."""
    from ..data.synth import Augmentation, synthesize

    augment = Augmentation.coerce(augment)
    folder = default_cache_dir() / "speech" / ("-".join(sorted(set(languages))) + augment.suffix)
    return synthesize(sorted(set(languages)), ["train", "dev", "test"], folder,
                      show_progress=show_progress, augment=augment)


def check_base_knows(base_dir: Path, pairs: list[tuple[str, str]]) -> None:
    """LorsError unless the base's tokenizer and generation config have every language and
    task token the pairs need (read without loading the model)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(base_dir).get_vocab()
    try:
        data = json.loads((base_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        data = {}
    languages = data.get("lang_to_id") or {}
    for language, task in pairs:
        token = f"<|{language}|>"
        if token not in vocab or (languages and token not in languages):
            known = sorted(t.strip("<|>") for t in languages) or ["none"]
            raise LorsError(f"the base {base_dir} has no language token {token}; it knows "
                            f"{', '.join(known)}. Train another language or use a "
                            "multilingual Whisper")
        whisper_task = "transcribe" if task == "asr" else "translate"
        if f"<|{whisper_task}|>" not in vocab:
            raise LorsError(f"the base {base_dir} has no <|{whisper_task}|> token for {task}")


_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE")
"""Where launchers (torchrun / accelerate launch, MPI) put the number of processes."""


def _launched_processes() -> int:
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def _has_accelerator_device() -> bool:
    import torch

    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _accelerator(config: TrainConfig):
    """The Accelerator of a run: one process, or every process a launcher started.

    ``mixed_precision`` None takes the launcher's (``accelerate launch --mixed_precision``,
    else no). Several processes on a machine without a GPU run on the CPU (gloo) even without
    ``--cpu``: accelerate would otherwise treat each as a separate single-process run.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    launched = _launched_processes()
    cpu = bool(config.cpu) or (launched > 1 and not _has_accelerator_device())
    # The global batch of a step is split across processes, so the schedule advances once per
    # optimizer step, not once per process (accelerate's default for per-process batches).
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision,
                              step_scheduler_with_optimizer=False)
    if accelerator.num_processes != launched:
        raise LorsError(f"the launcher started {launched} processes but accelerate sees "
                        f"{accelerator.num_processes} ({accelerator.distributed_type}); each "
                        "would train alone and write the same output. Launch with torchrun or "
                        "accelerate launch --multi_gpu (see docs/distributed-training.md)")
    if (launched == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
            and os.environ.get("MASTER_PORT")):
        print("lors: note: this is one process; `accelerate launch --cpu --num_processes N` "
              "starts only one without --mpirun_hostfile. For N CPU processes use "
              "`accelerate launch --multi_gpu --num_processes N ... lors train --cpu` or "
              "torchrun (see docs/distributed-training.md)", file=sys.stderr)
    if config.batch_size < accelerator.num_processes:
        raise LorsError(f"batch_size {config.batch_size} is the global batch, split across "
                        f"the {accelerator.num_processes} processes; it must be at least "
                        f"{accelerator.num_processes}")
    set_seed(config.seed)
    return accelerator


def prepare(config: TrainConfig,
            utterances: list[Utterance] | None = None) -> tuple[Path, Selection]:
    """Resolve the base and the data and run every input check; nothing is trained."""
    out = Path(config.out)
    check_output_free(out, config.force)
    base_dir = Path(resolve_model_reference(config.base))
    if not (base_dir / "config.json").is_file():
        raise LorsError(f"base {base_dir} is not a Hugging Face Whisper folder (no config.json)")
    check_base_knows(base_dir, config.pairs)
    if utterances is None:
        manifest = config.manifest or default_speech([l for l, _ in config.pairs],
                                                     config.show_progress)
        utterances, source = read_manifest(manifest), str(manifest)
    else:
        source = "the given utterances"
    selection = select(utterances, config.pairs, source, limit=config.limit,
                       dev_limit=config.dev_limit,
                       max_missing_fraction=config.max_missing_fraction)
    return base_dir, selection


def train(config: TrainConfig, utterances: list[Utterance] | None = None,
          on_step: StepHook | None = None) -> dict:
    """Train what ``config`` asks for and write it to ``config.out``; return the summary.

    One pair: an expert. Several: the MTL model with balanced sampling, or with
    ``sequential`` one model per pair in turn, each stage saved under ``out/stages`` and the
    last stage's model at ``out`` itself. ``utterances`` overrides the manifest.

    Under ``accelerate launch`` or ``torchrun`` every process calls this; ``batch_size`` is
    the global batch, split across them, and only the main process writes (see
    docs/distributed-training.md).
    """
    accelerator = _accelerator(config)
    # the main process first: it may render the default speech or convert the embedded base
    # into the cache, which the other processes then only read
    with accelerator.main_process_first():
        base_dir, selection = prepare(config, utterances)
    if selection.missing_audio and accelerator.is_main_process:
        print(f"lors: skipped {len(selection.missing_audio)} utterances with missing audio "
              f"(first: {selection.missing_audio[0]})")
    out = Path(config.out)
    if not config.sequential:
        summary = train_stage(config, accelerator, base_dir, selection.pairs, out,
                              on_step=on_step)
        summary["skipped_missing_audio"] = len(selection.missing_audio)
        return summary
    return _train_sequential(config, accelerator, base_dir, selection.pairs, out, on_step)


def _train_sequential(config, accelerator, base_dir: Path, pairs: list[PairData], out: Path,
                      on_step) -> dict:
    """Stage k starts from stage k-1's best model; finished stages are skipped on re-run.
    Each stage has its own step budget, plateau counter and best step (on its own pair's
    dev set); its dev evaluations also score the pairs of the stages before it."""
    work = out.with_name(out.name + ".partial")
    stages_dir = work / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    previous, summaries = base_dir, []
    for index, pair in enumerate(pairs, start=1):
        stage_out = stages_dir / f"{index:02d}-{pair.name}"
        if (stage_out / "training.json").is_file():
            summary = json.loads((stage_out / "training.json").read_text())
        else:
            summary = train_stage(config.model_copy(update={"force": False}), accelerator,
                                  previous, [pair], stage_out, stage=f"{index}/{len(pairs)} "
                                  f"{pair.name}", on_step=on_step, seen=pairs[:index - 1])
        summaries.append(summary)
        previous = stage_out
    if accelerator.is_main_process:
        for path in previous.iterdir():
            if path.is_file():
                _link_or_copy(path, work / path.name)
        total = {"sequential": True, "pairs": [[p.language, p.task] for p in pairs],
                 "stages": summaries, "mode": config.mode,
                 "train_seconds": sum(s["train_seconds"] for s in summaries),
                 "samples": sum(s["samples"] for s in summaries),
                 "steps": sum(s["steps"] for s in summaries),
                 "stopped_early": any(s["stopped_early"] for s in summaries),
                 "select": config.select, **_joined_curves(summaries)}
        (work / "training.json").write_text(json.dumps(total, indent=2))
        publish(work, out, force=config.force)
    accelerator.wait_for_everyone()
    return json.loads((out / "training.json").read_text())


def _joined_curves(summaries: list[dict]) -> dict:
    """The stages' dev curves on one axis of steps since the first stage began:
    ``dev_curve`` (each stage on its own pair) and ``dev_seen_curve`` (on every pair seen so
    far; the first stage's own curve stands for it)."""
    own, seen, offset = [], [], 0
    for summary in summaries:
        own += [[offset + step, score] for step, score in summary["dev_curve"]]
        seen += [[offset + step, score] for step, score
                 in summary.get("dev_seen_curve") or summary["dev_curve"]]
        offset += summary["steps"]
    return {"dev_curve": own, "dev_seen_curve": seen}


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` (no extra disk for the final model), copying across devices."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
