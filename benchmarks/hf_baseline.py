"""Reference side of the training-speed benchmark: the default Hugging Face Whisper recipe.

This is the usual community fine-tuning recipe for Whisper, kept deliberately plain so that
lors' own trainer can be compared against it:

* ``WhisperProcessor``; every clip's log-mel features are computed by the feature extractor
  with its defaults, i.e. padded (or cut) to its full window (30 s for real Whisper);
* labels are ``tokenizer(text).input_ids`` after ``tokenizer.set_prefix_tokens(language, task)``;
* a collator pads labels with -100 and strips a leading decoder-start token, since the model
  prepends it again when shifting labels right;
* ``Seq2SeqTrainer`` with ``Seq2SeqTrainingArguments`` (batch size, learning rate, max_steps,
  no evaluation, no checkpoints, no reporting, seed, no dataloader workers, logging every
  step, CPU only); everything else is left at its default.

Feature extraction happens lazily in a plain ``torch.utils.data.Dataset.__getitem__`` (the
recipe's ``dataset.map`` does the same work up front); it therefore falls inside the timed
training loop (``seconds``) but outside the per-step times (``step_seconds``, measured from
``on_step_begin`` to ``on_step_end``, which the Trainer calls after fetching the batch).

A tokenizer without a pad token gets ``<|endoftext|>`` (as on OpenAI's hub checkpoints).
Labels are cut to the model's ``max_target_positions`` (448 for real Whisper, so a no-op
there; the tiny test model holds only 40 positions).

Usage (quick check):
    python benchmarks/hf_baseline.py --model DIR --manifest FILE --language de --task asr --steps 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

WHISPER_TASKS = {"asr": "transcribe", "st": "translate"}


class _SpeechDataset(torch.utils.data.Dataset):
    """Utterances → {"input_features", "labels"}, computed on access."""

    def __init__(self, utterances: list, processor: Any, task: str, max_label_length: int):
        self.utterances = list(utterances)
        self.processor = processor
        self.task = task
        self.max_label_length = max_label_length

    def __len__(self) -> int:
        return len(self.utterances)

    def _text(self, utt: Any) -> str:
        text = utt.transcript if self.task == "asr" else utt.translation
        if text is None:
            raise ValueError(f"utterance {utt.id!r} has no {'translation' if self.task == 'st' else 'transcript'}")
        return text

    def __getitem__(self, index: int) -> dict:
        from lors.data.audio import load_audio

        utt = self.utterances[index]
        extractor = self.processor.feature_extractor
        audio = load_audio(utt.audio)
        features = extractor(audio, sampling_rate=extractor.sampling_rate).input_features[0]
        labels = self.processor.tokenizer(self._text(utt)).input_ids[: self.max_label_length]
        return {"input_features": features, "labels": labels}


class _Collator:
    """Stack the (fixed-size) features; pad labels with -100; drop a leading start token."""

    def __init__(self, processor: Any, decoder_start_token_id: int):
        self.processor = processor
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = self.processor.feature_extractor.pad(
            [{"input_features": f["input_features"]} for f in features], return_tensors="pt")
        labels_batch = self.processor.tokenizer.pad(
            [{"input_ids": f["labels"]} for f in features], return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch["attention_mask"].ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self._start: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.step_seconds.append(time.perf_counter() - self._start)
                self._start = None

    return StepTimer()


def _samples_seen(n: int, batch_size: int, steps: int) -> int:
    """Samples consumed by ``steps`` batches over repeated epochs of ``n`` (last batch short)."""
    per_epoch = math.ceil(n / batch_size)
    return sum(min(batch_size, n - (i % per_epoch) * batch_size) for i in range(steps))


def _check_prefix(tokenizer: Any, language: str) -> None:
    """Warn when the tokenizer's computed language token is not ``<|language|>``.

    ``WhisperTokenizer.prefix_tokens`` derives the language id arithmetically from the
    start-of-transcript id and the order of Whisper's full language table, which only holds
    for tokenizers with the full OpenAI vocabulary layout.
    """
    expected = tokenizer.convert_tokens_to_ids(f"<|{language}|>")
    prefix = tokenizer.prefix_tokens
    if len(prefix) > 1 and prefix[1] != expected:
        got = tokenizer.convert_ids_to_tokens(prefix[1])
        warnings.warn(f"set_prefix_tokens(language={language!r}) gives {got!r} (id {prefix[1]}), "
                      f"not <|{language}|> (id {expected}); this tokenizer does not follow "
                      "Whisper's language-token layout", stacklevel=2)


def run_hf_baseline(model_dir: str, utterances: list, language: str, task: str, *, steps: int,
                    batch_size: int = 8, learning_rate: float = 1e-5, seed: int = 0,
                    out_dir: str | None = None) -> dict:
    """Fine-tune with Seq2SeqTrainer; return timing and loss.

    Returns {"samples": int, "seconds": float (train loop wall time, model loading
    excluded), "step_seconds": [per-step wall times], "samples_per_second": float,
    "final_loss": float}; if ``out_dir``, the trained model and processor are saved there.
    """
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments,
                              WhisperForConditionalGeneration, WhisperProcessor)

    if task not in WHISPER_TASKS:
        raise ValueError(f"task must be one of {sorted(WHISPER_TASKS)}, got {task!r}")
    if not utterances:
        raise ValueError("no utterances to train on")

    processor = WhisperProcessor.from_pretrained(model_dir)
    if processor.tokenizer.pad_token is None:
        # OpenAI's hub checkpoints declare <|endoftext|> as pad token; some converted ones
        # omit it. The padded label positions become -100, so the choice does not matter.
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    processor.tokenizer.set_prefix_tokens(language=language, task=WHISPER_TASKS[task])
    _check_prefix(processor.tokenizer, language)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir)
    if hasattr(model.generation_config, "forced_decoder_ids"):
        model.generation_config.forced_decoder_ids = None

    dataset = _SpeechDataset(utterances, processor, task, model.config.max_target_positions)
    collator = _Collator(processor, model.config.decoder_start_token_id)
    timer = _step_timer()

    with tempfile.TemporaryDirectory(prefix="hf-baseline-") as scratch:
        args = Seq2SeqTrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            max_steps=steps,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            seed=seed,
            dataloader_num_workers=0,
            logging_steps=1,
            use_cpu=True,
        )
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset,
                                 data_collator=collator,
                                 processing_class=processor.feature_extractor,
                                 callbacks=[timer])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    samples = _samples_seen(len(dataset), batch_size, trainer.state.global_step)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return {
        "samples": samples,
        "seconds": seconds,
        "step_seconds": timer.step_seconds,
        "samples_per_second": samples / seconds if seconds > 0 else float("nan"),
        "final_loss": float(losses[-1]) if losses else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    from lors.data.manifest import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Whisper model directory (HF format)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest; its train split is used")
    parser.add_argument("--language", required=True)
    parser.add_argument("--task", choices=sorted(WHISPER_TASKS), default="asr")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the trained model and processor here")
    args = parser.parse_args(argv)

    utterances = [u for u in read_manifest(args.manifest)
                  if u.split == "train" and u.language == args.language]
    if not utterances:
        print(f"no train utterances for {args.language!r} in {args.manifest}", file=sys.stderr)
        return 1
    result = run_hf_baseline(args.model, utterances, args.language, args.task, steps=args.steps,
                             batch_size=args.batch_size, learning_rate=args.learning_rate,
                             seed=args.seed, out_dir=args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
