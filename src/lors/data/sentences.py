"""The parallel sentence bank that espeak-ng speaks to make synthetic ASR/ST data.

The bank is the set of tab-separated files ``sentences-*.tsv`` in ``lors/data/bank``. Every
file starts with the header ``sid en ca de es fr it id nl pt ru sv`` (tab-separated) and has one
sentence per line: a unique id, the English sentence, and its translation into each of the
paper's ten languages. English is the speech-translation target; the other columns are what
gets spoken and transcribed. Numbers are written as words, cells hold no tabs or newlines.

Splits are fixed by position, not by id or content, so that adding a file never moves an
existing sentence to another split:

* the rows of all ``sentences-*.tsv`` files are concatenated in file-name order (plain
  string sort: ``sentences-1.tsv`` before ``sentences-2.tsv``; zero-pad numbers past nine),
  giving each row a 0-based index ``i`` in the whole bank;
* ``i % 10 == 8`` is **dev**, ``i % 10 == 9`` is **test**, everything else is **train**.

A bank whose size is a multiple of ten is therefore split exactly 80% / 10% / 10%
(1,000 rows: 800 train, 100 dev, 100 test), and the three splits never share a sentence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from ..errors import LorsError

LANGUAGES: tuple[str, ...] = ("ca", "de", "es", "fr", "it", "id", "nl", "pt", "ru", "sv")
"""The paper's ten source languages (ASR transcription and ST from these into English)."""

TARGET_LANGUAGE = "en"
"""The speech-translation target; the bank's ``en`` column is the ST reference."""

BANK_LANGUAGES: tuple[str, ...] = (TARGET_LANGUAGE, *LANGUAGES)
"""Every language with a column in the bank."""

