"""Dev-set scores of in-memory models, for the hyper-parameter search.

``token-accuracy`` (default): teacher-forced next-token accuracy on the dev references, per
pair; one encoder and decoder pass per batch, no decoding, so a grid point costs seconds.
``wer-bleu``: greedy decoding of the dev clips, scored by WER (asr) and BLEU (st).
Either is normalised by each pair's own expert, as the test-set normalised performance is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..evaluation.decode import Decoder, reference
from ..evaluation.evaluate import score
from ..training.batching import tokenize_pairs
from ..training.data import PairData
from ..training.dev import pair_token_accuracies
from ..training.inputs import clip_features
from ..training.modes import load_whisper
from .normalised import normalised_performance


class DevScorer:
    """One Whisper instance whose weights are swapped per model, with dev inputs prepared."""

    def __init__(self, base_dir: Path, pairs: dict[tuple[str, str], list], metric: str) -> None:
        self.whisper, self.processor = load_whisper(base_dir)
        self.whisper.to("cuda" if torch.cuda.is_available() else "cpu")
        self.metric, self.pairs = metric, pairs
        self.data = [PairData(language, task, [], utts) for (language, task), utts in pairs.items()]
        self.examples = tokenize_pairs(self.processor.tokenizer, self.data,
                                       self.whisper.config.max_target_positions)
        if metric == "token-accuracy":
            # each clip on its own window, as training's dev checks and evaluation use it
            everything = {u.id: u for utts in pairs.values() for u in utts}
            self.features = clip_features(self.processor.feature_extractor,
                                          list(everything.values()),
                                          self.whisper.config.max_source_positions)
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def load(self, state: dict[str, torch.Tensor] | None = None, model_dir: Path | None = None):
        """Put a state dict (or a saved model's weights) into the shared Whisper instance."""
        if model_dir is not None:
            from ..checkpoint.reader import open_checkpoint
            ckpt = open_checkpoint(str(model_dir))
            state = {name: ckpt.read(name) for name in ckpt.meta}
        missing, unexpected = self.whisper.load_state_dict(state, strict=False)  # copies to device
        if unexpected or any(m != "proj_out.weight" for m in missing):
            raise RuntimeError(f"state does not fit the model: missing {missing}, "
                               f"unexpected {unexpected}")
        self.whisper.tie_weights()

    def results(self) -> dict[tuple[str, str], dict]:
        """Per pair: ``{"language", "task", "accuracy"}`` or the decoded scores."""
        out = {}
        if self.metric == "token-accuracy":
            values = pair_token_accuracies(self.whisper, self.whisper, self.examples,
                                           self.features, None, False, self.pad_id,
                                           next(self.whisper.parameters()).device)
            for pair, value in zip(self.pairs, values):
                out[pair] = {"language": pair[0], "task": pair[1], "accuracy": value}
            return out
        decoder = Decoder.from_model(self.whisper, self.processor, name="merged model")
        for (language, task), utts in self.pairs.items():
            hyps = decoder.decode(utts, language, task)
            refs = [reference(u, task) or "" for u in utts]
            out[(language, task)] = {"language": language, "task": task,
                                     **score(task, language, refs, hyps)}
        return out


def normalised_dev_score(results: dict, expert_results: dict, metric: str) -> float:
    """Mean over pairs of the result relative to the pair's expert, in percent."""
    if metric == "token-accuracy":
        ratios = [results[p]["accuracy"] / max(expert_results[p]["accuracy"], 1e-6)
                  for p in results]
        return 100.0 * sum(ratios) / len(ratios)
    return normalised_performance(list(results.values()), expert_results)["percent"]
