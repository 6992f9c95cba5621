"""Tensor names: openai-whisper checkpoints mapped onto Hugging Face Whisper names.

lors works on the names of ``WhisperForConditionalGeneration`` (``model.encoder...``,
``model.decoder...``). ``proj_out.weight`` is tied to the token embedding and is never stored.
"""

from __future__ import annotations

import re

# Per-block pieces: openai suffix -> HF suffix. Order matters only for readability.
_BLOCK_PIECES = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TOP_LEVEL = {
    "encoder.conv1.weight": "model.encoder.conv1.weight",
    "encoder.conv1.bias": "model.encoder.conv1.bias",
    "encoder.conv2.weight": "model.encoder.conv2.weight",
    "encoder.conv2.bias": "model.encoder.conv2.bias",
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.ln.weight": "model.decoder.layer_norm.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}
_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")

# openai ModelDimensions field -> WhisperConfig field
OPENAI_DIMS_TO_HF = {
    "n_mels": "num_mel_bins",
    "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions",
    "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}


def openai_to_hf(name: str) -> str | None:
    """HF name for an openai-whisper state-dict key, or None if it has no HF counterpart."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK.match(name)
    if not match:
        return None
    side, index, piece, kind = match.groups()
    hf_piece = _BLOCK_PIECES.get(piece)
    if hf_piece is None:
        return None
    return f"model.{side}.layers.{index}.{hf_piece}.{kind}"


def hf_to_openai(name: str) -> str | None:
    """Inverse of :func:`openai_to_hf` (used to write openai checkpoints and in tests)."""
    for openai_name, hf_name in _TOP_LEVEL.items():
        if hf_name == name:
            return openai_name
    match = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if not match:
        return None
    side, index, piece, kind = match.groups()
    for openai_piece, hf_piece in _BLOCK_PIECES.items():
        if hf_piece == piece:
            return f"{side}.blocks.{index}.{openai_piece}.{kind}"
    return None


def canonical_hf_name(name: str) -> str:
    """Add the ``model.`` prefix that checkpoints saved from ``WhisperModel`` lack."""
    if name.startswith(("encoder.", "decoder.")):
        return "model." + name
    return name


def openai_dims_to_config(dims: dict) -> dict:
    """A WhisperConfig dict from openai ModelDimensions (FFN width 4 x d_model, as openai builds it)."""
    config = {hf: int(dims[key]) for key, hf in OPENAI_DIMS_TO_HF.items() if key in dims}
    d_model = config.get("d_model", int(dims.get("n_text_state", 0)))
    config.update(encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
                  model_type="whisper", architectures=["WhisperForConditionalGeneration"])
    return config


def config_to_openai_dims(config: dict) -> dict:
    """openai ModelDimensions (a plain dict of ints) from a WhisperConfig dict; inverse of
    :func:`openai_dims_to_config` for the fields openai has (its text width is d_model)."""
    dims = {key: int(config[hf]) for key, hf in OPENAI_DIMS_TO_HF.items()}
    dims["n_text_state"] = int(config["d_model"])
    return dims
