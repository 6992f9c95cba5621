"""Whisper tokenizer files: the pad token that standard Hugging Face collators need.

Whisper pads with ``<|endoftext|>`` (its eos, as openai and the hub's Whisper tokenizers do);
without a declared pad token ``tokenizer.pad`` and ``DataCollatorForSeq2Seq`` fail.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import LorsWarning
from ..fsutil import atomic_file

PAD_TOKEN = "<|endoftext|>"
_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def ensure_pad_token(folder: Path) -> bool:
    """Declare ``PAD_TOKEN`` as the pad token in ``folder``'s tokenizer_config.json (and
    special_tokens_map.json, when present) if none is declared; True if a file was changed.
    Each file is replaced atomically, so readers never see half of one."""
    changed = False
    for name in _FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("pad_token") is not None:
            continue
        data["pad_token"] = PAD_TOKEN
        with atomic_file(path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        changed = True
    return changed


def with_pad_token(folder: Path) -> Path:
    """``folder``, after :func:`ensure_pad_token`; a folder that cannot be written (a read-only
    shared cache) only warns: it stays usable, without a pad token."""
    try:
        ensure_pad_token(folder)
    except OSError as exc:
        warnings.warn(f"could not declare the pad token in {folder}: {exc}", LorsWarning,
                      stacklevel=3)
    return Path(folder)
