"""Utterance manifests: one JSON object per line describing a clip and its references.

Each line holds the fields ``id, language, split, audio, duration, transcript,
translation, voice``, then, only for degraded synthetic speech, the optional
:data:`OPTIONAL_FIELDS` ``noise_snr`` (dB) and ``reverb_rt60`` (seconds); manifests without
them read as before. ``audio`` is written relative to the manifest's folder when the clip
lies inside it (so a synthesised corpus can be moved as a whole) and absolute otherwise; on
load it is resolved back to an absolute path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import LorsError
from ..fsutil import atomic_file

FIELDS = ("id", "language", "split", "audio", "duration", "transcript", "translation", "voice")
OPTIONAL_FIELDS = ("noise_snr", "reverb_rt60")  # written only when set
_REQUIRED = ("id", "language", "split", "audio", "duration", "transcript")


@dataclass(frozen=True)
class Utterance:
    """One clip: its audio path, duration in seconds and reference texts.

    ``transcript`` is the text in ``language`` (the ASR reference); ``translation`` is the
    English text (the ST reference), None for ASR-only corpora; ``voice`` names the espeak-ng
    voice of synthetic speech and is None for recorded speech. ``noise_snr`` (dB) and
    ``reverb_rt60`` (s) are the degradation applied to synthetic speech, None when none was.
    """

    id: str
    language: str
    split: str
    audio: str
    duration: float
    transcript: str
    translation: str | None = None
    voice: str | None = None
    noise_snr: float | None = None
    reverb_rt60: float | None = None


def _relative_audio(audio: str, folder: Path) -> str:
    """``audio`` relative to ``folder`` (POSIX separators) if inside it, else absolute."""
    resolved = Path(os.path.abspath(audio))
    try:
        return resolved.relative_to(folder).as_posix()
    except ValueError:
        return str(resolved)


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> Path:
    """Write ``utterances`` to the JSONL manifest ``path`` atomically; return ``path``.

    Relative ``audio`` paths in the utterances are taken relative to the current directory.
    Duplicate ids raise :class:`LorsError` (ids key the evaluation results).
    """
    path = Path(path)
    folder = Path(os.path.abspath(path.parent))
    seen: set[str] = set()
    lines = []
    for utt in utterances:
        if utt.id in seen:
            raise LorsError(f"duplicate utterance id {utt.id!r} while writing manifest {path}")
        seen.add(utt.id)
        record = asdict(utt)
        record["audio"] = _relative_audio(utt.audio, folder)
        record["duration"] = float(utt.duration)
        keys = FIELDS + tuple(key for key in OPTIONAL_FIELDS if record[key] is not None)
        lines.append(json.dumps({key: record[key] for key in keys}, ensure_ascii=False))
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def _check_record(record: Any, where: str) -> None:
    """Raise :class:`LorsError` if ``record`` is not a well-typed utterance object."""
    if not isinstance(record, dict):
        raise LorsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise LorsError(f"{where}: missing field(s) {', '.join(missing)}; every line needs "
                        f"{', '.join(_REQUIRED)} (translation and voice are optional)")
    for key in ("id", "language", "split", "audio", "transcript"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise LorsError(f"{where}: field {key!r} must be a non-empty string "
                            "(a manifest without references cannot be evaluated)")
    for key in ("translation", "voice"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise LorsError(f"{where}: field {key!r} must be a string or null")
    for key in OPTIONAL_FIELDS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise LorsError(f"{where}: field {key!r} must be a number or null")
    duration = record["duration"]
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) \
            or not math.isfinite(duration) or duration < 0:
        raise LorsError(f"{where}: field 'duration' must be a non-negative number of seconds")


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest written by :func:`write_manifest` (or by hand).

    Blank lines are ignored; relative ``audio`` paths are resolved against the manifest's
    folder; fields other than :data:`FIELDS` and :data:`OPTIONAL_FIELDS` are ignored.
    Raises :class:`LorsError` naming the file and line for invalid JSON, missing or mistyped
    fields, an empty transcript or duplicate ids, and for a manifest with no utterances.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LorsError(f"cannot read manifest {path}: {exc}") from exc
    folder = Path(os.path.abspath(path.parent))
    utterances: list[Utterance] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"manifest {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LorsError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        _check_record(record, where)
        if record["id"] in seen:
            raise LorsError(f"{where}: duplicate id {record['id']!r} "
                            f"(first on line {seen[record['id']]})")
        seen[record["id"]] = number
        record = {key: record.get(key) for key in FIELDS + OPTIONAL_FIELDS}
        record["audio"] = str(folder / record["audio"])  # absolute paths pass unchanged
        record["duration"] = float(record["duration"])
        for key in OPTIONAL_FIELDS:
            if record[key] is not None:
                record[key] = float(record[key])
        utterances.append(Utterance(**record))
    if not utterances:
        raise LorsError(f"manifest {path} holds no utterances; re-create it")
    return utterances


def to_hf_dataset(source: str | Path | Sequence[Utterance], cast_audio: bool = False):
    """Return a Hugging Face ``datasets.Dataset`` with one row per utterance.

    ``source`` is a manifest path or a list of utterances. Columns are the manifest fields
    (:data:`FIELDS`, then those :data:`OPTIONAL_FIELDS` any utterance has);
    ``audio`` holds absolute path strings. With ``cast_audio=True`` the column is cast to
    ``datasets.Audio(sampling_rate=16000)``: the cast itself works offline, but *reading* a
    row then needs the ``torchcodec`` package in datasets >= 4, which lors does not
    install, so the default keeps path strings (decode them with
    :func:`lors.data.audio.load_audio`).
    """
    import datasets  # lazy: only evaluation and training code needs it

    utterances = read_manifest(source) if isinstance(source, (str, Path)) else list(source)
    keys = FIELDS + tuple(key for key in OPTIONAL_FIELDS
                          if any(getattr(utt, key) is not None for utt in utterances))
    columns = {key: [getattr(utt, key) for utt in utterances] for key in keys}
    columns["audio"] = [os.path.abspath(audio) for audio in columns["audio"]]
    features = datasets.Features({
        key: datasets.Value("string" if key in FIELDS and key != "duration" else "float64")
        for key in keys
    })
    dataset = datasets.Dataset.from_dict(columns, features=features)
    if cast_audio:
        dataset = dataset.cast_column("audio", datasets.Audio(sampling_rate=16000))
    return dataset
