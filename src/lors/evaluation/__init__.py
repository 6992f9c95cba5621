"""Evaluation of Whisper models on manifests: normalisers, metrics, batched decoding, reports.

``evaluate(model, manifest, ...)`` decodes and scores every (language, task) and returns a
JSON-ready report; ``format_table`` prints it. The pieces are importable on their own.
"""

from .decode import DEFAULT_MAX_NEW_TOKENS, TASKS, Decoder
from .evaluate import evaluate, format_table
from .metrics import bleu, cer, chrf, wer
from .normalize import normalize

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "TASKS", "Decoder", "bleu", "cer", "chrf", "evaluate",
           "format_table", "normalize", "wer"]
