"""Model inputs per utterance: log-mel features on short windows, or cached encoder outputs.

Training uses one encoder window per batch, the one evaluation would use for the batch's
longest clip (:func:`clip_positions`). Features are computed once per utterance on its own
window, held in memory (a few hundred KB each at 8-10 s) and padded to the batch's window
(:func:`fit_window`, exact). With the encoder frozen its output never changes, so it is
computed once per utterance and window (a clip can meet several windows in its batches) and
stored on disk under a key of the encoder's weights, the window and the feature settings:
experts, the MTL model and every sequential stage of one base share it, and a re-run reads it
back instead of running the encoder again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.audio import SAMPLE_RATE, load_audio
from ..data.manifest import Utterance
from ..errors import LorsError
from ..evaluation.window import encoder_window, window_for
from ..fsutil import atomic_file


_FEATURES: dict[tuple, torch.Tensor] = {}
"""Features already computed in this process, by audio file, window and extractor settings:
an experiment trains many models on the same clips (experts, MTL, every sequential stage)."""


def _feature_key(utt: Utterance, extractor, samples: int) -> tuple:
    stat = os.stat(utt.audio)
    return (str(Path(utt.audio).resolve()), stat.st_size, stat.st_mtime_ns, samples,
            extractor.feature_size, extractor.hop_length, extractor.n_fft)


def log_mel(extractor, utterances: Sequence[Utterance], positions: int,
            show_progress: bool = False, desc: str = "features") -> dict[str, torch.Tensor]:
    """``{utterance id: (n_mels, 2 * positions) float32 features}`` padded to the window.

    LorsError for audio longer than the window (the manifest's duration understated it).
    Results are memoised per process (see :data:`_FEATURES`); callers must not modify them.
    """
    samples = 2 * positions * extractor.hop_length
    features = {}
    for utt in tqdm(utterances, desc=desc, unit="utt", disable=not show_progress, leave=False):
        if utt.id in features:
            continue
        key = _feature_key(utt, extractor, samples)
        if key in _FEATURES:
            features[utt.id] = _FEATURES[key]
            continue
        audio = load_audio(utt.audio)
        if len(audio) > samples:
            raise LorsError(f"audio {utt.audio} of utterance {utt.id!r} is "
                            f"{len(audio) / SAMPLE_RATE:.1f} s, longer than the "
                            f"{samples / SAMPLE_RATE:g} s training window its manifest duration "
                            f"({utt.duration:.1f} s) implies; fix the duration field")
        values = extractor(audio, sampling_rate=SAMPLE_RATE, max_length=samples,
                           padding="max_length", truncation=True,
                           return_tensors="pt").input_features[0]
        features[utt.id] = _FEATURES[key] = values
    return features


def clip_positions(utterances: Sequence[Utterance], full_positions: int,
                   hop_length: int) -> int:
    """Encoder positions of the window for a batch of ``utterances``: evaluation's automatic
    window (:func:`window_for`) for the batch's longest clip by its manifest duration, the
    longest clip + 2 s in whole seconds, at least 8 s, capped at the full window. For one clip,
    that clip's own window (the one it is decoded with)."""
    longest = max(round(u.duration * SAMPLE_RATE) for u in utterances)
    return window_for(longest, None, full_positions, hop_length).positions


def clip_features(extractor, utterances: Sequence[Utterance], full_positions: int,
                  show_progress: bool = False) -> dict[str, torch.Tensor]:
    """``{utterance id: features}``, each clip padded to its own window (see
    :func:`clip_positions`); :func:`fit_window` pads them to a batch's larger window."""
    groups: dict[int, dict[str, Utterance]] = {}
    for utt in utterances:
        positions = clip_positions([utt], full_positions, extractor.hop_length)
        groups.setdefault(positions, {})[utt.id] = utt
    features: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(map(len, groups.values())), desc="features", unit="utt",
               disable=not show_progress, leave=False)
    for positions, group in sorted(groups.items()):
        features.update(log_mel(extractor, list(group.values()), positions))
        bar.update(len(group))
    bar.close()
    return features


def fit_window(features: torch.Tensor, positions: int) -> torch.Tensor:
    """Log-mel ``features`` (n_mels, frames) of a clip padded to ``2 * positions`` frames.

    A clip's own window ends in at least 2 s of padding, whose frames all hold the same value
    (the floor the extractor clamps silence to, relative to the clip's loudest frame), so
    repeating the last frame gives exactly the features of the audio padded to the larger
    window, without keeping one copy of every clip per window.
    """
    frames = 2 * positions
    missing = frames - features.shape[-1]
    if missing < 0:
        raise ValueError(f"features of {features.shape[-1]} frames do not fit a window of "
                         f"{frames}")
    if missing == 0:
        return features
    return torch.cat([features, features[..., -1:].expand(*features.shape[:-1], missing)], -1)


def encoder_key(whisper, extractor, positions: int) -> str:
    """A digest of the encoder's weights, the window and the feature extractor's settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(whisper.model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    settings = {"positions": positions, "mels": extractor.feature_size,
                "hop": extractor.hop_length, "n_fft": extractor.n_fft,
                "rate": extractor.sampling_rate}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _utterance_file(folder: Path, utt: Utterance) -> Path:
    """Cache file of ``utt``: named by its id and its audio file's size and mtime."""
    stat = os.stat(utt.audio)
    tag = hashlib.sha1(f"{utt.id}|{Path(utt.audio).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
                       .encode()).hexdigest()[:20]
    return folder / f"{tag}.npy"


@torch.inference_mode()
def cached_encoder_outputs(whisper, extractor, utterances: Sequence[Utterance], positions: int,
                           cache_dir: Path, batch_size: int = 8,
                           show_progress: bool = False) -> dict[str, torch.Tensor]:
    """``{utterance id: (positions, d_model) encoder output}``, computed only where not cached.

    Outputs are stored as float16 (half the disk and memory; the rounding, about 5e-4
    relative, is far below what fine-tuning is sensitive to) and returned as float32. Each
    file is written with ``atomic_file``, so an interrupted run leaves no partial entry.
    """
    folder = Path(cache_dir) / encoder_key(whisper, extractor, positions)
    folder.mkdir(parents=True, exist_ok=True)
    unique = list({u.id: u for u in utterances}.values())
    outputs, todo = {}, []
    for utt in unique:
        path = _utterance_file(folder, utt)
        if path.is_file():
            outputs[utt.id] = torch.from_numpy(np.load(path)).float()
        else:
            todo.append(utt)
    device = next(whisper.parameters()).device
    bar = tqdm(total=len(todo), desc="encoder cache", unit="utt", disable=not show_progress,
               leave=False)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        feats = log_mel(extractor, batch, positions)
        stacked = torch.stack([feats[u.id] for u in batch]).to(device)
        with encoder_window(whisper, positions):
            hidden = whisper.model.encoder(stacked).last_hidden_state.cpu()
        for utt, values in zip(batch, hidden):
            half = values.to(torch.float16).numpy()
            path = _utterance_file(folder, utt)
            with atomic_file(path, "wb") as handle:
                np.save(handle, half)
            outputs[utt.id] = torch.from_numpy(half).float()
        bar.update(len(batch))
    bar.close()
    return outputs
