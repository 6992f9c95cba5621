"""The same clips decoded greedily by each runtime, to show an export transcribes like its source.

Every decoder here does what a user of that runtime does by default for one short clip: a
30 s input window (the clip padded with silence), the language and task forced, no
timestamps, temperature 0 with no fallback, at most ``max_new_tokens`` tokens. lors' own
evaluation uses shorter windows, so its hypotheses are not the reference here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evaluation.decode import whisper_task

MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class Clip:
    """16 kHz mono float32 audio with the language and lors task (asr, st) to decode it in."""

    audio: np.ndarray
    language: str
    task: str = "asr"


def hf_greedy(model_dir: str | Path, clips: list[Clip],
              max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Transcripts of ``clips`` by transformers' ``WhisperForConditionalGeneration.generate``."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from transformers.utils import logging as hf_logging

    processor = WhisperProcessor.from_pretrained(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    texts, level = [], hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on max_length beside max_new_tokens
    try:
        for clip in clips:
            features = processor.feature_extractor(clip.audio, sampling_rate=16000,
                                                   return_tensors="pt").input_features
            with torch.no_grad():
                ids = model.generate(features, language=clip.language,
                                     task=whisper_task(clip.task), num_beams=1, do_sample=False,
                                     return_timestamps=False, max_new_tokens=max_new_tokens)
            texts.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
    finally:
        hf_logging.set_verbosity(level)
    return texts


def faster_whisper_greedy(ct2_dir: str | Path, clips: list[Clip], compute_type: str = "default",
                          max_new_tokens: int = MAX_NEW_TOKENS,
                          pad_audio: bool = True) -> list[str]:
    """Transcripts of ``clips`` by ``faster_whisper.WhisperModel(ct2_dir).transcribe``.

    ``pad_audio``: pad each clip with silence to the model's window first, so the encoder
    sees what transformers and openai-whisper give it (their log-mel of the padded clip).
    Without it faster-whisper pads the clip's log-mel with zeros instead, another input,
    which changes some transcripts of the same model.
    """
    from faster_whisper import WhisperModel

    model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type)
    window = model.feature_extractor.n_samples
    texts = []
    for clip in clips:
        audio = np.asarray(clip.audio, dtype=np.float32)
        if pad_audio and audio.size < window:
            audio = np.pad(audio, (0, window - audio.size))
        segments, _ = model.transcribe(
            audio, language=clip.language, task=whisper_task(clip.task), beam_size=1,
            best_of=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False, max_new_tokens=max_new_tokens,
            compression_ratio_threshold=None, log_prob_threshold=None, no_speech_threshold=None)
        texts.append("".join(segment.text for segment in segments).strip())
    return texts


def openai_greedy(pt_file: str | Path, clips: list[Clip],
                  max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Transcripts of ``clips`` by openai-whisper: ``whisper.load_model(pt_file)`` and
    ``whisper.decode`` (float32)."""
    import torch
    import whisper

    model = whisper.load_model(str(pt_file), device="cpu")
    texts = []
    for clip in clips:
        audio = whisper.pad_or_trim(torch.from_numpy(np.asarray(clip.audio, dtype=np.float32)))
        mel = whisper.log_mel_spectrogram(audio, n_mels=model.dims.n_mels)
        options = whisper.DecodingOptions(task=whisper_task(clip.task), language=clip.language,
                                          temperature=0.0, sample_len=max_new_tokens,
                                          without_timestamps=True, fp16=False)
        texts.append(whisper.decode(model, mel, options).text.strip())
    return texts
