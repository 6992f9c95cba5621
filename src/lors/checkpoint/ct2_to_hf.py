"""Convert a CTranslate2 Whisper directory into a standard Hugging Face Whisper directory.

Input (``ct2_dir``): ``model.bin`` (WhisperSpec), ``config.json`` (alignment heads, language
ids, suppress ids), ``tokenizer.json`` and ``vocabulary.txt`` (one token per line) or
``vocabulary.json`` (a list). Output: ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32), tokenizer, feature extractor and processor files, loadable
offline by ``WhisperForConditionalGeneration``/``WhisperProcessor``/``pipeline``.
"""

from __future__ import annotations

import bisect
import json
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import CheckpointError
from ..fsutil import atomic_directory
from .ctranslate2 import Ct2Model, read_ctranslate2
from .tokenizer_files import PAD_TOKEN

# CTranslate2 ActivationType ids -> transformers ACT2FN names.
_ACTIVATIONS = {0: "relu", 1: "gelu_pytorch_tanh", 2: "silu", 3: "gelu"}
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")
Progress = Callable[[str], None]


def _scalar(ct2: Ct2Model, name: str, default: int) -> int:
    return int(ct2.resolve(name)) if name in ct2 else default


def _f32(arr: np.ndarray) -> torch.Tensor:
    """A float32 torch copy (the source may be a read-only float16 view of a memory map)."""
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def read_vocabulary(ct2_dir: Path) -> list[str]:
    """Token strings by id from ``vocabulary.txt`` (one per line) or ``vocabulary.json``."""
    txt, js = ct2_dir / "vocabulary.txt", ct2_dir / "vocabulary.json"
    if txt.is_file():
        # Byte-level BPE tokens never contain a real newline, so lines are tokens.
        return txt.read_text(encoding="utf-8").rstrip("\n").split("\n")
    if js.is_file():
        return list(json.loads(js.read_text(encoding="utf-8")))
    raise CheckpointError(f"{ct2_dir} has neither vocabulary.txt nor vocabulary.json")


def _token_id(vocab: list[str], token: str) -> int:
    try:
        return vocab.index(token)
    except ValueError:
        raise CheckpointError(f"the CTranslate2 vocabulary lacks the Whisper token {token}") from None


def _count_layers(ct2: Ct2Model, stack: str) -> int:
    found = {int(m.group(2)) for n in ct2.variables if (m := _LAYER.match(n)) and m.group(1) == stack}
    if found != set(range(len(found))) or not found:
        raise CheckpointError(f"CTranslate2 {stack} layers are missing or not numbered 0..n-1")
    return len(found)


