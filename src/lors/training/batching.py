"""Examples for each (language, task) pair and their collation into batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.decode import reference
from .data import PairData
from .prompts import IGNORE_INDEX, Example, build_example


@dataclass(frozen=True)
class PairExamples:
    """One pair's utterance ids and token examples, train and dev."""

    language: str
    task: str
    train_ids: list[str]
    train: list[Example]
    dev_ids: list[str]
    dev: list[Example]


def tokenize_pairs(tokenizer, pairs: list[PairData], max_length: int) -> list[PairExamples]:
    """Prompts and labels of every utterance of every pair (raises on over-long texts)."""
    out = []
    for pair in pairs:
        def build(utts):
            return [build_example(tokenizer, reference(u, pair.task), pair.language, pair.task,
                                  max_length) for u in utts]
        out.append(PairExamples(pair.language, pair.task, [u.id for u in pair.train],
                                build(pair.train), [u.id for u in pair.dev], build(pair.dev)))
    return out


def collate(inputs: list[torch.Tensor], examples: list[Example], pad_id: int) -> dict:
    """Stack inputs; right-pad decoder inputs with ``pad_id`` and labels with -100.

    No decoder attention mask is needed: the decoder is causal, so padding after a
    sequence's end only changes the outputs at padded positions, whose labels are ignored.
    """
    length = max(len(e.decoder_input_ids) for e in examples)
    decoder = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        decoder[row, :len(example.decoder_input_ids)] = torch.tensor(example.decoder_input_ids)
        labels[row, :len(example.labels)] = torch.tensor(example.labels)
    return {"inputs": torch.stack(inputs), "decoder_input_ids": decoder, "labels": labels}
