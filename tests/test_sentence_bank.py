"""The shipped sentence bank's content rules, and the loader's split rule and errors (fast)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from lors.data.sentences import (
    BANK_DIR,
    BANK_LANGUAGES,
    COLUMNS,
    LANGUAGES,
    SPLITS,
    Sentence,
    load_bank,
    select,
    split_of,
)
from lors.errors import LorsError

HEADER = "sid\ten\tca\tde\tes\tfr\tit\tid\tnl\tpt\tru\tsv"
BANK_FILES = sorted(BANK_DIR.glob("sentences-*.tsv"), key=lambda path: path.name)


def _data_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[1:-1]


def test_languages_and_columns():
    assert LANGUAGES == ("ca", "de", "es", "fr", "it", "id", "nl", "pt", "ru", "sv")
    assert SPLITS == ("train", "dev", "test")
    assert "\t".join(COLUMNS) == HEADER
    assert set(BANK_LANGUAGES) == {"en", *LANGUAGES}


@pytest.mark.parametrize("path", BANK_FILES, ids=lambda path: path.name)
def test_bank_file_format(path):
    raw = path.read_bytes()
    text = raw.decode("utf-8")  # plain UTF-8: no BOM, no CR, ends with one newline
    assert not text.startswith("\ufeff") and "\r" not in text and '"' not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert text.split("\n")[0] == HEADER
    for line_no, line in enumerate(_data_lines(path), start=2):
        cells = line.split("\t")
        assert len(cells) == len(COLUMNS), f"{path.name}:{line_no}"
        assert re.fullmatch(r"s\d{4}", cells[0]), f"{path.name}:{line_no}: id {cells[0]!r}"
        for name, cell in zip(COLUMNS[1:], cells[1:]):
            assert cell == cell.strip() and cell, f"{path.name}:{line_no} {name}: {cell!r}"


def test_first_part_has_its_150_rows():
    part = BANK_DIR / "sentences-1.tsv"
    ids = [line.split("\t")[0] for line in _data_lines(part)]
    assert ids == [f"s{i:04d}" for i in range(1, 151)]


@pytest.fixture(scope="module")
def bank() -> list[Sentence]:
    return load_bank()


def test_every_cell_is_clean_text(bank):
    problems = []
    for sentence in bank:
        assert set(sentence.texts) == set(BANK_LANGUAGES)
        for lang in BANK_LANGUAGES:
            text = sentence.text(lang)
            words = len(text.split())
            if not text.strip():
                problems.append(f"{sentence.sid} {lang}: empty")
            if re.search(r"\d", text):
                problems.append(f"{sentence.sid} {lang}: digit in {text!r}")
            if not 3 <= words <= 20:
                problems.append(f"{sentence.sid} {lang}: {words} words in {text!r}")
            if "\t" in text or "\n" in text:
                problems.append(f"{sentence.sid} {lang}: tab or newline")
            cyrillic = bool(re.search(r"[\u0400-\u04ff]", text))
            if cyrillic != (lang == "ru"):
                problems.append(f"{sentence.sid} {lang}: wrong script in {text!r}")
    assert not problems, "\n".join(problems)


def test_ids_and_english_sentences_are_unique(bank):
    ids = Counter(s.sid for s in bank)
    assert not [sid for sid, n in ids.items() if n > 1]
    english = Counter(s.text("en").casefold() for s in bank)
    assert not [text for text, n in english.items() if n > 1]


def test_split_rule_follows_bank_position(bank):
    assert [s.split for s in bank] == [split_of(i) for i in range(len(bank))]
    assert [split_of(i) for i in range(12)] == ["train"] * 8 + ["dev", "test"] + ["train"] * 2
    by_split = {split: {s.sid for s in bank if s.split == split} for split in SPLITS}
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]
    assert set().union(*by_split.values()) == {s.sid for s in bank}


def test_split_sizes_are_eighty_ten_ten(bank):
    total = len(bank)
    assert total % 10 == 0 and total >= 150
    if (BANK_DIR / "sentences-1.tsv").exists() and (BANK_DIR / "sentences-2.tsv").exists():
        assert total >= 300
    counts = Counter(s.split for s in bank)
    assert counts == {"train": total * 8 // 10, "dev": total // 10, "test": total // 10}


def test_select_keeps_bank_order_and_limits(bank):
    held_out = select(["de", "ru"], ["dev", "test"])
    assert held_out == [s for s in bank if s.split in ("dev", "test")]
    first = select(["ca"], ["test", "train"], limit_per_split=2)
    assert [s.split for s in first].count("train") == 2
    assert [s.split for s in first].count("test") == 2
    assert first == [s for s in bank if s in first]  # bank order, not the order asked
    assert select(list(LANGUAGES), list(SPLITS), limit_per_split=0) == []
    assert select("sv", "dev") == select(["sv"], ["dev"])


def test_select_rejects_unknown_names():
    with pytest.raises(LorsError, match=r"unknown language.*'xx'.*ca, de"):
        select(["de", "xx"], ["train"])
    with pytest.raises(LorsError, match=r"unknown split.*'valid'.*train, dev, test"):
        select(["de"], ["valid"])
    with pytest.raises(LorsError, match="no languages"):
        select([], ["train"])
    with pytest.raises(LorsError, match="limit_per_split"):
        select(["de"], ["train"], limit_per_split=-1)


def test_text_of_unknown_language_is_a_clear_error(bank):
    with pytest.raises(LorsError, match=rf"{bank[0].sid}.*'ja'.*en, ca"):
        bank[0].text("ja")
    with pytest.raises(TypeError):
        bank[0].texts["en"] = "changed"  # shared by the cache: read-only


def _write(folder: Path, name: str, rows: list[str], header: str = HEADER) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _row(sid: str) -> str:
    return "\t".join([sid, *(f"{lang} text for {sid}." for lang in BANK_LANGUAGES)])


def test_loader_reads_files_in_name_order_and_splits_across_them(tmp_path):
    folder = tmp_path / "bank"
    _write(folder, "sentences-2.tsv", [_row(f"b{i}") for i in range(6)])
    _write(folder, "sentences-1.tsv", [_row(f"a{i}") for i in range(6)])
    sentences = load_bank(folder)
    assert [s.sid for s in sentences] == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]
    assert [s.split for s in sentences][8:10] == ["dev", "test"]
    assert sentences[8].sid == "b2" and sentences[0].text("sv") == "sv text for a0."


@pytest.mark.parametrize(
    "rows, header, message",
    [
        ([_row("a")], HEADER.replace("sid", "id"), r"sentences-1\.tsv:1: bad header"),
        ([_row("a"), "b\tonly two"], HEADER, r"sentences-1\.tsv:3: 2 tab-separated columns"),
        ([_row("a"), _row("b").replace("de text for b.", " ")], HEADER,
         r"sentences-1\.tsv:3: empty cell.*\bde\b"),
        ([_row("a"), "", _row("b")], HEADER, r"sentences-1\.tsv:3: empty line"),
        ([_row("a"), _row("a")], HEADER, r"sentences-1\.tsv:3: sentence id 'a'.*:2"),
    ],
    ids=["header", "columns", "empty-cell", "empty-line", "duplicate-id"],
)
def test_loader_errors_name_file_and_line(tmp_path, rows, header, message):
    folder = tmp_path / "bank"
    _write(folder, "sentences-1.tsv", rows, header=header)
    with pytest.raises(LorsError, match=message):
        load_bank(folder)


def test_loader_errors_for_missing_bank(tmp_path):
    with pytest.raises(LorsError, match="does not exist"):
        load_bank(tmp_path / "nowhere")
    with pytest.raises(LorsError, match="no sentences-"):
        load_bank(tmp_path)


def test_duplicate_id_across_files(tmp_path):
    folder = tmp_path / "bank"
    _write(folder, "sentences-1.tsv", [_row("a")])
    _write(folder, "sentences-2.tsv", [_row("a")])
    with pytest.raises(LorsError, match=r"sentences-2\.tsv:2: .*'a'.*sentences-1\.tsv:2"):
        load_bank(folder)
