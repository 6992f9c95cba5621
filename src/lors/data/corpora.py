"""Loaders that turn real corpora on disk into :class:`~lors.data.manifest.Utterance` lists.

* :func:`load_covost2` reads CoVoST 2 X->en TSVs over a Common Voice release.
* :func:`load_generic` reads our JSONL manifest or a TSV/CSV with ``audio`` and
  ``transcript`` columns.
* :func:`materialize` decodes any of them (e.g. Common Voice MP3) to 16 kHz WAVs plus a
  manifest, so later runs skip MP3 decoding.

Common Voice clips are MP3. soundfile reads MP3 when its libsndfile is >= 1.1; the one
tested here is soundfile 0.14 with libsndfile 1.2.2, which does.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import soundfile as sf
from tqdm import tqdm

from ..errors import LorsError
from .audio import SAMPLE_RATE, is_valid_wav, load_audio, write_wav
from .manifest import Utterance, read_manifest, write_manifest

# CoVoST 2 names some source languages with a region; our codes drop it.
COVOST_CODES = {"sv": "sv-SE", "zh": "zh-CN"}
COVOST_SPLITS = ("train", "dev", "test")


def _clip_duration(path: Path) -> float | None:
    """Seconds of audio in ``path``, or None if it is missing or soundfile cannot open it."""
    try:
        info = sf.info(str(path))
    except (OSError, RuntimeError, sf.SoundFileError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


def _read_covost_tsv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CoVoST TSV as ``(line number, {column: value})``.

    CoVoST writes its TSVs without quoting (sentences contain bare ``"``), so lines are
    split on tabs rather than parsed with csv's quote handling.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise LorsError(f"CoVoST file {path} is empty")
    header = lines[0].split("\t")
    missing = [col for col in ("path", "sentence", "translation") if col not in header]
    if missing:
        raise LorsError(f"CoVoST file {path} lacks column(s) {', '.join(missing)}; "
                        "expected path, sentence, translation, client_id")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            raise LorsError(f"CoVoST file {path}, line {number}: {len(cells)} fields, "
                            f"the header has {len(header)}")
        rows.append((number, dict(zip(header, cells))))
    return rows


def _report_missing(missing: list[str], total: int, max_missing: float, what: str,
                    skipped: list[str] | None) -> None:
    """Raise if too many clips are missing, else warn and record them in ``skipped``."""
    if not missing:
        return
    examples = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    message = f"{len(missing)} of {total} clips of {what} are missing or unreadable: {examples}"
    if len(missing) > max_missing * total:
        raise LorsError(f"{message}; check the Common Voice folder, or raise max_missing "
                        f"(now {max_missing:.1%}) to skip them")
    warnings.warn(f"{message}; skipping them", stacklevel=3)
    if skipped is not None:
        skipped.extend(missing)


def load_covost2(covost_tsv_dir: str | Path, cv_root: str | Path, language: str,
                 splits: str | Iterable[str] = COVOST_SPLITS, *,
                 limit_per_split: int | None = None, max_missing: float = 0.01,
                 skipped: list[str] | None = None) -> list[Utterance]:
    """Load CoVoST 2 ``language``->English utterances for ``splits``.

    Reads ``<covost_tsv_dir>/covost_v2.<code>_en.<split>.tsv`` (``<code>`` is ``sv-SE`` for
    ``sv``, ``zh-CN`` for ``zh``, else ``language``; either form is accepted) with columns
    ``path, sentence, translation[, client_id]``. Clips are looked up as
    ``<cv_root>/clips/<path>``, then ``<cv_root>/<path>``. Utterances get our code
    (``sv``), ids ``<lang>-<split>-<clip stem>`` and durations from ``soundfile.info``.
    Clips that are missing or unreadable are skipped with a warning (their paths appended
    to ``skipped``) when at most ``max_missing`` (a fraction) of a split; more raise
    :class:`LorsError`. ``limit_per_split`` keeps the first N rows of each split.
    """
    code = COVOST_CODES.get(language, language)
    ours = next((k for k, v in COVOST_CODES.items() if v == code), code)
    cv_root = Path(cv_root)
    split_list = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in split_list if s not in COVOST_SPLITS]
    if bad:
        raise LorsError(f"unknown CoVoST split(s) {', '.join(bad)}; choose from "
                        f"{', '.join(COVOST_SPLITS)}")
    utterances: list[Utterance] = []
    for split in split_list:
        tsv = Path(covost_tsv_dir) / f"covost_v2.{code}_en.{split}.tsv"
        if not tsv.is_file():
            raise LorsError(f"CoVoST file {tsv} does not exist; generate the {code}->en TSVs "
                            "with CoVoST's get_covost_splits.py into that folder")
        rows = _read_covost_tsv(tsv)[:limit_per_split]
        missing = []
        for number, row in rows:
            clip = cv_root / "clips" / row["path"]
            if not clip.is_file():
                clip = cv_root / row["path"]
            duration = _clip_duration(clip)
            if duration is None:
                missing.append(row["path"])
                continue
            if not row["sentence"].strip():
                raise LorsError(f"CoVoST file {tsv}, line {number}: empty sentence")
            utterances.append(Utterance(
                id=f"{ours}-{split}-{Path(row['path']).stem}", language=ours, split=split,
                audio=str(clip.resolve()), duration=duration, transcript=row["sentence"],
                translation=row["translation"] or None, voice=None))
        _report_missing(missing, len(rows), max_missing, str(tsv), skipped)
    return utterances


def _generic_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Rows of a TSV (``.tsv``) or CSV (anything else) file with a header line."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [col for col in ("audio", "transcript") if col not in header]
        if missing:
            raise LorsError(f"corpus file {path} lacks column(s) {', '.join(missing)}; needs "
                            "audio, transcript and optionally translation, language, split, id")
        # reader.line_num is the physical line the row ended on (quoted fields may span lines)
        return [(reader.line_num, row) for row in reader]


def _generic_utterance(path: Path, number: int, row: dict[str, str], language: str | None,
                       split: str) -> Utterance:
    """Build one utterance from a TSV/CSV row, resolving audio against the file's folder."""
    where = f"corpus file {path}, line {number}"
    if None in row or any(value is None for value in row.values()):
        raise LorsError(f"{where}: the number of fields does not match the header")
    lang = (row.get("language") or "").strip() or language
    if not lang:
        raise LorsError(f"{where}: no language; add a language column or pass language=")
    if not row["transcript"].strip():
        raise LorsError(f"{where}: empty transcript")
    audio = Path(os.path.abspath(path.parent / row["audio"].strip()))
    duration = _clip_duration(audio)
    if duration is None:
        raise LorsError(f"{where}: audio {audio} is missing or unreadable")
    the_split = (row.get("split") or "").strip() or split
    ident = (row.get("id") or "").strip() or f"{path.stem}-{number:06d}"
    return Utterance(id=ident, language=lang, split=the_split, audio=str(audio),
                     duration=duration, transcript=row["transcript"],
                     translation=(row.get("translation") or "").strip() or None, voice=None)