COLUMNS: tuple[str, ...] = ("sid", *BANK_LANGUAGES)
"""The exact header of every bank file."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")

BANK_DIR = Path(__file__).resolve().parent / "bank"
BANK_PATTERN = "sentences-*.tsv"


def split_of(index: int) -> str:
    """The split of the row at 0-based ``index`` in the whole bank (see the module docstring)."""
    if index < 0:
        raise ValueError(f"bank index must be >= 0, got {index}")
    rest = index % 10
    return "dev" if rest == 8 else "test" if rest == 9 else "train"


@dataclass(frozen=True)
class Sentence:
    """One bank row: its id, its split and its text in every bank language (``en`` included)."""

    sid: str
    split: str
    texts: Mapping[str, str]

    def __post_init__(self) -> None:
        # A read-only copy: sentences are shared by the cache, callers must not edit them.
        object.__setattr__(self, "texts", MappingProxyType(dict(self.texts)))

    def text(self, language: str) -> str:
        """The sentence in ``language``; a clear LorsError for a code the bank lacks."""
        try:
            return self.texts[language]
        except KeyError:
            raise LorsError(
                f"sentence {self.sid} has no text for language {language!r}; "
                f"the bank has: {', '.join(self.texts)}"
            ) from None


def load_bank(bank_dir: str | Path | None = None) -> list[Sentence]:
    """All sentences of the bank in ``bank_dir`` (default: the package's bank), in bank order.

    Files are read once per folder and cached for the life of the process; each call returns
    a new list of the shared, immutable sentences. Raises LorsError, naming the file and line,
    for a missing bank, a wrong header, a row with the wrong number of columns, an empty cell
    or an id that is used twice.
    """
    folder = BANK_DIR if bank_dir is None else Path(bank_dir)
    return list(_load_bank_cached(folder.resolve()))


def clear_cache() -> None:
    """Forget the banks read so far (only needed when a bank file changes in-process)."""
    _load_bank_cached.cache_clear()


@functools.lru_cache(maxsize=None)
def _load_bank_cached(folder: Path) -> tuple[Sentence, ...]:
    if not folder.is_dir():
        raise LorsError(f"sentence bank folder {folder} does not exist")
    files = sorted(folder.glob(BANK_PATTERN), key=lambda path: path.name)
    if not files:
        raise LorsError(f"sentence bank folder {folder} has no {BANK_PATTERN} files")
    sentences: list[Sentence] = []
    seen: dict[str, str] = {}  # sid -> "file:line" where it was first used
    for path in files:
        for line_no, cells in _read_rows(path):
            where = f"{path}:{line_no}"
            sid = cells[0]
            if sid in seen:
                raise LorsError(f"{where}: sentence id {sid!r} is already used at {seen[sid]}")
            seen[sid] = where
            texts = dict(zip(BANK_LANGUAGES, cells[1:]))
            sentences.append(Sentence(sid=sid, split=split_of(len(sentences)), texts=texts))
    return tuple(sentences)


def _read_rows(path: Path):
    """Yield ``(line_number, cells)`` for each data row of one bank file, checking its format."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise LorsError(f"{path}: not valid UTF-8 ({err})") from None
    except OSError as err:
        raise LorsError(f"{path}: cannot read the sentence bank file ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise LorsError(f"{path}: empty file; expected the header {' '.join(COLUMNS)}")
    header = tuple(lines[0].split("\t"))
    if header != COLUMNS:
        raise LorsError(
            f"{path}:1: bad header {' '.join(header)!r}; expected the tab-separated columns "
            f"{' '.join(COLUMNS)}"
        )
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise LorsError(f"{path}:{line_no}: empty line; every line must be a sentence row")
        cells = line.split("\t")
        if len(cells) != len(COLUMNS):
            raise LorsError(
                f"{path}:{line_no}: {len(cells)} tab-separated columns, expected "
                f"{len(COLUMNS)} ({' '.join(COLUMNS)})"
            )
        empty = [name for name, cell in zip(COLUMNS, cells) if not cell.strip()]
        if empty:
            raise LorsError(f"{path}:{line_no}: empty cell(s) in column(s) {', '.join(empty)}")
        yield line_no, cells


def _as_names(values: str | Sequence[str], what: str) -> list[str]:
    names = [values] if isinstance(values, str) else list(values)
    if not names:
        raise LorsError(f"no {what} given; pass at least one")
    return names


def select(
    languages: str | Sequence[str],
    splits: str | Sequence[str],
    limit_per_split: int | None = None,
    bank_dir: str | Path | None = None,
) -> list[Sentence]:
    """The sentences of ``splits``, in bank order, keeping the first ``limit_per_split`` of each.

    ``languages`` only validates the codes asked for (every row has every language); valid
    codes are the bank's languages, ``en`` and the ten in LANGUAGES. A single string is taken
    as one name. Unknown languages or splits raise LorsError listing the valid names.
    """
    languages = _as_names(languages, "languages")
    splits = _as_names(splits, "splits")
    bad_languages = [lang for lang in languages if lang not in BANK_LANGUAGES]
    if bad_languages:
        raise LorsError(
            f"unknown language code(s) {', '.join(map(repr, bad_languages))}; "
            f"the sentence bank has: {', '.join(BANK_LANGUAGES)}"
        )
    bad_splits = [split for split in splits if split not in SPLITS]
    if bad_splits:
        raise LorsError(
            f"unknown split(s) {', '.join(map(repr, bad_splits))}; choose from {', '.join(SPLITS)}"
        )
    if limit_per_split is not None and (
        isinstance(limit_per_split, bool) or not isinstance(limit_per_split, int)
        or limit_per_split < 0
    ):
        raise LorsError(f"limit_per_split must be a whole number >= 0, got {limit_per_split!r}")
    wanted = set(splits)
    taken = dict.fromkeys(wanted, 0)
    chosen = []
    for sentence in load_bank(bank_dir):
        if sentence.split not in wanted:
            continue
        if limit_per_split is not None and taken[sentence.split] >= limit_per_split:
            continue
        taken[sentence.split] += 1
        chosen.append(sentence)
    return chosen
