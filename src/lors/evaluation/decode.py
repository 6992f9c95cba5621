"""Batched Whisper decoding of manifest utterances with a forced language and task.

Two things make this faster than a plain ``pipeline("automatic-speech-recognition")`` loop:

* utterances are decoded in batches of similar duration (sorted longest first), and
* the encoder runs on a *short window* fitted to the clips (see :mod:`.window`).

Clips longer than the model's full window (30 s for Whisper) are never cut: they are
decoded long-form, transformers' sequential 30 s segments with timestamps, in batches of
their own.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..data.audio import SAMPLE_RATE, load_audio
from ..data.manifest import Utterance
from ..errors import LorsError
from .window import Window, encoder_window, window_for

TASKS: dict[str, str] = {"asr": "transcribe", "st": "translate"}
"""lors task name -> Whisper task token name (``<|transcribe|>``, ``<|translate|>``)."""

DEFAULT_MAX_NEW_TOKENS = 64
"""Cap on generated tokens per utterance: Whisper can loop on synthetic speech, and a batch
runs until its longest output ends. The longest sentence of the built-in bank (300 rows, all
eleven languages) is 27 Whisper base tokens, so 64 leaves ample room for correct output."""

_PROMPT_TOKENS = 4  # <|startoftranscript|> <|xx|> <|task|> <|notimestamps|>
_SHOWN_IDS = 5  # clip ids named in a message before "and N more"


def whisper_task(task: str) -> str:
    """The Whisper task name of lors ``task`` (``asr`` or ``st``); LorsError otherwise."""
    try:
        return TASKS[task]
    except KeyError:
        raise LorsError(f"unknown task {task!r}; choose from {', '.join(TASKS)}") from None


def reference(utt: Utterance, task: str) -> str | None:
    """The reference text of ``utt`` for ``task``: transcript for asr, translation for st."""
    whisper_task(task)
    return utt.transcript if task == "asr" else utt.translation


def check_references(utterances: Sequence[Utterance], task: str, source: str) -> None:
    """Raise LorsError naming the first utterance of ``source`` without a ``task`` reference."""
    for utt in utterances:
        text = reference(utt, task)
        if text is None or not text.strip():
            field = "transcript" if task == "asr" else "translation"
            raise LorsError(f"utterance {utt.id!r} in {source} has no {field}, which task "
                            f"{task!r} needs as reference; add it or evaluate another task")


def plan_batches(durations: Sequence[float], batch_size: int,
                 groups: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches of at most ``batch_size``, longest first, so batches hold similar lengths.

    With ``groups`` (one integer per clip, e.g. its encoder window) a batch never mixes
    groups; larger groups come first. The sort is stable: ties keep their input order.
    """
    if batch_size < 1:
        raise LorsError(f"batch size must be at least 1, got {batch_size}")
    keys = list(groups) if groups is not None else [0] * len(durations)
    order = sorted(range(len(durations)), key=lambda i: (-keys[i], -durations[i]))
    batches: list[list[int]] = []
    for index in order:
        if batches and len(batches[-1]) < batch_size and keys[batches[-1][0]] == keys[index]:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide transformers' progress bars and its warnings about settings made on purpose here
    (an explicit ``max_new_tokens`` beside the config's ``max_length``; no attention mask,
    which Whisper's encoder ignores and equal-length prompts do not need)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _restore_whisper_generation_fields(model, model_dir: Path) -> None:
    """Re-read ``generation_config.json`` if loading dropped Whisper's ``lang_to_id``.

    transformers 5 ignores every field beyond the standard ones of a generation config file
    flagged ``"_from_model_config": true`` (which ``save_pretrained`` writes for a model built
    from a bare config, as lors.tiny does), so ``lang_to_id``/``task_to_id`` vanish and
    language forcing breaks. Reading the file without the flag keeps them. An unreadable file
    is left alone: :meth:`Decoder.check` then reports the missing tokens.
    """
    if getattr(model.generation_config, "lang_to_id", None):
        return
    from transformers import GenerationConfig

    try:
        data = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
        data.pop("_from_model_config", None)
        model.generation_config = GenerationConfig.from_dict(data)
    except (OSError, ValueError, TypeError, AttributeError):
        return


def check_weights(model_dir: Path) -> None:
    """Open ``model_dir`` with lors' own checkpoint reader; CheckpointError if it is unfit.

    The reader needs a Whisper ``config.json``, checks every safetensors header against its
    file's size (a truncated download fails here, naming the file) and loads a
    ``pytorch_model.bin`` with ``weights_only=True``, refusing a pickle that needs code
    execution. Run before transformers sees the folder: its own errors are tracebacks or
    advise ``weights_only=False``, which would run that code.
    """
    from ..checkpoint.reader import open_checkpoint

    open_checkpoint(model_dir)


def clip_list(ids: Sequence[str]) -> str:
    """``ids`` quoted and comma-separated, at most :data:`_SHOWN_IDS` then "and N more"."""
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    rest = len(ids) - _SHOWN_IDS
    return f"{shown} and {rest} more" if rest > 0 else shown


class Decoder:
    """A Whisper model and processor loaded once, decoding utterances in batches."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        """Load ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` from ``model_dir``.

        Raises LorsError if the folder is missing or does not hold a Whisper model with its
        tokenizer and feature extractor (hub ids are not fetched), and CheckpointError from
        :func:`check_weights` for weights that are truncated, corrupt or unsafe to unpickle.
        """
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise LorsError(f"model {self.model_dir} is not a directory; pass a local Hugging "
                            "Face Whisper folder or 'base' (hub ids are not downloaded: fetch "
                            "the model first and pass its folder)")
        check_weights(self.model_dir)
        try:
            with _quiet():
                self.model, loading = WhisperForConditionalGeneration.from_pretrained(
                    self.model_dir, dtype=dtype, output_loading_info=True)
                self.processor = WhisperProcessor.from_pretrained(self.model_dir)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise LorsError(f"cannot load a Whisper model with tokenizer and feature extractor "
                            f"from {self.model_dir}: {exc}") from exc
        # transformers fills missing weights randomly: scoring such a model is meaningless
        missing = sorted(set(loading.get("missing_keys", ())) - {"proj_out.weight"})
        if missing or loading.get("mismatched_keys"):
            raise LorsError(f"{self.model_dir}: the weights do not fit its config: missing "
                            f"{len(missing)} tensor(s), e.g. {missing[:3]}, mismatched "
                            f"{list(loading.get('mismatched_keys') or [])[:3]}; re-save the "
                            "complete model (model.save_pretrained)")
        _restore_whisper_generation_fields(self.model, self.model_dir)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_model(cls, model, processor, name: str = "model") -> "Decoder":
        """A Decoder around an already loaded ``model`` and ``processor`` (e.g. during training)."""
        decoder = cls.__new__(cls)
        decoder.model, decoder.processor, decoder.model_dir = model, processor, Path(name)
        parameter = next(model.parameters())
        decoder.device, decoder.dtype = parameter.device, parameter.dtype
        model.eval()
        return decoder

    def check(self, language: str, task: str) -> None:
        """Raise LorsError unless the model can be forced to ``language`` and ``task``."""
        generation = self.model.generation_config
        token = f"<|{language}|>"
        known = getattr(generation, "lang_to_id", None) or {}
        if token not in known or token not in self.processor.tokenizer.get_vocab():
            have = ", ".join(sorted(t.strip("<|>") for t in known)) or "none"
            raise LorsError(f"model {self.model_dir} has no language token {token} in its "
                            f"generation config and tokenizer (it knows: {have}); evaluate "
                            "another language or use a multilingual Whisper")
        name = whisper_task(task)
        if name not in (getattr(generation, "task_to_id", None) or {}):
            raise LorsError(f"model {self.model_dir} has no <|{name}|> task token in its "
                            "generation config (task_to_id); it cannot be forced to "
                            f"{task!r}")

    def check_clips(self, utterances: Sequence[Utterance]) -> None:
        """Raise LorsError, naming the clips, if some need long-form decoding the model lacks.

        Clips whose manifest duration exceeds the full window are decoded long-form, which
        needs timestamp tokens: the generation config must name ``<|notimestamps|>``.
        """
        long = [u.id for u in utterances if self.is_long(round(u.duration * SAMPLE_RATE))]
        if long and getattr(self.model.generation_config, "no_timestamps_token_id", None) is None:
            raise LorsError(
                f"clip(s) {clip_list(long)} are longer than the {self._full().seconds:g} s "
                f"window of model {self.model_dir}, whose generation config has no "
                "no_timestamps_token_id for long-form decoding; split those clips or drop "
                "them from the manifest")

    def token_budget(self, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped so the prompt plus output fit ``max_target_positions``."""
        if max_new_tokens < 1:
            raise LorsError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return min(max_new_tokens, self.model.config.max_target_positions - _PROMPT_TOKENS)

    def segment_budget(self, max_new_tokens: int) -> int:
        """Tokens per segment of long-form decoding: :meth:`token_budget` of
        ``max_new_tokens``, but at least of half the decoder context (224 for Whisper, as
        OpenAI's decoder), since a full segment holds far more speech than one sentence and
        output cut short would make the decoder skip ahead."""
        half = self.model.config.max_target_positions // 2
        return max(self.token_budget(max_new_tokens), self.token_budget(half))

    def is_long(self, samples: int) -> bool:
        """Whether audio of ``samples`` samples exceeds the full window (long-form decoding)."""
        return samples > self._full().samples

    def decode(self, utterances: Sequence[Utterance], language: str, task: str, *,
               batch_size: int = 8, num_beams: int = 1,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               window_seconds: float | None = None, show_progress: bool = False) -> list[str]:
        """Decode ``utterances`` with ``language`` and ``task`` forced; hypotheses in input order.

        Each clip gets the encoder window :func:`window_for` gives its manifest duration, and
        batches (:func:`plan_batches`) only hold clips of one window, so a clip's result does
        not depend on the batch size or on the other clips. Should a clip's audio be longer
        than its duration says, its batch's window grows to fit it. Audio is never cut: a
        batch holding audio longer than the full window is decoded long-form (30 s segments
        with timestamps, which the hypotheses do not contain), and clips whose duration
        says so are batched apart from the others. Decoding is greedy for ``num_beams=1``,
        beam search otherwise, and stops after ``max_new_tokens`` tokens (capped by
        :meth:`token_budget`), per segment of long-form decoding at least
        :meth:`segment_budget`. Hypotheses are stripped of surrounding whitespace.
        """
        self.check(language, task)
        self.check_clips(utterances)
        if num_beams < 1:
            raise LorsError(f"num_beams must be at least 1, got {num_beams}")
        budgets = (self.token_budget(max_new_tokens), self.segment_budget(max_new_tokens))
        windows = [self._window(round(u.duration * SAMPLE_RATE), window_seconds) for u in utterances]
        batches = plan_batches([u.duration for u in utterances], batch_size,
                               [self._group(u, w) for u, w in zip(utterances, windows)])
        hypotheses: list[str] = [""] * len(utterances)
        for batch in tqdm(batches, desc=f"{language}/{task}", unit="batch", disable=not show_progress):
            texts = self._decode_batch([utterances[i] for i in batch], language, task,
                                       num_beams, budgets, windows[batch[0]], window_seconds)
            for index, text in zip(batch, texts):
                hypotheses[index] = text
        return hypotheses

    def _window(self, samples: int, window_seconds: float | None) -> Window:
        """:func:`window_for` with this model's full window and hop length."""
        return window_for(samples, window_seconds, self.model.config.max_source_positions,
                          self.processor.feature_extractor.hop_length)

    def _full(self) -> Window:
        """The model's full encoder window (30 s for Whisper)."""
        return Window(self.model.config.max_source_positions,
                      self.processor.feature_extractor.hop_length)

    def _group(self, utt: Utterance, window: Window) -> int:
        """Batch key of ``utt``: its window's positions, or one more than the full window's
        for a clip needing long-form decoding, so 30 s clips keep their one-pass decoding."""
        long = self.is_long(round(utt.duration * SAMPLE_RATE))
        return self._full().positions + 1 if long else window.positions

    def _features(self, audios: list, window: Window) -> torch.Tensor:
        """Log-mel features of ``audios`` padded to exactly ``window``'s frames (none is longer)."""
        extractor = self.processor.feature_extractor
        features = extractor(audios, sampling_rate=SAMPLE_RATE, max_length=window.samples,
                             padding="max_length", truncation=True,
                             return_tensors="pt").input_features
        return features.to(self.device, self.dtype)

    def _decode_batch(self, batch: list[Utterance], language: str, task: str, num_beams: int,
                      budgets: tuple[int, int], planned: Window,
                      window_seconds: float | None) -> list[str]:
        """Decode one batch, long-form if any audio exceeds the full window, else under its
        encoder window; texts in ``batch`` order. ``budgets``: (per clip, per segment)."""
        audios = [load_audio(utt.audio) for utt in batch]
        longest = max(len(audio) for audio in audios)
        if self.is_long(longest):
            ids = self._generate_long(audios, language, task, num_beams, budgets[1])
        else:
            window = max(planned, self._window(longest, window_seconds), key=lambda w: w.positions)
            features = self._features(audios, window)
            with torch.inference_mode(), encoder_window(self.model, window.positions), _quiet():
                ids = self.model.generate(input_features=features, language=f"<|{language}|>",
                                          task=TASKS[task], max_new_tokens=budgets[0],
                                          num_beams=num_beams, do_sample=False,
                                          return_timestamps=False)
        return self._texts(ids)

    def _generate_long(self, audios: list, language: str, task: str, num_beams: int,
                       max_new_tokens: int) -> torch.Tensor:
        """Token ids of transformers' sequential long-form decoding of uncut ``audios``.

        Features are padded to the longest clip only, with an attention mask telling
        ``generate`` where each clip ends; each 30 s segment is decoded with timestamps
        (how the next segment's start is found), greedily or by beam search, without
        temperature fallback or conditioning on the previous segment, so it is repeatable.
        """
        inputs = self.processor.feature_extractor(
            audios, sampling_rate=SAMPLE_RATE, truncation=False, padding="longest",
            return_attention_mask=True, return_tensors="pt")
        features = inputs.input_features.to(self.device, self.dtype)
        with torch.inference_mode(), _quiet():
            return self.model.generate(input_features=features,
                                       attention_mask=inputs.attention_mask.to(self.device),
                                       language=f"<|{language}|>", task=TASKS[task],
                                       max_new_tokens=max_new_tokens, num_beams=num_beams,
                                       do_sample=False, return_timestamps=True,
                                       condition_on_prev_tokens=False)

    def _texts(self, ids: torch.Tensor) -> list[str]:
        """Decoded ``ids`` without special or timestamp tokens, stripped of outer whitespace."""
        rows = ids.tolist()
        marker = getattr(self.model.generation_config, "no_timestamps_token_id", None)
        if marker is not None:  # timestamps follow <|notimestamps|>; some tokenizers lack them
            rows = [[token for token in row if token <= marker] for row in rows]
        texts = self.processor.batch_decode(rows, skip_special_tokens=True)
        return [text.strip() for text in texts]