def whisper_config(ct2: Ct2Model, ct2_config: dict, vocab: list[str]):
    """WhisperConfig whose sizes are read off the tensor shapes and CT2 scalars."""
    from transformers import WhisperConfig

    required = {"decoder/pre_norm": 1, "decoder/scale_embeddings": 0, "decoder/alibi": 0}
    for name, want in required.items():
        if _scalar(ct2, name, want) != want:
            raise CheckpointError(f"CTranslate2 {name} = {_scalar(ct2, name, want)}; Whisper needs {want}")
    act = _scalar(ct2, "decoder/activation", 3)
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"CTranslate2 activation id {act} has no transformers equivalent")
    conv1 = ct2.resolve("encoder/conv1/weight")
    n_vocab = ct2.resolve("decoder/embeddings/weight").shape[0]
    if len(vocab) != n_vocab:
        raise CheckpointError(f"vocabulary has {len(vocab)} tokens but the embeddings {n_vocab} rows")
    eot = _token_id(vocab, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=n_vocab,
        num_mel_bins=conv1.shape[1],
        d_model=conv1.shape[0],
        encoder_layers=_count_layers(ct2, "encoder"),
        decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads", 8),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads", 8),
        encoder_ffn_dim=ct2.resolve("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct2.resolve("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct2.resolve("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct2.resolve("decoder/position_encodings/encodings").shape[0],
        activation_function=_ACTIVATIONS[act],
        decoder_start_token_id=_token_id(vocab, "<|startoftranscript|>"),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
        scale_embedding=False,
        tie_word_embeddings=True,
    )


def _linear(sd: dict, ct2: Ct2Model, src: str, dst: str, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = _f32(ct2.resolve(f"{src}/weight"))
    if bias:
        sd[f"{dst}.bias"] = _f32(ct2.resolve(f"{src}/bias"))


def _norm(sd: dict, ct2: Ct2Model, src: str, dst: str) -> None:
    sd[f"{dst}.weight"] = _f32(ct2.resolve(f"{src}/gamma"))
    sd[f"{dst}.bias"] = _f32(ct2.resolve(f"{src}/beta"))


def _fused(sd: dict, ct2: Ct2Model, src: str, targets: list[tuple[str, bool]]) -> None:
    """Split a fused projection into equal row blocks ``(name, keep_bias)``.

    Key projections drop their bias: adding ``q.b`` to every score of one query cannot change
    its softmax, and the converter stores it as zeros anyway (transformers' k_proj has none).
    """
    weights = np.split(ct2.resolve(f"{src}/weight"), len(targets))
    biases = np.split(ct2.resolve(f"{src}/bias"), len(targets))
    for (dst, keep_bias), w, b in zip(targets, weights, biases):
        sd[f"{dst}.weight"] = _f32(w)
        if keep_bias:
            sd[f"{dst}.bias"] = _f32(b)


def _layer(sd: dict, ct2: Ct2Model, stack: str, i: int) -> None:
    src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
    attn = f"{dst}.self_attn"
    _fused(sd, ct2, f"{src}/self_attention/linear_0",
           [(f"{attn}.q_proj", True), (f"{attn}.k_proj", False), (f"{attn}.v_proj", True)])
    _linear(sd, ct2, f"{src}/self_attention/linear_1", f"{attn}.out_proj")
    _norm(sd, ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
    if stack == "decoder":
        cross = f"{dst}.encoder_attn"
        _linear(sd, ct2, f"{src}/attention/linear_0", f"{cross}.q_proj")
        _fused(sd, ct2, f"{src}/attention/linear_1", [(f"{cross}.k_proj", False), (f"{cross}.v_proj", True)])
        _linear(sd, ct2, f"{src}/attention/linear_2", f"{cross}.out_proj")
        _norm(sd, ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    _linear(sd, ct2, f"{src}/ffn/linear_0", f"{dst}.fc1")
    _linear(sd, ct2, f"{src}/ffn/linear_1", f"{dst}.fc2")
    _norm(sd, ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")


def whisper_state_dict(ct2: Ct2Model, encoder_layers: int, decoder_layers: int) -> dict:
    """float32 transformers state dict (without the tied ``proj_out.weight``)."""
    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(sd, ct2, f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.encoder.embed_positions.weight"] = _f32(ct2.resolve("encoder/position_encodings/encodings"))
    sd["model.decoder.embed_tokens.weight"] = _f32(ct2.resolve("decoder/embeddings/weight"))
    sd["model.decoder.embed_positions.weight"] = _f32(ct2.resolve("decoder/position_encodings/encodings"))
    for stack, n in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(n):
            _layer(sd, ct2, stack, i)
        _norm(sd, ct2, f"{stack}/layer_norm", f"model.{stack}.layer_norm")
    return sd


def build_model(config, state_dict: dict):
    """WhisperForConditionalGeneration loaded strictly: only the tied proj_out may be absent."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(config)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatch: the dims read off the tensors disagree
        raise CheckpointError(f"CTranslate2 tensors do not fit a Whisper of this config: {exc}") from exc
    missing = set(result.missing_keys) - {"proj_out.weight"}
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"CTranslate2 -> transformers mapping mismatch: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}; the model is not a Whisper spec"
        )
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise CheckpointError("proj_out is not tied to decoder.embed_tokens after loading")
    return model.eval()


def generation_config(ct2_config: dict, vocab: list[str], max_length: int):
    """The Whisper GenerationConfig transformers needs for language/task forcing."""
    from transformers import GenerationConfig

    def tid(token: str) -> int:
        return _token_id(vocab, token)

    if "lang_ids" not in ct2_config:
        raise CheckpointError("the CTranslate2 config.json has no lang_ids: not a multilingual Whisper")
    eot = tid("<|endoftext|>")
    return GenerationConfig(
        decoder_start_token_id=tid("<|startoftranscript|>"),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=max_length,
        no_timestamps_token_id=tid("<|notimestamps|>"),
        prev_sot_token_id=tid("<|startofprev|>"),
        is_multilingual=True,
        lang_to_id={vocab[i]: int(i) for i in ct2_config["lang_ids"]},
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids", [])],
        begin_suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids_begin", [])],
        alignment_heads=[[int(a), int(b)] for a, b in ct2_config.get("alignment_heads", [])],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def repair_merges(tokenizer_json: dict) -> int:
    """Add BPE merges the vocabulary needs but the file lacks; return how many were added.

    Byte-level BPE ids are assigned in merge order, so merge ``k`` makes token ``256 + k``.
    Some published Whisper ``tokenizer.json`` files lack the very first merge (``Ġ t``), which
    makes " the" encode as two tokens the model never emits. A missing token is re-inserted
    at its id's position when exactly one split into two lower-id tokens exists.
    """
    model = tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    made = [vocab.get(a + b, -1) for a, b in merges]
    if made != sorted(made):
        return 0  # not in id order: no safe position to insert at
    products = {a + b for a, b in merges}
    added = 0
    for tok, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tid < 256 or len(tok) < 2 or tok in products or tok.startswith("<|"):
            continue
        splits = [(tok[:k], tok[k:]) for k in range(1, len(tok))
                  if vocab.get(tok[:k], tid) < tid and vocab.get(tok[k:], tid) < tid]
        if len(splits) == 1:
            at = bisect.bisect_left(made, tid)
            merges.insert(at, list(splits[0]))
            made.insert(at, tid)
            added += 1
    model["merges"] = merges
    return added


def _complete_added_tokens(tokenizer_json: dict, vocab: list[str]) -> None:
    """Declare every vocabulary id above the BPE range (e.g. timestamps) as an added token."""
    have = {t["id"] for t in tokenizer_json["added_tokens"]} | set(tokenizer_json["model"]["vocab"].values())
    for tid in range(len(vocab)):
        if tid not in have:
            tokenizer_json["added_tokens"].append(
                {"id": tid, "content": vocab[tid], "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": True, "special": False}
            )


def build_tokenizer(ct2_dir: Path, vocab: list[str], scratch: Path, max_length: int):
    """WhisperTokenizer covering all ``len(vocab)`` ids, each mapped to its vocabulary string,
    padding with ``<|endoftext|>`` (so Hugging Face collators work)."""
    from transformers import WhisperTokenizer

    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    repair_merges(tokenizer_json)
    _complete_added_tokens(tokenizer_json, vocab)
    (scratch / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    tokenizer = WhisperTokenizer.from_pretrained(str(scratch), model_max_length=max_length,
                                                 pad_token=PAD_TOKEN)
    wrong = [i for i, tok in enumerate(vocab) if tokenizer.convert_tokens_to_ids(tok) != i]
    if len(tokenizer) != len(vocab) or wrong:
        raise CheckpointError(
            f"{ct2_dir / 'tokenizer.json'} disagrees with the vocabulary: {len(tokenizer)} tokens "
            f"vs {len(vocab)}, ids {wrong[:5]} differ"
        )
    return tokenizer


def write_hf_whisper(ct2_dir: Path, directory: Path, progress: Progress | None = None) -> None:
    """Write the converted model into an existing, empty ``directory`` (not atomic)."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    step = progress or (lambda _msg: None)
    ct2_dir, directory = Path(ct2_dir), Path(directory)
    step("reading CTranslate2 model")
    ct2 = read_ctranslate2(ct2_dir / "model.bin")
    if ct2.spec_name != "WhisperSpec":
        raise CheckpointError(f"{ct2_dir / 'model.bin'} holds a {ct2.spec_name}, not a WhisperSpec")
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    vocab = read_vocabulary(ct2_dir)
    config = whisper_config(ct2, ct2_config, vocab)
    step("mapping tensors")
    model = build_model(config, whisper_state_dict(ct2, config.encoder_layers, config.decoder_layers))
    model.generation_config = generation_config(ct2_config, vocab, config.max_target_positions)
    step("saving model")
    model.save_pretrained(directory, safe_serialization=True)
    step("building tokenizer")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tokenizer-") as scratch:
        tokenizer = build_tokenizer(ct2_dir, vocab, Path(scratch), config.max_target_positions)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    feature_extractor.save_pretrained(directory)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)


def ct2_whisper_to_hf(ct2_dir: Path, out_dir: Path, *, force: bool = False,
                      progress: Progress | None = None) -> None:
    """Convert ``ct2_dir`` into a Hugging Face Whisper directory at ``out_dir``, atomically.

    Raises OutputExistsError if ``out_dir`` exists and not ``force``; CheckpointError when the
    input is not a convertible CTranslate2 Whisper model. ``progress`` receives step names.
    """
    with atomic_directory(Path(out_dir), force=force) as tmp:
        write_hf_whisper(Path(ct2_dir), tmp, progress)
