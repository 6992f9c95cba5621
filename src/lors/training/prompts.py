"""Decoder prompts and labels, built the way Whisper builds its own.

Whisper decodes after the prompt ``<|startoftranscript|> <|xx|> <|task|> <|notimestamps|>``
(xx the source language; task ``transcribe`` for asr, ``translate`` for st, whose reference is
English). Training feeds the same prompt followed by the reference text, and the labels are
the decoder input shifted left by one and ended with ``<|endoftext|>``:

    decoder input  SOT   xx    task  NOTS  t1 ... tn
    labels         -100  -100  -100  t1    t2 ... EOT

The three label positions that would predict ``xx``, the task and ``<|notimestamps|>`` are
masked (-100): those tokens are forced at decoding time, so learning them would only move
the model's language identification. The text is tokenised with a leading space, as Whisper
emits it (" Guten Tag" -> "ĠGuten", "ĠTag"); Hugging Face's usual recipe tokenises without it,
which splits the first word differently from what the model generates ("G", "uten").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LorsError

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and transformers' Whisper loss) skips."""

WHISPER_TASKS = {"asr": "transcribe", "st": "translate"}


@dataclass(frozen=True)
class Example:
    """One training pair's token ids: ``decoder_input_ids`` and ``labels`` of equal length."""

    decoder_input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _token_id(tokenizer, token: str, what: str) -> int:
    # convert_tokens_to_ids maps unknown tokens to the unk id; converting back tells them
    # apart. (get_vocab() would rebuild a 51,865-entry dict per call: 30 s per expert.)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise LorsError(f"the model's tokenizer has no {token} token ({what}); use a "
                        "multilingual Whisper whose vocabulary has it")
    return token_id


def prompt_ids(tokenizer, language: str, task: str) -> list[int]:
    """``[<|startoftranscript|>, <|language|>, <|task|>, <|notimestamps|>]`` for lors ``task``.

    ``language`` is an ISO 639-1 code (``de``). LorsError for an unknown task or a token the
    tokenizer lacks.
    """
    if task not in WHISPER_TASKS:
        raise LorsError(f"unknown task {task!r}; choose from {', '.join(WHISPER_TASKS)}")
    return [_token_id(tokenizer, "<|startoftranscript|>", "start of transcript"),
            _token_id(tokenizer, f"<|{language}|>", f"language {language!r}"),
            _token_id(tokenizer, f"<|{WHISPER_TASKS[task]}|>", f"task {task!r}"),
            _token_id(tokenizer, "<|notimestamps|>", "no timestamps")]


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as Whisper emits it: one leading space, no special tokens."""
    return tokenizer.encode(" " + text.strip(), add_special_tokens=False)


def build_example(tokenizer, text: str, language: str, task: str,
                  max_length: int | None = None) -> Example:
    """Decoder input and labels for reference ``text`` (see the module docstring).

    ``max_length`` (the decoder's ``max_target_positions``) caps the sequence: a longer one
    raises LorsError naming the text, since cutting it would teach the model to stop early.
    """
    prompt = prompt_ids(tokenizer, language, task)
    body = text_ids(tokenizer, text)
    eot = _token_id(tokenizer, "<|endoftext|>", "end of text")
    inputs = prompt + body
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + body + [eot]
    if max_length is not None and len(inputs) > max_length:
        raise LorsError(f"reference {text[:60]!r} is {len(body)} tokens, longer than the "
                        f"decoder's {max_length - len(prompt)}-token limit; shorten or drop it")
    return Example(tuple(inputs), tuple(labels))
