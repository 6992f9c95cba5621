"""The dev-set score that picks the best checkpoint (higher is better).

``token-accuracy``: teacher-forced next-token accuracy on the dev references (the paper's
criterion), averaged over pairs so each pair counts equally. ``wer-bleu``: greedy decoding
of the dev clips, scored per pair as 1 - WER (asr) or BLEU / 100 (st), averaged over pairs.
Either is None when no pair has dev utterances.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..evaluation.decode import Decoder, reference
from ..evaluation.evaluate import score
from ..evaluation.window import encoder_window
from .batching import PairExamples, collate
from .prompts import IGNORE_INDEX


def token_accuracy(model, whisper, examples: list[PairExamples], inputs: dict, positions: int,
                   cached: bool, pad_id: int, device, batch_size: int = 16) -> float | None:
    """Mean over pairs of the fraction of dev label tokens predicted exactly (argmax)."""
    per_pair = [a for a in pair_token_accuracies(model, whisper, examples, inputs, positions,
                                                 cached, pad_id, device, batch_size)
                if a is not None]
    return sum(per_pair) / len(per_pair) if per_pair else None


@torch.inference_mode()
def pair_token_accuracies(model, whisper, examples: list[PairExamples], inputs: dict,
                          positions: int, cached: bool, pad_id: int, device,
                          batch_size: int = 16) -> list[float | None]:
    """Per pair, the fraction of its dev label tokens predicted exactly (None: no dev)."""
    model.eval()
    per_pair = []
    for pair in examples:
        correct = total = 0
        for start in range(0, len(pair.dev), batch_size):
            ids = pair.dev_ids[start:start + batch_size]
            batch = collate([inputs[i] for i in ids], pair.dev[start:start + batch_size], pad_id)
            decoder = batch["decoder_input_ids"].to(device)
            labels = batch["labels"].to(device)
            if cached:
                hidden = BaseModelOutput(last_hidden_state=batch["inputs"].to(device))
                logits = model(encoder_outputs=hidden, decoder_input_ids=decoder).logits
            else:
                with encoder_window(whisper, positions):
                    logits = model(input_features=batch["inputs"].to(device),
                                   decoder_input_ids=decoder).logits
            mask = labels != IGNORE_INDEX
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            total += int(mask.sum())
        per_pair.append(correct / total if total else None)
    return per_pair


def decoded_score(whisper, processor, pairs) -> float | None:
    """Mean over pairs with dev clips of 1 - WER (asr) or BLEU / 100 (st), greedy decoding."""
    decoder = Decoder.from_model(whisper, processor, name="model in training")
    values = []
    for pair in pairs:
        if not pair.dev:
            continue
        hyps = decoder.decode(pair.dev, pair.language, pair.task)
        refs = [reference(u, pair.task) or "" for u in pair.dev]
        result = score(pair.task, pair.language, refs, hyps)
        values.append(1 - result["wer"] if pair.task == "asr" else result["bleu"] / 100)
    whisper.train()
    return sum(values) / len(values) if values else None


def dev_score(select: str, model, whisper, processor, examples, inputs, pairs, positions,
              cached, pad_id, device) -> float | None:
    """The score named by ``select`` for the model as it is now."""
    if select == "wer-bleu":
        return decoded_score(_decodable(model, whisper), processor, pairs)
    return token_accuracy(model, whisper, examples, inputs, positions, cached, pad_id, device)


def _decodable(model, whisper):
    """The module to call ``generate`` on: the LoRA-injected Whisper for a peft model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else whisper