def load_generic(path: str | Path, *, language: str | None = None,
                 split: str = "test") -> list[Utterance]:
    """Load a corpus listed in ``path``.

    ``.jsonl``/``.json`` files are read as our manifest (:func:`read_manifest`). ``.tsv`` and
    ``.csv`` files need ``audio`` and ``transcript`` columns and may have ``translation``,
    ``language``, ``split`` and ``id``; ``language``/``split`` arguments fill in absent
    columns, relative audio paths are resolved against the file's folder, ids default to
    ``<file stem>-<line number>``. A missing or unreadable clip raises :class:`LorsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise LorsError(f"corpus file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_manifest(path)
    utterances = [_generic_utterance(path, number, row, language, split)
                  for number, row in _generic_rows(path)]
    if not utterances:
        raise LorsError(f"corpus file {path} lists no utterances")
    ids = [utt.id for utt in utterances]
    if len(set(ids)) != len(ids):
        raise LorsError(f"corpus file {path} repeats ids; make the id column unique")
    return utterances


def _wav_name(utt_id: str) -> str:
    """A safe file name for an utterance id."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", utt_id) + ".wav"


def materialize(utterances: Sequence[Utterance], out_dir: str | Path, *,
                jobs: int | None = None, show_progress: bool = True) -> Path:
    """Decode every clip to ``out_dir/<lang>/<split>/<id>.wav`` (16 kHz mono); return the manifest.

    The manifest ``out_dir/manifest.jsonl`` lists the same utterances with the new audio
    paths and exact durations. Existing valid WAVs are reused, so an interrupted run
    resumes. Ids that collide once made file-safe raise :class:`LorsError`.
    """
    out_dir = Path(out_dir)
    targets = [out_dir / utt.language / utt.split / _wav_name(utt.id) for utt in utterances]
    if len(set(targets)) != len(targets):
        raise LorsError("utterance ids collide once made file-safe; make them unique")

    def convert(pair: tuple[Utterance, Path]) -> Utterance:
        utt, target = pair
        if not is_valid_wav(target) or sf.info(str(target)).samplerate != SAMPLE_RATE:
            write_wav(target, load_audio(utt.audio), SAMPLE_RATE)
        return replace(utt, audio=str(target), duration=sf.info(str(target)).duration)

    pool = ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1))
    try:
        done = list(tqdm(pool.map(convert, zip(utterances, targets)), total=len(targets),
                         desc="decode", unit="clip", disable=not show_progress))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # stop queued work on an error
    return write_manifest(out_dir / "manifest.jsonl", done)
