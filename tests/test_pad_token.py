"""The embedded base's tokenizer pads with <|endoftext|>, also in a cache built by an older lors,
so standard Hugging Face collators work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lors.base import MARKER, MODEL_DIRNAME, ensure_base_model
from lors.checkpoint.tokenizer_files import PAD_TOKEN, ensure_pad_token
from lors.tiny import FIRST_SPECIAL, write_tiny_tokenizer


def _old_cache(root: Path) -> Path:
    """A complete-looking base cache whose tokenizer declares no pad token (as lors 0.1 wrote)."""
    folder = root / MODEL_DIRNAME
    folder.mkdir(parents=True)
    write_tiny_tokenizer(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("pad_token", None)
            path.write_text(json.dumps(data))
    (folder / MARKER).write_text("{}")
    return folder


def test_an_older_cached_base_gets_the_pad_token(tmp_path):
    from transformers import WhisperTokenizer
    folder = _old_cache(tmp_path)
    assert WhisperTokenizer.from_pretrained(folder).pad_token_id is None
    assert ensure_base_model(tmp_path, show_progress=False) == folder
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == FIRST_SPECIAL
    batch = tokenizer.pad({"input_ids": [[1, 2, 3], [4]]})
    assert batch["input_ids"][1] == [4, FIRST_SPECIAL, FIRST_SPECIAL]
    assert batch["attention_mask"][1] == [1, 0, 0]
    assert not ensure_pad_token(folder)  # already there: nothing rewritten


def test_a_declared_pad_token_is_left_alone(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"pad_token": "<pad>"}))
    assert not ensure_pad_token(tmp_path)
    assert json.loads(path.read_text())["pad_token"] == "<pad>"


@pytest.mark.slow
def test_real_base_works_with_hugging_face_collators():
    from transformers import DataCollatorForSeq2Seq, WhisperProcessor
    tokenizer = WhisperProcessor.from_pretrained(ensure_base_model(show_progress=False)).tokenizer
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 50257
    assert tokenizer.pad({"input_ids": [[1, 2], [3]]})["input_ids"][1] == [3, 50257]
    batch = DataCollatorForSeq2Seq(tokenizer)([{"input_ids": [1, 2, 3], "labels": [5, 6]},
                                               {"input_ids": [4], "labels": [7]}])
    assert batch["input_ids"].tolist()[1] == [4, 50257, 50257]
    assert batch["labels"].tolist()[1] == [7, -100]
