"""Model inputs per utterance: log-mel features on the short window, or cached encoder outputs.

Features are computed once per utterance and held in memory (a few hundred KB each at 8-10 s).
With the encoder frozen its output never changes, so it is computed once per utterance and
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
from ..evaluation.window import encoder_window
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
