"""openai-whisper export: a ``.pt`` file that ``whisper.load_model(path)`` loads.

The file is ``{"dims": ModelDimensions as a dict of ints, "model_state_dict": tensors under
openai's names}``, the layout of openai's own checkpoints, which lors reads back as well.
openai's ``alignment_heads`` buffer is not persistent, so it is not in the file (openai sets
it only for its named models; word timestamps then use its default, the last half of the
decoder layers). Tensors keep their stored dtype; ``load_model`` casts them to the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.names import config_to_openai_dims, hf_to_openai
from ..checkpoint.reader import TIED_OUTPUT, Checkpoint
from ..errors import CheckpointError
from .source import whisper_config


def check_expressible(checkpoint: Checkpoint) -> None:
    """Refuse what openai's fixed architecture cannot hold: FFN width other than 4 x d_model,
    an activation other than exact GELU, scaled embeddings, an untied output projection."""
    config = whisper_config(checkpoint)
    problems = []
    if not config.encoder_ffn_dim == config.decoder_ffn_dim == 4 * config.d_model:
        problems.append(f"FFN widths {config.encoder_ffn_dim}/{config.decoder_ffn_dim}, "
                        f"openai's are 4 x d_model = {4 * config.d_model}")
    if config.activation_function != "gelu":
        problems.append(f"activation {config.activation_function!r}, openai's is 'gelu'")
    if config.scale_embedding:
        problems.append("scaled embeddings")
    if TIED_OUTPUT in checkpoint.meta:
        problems.append("an output projection not tied to the token embedding")
    if problems:
        raise CheckpointError(f"{checkpoint.source}: openai-whisper cannot represent this "
                              f"model: {'; '.join(problems)}")


def openai_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of ``checkpoint`` under its openai name, dtype as stored. CheckpointError
    for a tensor openai's model has no place for (e.g. a key-projection bias)."""
    state = {}
    for name in checkpoint.meta:
        openai_name = hf_to_openai(name)
        if openai_name is None:
            raise CheckpointError(f"{checkpoint.source}: tensor {name!r} has no place in an "
                                  "openai-whisper model")
        state[openai_name] = checkpoint.read(name).contiguous()
    return state


def check_loads(payload: dict) -> None:
    """Compare the tensors with those of openai's model for these dims (built on the meta
    device, no memory): a missing, extra or misshapen tensor is a CheckpointError here, not
    a failure at the user's ``load_model``."""
    from whisper.model import AudioEncoder, TextDecoder
    dims = payload["dims"]
    with torch.device("meta"):  # Whisper() itself makes a sparse buffer, which meta lacks
        parts = {"encoder": AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"],
                                         dims["n_audio_head"], dims["n_audio_layer"]),
                 "decoder": TextDecoder(dims["n_vocab"], dims["n_text_ctx"], dims["n_text_state"],
                                        dims["n_text_head"], dims["n_text_layer"])}
    expected = {f"{side}.{name}": tuple(t.shape) for side, part in parts.items()
                for name, t in part.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in payload["model_state_dict"].items()}
    wrong = sorted(n for n in expected.keys() & got.keys() if expected[n] != got[n])
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra or wrong:
        raise CheckpointError(f"openai-whisper's model does not take these tensors: missing "
                              f"{missing[:5]}, extra {extra[:5]}, shapes differ for {wrong[:5]}")


def write_openai(checkpoint: Checkpoint, path: Path) -> dict:
    """Write ``checkpoint`` as an openai-whisper checkpoint to the file ``path``; returns a
    summary for the report."""
    check_expressible(checkpoint)
    payload = {"dims": config_to_openai_dims(whisper_config(checkpoint).to_dict()),
               "model_state_dict": openai_state_dict(checkpoint)}
    check_loads(payload)
    torch.save(payload, path)
    return {"format": "openai", "dims": payload["dims"],
            "tensors": len(payload["model_state_dict"])}
