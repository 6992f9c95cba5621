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
from .inputs import fit_window
from .prompts import IGNORE_INDEX


def token_accuracy(model, whisper, examples: list[PairExamples], inputs: dict,
                   positions: int | None, cached: bool, pad_id: int, device,
                   batch_size: int = 16) -> float | None:
    """Mean over pairs of the fraction of dev label tokens predicted exactly (argmax)."""
    return mean_score(pair_token_accuracies(model, whisper, examples, inputs, positions,
                                            cached, pad_id, device, batch_size))


def _window_of(tensor: torch.Tensor, cached: bool) -> int:
    """Encoder positions an input was made for: encoder outputs have one row per position,
    log-mel features two frames per position."""
    return tensor.shape[0] if cached else tensor.shape[-1] // 2


@torch.inference_mode()
def pair_token_accuracies(model, whisper, examples: list[PairExamples], inputs: dict,
                          positions: int | None, cached: bool, pad_id: int, device,
                          batch_size: int = 16) -> list[float | None]:
    """Per pair, the fraction of its dev label tokens predicted exactly (None: no dev).

    ``positions=None``: every clip is scored on the window its input was made for (its own
    window in training, as evaluation decodes it), clips of one window batched together. A
    number pads every log-mel input to that window first.
    """
    model.eval()
    per_pair = []
    for pair in examples:
        correct = total = 0
        groups: dict[int, list[int]] = {}
        for index, uid in enumerate(pair.dev_ids):
            tensor = inputs[uid]
            window = positions if positions is not None else _window_of(tensor, cached)
            groups.setdefault(window, []).append(index)
        for window, indices in groups.items():
            for start in range(0, len(indices), batch_size):
                chosen = indices[start:start + batch_size]
                tensors = [inputs[pair.dev_ids[i]] for i in chosen]
                if not cached:
                    tensors = [fit_window(t, window) for t in tensors]
                batch = collate(tensors, [pair.dev[i] for i in chosen], pad_id)
                decoder = batch["decoder_input_ids"].to(device)
                labels = batch["labels"].to(device)
                if cached:
                    hidden = BaseModelOutput(last_hidden_state=batch["inputs"].to(device))
                    logits = model(encoder_outputs=hidden, decoder_input_ids=decoder).logits
                else:
                    with encoder_window(whisper, window):
                        logits = model(input_features=batch["inputs"].to(device),
                                       decoder_input_ids=decoder).logits
                mask = labels != IGNORE_INDEX
                correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
                total += int(mask.sum())
        per_pair.append(correct / total if total else None)
    return per_pair


def decoded_scores(whisper, processor, pairs) -> list[float | None]:
    """Per pair, 1 - WER (asr) or BLEU / 100 (st) of greedy decoding (None: no dev clips)."""
    decoder = Decoder.from_model(whisper, processor, name="model in training")
    values: list[float | None] = []
    for pair in pairs:
        if not pair.dev:
            values.append(None)
            continue
        hyps = decoder.decode(pair.dev, pair.language, pair.task)
        refs = [reference(u, pair.task) or "" for u in pair.dev]
        result = score(pair.task, pair.language, refs, hyps)
        values.append(1 - result["wer"] if pair.task == "asr" else result["bleu"] / 100)
    whisper.train()
    return values


def decoded_score(whisper, processor, pairs) -> float | None:
    """Mean over pairs with dev clips of 1 - WER (asr) or BLEU / 100 (st), greedy decoding."""
    return mean_score(decoded_scores(whisper, processor, pairs))


def mean_score(values) -> float | None:
    """Mean of the values that are not None (each pair counts equally); None if none is."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def pair_dev_scores(select: str, model, whisper, processor, examples, inputs, pairs, cached,
                    pad_id, device) -> dict[str, float | None]:
    """``{"de-asr": score}`` per pair, by the score named by ``select``, for the model as it
    is now; each clip on its own window (see :func:`pair_token_accuracies`)."""
    if select == "wer-bleu":
        values = decoded_scores(_decodable(model, whisper), processor, pairs)
    else:
        values = pair_token_accuracies(model, whisper, examples, inputs, None, cached, pad_id,
                                       device)
    return {f"{e.language}-{e.task}": value for e, value in zip(examples, values)}


def dev_score(select: str, model, whisper, processor, examples, inputs, pairs, cached, pad_id,
              device) -> float | None:
    """The score named by ``select`` for the model as it is now: the mean over pairs."""
    return mean_score(pair_dev_scores(select, model, whisper, processor, examples, inputs,
                                      pairs, cached, pad_id, device).values())


def _decodable(model, whisper):
    """The module to call ``generate`` on: the LoRA-injected Whisper for a peft model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else whisper
