"""What a model reference that is not an existing path stands for: a hub id, or a mistyped path.

A reference is taken for a hub id (``owner/name``) only when it has exactly one slash, no
other path separator, no leading ``.``, ``/`` or ``~``, no weights-file suffix, and no local
folder named ``owner`` (``experts/de-asr`` beside an ``experts/`` folder is a mistyped path).
A hub id resolves through the local Hugging Face cache when ``HF_HUB_OFFLINE`` is set, else
through the hub (which falls back to the cache when unreachable). Everything else is a
"no such directory" (or "no such file") error, with the closest existing name when there
is one.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from ..errors import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]
"""Files fetched from a hub repository: config, weights, tokenizer, preprocessor."""
FILE_SUFFIXES = (".pt", ".bin", ".safetensors", ".json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(ref: str) -> bool:
    """Whether ``ref`` (not an existing path) can only be meant as a hub id ``owner/name``."""
    if not _HUB_ID.match(ref) or (os.altsep and os.altsep in ref):
        return False
    if Path(ref).suffix in FILE_SUFFIXES:
        return False
    return not Path(ref.split("/")[0]).is_dir()


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, when imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def hub_cache_dir() -> str:
    """The Hugging Face hub cache the environment names now: ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def from_hub(repo_id: str) -> str:
    """The local snapshot folder of hub repository ``repo_id`` (downloaded unless offline).
    CheckpointError saying how to get it when neither the cache nor the hub has it."""
    from huggingface_hub import snapshot_download
    cache, offline = hub_cache_dir(), hub_offline()
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache,
                                 local_files_only=offline)
    except Exception as exc:  # offline, unknown repo, auth, incomplete: "cannot use this id"
        if offline:
            raise CheckpointError(
                f"{repo_id}: not a local path, and not in the local Hugging Face cache ({cache}) "
                f"and HF_HUB_OFFLINE is set: download it on a connected machine with "
                f"`hf download {repo_id}` and copy that machine's cache here (or point "
                "HF_HUB_CACHE at a copy), or pass a local directory") from exc
        raise CheckpointError(
            f"{repo_id}: not a local path, and the model hub could not provide it ({exc}). "
            "Download the model on a connected machine and pass its local directory") from exc


def missing_path_error(ref: str) -> CheckpointError:
    """The error for a local path that does not exist, naming the closest existing sibling."""
    path = Path(ref).expanduser()
    kind = "file" if path.suffix in FILE_SUFFIXES else "directory"
    message = (f"{ref}: no such {kind} (expected a Whisper checkpoint: a Hugging Face folder, "
               "an openai .pt file, a hub id owner/name, or 'base')")
    if path.parent.is_dir():
        names = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
        close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {path.parent / close[0]}?"
    return CheckpointError(message)


def resolve_missing(ref: str) -> str:
    """The folder that ``ref``, not an existing path, stands for (a hub snapshot), or the
    CheckpointError of a mistyped path."""
    if looks_like_hub_id(ref):
        return from_hub(ref)
    raise missing_path_error(ref)
