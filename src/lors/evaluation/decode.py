"""Batched Whisper decoding of manifest utterances with a forced language and task.

Two things make this faster than a plain ``pipeline("automatic-speech-recognition")`` loop:

* utterances are decoded in batches of similar duration (sorted longest first), and
* the encoder runs on a *short window* fitted to the clips (see :mod:`.window`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
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


class Decoder:
    """A Whisper model and processor loaded once, decoding utterances in batches."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        """Load ``WhisperForConditionalGeneration`` and ``WhisperProcessor`` from ``model_dir``.

        Raises LorsError if the folder is missing or does not hold a Whisper model with its
        tokenizer and feature extractor.
        """
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise LorsError(f"model {self.model_dir} is not a directory; pass a Hugging Face "
                            "Whisper folder or 'base'")
        try:
            with _quiet():
                self.model = WhisperForConditionalGeneration.from_pretrained(self.model_dir,
                                                                             dtype=dtype)
                self.processor = WhisperProcessor.from_pretrained(self.model_dir)
        except (OSError, ValueError, TypeError) as exc:
            raise LorsError(f"cannot load a Whisper model with tokenizer and feature extractor "
                            f"from {self.model_dir}: {exc}") from exc
        _restore_whisper_generation_fields(self.model, self.model_dir)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self._warned_cut = False

    @classmethod
    def from_model(cls, model, processor, name: str = "model") -> "Decoder":
        """A Decoder around an already loaded ``model`` and ``processor`` (e.g. during training)."""
        decoder = cls.__new__(cls)
        decoder.model, decoder.processor, decoder.model_dir = model, processor, Path(name)
        parameter = next(model.parameters())
        decoder.device, decoder.dtype = parameter.device, parameter.dtype
        decoder._warned_cut = False
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

    def token_budget(self, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped so the prompt plus output fit ``max_target_positions``."""
        if max_new_tokens < 1:
            raise LorsError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return min(max_new_tokens, self.model.config.max_target_positions - _PROMPT_TOKENS)

    def decode(self, utterances: Sequence[Utterance], language: str, task: str, *,
               batch_size: int = 8, num_beams: int = 1,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               window_seconds: float | None = None, show_progress: bool = False) -> list[str]:
        """Decode ``utterances`` with ``language`` and ``task`` forced; hypotheses in input order.

        Each clip gets the encoder window :func:`window_for` gives its manifest duration, and
        batches (:func:`plan_batches`) only hold clips of one window, so a clip's result does
        not depend on the batch size or on the other clips. Should a clip's audio be longer
        than its duration says, its batch's window grows to fit it. Audio longer than an
        explicit or the full window is cut at the window's end (warned once). Decoding is
        greedy for ``num_beams=1``, beam search otherwise, and stops after
        ``max_new_tokens`` tokens (capped by :meth:`token_budget`). Hypotheses are stripped
        of surrounding whitespace.
        """
        self.check(language, task)
        if num_beams < 1:
            raise LorsError(f"num_beams must be at least 1, got {num_beams}")
        budget = self.token_budget(max_new_tokens)
        windows = [self._window(round(u.duration * SAMPLE_RATE), window_seconds) for u in utterances]
        batches = plan_batches([u.duration for u in utterances], batch_size,
                               [w.positions for w in windows])
        hypotheses: list[str] = [""] * len(utterances)
        for batch in tqdm(batches, desc=f"{language}/{task}", unit="batch", disable=not show_progress):
            texts = self._decode_batch([utterances[i] for i in batch], language, task,
                                       num_beams, budget, windows[batch[0]], window_seconds)
            for index, text in zip(batch, texts):
                hypotheses[index] = text
        return hypotheses

    def _window(self, samples: int, window_seconds: float | None) -> Window:
        """:func:`window_for` with this model's full window and hop length."""
        return window_for(samples, window_seconds, self.model.config.max_source_positions,
                          self.processor.feature_extractor.hop_length)

    def _features(self, audios: list, window: Window) -> torch.Tensor:
        """Log-mel features of ``audios`` padded (or cut) to exactly ``window``'s frames."""
        extractor = self.processor.feature_extractor
        features = extractor(audios, sampling_rate=SAMPLE_RATE, max_length=window.samples,
                             padding="max_length", truncation=True,
                             return_tensors="pt").input_features
        return features.to(self.device, self.dtype)

    def _decode_batch(self, batch: list[Utterance], language: str, task: str, num_beams: int,
                      max_new_tokens: int, planned: Window,
                      window_seconds: float | None) -> list[str]:
        """Decode one batch under its encoder window; texts in ``batch`` order."""
        audios = [load_audio(utt.audio) for utt in batch]
        longest = max(len(audio) for audio in audios)
        window = max(planned, self._window(longest, window_seconds), key=lambda w: w.positions)
        if longest > window.samples and not self._warned_cut:
            self._warned_cut = True
            warnings.warn(f"some clips are longer than the {window.seconds:g} s encoder window "
                          "and are cut at its end", stacklevel=3)
        features = self._features(audios, window)
        with torch.inference_mode(), encoder_window(self.model, window.positions), _quiet():
            ids = self.model.generate(input_features=features, language=f"<|{language}|>",
                                      task=TASKS[task], max_new_tokens=max_new_tokens,
                                      num_beams=num_beams, do_sample=False,
                                      return_timestamps=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [text.strip() for text in texts]
